"""The Mosaic (TPU) bodies of `flash_mla`: same contract and math as `flash_mla.py`.

TPU kernels are laid out differently from the Triton ones:

* heads-major [B, H, T, *] (a block's last two dims must be (multiple of 8, multiple of
  128) or the whole array dims, so a squeezed head dim cannot sit second-to-last);
* head dims zero-padded to multiples of 128 (192 -> 256: lane-dense tiles for the MXU);
* the loop over the other sequence is the innermost grid axis ("arbitrary", sequential),
  with the running max, sum and accumulator in VMEM scratch; Pallas double-buffers the DMAs;
* skipping: a fully masked step neither computes (`pl.when`) nor fetches: under `causal`
  the index map repeats the last block needed, so the pipeline issues no new copy;
* the per-block segment-id ranges sit in SMEM (scalar prefetch) for the skip test.

Letters as in `flash_mla.py`; Kp, Vp the padded head dims, Tp the padded sequence.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from dsv2_jax.kernels import _backend
from dsv2_jax.kernels._backend import MASK_VALUE, round_up
from dsv2_jax.kernels.flash_mla import (BlockSizes, dot_precision, pad_last, pad_seq,
                                        segment_ranges)

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


def _tpu_block(block: int, T: int) -> int:
    if block % 128:
        raise ValueError(f"TPU flash_mla blocks must be multiples of 128, got {block}")
    return min(block, round_up(T, 128))


class _Layout:
    def __init__(self, q, v, blocks):
        B, self.T, H, self.K = q.shape
        self.V = v.shape[-1]
        self.Tp = round_up(self.T, math.lcm(*blocks))
        self.Kp, self.Vp = round_up(self.K, 128), round_up(self.V, 128)

    def heads_major(self, x, width):
        """[B,T,H,*] -> [B,H,Tp,width], zero-padded."""
        return pad_last(pad_seq(jnp.swapaxes(x, 1, 2), self.Tp, axis=2), width)


def _seg_tables(segment_ids, B, Tp, bq, bk):
    """Scalar-prefetch operands (q lo, q hi [B*nq], k lo, k hi [B*nk]) and the vector
    operands (q ids [B,Tp,1], k ids [B,1,Tp]) or None."""
    if segment_ids is None:
        zq, zk = jnp.zeros((B * (Tp // bq),), jnp.int32), jnp.zeros((B * (Tp // bk),), jnp.int32)
        return (zq, zq, zk, zk), None
    seg = pad_seq(segment_ids, Tp, mode="edge")
    qlo, qhi = segment_ranges(seg, bq)
    klo, khi = segment_ranges(seg, bk)
    tables = tuple(x.reshape(-1) for x in (qlo, qhi, klo, khi))
    return tables, (seg[:, :, None], seg[:, None, :])


def _visible(tables, b, i, j, *, nq, nk, bq, bk, causal, has_seg):
    """Whether query block i and key block j of batch row b have any visible pair."""
    run = True
    if causal:
        run = j * bk <= (i + 1) * bq - 1
    if has_seg:
        qlo, qhi, klo, khi = tables
        overlap = (klo[b * nk + j] <= qhi[b * nq + i]) & (khi[b * nk + j] >= qlo[b * nq + i])
        run = overlap if run is True else run & overlap
    return run


def _when(run):
    """`pl.when`, or a plain call when nothing can be skipped (no causal, no segments)."""
    return (lambda f: f()) if run is True else pl.when(run)


def _mask(i, j, seg_refs, *, bq, bk, causal, seq_len, padded):
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    mask = None
    if causal:
        mask = q_pos >= k_pos
    elif padded:
        mask = k_pos < seq_len
    if seg_refs is not None:
        same = seg_refs[0][...] == seg_refs[1][...]  # [bq,1] == [1,bk] -> [bq,bk]
        mask = same if mask is None else mask & same
    return mask


def _fwd_kernel(*refs, scale, causal, seq_len, bq, bk, nq, nk, has_seg, precision):
    tables, (q_ref, k_ref, v_ref, seg_refs), (o_ref, lse_ref), (m_sc, l_sc, acc_sc) = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @_when(_visible(tables, b, i, j, nq=nq, nk=nk, bq=bq, bk=bk, causal=causal,
                      has_seg=has_seg))
    def _step():
        s = lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32,
                            precision=precision) * scale
        mask = _mask(i, j, seg_refs, bq=bq, bk=bk, causal=causal, seq_len=seq_len,
                     padded=nk * bk != seq_len)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(s - m_new)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + lax.dot_general(
            p.astype(v_ref.dtype), v_ref[...], _NN, preferred_element_type=jnp.float32,
            precision=precision)
        m_sc[...] = m_new

    @pl.when(j == nk - 1)
    def _finish():
        l = l_sc[...]
        l_safe = jnp.where(l == 0.0, 1.0, l)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l_safe)


def _dq_kernel(*refs, scale, causal, seq_len, bq, bk, nq, nk, has_seg, precision):
    tables, (q_ref, k_ref, v_ref, seg_refs, do_ref, lse_ref, delta_ref), dq_ref, dq_sc = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @_when(_visible(tables, b, i, j, nq=nq, nk=nk, bq=bq, bk=bk, causal=causal,
                      has_seg=has_seg))
    def _step():
        k = k_ref[...]
        s = lax.dot_general(q_ref[...], k, _NT, preferred_element_type=jnp.float32,
                            precision=precision) * scale
        p = jnp.exp(s - lse_ref[...])
        mask = _mask(i, j, seg_refs, bq=bq, bk=bk, causal=causal, seq_len=seq_len,
                     padded=nk * bk != seq_len)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = lax.dot_general(do_ref[...], v_ref[...], _NT, preferred_element_type=jnp.float32,
                             precision=precision)
        ds = (p * (dp - delta_ref[...])).astype(k.dtype)
        dq_sc[...] += lax.dot_general(ds, k, _NN, preferred_element_type=jnp.float32,
                                      precision=precision)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, scale, causal, seq_len, bq, bk, nq, nk, has_seg, precision):
    # Grid (B, H, nk, nq): program axis 2 is the key block, the innermost axis 3 the queries.
    tables, (q_ref, k_ref, v_ref, seg_refs, do_ref, lse_ref, delta_ref), (dk_ref, dv_ref), \
        (dk_sc, dv_sc) = refs
    b, j, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @_when(_visible(tables, b, i, j, nq=nq, nk=nk, bq=bq, bk=bk, causal=causal,
                      has_seg=has_seg))
    def _step():
        q, k, do = q_ref[...], k_ref[...], do_ref[...]
        s = lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32,
                            precision=precision) * scale
        p = jnp.exp(s - lse_ref[...])
        mask = _mask(i, j, seg_refs, bq=bq, bk=bk, causal=causal, seq_len=seq_len,
                     padded=nq * bq != seq_len)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dv_sc[...] += lax.dot_general(p.T.astype(do.dtype), do, _NN,
                                      preferred_element_type=jnp.float32, precision=precision)
        dp = lax.dot_general(do, v_ref[...], _NT, preferred_element_type=jnp.float32,
                             precision=precision)
        ds = p * (dp - delta_ref[...])
        dk_sc[...] += lax.dot_general(ds.T.astype(q.dtype), q, _NN,
                                      preferred_element_type=jnp.float32, precision=precision)

    @pl.when(i == nq - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _specs(lay, bq, bk, causal, *, keys_inner: bool):
    """Index maps for a grid (B, H, outer, inner); scalar-prefetch refs trail the indices.

    keys_inner (forward, dq): outer = query block i, inner = key block j, and a key block
    past the diagonal is replaced by the last one needed (no new DMA). Otherwise (dk/dv):
    outer = key block j, inner = query block i, clamped up to the first query block needed.
    """
    if keys_inner:
        def qi_kj(b, h, o, n):
            return o, (jnp.minimum(n, lax.div((o + 1) * bq - 1, bk)) if causal else n)
    else:
        def qi_kj(b, h, o, n):
            return (jnp.maximum(n, lax.div(o * bk, bq)) if causal else n), o

    def q_rows(width):
        return pl.BlockSpec((None, None, bq, width),
                            lambda b, h, o, n, *_: (b, h, qi_kj(b, h, o, n)[0], 0))

    def k_rows(width):
        return pl.BlockSpec((None, None, bk, width),
                            lambda b, h, o, n, *_: (b, h, qi_kj(b, h, o, n)[1], 0))

    seg_specs = (pl.BlockSpec((None, bq, 1), lambda b, h, o, n, *_: (b, qi_kj(b, h, o, n)[0], 0)),
                 pl.BlockSpec((None, 1, bk), lambda b, h, o, n, *_: (b, 0, qi_kj(b, h, o, n)[1])))
    return q_rows, k_rows, seg_specs


def forward(interpret, q, k, v, segment_ids, *, static):
    bs = static.block_sizes or BlockSizes.tpu()
    bq, bk = _tpu_block(bs.block_q, q.shape[1]), _tpu_block(bs.block_k, q.shape[1])
    lay = _Layout(q, v, (bq, bk))
    B, H = q.shape[0], q.shape[2]
    nq, nk = lay.Tp // bq, lay.Tp // bk
    tables, seg = _seg_tables(segment_ids, B, lay.Tp, bq, bk)
    q_rows, k_rows, seg_specs = _specs(lay, bq, bk, static.causal, keys_inner=True)
    kernel = functools.partial(
        _fwd_kernel, scale=static.scale, causal=static.causal, seq_len=lay.T, bq=bq, bk=bk,
        nq=nq, nk=nk, has_seg=seg is not None, precision=dot_precision(q.dtype))
    o, lse = pl.pallas_call(
        lambda *refs: kernel(refs[:4], refs[4:-5], refs[-5:-3], refs[-3:]),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(B, H, nq, nk),
            in_specs=[q_rows(lay.Kp), k_rows(lay.Kp), k_rows(lay.Vp),
                      None if seg is None else seg_specs],
            out_specs=[q_rows(lay.Vp), q_rows(1)],
            scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                            pltpu.VMEM((bq, lay.Vp), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((B, H, lay.Tp, lay.Vp), q.dtype),
                   jax.ShapeDtypeStruct((B, H, lay.Tp, 1), jnp.float32)],
        compiler_params=_backend.mosaic_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret,
        name="flash_mla_fwd_tpu",
    )(*tables, lay.heads_major(q, lay.Kp), lay.heads_major(k, lay.Kp),
      lay.heads_major(v, lay.Vp), seg)
    return jnp.swapaxes(o[:, :, :lay.T, :lay.V], 1, 2), lse[:, :, :lay.T, 0]


def backward(interpret, q, k, v, segment_ids, do, lse, delta, *, static):
    bs = static.block_sizes or BlockSizes.tpu()
    T = q.shape[1]
    bq, bk = _tpu_block(bs.block_q_dq, T), _tpu_block(bs.block_k_dq, T)
    bq2, bk2 = _tpu_block(bs.block_q_dkv, T), _tpu_block(bs.block_k_dkv, T)
    lay = _Layout(q, v, (bq, bk, bq2, bk2))
    B, H = q.shape[0], q.shape[2]
    qt, kt = lay.heads_major(q, lay.Kp), lay.heads_major(k, lay.Kp)
    vt, dot_ = lay.heads_major(v, lay.Vp), lay.heads_major(do, lay.Vp)
    lse_t, delta_t = (pad_seq(x, lay.Tp, axis=2)[..., None] for x in (lse, delta))
    common = dict(scale=static.scale, causal=static.causal, seq_len=lay.T,
                  has_seg=segment_ids is not None, precision=dot_precision(q.dtype))

    nq, nk = lay.Tp // bq, lay.Tp // bk
    tables, seg = _seg_tables(segment_ids, B, lay.Tp, bq, bk)
    q_rows, k_rows, seg_specs = _specs(lay, bq, bk, static.causal, keys_inner=True)
    kernel = functools.partial(_dq_kernel, bq=bq, bk=bk, nq=nq, nk=nk, **common)
    dq = pl.pallas_call(
        lambda *refs: kernel(refs[:4], refs[4:-2], refs[-2], refs[-1]),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(B, H, nq, nk),
            in_specs=[q_rows(lay.Kp), k_rows(lay.Kp), k_rows(lay.Vp),
                      None if seg is None else seg_specs,
                      q_rows(lay.Vp), q_rows(1), q_rows(1)],
            out_specs=q_rows(lay.Kp),
            scratch_shapes=[pltpu.VMEM((bq, lay.Kp), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct((B, H, lay.Tp, lay.Kp), q.dtype),
        compiler_params=_backend.mosaic_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret, name="flash_mla_dq_tpu",
    )(*tables, qt, kt, vt, seg, dot_, lse_t, delta_t)

    nq, nk = lay.Tp // bq2, lay.Tp // bk2
    tables, seg = _seg_tables(segment_ids, B, lay.Tp, bq2, bk2)
    q_rows, k_rows, seg_specs = _specs(lay, bq2, bk2, static.causal, keys_inner=False)
    kernel = functools.partial(_dkv_kernel, bq=bq2, bk=bk2, nq=nq, nk=nk, **common)
    dk, dv = pl.pallas_call(
        lambda *refs: kernel(refs[:4], refs[4:-4], refs[-4:-2], refs[-2:]),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=4,
            grid=(B, H, nk, nq),
            in_specs=[q_rows(lay.Kp), k_rows(lay.Kp), k_rows(lay.Vp),
                      None if seg is None else seg_specs,
                      q_rows(lay.Vp), q_rows(1), q_rows(1)],
            out_specs=[k_rows(lay.Kp), k_rows(lay.Vp)],
            scratch_shapes=[pltpu.VMEM((bk2, lay.Kp), jnp.float32),
                            pltpu.VMEM((bk2, lay.Vp), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct((B, H, lay.Tp, lay.Kp), k.dtype),
                   jax.ShapeDtypeStruct((B, H, lay.Tp, lay.Vp), v.dtype)],
        compiler_params=_backend.mosaic_params("parallel", "parallel", "parallel", "arbitrary"),
        interpret=interpret, name="flash_mla_dkv_tpu",
    )(*tables, qt, kt, vt, seg, dot_, lse_t, delta_t)

    def back(x, T, width):
        return jnp.swapaxes(x[:, :, :T, :width], 1, 2)

    return back(dq, lay.T, lay.K), back(dk, lay.T, lay.K), back(dv, lay.T, lay.V)
