"""The blocked causal XLA attention core against the plain reference, forward and backward,
at odd lengths (partial last block), several blocks, and packed segments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax.attention import attention_mask, mla_attention_reference, mla_attention_xla


@pytest.mark.parametrize("T,packed", [(1, False), (37, True), (150, False), (203, True)])
def test_xla_core_matches_reference(T, packed):
    B, N, P, R, V = 2, 3, 6, 4, 5
    ks = jax.random.split(jax.random.key(T), 6)
    q = jax.random.normal(ks[0], (B, T, N, P))
    qr = jax.random.normal(ks[1], (B, T, N, R))
    k = jax.random.normal(ks[2], (B, T, N, P))
    kr = jax.random.normal(ks[3], (B, T, R))
    v = jax.random.normal(ks[4], (B, T, N, V))
    if packed:
        cuts = np.sort(np.random.default_rng(T).choice(np.arange(1, T), 3, replace=False))
        seg = jnp.asarray(np.stack([np.searchsorted(cuts, np.arange(T), side="right") + 1] * B), jnp.int32)
    else:
        seg = jnp.ones((B, T), jnp.int32)
    mask = attention_mask(seg, seg)
    w = jax.random.normal(ks[5], (B, T, N, V))

    def loss(core, *a):
        return jnp.sum(core(*a, mask, 0.37) * w)

    ref_out = mla_attention_reference(q, qr, k, kr, v, mask, 0.37)
    out = mla_attention_xla(q, qr, k, kr, v, mask, 0.37)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=2e-5, atol=2e-6)
    g_ref = jax.grad(lambda *a: loss(mla_attention_reference, *a), argnums=(0, 1, 2, 3, 4))(q, qr, k, kr, v)
    g = jax.grad(lambda *a: loss(mla_attention_xla, *a), argnums=(0, 1, 2, 3, 4))(q, qr, k, kr, v)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)



def test_attention_mask_is_causal_within_equal_segments():
    """The mask itself, against the formula written out: the core tests above feed the same
    mask to both cores, and the layer parity tests hand it to the HF module too, so a wrong
    mask (off-by-one diagonal, segments not kept apart) passes them."""
    rng = np.random.default_rng(0)
    B, T, S = 2, 5, 8
    seg_k = np.sort(rng.integers(1, 4, (B, S)), axis=1).astype(np.int32)
    seg_q = seg_k[:, S - T:]
    want = np.zeros((B, 1, T, S), bool)
    for b in range(B):
        for t in range(T):
            for s in range(S):
                want[b, 0, t, s] = (t + S - T >= s) and seg_q[b, t] == seg_k[b, s]
    got = np.asarray(attention_mask(jnp.asarray(seg_q), jnp.asarray(seg_k)))
    assert got.shape == (B, 1, T, S) and got.dtype == bool
    np.testing.assert_array_equal(got, want)
    assert got[:, 0, np.arange(T), np.arange(T) + S - T].all()  # a query sees itself
    assert not want.all() and not (want == np.tril(np.ones((T, S), bool), S - T)).all()  # segments bite

    # Explicit positions (decode, packed rows): causal by position, not by index.
    q_pos = np.array([[3, 4, 5, 6, 7], [0, 1, 2, 0, 1]], np.int32)
    k_pos = np.array([[0, 1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 0, 1, 2, 3]], np.int32)
    ones_q, ones_k = np.ones((B, T), np.int32), np.ones((B, S), np.int32)
    got = np.asarray(attention_mask(jnp.asarray(ones_q), jnp.asarray(ones_k), jnp.asarray(q_pos),
                                    jnp.asarray(k_pos)))
    np.testing.assert_array_equal(got[:, 0], q_pos[:, :, None] >= k_pos[:, None, :])
