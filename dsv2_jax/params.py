"""Parameter counts from the abstract model (`jax.eval_shape`: no weights are built)."""

from __future__ import annotations

import numpy as np
from flax import nnx

from dsv2_jax.config import DeepseekV2Config


def count_params(cfg: DeepseekV2Config) -> tuple[int, int]:
    """(total, active per token).

    Active = the parameters a token's forward pass multiplies with: attention, norms, dense and
    shared MLPs, routers, num_experts_per_tok routed experts per MoE layer and the output head.
    The input embedding table is a lookup, not a matmul, and is not counted as active (this is
    how the published 21B / 2.4B figures come out).
    """
    from dsv2_jax.checkpoint.hf import abstract_model

    state = nnx.state(abstract_model(cfg), nnx.Param)
    total = 0
    routed = 0
    embed = 0
    for path, var in nnx.to_flat_state(state):
        n = int(np.prod(var.shape))
        total += n
        if "experts" in path and "shared_experts" not in path:
            routed += n
        if path[0] == "embed_tokens" and not cfg.tie_word_embeddings:
            embed = n
    if cfg.n_routed_experts:
        active = total - routed + routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    else:
        active = total
    return total, active - embed


def human_count(n: int) -> str:
    """1_090_000 -> '1.09M', 235.7e9 -> '235.74B': units that fit the number."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
