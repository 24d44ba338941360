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
from dsv2_jax.layers import MLP, dtype_of, normal_param, use


@struct.dataclass
class RouterOutput:
    logits: jax.Array  # [T, E] float32
    scores: jax.Array  # [T, E] float32 softmax over all routed experts
    topk_idx: jax.Array  # [T, K] int32 chosen experts
    topk_weight: jax.Array  # [T, K] float32 combine weights (after norm / scaling; 0 if dropped)
    expert_counts: jax.Array  # [E] int32 real tokens routed to each expert (before dropping)
    keep: jax.Array  # [T, K] bool, False where token dropping removed the assignment
    valid: jax.Array  # [T] bool, False for padding tokens (not counted, never kept when dropping)


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
                                   cfg.initializer_range, jnp.float32, ("embed", "router"))

    def __call__(self, x, *, train: bool = False, batch: int = 1, valid=None) -> RouterOutput:
        """x [T, D] (batch sequences of T/batch tokens), valid [T] bool (None: all real
        tokens) -> RouterOutput. Token dropping applies only with train=True and a
        capacity_factor."""
        cfg = self.cfg
        valid = jnp.ones(x.shape[0], bool) if valid is None else valid
        logits = jnp.einsum("td,de->te", x.astype(jnp.float32), use(self.kernel).astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST)
        scores = jax.nn.softmax(logits, axis=-1)
        idx, weight = select_experts(scores, cfg, train=train)
        counts = jnp.zeros(cfg.n_routed_experts, jnp.int32).at[idx.reshape(-1)].add(
            jnp.repeat(valid, idx.shape[1]).astype(jnp.int32))
        keep = jnp.ones(idx.shape, bool)
        if train and cfg.capacity_factor is not None:
            protected = never_drop_tokens(batch, x.shape[0] // batch, cfg.never_drop_fraction)
            keep = capacity_keep(idx, jnp.take_along_axis(scores, idx, axis=1), protected & valid,
                                 cfg.n_routed_experts, drop_groups(cfg), cfg.capacity_factor,
                                 valid=valid)
            weight = jnp.where(keep, weight, 0.0)
        return RouterOutput(logits, scores, idx, weight, counts, keep, valid)


# ---------------------------------------------------------------------------------------
# Token dropping (training only).


def drop_groups(cfg: DeepseekV2Config) -> int:
    """The units a capacity applies to: the device groups, else each expert on its own."""
    return cfg.num_device_groups or cfg.n_routed_experts


def never_drop_tokens(batch: int, seq: int, fraction: float):
    """[batch*seq] bool: tokens of the first round(fraction * batch) sequences of the batch
    (at least one when fraction > 0 and batch >= 2). Training batches are shuffled, so these
    are a random ~`fraction` of training sequences; a batch of one sequence is never
    protected, so that dropping still applies."""
    n = int(fraction * batch + 0.5)
    if fraction > 0 and batch >= 2:
        n = max(n, 1)
    return jnp.repeat(jnp.arange(batch) < min(n, batch), seq)


def capacity_keep(idx, affinity, protected, n_experts: int, n_groups: int, capacity_factor: float,
                  valid=None):
    """Which (token, expert) assignments survive a per-group capacity.

    idx, affinity [T, K] (chosen experts and their router scores), protected [T] bool,
    valid [T] bool (padding tokens False; default all real).
    Each group of n_experts / n_groups experts accepts capacity = ceil(capacity_factor * R*K /
    n_groups) assignments, R the number of real tokens: the average load times the factor.
    Over capacity the lowest-affinity assignments are dropped; protected tokens' assignments
    are never dropped (they are ranked first and kept even beyond capacity); padding is
    ranked last and never kept.
    """
    T, K = idx.shape
    valid = jnp.ones(T, bool) if valid is None else valid
    capacity = jnp.ceil(capacity_factor * jnp.sum(valid) * K / n_groups)
    group = (idx // (n_experts // n_groups)).reshape(-1)
    prot = jnp.repeat(protected, K)
    real = jnp.repeat(valid, K)
    # Rank within each group by (protected first, then affinity descending, padding last):
    # one stable sort on a composite key, group-major.
    priority = affinity.reshape(-1).astype(jnp.float32) + 2.0 * prot - 4.0 * ~real
    order = jnp.lexsort((-priority, group))
    sorted_group = group[order]
    first_of_group = jnp.searchsorted(sorted_group, jnp.arange(n_groups))
    rank_sorted = jnp.arange(T * K) - first_of_group[sorted_group]
    rank = jnp.zeros(T * K, jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
    return (((rank < capacity) | prot) & real).reshape(T, K)


# ---------------------------------------------------------------------------------------
# Balance losses (paper section 2.2.3), computed per sequence when cfg.seq_aux.


def balance_losses(r: RouterOutput, cfg: DeepseekV2Config, batch: int, n_groups: int | None = None,
                   max_groups_per_token: int | None = None) -> dict:
    """Expert-, device- and communication-level balance losses (unweighted by alpha).

    expert:  sum_i f_i P_i,       f_i = E/(K T) sum_t 1(t chooses i),  P_i = mean_t s_{i,t}
    device:  sum_d f'_d P'_d,     f'_d = mean_{i in d} f_i,            P'_d = sum_{i in d} P_i
    comm:    sum_d f''_d P''_d,   f''_d = D/(M T) sum_t 1(t sent to d), P''_d = P'_d
    T counts the real (non-padding) tokens of one sequence (seq_aux) or of the whole batch;
    padding tokens count nowhere. The choices counted are the router's top-K before any
    dropping. D device groups default to
    cfg.num_device_groups (0: device and comm losses are 0); M defaults to
    cfg.max_devices_per_token, else min(K, D).
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
        M = max_groups_per_token or cfg.max_devices_per_token or min(K, D)
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


# ---------------------------------------------------------------------------------------
# Grouped matmul over rows sorted by expert.


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


class _Blocked:
    """Rows [M, D] sorted by expert -> blocks [nb, b, D], each block one expert's. Rows past
    sum(group_sizes) (dropped assignments) go to a scratch row and come back as zeros."""

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

    def scatter(self, xs):
        xp = jnp.zeros((self.nb * self.b + 1, xs.shape[-1]), xs.dtype).at[self.dest].set(xs)
        return xp[:-1].reshape(self.nb, self.b, xs.shape[-1])

    def matmul(self, x, w):
        return jnp.einsum("nbd,ndf->nbf", x, w.astype(x.dtype)[self.block_expert])

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


# ---------------------------------------------------------------------------------------
# Expert parallelism: routed experts sharded over the mesh's `expert` axis.

def expert_parallel_size() -> int:
    """Size of the `expert` axis of the ambient mesh (`jax.set_mesh`); 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "expert" not in mesh.axis_names:
        return 1
    return int(mesh.shape["expert"])


def _ep_local(x, idx, weight, w_gate, w_up, w_down, *, backend: str, ep: int):
    """One device's part (inside shard_map): x [T, D] its tokens, idx/weight [T, K] their
    global expert choices, w_* [E/ep, ...] its experts. Dropless: the send buffer to each
    device has room for all T*K assignments, so nothing is ever dropped."""
    T, D = x.shape
    K = idx.shape[1]
    e_loc = w_gate.shape[0]
    C = T * K
    flat = idx.reshape(-1)
    dev = flat // e_loc
    # Rows sorted by global expert = by destination device, then by local expert.
    order = jnp.argsort(flat, stable=True)
    sorted_dev = dev[order]
    first = jnp.searchsorted(sorted_dev, jnp.arange(ep, dtype=sorted_dev.dtype))
    pos = jnp.zeros(C, jnp.int32).at[order].set(
        (jnp.arange(C) - first[sorted_dev]).astype(jnp.int32))
    send = jnp.zeros((ep, C, D), x.dtype).at[dev, pos].set(x[jnp.arange(C) // K])
    # Local expert id of every row; e_loc marks an empty row (sorted last, never computed).
    send_e = jnp.full((ep, C), e_loc, jnp.int32).at[dev, pos].set((flat % e_loc).astype(jnp.int32))
    recv = jax.lax.all_to_all(send, "expert", 0, 0, tiled=True).reshape(ep * C, D)
    recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0, tiled=True).reshape(ep * C)
    o2 = jnp.argsort(recv_e, stable=True)
    group_sizes = jnp.bincount(recv_e, length=e_loc + 1)[:e_loc]
    ys = expert_ffn(recv[o2], group_sizes, w_gate, w_up, w_down, backend)
    ys = jnp.zeros_like(ys).at[o2].set(ys).reshape(ep, C, D)
    back = jax.lax.all_to_all(ys, "expert", 0, 0, tiled=True)
    y = back[dev, pos].reshape(T, K, D)
    return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), weight).astype(x.dtype)


def routed_experts_ep(x, topk_idx, topk_weight, w_gate, w_up, w_down, backend: str):
    """`routed_experts` (dropless) with the experts sharded over the ambient mesh's `expert`
    axis: x [T, D] and the routing [T, K] (global token order) -> [T, D]. Tokens are split
    over the data-carrying axes; each device sends its (token, expert) rows to the devices
    holding those experts with `all_to_all`, runs its local experts, and sends the results
    back. T need not divide evenly: zero-weight padding rows are added and cut off."""
    mesh = jax.sharding.get_abstract_mesh()
    ep = int(mesh.shape["expert"])
    if w_gate.shape[0] % ep:
        raise ValueError(f"n_routed_experts={w_gate.shape[0]} is not divisible by the "
                         f"expert-parallel size {ep}")
    from dsv2_jax.sharding.rules import BATCH_AXES  # the axes tokens are split over

    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    shards = math.prod(int(mesh.shape[a]) for a in axes)
    T = x.shape[0]
    pad = -T % shards
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        topk_idx = jnp.pad(topk_idx, ((0, pad), (0, 0)))
        topk_weight = jnp.pad(topk_weight, ((0, pad), (0, 0)))
    tok, exp = jax.sharding.PartitionSpec(axes), jax.sharding.PartitionSpec("expert")
    y = jax.shard_map(
        lambda *a: _ep_local(*a, backend=backend, ep=ep),
        in_specs=(tok, tok, tok, exp, exp, exp), out_specs=tok,
    )(x, topk_idx, topk_weight.astype(jnp.float32), w_gate, w_up, w_down)
    return y[:T]


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

    def __call__(self, x, *, train: bool = False, valid=None):
        """x [B, T, D], valid [B, T] bool (False at padding; None: all real)
        -> (y [B, T, D], RouterOutput over the B*T tokens)."""
        B, T, D = x.shape
        xt = x.reshape(B * T, D)
        r = self.gate(xt, train=train, batch=B, valid=None if valid is None else valid.reshape(-1))
        e = self.experts
        dropping = train and self.cfg.capacity_factor is not None
        ep = expert_parallel_size()
        if ep > 1:
            # Routing above is per token, so it ran on the global token order; only the
            # routed compute is split over the devices.
            if dropping:
                raise ValueError("token dropping (capacity_factor) is not supported with "
                                 "expert parallelism yet; set capacity_factor=null")
            if train and self.cfg.num_device_groups not in (0, ep):
                raise ValueError(f"num_device_groups={self.cfg.num_device_groups} must equal the "
                                 f"expert-parallel size {ep} (or be 0)")
            y = routed_experts_ep(xt, r.topk_idx, r.topk_weight, e.gate_proj[...], e.up_proj[...],
                                  e.down_proj[...], gmm_backend(self.cfg))
        else:
            y = routed_experts(xt, r.topk_idx, r.topk_weight, e.gate_proj[...], e.up_proj[...],
                               e.down_proj[...], gmm_backend(self.cfg),
                               keep=r.keep if dropping else None)
        if self.shared_experts is not None:
            y = y + self.shared_experts(xt)
        return y.reshape(B, T, D), r
