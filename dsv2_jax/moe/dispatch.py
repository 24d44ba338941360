"""The routed experts of one token shard, inside the MoE layer's `shard_map`: route the
shard's own tokens, send each token once to every expert device holding one of its chosen
experts, run the local experts there, send one weighted row back.

Per shard (T local tokens, K experts per token, ep expert devices holding e = E/ep experts
each, k = min(K, e) the most of a token's experts one device can hold, C rows per
destination buffer):

    send [T, ep]         a token goes to device d iff one of its experts lives there
                         (at most M devices under device-limited routing); padding never
    rank [T, ep]         its slot in d's buffer: token order when dropless; protected rows,
                         then affinity, when a capacity drops rows
    buffers              x [ep, C, D], local expert ids [ep, C, k] (e = none), weights [ep, C, k]
    exchange             fixed: all_to_all of the whole buffers (C = T when dropless: the
                         worst case, what XLA:CPU can run); ragged: ragged_all_to_all of
                         exactly the rows (counts exchanged first; GPU/TPU)
    receive              rows from every source: the grouped matmul over their (row, slot)
                         assignments sorted by local expert, weighted sum over the slots
    return               the reverse exchange; each token sums its rows
    tensor axis          experts' width F is split over it: every tensor rank holds the same
                         tokens, computes its slice of F, and the outputs are summed (psum)

Balance-loss statistics stay per token in the returned RouterOutput (split over the token
axes like the tokens); only E-sized counts are summed across shards.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import chex
import jax
import jax.numpy as jnp

from dsv2_jax.config import DeepseekV2Config
from dsv2_jax.moe.gmm import routed_experts
from dsv2_jax.moe.routing import (RouterOutput, capacity_rows, dynamic_capacity, expert_counts,
                                  group_rows, never_drop_tokens, protected_rows, rank_rows,
                                  router_scores, rows_per_token_limit, select_experts,
                                  token_order_ranks)


_RAGGED_IMPL = contextvars.ContextVar("dsv2_ragged_all_to_all", default=None)


@contextlib.contextmanager
def emulate_ragged_all_to_all():
    """Run the ragged exchange with `ragged_all_to_all_emulated` (same semantics, built from
    a fixed all_to_all), so that its offsets are checked on CPU, where XLA has no
    ragged_all_to_all."""
    token = _RAGGED_IMPL.set(ragged_all_to_all_emulated)
    try:
        yield
    finally:
        _RAGGED_IMPL.reset(token)


def a2a_flavor(cfg: DeepseekV2Config, dropping: bool) -> str:
    """The one place the exchange is chosen: `ragged` (exactly the rows) on GPU/TPU when
    dropless, `fixed` (whole buffers) on CPU, whose XLA has no ragged_all_to_all, and under a
    capacity (the buffers are then small)."""
    if cfg.moe_dispatch != "auto":
        return cfg.moe_dispatch
    if dropping or jax.default_backend() == "cpu":
        return "fixed"
    return "ragged"


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """Static facts of one call: mesh axis names and sizes, what this shard holds."""

    cfg: DeepseekV2Config
    train: bool
    batch: int  # whole sequences in this shard
    backend: str  # grouped-matmul backend
    flavor: str  # fixed | ragged
    expert_axis: str | None  # None: the experts are not split
    ep: int
    token_axes: tuple  # mesh axes the tokens are split over (psum of counts)
    tensor_axis: tuple[str, ...] | None  # the mesh axes the experts' width is split over

    @property
    def dropping(self) -> bool:
        return self.train and self.cfg.capacity_factor is not None


def _psum(x, axes):
    return jax.lax.psum(x, axes) if axes else x


def shard_forward(x, valid, router_kernel, w_gate, w_up, w_down, spec: ShardSpec, layer=None):
    """x [T, D] this shard's tokens, valid [T]; router_kernel [D, E]; w_* this device's
    experts [e, D, F/tp] and [e, F/tp, D] (gathered over their storage axes), or, with
    `layer` (one shard, no expert axis), a segment's stacks of them and the layer's index.
    Returns (y [T, D] routed output, RouterOutput of the shard)."""
    cfg = spec.cfg
    T, D = x.shape
    E = cfg.n_routed_experts
    chex.assert_shape(valid, (T,))
    chex.assert_shape(router_kernel, (D, E))
    logits, scores = router_scores(x, router_kernel)
    idx, weight = select_experts(scores, cfg, train=spec.train)
    counts = _psum(expert_counts(idx, valid, E), spec.token_axes)
    # The groups a capacity and the dispatch are counted over: the expert devices, else the
    # configured device groups (simulated on one device), else every expert alone.
    G = spec.ep if spec.ep > 1 else (cfg.num_device_groups or E)
    send, affinity = group_rows(idx, weight, scores, valid, E, G)
    if spec.dropping:
        protected = never_drop_tokens(spec.batch, T // spec.batch, cfg.never_drop_fraction) & valid
        cap = dynamic_capacity(cfg, valid, G, spec.train)
        rank = rank_rows(send, affinity, protected)
        kept = send & ((rank < cap) | protected[:, None])
        buffer = min(T, capacity_rows(cfg.capacity_factor, T, rows_per_token_limit(cfg, G, spec.train), G)
                     + protected_rows(spec.batch, T // spec.batch, cfg.never_drop_fraction))
    else:
        rank = token_order_ranks(send)
        kept = send
        buffer = T
    group = idx // (E // G)
    keep = jnp.take_along_axis(kept, group, axis=1) & valid[:, None]
    weight = jnp.where(keep, weight, 0.0)
    rows = kept.sum(axis=1).astype(jnp.int32)
    router = RouterOutput(logits, scores, idx, weight, counts, keep, valid, rows)
    if spec.ep == 1:
        y = routed_experts(x, idx, weight, w_gate, w_up, w_down, spec.backend,
                           keep=keep if spec.dropping else None, layer=layer)
    else:
        assert layer is None, "expert parallelism takes one layer's experts"
        y = _expert_parallel(x, idx, weight, kept, rank, buffer, w_gate, w_up, w_down, spec)
    if spec.tensor_axis:  # each rank there computed its slice of the experts' width
        y = jax.lax.psum(y.astype(jnp.float32), spec.tensor_axis).astype(x.dtype)
    return y, router


def _expert_parallel(x, idx, weight, kept, rank, buffer: int, w_gate, w_up, w_down, spec: ShardSpec):
    """Dispatch of kept rows to the ep expert devices, compute there, combine here."""
    T, D = x.shape
    K = idx.shape[1]
    ep = spec.ep
    e = w_gate.shape[0]
    k = min(K, e)
    C = buffer
    # Each row's k slots: the token's experts on that device as local ids (e = an empty
    # slot), in the token's own order of its experts.
    dev = idx // e  # [T, K]
    earlier = jnp.tril(jnp.ones((K, K), bool), -1)  # k' < k
    slot = jnp.sum((dev[:, :, None] == dev[:, None, :]) & earlier[None], axis=-1)  # [T, K]
    t_ix = jnp.broadcast_to(jnp.arange(T)[:, None], (T, K))
    ids = jnp.full((T, ep, k), e, jnp.int32).at[t_ix, dev, slot].set(idx % e)
    wts = jnp.zeros((T, ep, k), jnp.float32).at[t_ix, dev, slot].set(weight)
    # Slot table: which token fills buffer slot (d, c); T = an empty slot.
    row_ok = kept & (rank < C)
    slot_token = jnp.full((ep, C), T, jnp.int32).at[
        jnp.where(row_ok, jnp.arange(ep)[None, :], ep), jnp.where(row_ok, rank, 0)
    ].set(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[:, None], (T, ep)), mode="drop")
    xp = jnp.concatenate([x, jnp.zeros((1, D), x.dtype)])
    send_x = xp[slot_token]  # [ep, C, D]
    pad_ids = jnp.concatenate([ids, jnp.full((1, ep, k), e, jnp.int32)])
    pad_w = jnp.concatenate([wts, jnp.zeros((1, ep, k), jnp.float32)])
    d_idx = jnp.arange(ep)[:, None]
    send_ids = pad_ids[slot_token, d_idx]  # [ep, C, k]
    send_w = pad_w[slot_token, d_idx]
    counts = jnp.sum(slot_token < T, axis=1).astype(jnp.int32)  # [ep] rows to each device
    chex.assert_shape(send_x, (ep, C, D))
    chex.assert_shape([send_ids, send_w], (ep, C, k))
    if spec.flavor == "ragged":
        out = _ragged_exchange(send_x, send_ids, send_w, counts, w_gate, w_up, w_down, spec)
    else:
        out = _fixed_exchange(send_x, send_ids, send_w, w_gate, w_up, w_down, spec)
    chex.assert_shape(out, (ep, C, D))
    # out [ep, C, D]: the result of slot (d, c); every token sums its slots.
    y = jnp.zeros((T + 1, D), jnp.float32).at[slot_token.reshape(-1)].add(
        out.reshape(ep * C, D).astype(jnp.float32))[:T]
    return y.astype(x.dtype)


def _receive_compute(rows, ids, wts, w_gate, w_up, w_down, backend):
    """rows [R, D] from every source, ids/wts [R, k] -> [R, D]: each row's experts here,
    weighted and summed (empty slots, id = e, are not computed)."""
    e = w_gate.shape[0]
    return routed_experts(rows, ids, wts, w_gate, w_up, w_down, backend, keep=ids < e)


def _fixed_exchange(send_x, send_ids, send_w, w_gate, w_up, w_down, spec):
    ax = spec.expert_axis
    ep, C, D = send_x.shape
    a2a = lambda a: jax.lax.all_to_all(a, ax, 0, 0, tiled=True)
    recv_x, recv_ids, recv_w = a2a(send_x), a2a(send_ids), a2a(send_w)
    k = recv_ids.shape[-1]
    y = _receive_compute(recv_x.reshape(ep * C, D), recv_ids.reshape(ep * C, k),
                         recv_w.reshape(ep * C, k), w_gate, w_up, w_down, spec.backend)
    return a2a(y.reshape(ep, C, D))


def _ragged_exchange(send_x, send_ids, send_w, counts, w_gate, w_up, w_down, spec):
    """Exactly the rows: each source's rows to d are contiguous (buffer d's first counts[d]
    slots); the receiver packs the rows of all sources back to back."""
    ax = spec.expert_axis
    ep, C, D = send_x.shape
    ragged = _RAGGED_IMPL.get() or jax.lax.ragged_all_to_all
    counts = counts.astype(jnp.int32)
    recv_counts = jax.lax.all_to_all(counts, ax, 0, 0, tiled=True)  # [ep] rows from each source
    # Where my rows land in receiver d: after the rows of lower-numbered sources.
    all_counts = jax.lax.all_gather(counts, ax)  # [src, dst]
    me = jax.lax.axis_index(ax)
    before = jnp.cumsum(all_counts, axis=0) - all_counts  # rows of sources < s, per dst
    out_off = before[me]  # [ep]
    in_off = (jnp.arange(ep) * C).astype(jnp.int32)
    R = ep * C  # worst case: every source fills its whole buffer to me

    def there(a):
        flat = a.reshape((ep * C,) + a.shape[2:])
        return ragged(flat, jnp.zeros_like(flat), in_off, counts, out_off, recv_counts, axis_name=ax)

    rows, ids, wts = there(send_x), there(send_ids), there(send_w)
    n_recv = jnp.sum(recv_counts)
    filled = jnp.arange(R) < n_recv
    ids = jnp.where(filled[:, None], ids, w_gate.shape[0])  # unwritten rows hold no expert
    y = _receive_compute(rows, ids, jnp.where(filled[:, None], wts, 0.0), w_gate, w_up, w_down,
                         spec.backend)
    # Back: source s's packed rows return to block me*C of s's buffer (its slots for me).
    recv_off = (jnp.cumsum(recv_counts) - recv_counts).astype(jnp.int32)
    out_off_back = jnp.full((ep,), me * C, jnp.int32)
    back = ragged(y, jnp.zeros((ep * C, D), y.dtype), recv_off, recv_counts, out_off_back, counts,
                  axis_name=ax)
    return back.reshape(ep, C, D)


def ragged_all_to_all_emulated(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name):
    """`jax.lax.ragged_all_to_all`'s semantics from a fixed all_to_all, for testing the
    ragged path's offsets on CPU (XLA:CPU has no ragged_all_to_all). Costs the worst case."""
    n = operand.shape[0]
    ep = send_sizes.shape[0]
    j = jnp.arange(n)
    src = jnp.clip(input_offsets[:, None] + j[None, :], 0, n - 1)  # [ep, n]
    packed = jnp.where((j[None, :] < send_sizes[:, None]).reshape((ep, n) + (1,) * (operand.ndim - 1)),
                       operand[src], 0)
    recv = jax.lax.all_to_all(packed, axis_name, 0, 0, tiled=True)  # [src, n, ...]
    offs = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where src's rows go here
    dest = jnp.where(j[None, :] < recv_sizes[:, None], offs[:, None] + j[None, :], output.shape[0])
    return output.at[dest.reshape(-1)].set(recv.reshape((ep * n,) + operand.shape[1:]), mode="drop")


def traffic_figures(cfg: DeepseekV2Config, tokens: int, ep: int, dtype_bytes: int, dropping: bool,
                    batch: int = 1, train: bool = True) -> dict:
    """Static per-device buffer sizes of one MoE layer's exchange (each way): `tokens` per
    device in `batch` sequences, activations of `dtype_bytes`. Compared with the scheme that
    sends one row per (token, expert) into worst-case buffers [ep, tokens*K, D]."""
    K = cfg.num_experts_per_tok
    D = cfg.hidden_size
    M = rows_per_token_limit(cfg, ep, train)
    if dropping:
        C = min(tokens, capacity_rows(cfg.capacity_factor, tokens, M, ep)
                + protected_rows(batch, tokens // batch, cfg.never_drop_fraction))
    else:
        C = tokens
    k = min(K, cfg.n_routed_experts // ep)
    row = D * dtype_bytes + k * 8
    return {"rows_per_destination": C, "buffer_bytes": ep * C * row, "max_rows_per_token": M,
            "per_expert_scheme_buffer_bytes": ep * tokens * K * (D * dtype_bytes + 4)}

