"""Absorbed-MLA decode attention over the latent cache, split over the sequence
(flash-decoding), over a contiguous cache or a paged one.

Letters: B batch, H heads, S cache rows, D = C + R cache width (latent C = 512 plus the
shared rope key R = 64 at V2's shape), Vd = `v_dim` value width (= C: the latent rows are
also the values), P pages of `page_size` rows, M pages per sequence (block table width).

With absorbed queries (q_nope multiplied into W^UK, so every head reads the same cache):

    s[b,h,t] = scale * q[b,h,:] . kv[b,t,:]        for t < lengths[b]
    out[b,h] = softmax_t(s[b,h,:]) @ kv[b,:,:Vd]   [B, H, Vd]

Flash-decoding. One program takes `block_h` heads of one sequence and one *split* of its
cache (`num_splits` per sequence), steps over the split `block_k` rows (one page) at a time
with an online softmax, and writes a normalised partial output with its log-sum-exp. A
combine (a few elementwise ops in XLA) weighs the splits: out = sum_s exp(lse_s - lse) o_s.
Splits make a single long cache use the whole chip; with enough (batch, head-block) programs
one split suffices. Blocks past `lengths[b]` are neither computed nor (on TPU) fetched; rows
past it inside the last block are masked and their values zeroed (a stale cache row may hold
anything, and 0 * NaN would leak).

Paged layout (the serving path, as FlashMLA's interface): `pages [P, page_size, D]` is a
shared pool, `block_table [B, M]` lists each sequence's pages in order; row t of sequence b
is `pages[block_table[b, t // page_size], t % page_size]`. Entries past a sequence's length
are never read. Pages of 64 rows by default.

This file holds the Triton-style body (GPU, and the CPU interpreter); `mla_decode_tpu.py`
holds the Mosaic one. `_backend.dispatch` picks one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from dsv2_jax.kernels import _backend
from dsv2_jax.kernels._backend import MASK_VALUE, chunk_sum, cdiv, pow2_chunks, round_up
from dsv2_jax.kernels.flash_mla import dot_precision, pad_seq

PAGE_SIZE = 64


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the decode kernel.

    Attributes:
      block_h: heads per program. GPU: a power of two >= 16 (Triton's dot needs 16 rows;
        fewer heads are padded); TPU: a multiple of 8.
      block_k: cache rows per step of the contiguous kernel (the paged kernel steps one page
        at a time). GPU: power of two >= 16; TPU: multiple of 16.
      num_splits: splits of each sequence's cache; None = enough programs to fill the chip
        (`target_programs`), each split at least `min_split_blocks` steps long.
      target_programs, min_split_blocks: the split heuristic.
      num_warps, num_stages: Triton launch parameters (GPU only).
    """

    block_h: int = 32
    block_k: int = 64
    num_splits: int | None = None
    target_programs: int = 132  # one wave: an H100/H200 has 132 SMs
    min_split_blocks: int = 4
    # 8 warps: the [block_h, 512] float32 accumulator spreads over 256 threads.
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        if self.num_splits is not None and self.num_splits < 1:
            raise ValueError(f"num_splits must be None (automatic) or >= 1, got {self.num_splits}")

    @classmethod
    def gpu(cls) -> BlockSizes:
        return cls()

    @classmethod
    def tpu(cls) -> BlockSizes:
        # One TensorCore per program stream: splits only help megacore chips and very long
        # caches; larger row blocks amortise the per-step cost.
        return cls(block_h=128, block_k=512, target_programs=2, min_split_blocks=4)

    def splits(self, batch: int, head_blocks: int, n_blocks: int) -> tuple[int, int]:
        """-> (num_splits, blocks per split) for `n_blocks` cache blocks per sequence."""
        if self.num_splits is not None:
            want = self.num_splits
        else:
            want = cdiv(self.target_programs, batch * head_blocks)
            want = min(want, max(1, n_blocks // self.min_split_blocks))
        per = cdiv(n_blocks, max(1, min(want, n_blocks)))
        return cdiv(n_blocks, per), per


@dataclasses.dataclass(frozen=True)
class _Static:
    v_dim: int
    scale: float
    block_sizes: BlockSizes | None
    interpret: Any


# --- public API -----------------------------------------------------------------------------


def mla_decode(q, kv_cache, lengths, *, v_dim: int, scale: float,
               block_sizes: BlockSizes | None = None, interpret: Any = None):
    """Decode attention of absorbed queries over a contiguous latent cache.

    Args:
      q: [B, H, D] absorbed queries (q_nope W^UK ; q_rope).
      kv_cache: [B, S, D] latent cache rows (c ; k_rope); its first `v_dim` columns are the
        values. An S that is not a multiple of `block_k` costs a padded copy.
      lengths: [B] int valid rows per sequence (0 gives zeros; clipped to [0, S]).
        A cache in another dtype than q is cast to q's (a copy per call: store it in the
        compute dtype).
      v_dim: value width (kv_lora_rank).
      scale: softmax scale.
      block_sizes: tiles; None = the platform's default.
      interpret: see `_backend` (None = interpret on CPU).

    Returns:
      [B, H, v_dim] in q's dtype (float32 accumulation).
    """
    chex.assert_rank([q, kv_cache, lengths], [3, 3, 1])
    chex.assert_equal_shape_prefix([q, kv_cache, lengths], 1)
    chex.assert_equal_shape_suffix([q, kv_cache], 1)
    _check_dims(q, v_dim)
    _check_ints(lengths=lengths)
    if kv_cache.shape[1] == 0:
        raise ValueError("mla_decode: the cache has no rows (S = 0)")
    static = _Static(int(v_dim), float(scale), block_sizes, interpret)
    from dsv2_jax.kernels import mla_decode_tpu  # here: it imports this module

    # Rows past the cache do not exist: a longer length would read past it.
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, kv_cache.shape[1])
    return _backend.dispatch(
        static.interpret, q, kv_cache.astype(q.dtype), None, lengths,
        triton=functools.partial(_decode_triton, static=static),
        mosaic=functools.partial(mla_decode_tpu.decode, static=static))


def mla_decode_paged(q, pages, block_table, lengths, *, v_dim: int, scale: float,
                     block_sizes: BlockSizes | None = None, interpret: Any = None):
    """`mla_decode` over a paged cache.

    Args:
      q: [B, H, D] absorbed queries.
      pages: [P, page_size, D] the page pool (page_size 64 by default; GPU: a power of two
        >= 16, TPU: a multiple of 16).
      block_table: [B, M] int page ids of each sequence, in order.
      lengths: [B] int valid rows per sequence (clipped to [0, M * page_size]).
      v_dim, scale, block_sizes, interpret: as `mla_decode` (block_k is the page size).

    Returns:
      [B, H, v_dim] in q's dtype.
    """
    chex.assert_rank([q, pages, block_table, lengths], [3, 3, 2, 1])
    chex.assert_equal_shape_prefix([q, block_table, lengths], 1)
    chex.assert_equal_shape_suffix([q, pages], 1)
    _check_dims(q, v_dim)
    _check_ints(block_table=block_table, lengths=lengths)
    if block_table.shape[1] == 0 or pages.shape[1] == 0:
        raise ValueError("mla_decode_paged: no pages per sequence (block_table [B, 0]) or empty pages")
    static = _Static(int(v_dim), float(scale), block_sizes, interpret)
    from dsv2_jax.kernels import mla_decode_tpu  # here: it imports this module

    # Past its M pages a sequence has no rows: a longer length would read other tables.
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, block_table.shape[1] * pages.shape[1])
    return _backend.dispatch(
        static.interpret, q, pages.astype(q.dtype), block_table.astype(jnp.int32),
        lengths,
        triton=functools.partial(_decode_triton, static=static),
        mosaic=functools.partial(mla_decode_tpu.decode, static=static))


