"""Pallas MLA kernels (`dsv2_jax.kernels`) against float64 numpy, in interpret mode on CPU.

Every test draws fresh random inputs (the seed is in the failure message). The Triton-style
bodies run under the Pallas interpreter (`interpret=True`, what CPU defaults to); the Mosaic
bodies under the TPU simulator (`pltpu.InterpretParams`) on a few small cases. Compiled at
XLA:CPU optimisation level 0: the interpreted kernels are tiny, their compile time is not.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental.pallas import tpu as pltpu

from dsv2_jax.kernels import (flash_mla, flash_mla_reference, mla_decode, mla_decode_paged,
                              mla_decode_paged_reference, mla_decode_reference)
from dsv2_jax.kernels._backend import pow2_chunks
from dsv2_jax.kernels.flash_mla import BlockSizes as FlashBlocks
from dsv2_jax.kernels.mla_decode import BlockSizes as DecodeBlocks

FAST = {"xla_backend_optimization_level": 0}
F32_TOL = 2e-5
BF16_TOL = 1.5e-2  # measured <= 5e-3 at V2 head dims
SMALL = FlashBlocks(16, 16, 16, 16, 16, 16)  # several blocks at test lengths
TPU = pltpu.InterpretParams()


def run(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST)(*args)


def rel(got, want, floor=0.1):
    """max |got - want| / max |want|. The floor keeps an exactly zero gradient (one visible
    key: softmax is constant, ds = 0) from dividing rounding noise by zero; the arrays
    compared here are O(1) otherwise."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), floor))


def fresh():
    seed = int(np.random.SeedSequence().entropy % 2**32)
    return np.random.default_rng(seed), seed


# --- float64 numpy references ---------------------------------------------------------------


def np_mask(B, T, causal, seg):
    m = np.ones((B, T, T), bool)
    if causal:
        m &= np.tril(np.ones((T, T), bool))[None]
    if seg is not None:
        m &= seg[:, :, None] == seg[:, None, :]
    return m[:, None]  # [B,1,T,T]


