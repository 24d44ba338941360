"""The training objective and one optimizer step, as pure functions of pytrees.

loss = next-token cross entropy (mean over counted targets)
     + aux_loss_alpha * expert + device_aux_loss_alpha * device + comm_aux_loss_alpha * comm
with each balance loss summed over the MoE layers (each layer contributes its own term, as in
the paper).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsv2_jax.config import DeepseekV2Config
from dsv2_jax.moe import balance_losses
from dsv2_jax.sharding.rules import constrain
from dsv2_jax.train.loss import chunked_cross_entropy


@dataclasses.dataclass(frozen=True)
class ModelFns:
    """Binds the model's graph to pure functions of a params pytree (nested dict of arrays)."""

    graphdef: Any
    treedef: Any  # treedef of the nnx.State of Params, for pure dict -> State
    axes: tuple = ()  # each parameter's logical axes, in leaf order

    @classmethod
    def from_model(cls, model):
        graphdef, state = nnx.split(model, nnx.Param)
        variables = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
        axes = tuple(tuple(v.get_metadata().get("logical_axes", (None,) * v.ndim)) for v in variables)
        return cls(graphdef, jax.tree.structure(state), axes)

    def model(self, params):
        state = jax.tree.unflatten(self.treedef, jax.tree.leaves(params))
        return nnx.merge(self.graphdef, state)

    def constrain(self, tree):
        """A parameter-shaped tree (gradients, updates) laid out like the parameters under
        the ambient mesh: gradients are then reduce-scattered onto their FSDP shards instead
        of all-reduced whole."""
        leaves, treedef = jax.tree.flatten(tree)
        if not self.axes or len(leaves) != len(self.axes):
            return tree
        return jax.tree.unflatten(treedef, [constrain(a, ax, what="gradient")
                                            for a, ax in zip(leaves, self.axes)])


def params_of(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def loss_and_stats(fns: ModelFns, cfg: DeepseekV2Config, params, batch, *, train: bool = True):
    model = fns.model(params)
    h, routers = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"],
                                     train=train)
    ce_sum, n = chunked_cross_entropy(h, model.output_kernel(), batch["targets"], batch["loss_mask"],
                                      cfg.ce_chunk)
    ce = ce_sum / jnp.maximum(n, 1.0)
    B = batch["inputs"].shape[0]
    zero = jnp.zeros((), jnp.float32)
    aux = {"expert": zero, "device": zero, "comm": zero}
    counts, dropped, rows, rows_max = [], [], [], []
    for r in routers:  # one stacked RouterOutput per MoE segment, leading axis = layer
        per_layer = jax.vmap(lambda rr: balance_losses(rr, cfg, B))(r)
        aux = {k: aux[k] + jnp.sum(per_layer[k]) for k in aux}
        counts.append(r.expert_counts)
        real = r.valid.astype(jnp.float32)  # [L, T]
        kept = (r.keep & r.valid[..., None]).astype(jnp.float32)
        dropped.append(1.0 - kept.sum(axis=(1, 2)) / jnp.maximum(real.sum(axis=1) * r.keep.shape[-1], 1.0))
        rows.append((r.rows * real).sum(axis=1) / jnp.maximum(real.sum(axis=1), 1.0))
        rows_max.append(r.rows.max(axis=1))
    total = (ce + cfg.aux_loss_alpha * aux["expert"] + cfg.device_aux_loss_alpha * aux["device"]
             + cfg.comm_aux_loss_alpha * aux["comm"])
    stats = {"ce": ce, "ce_sum": ce_sum, "tokens": n, "expert_loss": aux["expert"],
             "device_loss": aux["device"], "comm_loss": aux["comm"]}
    if counts:
        c = jnp.concatenate(counts).astype(jnp.float32)  # [L_moe, E]
        stats["load_max_over_mean"] = jnp.mean(jnp.max(c, -1) / jnp.maximum(jnp.mean(c, -1), 1e-9))
        stats["load_min_over_mean"] = jnp.mean(jnp.min(c, -1) / jnp.maximum(jnp.mean(c, -1), 1e-9))
        stats["dropped_fraction"] = jnp.mean(jnp.concatenate(dropped))
        # Device rows each real token was dispatched as (after dropping): the traffic.
        stats["rows_per_token"] = jnp.mean(jnp.concatenate(rows))
        stats["rows_per_token_max"] = jnp.max(jnp.concatenate(rows_max)).astype(jnp.float32)
    return total, stats


