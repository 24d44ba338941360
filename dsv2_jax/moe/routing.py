"""Routing: which experts each token goes to, with what weight, and which of those
(token, device group) rows survive a capacity.

    s = softmax(u . e) in float32;  top-K of s, optionally confined to the best topk_group
    groups (group_limited_greedy) and, in training, to the best max_devices_per_token device
    groups (device-limited routing); weights g = s (x routed_scaling_factor, or normalised).

Shapes: T tokens, E routed experts, K experts per token, G device groups (the expert-parallel
devices, or groups simulated on one device), D hidden.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dsv2_jax.config import DeepseekV2Config
from dsv2_jax.layers import normal_param, use


@struct.dataclass
class RouterOutput:
    """What the router decided, for the losses, the metrics and the dispatch. Per-token fields
    cover the layer's tokens (split over the token axes on a mesh)."""

    logits: jax.Array  # [T, E] float32
    scores: jax.Array  # [T, E] float32 softmax over all routed experts
    topk_idx: jax.Array  # [T, K] int32 chosen experts
    topk_weight: jax.Array  # [T, K] float32 combine weights (after norm / scaling; 0 if dropped)
    expert_counts: jax.Array  # [E] int32 real tokens routed to each expert (before dropping)
    keep: jax.Array  # [T, K] bool, False where token dropping removed the assignment
    valid: jax.Array  # [T] bool, False for padding tokens (not counted, never sent)
    rows: jax.Array = None  # [T] int32 device rows the token was dispatched as (after dropping)