def np_flash(q, k, v, do, *, scale, causal, seg):
    """Forward and the analytic backward in float64: (o, dq, dk, dv)."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    s = np.einsum("bthk,bshk->bhts", q, k) * scale
    s = np.where(np_mask(q.shape[0], q.shape[1], causal, seg), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshv->bthv", p, v)
    dv = np.einsum("bhts,bthv->bshv", p, do)
    dp = np.einsum("bthv,bshv->bhts", do, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = scale * np.einsum("bhts,bshk->bthk", ds, k)
    dk = scale * np.einsum("bhts,bthk->bshk", ds, q)
    return o, dq, dk, dv


def np_decode(q, kv, lengths, *, v_dim, scale):
    q, kv = np.asarray(q, np.float64), np.asarray(kv, np.float64)
    s = np.einsum("bhd,bsd->bhs", q, kv) * scale
    valid = np.arange(kv.shape[1])[None, :] < np.asarray(lengths)[:, None]
    s = np.where(valid[:, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhs,bsv->bhv", p, kv[..., :v_dim])


# --- flash_mla ------------------------------------------------------------------------------


def flash_inputs(rng, B, T, H, K, V, dtype=jnp.float32, nseg=0):
    q, k = (rng.standard_normal((B, T, H, K)) for _ in range(2))
    v, do = (rng.standard_normal((B, T, H, V)) for _ in range(2))
    arrs = [jnp.asarray(x, dtype) for x in (q, k, v, do)]
    seg = None
    if nseg:  # packed documents: non-decreasing ids
        seg = np.sort(rng.integers(0, nseg, (B, T)), axis=1).astype(np.int32)
    return arrs, seg


def flash_fwd_bwd(q, k, v, do, seg, *, scale, causal, blocks=SMALL, interpret=None):
    segj = None if seg is None else jnp.asarray(seg)

    def f(q, k, v, do):
        o, vjp = jax.vjp(lambda q, k, v: flash_mla(q, k, v, causal=causal, scale=scale,
                                                    segment_ids=segj, block_sizes=blocks,
                                                    interpret=interpret), q, k, v)
        return (o, *vjp(do))

    return run(f, q, k, v, do)


def check_flash(B, T, H, K, V, *, causal, nseg, dtype=jnp.float32, tol=F32_TOL,
                blocks=SMALL, interpret=None):
    rng, seed = fresh()
    (q, k, v, do), seg = flash_inputs(rng, B, T, H, K, V, dtype, nseg)
    scale = K ** -0.5
    got = flash_fwd_bwd(q, k, v, do, seg, scale=scale, causal=causal, blocks=blocks,
                        interpret=interpret)
    want = np_flash(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                    do.astype(jnp.float32), scale=scale, causal=causal, seg=seg)
    errs = {name: rel(g, w) for name, g, w in zip(("o", "dq", "dk", "dv"), got, want)}
    for name, g in zip(("o", "dq", "dk", "dv"), got):
        assert g.dtype == dtype, name
    assert max(errs.values()) < tol, f"seed={seed} errors={errs}"
    return errs


@pytest.mark.parametrize(
    "B,T,H,K,V,causal,nseg",
    [
        (2, 37, 3, 48, 32, True, 0),   # T not a multiple of the block; K read as 32 + 16
        (1, 50, 1, 40, 24, True, 3),   # one head; K, V padded to 48, 32; packed documents
        (2, 33, 3, 48, 32, False, 4),  # segments only
        (1, 20, 3, 32, 16, False, 0),  # no mask at all: only the padded keys are hidden
    ],
)
def test_flash_mla_forward_and_grads_f32(B, T, H, K, V, causal, nseg):
    check_flash(B, T, H, K, V, causal=causal, nseg=nseg)


@pytest.mark.parametrize("blocks", [
    # Each kernel with the block its loop steps over twice the one it holds, where the
    # bound is not a whole number of blocks (the other way round it always is).
    FlashBlocks(16, 32, 16, 16, 16, 16),  # forward: 32-key blocks past 16-query blocks
    FlashBlocks(16, 16, 16, 32, 16, 16),  # dq: the same
    FlashBlocks(16, 16, 16, 16, 32, 16),  # dk/dv: 32-query blocks from 16-key blocks
], ids=["fwd", "dq", "dkv"])
@pytest.mark.parametrize("nseg", [0, 3])
def test_flash_mla_non_square_blocks(blocks, nseg):
    """The causal loops' bounds in block units (the forward's and dq's last key block, the
    dk/dv kernel's first query block) when query and key blocks differ in size: a bound
    rounded the wrong way skips a block that holds visible keys (or queries). Square blocks
    make every such division exact; T = 50 also leaves a padded tail."""
    check_flash(1, 50, 2, 32, 16, causal=True, nseg=nseg, blocks=blocks)


def test_flash_mla_bf16():
    check_flash(2, 45, 3, 48, 32, causal=True, nseg=2, dtype=jnp.bfloat16, tol=BF16_TOL)


def test_flash_mla_default_blocks_and_v2_head_dims():
    # 192 = 128 + 64 and 128, unpadded, with the GPU default blocks (shrunk to the sequence).
    check_flash(1, 24, 2, 192, 128, causal=True, nseg=0, blocks=None)


def test_flash_mla_matches_jnp_reference():
    rng, seed = fresh()
    (q, k, v, _), seg = flash_inputs(rng, 2, 29, 2, 48, 32, nseg=3)
    kw = dict(causal=True, scale=0.2, segment_ids=jnp.asarray(seg))
    got = run(lambda q, k, v: flash_mla(q, k, v, block_sizes=SMALL, **kw), q, k, v)
    assert rel(got, flash_mla_reference(q, k, v, **kw)) < F32_TOL, seed


@pytest.mark.parametrize("variant", ["triton", "tpu"])
def test_flash_mla_masked_blocks_are_skipped(variant):
    """NaN in blocks a query block must never read: with masking alone, 0 * NaN would reach
    the output; with the loops (Triton) or the index maps and pl.when (TPU) skipping them,
    it cannot."""
    rng, seed = fresh()
    n, T, blocks, interpret = ((16, 64, SMALL, None) if variant == "triton"
                               else (128, 256, FlashBlocks.tpu(), TPU))
    B, H, K, V = 1, 2, 32, 16
    (q, k, v, do), _ = flash_inputs(rng, B, T, H, K, V)
    scale, nan, cut = 0.25, jnp.nan, T - n
    run_ = lambda q, k, v, do, seg, causal: flash_fwd_bwd(
        q, k, v, do, seg, scale=scale, causal=causal, blocks=blocks, interpret=interpret)
    # Forward and dq: the last key block poisoned; earlier query rows never see it.
    o, dq, _, _ = run_(q, k.at[:, cut:].set(nan), v.at[:, cut:].set(nan), do, None, True)
    want = np_flash(q[:, :cut], k[:, :cut], v[:, :cut], do[:, :cut], scale=scale, causal=True,
                    seg=None)
    assert rel(o[:, :cut], want[0]) < F32_TOL and rel(dq[:, :cut], want[1]) < F32_TOL, seed
    # dk/dv: the first query block poisoned; later key blocks never visit it.
    _, _, dk, dv = run_(q.at[:, :n].set(nan), k, v, do.at[:, :n].set(nan), None, True)
    want = np_flash(q, k, v, do, scale=scale, causal=True, seg=None)
    assert rel(dk[:, n:], want[2][:, n:]) < F32_TOL, seed
    assert rel(dv[:, n:], want[3][:, n:]) < F32_TOL, seed
    # Segments without the causal mask: two documents; the second one's keys poisoned.
    half = T // 2
    seg = np.repeat(np.array([[1, 2]], np.int32), half, axis=1)
    o, dq, _, _ = run_(q, k.at[:, half:].set(nan), v.at[:, half:].set(nan), do, seg, False)
    want = np_flash(q[:, :half], k[:, :half], v[:, :half], do[:, :half], scale=scale,
                    causal=False, seg=None)
    assert rel(o[:, :half], want[0]) < F32_TOL and rel(dq[:, :half], want[1]) < F32_TOL, seed


@pytest.mark.parametrize("mistake", ["scale", "causal", "segments"])
def test_flash_mla_check_detects_mistakes(mistake):
    """The float64 comparison is not vacuous: a wrong scale or a dropped mask fails it."""
    rng, seed = fresh()
    (q, k, v, do), seg = flash_inputs(rng, 1, 30, 2, 32, 16, nseg=3)
    scale = 32 ** -0.5
    want = np_flash(q, k, v, do, scale=scale, causal=True, seg=seg)[0]
    kw = dict(causal=True, scale=scale, segment_ids=jnp.asarray(seg), block_sizes=SMALL)
    if mistake == "scale":
        kw["scale"] = scale * 1.01
    elif mistake == "causal":
        kw["causal"] = False
    else:
        kw["segment_ids"] = None
    got = run(lambda q, k, v: flash_mla(q, k, v, **kw), q, k, v)
    assert rel(got, want) > 50 * F32_TOL, (seed, rel(got, want))


def test_flash_mla_rejects_bad_shapes():
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(AssertionError):
        flash_mla(q, q[:, :7], q, scale=1.0)
    with pytest.raises(AssertionError):
        flash_mla(q, q, q[:, :, :1], scale=1.0)
    with pytest.raises(AssertionError):
        flash_mla(q, q, q, scale=1.0, segment_ids=jnp.zeros((1, 7), jnp.int32))
    with pytest.raises(TypeError):
        flash_mla(q.astype(jnp.float16), q.astype(jnp.float16), q.astype(jnp.float16), scale=1.0)


@settings(max_examples=6, deadline=None)
@given(B=st.integers(1, 2), T=st.integers(1, 40), H=st.integers(1, 3), causal=st.booleans(),
       nseg=st.sampled_from([0, 1, 3]))
def test_flash_mla_property_over_shapes(B, T, H, causal, nseg):
    check_flash(B, T, H, 48, 32, causal=causal, nseg=nseg)


@pytest.mark.parametrize("causal,nseg", [(True, 2), (False, 0)])
def test_flash_mla_tpu_variant_under_tpu_interpreter(causal, nseg):
    # Two 128-blocks and a padded tail: the causal skip (clamped index map + pl.when), the
    # segment tables in SMEM; or no mask at all but the padded keys.
    check_flash(1, 150, 2, 48, 32, causal=causal, nseg=nseg, blocks=FlashBlocks.tpu(),
                interpret=TPU)


# --- mla_decode -----------------------------------------------------------------------------


def decode_inputs(rng, B, H, S, Vd, R, dtype=jnp.float32):
    q = jnp.asarray(rng.standard_normal((B, H, Vd + R)), dtype)
    kv = jnp.asarray(rng.standard_normal((B, S, Vd + R)), dtype)
    return q, kv


def check_decode(B, H, S, Vd, R, lengths, blocks, *, dtype=jnp.float32, tol=F32_TOL,
                 interpret=None):
    rng, seed = fresh()
    q, kv = decode_inputs(rng, B, H, S, Vd, R, dtype)
    lengths = jnp.asarray(lengths, jnp.int32)
    scale = (Vd + R) ** -0.5
    got = run(lambda q, kv, n: mla_decode(q, kv, n, v_dim=Vd, scale=scale, block_sizes=blocks,
                                           interpret=interpret), q, kv, lengths)
    assert got.shape == (B, H, Vd) and got.dtype == dtype
    want = np_decode(q.astype(jnp.float32), kv.astype(jnp.float32), lengths, v_dim=Vd,
                     scale=scale)
    err = rel(got, want)
    assert err < tol, f"seed={seed} err={err}"
    return err


@pytest.mark.parametrize(
    "B,H,S,lengths,splits",
    [
        (3, 3, 150, [1, 150, 77], 3),  # lengths 1 and full; S not a multiple of block_k
        (3, 1, 150, [150, 1, 33], 1),  # one head, one split (no combine)
        (2, 3, 64, [64, 17], None),    # the split heuristic
    ],
)
def test_mla_decode_f32(B, H, S, lengths, splits):
    check_decode(B, H, S, 32, 16, lengths, DecodeBlocks(block_h=16, block_k=16, num_splits=splits))


def test_mla_decode_bf16_and_v2_widths():
    # 576 = 512 + 64 read unpadded as two chunks; default blocks.
    check_decode(2, 16, 96, 512, 64, [96, 5], None, dtype=jnp.bfloat16, tol=BF16_TOL)


def test_mla_decode_zero_length_gives_zeros():
    rng, _ = fresh()
    q, kv = decode_inputs(rng, 2, 3, 32, 32, 16)
    out = run(lambda q, kv: mla_decode(q, kv, jnp.asarray([0, 32]), v_dim=32, scale=0.1,
                                       block_sizes=DecodeBlocks(block_h=16, block_k=16,
                                                                num_splits=2)), q, kv)
    assert np.all(np.asarray(out[0]) == 0) and np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("variant", ["triton", "tpu"])
def test_mla_decode_ignores_rows_past_length(variant):
    """Stale rows past a sequence's length (NaN here) must not reach the output: both bodies
    zero the values of the last block's dead rows (0 * NaN is NaN)."""
    rng, seed = fresh()
    q, kv = decode_inputs(rng, 2, 3, 80, 32, 16)
    lengths = jnp.asarray([37, 80], jnp.int32)
    blocks, interpret = ((DecodeBlocks(block_h=16, block_k=16, num_splits=2), None) if variant == "triton"
                         else (DecodeBlocks(block_h=8, block_k=32, num_splits=2), TPU))
    want = np_decode(q, kv, lengths, v_dim=32, scale=0.1)
    got = run(lambda q, kv: mla_decode(q, kv, lengths, v_dim=32, scale=0.1,
                                       block_sizes=blocks, interpret=interpret),
              q, kv.at[0, 37:].set(jnp.nan))
    assert rel(got, want) < F32_TOL, seed


