"""Optimizer and learning-rate schedule (paper defaults: AdamW b1 0.9, b2 0.95, weight decay
0.1, no decay on norms; warm-up, then x0.316 at 60% and again at 90% of training, or cosine;
gradient clipping at 1.0)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
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


@dataclasses.dataclass(frozen=True)
class AdamW:
    """AdamW with global-norm clipping and the skip of non-finite steps, as ONE elementwise
    update per parameter.

    The same arithmetic as optax's clip_by_global_norm + adamw (tested equal), but where the
    optax chain materialises a clipped-gradient tree and an update tree before touching the
    parameters, this updates (m, v) in place from g, then p in place from the new (m, v): at
    V2's shape on 64 devices that is ~7 GB less per device than the chain, and ~16 GB less
    than one elementwise pass over (p, g, m, v) (see `apply`).

    State: {"mu", "nu"} shaped like the parameters (their dtype), "count" the updates applied.
    """

    schedule: Callable
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip: float = 1.0

    def init(self, params) -> dict:
        return {"mu": jax.tree.map(jnp.zeros_like, params), "nu": jax.tree.map(jnp.zeros_like, params),
                "count": jnp.zeros((), jnp.int32)}

    def state_shardings(self, params_sh, replicated) -> dict:
        return {"mu": params_sh, "nu": params_sh, "count": replicated}

    def learning_rate(self, state):
        return self.schedule(state["count"])

    def apply(self, params, grads, state, grad_norm, apply):
        """(new params, new state): one AdamW step from grads whose global norm is grad_norm,
        or nothing at all where `apply` (a traced bool) is False."""
        b1, b2 = self.b1, self.b2
        count = state["count"] + 1
        lr = self.schedule(state["count"])
        bc1 = 1 - b1 ** count.astype(jnp.float32)
        bc2 = 1 - b2 ** count.astype(jnp.float32)
        clipping = bool(self.clip and self.clip > 0)

        def moments(g, m, v):
            g = g.astype(m.dtype)
            if clipping:
                g = jnp.where(grad_norm < self.clip, g, (g / grad_norm.astype(g.dtype)) * self.clip)
            return (jnp.where(apply, b1 * m + (1 - b1) * g, m),
                    jnp.where(apply, b2 * v + (1 - b2) * g * g, v))

        def param(p, m2, v2, decay):
            u = (m2 / bc1.astype(m2.dtype)) / (jnp.sqrt(v2 / bc2.astype(v2.dtype)) + self.eps)
            if decay and self.weight_decay:
                u = u + self.weight_decay * p
            return jnp.where(apply, (p + (-lr * u)).astype(p.dtype), p)

        is_out = lambda x: isinstance(x, tuple) and len(x) == 2 and not isinstance(x[0], tuple)
        mv = jax.tree.map(moments, grads, state["mu"], state["nu"])
        mu = jax.tree.map(lambda o: o[0], mv, is_leaf=is_out)
        nu = jax.tree.map(lambda o: o[1], mv, is_leaf=is_out)
        # The parameter update reads the NEW moments: left to itself the compiler fuses the
        # moments' arithmetic into it again, reading the old ones after their buffers were
        # updated in place, and so keeps a copy of every moment (seen on XLA:CPU).
        mu, nu = jax.lax.optimization_barrier((mu, nu))
        new_params = jax.tree.map(param, params, mu, nu, decay_mask(params))
        new_state = {"mu": mu, "nu": nu, "count": jnp.where(apply, count, state["count"])}
        return new_params, new_state


def make_optimizer(schedule, *, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip=1.0) -> AdamW:
    return AdamW(schedule, weight_decay=weight_decay, b1=b1, b2=b2, eps=eps, clip=clip)


def make_optax_optimizer(schedule, *, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, clip=1.0):
    """The same optimizer as an optax chain (the reference `AdamW` is tested against)."""
    parts = []
    if clip and clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)
