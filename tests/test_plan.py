"""`dsv2 plan` (dsv2_jax/plan.py) against the compiler.

The real train step is compiled from abstract shapes on 8 simulated CPU devices (in a
subprocess, as scripts/memory_figures.py does) and its `memory_analysis()` read: arguments +
temporaries (the donated state's outputs alias its arguments). The planner, run for the same
config, mesh and batch with the `cpu` target, must agree with that per-device total within
15%, and its parameter and optimizer bytes must equal the compiled arguments'."""

import json
import math
import os
import subprocess
import sys
import time

import pytest
from procenv import cpu_env

from dsv2_jax import load_config
from dsv2_jax.plan import GB, format_plan, make_plan, max_batch, mesh_sizes, token_shards

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# A small model of V2's proportions (16 experts, top-4, MLA with a q latent).
SMALL = dict(hidden_size=512, vocab_size=8192, intermediate_size=1536, moe_intermediate_size=256,
             n_routed_experts=16, num_experts_per_tok=4, num_attention_heads=8,
             num_key_value_heads=8, kv_lora_rank=128, q_lora_rank=256, qk_rope_head_dim=32,
             qk_nope_head_dim=64, v_head_dim=64, topk_method="greedy", num_device_groups=0,
             max_devices_per_token=0, scan_unroll=1)

# (config, overrides, mesh, global batch, sequence length); bf16 compute, float32 master.
PAIRS = [
    ("v2-lite", dict(num_hidden_layers=4, remat="full"), "fsdp=8", 8, 256),
    ("v2-lite", dict(num_hidden_layers=2, remat="full"), "data=2,expert=4", 8, 256),
    ("v2-lite", dict(num_hidden_layers=2, remat="none"), "fsdp=4,tensor=2", 8, 256),
    ("v2-lite", dict(num_hidden_layers=2, remat="full"), "tensor=8", 8, 256),
    ("tiny", dict(SMALL, num_hidden_layers=3, remat="full"), "fsdp=2,expert=2,tensor=2", 8, 256),
    ("tiny", dict(SMALL, num_hidden_layers=4, remat="dots"), "fsdp=8", 8, 256),
]

_CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from memory_figures import compile_step
from dsv2_jax import load_config
for name, overrides, mesh, batch, seq in json.loads(sys.argv[2]):
    cfg = load_config(name).replace(dtype="bfloat16", **overrides)
    print(json.dumps(compile_step(cfg, mesh, batch, seq)), flush=True)
