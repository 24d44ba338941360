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


@pytest.mark.slow
def test_quick_bench_runs_every_row(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "dsv2_jax.cli", "bench", "--quick", "--no-doc"],
                       capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for row in ("ceilings", "| train (2 x 32)", "| prefill (2 x 32)", "| decode batch 1, 32 prompt",
                "| decode batch 2, 64 prompt", "| MoE layer vs dense", "| v2 train-step compile"):
        assert row in out, (row, out[-3000:])
