"""Peak host memory of `from_pretrained(..., mesh=)` on a generated checkpoint.

    python scripts/load_memory_bench.py --gb 1.0 --devices 8 --mesh fsdp=8

Generates an HF bf16 checkpoint of about --gb GB (scripts/convert_memory_bench.py's
generator: written tensor by tensor, never whole in memory), then loads it in a fresh
subprocess with --devices simulated CPU devices onto --mesh, reporting that process's peak
RSS (VmHWM). On CPU the "devices" live in host memory, so the loaded parameters themselves
are part of the RSS: the figure that says whether loading streams is the peak above the
baseline (libraries imported) and above the bytes the devices hold once loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

_CHILD = r"""
import json, sys, time
def hwm():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))
import jax, numpy as np
from dsv2_jax import from_pretrained
from dsv2_jax.sharding.mesh import make_mesh
from dsv2_jax.train.step import params_of
mesh = make_mesh(sys.argv[2])
base = hwm()
t = time.perf_counter()
model = from_pretrained(sys.argv[1], mesh=mesh)
leaves = jax.tree.leaves(params_of(model))
jax.block_until_ready(leaves)
held = sum(s.data.nbytes for a in leaves for s in a.addressable_shards)
largest_shard = max(s.data.nbytes for a in leaves for s in a.addressable_shards)
print("STATS " + json.dumps({"baseline_rss": base, "peak_rss": hwm(), "device_bytes": held,
                             "largest_shard": largest_shard, "seconds": time.perf_counter() - t}))
"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--mesh", default="fsdp=8")
    ap.add_argument("--workdir", default="/tmp/dsv2_load_bench")
    a = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    sys.path.insert(0, HERE)
    from convert_memory_bench import bench_config, generate

    per_layer = bench_config(1)
    layer_bytes = 3 * per_layer.n_routed_experts * per_layer.hidden_size * per_layer.moe_intermediate_size * 2
    cfg = bench_config(max(1, round(a.gb * 1e9 / layer_bytes)))
    shutil.rmtree(a.workdir, ignore_errors=True)
    gen = generate(a.workdir, cfg)
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={a.devices}",
               JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", _CHILD, a.workdir, a.mesh], env=env,
                       capture_output=True, text=True)
    shutil.rmtree(a.workdir, ignore_errors=True)
    if r.returncode:
        print(r.stderr[-3000:], file=sys.stderr)
        return 1
    s = json.loads([x for x in r.stdout.splitlines() if x.startswith("STATS ")][-1][6:])
    over = s["peak_rss"] - s["baseline_rss"] - s["device_bytes"]
    print(json.dumps({
        "checkpoint_gb": round(gen["bytes"] / 1e9, 3), "largest_tensor_mb": round(gen["largest_tensor"] / 1e6, 1),
        "mesh": a.mesh, "devices": a.devices, "peak_rss_gb": round(s["peak_rss"] / 1e9, 3),
        "baseline_rss_gb": round(s["baseline_rss"] / 1e9, 3),
        "device_bytes_gb": round(s["device_bytes"] / 1e9, 3),
        "peak_above_baseline_and_loaded_mb": round(over / 1e6, 1),
        "over_largest_tensor": round(over / gen["largest_tensor"], 2),
        "seconds": round(s["seconds"], 1),
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
