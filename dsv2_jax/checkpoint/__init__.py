"""Checkpoint formats: HF safetensors (read/write, explicit name map) and Orbax."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model; the message names the
    file or tensor at fault."""


class DamagedCheckpointWarning(UserWarning):
    """A training workdir's newer checkpoints are damaged and an older step is used; the
    message names each skipped step and why."""