def test_mla_decode_check_detects_wrong_length():
    rng, seed = fresh()
    q, kv = decode_inputs(rng, 2, 3, 48, 32, 16)
    lengths = np.array([20, 30])
    want = np_decode(q, kv, lengths, v_dim=32, scale=0.1)
    got = run(lambda q, kv: mla_decode(q, kv, jnp.asarray(lengths + 1), v_dim=32, scale=0.1,
                                       block_sizes=DecodeBlocks(block_h=16, block_k=16)), q, kv)
    assert rel(got, want) > 50 * F32_TOL, seed
    assert rel(mla_decode_reference(q, kv, jnp.asarray(lengths), v_dim=32, scale=0.1),
               want) < F32_TOL, seed


@pytest.mark.parametrize("variant", ["triton", "tpu"])
def test_mla_decode_lengths_past_the_cache_mean_the_whole_cache(variant):
    """A length past the cache's S rows reads the S rows, nothing past them, and counts no
    block twice; the reference agrees and keeps stale NaN rows out (0 * NaN)."""
    rng, seed = fresh()
    q, kv = decode_inputs(rng, 2, 3, 70, 32, 16)
    blocks, interpret = ((DecodeBlocks(block_h=16, block_k=16, num_splits=3), None) if variant == "triton"
                         else (DecodeBlocks(block_h=8, block_k=32, num_splits=2), TPU))
    want = np_decode(q, kv, np.array([70, 70]), v_dim=32, scale=0.1)
    got = run(lambda q, kv: mla_decode(q, kv, jnp.asarray([90, 70], jnp.int32), v_dim=32, scale=0.1,
                                       block_sizes=blocks, interpret=interpret), q, kv)
    assert rel(got, want) < F32_TOL, seed
    ref = mla_decode_reference(q, kv.at[1, 40:].set(jnp.nan), jnp.asarray([90, 40]), v_dim=32, scale=0.1)
    assert np.isfinite(np.asarray(ref)).all()
    np.testing.assert_allclose(np.asarray(ref[0]), want[0], rtol=F32_TOL, atol=F32_TOL)


