"""Flash attention for MLA training and prefill: qk head dim != v head dim, causal, packed
documents, with a Pallas forward and a Pallas backward.

Letters: B batch, T sequence (queries = keys), H heads, K qk head dim (nope + rope, 192 at
V2's shape), V v head dim (128). Per (b, h):

    s   = scale * q k^T                      [T, T]   float32
    p   = softmax(s masked)                  masked: causal and/or segment_ids differ
    o   = p v                                [T, V]
    lse = logsumexp(s masked, axis=-1)       [T]      the only residual besides o

Backward (D = rowsum(do * o), the standard flash-attention identity):

    p  = exp(s - lse)          recomputed per block, never stored
    dv = p^T do                dp = do v^T
    ds = p * (dp - D)          dq = scale * ds k        dk = scale * ds^T q

Blocking. The forward and the dq kernel give each program one block of `block_q` queries of
one (batch, head) and loop over key blocks; the dk/dv kernel gives each program one block of
keys and loops over query blocks. Fully masked blocks are skipped, not just masked: under
`causal` the loops stop at (forward, dq) or start from (dk/dv) the diagonal, and with
`segment_ids` a block pair whose segment-id ranges do not overlap is not computed (exact for
packed documents, whose ids never decrease along the sequence; conservative otherwise).

Tails. The sequence is zero-padded to a multiple of the blocks; padded keys are masked and
padded query rows are sliced off (they also contribute nothing backward: their do is zero).

This file holds the Triton-style kernel bodies (GPU, and the CPU interpreter);
`flash_mla_tpu.py` holds the Mosaic ones. `_backend.dispatch` picks one.
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
from dsv2_jax.kernels._backend import MASK_VALUE, chunk_sum, pow2_chunks, round_up


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the three kernels (sequence rows per tile).

    Attributes:
      block_q, block_k: forward. Each program holds `block_q` queries and steps over keys
        `block_k` at a time.
      block_q_dq, block_k_dq: the dq kernel, the same roles as the forward.
      block_q_dkv, block_k_dkv: the dk/dv kernel. Each program holds `block_k_dkv` keys and
        steps over queries `block_q_dkv` at a time.
      num_warps, num_stages: Triton launch parameters (GPU only).

    GPU (Triton) blocks must be powers of two >= 16; TPU (Mosaic) blocks must be multiples
    of 128. Blocks larger than the (padded) sequence are shrunk to it.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps: int = 8
    num_stages: int = 2

    @classmethod
    def gpu(cls) -> BlockSizes:
        return cls()

    @classmethod
    def tpu(cls) -> BlockSizes:
        return cls(block_q=128, block_k=128, block_q_dq=128, block_k_dq=128,
                   block_q_dkv=128, block_k_dkv=128)


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything about a call that is not an array (hashable: a custom_vjp nondiff arg)."""

    scale: float
    causal: bool
    block_sizes: BlockSizes | None
    interpret: Any


# --- public API -----------------------------------------------------------------------------


def flash_mla(q, k, v, *, causal: bool = True, scale: float, segment_ids=None,
              block_sizes: BlockSizes | None = None, interpret: Any = None):
    """Attention for MLA in the expanded form, differentiable in q, k and v.

    Args:
      q: [B, T, H, K] queries (nope and rope parts concatenated per head).
      k: [B, T, H, K] keys (the shared rope key already broadcast to every head).
      v: [B, T, H, V] values; V may differ from K.
      causal: query t attends to keys s <= t.
      scale: softmax scale applied to q k^T.
      segment_ids: optional [B, T] int; a query attends only to keys of its own segment.
      block_sizes: tiles; None = the platform's default (`BlockSizes.gpu()` / `.tpu()`).
      interpret: see `_backend` (None = interpret on CPU).

    Returns:
      [B, T, H, V] in q's dtype. Inputs float32 or bfloat16; accumulation in float32.
    """
    chex.assert_rank([q, k, v], 4)
    chex.assert_equal_shape([q, k])
    chex.assert_equal_shape_prefix([q, k, v], 3)
    chex.assert_type([k, v], q.dtype)
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        raise TypeError(f"flash_mla takes float32 or bfloat16, got {q.dtype}")
    if q.shape[1] == 0:
        raise ValueError("flash_mla: empty sequence (T = 0)")
    if segment_ids is not None:
        chex.assert_shape(segment_ids, q.shape[:2])
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise TypeError(f"segment_ids must be integers, got {segment_ids.dtype}")
        segment_ids = segment_ids.astype(jnp.int32)
    static = _Static(float(scale), bool(causal), block_sizes, interpret)
    return _flash_mla(q, k, v, segment_ids, static)


