"""DeepSeekMoE: shared experts plus fine-grained routed experts.

    y = shared(u) + sum_{i in topK(s)} g_i * FFN_i(u),   s = softmax(u . e) in float32

Routing (`select_experts`) and the routed-expert compute (`routed_experts`) are pure
functions; the router returns everything later work reads (scores, choices, weights,
per-expert counts) in a `RouterOutput`.

Routed compute sorts the T*K (token, expert) pairs by expert and runs one grouped matmul per
projection. The grouped matmul has one backend per platform, chosen in `gmm_backend`:
  * `ragged_dot`: `jax.lax.ragged_dot` (GPU/TPU; XLA:CPU lowers it to a dense product over
    all experts, ~50x slower there);
  * `blocked` (CPU): each expert's rows padded to a multiple of a block size, every block a
    small matmul against its expert's weights. Exact and dropless with static shapes: at
    most ceil(T*K/b) + E blocks, whatever the routing.
Neither runs a Python loop over experts nor computes tokens against experts they did not
choose.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dsv2_jax.config import DeepseekV2Config
from dsv2_jax.layers import MLP, dtype_of, normal_param


@struct.dataclass
class RouterOutput:
    logits: jax.Array  # [T, E] float32
    scores: jax.Array  # [T, E] float32 softmax over all routed experts
    topk_idx: jax.Array  # [T, K] int32 chosen experts
    topk_weight: jax.Array  # [T, K] float32 combine weights (after norm / scaling)
    expert_counts: jax.Array  # [E] int32 tokens routed to each expert


def _limit_to_groups(scores, n_groups: int, keep: int):
    """Zero the scores outside the `keep` groups with the highest MAX score (V2 semantics)."""
    T, E = scores.shape
    group_max = scores.reshape(T, n_groups, E // n_groups).max(axis=-1)
    _, top_groups = jax.lax.top_k(group_max, keep)
    group_mask = jnp.sum(jax.nn.one_hot(top_groups, n_groups, dtype=jnp.int32), axis=1) > 0
    expert_mask = jnp.repeat(group_mask, E // n_groups, axis=1)
    return jnp.where(expert_mask, scores, 0.0)


def select_experts(scores, cfg: DeepseekV2Config, *, train: bool = False):
    """scores [T,E] float32 -> (topk_idx [T,K] int32, topk_weight [T,K] float32).

    greedy: top-K of all experts. group_limited_greedy: keep the topk_group groups whose best
    expert scores highest, then top-K among their experts. In training, device-limited
    routing additionally confines each token to `max_devices_per_token` of the
    `num_device_groups` expert groups (the same rule with devices as groups).
    Weights: with norm_topk_prob (and K > 1) the top-K weights are divided by their sum and
    NOT scaled (official V2); otherwise multiplied by routed_scaling_factor.
    """
    K = cfg.num_experts_per_tok
    masked = scores
    if cfg.topk_method == "group_limited_greedy":
        masked = _limit_to_groups(masked, cfg.n_group, cfg.topk_group)
    if train and cfg.num_device_groups:
        masked = _limit_to_groups(masked, cfg.num_device_groups, cfg.max_devices_per_token)
    weight, idx = jax.lax.top_k(masked, K)
    if K > 1 and cfg.norm_topk_prob:
        weight = weight / (jnp.sum(weight, axis=-1, keepdims=True) + 1e-20)
    else:
        weight = weight * cfg.routed_scaling_factor
    return idx.astype(jnp.int32), weight


class Router(nnx.Module):
    def __init__(self, cfg: DeepseekV2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # Always float32, whatever param_dtype is.
        self.kernel = normal_param(rngs, (cfg.hidden_size, cfg.n_routed_experts),
                                   cfg.initializer_range, jnp.float32, ("embed", "exp"))

    def __call__(self, x, *, train: bool = False) -> RouterOutput:
        """x [T, D] -> RouterOutput."""
        logits = jnp.einsum("td,de->te", x.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
        scores = jax.nn.softmax(logits, axis=-1)
        idx, weight = select_experts(scores, self.cfg, train=train)
        counts = jnp.bincount(idx.reshape(-1), length=self.cfg.n_routed_experts).astype(jnp.int32)
        return RouterOutput(logits, scores, idx, weight, counts)


# ---------------------------------------------------------------------------------------
# Grouped matmul over rows sorted by expert.


def gmm_backend(cfg: DeepseekV2Config) -> str:
    """The one place the grouped-matmul backend is chosen."""
    if cfg.moe_backend != "auto":
        return cfg.moe_backend
    return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"


class _RaggedDot:
    def __init__(self, group_sizes, rows: int, n_experts: int):
        self.group_sizes = group_sizes

    def scatter(self, xs):
        return xs

    def matmul(self, x, w):
        return jax.lax.ragged_dot(x, w.astype(x.dtype), self.group_sizes)

    def gather(self, y):
        return y


def _block_size(rows: int, n_experts: int) -> int:
    mean_group = max(1, rows // n_experts)
    return int(min(128, max(8, 2 ** int(math.log2(mean_group)))))


class _Blocked:
    """Rows [M, D] sorted by expert -> blocks [nb, b, D], each block one expert's."""

    def __init__(self, group_sizes, rows: int, n_experts: int, block: int | None = None):
        b = block or _block_size(rows, n_experts)
        nb = -(-rows // b) + n_experts
        gs = group_sizes.astype(jnp.int32)
        padded = (gs + b - 1) // b * b
        pstart = jnp.cumsum(padded) - padded
        start = jnp.cumsum(gs) - gs
        expert_of_row = jnp.searchsorted(jnp.cumsum(gs), jnp.arange(rows), side="right")
        expert_of_row = jnp.minimum(expert_of_row, n_experts - 1)
        self.dest = pstart[expert_of_row] + jnp.arange(rows) - start[expert_of_row]
        block_start = jnp.arange(nb) * b
        self.block_expert = jnp.minimum(
            jnp.searchsorted(jnp.cumsum(padded), block_start, side="right"), n_experts - 1)
        self.b, self.nb = b, nb

    def scatter(self, xs):
        xp = jnp.zeros((self.nb * self.b, xs.shape[-1]), xs.dtype).at[self.dest].set(xs)
        return xp.reshape(self.nb, self.b, xs.shape[-1])

    def matmul(self, x, w):
        return jnp.einsum("nbd,ndf->nbf", x, w.astype(x.dtype)[self.block_expert])

    def gather(self, y):
        return y.reshape(self.nb * self.b, y.shape[-1])[self.dest]


_BACKENDS = {"ragged_dot": _RaggedDot, "blocked": _Blocked}


def expert_ffn(xs, group_sizes, w_gate, w_up, w_down, backend: str):
    """SwiGLU of each row with its expert's weights. xs [M, D] sorted by expert,
    group_sizes [E] (sum = M), w_gate/w_up [E, D, F], w_down [E, F, D] -> [M, D]."""
    plan = _BACKENDS[backend](group_sizes, xs.shape[0], w_gate.shape[0])
    xp = plan.scatter(xs)
    h = jax.nn.silu(plan.matmul(xp, w_gate)) * plan.matmul(xp, w_up)
    return plan.gather(plan.matmul(h, w_down))


def routed_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down, backend: str):
    """Dropless routed-expert output: x [T, D], topk_idx/weight [T, K] -> [T, D]."""
    T, D = x.shape
    K = topk_idx.shape[1]
    E = w_gate.shape[0]
    flat = topk_idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=E)
    ys = expert_ffn(x[order // K], group_sizes, w_gate, w_up, w_down, backend)
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(T, K, D)
    return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), topk_weight).astype(x.dtype)


