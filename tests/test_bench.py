"""`dsv2 bench`: the smoke run works end to end and its report lands in the doc block.
No speed is asserted here (machines are shared); the figures are in docs/benchmarks.md."""

import os
import subprocess
import sys
import types

import numpy as np
import pytest

from dsv2_jax import benchmark as B


def test_doc_block_is_replaced_not_appended(tmp_path):
    doc = tmp_path / "b.md"
    doc.write_text("# Measured figures\n\nkept above\n")
    res = {"ceilings": {"matmul_gflops": 100.0, "read_gbps": 10.0},
           "moe": {"moe_ms": 13.0, "dense_ms": 10.0, "ratio": 1.3}}
    B.write_doc(str(doc), res, "dsv2 bench --only moe")
    B.write_doc(str(doc), {**res, "moe": {"moe_ms": 12.0, "dense_ms": 10.0, "ratio": 1.2}}, "dsv2 bench")
    text = doc.read_text()
    assert text.count(B.DOC_BEGIN) == 1 and text.count(B.DOC_END) == 1
    assert "kept above" in text and "1.20x" in text and "1.30x" not in text


# Every row, in two processes (the rows against transformers; the MoE layer and the compile
# times) that parallel test workers can share out.
_QUICK_ROWS = {
    "train,prefill,decode": ("| train (2 x 32)", "| prefill (2 x 32)", "| decode batch 1, 32 prompt",
                             "| decode batch 2, 64 prompt"),
    "moe,compile": ("| MoE layer vs dense", "| v2 train-step compile"),
}


@pytest.mark.slow
@pytest.mark.parametrize("only", list(_QUICK_ROWS))
def test_quick_bench_runs_every_row(tmp_path, only):
    assert set(",".join(_QUICK_ROWS).split(",")) == set(B.ROWS) - {"ceilings"}
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "dsv2_jax.cli", "bench", "--quick", "--no-doc", "--only", only],
                       capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for row in ("ceilings",) + _QUICK_ROWS[only]:
        assert row in out, (row, out[-3000:])


@pytest.mark.slow
def test_gpu_script_smoke_runs_here(tmp_path):
    """scripts/bench_gpu.py is for an accelerator; --quick runs it at toy size on any backend so
    it cannot rot: every row is produced and the three grouped matmuls agree."""
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "scripts", "bench_gpu.py"), "--quick"],
                       capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    train = [x["train"] for x in rows if "train" in x]
    assert {t["attn"] for t in train} == {"xla", "pallas"} and all("tokens_per_s" in t for t in train)
    assert abs(train[0]["loss"] - train[1]["loss"]) < 1e-2  # same model, two attention cores
    gmm = next(x["gmm"] for x in rows if "gmm" in x)
    for name in ("ragged_dot", "blocked", "dense_all_experts"):
        assert gmm[f"{name}_ms"] > 0 and gmm[f"{name}_max_abs_out"] > 0
        assert gmm[f"{name}_max_diff_vs_ragged_dot"] <= 1e-2 * gmm["ragged_dot_max_abs_out"]


def test_shares_are_of_the_better_ceiling():
    """MFU and decode's share of its bound are computed against the better of the two ceiling
    measurements (start, end of the run), so a slow moment while measuring cannot flatter them."""
    res = {"train": {"ours_tok_s": 100.0, "hf_tok_s": 200.0, "flops_per_token": 1e9},
           "decode_4x2048": {"ours_tok_s": 50.0, "batch": 4, "bytes_per_step": 1e9}}
    B.against_ceilings(res, {"matmul_gflops": 400.0, "read_gbps": 10.0},
                       {"matmul_gflops": 200.0, "read_gbps": 20.0})
    assert res["ceilings"] == {"matmul_gflops": 400.0, "read_gbps": 20.0}
    assert res["train"]["ours_mfu"] == 0.25 and res["train"]["hf_mfu"] == 0.5
    assert res["decode_4x2048"]["bound_tok_s"] == 80.0 and res["decode_4x2048"]["ours_of_bound"] == 0.625
    assert "| ceilings | 400 GFLOP/s f32 matmul, 20.0 GB/s read" in B.table({"ceilings": res["ceilings"]})


def test_ratio_cell_shows_the_rounds_spread():
    """A row's ratio is printed with the range of its per-round ratios (several rounds), bare
    with one round, and the MoE row's rounds are MoE over dense like its ratio."""
    assert B._ratio_cell({"ratio": 0.96, "ratio_rounds": [0.91, 1.02, 0.95]}) == "0.96x (0.91-1.02)"
    assert B._ratio_cell({"ratio": 1.3, "ratio_rounds": [1.3]}) == "1.30x"
    assert B._ratio_cell({"ratio": 1.3}) == "1.30x"
    assert B._round_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    res = {"moe": {"moe_ms": 13.0, "dense_ms": 10.0, "ratio": 1.3, "ratio_rounds": [1.2, 1.4]}}
    assert "| 1.30x (1.20-1.40) | <= 1.5x |" in B.table(res)