"""


def _cfg(name, overrides):
    return load_config(name).replace(dtype="bfloat16", **overrides)


def _label(name, overrides):
    what = "small" if name == "tiny" else name
    return f"{what}, {overrides['num_hidden_layers']} layers, remat {overrides['remat']}"


def _compile_pairs():
    """memory_analysis() of the real train step for every pair, in one subprocess."""
    # The session's -O0 LLVM flag leaves memory_analysis() unchanged (the buffers are assigned
    # before code generation; all five figures measured equal) and saves a quarter of the time.
    env = cpu_env(8)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CHILD, os.path.join(ROOT, "scripts"), json.dumps(PAIRS)],
                       env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(s) for s in r.stdout.splitlines() if s.startswith("{")]
    assert len(rows) == len(PAIRS)
    print(f"\ncompiled {len(rows)} train steps in {time.perf_counter() - t0:.0f} s")
    return rows


def _compare(compiled):
    out = []
    for (name, overrides, mesh, batch, seq), m in zip(PAIRS, compiled):
        plan = make_plan(_cfg(name, overrides), mesh, batch, seq, target="cpu")
        measured = m["peak_gb"] * GB  # arguments + outputs - aliased + temporaries
        out.append((name, overrides, mesh, batch, seq, plan, m, measured))
    return out


def _totals_agree(rows):
    print("\n| config | mesh | batch x seq | planner GB | memory_analysis GB (args + temp) | error |")
    print("|---|---|---|---|---|---|")
    for name, overrides, mesh, batch, seq, plan, m, measured in rows:
        err = plan.total / measured - 1
        print(f"| {_label(name, overrides)} | {mesh} | {batch} x {seq} | {plan.total / GB:.2f} | "
              f"{measured / GB:.2f} ({m['argument_gb']:.2f} + {m['temp_gb']:.2f}) | {100 * err:+.1f}% |")
    for name, overrides, mesh, batch, seq, plan, m, measured in rows:
        err = plan.total / measured - 1
        assert abs(err) < 0.15, (name, overrides, mesh, plan.memory, m)


def _state_bytes_are_the_compiled_arguments(rows):
    """Parameters + optimizer state from the rules table equal what the compiled step takes
    as arguments (less the int32 batch): the per-parameter shard factors are the real ones."""
    for name, overrides, mesh, batch, seq, plan, m, measured in rows:
        state = plan.memory["parameters"] + plan.memory["optimizer"]
        batch_bytes = 5 * batch * seq * 4 // token_shards(mesh_sizes(mesh))  # int32 [B, T] x 5
        assert abs(m["argument_gb"] * GB - batch_bytes - state) < 1e-4 * state + 1e4, (mesh, plan.memory)


def _the_comparison_can_fail(rows):
    """Without the gradients, or without the backward's working set, some pair is off by
    more than 15%: the tolerance is tight enough to catch a missing term."""
    for term in ("gradients", "working set"):
        worst = max(abs((plan.total - plan.memory[term]) / measured - 1) for *_, plan, m, measured in rows)
        assert worst > 0.15, term


@pytest.mark.slow
def test_planner_agrees_with_memory_analysis_within_15_percent():
    """The planner's total within 15% of the compiled step's, its state bytes equal to the
    compiled arguments, and a tolerance that catches a missing term. One test over one
    subprocess's six compiles (~2-3 minutes), so that parallel test workers never make them
    twice."""
    rows = _compare(_compile_pairs())
    _totals_agree(rows)
    _state_bytes_are_the_compiled_arguments(rows)
    _the_comparison_can_fail(rows)


def test_plan_runs_instantly_at_any_device_count():
    cfg = load_config("v2").replace(dtype="bfloat16", remat="full")
    t0 = time.perf_counter()
    plan = make_plan(cfg, "data=4,fsdp=64,expert=8,tensor=2", 2048, 4096)
    assert time.perf_counter() - t0 < 10
    assert plan.devices == 4096
    # FSDP and expert axes shard every parameter 512 ways; the data axis replicates.
    one = make_plan(cfg, "fsdp=64,expert=8,tensor=2", 512, 4096)
    assert plan.memory["parameters"] == one.memory["parameters"]
    assert plan.traffic["data"] > 0 and one.traffic["data"] == 0


def test_plan_terms_move_the_right_way():
    cfg = load_config("v2-lite").replace(dtype="bfloat16", remat="full")
    base = make_plan(cfg, "fsdp=8", 8, 4096)
    assert make_plan(cfg, "fsdp=8", 16, 4096).total > base.total
    assert make_plan(cfg.replace(remat="none"), "fsdp=8", 8, 4096).memory["activations"] > \
        10 * base.memory["activations"]
    half = make_plan(cfg, "fsdp=8", 8, 4096, master_dtype="bfloat16").memory["optimizer"]
    assert 0.5 < half / base.memory["optimizer"] < 0.51  # the float32 routers stay float32
    # dropless expert parallelism holds worst-case buffers; a capacity bounds them
    ep = make_plan(cfg, "expert=8", 8, 4096)
    capped = make_plan(cfg.replace(capacity_factor=1.0), "expert=8", 8, 4096)
    assert capped.dispatch["rows_per_destination"] < ep.dispatch["rows_per_destination"]
    assert capped.traffic["expert"] > 0 and base.traffic.get("expert", 0) == 0


def test_no_fit_names_the_largest_term_and_what_would_help():
    cfg = load_config("v2").replace(dtype="bfloat16", remat="full")
    plan = make_plan(cfg, "data=8", 8, 4096)
    assert not plan.fits
    text = format_plan(plan)
    assert "does not fit" in text and f"largest term: {plan.largest}" in text
    assert "would help: --mesh fsdp=8" in text
    assert "would help: --master-dtype bfloat16" in text
    assert max_batch(cfg, "fsdp=16,expert=8", 4096) >= 128


def test_cli_prints_the_table_and_one_line_errors():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    base = [sys.executable, "-m", "dsv2_jax.cli", "plan", "--config", "v2-lite", "--seq-len", "4096"]
    r = subprocess.run(base + ["--mesh", "fsdp=8", "--batch-size", "8", "--set", "dtype=bfloat16",
                               "remat=full"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    for line in ("parameters", "optimizer", "activations", "working set", "total", "fsdp (8)", "fits"):
        assert line in r.stdout
    for bad, why in ((["--mesh", "fsdp=-1", "--batch-size", "8"], "needs --devices"),
                     (["--mesh", "fsdp=8", "--batch-size", "12"], "does not divide"),
                     (["--mesh", "expert=3", "--batch-size", "3"], "n_routed_experts"),
                     (["--mesh", "fsdp=8", "--batch-size", "8", "--device-memory", "lots"], "not a size")):
        r = subprocess.run(base + bad, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert r.returncode == 1 and why in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = subprocess.run(base + ["--mesh", "fsdp=-1", "--devices", "8", "--batch-size", "8"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "(8 devices)" in r.stdout, r.stderr


def test_plan_runs_the_routing_training_runs_on_the_expert_axis():
    """`dsv2 train` maps the config's device groups onto the expert devices (v2: 3 of 8
    groups become 2 of 4 devices on expert=4); the plan's dispatch buffers follow that
    mapping, not the config as written."""
    cfg = load_config("v2").replace(dtype="bfloat16", remat="full", capacity_factor=1.0)
    mesh = {"fsdp": 64, "expert": 4}
    as_given = make_plan(cfg, mesh, 256, 4096)
    mapped = make_plan(cfg.replace(num_device_groups=4, max_devices_per_token=2), mesh, 256, 4096)
    assert as_given.dispatch == mapped.dispatch and as_given.total == mapped.total
    assert cfg.num_device_groups == 8 and cfg.max_devices_per_token == 3


def test_batch_search_end_is_said():
    text = format_plan(make_plan(load_config("tiny"), "fsdp=2", 64, 32, n_devices=2))
    assert "largest batch that fits: at least 8192 (4096 per token shard)" in text


def test_grad_accum_plans_one_micro_batch_and_the_running_gradients():
    """With --grad-accum A the step holds one micro-batch's activations and buffers plus a
    running sum of the gradients: the plan is that of batch / A with one more gradient term,
    and it must divide into whole micro-batches. (Against the compiled step, 2026-12-07,
    `--target cpu`, A = 2: v2-lite 2 layers fsdp=8 16 x 256 9.12 vs 9.46 GB; the small model
    on fsdp=2,expert=2,tensor=2 0.166 vs 0.182, on data=8 0.540 vs 0.486.)"""
    cfg = load_config("v2-lite").replace(dtype="bfloat16", num_hidden_layers=2, remat="full")
    whole = make_plan(cfg, "fsdp=8", 16, 256)
    accum = make_plan(cfg, "fsdp=8", 16, 256, grad_accum=2)
    micro = make_plan(cfg, "fsdp=8", 8, 256)
    assert accum.memory["gradient accumulator"] == whole.memory["gradients"]
    assert accum.total == micro.total + accum.memory["gradient accumulator"]
    assert accum.memory["activations"] < whole.memory["activations"]
    assert "in 2 micro-batches" in format_plan(accum)
    with pytest.raises(ValueError, match="micro-batches"):
        make_plan(cfg, "fsdp=8", 8, 256, grad_accum=2)


def test_plan_needs_no_backend():
    """A plan for an explicit mesh is arithmetic over abstract shapes: it runs where JAX's
    platform is absent (JAX_PLATFORMS names one this machine lacks, so starting any backend
    would fail)."""
    env = dict(os.environ, JAX_PLATFORMS="tpu")
    r = subprocess.run([sys.executable, "-m", "dsv2_jax.cli", "plan", "--config", "v2-lite", "--mesh",
                        "fsdp=4,expert=2", "--batch-size", "8", "--seq-len", "512"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and "per device" in r.stdout, r.stderr


def _lite(**kw):
    return load_config("v2-lite").replace(dtype="bfloat16", remat="full", **kw)


def test_state_terms_are_the_parameters_gradients_and_both_adam_moments():
    """Per device: the gradients are shaped and typed as the parameters, AdamW keeps two
    moments of the same, the running gradient sum under --grad-accum one more copy; the
    embedding table's gradient is held whole over the storage axes ([V/tp, D] in the
    temporaries' dtype) until its reduce-scatter. A term counted once too few or too many
    moves the verdict by gigabytes."""
    for mesh, target, t in (("fsdp=4,tensor=2", "gpu", 2), ("fsdp=8", "cpu", 4)):
        plan = make_plan(_lite(), mesh, 8, 1024, target=target)
        p = plan.memory["parameters"]
        assert plan.memory["gradients"] == p and plan.memory["optimizer"] == 2 * p, plan.memory
        tp = plan.sizes["tensor"]
        assert plan.details["held"]["embedding gradient"] == 102400 // tp * 2048 * t, plan.details["held"]
    # The parameters themselves: the whole model's bytes over the 8 devices of fsdp (every
    # matrix divides), float32 master weights.
    from dsv2_jax.params import count_params

    total, _ = count_params(_lite())
    assert abs(make_plan(_lite(), "fsdp=8", 8, 1024).memory["parameters"] - 4 * total / 8) < 1e-3 * 4 * total / 8


def test_fits_means_at_most_the_device_memory():
    plan = make_plan(_lite(), "fsdp=8", 8, 1024)
    assert make_plan(_lite(), "fsdp=8", 8, 1024, device_memory=plan.total).fits
    assert not make_plan(_lite(), "fsdp=8", 8, 1024, device_memory=plan.total - 1).fits


def test_traffic_is_ring_collective_arithmetic():
    """Bytes one device sends (ring collectives): the data axis all-reduces the gradients
    (2 (n-1)/n of their bytes); fsdp gathers each parameter for the forward and again for the
    recomputing backward under remat, and reduce-scatters its gradient ((n-1)/n each); the
    expert axis moves each MoE layer's dispatch and return buffers in the forward, the
    recomputed forward and the backward. The figures a user picks a mesh by."""
    from dsv2_jax.plan import TARGETS, dispatch_buffers, parameter_table, step_traffic

    cfg = _lite(num_hidden_layers=3)
    c = 2  # bfloat16
    grads = sum(p.stored * (c if p.cast else p.itemsize)
                for p in parameter_table(cfg.replace(param_dtype="float32"), mesh_sizes("data=4")))
    assert make_plan(cfg, "data=2", 8, 256).traffic["data"] == grads  # 2 * S * 1/2
    assert make_plan(cfg, "data=4", 8, 256).traffic["data"] == int(1.5 * grads)  # 2 * S * 3/4
    full = make_plan(cfg, "fsdp=2", 8, 256).traffic["fsdp"]
    none = make_plan(cfg.replace(remat="none"), "fsdp=2", 8, 256).traffic["fsdp"]
    assert full / none == pytest.approx(3 / 2, rel=1e-9)  # 2 gathers + 1 reduce-scatter vs 1 + 1
    assert none == pytest.approx(grads, rel=1e-6)  # (one gather + one reduce-scatter) x S x 1/2
    # The exchange alone (no parameters): 2 MoE layers x 3 passes x ring(send + return).
    sizes = mesh_sizes("expert=4")
    tokens = 2 * 256
    d = dispatch_buffers(cfg, tokens, 2, 4, c, TARGETS["cpu"])
    C, k = d["rows_per_destination"], min(6, 64 // 4)
    assert d["flavor"] == "fixed" and C == tokens
    assert d["buffer_bytes"] == 4 * C * (2048 * c + k * 8) and d["return_bytes"] == 4 * C * 2048 * c
    moved = step_traffic(cfg, [], sizes, 2, 256, c, TARGETS["cpu"])
    assert moved["expert"] == int(2 * 3 * (d["buffer_bytes"] + d["return_bytes"]) * 3 / 4), moved
    assert moved["data"] == moved["fsdp"] == moved["tensor"] == 0


@pytest.mark.parametrize("memory", ["0", "0GB"])
def test_cli_refuses_a_device_memory_of_nothing(memory, capsys):
    """--device-memory 0 is a typo, not a device: one line, no plan printed."""
    from dsv2_jax.cli import main

    assert main(["plan", "--config", "tiny", "--mesh", "fsdp=2", "--batch-size", "2", "--seq-len", "32",
                 "--device-memory", memory]) == 1
    out = capsys.readouterr()
    assert "--device-memory must be positive" in out.err and "per device" not in out.out


def test_cli_refuses_no_devices(capsys):
    """--devices 0 with an axis of -1 would plan a mesh with an axis of size 0 (and divide
    the batch by it): refused in one line, no plan printed."""
    from dsv2_jax.cli import main

    assert main(["plan", "--config", "tiny", "--mesh", "fsdp=-1", "--devices", "0", "--batch-size", "2",
                 "--seq-len", "32"]) == 1
    out = capsys.readouterr()
    assert "--devices must be positive, got 0" in out.err and "per device" not in out.out


def test_cli_defaults_are_one_h100_float32_master_weights_and_the_gpu_target(capsys):
    """Without --device-memory, --master-dtype, --target and --grad-accum the command plans
    for an 80 GB device (80e9 bytes, as the help says: H100), float32 master weights, the
    gpu target and one micro-batch: exactly the plan with those given."""
    from dsv2_jax.cli import main

    argv = ["plan", "--config", "tiny", "--mesh", "fsdp=2", "--batch-size", "2", "--seq-len", "32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    want = make_plan(load_config("tiny"), "fsdp=2", 2, 32, device_memory=80e9, master_dtype="float32",
                     target="gpu", grad_accum=1)
    assert format_plan(want) in out
    assert "target gpu" in out and "master float32" in out and "of 80.00" in out


def test_batch_search_reaches_its_limit_exactly():
    """max_batch searches up to `limit` sequences per token shard inclusive, whatever the
    limit (not only powers of two): the tiny model fits any batch here, so the answer is the
    limit times the token shards."""
    for limit in (100, 5, 64):
        assert max_batch(load_config("tiny"), "fsdp=2", 32, limit=limit, n_devices=2) == 2 * limit, limit


def test_advice_lists_the_four_best_changes_that_lower_the_total():
    """A plan that does not fit lists at most four changes, best first, and only changes
    that bring the total down (a capacity factor changes nothing without an expert axis)."""
    cfg = load_config("v2").replace(dtype="bfloat16", remat="full")
    lines = [line for line in format_plan(make_plan(cfg, "data=8", 8, 4096)).splitlines() if "would help" in line]
    assert len(lines) == 4, lines
    totals = [float(line.split("-> ")[1].split()[0]) for line in lines]
    assert totals == sorted(totals) and not any("capacity_factor" in line for line in lines)
    alone = format_plan(make_plan(cfg, "fsdp=1", 1, 4096, master_dtype="bfloat16", device_memory=1e9))
    assert "would help" not in alone and "also: more devices" in alone  # one sequence: none fewer
    two = format_plan(make_plan(cfg, "fsdp=1", 2, 4096, master_dtype="bfloat16", device_memory=1e9))
    assert "also: fewer sequences per device (now 2 per token shard) or more devices" in two


def test_mesh_moves_keep_the_device_count():
    """The meshes advice tries are the same devices rearranged: an odd axis is not halved."""
    from dsv2_jax.plan import _mesh_moves

    cfg = load_config("v2")
    for spec in ("data=3", "data=6,fsdp=3", "fsdp=5,expert=2", "data=2,fsdp=4"):
        sizes = mesh_sizes(spec)
        moves = list(_mesh_moves(cfg, sizes))
        for why, m in moves:
            assert math.prod(m.values()) == math.prod(sizes.values()), (spec, why, m)


def test_table_shows_what_the_mesh_has():
    """The expert-dispatch block appears only with an expert axis (else one line says there
    is none), the traffic block lists only the axes larger than 1, and every part of a term
    from 5 MB up has its line."""
    cfg = load_config("tiny")
    plan = make_plan(cfg, "fsdp=8", 8, 256)
    text = format_plan(plan)
    assert "expert dispatch, one MoE layer: none (no expert axis" in text and "rows per destination" not in text
    assert "  fsdp (8)" in text and "data (1)" not in text and "tensor (1)" not in text and "expert (1)" not in text
    parts = [(part, b) for d in plan.details.values() for part, b in d.items() if b >= 0.005 * GB]
    assert any(b < 0.05 * GB for _, b in parts)
    for part, b in parts:
        assert f"    {part:36s}{b / GB:10.2f}" in text, part
    ep = format_plan(make_plan(cfg, "fsdp=2,expert=2", 8, 256))
    assert "rows per destination C" in ep and "  expert (2)" in ep


def test_grad_accum_below_one_is_refused():
    with pytest.raises(ValueError, match="--grad-accum 0"):
        make_plan(load_config("tiny"), "fsdp=2", 2, 32, grad_accum=0)
