"""The DeepSeekMoE layer: shared experts plus fine-grained routed experts.

    y = shared(u) + sum_{i in topK(s)} g_i * FFN_i(u),   s = softmax(u . e) in float32

On a mesh the routed part runs per token shard inside ONE `shard_map` over the token axes
(data x fsdp x expert), whatever the mesh: each device routes, sorts and computes only its
own tokens (`dispatch.shard_forward`); experts split over `expert` are reached by an
exchange, their width split over `tensor` is summed back. Without a mesh the same function
runs on the whole batch as one shard. The shared experts are a dense SwiGLU outside it.

Shapes: B batch, T sequence, D hidden, E routed experts, F expert width.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from dsv2_jax.config import DeepseekV2Config
from dsv2_jax.layers import MLP, dtype_of, normal_param
from dsv2_jax.moe.dispatch import ShardSpec, a2a_flavor, shard_forward
from dsv2_jax.moe.gmm import gmm_backend
from dsv2_jax.moe.routing import Router, RouterOutput

EXPERT_AXES = ("exp", "embed", "moe_mlp")
EXPERT_DOWN_AXES = ("exp", "moe_mlp", "embed")


class Experts(nnx.Module):
    def __init__(self, cfg: DeepseekV2Config, *, rngs: nnx.Rngs):
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        pdt, std = dtype_of(cfg.param_dtype), cfg.initializer_range
        self.gate_proj = normal_param(rngs, (E, D, F), std, pdt, EXPERT_AXES)
        self.up_proj = normal_param(rngs, (E, D, F), std, pdt, EXPERT_AXES)
        self.down_proj = normal_param(rngs, (E, F, D), std, pdt, EXPERT_DOWN_AXES)


_SIMULATED_SHARDS = contextvars.ContextVar("dsv2_moe_simulated_shards", default=1)


@contextlib.contextmanager
def simulate_token_shards(n: int):
    """Without a mesh, run the routed experts as n token shards (each routing, capping and
    dropping its own tokens, as n devices would): the one-device reference that a mesh run
    with n token shards must equal. For tests and checks; training never needs it."""
    token = _SIMULATED_SHARDS.set(n)
    try:
        yield
    finally:
        _SIMULATED_SHARDS.reset(token)


def _sequences_per_shard(batch: int, shards: int) -> int:
    """Whole sequences on each of `shards` token shards; a shard holding parts of sequences
    counts its tokens as one (no protected sequences there, `never_drop_tokens`). When the
    batch divides, so do its tokens: no padding then."""
    return batch // shards if batch % shards == 0 else 1


def _mesh_sizes(mesh) -> dict:
    return {} if mesh.empty else {a: int(n) for a, n in dict(mesh.shape).items()}


def routed_moe(x, valid, router_kernel, w_gate, w_up, w_down, cfg: DeepseekV2Config, *,
               train: bool, batch: int, layer=None):
    """Routed experts of a layer: x [N, D] tokens (batch whole sequences), valid [N] ->
    (y [N, D], RouterOutput over the N tokens). Under the ambient mesh (`jax.set_mesh`) one
    shard_map over the token axes; without one a single shard. With `layer`, w_* are the
    segment's stacks [L, E, ...] and layer `layer` of them is used: read from the stacks on
    one shard (no copy of the layer's experts), sliced out first otherwise."""
    from dsv2_jax.sharding.rules import batch_axes, gather_local, storage_split

    dtype = dtype_of(cfg.dtype)
    backend = gmm_backend(cfg)
    E = cfg.n_routed_experts
    dropping = train and cfg.capacity_factor is not None
    mesh = jax.sharding.get_abstract_mesh()
    sizes = _mesh_sizes(mesh)
    one_shard = (not sizes or math.prod(sizes.values()) == 1)
    n = _SIMULATED_SHARDS.get() if one_shard else 0
    if layer is not None and n != 1:  # only a single shard reads the stacks
        w_gate, w_up, w_down = (jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False)
                                for w in (w_gate, w_up, w_down))
        layer = None
    if one_shard:
        # Stacks are cast per window as they are read, one layer's experts here.
        w = ((w_gate, w_up, w_down) if layer is not None else
             (w_gate.astype(dtype), w_up.astype(dtype), w_down.astype(dtype)))
        spec = ShardSpec(cfg, train, _sequences_per_shard(batch, n), backend, "fixed", None, 1, (),
                         None)
        if n == 1:
            return shard_forward(x, valid, router_kernel, *w, spec, layer=layer)
        N = x.shape[0]
        ys, rs = jax.vmap(lambda xs, vs: shard_forward(xs, vs, router_kernel, *w, spec))(
            x.reshape(n, N // n, -1), valid.reshape(n, N // n))
        rs = jax.tree.map(lambda a: a.reshape((N,) + a.shape[2:]), rs.replace(
            expert_counts=jnp.broadcast_to(rs.expert_counts.sum(0), (n, N // n, E))))
        return ys.reshape(N, -1), rs.replace(expert_counts=rs.expert_counts[0])
    token_axes = batch_axes(mesh)
    shards = math.prod(sizes[a] for a in token_axes)
    ep = sizes.get("expert", 1)
    if E % ep:
        raise ValueError(f"n_routed_experts={E} is not divisible by the expert axis ({ep})")
    N = x.shape[0]
    pad = -N % shards
    if pad:  # padding tokens are never sent nor counted
        x = jnp.pad(x, ((0, pad), (0, 0)))
        valid = jnp.pad(valid, (0, pad))
    r_spec, _, r_gather = storage_split(("embed", "router"), router_kernel.shape, mesh)
    w_spec, w_use, w_gather = storage_split(EXPERT_AXES, w_gate.shape, mesh)
    d_spec, d_use, d_gather = storage_split(EXPERT_DOWN_AXES, w_down.shape, mesh)
    spec = ShardSpec(cfg, train, _sequences_per_shard(batch, shards), backend, a2a_flavor(cfg, dropping),
                     "expert" if ep > 1 else None, ep, token_axes, _width_axes(w_use, d_use))

    def body(x, valid, rk, wg, wu, wd):
        # Cast before gathering: the weights travel in the compute dtype.
        rk = gather_local(rk, r_gather)
        wg, wu = gather_local(wg.astype(dtype), w_gather), gather_local(wu.astype(dtype), w_gather)
        wd = gather_local(wd.astype(dtype), d_gather)
        return shard_forward(x, valid, rk, wg, wu, wd, spec)

    tok = P(token_axes)
    out_router = RouterOutput(tok, tok, tok, tok, P(), tok, tok, tok)
    y, router = jax.shard_map(body, in_specs=(tok, tok, r_spec, w_spec, w_spec, d_spec),
                              out_specs=(tok, out_router))(x, valid, router_kernel, w_gate, w_up, w_down)
    if pad:
        y = y[:N]
        # every per-token field back to the layer's tokens; the [E] counts are global
        counts = router.expert_counts
        router = jax.tree.map(lambda a: a[:N], router.replace(expert_counts=None))
        router = router.replace(expert_counts=counts)
    return y, router


def _width_axes(gate_use: P, down_use: P) -> tuple[str, ...] | None:
    """The mesh axes the routed experts' width (moe_mlp) stays split over once gathered for
    use, which each shard's partial outputs are summed over: read from the specs the rules
    give, not assumed from the mesh (a rule set that leaves the width whole on a tensor mesh
    would otherwise have its outputs summed tensor-size times). gate/up [exp, embed, moe_mlp]
    and down [exp, moe_mlp, embed] must split the width alike and keep embed whole."""
    from dsv2_jax.sharding.rules import entry_axes

    def axes(use, dim):
        return entry_axes((tuple(use) + (None,) * 3)[dim])

    width = axes(gate_use, 2)
    if width != axes(down_use, 1) or axes(gate_use, 1) or axes(down_use, 2):
        raise ValueError(
            f"the sharding rules split the routed experts as gate/up {gate_use} and down "
            f"{down_use} once gathered: their moe_mlp width must be split over the same mesh "
            "axes in both and their embed dimension only over storage (FSDP) axes")
    return width or None


class MoE(nnx.Module):
    def __init__(self, cfg: DeepseekV2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.gate = Router(cfg, rngs=rngs)
        self.experts = Experts(cfg, rngs=rngs)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, rngs=rngs,
                std=cfg.initializer_range, dtype=dtype_of(cfg.dtype),
                param_dtype=dtype_of(cfg.param_dtype), hidden_axis="moe_mlp")
            if cfg.n_shared_experts else None)

    def __call__(self, x, *, train: bool = False, valid=None, stacked=None):
        """x [B, T, D], valid [B, T] bool (False at padding; None: all real)
        -> (y [B, T, D], RouterOutput over the B*T tokens).

        stacked: None, or (experts, i) with `experts` the segment's stacked `Experts`
        (leading layer axis) and i this layer's index in it: the routed experts are read
        from the stacks instead of this module's own (a layer's slice of them), which a
        scan over the segment would copy out whole (`LayerStack`, forward passes)."""
        B, T, D = x.shape
        xt = x.reshape(B * T, D)
        vt = jnp.ones(B * T, bool) if valid is None else valid.reshape(-1)
        e, layer = (self.experts, None) if stacked is None else stacked
        y, r = routed_moe(xt, vt, self.gate.kernel[...], e.gate_proj[...], e.up_proj[...],
                          e.down_proj[...], self.cfg, train=train, batch=B, layer=layer)
        if self.shared_experts is not None:
            y = y + self.shared_experts(xt)
        return y.reshape(B, T, D), r


def expert_parallel_size() -> int:
    """Size of the `expert` axis of the ambient mesh (`jax.set_mesh`); 1 without one."""
    sizes = _mesh_sizes(jax.sharding.get_abstract_mesh())
    return sizes.get("expert", 1)
