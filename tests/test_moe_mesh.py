"""The MoE layer on the mesh: per-shard routing and compute, dispatch per destination device
(at most M rows per token), bounded buffers with device-level dropping, the ragged exchange.
The 8-device cases run in a subprocess (moe_mesh_check.py)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv2_jax import DeepseekV2Config, load_config
from batches import token_batch
from procenv import run_python

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("group", ["layer", "capacity", "work"])
def test_moe_on_the_mesh_equals_one_device_and_works_per_shard(group):
    out = run_python(os.path.join(HERE, "moe_mesh_check.py"), 8, group, timeout=1200)
    assert "all ok" in out
    rows = [json.loads(s) for s in out.splitlines() if s.startswith("{")]
    for r in rows:
        print(json.dumps(r))
    assert rows and {r["case"] for r in rows} == {group}
    if group == "work":
        work = {r["mesh"]: r["flops_per_device_over_one_device"] for r in rows}
        assert work["data=8"] < 0.2  # was ~0.67 when every device computed the whole batch's experts
    if group == "layer":
        assert any(r["ragged"] for r in rows)
    if group == "capacity":
        assert all(r["dropped_fraction"] > 0 for r in rows)


def _cfg(**kw):
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
                num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=8, q_lora_rank=None,
                qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=16,
                n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1)
    base.update(kw)
    return DeepseekV2Config(**base)


@pytest.mark.parametrize("groups,keep,devices,limit", [(8, 3, 4, 2), (4, 2, 8, 3), (8, 4, 8, 2), (2, 1, 4, 2)])
def test_group_and_device_limits_together_always_leave_k_allowed_experts(groups, keep, devices, limit):
    from dsv2_jax.moe import select_experts
    from dsv2_jax.moe.routing import group_mask

    cfg = _cfg(topk_method="group_limited_greedy", n_group=groups, topk_group=keep,
               num_device_groups=devices, max_devices_per_token=limit)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    rng = np.random.default_rng(groups * 10 + devices)
    for _ in range(5):
        logits = jnp.asarray(rng.normal(size=(64, E)) * 3, jnp.float32)
        scores = jax.nn.softmax(logits, -1)
        idx, w = select_experts(scores, cfg, train=True)
        idx, w = np.asarray(idx), np.asarray(w)
        allowed_g = np.asarray(group_mask(scores, groups, keep))
        for t in range(64):
            # every chosen expert is in a kept group, on at most `limit` devices, with weight > 0
            assert allowed_g[t, idx[t]].all()
            assert len({int(e) // (E // devices) for e in idx[t]}) <= limit
            assert (w[t] > 0).all() and len(set(idx[t])) == K


def test_limits_that_can_leave_fewer_than_k_experts_are_refused():
    with pytest.raises(ValueError, match="as few as 2 experts remain"):
        # 3 kept groups of 2 experts, but the one device allowed may hold only one of them
        _cfg(topk_method="group_limited_greedy", n_group=8, topk_group=3, num_device_groups=4,
             max_devices_per_token=1)
    with pytest.raises(ValueError, match="must divide one another"):
        _cfg(topk_method="group_limited_greedy", n_group=3, topk_group=2, num_device_groups=4,
             max_devices_per_token=2, n_routed_experts=12)


def test_one_device_rows_and_dropping_statistics():
    """Without a mesh: rows per token = the groups a token reaches; dropping removes whole
    rows; the metrics carry rows per token and the dropped fraction."""
    from flax import nnx

    from dsv2_jax.model import DeepseekV2ForCausalLM
    from dsv2_jax.train.step import ModelFns, loss_and_stats, params_of

    cfg = load_config("tiny", num_hidden_layers=2, capacity_factor=0.5)
    model = DeepseekV2ForCausalLM(cfg, rngs=nnx.Rngs(params=0))
    batch = token_batch(256, 4, 16, seed=0)
    _, stats = loss_and_stats(ModelFns.from_model(model), cfg, params_of(model), batch)
    assert 0 < float(stats["dropped_fraction"]) < 1
    assert 1 <= float(stats["rows_per_token"]) <= cfg.max_devices_per_token
    assert float(stats["rows_per_token_max"]) <= cfg.max_devices_per_token



def test_without_device_groups_each_expert_is_its_own_row():
    """With no device groups and no expert axis, the dispatch counts every expert alone: a
    token is K rows (one per chosen expert), in the metrics and under a capacity, which then
    drops (token, expert) rows rather than whole tokens."""
    from flax import nnx

    from dsv2_jax.model import DeepseekV2ForCausalLM
    from dsv2_jax.train.step import ModelFns, loss_and_stats, params_of

    batch = token_batch(256, 4, 16, seed=1)
    for capacity in (None, 0.5):
        cfg = load_config("tiny", num_hidden_layers=2, num_device_groups=0, max_devices_per_token=0,
                          capacity_factor=capacity)
        model = DeepseekV2ForCausalLM(cfg, rngs=nnx.Rngs(params=0))
        _, stats = loss_and_stats(ModelFns.from_model(model), cfg, params_of(model), batch)
        K = cfg.num_experts_per_tok
        if capacity is None:
            assert float(stats["rows_per_token"]) == K and float(stats["rows_per_token_max"]) == K
            assert float(stats["dropped_fraction"]) == 0
        else:  # rows dropped one (token, expert) at a time: a token may keep several
            assert 0 < float(stats["dropped_fraction"]) < 1
            assert float(stats["rows_per_token"]) < K and float(stats["rows_per_token_max"]) > 1


_LOWER = """
import jax, jax.numpy as jnp
from jax import export
from flax import nnx
from dsv2_jax import load_config
from dsv2_jax.moe import MoE
from dsv2_jax.sharding.mesh import make_mesh
from dsv2_jax.sharding.rules import param_shardings
cfg = load_config("tiny", moe_dispatch="ragged", moe_backend="ragged_dot", num_device_groups=4,
                  max_devices_per_token=2, dtype="bfloat16")