def mla_decode_reference(q, kv_cache, lengths, *, v_dim: int, scale: float):
    """Plain-jnp `mla_decode` (float32 softmax)."""
    s = jnp.einsum("bhd,bsd->bhs", q, kv_cache, preferred_element_type=jnp.float32,
                   precision=lax.Precision.HIGHEST) * scale
    rows = jnp.arange(kv_cache.shape[1])[None, :] < lengths[:, None]  # [B, S]
    valid = rows[:, None, :]
    p = jax.nn.softmax(jnp.where(valid, s, MASK_VALUE), axis=-1)
    p = jnp.where(valid, p, 0.0)  # a zero length gives zeros, as the kernel does
    # Rows past a length may hold anything (stale NaNs included): never multiplied in.
    values = jnp.where(rows[..., None], kv_cache[..., :v_dim].astype(jnp.float32), 0.0)
    out = jnp.einsum("bhs,bsv->bhv", p, values, precision=lax.Precision.HIGHEST)
    return out.astype(q.dtype)


def mla_decode_paged_reference(q, pages, block_table, lengths, *, v_dim: int, scale: float):
    """Plain-jnp `mla_decode_paged`: gathers each sequence's pages, then the reference."""
    B, M = block_table.shape
    # Table entries past a sequence's pages may be anything (-1 included): read page 0
    # for them; those rows are masked by the length.
    used = jnp.arange(M)[None, :] * pages.shape[1] < lengths[:, None]
    kv = pages[jnp.where(used, block_table, 0)].reshape(B, M * pages.shape[1], pages.shape[2])
    return mla_decode_reference(q, kv, lengths, v_dim=v_dim, scale=scale)