def test_mla_decode_refuses_what_it_cannot_read():
    rng, _ = fresh()
    q, kv = decode_inputs(rng, 2, 3, 16, 32, 16)
    with pytest.raises(TypeError, match="lengths must be integers"):
        mla_decode(q, kv, jnp.asarray([3.7, 4.0]), v_dim=32, scale=0.1)
    with pytest.raises(ValueError, match="no rows"):
        mla_decode(q, kv[:, :0], jnp.asarray([0, 0]), v_dim=32, scale=0.1)
    with pytest.raises(ValueError, match="num_splits"):
        DecodeBlocks(num_splits=0)
    with pytest.raises(TypeError, match="block_table must be integers"):
        mla_decode_paged(q, kv, jnp.zeros((2, 1), jnp.float32), jnp.asarray([1, 1]), v_dim=32, scale=0.1)
    x = jnp.ones((1, 20, 1, 16), jnp.float32)
    with pytest.raises(TypeError, match="segment_ids must be integers"):
        flash_mla(x, x, x, scale=0.1, segment_ids=jnp.full((1, 20), 0.5))


def paged_inputs(rng, B, H, M, page, Vd, R, P, dtype=jnp.float32):
    q = jnp.asarray(rng.standard_normal((B, H, Vd + R)), dtype)
    pages = jnp.asarray(rng.standard_normal((P, page, Vd + R)), dtype)
    table = jnp.asarray(rng.permutation(P)[: B * M].reshape(B, M), jnp.int32)  # shuffled
    return q, pages, table


