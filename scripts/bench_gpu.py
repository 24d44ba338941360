"""One prepared accelerator check: ceilings, bf16 training MFU, and the grouped-matmul backends.

    python scripts/bench_gpu.py                 # on a GPU (or TPU): the real sizes, < 5 minutes
    python scripts/bench_gpu.py --quick         # toy sizes on any backend (CPU: a smoke run)

Rows (one JSON line each, then a markdown table to paste into docs/benchmarks.md):

    ceilings     a large copy (GB/s, read + write) and a large bf16 matmul (TFLOP/s)
    train        bf16 compute, float32 master weights: tokens/s and MFU of a V2-Lite-shaped
                 model cut to a few layers (hidden 2048, 16 heads, kv_lora 512, 64 experts
                 top-6 + 2 shared), with attn_impl xla and pallas, MFU against the
                 measured matmul ceiling and against --peak-tflops (the datasheet)
    gmm          one MoE layer's expert FFN forward + backward over rows sorted by expert:
                 jax.lax.ragged_dot, the blocked windows of dsv2_jax.moe.gmm, and a dense
                 product over every expert (the zero-padded form ragged_dot is reported to
                 lower to), so the GPU default is chosen from numbers

Nothing here has been run on an accelerator yet (none was lent to the tasks that wrote it);
the CPU smoke run (`--quick`) keeps it from rotting.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _best(fn, reps: int) -> float:
    fn()  # compile / warm up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def ceilings(quick: bool) -> dict:
    n = 512 if quick else 8192
    a = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda a: a @ a)
    t_mm = _best(lambda: mm(a).block_until_ready(), 3 if quick else 10)
    elems = (4 << 20) if quick else (1 << 30)  # 2 GB of bf16 on a device
    x = jnp.ones((elems,), jnp.bfloat16)
    cp = jax.jit(lambda x: x * 1)  # reads and writes every element once
    t_cp = _best(lambda: cp(x).block_until_ready(), 3 if quick else 10)
    return {"bf16_matmul_tflops": 2 * n ** 3 / t_mm / 1e12, "copy_gbps": 2 * elems * 2 / t_cp / 1e9}


def model_config(quick: bool, attn: str, layers: int):
    from dsv2_jax import load_config

    cfg = load_config("v2-lite").replace(
        num_hidden_layers=layers, dtype="bfloat16", param_dtype="float32", attn_impl=attn,
        remat="full")
    if quick:
        cfg = cfg.replace(hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                          num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32,
                          qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
                          n_routed_experts=8, num_experts_per_tok=2, vocab_size=512)
    return cfg


def train_row(quick: bool, attn: str, batch: int, seq: int, layers: int, steps: int) -> dict:
    from dsv2_jax import init_model
    from dsv2_jax.train.metrics import train_flops_per_token
    from dsv2_jax.train.optim import lr_schedule, make_optimizer
    from dsv2_jax.train.step import ModelFns, init_state, make_train_step, params_of

    cfg = model_config(quick, attn, layers)
    model = init_model(cfg, seed=0)
    sched = lr_schedule(1e-4, 1000, 0, "constant")
    tx = make_optimizer(sched)
    step = jax.jit(make_train_step(ModelFns.from_model(model), cfg, tx, sched), donate_argnums=0)
    state = init_state(params_of(model), tx)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1))
    b = {"inputs": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32),
         "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
         "segment_ids": jnp.ones((batch, seq), jnp.int32), "loss_mask": jnp.ones((batch, seq), jnp.int32)}
    t = time.perf_counter()
    step = step.lower(state, b).compile()
    compile_s = time.perf_counter() - t
    state, m = step(state, b)
    jax.block_until_ready(m["loss"])
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, b)
        jax.block_until_ready(m["loss"])
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    tok = batch * seq
    return {"attn": attn, "batch": batch, "seq": seq, "layers": layers, "tokens_per_s": tok / dt,
            "step_s": dt, "compile_s": compile_s, "loss": float(m["loss"]),
            "flops_per_step": train_flops_per_token(cfg, seq) * tok}


def gmm_row(quick: bool, tokens: int) -> dict:
    """Expert FFN forward + backward of one V2-Lite MoE layer's rows, three ways."""
    from dsv2_jax.moe.gmm import expert_ffn

    E, K, D, F = (8, 2, 128, 64) if quick else (64, 6, 2048, 1408)
    rng = np.random.default_rng(0)
    M = tokens * K
    sizes = np.bincount(rng.integers(0, E, M), minlength=E)
    gs = jnp.asarray(sizes, jnp.int32)
    x = jnp.asarray(rng.standard_normal((M, D)) * 0.1, jnp.bfloat16)
    w = [jnp.asarray(rng.standard_normal(s) * 0.02, jnp.bfloat16) for s in ((E, D, F), (E, D, F), (E, F, D))]

    def dense_all(xs, gs, wg, wu, wd):
        # every row against every expert, the chosen one kept: the zero-padded dense form
        owner = jnp.repeat(jnp.arange(E), gs, total_repeat_length=xs.shape[0])
        h = jax.nn.silu(jnp.einsum("md,edf->mef", xs, wg)) * jnp.einsum("md,edf->mef", xs, wu)
        y = jnp.einsum("mef,efd->med", h, wd)
        return jnp.take_along_axis(y, owner[:, None, None], axis=1)[:, 0]

    fns = {"ragged_dot": lambda *a: expert_ffn(*a, backend="ragged_dot"),
           "blocked": lambda *a: expert_ffn(*a, backend="blocked"),
           "dense_all_experts": dense_all}
    out = {"rows": M, "experts": E}
    ref = None
    for name, f in fns.items():
        if name == "dense_all_experts" and M * E * F * 2 * 2 > (8 << 30):
            out[f"{name}_ms"] = None  # would not fit: the point of the comparison
            continue
        g = jax.jit(jax.grad(lambda x, *w: jnp.sum(f(x, gs, *w).astype(jnp.float32) ** 2), argnums=(0, 1, 2, 3)))
        t = _best(lambda: jax.block_until_ready(g(x, *w)), 3 if quick else 10)
        out[f"{name}_ms"] = t * 1e3
        val = np.asarray(jax.jit(lambda x, *w: f(x, gs, *w))(x, *w), np.float32)
        ref = val if ref is None else ref
        out[f"{name}_max_abs_out"] = float(np.max(np.abs(val)))
        out[f"{name}_max_diff_vs_ragged_dot"] = float(np.max(np.abs(val - ref)))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy sizes (a smoke run on any backend)")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step (train row)")
    ap.add_argument("--seq", type=int, default=4096, help="tokens per sequence (train row)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the V2-Lite-shaped model")
    ap.add_argument("--steps", type=int, default=5, help="timed train steps per row")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="datasheet bf16 dense peak for MFU (H100/H200 SXM: 989)")
    ap.add_argument("--attn", default="xla,pallas", help="attention cores to time")
    a = ap.parse_args()
    batch, seq = (2, 64) if a.quick else (a.batch, a.seq)
    print(json.dumps({"device": str(jax.devices()[0]), "backend": jax.default_backend(),
                      "jax": jax.__version__}), flush=True)
    c = ceilings(a.quick)
    print(json.dumps({"ceilings": c}), flush=True)
    rows = []
    for attn in a.attn.split(","):
        try:
            r = train_row(a.quick, attn, batch, seq, 2 if a.quick else a.layers, 2 if a.quick else a.steps)
        except Exception as e:  # noqa: BLE001 - one failing row must not hide the others
            r = {"attn": attn, "error": f"{type(e).__name__}: {e}"[:500]}
        if "tokens_per_s" in r:
            r["mfu_of_measured"] = r["flops_per_step"] / r["step_s"] / (c["bf16_matmul_tflops"] * 1e12)
            r["mfu_of_datasheet"] = r["flops_per_step"] / r["step_s"] / (a.peak_tflops * 1e12)
        rows.append(r)
        print(json.dumps({"train": r}), flush=True)
    g = gmm_row(a.quick, 256 if a.quick else 8192)
    print(json.dumps({"gmm": g}), flush=True)

    print("\n| row | figure |\n|---|---|")
    print(f"| ceilings | {c['bf16_matmul_tflops']:.1f} TFLOP/s bf16 matmul, {c['copy_gbps']:.0f} GB/s copy |")
    for r in rows:
        if "error" in r:
            print(f"| train, attn {r['attn']} | failed: {r['error'][:120]} |")
        else:
            print(f"| train, attn {r['attn']} ({r['batch']} x {r['seq']}, {r['layers']} layers) | "
                  f"{r['tokens_per_s']:.0f} tok/s, MFU {r['mfu_of_measured']:.0%} of measured, "
                  f"{r['mfu_of_datasheet']:.0%} of {a.peak_tflops:.0f} TFLOP/s; compile {r['compile_s']:.0f} s |")
    print("| gmm fwd+bwd (" + f"{g['rows']} rows, {g['experts']} experts) | " + ", ".join(
        f"{k[:-3]} {v:.1f} ms" if v is not None else f"{k[:-3]} (too large)"
        for k, v in g.items() if k.endswith("_ms")) + " |")


if __name__ == "__main__":
    main()