def _check_ints(**arrays):
    for name, a in arrays.items():
        if not jnp.issubdtype(a.dtype, jnp.integer):
            raise TypeError(f"{name} must be integers, got {a.dtype}")


def _check_dims(q, v_dim):
    if not 0 < v_dim < q.shape[-1]:
        raise ValueError(f"v_dim={v_dim} must be in (0, {q.shape[-1]}): the cache row is "
                         "[values (v_dim) ; rope part]")
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"mla_decode takes float32 or bfloat16, got {q.dtype}")


# --- shared pieces --------------------------------------------------------------------------


def split_feature(x, v_dim: int, vp: int, rp: int):
    """[..., v_dim + R] -> [..., vp + rp]: each part zero-padded on its own, so the value
    columns stay first and both parts stay aligned (a copy only when padding is needed)."""
    D = x.shape[-1]
    if (vp, rp) == (v_dim, D - v_dim):
        return x
    pad = [(0, 0)] * (x.ndim - 1)
    return jnp.concatenate([jnp.pad(x[..., :v_dim], pad + [(0, vp - v_dim)]),
                            jnp.pad(x[..., v_dim:], pad + [(0, rp - (D - v_dim))])], axis=-1)


def combine(o, lse, H: int, v_dim: int, dtype):
    """Flash-decoding combine. o [B, splits, Hp, Vp] normalised partials, lse [B, splits, Hp]
    (-inf for an empty split) -> [B, H, v_dim]."""
    top = jnp.max(lse, axis=1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)  # all splits empty: length 0
    w = jnp.exp(lse - top)  # [B, splits, Hp]
    den = w.sum(axis=1)
    out = jnp.einsum("bsh,bshv->bhv", w, o.astype(jnp.float32))
    out = out / jnp.where(den == 0, 1.0, den)[..., None]
    return out[:, :H, :v_dim].astype(dtype)


# --- Triton-style kernel --------------------------------------------------------------------


