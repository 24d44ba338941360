"""The environment of the processes tests start."""

import os


def cpu_env(devices: int | None = None, **extra) -> dict:
    """os.environ for a child process on `devices` simulated CPU devices (None: one), keeping
    the session's XLA flags (conftest's compile options) and adding the device count."""
    flags = os.environ.get("XLA_FLAGS", "")
    if devices:
        flags = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **extra)