class Experts(nnx.Module):
    def __init__(self, cfg: DeepseekV2Config, *, rngs: nnx.Rngs):
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        pdt, std = dtype_of(cfg.param_dtype), cfg.initializer_range
        self.gate_proj = normal_param(rngs, (E, D, F), std, pdt, ("exp", "embed", "moe_mlp"))
        self.up_proj = normal_param(rngs, (E, D, F), std, pdt, ("exp", "embed", "moe_mlp"))
        self.down_proj = normal_param(rngs, (E, F, D), std, pdt, ("exp", "moe_mlp", "embed"))


class MoE(nnx.Module):
    def __init__(self, cfg: DeepseekV2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.gate = Router(cfg, rngs=rngs)
        self.experts = Experts(cfg, rngs=rngs)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, rngs=rngs,
                std=cfg.initializer_range, dtype=dtype_of(cfg.dtype),
                param_dtype=dtype_of(cfg.param_dtype), hidden_axis="moe_mlp")
            if cfg.n_shared_experts else None)

    def __call__(self, x, *, train: bool = False):
        """x [B, T, D] -> (y [B, T, D], RouterOutput over the B*T tokens)."""
        B, T, D = x.shape
        xt = x.reshape(B * T, D)
        r = self.gate(xt, train=train)
        e = self.experts
        y = routed_experts(xt, r.topk_idx, r.topk_weight, e.gate_proj[...], e.up_proj[...],
                           e.down_proj[...], gmm_backend(self.cfg))
        if self.shared_experts is not None:
            y = y + self.shared_experts(xt)
        return y.reshape(B, T, D), r
