"""Logical axis names (the `logical_axes` metadata of every `nnx.Param`) -> mesh axes.

Only the routed experts are sharded so far: their `exp` dimension over the `expert` axis
(expert parallelism). Every other dimension is replicated.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

RULES = {"exp": "expert"}

# Mesh axes a batch is split over: every device holds its own sequences.
BATCH_AXES = ("data", "fsdp", "expert")


def spec_of(logical_axes, shape, mesh: Mesh, rules=RULES) -> P:
    """A PartitionSpec for one parameter: each named dimension goes to its mesh axis when that
    axis is larger than 1 and divides the dimension; otherwise it is replicated."""
    out = []
    for name, size in zip(logical_axes, shape):
        axis = rules.get(name)
        n = mesh.shape.get(axis, 1) if axis else 1
        out.append(axis if n > 1 and size % n == 0 else None)
    return P(*out)


def param_shardings(abstract_model, mesh: Mesh, rules=RULES):
    """The NamedSharding of every parameter of an (abstract) NNX model, as a pure dict with
    the structure of `params_of(model)`."""
    state = nnx.state(abstract_model, nnx.Param)
    variables = jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable))
    shardings = []
    for v in variables:
        axes = tuple(v.get_metadata().get("logical_axes", ()))
        shardings.append(NamedSharding(mesh, spec_of(axes, v.shape, mesh, rules)))
    return jax.tree.unflatten(jax.tree.structure(nnx.to_pure_dict(state)), shardings)


def optimizer_shardings(tx: optax.GradientTransformation, opt_state_shape, params_sh, mesh: Mesh):
    """Optimizer state shardings: the parameter-shaped parts (Adam moments) follow their
    parameters; everything else (counts) is replicated."""
    rep = NamedSharding(mesh, P())
    return optax.tree_map_params(tx, lambda _, sh: sh, opt_state_shape, params_sh,
                                 transform_non_params=lambda _: rep)

