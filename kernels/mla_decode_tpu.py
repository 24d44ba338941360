"""The Mosaic (TPU) body of `mla_decode` / `mla_decode_paged`: same contract and math as
`mla_decode.py`.

Grid (B, head blocks, splits, blocks per split); the last axis is sequential, with the
running max, sum and accumulator in VMEM scratch. `lengths` (and the flattened block table)
are scalar-prefetched into SMEM so the index map can address the cache: a step past the
sequence's length repeats the last valid block (no new DMA) and is not computed. Paged: the
index map reads the page id from the table, so Pallas' pipeline fetches one page per step.

Lane density: the value part and the rope part are each zero-padded to a multiple of 128
(576 = 512 + 64 -> 640, as tpu-inference stores its cache). That pad is a copy of the cache
on every call unless the caller already stores rows of that width (with q padded alike): a
serving cache for TPU should be allocated 640 wide.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsv2_jax.kernels import _backend
from dsv2_jax.kernels._backend import MASK_VALUE, round_up
from dsv2_jax.kernels.flash_mla import dot_precision, pad_seq
from dsv2_jax.kernels.mla_decode import BlockSizes, combine, split_feature

_NT = (((1,), (1,)), ((), ()))
_NN = (((1,), (0,)), ((), ()))


def _decode_kernel(*refs, scale, bk, per, vp, paged, precision):
    if paged:
        lengths_ref, _table, q_ref, kv_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        lengths_ref, q_ref, kv_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    b, split, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    length = lengths_ref[b]
    block = split * per + j
    bh = q_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(block * bk < length)
    def _step():
        kv = kv_ref[...]
        s = lax.dot_general(q_ref[...], kv, _NT, preferred_element_type=jnp.float32,
                            precision=precision) * scale
        valid = block * bk + lax.broadcasted_iota(jnp.int32, (bh, bk), 1) < length
        s = jnp.where(valid, s, MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.where(valid, jnp.exp(s - m_new), 0.0)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        values = kv[:, :vp]
        row_ok = block * bk + lax.broadcasted_iota(jnp.int32, values.shape, 0) < length
        values = jnp.where(row_ok, values, jnp.zeros_like(values))
        acc_sc[...] = alpha * acc_sc[...] + lax.dot_general(
            p.astype(kv.dtype), values, _NN, preferred_element_type=jnp.float32,
            precision=precision)
        m_sc[...] = m_new

    @pl.when(j == per - 1)
    def _finish():
        l = l_sc[...]
        l_safe = jnp.where(l == 0.0, 1.0, l)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(l == 0.0, -jnp.inf, m_sc[...] + jnp.log(l_safe))


def decode(interpret, q, kv, block_table, lengths, *, static):
    bs = static.block_sizes or BlockSizes.tpu()
    B, H, D = q.shape
    Vd = static.v_dim
    vp, rp = round_up(Vd, 128), round_up(D - Vd, 128)
    Dp = vp + rp
    if bs.block_h % 8:
        raise ValueError(f"TPU mla_decode block_h must be a multiple of 8, got {bs.block_h}")
    bh = min(bs.block_h, round_up(H, 8))
    Hp = round_up(H, bh)
    qp = split_feature(q, Vd, vp, rp)
    qp = qp if Hp == H else jnp.pad(qp, ((0, 0), (0, Hp - H), (0, 0)))
    kvp = split_feature(kv, Vd, vp, rp)
    paged = block_table is not None
    if not paged:
        bk = bs.block_k
        if bk % 16:
            raise ValueError(f"TPU mla_decode block_k must be a multiple of 16, got {bk}")
        bk = min(bk, round_up(kv.shape[1], 16))
        kvp = pad_seq(kvp, round_up(kv.shape[1], bk))
        n_blocks = kvp.shape[1] // bk
    else:
        bk = kv.shape[1]
        if bk % 16:
            raise ValueError(f"TPU mla_decode_paged page_size must be a multiple of 16, got {bk}")
        n_blocks = block_table.shape[1]
    nhb = Hp // bh
    splits, per = bs.splits(B, nhb, n_blocks)

    def block_of(b, s, j, lengths_ref):
        # Past the end: the last block this sequence needs, so the pipeline skips the copy.
        last = jnp.maximum(lax.div(lengths_ref[b] + bk - 1, bk) - 1, 0)
        return jnp.minimum(jnp.minimum(s * per + j, last), n_blocks - 1)

    if paged:
        prefetch = (lengths, block_table.reshape(-1))
        kv_spec = pl.BlockSpec(
            (None, bk, Dp),
            lambda b, h, s, j, lens, table: (table[b * n_blocks + block_of(b, s, j, lens)], 0, 0))
    else:
        prefetch = (lengths,)
        kv_spec = pl.BlockSpec((None, bk, Dp),
                               lambda b, h, s, j, lens: (b, block_of(b, s, j, lens), 0))
    single = splits == 1
    o, lse = pl.pallas_call(
        functools.partial(_decode_kernel, scale=static.scale, bk=bk, per=per, vp=vp,
                          paged=paged, precision=dot_precision(q.dtype)),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(prefetch),
            grid=(B, nhb, splits, per),
            in_specs=[pl.BlockSpec((None, bh, Dp), lambda b, h, s, j, *_: (b, h, 0)), kv_spec],
            out_specs=[pl.BlockSpec((None, None, bh, vp), lambda b, h, s, j, *_: (b, s, h, 0)),
                       pl.BlockSpec((None, None, bh, 1), lambda b, h, s, j, *_: (b, s, h, 0))],
            scratch_shapes=[pltpu.VMEM((bh, 1), jnp.float32), pltpu.VMEM((bh, 1), jnp.float32),
                            pltpu.VMEM((bh, vp), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((B, splits, Hp, vp), q.dtype if single else jnp.float32),
                   jax.ShapeDtypeStruct((B, splits, Hp, 1), jnp.float32)],
        compiler_params=_backend.mosaic_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="mla_decode_paged_tpu" if paged else "mla_decode_tpu",
    )(*prefetch, qp, kvp)
    if single:
        return o[:, 0, :H, :Vd]
    return combine(o, lse[..., 0], H, Vd, q.dtype)
