"""Run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices.

For each mesh: the training loss, its router statistics and the gradient of every parameter
(float32) equal the one-device values, and the work and memory are split as the rules table
says. Prints one JSON line per mesh with the measured figures, then "all ok". Arguments name
the meshes to check (a test can share them out over processes); none checks all of MESHES.
"""

import json
import sys

import jax
import numpy as np
from flax import nnx

from compare import rel, tree_rel
from dsv2_jax import load_config
from dsv2_jax.model import DeepseekV2ForCausalLM
from dsv2_jax.sharding.mesh import batch_sharding, make_mesh
from dsv2_jax.sharding.rules import param_shardings, shard_bytes
from dsv2_jax.train.step import ModelFns, loss_and_stats, params_of

MESHES = ["data=8", "fsdp=8", "fsdp=4,tensor=2", "tensor=8", "data=2,expert=4",
          "fsdp=2,expert=2,tensor=2"]


def config():
    # 8 heads and 8 experts so that tensor=8 and expert=4 divide; two MoE layers.
    return load_config("tiny").replace(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8, num_device_groups=0,
                                       max_devices_per_token=0, capacity_factor=None, ce_chunk=5)


def batch(B=8, T=13, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 256, (B, T + 1))
    seg = np.where(np.arange(T)[None] < rng.integers(3, T, (B, 1)), 1, 2)  # two packed docs
    pos = np.where(seg == 1, np.arange(T)[None], np.arange(T)[None] - (seg == 2).argmax(1)[:, None])
    return {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
            "positions": pos.astype(np.int32), "segment_ids": seg.astype(np.int32),
            "loss_mask": (rng.random((B, T)) > 0.1).astype(np.int32)}


def main(meshes):
    assert jax.device_count() == 8, jax.devices()
    cfg = config()
    model = DeepseekV2ForCausalLM(cfg, rngs=nnx.Rngs(params=3))
    fns, params = ModelFns.from_model(model), params_of(model)
    data = batch()

    def f(p, b):
        loss, stats = loss_and_stats(fns, cfg, p, b)
        return loss, stats

    def vg(p, b):  # as the train step takes gradients: laid out like the parameters
        out, grads = jax.value_and_grad(f, has_aux=True)(p, b)
        return out, fns.constrain(grads)

    g = jax.jit(vg)
    logits_fn = jax.jit(lambda p, b: fns.model(p)(b["inputs"], b["positions"], b["segment_ids"]))
    one = g.lower(params, data).compile()  # compiled once, called and measured
    (l1, s1), g1 = one(params, data)
    logits1 = logits_fn(params, data)
    total_param_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
    one_cost = one.cost_analysis()
    one_flops = float((one_cost[0] if isinstance(one_cost, list) else one_cost)["flops"])
    for spec in meshes or MESHES:
        mesh = make_mesh(spec)
        psh = param_shardings(model, mesh)
        p_m = jax.device_put(params, psh)
        b_m = jax.device_put(data, batch_sharding(mesh))
        with jax.set_mesh(mesh):
            compiled = g.lower(p_m, b_m).compile()
            (l2, s2), g2 = compiled(p_m, b_m)
            logits2 = logits_fn(p_m, b_m)
        hlo = compiled.as_text()
        err = {"loss": rel(l2, l1), "logits": rel(logits2, logits1),
               "grads": tree_rel(g2, g1)}
        for k in ("expert_loss", "load_max_over_mean", "tokens"):
            err[k] = rel(s2[k], s1[k])
        assert max(err.values()) <= 1e-5, (spec, err)
        # Every gradient comes back with its parameter's sharding (reduce-scattered, not
        # replicated and sliced later).
        for a, sh in zip(jax.tree.leaves(g2), jax.tree.leaves(psh)):
            assert a.sharding.is_equivalent_to(sh, a.ndim), (spec, a.sharding, sh)
        per_dev = shard_bytes(p_m)
        sizes = dict(mesh.shape)
        split = sizes["fsdp"] * sizes["expert"]
        if spec == "fsdp=8":
            assert "all-gather" in hlo and "reduce-scatter" in hlo, "FSDP collectives missing"
        for path, a in jax.tree_util.tree_leaves_with_path(p_m):
            name = jax.tree_util.keystr(path)
            if split > 1 and a.size >= 1024:
                # FSDP: nothing large is replicated (every parameter of >= 1024 elements).
                assert not a.sharding.is_fully_replicated, (spec, name)
            if sizes["tensor"] > 1 and any(k in name for k in ("q_b_proj", "kv_b_proj", "o_proj",
                                                               "experts", "lm_head", "embed")):
                # Tensor parallelism: heads, MLP widths and the vocabulary are split.
                assert "tensor" in str(a.sharding.spec), (spec, name, a.sharding.spec)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        mem = compiled.memory_analysis()
        print(json.dumps({"mesh": spec, "errors": err, "param_bytes_per_device": per_dev,
                          "param_bytes_total": total_param_bytes,
                          "flops_per_device": cost.get("flops") if cost else None,
                          "flops_one_device": one_flops,
                          "temp_bytes": getattr(mem, "temp_size_in_bytes", None)}), flush=True)
    print("all ok")


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