def flash_mla_reference(q, k, v, *, causal: bool = True, scale: float, segment_ids=None):
    """Plain-jnp flash_mla (same contract), softmax in float32."""
    s = jnp.einsum("bthk,bshk->bhts", q, k, preferred_element_type=jnp.float32,
                   precision=lax.Precision.HIGHEST) * scale
    T = q.shape[1]
    mask = jnp.ones((1, 1, T, T), bool)
    if causal:
        mask = jnp.tril(mask)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    s = jnp.where(mask, s, MASK_VALUE)
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhts,bshv->bthv", p, v.astype(jnp.float32),
                      precision=lax.Precision.HIGHEST).astype(q.dtype)


# --- custom_vjp -----------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash_mla(q, k, v, segment_ids, static: _Static):
    return _forward(q, k, v, segment_ids, static)[0]


def _flash_mla_fwd(q, k, v, segment_ids, static: _Static):
    o, lse = _forward(q, k, v, segment_ids, static)
    return o, (q, k, v, segment_ids, o, lse)


def _flash_mla_bwd(static: _Static, res, do):
    q, k, v, segment_ids, o, lse = res
    # D = rowsum(do * o) [B, H, T]: one fused elementwise pass in XLA, cheaper than a kernel.
    delta = jnp.einsum("bthv,bthv->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    from dsv2_jax.kernels import flash_mla_tpu  # here: it imports this module

    dq, dk, dv = _backend.dispatch(
        static.interpret, q, k, v, segment_ids, do.astype(q.dtype), lse, delta,
        triton=functools.partial(_backward_triton, static=static),
        mosaic=functools.partial(flash_mla_tpu.backward, static=static))
    return dq, dk, dv, None


_flash_mla.defvjp(_flash_mla_fwd, _flash_mla_bwd)


def _forward(q, k, v, segment_ids, static: _Static):
    """-> (o [B,T,H,V] q.dtype, lse [B,H,T] float32)."""
    from dsv2_jax.kernels import flash_mla_tpu  # here: it imports this module

    return _backend.dispatch(
        static.interpret, q, k, v, segment_ids,
        triton=functools.partial(_forward_triton, static=static),
        mosaic=functools.partial(flash_mla_tpu.forward, static=static))


# --- shared helpers -------------------------------------------------------------------------


def dot_precision(dtype):
    # Triton's default for float32 is TF32; float32 inputs ask for full precision (the model
    # parity test runs in float32), bfloat16 ones take the native MMA.
    return lax.Precision.HIGHEST if dtype == jnp.float32 else lax.Precision.DEFAULT


def segment_ranges(segment_ids, block: int):
    """[B, Tp] padded ids -> (lo, hi) [B, Tp // block]: the id range of each block."""
    B, Tp = segment_ids.shape
    s = segment_ids.reshape(B, Tp // block, block)
    return s.min(axis=-1), s.max(axis=-1)


def pad_seq(x, Tp: int, axis: int = 1, mode: str = "constant"):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, Tp - x.shape[axis])
    return x if Tp == x.shape[axis] else jnp.pad(x, pad, mode=mode)


def pad_last(x, width: int):
    if x.shape[-1] == width:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def _gpu_block(block: int, T: int) -> int:
    if block < 16 or block & (block - 1):
        raise ValueError(f"GPU flash_mla blocks must be powers of two >= 16, got {block}")
    return min(block, max(16, _backend.next_pow2(T)))


def _block_mask(q_pos, k_pos, qseg, kseg, *, causal: bool, seq_len: int, padded: bool):
    """[bq, bk] bool: which (query, key) pairs are visible, or None when all are."""
    mask = None

    def both(a, b):
        return b if a is None else a & b

    if causal:
        mask = q_pos >= k_pos
    elif padded:  # under causal the padded keys are already hidden from real queries
        mask = k_pos < seq_len
    if qseg is not None:
        mask = both(mask, qseg[:, None] == kseg[None, :])
    return mask


def _overlap(qlo_ref, qhi_ref, klo_ref, khi_ref, i, j):
    return (klo_ref[j] <= qhi_ref[i]) & (khi_ref[j] >= qlo_ref[i])


# --- Triton-style kernels -------------------------------------------------------------------


def _fwd_kernel(q_ref, k_ref, v_ref, seg_refs, o_ref, lse_ref, *, scale, causal, seq_len,
                bq, bk, nq, k_chunks, v_chunks, precision):
    # q_ref [bq, K]; k_ref [Tp, K]; v_ref [Tp, V] (one batch row and head); o_ref [bq, V].
    qi = nq - 1 - pl.program_id(0)  # longest causal rows first: they finish last otherwise
    nk = k_ref.shape[0] // bk
    q = [q_ref[:, pl.ds(a, w)] for a, w in k_chunks]
    q_pos = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    qseg = None if seg_refs is None else seg_refs[0][pl.ds(qi * bq, bq)]

    def step(j, carry):
        m, l, acc = carry
        start = pl.multiple_of(j * bk, bk)
        rows = pl.ds(start, bk)
        s = chunk_sum(lax.dot_general(qc, k_ref[rows, pl.ds(a, w)], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32, precision=precision)
                for qc, (a, w) in zip(q, k_chunks)) * scale
        k_pos = start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        kseg = None if seg_refs is None else seg_refs[0][rows]
        mask = _block_mask(q_pos, k_pos, qseg, kseg, causal=causal, seq_len=seq_len,
                           padded=k_ref.shape[0] != seq_len)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        if mask is not None:  # a row whose block is all masked must add nothing
            p = jnp.where(mask, p, 0.0)
        l = alpha * l + p.sum(axis=1)
        p = p.astype(v_ref.dtype)
        acc = [alpha[:, None] * o + lax.dot_general(
                   p, v_ref[rows, pl.ds(c, w)], (((1,), (0,)), ((), ())),
                   preferred_element_type=jnp.float32, precision=precision)
               for o, (c, w) in zip(acc, v_chunks)]
        return m_new, l, acc

    if seg_refs is not None:
        body = lambda j, carry: lax.cond(_overlap(*seg_refs[1:], qi, j), step,
                                         lambda _, c: c, j, carry)
    else:
        body = step
    hi = lax.div((qi + 1) * bq + bk - 1, bk) if causal else nk
    init = (jnp.full((bq,), MASK_VALUE, jnp.float32), jnp.zeros((bq,), jnp.float32),
            [jnp.zeros((bq, w), jnp.float32) for _, w in v_chunks])
    m, l, acc = lax.fori_loop(0, hi, body, init)
    l_safe = jnp.where(l == 0.0, 1.0, l)
    for o, (c, w) in zip(acc, v_chunks):
        o_ref[:, pl.ds(c, w)] = (o / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l_safe)


def _dq_kernel(q_ref, k_ref, v_ref, seg_refs, do_ref, lse_ref, delta_ref, dq_ref, *, scale,
               causal, seq_len, bq, bk, nq, k_chunks, v_chunks, precision):
    qi = nq - 1 - pl.program_id(0)
    nk = k_ref.shape[0] // bk
    q = [q_ref[:, pl.ds(a, w)] for a, w in k_chunks]
    do = [do_ref[:, pl.ds(c, w)] for c, w in v_chunks]
    lse, delta = lse_ref[...], delta_ref[...]
    q_pos = qi * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    qseg = None if seg_refs is None else seg_refs[0][pl.ds(qi * bq, bq)]
    nt = (((1,), (1,)), ((), ()))
    nn = (((1,), (0,)), ((), ()))
    dot = functools.partial(lax.dot_general, preferred_element_type=jnp.float32,
                            precision=precision)

    def step(j, dq):
        start = pl.multiple_of(j * bk, bk)
        rows = pl.ds(start, bk)
        kb = [k_ref[rows, pl.ds(a, w)] for a, w in k_chunks]
        s = chunk_sum(dot(qc, kc, nt) for qc, kc in zip(q, kb)) * scale
        k_pos = start + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        kseg = None if seg_refs is None else seg_refs[0][rows]
        mask = _block_mask(q_pos, k_pos, qseg, kseg, causal=causal, seq_len=seq_len,
                           padded=k_ref.shape[0] != seq_len)
        p = jnp.exp(s - lse[:, None])
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = chunk_sum(dot(dc, v_ref[rows, pl.ds(c, w)], nt) for dc, (c, w) in zip(do, v_chunks))
        ds = (p * (dp - delta[:, None])).astype(k_ref.dtype)
        return [acc + dot(ds, kc, nn) for acc, kc in zip(dq, kb)]

    if seg_refs is not None:
        body = lambda j, dq: lax.cond(_overlap(*seg_refs[1:], qi, j), step,
                                      lambda _, d: d, j, dq)
    else:
        body = step
    hi = lax.div((qi + 1) * bq + bk - 1, bk) if causal else nk
    dq = lax.fori_loop(0, hi, body, [jnp.zeros((bq, w), jnp.float32) for _, w in k_chunks])
    for acc, (a, w) in zip(dq, k_chunks):
        dq_ref[:, pl.ds(a, w)] = (acc * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, seg_refs, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                scale, causal, seq_len, bq, bk, k_chunks, v_chunks, precision):
    # k_ref [bk, K], v_ref [bk, V]: this program's keys; q_ref/do_ref/lse/delta: the whole
    # (padded) sequence of one batch row and head.
    kj = pl.program_id(0)
    nq = q_ref.shape[0] // bq
    kb = [k_ref[:, pl.ds(a, w)] for a, w in k_chunks]
    vb = [v_ref[:, pl.ds(c, w)] for c, w in v_chunks]
    k_pos = kj * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    kseg = None if seg_refs is None else seg_refs[0][pl.ds(kj * bk, bk)]
    nt = (((1,), (1,)), ((), ()))
    nn = (((1,), (0,)), ((), ()))
    dot = functools.partial(lax.dot_general, preferred_element_type=jnp.float32,
                            precision=precision)

    def step(i, carry):
        dk, dv = carry
        start = pl.multiple_of(i * bq, bq)
        rows = pl.ds(start, bq)
        qb = [q_ref[rows, pl.ds(a, w)] for a, w in k_chunks]
        dob = [do_ref[rows, pl.ds(c, w)] for c, w in v_chunks]
        s = chunk_sum(dot(qc, kc, nt) for qc, kc in zip(qb, kb)) * scale
        q_pos = start + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
        qseg = None if seg_refs is None else seg_refs[0][rows]
        mask = _block_mask(q_pos, k_pos, qseg, kseg, causal=causal, seq_len=seq_len,
                           padded=q_ref.shape[0] != seq_len)
        p = jnp.exp(s - lse_ref[rows][:, None])
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        pt = p.T.astype(do_ref.dtype)
        dv = [acc + dot(pt, dc, nn) for acc, dc in zip(dv, dob)]
        dp = chunk_sum(dot(dc, vc, nt) for dc, vc in zip(dob, vb))
        dst = (p * (dp - delta_ref[rows][:, None])).T.astype(q_ref.dtype)
        dk = [acc + dot(dst, qc, nn) for acc, qc in zip(dk, qb)]
        return dk, dv

    if seg_refs is not None:
        # seg_refs: (ids, q lo, q hi, k lo, k hi); the overlap test takes (q block, k block).
        body = lambda i, carry: lax.cond(_overlap(*seg_refs[1:], i, kj), step,
                                         lambda _, c: c, i, carry)
    else:
        body = step
    lo = lax.div(kj * bk, bq) if causal else 0
    init = ([jnp.zeros((bk, w), jnp.float32) for _, w in k_chunks],
            [jnp.zeros((bk, w), jnp.float32) for _, w in v_chunks])
    dk, dv = lax.fori_loop(lo, nq, body, init)
    for acc, (a, w) in zip(dk, k_chunks):
        dk_ref[:, pl.ds(a, w)] = (acc * scale).astype(dk_ref.dtype)
    for acc, (c, w) in zip(dv, v_chunks):
        dv_ref[:, pl.ds(c, w)] = acc.astype(dv_ref.dtype)


# --- Triton-style pallas_calls --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _GpuLayout:
    """Padded sizes for the Triton-style kernels: power-of-two blocks, the sequence padded to
    them, head dims padded to a multiple of 16 and read as power-of-two chunks."""

    T: int
    Tp: int
    K: int
    V: int
    Kp: int
    Vp: int

    @classmethod
    def make(cls, T, K, V, *blocks):
        Tp = round_up(T, max(blocks))
        return cls(T, Tp, K, V, round_up(K, 16), round_up(V, 16))

    def pad(self, q, k, v, *rest_q):
        """Pad [B,T,H,*] arrays: q and k to Kp, v and the rest (do) to Vp."""
        q, k = (pad_last(pad_seq(x, self.Tp), self.Kp) for x in (q, k))
        v, *rest = (pad_last(pad_seq(x, self.Tp), self.Vp) for x in (v, *rest_q))
        return q, k, v, rest


def _gpu_seg_inputs(segment_ids, Tp, bq, bk):
    """(ids [B,Tp], q-block lo/hi [B,nq], k-block lo/hi [B,nk]) and their BlockSpecs, whose
    index maps take (program, b, h)."""
    if segment_ids is None:
        return None, None
    seg = pad_seq(segment_ids, Tp, mode="edge")  # edge: padding never widens a block's range
    qlo, qhi = segment_ranges(seg, bq)
    klo, khi = segment_ranges(seg, bk)
    row = lambda n: pl.BlockSpec((None, n), lambda i, b, h: (b, 0))
    return (seg, qlo, qhi, klo, khi), (row(Tp), row(Tp // bq), row(Tp // bq),
                                        row(Tp // bk), row(Tp // bk))


def _forward_triton(interpret, q, k, v, segment_ids, *, static: _Static):
    bs = static.block_sizes or BlockSizes.gpu()
    B, T, H, K = q.shape
    V = v.shape[-1]
    bq, bk = _gpu_block(bs.block_q, T), _gpu_block(bs.block_k, T)
    lay = _GpuLayout.make(T, K, V, bq, bk)
    qp, kp, vp, _ = lay.pad(q, k, v)
    seg, seg_specs = _gpu_seg_inputs(segment_ids, lay.Tp, bq, bk)
    nq = lay.Tp // bq
    kernel = functools.partial(
        _fwd_kernel, scale=static.scale, causal=static.causal, seq_len=T, bq=bq, bk=bk, nq=nq,
        k_chunks=pow2_chunks(lay.Kp), v_chunks=pow2_chunks(lay.Vp),
        precision=dot_precision(q.dtype))
    q_block = lambda i, b, h: (b, nq - 1 - i, h, 0)
    whole = lambda i, b, h: (b, 0, h, 0)
    o, lse = pl.pallas_call(
        kernel,
        grid=(nq, B, H),
        in_specs=[pl.BlockSpec((None, bq, None, lay.Kp), q_block),
                  pl.BlockSpec((None, lay.Tp, None, lay.Kp), whole),
                  pl.BlockSpec((None, lay.Tp, None, lay.Vp), whole),
                  seg_specs],
        out_specs=[pl.BlockSpec((None, bq, None, lay.Vp), q_block),
                   pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, nq - 1 - i))],
        out_shape=[jax.ShapeDtypeStruct((B, lay.Tp, H, lay.Vp), q.dtype),
                   jax.ShapeDtypeStruct((B, H, lay.Tp), jnp.float32)],
        compiler_params=_backend.triton_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name="flash_mla_fwd",
    )(qp, kp, vp, seg)
    return o[:, :T, :, :V], lse[:, :, :T]


def _backward_triton(interpret, q, k, v, segment_ids, do, lse, delta, *, static: _Static):
    bs = static.block_sizes or BlockSizes.gpu()
    B, T, H, K = q.shape
    V = v.shape[-1]
    bq, bk = _gpu_block(bs.block_q_dq, T), _gpu_block(bs.block_k_dq, T)
    bq2, bk2 = _gpu_block(bs.block_q_dkv, T), _gpu_block(bs.block_k_dkv, T)
    lay = _GpuLayout.make(T, K, V, bq, bk, bq2, bk2)
    qp, kp, vp, (dop,) = lay.pad(q, k, v, do)
    lse_p, delta_p = (pad_seq(x, lay.Tp, axis=2) for x in (lse, delta))
    common = dict(scale=static.scale, causal=static.causal, seq_len=T,
                  k_chunks=pow2_chunks(lay.Kp), v_chunks=pow2_chunks(lay.Vp),
                  precision=dot_precision(q.dtype))
    params = _backend.triton_params(bs.num_warps, bs.num_stages)
    whole = lambda i, b, h: (b, 0, h, 0)
    whole_row = lambda i, b, h: (b, h, 0)
    Kp, Vp, Tp = lay.Kp, lay.Vp, lay.Tp

    nq = Tp // bq
    seg, seg_specs = _gpu_seg_inputs(segment_ids, Tp, bq, bk)
    q_block = lambda i, b, h: (b, nq - 1 - i, h, 0)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, bq=bq, bk=bk, nq=nq, **common),
        grid=(nq, B, H),
        in_specs=[pl.BlockSpec((None, bq, None, Kp), q_block),
                  pl.BlockSpec((None, Tp, None, Kp), whole),
                  pl.BlockSpec((None, Tp, None, Vp), whole),
                  seg_specs,
                  pl.BlockSpec((None, bq, None, Vp), q_block),
                  pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, nq - 1 - i)),
                  pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, nq - 1 - i))],
        out_specs=pl.BlockSpec((None, bq, None, Kp), q_block),
        out_shape=jax.ShapeDtypeStruct((B, Tp, H, Kp), q.dtype),
        compiler_params=params, interpret=interpret, name="flash_mla_dq",
    )(qp, kp, vp, seg, dop, lse_p, delta_p)

    nk = Tp // bk2
    seg, seg_specs = _gpu_seg_inputs(segment_ids, Tp, bq2, bk2)
    k_block = lambda j, b, h: (b, j, h, 0)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, bq=bq2, bk=bk2, **common),
        grid=(nk, B, H),
        in_specs=[pl.BlockSpec((None, Tp, None, Kp), whole),
                  pl.BlockSpec((None, bk2, None, Kp), k_block),
                  pl.BlockSpec((None, bk2, None, Vp), k_block),
                  seg_specs,
                  pl.BlockSpec((None, Tp, None, Vp), whole),
                  pl.BlockSpec((None, None, Tp), whole_row),
                  pl.BlockSpec((None, None, Tp), whole_row)],
        out_specs=[pl.BlockSpec((None, bk2, None, Kp), k_block),
                   pl.BlockSpec((None, bk2, None, Vp), k_block)],
        out_shape=[jax.ShapeDtypeStruct((B, Tp, H, Kp), k.dtype),
                   jax.ShapeDtypeStruct((B, Tp, H, Vp), v.dtype)],
        compiler_params=params, interpret=interpret, name="flash_mla_dkv",
    )(qp, kp, vp, seg, dop, lse_p, delta_p)
    return dq[:, :T, :, :K], dk[:, :T, :, :K], dv[:, :T, :, :V]
