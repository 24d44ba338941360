"""Balance losses (paper section 2.2.3), computed per sequence when cfg.seq_aux.

Shapes: T tokens, E routed experts, K experts per token, D device groups, M the most groups
a token may reach.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv2_jax.config import DeepseekV2Config
from dsv2_jax.moe.routing import RouterOutput


def balance_losses(r: RouterOutput, cfg: DeepseekV2Config, batch: int, n_groups: int | None = None,
                   max_groups_per_token: int | None = None) -> dict:
    """Expert-, device- and communication-level balance losses (unweighted by alpha).

    expert:  sum_i f_i P_i,       f_i = E/(K T) sum_t 1(t chooses i),  P_i = mean_t s_{i,t}
    device:  sum_d f'_d P'_d,     f'_d = mean_{i in d} f_i,            P'_d = sum_{i in d} P_i
    comm:    sum_d f''_d P''_d,   f''_d = D/(M T) sum_t 1(t sent to d), P''_d = P'_d
    T counts the real (non-padding) tokens of one sequence (seq_aux) or of the whole batch;
    padding tokens count nowhere. The choices counted are the router's top-K before any
    dropping. D device groups default to
    cfg.num_device_groups (0: device and comm losses are 0); M is the most groups a token
    can reach: cfg.max_devices_per_token (else D), and never more than K, since a token's K
    experts lie in at most K groups (so f'' = 1 on every group when the sends are balanced).
    """
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    D = n_groups if n_groups is not None else cfg.num_device_groups
    lanes = batch if cfg.seq_aux else 1
    real = r.valid.reshape(lanes, -1, 1).astype(jnp.float32)
    scores = r.scores.reshape(lanes, -1, E) * real
    idx = r.topk_idx.reshape(lanes, -1, K)
    T = jnp.maximum(real.sum(axis=1), 1.0)  # [lanes, 1] real tokens per lane
    chosen = jnp.sum(jax.nn.one_hot(idx, E, dtype=jnp.float32), axis=2) * real  # [lanes, S, E]
    f = chosen.sum(axis=1) * (E / K) / T
    P = scores.sum(axis=1) / T
    out = {"expert": jnp.mean(jnp.sum(f * P, axis=-1))}
    if D:
        M = min(max_groups_per_token or cfg.max_devices_per_token or D, K)
        fd = f.reshape(lanes, D, E // D).mean(-1)
        Pd = P.reshape(lanes, D, E // D).sum(-1)
        sent = chosen.reshape(lanes, chosen.shape[1], D, E // D).max(-1)  # [lanes, S, D] 0/1
        fc = sent.sum(axis=1) * (D / M) / T
        out["device"] = jnp.mean(jnp.sum(fd * Pd, axis=-1))
        out["comm"] = jnp.mean(jnp.sum(fc * Pd, axis=-1))
    else:
        out["device"] = jnp.zeros((), jnp.float32)
        out["comm"] = jnp.zeros((), jnp.float32)
    return out
