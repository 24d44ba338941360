"""Optimizer and learning-rate schedule (paper defaults: AdamW b1 0.9, b2 0.95, weight decay
0.1, no decay on norms; warm-up, then x0.316 at 60% and again at 90% of training, or cosine;
gradient clipping at 1.0)."""

from __future__ import annotations

import jax
import optax


def lr_schedule(peak_lr: float, total_steps: int, warmup_steps: int, kind: str = "step",
                min_lr_ratio: float = 0.1):
    warmup_steps = max(0, min(warmup_steps, total_steps))
    if kind == "step":
        after = optax.piecewise_constant_schedule(
            peak_lr, {int(0.6 * total_steps) - warmup_steps: 0.316,
                      int(0.9 * total_steps) - warmup_steps: 0.316})
    elif kind == "cosine":
        after = optax.cosine_decay_schedule(peak_lr, max(1, total_steps - warmup_steps),
                                            alpha=min_lr_ratio)
    elif kind == "constant":
        after = optax.constant_schedule(peak_lr)
    else:
        raise ValueError(f"--schedule: unknown {kind!r}; expected step|cosine|constant")
    if warmup_steps == 0:
        return after
    warm = optax.linear_schedule(peak_lr / warmup_steps, peak_lr, warmup_steps)
    return optax.join_schedules([warm, after], [warmup_steps])


def decay_mask(params):
    """True for every parameter but norm weights."""
    def keep(path, _):
        names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
        return not any(isinstance(n, str) and n.endswith("norm") for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(schedule, *, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip=1.0):
    parts = []
    if clip and clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)