def test_decode_seconds_discards_the_first_call_and_brackets_the_long_one():
    """Decode time is (n + 1)-token call minus the one-token call's mean before and after it;
    the first call (slowed after the other framework ran) counts for nothing."""
    calls, times = [], iter([100.0, 6.0, 9.0, 6.5])

    def gen(n):
        calls.append(n)
        return next(times)

    assert B.decode_seconds(gen, 64) == 9.0 - 6.25
    assert calls == [1, 1, 65, 1]


@pytest.mark.slow
def test_isolated_sides_run_in_their_own_workers_and_report_failures():
    """With isolate, the two frameworks run in worker processes of their own (not this one); a
    failing case comes back as an error carrying the worker's traceback, a dead worker as a
    clear error, and leaving the context ends both workers. Without, both run here."""
    import psutil

    from dsv2_jax.bench_sides import Sides

    cfg = B.bench_config(quick=True)
    with Sides(cfg, isolate=True) as sides:
        procs = [sides.ours._proc, sides.theirs._proc]
        assert len({p.pid for p in procs} | {os.getpid()}) == 3
        sides.ours.prepare("p", "prefill", B=1, T=8)
        assert sides.ours.time("p") > 0
        with pytest.raises(RuntimeError, match="KeyError: 'nope'"):
            sides.theirs.prepare("x", "nope")
        with pytest.raises(RuntimeError, match="KeyError: 'p'"):
            sides.theirs.time("p")  # prepared on our side only
        sides.theirs.prepare("p", "prefill", B=1, T=8)  # the worker still answers after errors
        assert sides.theirs.time("p") > 0
        psutil.Process(procs[1].pid).kill()
        procs[1].join(10)
        with pytest.raises(RuntimeError, match="transformers bench worker died"):
            sides.theirs.prepare("q", "prefill", B=1, T=8)
    assert not any(p.is_alive() for p in procs)
    with Sides(cfg) as sides:  # the default: both sides here
        assert not hasattr(sides.ours, "_proc")
        sides.theirs.prepare("p", "prefill", B=1, T=8)
        assert sides.theirs.time("p") > 0


def test_bad_bench_arguments_are_refused_before_timing(tmp_path, capsys):
    from dsv2_jax.cli import main as cli_main

    for args, words in ((["--quick", "--only", "trian"], "unknown row(s) 'trian'"),
                        (["--rounds", "0"], "--rounds must be >= 1"),
                        (["--new", "-5", "--no-doc"], "--new must be >= 1"),
                        (["--doc", str(tmp_path / "no" / "such.md")], "no folder")):
        assert cli_main(["bench", *args]) == 1
        assert words in capsys.readouterr().err


def test_decode_reads_the_active_weights_the_experts_the_batch_uses_and_the_latent_cache():
    """decode_bytes_per_step, the decode row's memory bound: one row reads exactly the weights
    a token uses (the active parameters); a large batch reads every routed expert of each
    MoE layer once (E (1 - (1 - K/E)^B) of them, capped at E, not K per row); the cache adds
    (kv_lora_rank + qk_rope_head_dim) values per position and layer; float32 by default."""
    from dsv2_jax.params import count_params

    # 3 layers, the last two MoE: 8 experts of 3 x 128 x 64 each, top-2
    cfg = B.bench_config(quick=True).replace(num_hidden_layers=3)
    _, active = count_params(cfg)
    assert (cfg.first_k_dense_replace, cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.hidden_size,
            cfg.moe_intermediate_size, cfg.kv_lora_rank, cfg.qk_rope_head_dim) == (1, 8, 2, 128, 64, 32, 8)
    expert = 3 * 128 * 64
    assert B.decode_bytes_per_step(cfg, 1, 0) == active * 4
    assert B.decode_bytes_per_step(cfg, 1, 0, dtype_bytes=2) == active * 2
    two_rows = 8 * (1 - 0.75 ** 2)  # experts two rows use, on average
    assert B.decode_bytes_per_step(cfg, 2, 0) == pytest.approx((active + 2 * (two_rows - 2) * expert) * 4)
    assert B.decode_bytes_per_step(cfg, 500, 0) == pytest.approx((active + 2 * 6 * expert) * 4)
    cache = B.decode_bytes_per_step(cfg, 3, 100) - B.decode_bytes_per_step(cfg, 3, 0)
    assert cache == pytest.approx(3 * 100 * (32 + 8) * 3 * 4)


