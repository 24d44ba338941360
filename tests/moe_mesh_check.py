"""Run by tests/test_moe_mesh.py with 8 simulated CPU devices: the MoE layer on the mesh.

* dropless dispatch == one device (forward, router outputs, gradients of x and every weight)
  on expert=2/4/8 with data or fsdp beside, tensor beside, one expert per device, skewed
  routing, and the ragged exchange (emulated: XLA:CPU has no ragged_all_to_all), which moves
  and computes exactly the rows (`Moved`); a capacity with every token protected drops none;
* with a capacity: the training loss, its statistics and gradients == one device simulating
  the same token shards; no token reaches more than M devices; the exchanged buffers hold
  the rows per destination that `traffic_figures` (and the plan) state;
* per-device work: the compiled step's MoE works on local rows only (no [tokens, E] array
  or routed-row array of the global batch) and its FLOPs fall with the device count.

Prints one JSON line per case, then "all ok". Arguments name groups of cases (CASES); none runs
all of them.
"""

import contextlib
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from compare import rel, tree_rel
from dsv2_jax import load_config
from dsv2_jax.moe import (MoE, dispatch, emulate_ragged_all_to_all, simulate_token_shards,
                          traffic_figures)
from dsv2_jax.sharding.mesh import batch_sharding, make_mesh
from dsv2_jax.sharding.rules import param_shardings
from dsv2_jax.train.step import ModelFns, loss_and_stats, params_of

TOL = 2e-5


