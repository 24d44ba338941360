import atexit
import os
import shutil
import sys
import tempfile

# Tests see the checkout first, whether or not the package is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Tests check numbers at tiny shapes, where LLVM's optimisations cost more compile time than
# they save: build at -O0 (this process and, through procenv.cpu_env, the ones it starts).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()


def _session_dir(variable: str, prefix: str) -> str:
    """A directory named by the environment `variable`: as the caller set it, or a fresh one
    removed at exit. Processes this session starts (pytest-xdist workers, test subprocesses)
    inherit the variable, so they share it."""
    if variable not in os.environ:
        path = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, path, ignore_errors=True)
        os.environ[variable] = path
    return os.environ[variable]


# One persistent compilation cache for the session and every process it starts: many tests
# compile the same small programs (each `dsv2 train` subprocess of the tiny config, the
# one-device reference of every mesh check), and XLA compiles are most of the suite's time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
_session_dir("JAX_COMPILATION_CACHE_DIR", "dsv2-jax-test-xla-cache-")

# For results that one worker computes and the others reuse (test_mesh.one_device_metrics).
_session_dir("DSV2_TEST_SHARED_DIR", "dsv2-jax-test-shared-")