moe = MoE(cfg, rngs=nnx.Rngs(0))
graphdef, state = nnx.split(moe)
mesh = make_mesh("data=2,expert=4")
sh = jax.tree.leaves(param_shardings(moe, mesh))
spec = jax.tree.unflatten(jax.tree.structure(state),
    [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) for a, s in zip(jax.tree.leaves(state), sh)])
x = jax.ShapeDtypeStruct((8, 16, cfg.hidden_size), jnp.bfloat16,
                         sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "expert"))))
def f(state, x):
    def loss(state, x):
        y, r = nnx.merge(graphdef, state)(x, train=True)
        return jnp.sum(y.astype(jnp.float32))
    return jax.grad(loss)(state, x)
checks = [export.DisabledSafetyCheck.custom_call("ragged_all_to_all")]
for platform in ("cuda", "tpu"):
    with jax.set_mesh(mesh):
        exp = export.export(jax.jit(f), platforms=[platform], disabled_checks=checks)(spec, x)
    text = exp.mlir_module()
    assert "ragged_all_to_all" in text, platform
    print(platform, "ok", text.count("ragged_all_to_all"))
"""


def test_ragged_exchange_lowers_for_cuda_and_tpu():
    out = run_python(_LOWER, 8, timeout=1200)
    assert "cuda ok" in out and "tpu ok" in out, out


def test_traffic_figures_at_v2_shape():
    """Dispatch buffers per device at V2's shape (4096 tokens per device, bf16): one row per
    destination device instead of one per (token, expert)."""
    from dsv2_jax.moe import traffic_figures

    v2 = load_config("v2")
    for ep, limit in ((8, 3), (32, 6)):
        cfg = v2.replace(num_device_groups=ep, max_devices_per_token=limit, capacity_factor=1.0)
        dropless = traffic_figures(cfg, 4096, ep, 2, dropping=False)
        capped = traffic_figures(cfg, 4096, ep, 2, dropping=True)
        print(ep, {k: v / 1e6 if "bytes" in k else v for k, v in dropless.items()},
              capped["buffer_bytes"] / 1e6)
        assert dropless["buffer_bytes"] * 5 < dropless["per_expert_scheme_buffer_bytes"]
        assert capped["buffer_bytes"] < dropless["buffer_bytes"]



def test_traffic_figures_by_hand():
    """The buffer sizes worked out by hand at a small shape: 16 experts on ep = 8 devices (2
    each, so a row carries k = min(K = 4, 2) = 2 expert slots of id + weight, 8 bytes each,
    beside D = 16 bf16 values), at most M = 3 devices per token, 64 tokens per device.
    Dropless: 64 rows per destination; capacity 1.25: ceil(1.25 * 64 * 3 / 8) = 30, plus the
    protected tokens (one of 2 sequences of 32 at never_drop_fraction 0.5), at most 64."""
    from dsv2_jax.moe import traffic_figures

    cfg = _cfg(num_device_groups=8, max_devices_per_token=3, capacity_factor=1.25, never_drop_fraction=0.0)
    row = 16 * 2 + 2 * 8
    per_expert = 8 * 64 * 4 * (16 * 2 + 4)
    assert traffic_figures(cfg, 64, 8, 2, dropping=False) == {
        "rows_per_destination": 64, "buffer_bytes": 8 * 64 * row, "max_rows_per_token": 3,
        "per_expert_scheme_buffer_bytes": per_expert}
    assert traffic_figures(cfg, 64, 8, 2, dropping=True)["buffer_bytes"] == 8 * 30 * row
    half = cfg.replace(never_drop_fraction=0.5)
    assert traffic_figures(half, 64, 8, 2, dropping=True, batch=2)["rows_per_destination"] == 30 + 32
    assert traffic_figures(cfg.replace(capacity_factor=4.0), 64, 8, 2, dropping=True)["rows_per_destination"] == 64


def test_the_exchange_is_ragged_only_on_gpu_and_tpu_when_dropless(monkeypatch):
    """`a2a_flavor`: XLA:CPU has no ragged_all_to_all, so CPU is always `fixed`; on GPU/TPU a
    capacity keeps the small fixed buffers (`fixed`) and dropless dispatch sends exactly its
    rows (`ragged`); a moe_dispatch the config names wins everywhere. (The platform is what
    `jax.default_backend` answers; it is set here to each one in turn.)"""
    from dsv2_jax.moe.dispatch import a2a_flavor

    auto = _cfg(moe_dispatch="auto")
    for platform, dropping, want in [("cpu", False, "fixed"), ("cpu", True, "fixed"),
                                     ("gpu", False, "ragged"), ("gpu", True, "fixed"),
                                     ("tpu", False, "ragged"), ("tpu", True, "fixed")]:
        monkeypatch.setattr(jax, "default_backend", lambda p=platform: p)
        assert a2a_flavor(auto, dropping) == want, (platform, dropping)
        assert a2a_flavor(auto.replace(moe_dispatch="ragged"), dropping) == "ragged"
        assert a2a_flavor(auto.replace(moe_dispatch="fixed"), dropping) == "fixed"


_RULE_SETS = r"""
import jax, jax.numpy as jnp
from flax import nnx
from dsv2_jax import load_config
from dsv2_jax.moe import MoE
from dsv2_jax.sharding.mesh import make_mesh
from dsv2_jax.sharding.rules import RULES, param_shardings, use_rules