@pytest.mark.parametrize("H,splits", [(3, 3), (1, None)])
def test_mla_decode_paged(H, splits):
    rng, seed = fresh()
    B, M, page, Vd, R = 3, 6, 16, 32, 16
    q, pages, table = paged_inputs(rng, B, H, M, page, Vd, R, P=25)
    lengths = jnp.asarray([1, M * page, 41], jnp.int32)
    blocks = DecodeBlocks(block_h=16, num_splits=splits)
    got = run(lambda q, p, t, n: mla_decode_paged(q, p, t, n, v_dim=Vd, scale=0.2,
                                                   block_sizes=blocks), q, pages, table, lengths)
    kv = np.asarray(pages)[np.asarray(table)].reshape(B, M * page, Vd + R)
    want = np_decode(q, kv, lengths, v_dim=Vd, scale=0.2)
    assert rel(got, want) < F32_TOL, seed
    ref = mla_decode_paged_reference(q, pages, table, lengths, v_dim=Vd, scale=0.2)
    assert rel(ref, want) < F32_TOL, seed
    # Table entries past a sequence's pages may be -1 and the pool's unused pages stale
    # (NaN); a length past its M pages means all of them.
    table = table.at[0, 1:].set(-1)  # row 0 holds 1 row: one page
    pages = jnp.concatenate([pages, jnp.full_like(pages[:1], jnp.nan)])  # -1 wraps to it
    long = lengths.at[2].set(M * page + 30)
    got = run(lambda q, p, t, n: mla_decode_paged(q, p, t, n, v_dim=Vd, scale=0.2,
                                                   block_sizes=blocks), q, pages, table, long)
    want = np_decode(q, kv, np.minimum(np.asarray(long), M * page), v_dim=Vd, scale=0.2)
    assert rel(got, want) < F32_TOL, seed
    ref = mla_decode_paged_reference(q, pages, table, long, v_dim=Vd, scale=0.2)
    assert np.isfinite(np.asarray(ref)).all() and rel(ref, want) < F32_TOL, seed


def test_mla_decode_paged_length_past_its_pages_when_splits_overhang():
    """Five pages in two splits of three: the last split's third step lies past the
    sequence's pages. A length past them is clipped to its own M pages (not the pool's), so
    that step reads nothing and no page is counted twice."""
    rng, seed = fresh()
    B, H, M, page, Vd, R = 2, 3, 5, 16, 32, 16
    q, pages, table = paged_inputs(rng, B, H, M, page, Vd, R, P=12)
    lengths = jnp.asarray([M * page + 40, 50], jnp.int32)
    blocks = DecodeBlocks(block_h=16, num_splits=2)
    got = run(lambda q, p, t, n: mla_decode_paged(q, p, t, n, v_dim=Vd, scale=0.2,
                                                   block_sizes=blocks), q, pages, table, lengths)
    kv = np.asarray(pages)[np.asarray(table)].reshape(B, M * page, Vd + R)
    want = np_decode(q, kv, np.minimum(np.asarray(lengths), M * page), v_dim=Vd, scale=0.2)
    assert rel(got, want) < F32_TOL, seed