class _FixedSide:
    """A bench side whose calls take fixed times: `base` seconds per call plus `per_token`
    for each new token of a decode call."""

    def __init__(self, base, per_token=0.0):
        self.base, self.per_token, self.prepared = base, per_token, []

    def prepare(self, key, case, warm=((),), **kw):
        self.prepared.append((key, case, warm, kw))
        return 7.0  # MB

    def time(self, key, *args):
        return self.base + self.per_token * (args[0] if args else 0)

    def drop(self, key):
        pass


def test_train_and_decode_rows_turn_seconds_into_tokens_per_second_and_ratios():
    """bench_train: B x T x steps tokens per timed call, the ratio transformers' seconds over
    ours (> 1: ours faster), each round's ratio the same way, the FLOPs per token of the
    config at T. bench_decode: B x new tokens over the decode-only seconds, against the bytes
    of a step at the mean cache length of the timed steps (prompt + new / 2)."""
    from dsv2_jax.train.metrics import train_flops_per_token

    cfg = B.bench_config(quick=True)
    sides = types.SimpleNamespace(ours=_FixedSide(0.5), theirs=_FixedSide(2.0))
    r = B.bench_train(sides, cfg, 2, 32, 3, rounds=2)
    assert r["ours_tok_s"] == 2 * 32 * 3 / 0.5 and r["hf_tok_s"] == 2 * 32 * 3 / 2.0
    assert r["ratio"] == 4.0 and r["ratio_rounds"] == [4.0, 4.0]
    assert r["flops_per_token"] == train_flops_per_token(cfg, 32) and r["ours_peak_mb"] == 7.0
    sides = types.SimpleNamespace(ours=_FixedSide(1.0, 0.01), theirs=_FixedSide(1.0, 0.04))
    r = B.bench_decode(sides, cfg, 2, 64, 8, rounds=3)
    assert r["ours_tok_s"] == pytest.approx(2 * 8 / 0.08) and r["hf_tok_s"] == pytest.approx(2 * 8 / 0.32)
    assert r["ratio"] == pytest.approx(4.0) and r["ratio_rounds"] == pytest.approx([4.0] * 3)
    assert r["batch"] == 2 and r["bytes_per_step"] == B.decode_bytes_per_step(cfg, 2, 64 + 4)


def test_the_train_and_decode_rows_of_the_table():
    """The doc table's train row shows each side's tokens/s with its own MFU; a decode row
    ours against its bound, then transformers'."""
    res = {"train": {"ours_tok_s": 100.0, "hf_tok_s": 200.0, "ours_mfu": 0.25, "hf_mfu": 0.5,
                     "ratio": 2.0, "ratio_rounds": [1.9, 2.1], "ours_peak_mb": 10.0, "hf_peak_mb": 20.0,
                     "shape": "2 x 32"},
           "decode_1x256": {"ours_tok_s": 30.0, "hf_tok_s": 10.0, "ours_of_bound": 0.6, "bound_tok_s": 50.0,
                            "ratio": 0.33, "ours_peak_mb": 1.0, "hf_peak_mb": 2.0}}
    rows = B.table(res).splitlines()
    assert ("| train (2 x 32) | 100 tok/s, MFU 25% | 200 tok/s, MFU 50% | 2.00x (1.90-2.10) | "
            ">= 1.5x, MFU >= 65% | peak +10 MB vs +20 MB |") in rows
    assert ("| decode batch 1, 256 prompt | 30.0 tok/s (60% of the 50 tok/s bound) | 10.0 tok/s | 0.33x | "
            ">= 1.5x, >= 75% of bound | peak +1 MB vs +2 MB |") in rows


def test_moe_row_ratio_is_moe_over_dense():
    """The MoE row: one MoE layer's and the same-FLOPs dense SwiGLU's milliseconds (forward +
    backward), their ratio MoE over dense, and with one round that round's ratio the same."""
    r = B.bench_moe(B.bench_config(quick=True), 16, 1)
    assert r["moe_ms"] > 0 and r["dense_ms"] > 0
    assert r["ratio"] == pytest.approx(r["moe_ms"] / r["dense_ms"], rel=1e-12)
    assert r["ratio_rounds"] == [pytest.approx(r["ratio"], rel=1e-12)]


