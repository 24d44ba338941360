"""The token batches the step-level tests feed to `loss_and_stats` / the train step: the same
dict `make_train_iter` yields (inputs, targets, positions, segment_ids, loss_mask), from
random token ids."""

import jax.numpy as jnp
import numpy as np


def token_batch(vocab: int, B: int, T: int, seed: int, pad: int = 0) -> dict:
    """B rows of T random tokens below `vocab` (ids drawn as [B, T + 1], shifted by one for
    the targets), one segment per row; `pad` > 0 makes the last row's final `pad` positions
    padding (segment 0, not counted)."""
    ids = np.random.default_rng(seed).integers(0, vocab, (B, T + 1))
    seg = np.ones((B, T), np.int32)
    if pad:
        seg[-1, -pad:] = 0
    return {"inputs": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
            "segment_ids": jnp.asarray(seg), "loss_mask": jnp.asarray(seg)}
