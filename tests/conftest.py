import os
import sys

# Tests see the checkout first, whether or not the package is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Tests check numbers at tiny shapes, where LLVM's optimisations cost more compile time than
# they save: build at -O0 (this process and, through procenv.cpu_env, the ones it starts).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# One persistent compilation cache for the session and every process it starts: many tests
# compile the same small programs (each `dsv2 train` subprocess of the tiny config, the
# one-device reference of every mesh check), and XLA compiles are most of the suite's time.
# A directory the caller set is used as given; otherwise a fresh one, removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="dsv2-jax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# A directory shared by the session's processes (pytest-xdist workers inherit it), for results
# that one worker computes and the others reuse (test_mesh.one_device_metrics).
if "DSV2_TEST_SHARED_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _shared = tempfile.mkdtemp(prefix="dsv2-jax-test-shared-")
    atexit.register(shutil.rmtree, _shared, ignore_errors=True)
    os.environ["DSV2_TEST_SHARED_DIR"] = _shared
