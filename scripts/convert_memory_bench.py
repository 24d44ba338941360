"""Peak host memory and throughput of `dsv2 convert` on a generated checkpoint.

    python scripts/convert_memory_bench.py --gb 1.0 --workdir /tmp/convbench

Generates an HF-format bf16 checkpoint of about --gb GB (a config with wide experts, random
weights, written tensor by tensor with our streaming safetensors writer: no torch, never the
whole model in memory), converts it HF -> Orbax -> HF, each in a fresh subprocess that reports
its own peak RSS (VmHWM) and its peak RSS once the libraries are imported, then checks
the round trip bit-exact tensor by tensor. Prints one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def bench_config(n_moe_layers: int, hidden: int = 1024, moe_inter: int = 2048, experts: int = 16,
                 vocab: int = 8192, inter: int = 4096):
    from dsv2_jax.config import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, moe_intermediate_size=moe_inter,
        num_hidden_layers=n_moe_layers + 1, num_attention_heads=8, kv_lora_rank=128, q_lora_rank=192,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=experts,
        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1, topk_method="greedy",
        param_dtype="bfloat16", bos_token_id=None, eos_token_id=None)


def generate(path: str, cfg, shard_bytes: int = 200 << 20, seed: int = 0) -> dict:
    """Writes an HF checkpoint of `cfg` (bf16, sharded, random) streaming; returns sizes."""
    import ml_dtypes
    from flax import nnx

    from dsv2_jax.checkpoint.hf import abstract_model, param_map
    from dsv2_jax.checkpoint.safetensors_io import SafetensorsDir, write_safetensors

    os.makedirs(path, exist_ok=True)
    _, state = nnx.split(abstract_model(cfg))
    entries = param_map(cfg, state)
    rng = np.random.default_rng(seed)
    shards, cur, size = [], [], 0
    for e in entries:
        nb = int(np.prod(e.shape)) * 2
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += nb
    shards.append(cur)
    weight_map, total, largest = {}, 0, 0

    def produce(name):
        shape = by_name[name].shape
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    by_name = {e.hf_name: e for e in entries}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(path, fname), [(e.hf_name, "BF16", e.shape) for e in shard],
                          produce, metadata={"format": "pt"})
        for e in shard:
            weight_map[e.hf_name] = fname
            nb = int(np.prod(e.shape)) * 2
            total += nb
            largest = max(largest, nb)
    with open(os.path.join(path, SafetensorsDir.INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    cfg.save(path)
    return {"bytes": total, "largest_tensor": largest, "tensors": len(entries), "shards": len(shards)}


_CHILD = r"""
import json, sys, time

def hwm():
    # VmHWM: peak RSS of this process image. (getrusage's ru_maxrss survives exec on Linux,
    # so a child of a big parent would report the parent's size.)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))

import jax, orbax.checkpoint, tensorstore  # the libraries' own footprint is the baseline
from dsv2_jax.checkpoint import convert
base = hwm()
src, dst, to, commit = sys.argv[1:5]
t = time.perf_counter()
stats = convert.convert(src, dst, to, progress=False, commit_bytes=int(commit) or None)
stats["wall_s"] = time.perf_counter() - t
stats["baseline_rss"] = base
stats["peak_rss"] = hwm()
print("STATS " + json.dumps(stats))
"""


def measure(src: str, dst: str, to: str, commit_bytes: int = 0) -> dict:
    """Runs one conversion in a fresh interpreter; returns its stats and peak RSS."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-c", _CHILD, src, dst, to, str(commit_bytes)],
                       capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"conversion failed:\n{r.stderr[-3000:]}")
    line = [s for s in r.stdout.splitlines() if s.startswith("STATS ")][-1]
    return json.loads(line[6:])


def compare(a_path: str, b_path: str) -> tuple[int, int]:
    """(mismatching tensors, tensors) between two HF directories: names, dtypes, shapes, bytes."""
    from dsv2_jax.checkpoint.safetensors_io import SafetensorsDir

    a, b = SafetensorsDir(a_path), SafetensorsDir(b_path)
    names = set(a.keys()) | set(b.keys())
    bad = 0
    for n in sorted(names):
        if n not in a.where or n not in b.where:
            bad += 1
            continue
        if (a.dtype_name(n) != b.dtype_name(n) or a.shape(n) != b.shape(n)
                or not np.array_equal(a.read(n).view(np.uint8), b.read(n).view(np.uint8))):
            bad += 1
    return bad, len(names)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0, help="approximate checkpoint size")
    ap.add_argument("--workdir", default="/tmp/dsv2_convert_bench")
    ap.add_argument("--keep", action="store_true", help="keep the generated directories")
    a = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    per_layer = bench_config(1)
    # size of one MoE layer's experts (bf16)
    layer_bytes = 3 * per_layer.n_routed_experts * per_layer.hidden_size * per_layer.moe_intermediate_size * 2
    n_layers = max(1, round(a.gb * 1e9 / layer_bytes))
    cfg = bench_config(n_layers)
    shutil.rmtree(a.workdir, ignore_errors=True)
    hf, ob, back = (os.path.join(a.workdir, n) for n in ("hf", "orbax", "hf_back"))
    t = time.perf_counter()
    gen = generate(hf, cfg)
    gen_s = time.perf_counter() - t
    to_orbax = measure(hf, ob, "orbax")
    to_hf = measure(ob, back, "hf")
    bad, n = compare(hf, back)
    size = gen["bytes"]
    out = {
        "checkpoint_bytes": size, "largest_tensor_bytes": gen["largest_tensor"],
        "tensors": gen["tensors"], "shards": gen["shards"], "generate_s": round(gen_s, 1),
        "roundtrip_mismatching_tensors": bad, "roundtrip_tensors": n,
    }
    for name, s in (("hf_to_orbax", to_orbax), ("orbax_to_hf", to_hf)):
        out[name] = {
            "peak_rss_mb": round(s["peak_rss"] / 1e6, 1),
            "baseline_rss_mb": round(s["baseline_rss"] / 1e6, 1),
            "peak_over_checkpoint": round(s["peak_rss"] / size, 3),
            "conversion_rss_over_largest_tensor": round((s["peak_rss"] - s["baseline_rss"]) / gen["largest_tensor"], 1),
            "seconds": round(s["seconds"], 1), "mb_per_s": round(s["mb_per_s"], 1),
        }
    print(json.dumps(out, indent=1))
    if not a.keep:
        shutil.rmtree(a.workdir, ignore_errors=True)
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