cfg = load_config("tiny").replace(hidden_size=32, moe_intermediate_size=16, n_routed_experts=4,
                                  num_experts_per_tok=2, n_group=1, topk_group=1,
                                  capacity_factor=None, moe_backend="blocked")
moe = MoE(cfg, rngs=nnx.Rngs(params=1))
graphdef, state = nnx.split(moe)
x = jax.random.normal(jax.random.key(2), (2, 5, cfg.hidden_size), jnp.float32)
f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=True)[0])
want = f(state, x)
mesh = make_mesh("tensor=2")
for name, rules in [("default", RULES), ("width whole", dict(RULES, moe_mlp=())),
                    ("embed on tensor", dict(RULES, embed=("tensor",)))]:
    with use_rules(rules), jax.set_mesh(mesh):
        shardings = jax.tree.leaves(param_shardings(moe, mesh))
        placed = jax.tree.unflatten(jax.tree.structure(state), [
            jax.device_put(a, s) for a, s in zip(jax.tree.leaves(state), shardings)])
        try:  # a new jit each time: the rules are read while tracing
            got = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, train=True)[0])(placed, x)
        except ValueError as e:
            print(f"{name}: refused:", str(e).splitlines()[0])
            continue
    print(f"{name}: error", float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))))
"""


def test_a_rule_set_decides_what_the_experts_outputs_are_summed_over():
    """`use_rules` lets a user shard differently with no model change. The routed experts'
    partial outputs are summed over the mesh axes their width is split over as the rules
    place it, not over the tensor axis whenever the mesh has one: a rule set leaving the
    width whole on a tensor mesh had every output summed twice (silently wrong losses). A
    rule set splitting gate/up and down differently is refused, naming moe_mlp."""
    out = run_python(_RULE_SETS, 2, timeout=600)
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    for name in ("default", "width whole"):
        assert lines[name].startswith("error") and float(lines[name].split()[-1]) < 1e-5, out
    assert lines["embed on tensor"].startswith("refused") and "moe_mlp" in lines["embed on tensor"], out
