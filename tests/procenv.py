"""The environment of the processes tests start."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_env(devices: int | None = None, **extra) -> dict:
    """os.environ for a child process on `devices` simulated CPU devices (None: one), keeping
    the session's XLA flags (conftest's compile options) and adding the device count."""
    flags = os.environ.get("XLA_FLAGS", "")
    if devices:
        flags = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **extra)


def run_python(code_or_file: str, devices: int | None, *args: str, timeout: float = 900) -> str:
    """stdout of `python FILE args` (a path ending .py) or `python -c CODE args` on `devices`
    simulated CPU devices, run from the checkout; a failure shows the end of both streams."""
    source = [code_or_file] if code_or_file.endswith(".py") else ["-c", code_or_file]
    r = subprocess.run([sys.executable, *source, *args], env=cpu_env(devices), capture_output=True,
                       text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout
