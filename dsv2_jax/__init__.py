"""dsv2_jax: DeepSeek-V2 in JAX / Flax NNX."""

import os as _os


def _alias_checkout_folders() -> None:
    """Installed, `kernels/`, `sharding/` and `configs/` are the subpackages
    dsv2_jax.kernels / .sharding / .configs (setuptools package-dir). Imported straight from a
    source checkout that is not installed, map them the same way."""
    import importlib.util
    import sys

    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if not _os.path.exists(_os.path.join(root, "pyproject.toml")):
        return
    for name in ("kernels", "sharding", "configs"):
        full, folder = f"{__name__}.{name}", _os.path.join(root, name)
        if full in sys.modules or not _os.path.isdir(folder) or importlib.util.find_spec(full):
            continue
        spec = importlib.util.spec_from_file_location(
            full, _os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)


_alias_checkout_folders()

from dsv2_jax.config import DeepseekV2Config, load_config
from dsv2_jax.model import DeepseekV2ForCausalLM

__all__ = ["DeepseekV2Config", "DeepseekV2ForCausalLM", "from_pretrained", "load_config", "init_model",
           "generate"]


def init_model(cfg: DeepseekV2Config, seed: int = 0) -> DeepseekV2ForCausalLM:
    """A randomly initialised model."""
    from flax import nnx

    return DeepseekV2ForCausalLM(cfg, rngs=nnx.Rngs(params=seed))


def from_pretrained(path, dtype=None, **kw):
    """Loads an HF safetensors directory or a dsv2_jax Orbax checkpoint; see
    `dsv2_jax.checkpoint.hf.from_pretrained`."""
    from dsv2_jax.checkpoint.hf import from_pretrained as _fp

    return _fp(path, dtype=dtype, **kw)


def generate(model, prompt_ids, max_new_tokens, **kw):
    """Greedy or sampled continuation over the latent KV cache -> [batch, prompt + new] int32
    ids; see `dsv2_jax.generation.generate`."""
    from dsv2_jax.generation import generate as _generate

    return _generate(model, prompt_ids, max_new_tokens, **kw)