def moe_cfg(ep, **kw):
    base = dict(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3,
                topk_method="greedy", n_group=1, topk_group=1, n_shared_experts=1,
                num_device_groups=ep if ep > 1 else 0,
                max_devices_per_token=min(ep, max(2, -(-3 // (8 // ep)))) if ep > 1 else 0,
                capacity_factor=None, moe_backend="blocked")
    base.update(kw)
    return load_config("tiny").replace(**base)


class Moved:
    """Counts what the ragged exchange moves and what the receiving side computes: wraps the
    exchange in use (`emulate_ragged_all_to_all`'s on CPU, whose XLA has none) and
    `dispatch._receive_compute`, each noting its rows per device and call through
    `jax.debug.callback`. Dropless, each (token, device) row crosses each of the exchanges
    once and is computed once, so the records average rows / token shards: an exchange that
    sends whole buffers, or a receiver computing its unwritten rows, gives more."""

    def __init__(self):
        self.sent, self.computed = [], []

    def __enter__(self):
        impl = dispatch._RAGGED_IMPL.get() or jax.lax.ragged_all_to_all
        self._compute = compute = dispatch._receive_compute

        def ragged(operand, output, in_off, send_sizes, out_off, recv_sizes, *, axis_name):
            jax.debug.callback(lambda n: self.sent.append(int(n)), jnp.sum(send_sizes))
            return impl(operand, output, in_off, send_sizes, out_off, recv_sizes, axis_name=axis_name)

        def receive(rows, ids, wts, w_gate, *rest):
            real = jnp.sum(jnp.any(ids < w_gate.shape[0], axis=1))  # rows holding an expert here
            jax.debug.callback(lambda n: self.computed.append(int(n)), real)
            return compute(rows, ids, wts, w_gate, *rest)

        dispatch._receive_compute = receive
        self._token = dispatch._RAGGED_IMPL.set(ragged)
        return self

    def __exit__(self, *exc):
        dispatch._RAGGED_IMPL.reset(self._token)
        dispatch._receive_compute = self._compute

    def check(self, rows: int, shards: int, spec):
        jax.effects_barrier()
        for name, got in (("sent", self.sent), ("computed", self.computed)):
            assert got and sum(got) * shards == len(got) * rows, (spec, name, rows, shards, got)


def layer_case(spec, B=8, T=9, skew=False, ragged=False, train=True, **kw):
    mesh = make_mesh(spec)
    ep = dict(mesh.shape)["expert"]
    cfg = moe_cfg(ep, **kw)
    moe = MoE(cfg, rngs=nnx.Rngs(params=1))
    graphdef, state = nnx.split(moe)
    x = jax.random.normal(jax.random.key(2), (B, T, cfg.hidden_size), jnp.float32)
    if skew:  # every token's top experts are 0..K-1
        x = x.at[..., 0].set(4.0)
        k = state["gate"]["kernel"]
        state["gate"]["kernel"] = k.replace(k[...].at[0, :cfg.num_experts_per_tok].set(1.0))
    valid = jnp.ones((B, T), bool).at[-1, -3:].set(False)  # a few padding tokens
    ct = jax.random.normal(jax.random.key(3), x.shape, jnp.float32)

    def f(state, x):
        y, r = nnx.merge(graphdef, state)(x, train=train, valid=valid)
        aux = jnp.sum(r.scores * r.topk_weight.sum()) * 1e-2
        return jnp.sum(y * ct) + aux, (y, r)

    g = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
    (l1, (y1, r1)), (gs1, gx1) = g(state, x)
    psh = jax.tree.leaves(param_shardings(moe, mesh))
    state_m = jax.tree.unflatten(jax.tree.structure(state),
                                 [jax.device_put(a, s) for a, s in zip(jax.tree.leaves(state), psh)])
    shards = np.prod([dict(mesh.shape)[a] for a in ("data", "fsdp", "expert")])
    x_m = jax.device_put(x, batch_sharding(mesh)) if B % shards == 0 else x  # else padded inside
    graphdef_r = nnx.graphdef(MoE(cfg.replace(moe_dispatch="ragged"), rngs=nnx.Rngs(params=1))) \
        if ragged else graphdef

    def f2(state, x):
        y, r = nnx.merge(graphdef_r, state)(x, train=train, valid=valid)
        aux = jnp.sum(r.scores * r.topk_weight.sum()) * 1e-2
        return jnp.sum(y * ct) + aux, (y, r)

    g2 = jax.jit(jax.value_and_grad(f2, argnums=(0, 1), has_aux=True))
    moved = Moved() if ragged else contextlib.nullcontext()
    with jax.set_mesh(mesh), emulate_ragged_all_to_all(), moved:
        compiled = g2.lower(state_m, x_m).compile()  # compiled once, called and read
        (l2, (y2, r2)), (gs2, gx2) = compiled(state_m, x_m)
        hlo = compiled.as_text()
    if ragged:
        moved.check(int(np.asarray(r2.rows).sum()), shards, spec)
    np.testing.assert_array_equal(np.asarray(r1.topk_idx), np.asarray(r2.topk_idx))
    if skew:
        assert (np.sort(np.asarray(r1.topk_idx), axis=1) == np.arange(cfg.num_experts_per_tok)).all()
    err = {"y": rel(y2, y1), "loss": rel(l2, l1), "dx": rel(gx2, gx1),
           "dparams": tree_rel(gs2, gs1),
           "counts": rel(r2.expert_counts, r1.expert_counts)}
    assert max(err.values()) <= TOL, (spec, err)
    if ep > 1:
        assert "all-to-all" in hlo, spec
    # M: the devices a token may reach (each expert is its own group without an expert axis).
    M = cfg.max_devices_per_token if ep > 1 else cfg.num_experts_per_tok
    rows = np.asarray(r2.rows)
    assert rows.max() <= M and rows[np.asarray(valid).reshape(-1)].min() >= 1, (spec, rows.max())
    assert (rows[~np.asarray(valid).reshape(-1)] == 0).all()  # padding is never sent
    print(json.dumps({"case": "layer", "mesh": spec, "skew": skew, "ragged": ragged, "errors": err,
                      "rows_per_token_mean": float(rows[np.asarray(valid).reshape(-1)].mean()),
                      "rows_per_token_max": int(rows.max())}), flush=True)


def batch(B=8, T=16, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, (B, T + 1))
    return {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
            "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.int32)}


def capacity_case(spec, factor=0.6, B=None, T=16):
    """The training loss with dropping on the mesh == one device simulating its token shards
    (B sequences, by default two per shard; a B that does not divide leaves each shard parts
    of sequences)."""
    mesh = make_mesh(spec)
    sizes = dict(mesh.shape)
    ep = sizes["expert"]
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    cfg = moe_cfg(ep, num_hidden_layers=2, capacity_factor=factor, never_drop_fraction=0.3,
                  comm_aux_loss_alpha=0.02, device_aux_loss_alpha=0.05, seq_aux=True)
    from dsv2_jax.model import DeepseekV2ForCausalLM

    model = DeepseekV2ForCausalLM(cfg, rngs=nnx.Rngs(params=4))
    fns, params = ModelFns.from_model(model), params_of(model)
    data = batch(B=B or 2 * shards, T=T)

    def vg(p, b):
        (loss, stats), grads = jax.value_and_grad(lambda p: loss_and_stats(fns, cfg, p, b), has_aux=True)(p)
        return loss, stats, grads

    with simulate_token_shards(shards):
        l1, s1, g1 = jax.jit(vg)(params, data)
    p_m = jax.device_put(params, param_shardings(model, mesh))
    b_m = jax.device_put(data, batch_sharding(mesh)) if len(data["inputs"]) % shards == 0 else data
    with jax.set_mesh(mesh):
        compiled = jax.jit(vg).lower(p_m, b_m).compile()
        l2, s2, g2 = compiled(p_m, b_m)
    err = {"loss": rel(l2, l1), "grads": tree_rel(g2, g1)}
    for k in ("ce", "expert_loss", "device_loss", "comm_loss", "dropped_fraction", "rows_per_token",
              "load_max_over_mean", "load_min_over_mean"):  # the last two read the [E] counts
        err[k] = rel(s2[k], s1[k])
    if ep > 1:  # every buffer the exchange moves holds the rows the capacity sizes, not T
        seqs = len(data["inputs"])
        tokens, per_shard = seqs * T // shards, seqs // shards if seqs % shards == 0 else 1
        C = traffic_figures(cfg, tokens, ep, 4, dropping=True, batch=per_shard)["rows_per_destination"]
        results = [line.split(" all-to-all(")[0] for line in compiled.as_text().splitlines()
                   if " all-to-all(" in line]  # [.., C, D] rows / [.., C, k] ids and weights
        rows = {int(m.group(1)) for r in results for m in re.finditer(r"\w+\[\d+,(\d+),\d+\]", r)}
        assert rows == {C} and C < tokens, (spec, C, rows)
    assert float(s1["dropped_fraction"]) > 0.01, float(s1["dropped_fraction"])
    assert max(err.values()) <= TOL, (spec, err)
    print(json.dumps({"case": "capacity", "mesh": spec, "dropped_fraction": float(s2["dropped_fraction"]),
                      "rows_per_token": float(s2["rows_per_token"]), "errors": err}), flush=True)


def work_case(spec):
    """Per-device MoE work on the mesh: local rows only, FLOPs ~ 1/devices of one device's."""
    cfg = moe_cfg(1, num_hidden_layers=2, num_device_groups=0, max_devices_per_token=0,
                  hidden_size=128, moe_intermediate_size=64)
    mesh = make_mesh(spec)
    ep = dict(mesh.shape)["expert"]
    if ep > 1:
        cfg = cfg.replace(num_device_groups=ep, max_devices_per_token=min(2, ep))
    from dsv2_jax.model import DeepseekV2ForCausalLM

    model = DeepseekV2ForCausalLM(cfg, rngs=nnx.Rngs(params=4))
    fns, params = ModelFns.from_model(model), params_of(model)
    B, T = 16, 64
    data = batch(B=B, T=T)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok

    def vg(p, b):
        return jax.value_and_grad(lambda p: loss_and_stats(fns, cfg, p, b), has_aux=True)(p)

    def flops(c):
        cost = c.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return float(cost["flops"])

    one = flops(jax.jit(vg).lower(params, data).compile())
    p_m = jax.device_put(params, param_shardings(model, mesh))
    b_m = jax.device_put(data, batch_sharding(mesh))
    with jax.set_mesh(mesh):
        compiled = jax.jit(vg).lower(p_m, b_m).compile()
    hlo = compiled.as_text()
    n = 8
    # No array of the global batch's router scores [B*T, E] or routed rows [B*T*K, ...].
    bad = [line.strip()[:160] for line in hlo.splitlines()
           if re.search(rf"\[{B * T},{E}\]|\[{B * T * K}[,\]]", line)]
    assert not bad, (spec, bad[:3])
    ratio = flops(compiled) / one
    print(json.dumps({"case": "work", "mesh": spec, "flops_per_device_over_one_device": ratio}), flush=True)
    assert ratio < 2.0 / n, (spec, ratio)


def layer_cases():
    layer_case("fsdp=2,expert=4")
    layer_case("expert=8", skew=True)          # one expert per device, every token to one device
    layer_case("fsdp=2,expert=2,tensor=2", ragged=True)
    layer_case("expert=4,data=2", ragged=True, skew=True)
    layer_case("data=8", train=False)
    layer_case("data=2,expert=4", B=2, T=7)     # 14 tokens over 8 shards: padded
    layer_case("data=2,expert=4", B=1, T=7)     # padded to 8 tokens, as many as the experts
    # A capacity with every token protected: nothing dropped, so the buffers must hold a
    # shard's every token where one destination gets them all (skew: experts 0..2 on two).
    layer_case("expert=4,data=2", skew=True, capacity_factor=0.5, never_drop_fraction=1.0)


def capacity_cases():
    capacity_case("data=2,expert=4")
    capacity_case("expert=8", factor=1.0)
    capacity_case("fsdp=4,tensor=2")           # simulated device groups, no expert axis
    capacity_case("data=2,expert=4", B=20, T=2)  # 5 tokens a shard, parts of sequences


def work_cases():
    work_case("data=8")
    work_case("data=2,expert=4")


# Groups of cases a test can run apart (one process each, so that parallel test workers can
# share them out).
CASES = {"layer": layer_cases, "capacity": capacity_cases, "work": work_cases}


def main(groups):
    """Runs the named groups of cases (all of them without arguments)."""
    assert jax.device_count() == 8, jax.devices()
    for g in groups or CASES:
        CASES[g]()
    print("all ok")


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