def _decode_kernel(lengths_ref, q_ref, kv_ref, table_ref, o_ref, lse_ref, *, scale, bk,
                   blocks_per_split, k_chunks, n_v_chunks, precision):
    # q_ref [bh, Dp]; kv_ref [Sp, Dp] one sequence (contiguous) or [P, bk, Dp] the page pool;
    # table_ref [M] this sequence's pages (paged only); o_ref [bh, Vp]; lse_ref [bh].
    b, split = pl.program_id(0), pl.program_id(2)
    length = lengths_ref[b]
    first = split * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, lax.div(length + bk - 1, bk))
    q = [q_ref[:, pl.ds(a, w)] for a, w in k_chunks]
    bh = q_ref.shape[0]
    v_chunks = k_chunks[:n_v_chunks]

    def step(j, carry):
        m, l, acc = carry
        # One indexer per load: Triton's lowering takes no chained `.at[...]` views.
        if table_ref is None:
            rows = pl.ds(pl.multiple_of(j * bk, bk), bk)
            kb = [kv_ref[rows, pl.ds(a, w)] for a, w in k_chunks]
        else:
            page = table_ref[j]
            kb = [kv_ref[page, :, pl.ds(a, w)] for a, w in k_chunks]
        s = chunk_sum(lax.dot_general(qc, kc, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32, precision=precision)
                for qc, kc in zip(q, kb)) * scale
        valid = j * bk + lax.broadcasted_iota(jnp.int32, (bh, bk), 1) < length
        s = jnp.where(valid, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(valid, jnp.exp(s - m_new[:, None]), 0.0)
        l = alpha * l + p.sum(axis=1)
        p = p.astype(kv_ref.dtype)
        acc = [alpha[:, None] * o + lax.dot_general(
                   p, jnp.where(j * bk + lax.broadcasted_iota(jnp.int32, (bk, w), 0) < length,
                                vc, jnp.zeros_like(vc)),
                   (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32,
                   precision=precision)
               for o, vc, (_, w) in zip(acc, kb, v_chunks)]
        return m_new, l, acc

    init = (jnp.full((bh,), MASK_VALUE, jnp.float32), jnp.zeros((bh,), jnp.float32),
            [jnp.zeros((bh, w), jnp.float32) for _, w in v_chunks])
    m, l, acc = lax.fori_loop(first, last, step, init)
    l_safe = jnp.where(l == 0.0, 1.0, l)
    for o, (c, w) in zip(acc, v_chunks):
        o_ref[:, pl.ds(c, w)] = (o / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l == 0.0, -jnp.inf, m + jnp.log(l_safe))


def _gpu_pow2(x: int, what: str) -> int:
    if x < 16 or x & (x - 1):
        raise ValueError(f"GPU mla_decode {what} must be a power of two >= 16, got {x}")
    return x


def _decode_triton(interpret, q, kv, block_table, lengths, *, static: _Static):
    """kv: the contiguous cache [B,S,D] when block_table is None, else the page pool."""
    bs = static.block_sizes or BlockSizes.gpu()
    B, H, D = q.shape
    Vd = static.v_dim
    vp, rp = round_up(Vd, 16), round_up(D - Vd, 16)
    k_chunks = pow2_chunks(vp) + tuple((vp + a, w) for a, w in pow2_chunks(rp))
    n_v_chunks = len(pow2_chunks(vp))
    Dp = vp + rp
    bh = min(_gpu_pow2(bs.block_h, "block_h"), max(16, _backend.next_pow2(H)))
    Hp = round_up(H, bh)
    qp = split_feature(q, Vd, vp, rp)
    qp = qp if Hp == H else jnp.pad(qp, ((0, 0), (0, Hp - H), (0, 0)))
    kvp = split_feature(kv, Vd, vp, rp)
    if block_table is None:
        bk = _gpu_pow2(bs.block_k, "block_k")
        Sp = round_up(kv.shape[1], bk)
        kvp = pad_seq(kvp, Sp)
        n_blocks = Sp // bk
        kv_spec = pl.BlockSpec((None, Sp, Dp), lambda b, h, s: (b, 0, 0))
        table_spec = None
    else:
        bk = _gpu_pow2(kv.shape[1], "page_size")
        n_blocks = block_table.shape[1]
        kv_spec = pl.BlockSpec(kvp.shape, lambda b, h, s: (0, 0, 0))
        table_spec = pl.BlockSpec((None, n_blocks), lambda b, h, s: (b, 0))
    nhb = Hp // bh
    splits, per = bs.splits(B, nhb, n_blocks)
    single = splits == 1  # the partial is the answer: write it in the output dtype
    o, lse = pl.pallas_call(
        functools.partial(_decode_kernel, scale=static.scale, bk=bk, blocks_per_split=per,
                          k_chunks=k_chunks, n_v_chunks=n_v_chunks,
                          precision=dot_precision(q.dtype)),
        grid=(B, nhb, splits),
        in_specs=[pl.BlockSpec((B,), lambda b, h, s: (0,)),
                  pl.BlockSpec((None, bh, Dp), lambda b, h, s: (b, h, 0)),
                  kv_spec, table_spec],
        out_specs=[pl.BlockSpec((None, None, bh, vp), lambda b, h, s: (b, s, h, 0)),
                   pl.BlockSpec((None, None, bh), lambda b, h, s: (b, s, h))],
        out_shape=[jax.ShapeDtypeStruct((B, splits, Hp, vp), q.dtype if single else jnp.float32),
                   jax.ShapeDtypeStruct((B, splits, Hp), jnp.float32)],
        compiler_params=_backend.triton_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name="mla_decode_paged" if block_table is not None else "mla_decode",
    )(lengths, qp, kvp, block_table)
    if single:
        return o[:, 0, :H, :Vd]
    return combine(o, lse, H, Vd, q.dtype)
