"""Checkpoint formats: HF safetensors (read/write, explicit name map) and Orbax."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the model; the message names the
    file or tensor at fault."""
