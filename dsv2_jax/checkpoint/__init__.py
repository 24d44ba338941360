"""Checkpoint formats: HF safetensors (read/write, explicit name map) and Orbax."""

import os


def path_problem(path: str) -> str | None:
    """Why a local checkpoint path cannot be used, or None. The checkpoint library
    (tensorstore's file driver) reads a backslash as a directory separator: the arrays would
    be written under another path than the metadata, and read back from nowhere. Judged on
    the absolute path: a relative one is read from the current directory."""
    if "\\" in os.path.abspath(os.fspath(path)):
        return "a backslash in the path (the checkpoint library reads it as '/'): rename it"
    return None


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model; the message names the
    file or tensor at fault."""


class DamagedCheckpointWarning(UserWarning):
    """A training workdir's newer checkpoints are damaged and an older step is used; the
    message names each skipped step and why."""
