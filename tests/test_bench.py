"""`dsv2 bench`: the smoke run works end to end and its report lands in the doc block.
No speed is asserted here (machines are shared); the figures are in docs/benchmarks.md."""

import os
import subprocess
import sys

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
