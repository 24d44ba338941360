"""dsv2_jax: DeepSeek-V2 in JAX / Flax NNX."""

from dsv2_jax.config import DeepseekV2Config, load_config
from dsv2_jax.model import DeepseekV2ForCausalLM

__all__ = ["DeepseekV2Config", "DeepseekV2ForCausalLM", "from_pretrained", "load_config", "init_model"]


def init_model(cfg: DeepseekV2Config, seed: int = 0) -> DeepseekV2ForCausalLM:
    """A randomly initialised model."""
    from flax import nnx

    return DeepseekV2ForCausalLM(cfg, rngs=nnx.Rngs(params=seed))


def from_pretrained(path, dtype=None, **kw):
    """Loads an HF safetensors directory or a dsv2_jax Orbax checkpoint; see
    `dsv2_jax.checkpoint.hf.from_pretrained`."""
    from dsv2_jax.checkpoint.hf import from_pretrained as _fp

    return _fp(path, dtype=dtype, **kw)
