"""`scripts/bench_kernels.py --quick` runs end to end (tiny shapes, interpret mode on CPU):
the GPU benchmark is ready to run, every measurement and baseline path included."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_kernels_quick(tmp_path):
    out = tmp_path / "rows.json"
    # Its own process, so XLA:CPU can compile the interpreted kernels unoptimised (they are
    # tiny; the optimiser's time is not).
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_kernels.py"),
                           "--quick", "--json", str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "total" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    timed = {(r["case"].split(" B=")[0], r["impl"]) for r in rows if r["ms"] is not None}
    for case, impl in [("prefill", "flash_mla (pallas)"), ("prefill", "xla"),
                       ("decode", "mla_decode (pallas)"), ("decode", "mla_decode_paged"),
                       ("decode", "xla")]:
        assert (case, impl) in timed, (case, impl, sorted(timed))
    assert any(r["case"].endswith("fwd+bwd") and r["impl"] == "flash_mla (pallas)" for r in rows)
