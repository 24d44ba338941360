"""Next-token cross entropy without the full logits.

At V2's vocabulary (102,400) the float32 logits of one 4K sequence are 1.7 GB, and their
gradient as much again. `chunked_cross_entropy` computes the loss from the final hidden
states in chunks of the sequence: each chunk's logits [B, c, V] exist only inside one
iteration of a `lax.scan` whose body is rematerialised, so the backward pass recomputes one
chunk's logits at a time instead of keeping them all.

Shapes: B batch, T sequence, c chunk, D hidden, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv2_jax.sharding.rules import constrain

_ACT_BTV = ("act_batch", "act_seq", "act_vocab")


def cross_entropy(logits, targets, mask):
    """Sum of -log p(target) over mask, and the mask count. logits [B,T,V] (any float),
    targets [B,T] int, mask [B,T]. The plain form: materialises float32 logits."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    m = mask.astype(jnp.float32)
    return jnp.sum((lse - tgt) * m), jnp.sum(m)


@jax.custom_vjp
def _chunk_nll(h, w, targets, mask):
    """h [B,c,D], w [D,V], targets [B,c] int, mask [B,c] float -> sum of masked -log p(target).

    Its own backward: d logits = (softmax - onehot(target)) * mask, one elementwise pass
    over the logits it kept. Autodiff of the same forward scatters the target's cotangent
    into a [B,c,V] array and transposes that array for the weight gradient (measured at
    B*c = 2048, V = 32000 on CPU: 4.9-5.1 s against 4.3-4.6 s forward + backward).
    """
    return _chunk_nll_fwd(h, w, targets, mask)[0]


def _chunk_nll_fwd(h, w, targets, mask):
    logits = jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=jnp.float32)
    logits = constrain(logits, _ACT_BTV)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - tgt) * mask), (h, w, targets, mask, logits, lse)


def _chunk_nll_bwd(res, g):
    h, w, targets, mask, logits, lse = res
    target = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2) == targets[..., None]
    dlogits = (jnp.exp(logits - lse[..., None]) - target) * (mask * g)[..., None]
    dlogits = constrain(dlogits, _ACT_BTV).astype(h.dtype)
    dh = jnp.einsum("bcv,dv->bcd", dlogits, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum("bcd,bcv->dv", h, dlogits, preferred_element_type=jnp.float32)
    return dh.astype(h.dtype), dw.astype(w.dtype), None, None


_chunk_nll.defvjp(_chunk_nll_fwd, _chunk_nll_bwd)


def chunked_cross_entropy(h, w, targets, mask, chunk: int):
    """Same result as `cross_entropy(h @ w, targets, mask)`: (sum of -log p(target) over
    mask, mask count), with logits formed `chunk` positions at a time.

    h [B,T,D] final hidden states (compute dtype), w [D,V] the unembedding, targets [B,T]
    int, mask [B,T]. T need not divide by chunk (the tail is padded with masked positions).
    """
    B, T, D = h.shape
    m = mask.astype(jnp.float32)
    count = jnp.sum(m)
    if chunk <= 0 or T <= chunk:
        return _chunk_nll(h, w, targets, m), count
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        m = jnp.pad(m, ((0, 0), (0, pad)))
    # [B, n*c, ...] -> [n, B, c, ...]: scan over chunks, each keeps the batch sharding.
    hs = h.reshape(B, n, chunk, D).swapaxes(0, 1)
    ts = targets.reshape(B, n, chunk).swapaxes(0, 1)
    ms = m.reshape(B, n, chunk).swapaxes(0, 1)
    body = jax.checkpoint(lambda hc, tc, mc: _chunk_nll(hc, w, tc, mc))

    def step(total, xs):
        return total + body(*xs), None

    total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32), (hs, ts, ms))
    return total, count