@settings(max_examples=6, deadline=None)
@given(B=st.integers(1, 3), H=st.integers(1, 4), S=st.integers(1, 70), splits=st.integers(1, 3),
       data=st.data())
def test_mla_decode_property_over_shapes(B, H, S, splits, data):
    lengths = data.draw(st.lists(st.integers(1, S), min_size=B, max_size=B))
    check_decode(B, H, S, 32, 16, lengths, DecodeBlocks(block_h=16, block_k=16, num_splits=splits))


def test_mla_decode_tpu_variant_under_tpu_interpreter():
    # 48 + 16 wide rows padded to 128 + 128; head block of 8 (3 heads padded); two splits.
    check_decode(2, 3, 100, 48, 16, [1, 100], DecodeBlocks(block_h=8, block_k=32, num_splits=2),
                 interpret=TPU)


def test_mla_decode_paged_tpu_variant_under_tpu_interpreter():
    rng, seed = fresh()
    B, H, M, page, Vd, R = 2, 3, 4, 16, 32, 16
    q, pages, table = paged_inputs(rng, B, H, M, page, Vd, R, P=9)
    lengths = jnp.asarray([M * page, 1], jnp.int32)
    got = run(lambda q, p, t, n: mla_decode_paged(
        q, p, t, n, v_dim=Vd, scale=0.2, block_sizes=DecodeBlocks(block_h=8, num_splits=2),
        interpret=TPU), q, pages, table, lengths)
    kv = np.asarray(pages)[np.asarray(table)].reshape(B, M * page, Vd + R)
    assert rel(got, np_decode(q, kv, lengths, v_dim=Vd, scale=0.2)) < F32_TOL, seed


def test_pow2_chunks():
    assert pow2_chunks(192) == ((0, 128), (128, 64))
    assert pow2_chunks(576) == ((0, 512), (512, 64))
    assert pow2_chunks(48) == ((0, 32), (32, 16))


def test_flash_mla_sequence_padded_to_the_largest_block():
    """The sequence is padded to a multiple of the largest of the six blocks, so that every
    kernel's blocks tile it: padded to the smallest only (T = 40 -> 48 with 16-row blocks),
    the loops over 32-row blocks (forward and dq keys, dk/dv queries) would stop at row 32
    and leave out the rows past it."""
    check_flash(1, 40, 2, 32, 16, causal=True, nseg=2, blocks=FlashBlocks(16, 32, 16, 32, 32, 16))


def test_flash_mla_tpu_variant_non_square_blocks():
    """The Mosaic bodies with query blocks of 384 rows over key blocks of 256 (all three
    kernels), causal, two documents, T = 300: a query block ends inside a key block, so the
    index map's last key block and the skip test's bound must round up, the dk/dv kernel's
    first query block down; and the sequence is padded to lcm(384, 256) = 768, a multiple of
    both (to 384 only, the key loop would stop at row 256). Square blocks make each of these
    exact, which is all the other TPU tests use."""
    check_flash(1, 300, 1, 32, 16, causal=True, nseg=2,
                blocks=FlashBlocks(384, 256, 384, 256, 384, 256), interpret=TPU)


def test_decode_split_heuristic():
    """`BlockSizes.splits`: enough splits for `target_programs` programs over the (batch,
    head-block) ones, but each split at least `min_split_blocks` blocks long; a given
    `num_splits` is kept up to one block per split; the splits always cover every block."""
    gpu = DecodeBlocks()
    assert gpu.splits(1, 1, 16) == (4, 4)      # 132 wanted, 16 // 4 = 4 allowed
    assert gpu.splits(1, 1, 3) == (1, 3)       # too short to split
    assert gpu.splits(8, 4, 100) == (5, 20)    # ceil(132 / 32) = 5
    assert gpu.splits(200, 1, 100) == (1, 100)  # the batch fills the chip alone
    assert DecodeBlocks(num_splits=3).splits(1, 1, 5) == (3, 2)
    assert DecodeBlocks(num_splits=10).splits(1, 1, 4) == (4, 1)
    assert DecodeBlocks(num_splits=2).splits(1, 1, 5) == (2, 3)