def test_train_flops_per_token_counts_the_active_weights_and_causal_attention():
    """The FLOPs of one trained token (the MFU's numerator): 6 per active parameter, plus
    causal attention, q.k and p.v over T/2 keys on average, forward and backward (x3): on
    tiny (610,816 active parameters; 4 layers of 4 heads, q.k dimension 48, v 32) at T = 64."""
    from dsv2_jax import load_config
    from dsv2_jax.params import count_params
    from dsv2_jax.train.metrics import train_flops_per_token

    cfg = load_config("tiny")
    assert count_params(cfg)[1] == 610_816
    assert train_flops_per_token(cfg, 64) == 6 * 610_816 + 3 * 4 * 64 * 4 * (48 + 32)


def test_bench_decode_warms_ours_with_both_timed_lengths():
    """Our decode is compiled per (prompt, cache) bucket: the warm-up must call it with the
    one-token and the (new + 1)-token lengths that `decode_seconds` then times, or the first
    round's long call would include a compile. Transformers compiles nothing: one call."""
    cfg = B.bench_config(quick=True)
    sides = types.SimpleNamespace(ours=_FixedSide(1.0, 0.01), theirs=_FixedSide(1.0, 0.04))
    B.bench_decode(sides, cfg, 2, 64, 8, rounds=1)
    assert sides.ours.prepared == [("decode_2x64", "decode", ((1,), (9,)), {"B": 2, "T": 64})]
    assert sides.theirs.prepared == [("decode_2x64", "decode", ((1,),), {"B": 2, "T": 64})]


def test_a_side_warms_with_each_argument_tuple_and_times_the_call_it_is_given(monkeypatch):
    """Side.prepare calls the case's work once per tuple of `warm`; Side.time times one call
    with the arguments it is given (decode's token count), and drop forgets the work."""
    from dsv2_jax import bench_sides

    calls = []
    monkeypatch.setitem(bench_sides.CASES, "test-side", {"case": lambda model, cfg, **kw: (
        lambda *a: calls.append((model, kw, a)))})
    side = bench_sides.Side.__new__(bench_sides.Side)
    side.side, side.cfg, side.model, side.work = "test-side", None, "m", {}
    assert side.prepare("k", "case", warm=((1,), (9,)), B=2) >= 0
    assert calls == [("m", {"B": 2}, (1,)), ("m", {"B": 2}, (9,))]
    assert side.time("k", 65) >= 0 and calls[-1] == ("m", {"B": 2}, (65,))
    side.drop("k")
    assert side.work == {}


def test_both_sides_get_the_same_tokens_and_shapes(monkeypatch):
    """Each row's two cases see the same token ids: train on B x T inputs (transformers
    shifts its labels inside, so it takes the T inputs, not T + 1), prefill on the seed-1
    batch, decode the same prompts for exactly n new tokens (no stop)."""
    import torch
    from flax import nnx

    from dsv2_jax import bench_sides, compile_options, generation

    cfg = B.bench_config(quick=True).replace(num_hidden_layers=1)
    seen = {}

    class HF(torch.nn.Linear):  # parameters for the optimizer; records what it is given
        def __init__(self):
            super().__init__(1, 1)

        def forward(self, ids):
            seen["theirs_prefill"] = ids.numpy()

        def generate(self, ids, **kw):
            seen["theirs_decode"] = (ids.numpy(), kw)

    monkeypatch.setattr(B, "hf_train_steps", lambda hf, opt, tids, n: seen.setdefault("theirs_train", tids.numpy()))
    monkeypatch.setattr(compile_options, "jit_forward", lambda f: lambda st, x: seen.setdefault("ours_prefill", np.asarray(x)))
    monkeypatch.setattr(generation, "generate", lambda model, ids, n: seen.setdefault("ours_decode", (ids, n)))
    hf, model = HF(), nnx.Linear(1, 1, rngs=nnx.Rngs(0))  # the cases only split ours here
    bench_sides._theirs_train(hf, cfg, 2, 8, 1)()
    bench_sides._theirs_prefill(hf, cfg, 2, 8)()
    bench_sides._ours_prefill(model, cfg, 2, 8)()
    bench_sides._theirs_decode(hf, cfg, 2, 8)(5)
    bench_sides._ours_decode(model, cfg, 2, 8)(5)
    np.testing.assert_array_equal(seen["theirs_train"], B._batch(cfg, 2, 8)[1]["inputs"])
    np.testing.assert_array_equal(seen["theirs_prefill"], seen["ours_prefill"])
    np.testing.assert_array_equal(seen["ours_prefill"], B._batch(cfg, 2, 8, seed=1)[1]["inputs"])
    ids, kw = seen["theirs_decode"]
    np.testing.assert_array_equal(ids, seen["ours_decode"][0])
    assert ids.shape == (2, 8) and seen["ours_decode"][1] == 5
    assert kw["max_new_tokens"] == kw["min_new_tokens"] == 5 and kw["do_sample"] is False