def group_mask(scores, n_groups: int, keep: int):
    """[T, E] bool: the experts of the `keep` groups (of n_groups contiguous ones) whose best
    expert scores highest (V2 takes the MAX per group; V3 the sum of the top two)."""
    T, E = scores.shape
    best = scores.reshape(T, n_groups, E // n_groups).max(axis=-1)
    _, top = jax.lax.top_k(best, keep)
    kept = jnp.sum(jax.nn.one_hot(top, n_groups, dtype=jnp.int32), axis=1) > 0
    return jnp.repeat(kept, E // n_groups, axis=1)


def select_experts(scores, cfg: DeepseekV2Config, *, train: bool = False):
    """scores [T,E] float32 -> (topk_idx [T,K] int32, topk_weight [T,K] float32).

    greedy: top-K of all experts. group_limited_greedy: keep the topk_group groups whose best
    expert scores highest, then top-K among their experts. In training, device-limited
    routing also confines each token to `max_devices_per_token` of the `num_device_groups`
    device groups: chosen among the experts the group limit left, so that every chosen
    expert satisfies both limits (the config checks that at least K always remain).
    Weights: with norm_topk_prob (and K > 1) the top-K weights are divided by their sum and
    NOT scaled (official V2); otherwise multiplied by routed_scaling_factor.
    """
    K = cfg.num_experts_per_tok
    allowed = jnp.ones(scores.shape, bool)
    if cfg.topk_method == "group_limited_greedy":
        allowed = group_mask(scores, cfg.n_group, cfg.topk_group)
    if train and cfg.num_device_groups:
        # Masked experts score -1 (scores are >= 0), so a device holding no allowed expert
        # is never among the kept ones while enough devices hold some.
        allowed &= group_mask(jnp.where(allowed, scores, -1.0), cfg.num_device_groups,
                              cfg.max_devices_per_token)
    weight, idx = jax.lax.top_k(jnp.where(allowed, scores, -1.0), K)
    weight = jnp.maximum(weight, 0.0)
    if K > 1 and cfg.norm_topk_prob:
        weight = weight / (jnp.sum(weight, axis=-1, keepdims=True) + 1e-20)
    else:
        weight = weight * cfg.routed_scaling_factor
    return idx.astype(jnp.int32), weight


def router_scores(x, kernel):
    """x [T, D], kernel [D, E] -> (logits, softmax scores) [T, E], float32 at full precision
    (TPU's default bf16 passes could pick other experts than the reference)."""
    logits = jnp.einsum("td,de->te", x.astype(jnp.float32), kernel.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    return logits, jax.nn.softmax(logits, axis=-1)


def expert_counts(idx, valid, n_experts: int):
    """[E] int32: real tokens routed to each expert."""
    return jnp.zeros(n_experts, jnp.int32).at[idx.reshape(-1)].add(
        jnp.repeat(valid, idx.shape[1]).astype(jnp.int32))


# ---------------------------------------------------------------------------------------
# Token dropping (training only): a capacity per destination device group.


def drop_groups(cfg: DeepseekV2Config) -> int:
    """The units a capacity applies to: the device groups, else each expert on its own."""
    return cfg.num_device_groups or cfg.n_routed_experts


def rows_per_token_limit(cfg: DeepseekV2Config, n_groups: int, train: bool) -> int:
    """M: the most device groups one token can reach."""
    limit = min(cfg.num_experts_per_tok, n_groups)
    if train and cfg.num_device_groups == n_groups and cfg.max_devices_per_token:
        limit = min(limit, cfg.max_devices_per_token)
    return limit


def capacity_rows(capacity_factor: float, tokens: int, max_groups: int, n_groups: int) -> int:
    """Rows one source accepts per destination: ceil(factor * T * M / G), the average load
    of a destination times the factor."""
    return int(math.ceil(capacity_factor * tokens * max_groups / n_groups))


def dynamic_capacity(cfg: DeepseekV2Config, valid, n_groups: int, train: bool = True):
    """`capacity_rows` over the shard's real tokens (padding does not earn capacity); never
    more than the static buffer `capacity_rows(..., T, ...)`."""
    M = rows_per_token_limit(cfg, n_groups, train)
    real = jnp.sum(valid).astype(jnp.float32)
    return jnp.ceil(cfg.capacity_factor * real * M / n_groups).astype(jnp.int32)


def _protected_sequences(batch: int, fraction: float) -> int:
    """round(fraction * batch), half up, and at least one when fraction > 0 and batch >= 2.
    Without that floor a batch of one sequence is protected only from fraction 0.5 up, so that
    at small fractions dropping still applies to shards holding one sequence."""
    n = int(fraction * batch + 0.5)
    if fraction > 0 and batch >= 2:
        n = max(n, 1)
    return min(n, batch)


def never_drop_tokens(batch: int, seq: int, fraction: float):
    """[batch*seq] bool: tokens of the first `_protected_sequences` sequences of the batch.
    Training batches are shuffled, so these are a random ~`fraction` of training sequences.
    On a mesh each token shard protects its own first sequences."""
    return jnp.repeat(jnp.arange(batch) < _protected_sequences(batch, fraction), seq)


def protected_rows(batch: int, seq: int, fraction: float) -> int:
    """How many tokens `never_drop_tokens` protects (static)."""
    return _protected_sequences(batch, fraction) * seq


def group_rows(idx, weight, scores, valid, n_experts: int, n_groups: int):
    """The rows a token is dispatched as: one per device group holding any of its experts.

    idx, weight [T, K]; scores [T, E]; valid [T]. Returns send [T, G] bool (padding sends
    nothing) and affinity [T, G]: the token's summed router score over its chosen experts in
    that group, by which rows compete for capacity."""
    per = n_experts // n_groups
    group = idx // per  # [T, K]
    hit = jax.nn.one_hot(group, n_groups, dtype=jnp.float32)  # [T, K, G]
    chosen_scores = jnp.take_along_axis(scores, idx, axis=1)  # [T, K]
    send = (hit.sum(axis=1) > 0) & valid[:, None]
    affinity = jnp.einsum("tkg,tk->tg", hit, chosen_scores)
    del weight
    return send, affinity


def rank_rows(send, affinity, protected):
    """Each row's place in its destination's buffer: protected rows first, then by affinity
    (highest first); rows not sent last. send/affinity [T, G], protected [T] -> rank [T, G]
    int32 (0-based, per column)."""
    T = send.shape[0]
    priority = affinity + 2.0 * protected[:, None].astype(affinity.dtype) - 4.0 * ~send
    order = jnp.argsort(-priority, axis=0, stable=True)  # [T, G]: row at rank r
    ranks = jnp.zeros_like(order).at[order, jnp.arange(send.shape[1])[None, :]].set(
        jnp.broadcast_to(jnp.arange(T)[:, None], order.shape))
    return ranks.astype(jnp.int32)


def token_order_ranks(send):
    """Ranks in token order (dropless dispatch: every sent row has a slot)."""
    return (jnp.cumsum(send, axis=0) - 1).astype(jnp.int32)


def capacity_keep(idx, scores, valid, protected, n_experts: int, n_groups: int, capacity: int):
    """Which (token, expert) assignments survive a capacity of `capacity` rows per device
    group, a row being one token sent to one group. Over capacity the lowest-affinity rows
    are dropped (all of the token's experts in that group); protected rows are ranked first
    and always kept; padding is never kept. Returns keep [T, K] bool and rows [T] int32 (rows
    each token is sent as after dropping)."""
    send, affinity = group_rows(idx, None, scores, valid, n_experts, n_groups)
    rank = rank_rows(send, affinity, protected & valid)
    kept_rows = send & ((rank < capacity) | protected[:, None])
    group = idx // (n_experts // n_groups)
    keep = jnp.take_along_axis(kept_rows, group, axis=1) & valid[:, None]
    return keep, kept_rows.sum(axis=1).astype(jnp.int32)


class Router(nnx.Module):
    def __init__(self, cfg: DeepseekV2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        # Always float32, whatever param_dtype is.
        self.kernel = normal_param(rngs, (cfg.hidden_size, cfg.n_routed_experts),
                                   cfg.initializer_range, jnp.float32, ("embed", "router"))

    def __call__(self, x, *, train: bool = False, batch: int = 1, valid=None) -> RouterOutput:
        """x [T, D] (batch sequences of T/batch tokens), valid [T] bool (None: all real
        tokens) -> RouterOutput, routing and dropping exactly as one token shard of the MoE
        layer does."""
        return route(x, use(self.kernel), self.cfg, train=train, batch=batch, valid=valid)


def route(x, kernel, cfg: DeepseekV2Config, *, train: bool, batch: int, valid=None,
          n_groups: int | None = None) -> RouterOutput:
    """Routing of one token shard: x [T, D] holding `batch` whole sequences, kernel [D, E].
    With train and a capacity_factor, rows over each destination group's capacity are dropped
    (`capacity_keep`); n_groups defaults to `drop_groups(cfg)`."""
    E = cfg.n_routed_experts
    T = x.shape[0]
    valid = jnp.ones(T, bool) if valid is None else valid
    logits, scores = router_scores(x, kernel)
    idx, weight = select_experts(scores, cfg, train=train)
    counts = expert_counts(idx, valid, E)
    G = n_groups or drop_groups(cfg)
    if train and cfg.capacity_factor is not None:
        protected = never_drop_tokens(batch, T // batch, cfg.never_drop_fraction) & valid
        keep, rows = capacity_keep(idx, scores, valid, protected, E, G,
                                   dynamic_capacity(cfg, valid, G, train))
        weight = jnp.where(keep, weight, 0.0)
    else:
        keep = jnp.ones(idx.shape, bool)
        send, _ = group_rows(idx, None, scores, valid, E, G)
        rows = send.sum(axis=1).astype(jnp.int32)
    return RouterOutput(logits, scores, idx, weight, counts, keep, valid, rows)


def expert_parallel_config(cfg: DeepseekV2Config, ep: int, log=print) -> DeepseekV2Config:
    """The config the graph runs with on an `expert` axis of size ep > 1: the ep devices are
    the device groups of device-limited routing and of the device/communication losses.

    num_device_groups 0 -> ep groups with no per-token limit. Another count D is mapped onto
    the ep devices, keeping the fraction of devices a token may reach (M of D -> about
    M * ep / D of ep, at least 1 and at least enough devices to hold K experts), and said in
    one line. The config saved in the workdir stays the one given."""
    if ep == 1 or not cfg.n_routed_experts:
        return cfg
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    if E % ep:
        raise ValueError(f"--mesh expert={ep}: n_routed_experts={E} is not divisible by {ep}")
    if cfg.num_device_groups == 0:
        return cfg.replace(num_device_groups=ep, max_devices_per_token=ep)
    if cfg.num_device_groups == ep:
        return cfg
    D, Mx = cfg.num_device_groups, cfg.max_devices_per_token
    m = max(1, round(Mx * ep / D))
    while m < ep and m * (E // ep) < K:
        m += 1
    try:
        mapped = cfg.replace(num_device_groups=ep, max_devices_per_token=m)
    except ValueError as e:
        raise ValueError(f"--mesh expert={ep}: the config's {D} device groups cannot be mapped "
                         f"onto {ep} expert devices ({e})") from None
    log(f"device-limited routing over the {ep} expert devices: each token reaches at most {m} of "
        f"{ep} (the config says {Mx} of {D} groups)")
    return mapped