def make_train_step(fns: ModelFns, cfg: DeepseekV2Config, tx: optax.GradientTransformation,
                    schedule: Callable, grad_accum: int = 1):
    """(state, batch) -> (state, metrics). state = {params, opt_state, step, nonfinite}.

    A step whose loss or gradients are not finite changes nothing but the counters.
    With grad_accum = A the batch is split into A micro-batches whose gradients are averaged.
    Micro-batch i takes rows i, i+A, i+2A, ... so that, with the batch split over devices in
    contiguous blocks, every device's micro-batches are rows it already holds.
    """

    def grads_of(params, batch):
        def f(p):
            return loss_and_stats(fns, cfg, p, batch)

        (loss, stats), grads = jax.value_and_grad(f, has_aux=True)(params)
        return loss, stats, fns.constrain(grads)

    def step(state, batch):
        params = state["params"]
        if grad_accum == 1:
            loss, stats, grads = grads_of(params, batch)
        else:
            # [B, ...] -> [B/A, A, ...] -> [A, B/A, ...]: the sharded dimension stays sharded.
            micro = jax.tree.map(
                lambda a: constrain(a.reshape((-1, grad_accum) + a.shape[1:]).swapaxes(0, 1),
                                    (None, "act_batch") + (None,) * (a.ndim - 1)), batch)

            # The parameters go through the loop as a carry, behind an optimization barrier:
            # as a loop invariant, XLA hoisted their all-gathers out of the loop, so every
            # parameter was held whole (float32) for the whole step under fsdp (v2-lite, 2
            # layers, fsdp=8: 12.98 GB against 8.87 without accumulation; 9.46 GB this way).
            # The running sum of the gradients keeps the parameters' layout.
            def acc(carry, mb):
                p, running = carry
                p = jax.lax.optimization_barrier(p)
                loss, stats, grads = grads_of(p, mb)
                loss, stats, grads = jax.tree.map(jnp.add, running, (loss, stats, grads))
                return (p, (loss, stats, fns.constrain(grads))), None

            zl, zs, zg = jax.tree.map(jnp.zeros_like, jax.eval_shape(grads_of, params,
                                                                    jax.tree.map(lambda a: a[0], micro)))
            (_, total), _ = jax.lax.scan(acc, (params, (zl, zs, fns.constrain(zg))), micro)
            loss, stats, grads = jax.tree.map(lambda a: a / grad_accum, total)
            stats["ce_sum"] = stats["ce_sum"] * grad_accum
            stats["tokens"] = stats["tokens"] * grad_accum
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if hasattr(tx, "apply"):  # the fused AdamW (train/optim.py): one pass, in place
            new_params, new_opt = tx.apply(params, grads, state["opt_state"], grad_norm, finite)
        else:  # any optax transformation
            updates, new_opt = tx.update(grads, state["opt_state"], params)
            new_params = optax.apply_updates(params, updates)
            pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
            new_params, new_opt = pick(new_params, params), pick(new_opt, state["opt_state"])
        new_state = {
            "params": new_params,
            "opt_state": new_opt,
            "step": state["step"] + 1,
            "nonfinite": state["nonfinite"] + (~finite).astype(jnp.int32),
        }
        # Skipped (non-finite) steps do not advance the optimizer's count: the rate of this
        # step is that of the updates applied so far.
        metrics = dict(stats, loss=loss, grad_norm=grad_norm,
                       lr=schedule(state["step"] - state["nonfinite"]), finite=finite,
                       nonfinite_total=new_state["nonfinite"])
        return new_state, metrics

    return step


def init_state(params, tx) -> dict:
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
            "nonfinite": jnp.zeros((), jnp.int32)}


def make_eval_step(fns: ModelFns, cfg: DeepseekV2Config):
    def step(params, batch):
        _, stats = loss_and_stats(fns, cfg, params, batch, train=False)
        return stats["ce_sum"], stats["tokens"]

    return step
