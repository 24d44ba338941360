"""Orbax checkpoints of model parameters (filled in by the converter issue)."""

import os


def is_orbax_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "params")) and os.path.exists(os.path.join(path, "config.json"))


def load_model(path, dtype=None, compute_dtype=None, **overrides):
    raise NotImplementedError("Orbax model checkpoints are not readable yet")
