"""The one sharding table: logical axis names -> mesh axes, for parameters and activations.

Every `nnx.Param` carries `logical_axes` metadata (one name per dimension) and the model
constrains its activations at layer boundaries by logical name (`constrain`), so a different
rule set changes no model code (`use_rules`).

Mesh axes (see `mesh.py`): data (pure data parallelism: parameters replicated), fsdp
(parameters and optimizer state sharded, gathered for use, gradients reduce-scattered),
expert (routed experts split by expert; every other parameter also sharded over it, as over
fsdp, since its devices hold different tokens anyway), tensor (heads, MLP width, vocab).

How a spec is built (`spec_for`): dimensions are read left to right; each takes the mesh
axes its name maps to that are larger than 1 and not already taken by an earlier dimension
(a mesh axis shards at most one dimension of an array). So a routed expert [layers, exp,
embed, moe_mlp] becomes (None, expert, fsdp, tensor) while a dense [embed, mlp] becomes
((fsdp, expert), tensor). A dimension that does not divide by the devices of its axes is an
error naming the array, never silent replication.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Mapping

import jax
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Logical name -> mesh axes, in the order they are taken.
RULES: Mapping[str, tuple[str, ...]] = {
    # --- parameters ----------------------------------------------------------------------
    "layers": (),  # the stacked-layer axis: never split (no pipeline parallelism)
    "vocab": ("tensor",),
    "embed": ("fsdp", "expert"),
    "q_lora": ("fsdp", "expert"),
    "kv_lora": ("fsdp", "expert"),
    "q_heads": ("tensor",),
    "kv_heads": ("tensor",),
    "o_heads": ("tensor",),
    "mlp": ("tensor",),
    "moe_mlp": ("tensor",),
    "exp": ("expert",),
    "router": (),  # the router's expert dimension: small, every device routes its own tokens
    # --- activations ---------------------------------------------------------------------
    "act_batch": ("data", "fsdp", "expert"),
    "act_seq": (),
    "act_embed": (),
    "act_heads": ("tensor",),
    "act_vocab": ("tensor",),
}

# Parameter names whose dimension is a flattened [heads, head_dim]: split only on whole heads.
HEAD_AXES = ("q_heads", "kv_heads", "o_heads")

# Parameter dimensions split for storage only (FSDP / ZeRO-3): gathered before use by
# `gathered`, whose transpose reduce-scatters the gradient back onto the shards. Dimensions
# with other names (heads, MLP width, vocab, experts) stay split during compute.
STORAGE_ONLY = ("embed", "q_lora", "kv_lora")

_ACTIVE: contextvars.ContextVar[Mapping[str, tuple[str, ...]]] = contextvars.ContextVar(
    "dsv2_sharding_rules", default=RULES)


class ShardingError(ValueError):
    """A rule asks to split a dimension that the mesh does not divide."""


@contextlib.contextmanager
def use_rules(rules: Mapping[str, tuple[str, ...]]):
    """Run model code (and build shardings) under another rule set. The rules are read
    while tracing: a function jitted under one rule set keeps it when called under another
    (jit it again)."""
    token = _ACTIVE.set(rules)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_rules() -> Mapping[str, tuple[str, ...]]:
    return _ACTIVE.get()


def batch_axes(mesh=None, rules=None) -> tuple[str, ...]:
    """The mesh axes a batch (and a token dimension) is split over."""
    axes = (rules or active_rules())["act_batch"]
    if mesh is None:
        return tuple(axes)
    return tuple(a for a in axes if a in mesh.axis_names)


# Kept for callers that need the names without a mesh.
BATCH_AXES = RULES["act_batch"]


def _mesh_size(mesh, axis: str) -> int:
    return int(dict(mesh.shape).get(axis, 1))


def spec_for(logical_axes, shape, mesh, rules=None, *, what: str = "array",
             head_dims: Mapping[str, int] | None = None, lenient: bool = False) -> P:
    """The PartitionSpec of one array from its logical axes (see the module docstring).

    head_dims: {logical name: head size} for dimensions that are flattened [heads, head size],
    which must split on whole heads. lenient: a dimension the mesh does not divide keeps the
    longest prefix of its axes that does (activations: a generation batch of 2 on a 4-way
    expert axis), instead of raising."""
    rules = rules or active_rules()
    if len(logical_axes) != len(shape):
        raise ShardingError(f"{what}: {len(logical_axes)} logical axes {tuple(logical_axes)} for "
                            f"shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for i, (name, size) in enumerate(zip(logical_axes, shape)):
        if name is not None and name not in rules:
            raise ShardingError(f"{what}: logical axis {name!r} is not in the sharding rules")
        axes = tuple(a for a in (rules.get(name, ()) if name else ())
                     if a not in used and _mesh_size(mesh, a) > 1)
        n = math.prod(_mesh_size(mesh, a) for a in axes)
        units = size
        if head_dims and name in head_dims and size % head_dims[name] == 0:
            units = size // head_dims[name]
        while lenient and axes and units % n:
            axes = axes[:-1]
            n = math.prod(_mesh_size(mesh, a) for a in axes)
        if units % n:
            split = "x".join(f"{a}={_mesh_size(mesh, a)}" for a in axes)
            kind = "heads" if units != size else "size"
            raise ShardingError(f"{what}: dimension {i} ({name!r}, {kind} {units}) does not divide "
                                f"over {split} ({n} devices); choose a mesh that divides it or "
                                f"change the rule for {name!r}")
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def constrain(x, logical_axes, *, what: str = "activation"):
    """with_sharding_constraint by logical names under the ambient mesh (`jax.set_mesh`);
    a no-op without one, so the model runs unchanged on one device. A dimension the mesh
    does not divide is split over fewer axes (see `spec_for`'s lenient)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(
        x, spec_for(logical_axes, x.shape, mesh, what=what, lenient=True))


