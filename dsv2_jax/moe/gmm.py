"""Grouped matmul: each row times its expert's weights, over rows sorted by expert.

One backend per platform, chosen in `gmm_backend`:
  * `ragged_dot`: `jax.lax.ragged_dot` (GPU/TPU; XLA:CPU lowers it to a dense product over
    all experts, ~50x slower there);
  * `blocked` (CPU): each expert's rows padded to a multiple of a block size, every block a
    small matmul against its expert's weights. Exact and dropless with static shapes: at
    most ceil(M/b) + E blocks, whatever the routing.
Neither runs a Python loop over experts nor computes rows against experts they did not choose.

Shapes: M rows, D hidden, F expert width, E experts, T tokens, K experts per token.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from dsv2_jax.config import DeepseekV2Config


def gmm_backend(cfg: DeepseekV2Config) -> str:
    """The one place the grouped-matmul backend is chosen."""
    if cfg.moe_backend != "auto":
        return cfg.moe_backend
    return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"


class _RaggedDot:
    """Rows past sum(group_sizes) (dropped assignments) come out as zeros."""

    def __init__(self, group_sizes, rows: int, n_experts: int):
        self.group_sizes = group_sizes
        self.valid = (jnp.arange(rows) < jnp.sum(group_sizes))[:, None]

    def scatter(self, xs):
        return xs

    def matmul(self, x, w):
        return jax.lax.ragged_dot(x, w.astype(x.dtype), self.group_sizes)

    def gather(self, y):
        return jnp.where(self.valid, y, 0)


def _block_size(rows: int, n_experts: int) -> int:
    mean_group = max(1, rows // n_experts)
    return int(min(128, max(8, 2 ** int(math.log2(mean_group)))))


# Above this many bytes of per-block weight copies ([blocks, D, F]), the blocked backend
# runs block by block instead of as one batched einsum.
_GATHER_LIMIT_BYTES = 64 << 20


class _Blocked:
    """Rows [M, D] sorted by expert -> blocks [nb, b, D], each block one expert's. Rows past
    sum(group_sizes) (dropped assignments) go to a scratch row and come back as zeros.

    Small problems multiply all blocks at once against their experts' weights gathered per
    block ([nb, D, F]); large ones (at V2's shape those copies would be gigabytes) scan over
    the blocks, indexing each block's expert in place and skipping blocks past the last
    row (the worst-case buffers of expert-parallel dropless dispatch are mostly empty)."""

    def __init__(self, group_sizes, rows: int, n_experts: int, block: int | None = None):
        b = block or _block_size(rows, n_experts)
        nb = -(-rows // b) + n_experts
        gs = group_sizes.astype(jnp.int32)
        padded = (gs + b - 1) // b * b
        pstart = jnp.cumsum(padded) - padded
        start = jnp.cumsum(gs) - gs
        expert_of_row = jnp.searchsorted(jnp.cumsum(gs), jnp.arange(rows), side="right")
        valid = expert_of_row < n_experts
        expert_of_row = jnp.minimum(expert_of_row, n_experts - 1)
        self.dest = jnp.where(valid, pstart[expert_of_row] + jnp.arange(rows) - start[expert_of_row],
                              nb * b)
        block_start = jnp.arange(nb) * b
        self.block_expert = jnp.minimum(
            jnp.searchsorted(jnp.cumsum(padded), block_start, side="right"), n_experts - 1)
        self.b, self.nb = b, nb
        self.used = block_start < jnp.sum(padded)

    def scatter(self, xs):
        xp = jnp.zeros((self.nb * self.b + 1, xs.shape[-1]), xs.dtype).at[self.dest].set(xs)
        return xp[:-1].reshape(self.nb, self.b, xs.shape[-1])

    def matmul(self, x, w):
        w = w.astype(x.dtype)
        if self.nb * w.shape[1] * w.shape[2] * w.dtype.itemsize <= _GATHER_LIMIT_BYTES:
            return jnp.einsum("nbd,ndf->nbf", x, w[self.block_expert])

        # Rematerialised: otherwise autodiff keeps every block's slice of the weights as a
        # residual, the [nb, D, F] copy this path exists to avoid.
        @functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable)
        def block(_, args):
            xb, e, used = args
            # The empty branch is built from both operands so that, inside shard_map, it
            # varies over the same mesh axes as the product.
            y = jax.lax.cond(used, lambda: xb @ jax.lax.dynamic_index_in_dim(w, e, keepdims=False),
                             lambda: (xb[:, :1] * 0) @ (w[0, :1] * 0))
            return None, y

        _, y = jax.lax.scan(block, None, (x, self.block_expert, self.used))
        return y

    def gather(self, y):
        flat = y.reshape(self.nb * self.b, y.shape[-1])
        return jnp.concatenate([flat, jnp.zeros((1, y.shape[-1]), y.dtype)])[self.dest]


_BACKENDS = {"ragged_dot": _RaggedDot, "blocked": _Blocked}


def expert_ffn(xs, group_sizes, w_gate, w_up, w_down, backend: str):
    """SwiGLU of each row with its expert's weights. xs [M, D] sorted by expert,
    group_sizes [E] (sum <= M; rows past the sum give zeros), w_gate/w_up [E, D, F],
    w_down [E, F, D] -> [M, D]."""
    plan = _BACKENDS[backend](group_sizes, xs.shape[0], w_gate.shape[0])
    xp = plan.scatter(xs)
    h = jax.nn.silu(plan.matmul(xp, w_gate)) * plan.matmul(xp, w_up)
    return plan.gather(plan.matmul(h, w_down))


def routed_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down, backend: str, keep=None):
    """Routed-expert output: x [T, D], topk_idx/weight [T, K] -> [T, D]. Dropless unless
    `keep` [T, K] marks assignments removed by token dropping (they are not computed)."""
    T, D = x.shape
    K = topk_idx.shape[1]
    E = w_gate.shape[0]
    flat = topk_idx.reshape(-1)
    if keep is not None:
        flat = jnp.where(keep.reshape(-1), flat, E)  # dropped rows sort last, past every group
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=E + 1)[:E]
    ys = expert_ffn(x[order // K], group_sizes, w_gate, w_up, w_down, backend)
    y = jnp.zeros_like(ys).at[order].set(ys).reshape(T, K, D)
    return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), topk_weight).astype(x.dtype)