def _strip_layers(logical_axes, ndim: int) -> tuple:
    axes = tuple(logical_axes)
    if len(axes) == ndim + 1 and axes[0] == "layers":
        axes = axes[1:]
    return axes


def entry_axes(entry) -> tuple[str, ...]:
    """The mesh axes one dimension of a PartitionSpec names: None, one axis, or several."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def storage_split(logical_axes, shape, mesh) -> tuple[P, P, list]:
    """(storage spec, spec once gathered for use, [(dim, mesh axes) to gather]) of a
    parameter: the dimensions whose names are STORAGE_ONLY lose their mesh axes."""
    axes = _strip_layers(logical_axes, len(shape))
    spec = spec_for(axes, shape, mesh, what="parameter")
    entries = tuple(spec) + (None,) * (len(shape) - len(spec))
    gather, out = [], []
    for dim, (name, entry) in enumerate(zip(axes, entries)):
        mesh_axes = entry_axes(entry)
        if name in STORAGE_ONLY and mesh_axes:
            gather.append((dim, mesh_axes))
            out.append(None)
        else:
            out.append(entry)
    return spec, P(*out), gather


def gather_local(w, gather: list):
    """Inside shard_map: all-gather a parameter's local block over its storage axes
    (`storage_split`'s list). The transpose is a reduce-scatter of the gradient."""
    for dim, mesh_axes in gather:
        w = jax.lax.all_gather(w, mesh_axes, axis=dim, tiled=True)
    return w


def gathered(x, logical_axes):
    """A parameter gathered over its storage-only (FSDP) mesh axes for use, under the
    ambient mesh; a no-op without one. An explicit all-gather inside `shard_map`, so that
    the backward pass holds an explicit reduce-scatter (its transpose) and every layer's
    weights are gathered where they are used, one layer at a time under the layer scan.

    logical_axes may carry a leading "layers" name that the (per-layer) value does not."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec, out, gather = storage_split(logical_axes, x.shape, mesh)
    if not gather:
        return x
    return jax.shard_map(lambda w: gather_local(w, gather), in_specs=spec, out_specs=out,
                         check_vma=False)(x)


def _head_dims(cfg) -> dict[str, int] | None:
    if cfg is None:
        return None
    return {"q_heads": cfg.qk_head_dim, "kv_heads": cfg.qk_nope_head_dim + cfg.v_head_dim,
            "o_heads": cfg.v_head_dim}


def param_specs(abstract_model, mesh: Mesh, rules=None) -> dict:
    """The PartitionSpec of every parameter, as a pure dict shaped like `params_of(model)`."""
    cfg = getattr(abstract_model, "cfg", None)
    state = nnx.state(abstract_model, nnx.Param)
    flat = []
    for path, v in nnx.to_flat_state(state):
        axes = tuple(v.get_metadata().get("logical_axes", (None,) * len(v.shape)))
        name = ".".join(str(k) for k in path)
        flat.append(spec_for(axes, v.shape, mesh, rules, what=f"parameter {name}",
                             head_dims=_head_dims(cfg)))
    return jax.tree.unflatten(jax.tree.structure(nnx.to_pure_dict(state)), flat)


def param_shardings(abstract_model, mesh: Mesh, rules=None) -> dict:
    """The NamedSharding of every parameter of an (abstract) NNX model, as a pure dict with
    the structure of `params_of(model)`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(abstract_model, mesh, rules),
                        is_leaf=lambda x: isinstance(x, P))


def optimizer_shardings(tx, opt_state_shape, params_sh, mesh: Mesh):
    """Optimizer state shardings: the parameter-shaped parts (Adam moments) follow their
    parameters; everything else (counts) is replicated."""
    rep = NamedSharding(mesh, P())
    if hasattr(tx, "state_shardings"):
        return tx.state_shardings(params_sh, rep)
    return optax.tree_map_params(tx, lambda _, sh: sh, opt_state_shape, params_sh,
                                 transform_non_params=lambda _: rep)


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of arrays or ShapeDtypeStructs with shardings (the
    largest per-device share, for uneven layouts)."""
    per_device: dict = {}
    for leaf in jax.tree.leaves(tree):
        sh = leaf.sharding
        shard = sh.shard_shape(leaf.shape)
        nbytes = math.prod(shard) * jax.numpy.dtype(leaf.dtype).itemsize
        for d in sh.device_set:
            per_device[d] = per_device.get(d, 0) + nbytes
    return max(per_device.values()) if per_device else 0
