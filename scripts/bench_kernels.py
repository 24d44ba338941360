"""GPU benchmark of the Pallas MLA kernels against XLA's attention on the same inputs.

    python scripts/bench_kernels.py            # on a GPU (H200: well under 5 minutes)
    python scripts/bench_kernels.py --quick    # tiny shapes, CPU interpret mode, seconds

One process measures, in order:
  1. the device's ceilings: a large copy (GB/s, read + write) and a large bf16 matmul
     (TFLOP/s);
  2. prefill (`flash_mla`, seq 4096, 16 and 128 heads, qk 192 / v 128, bf16, causal), forward
     and forward + backward, against `jax.nn.dot_product_attention` with cuDNN (if it takes
     the shape) and with XLA;
  3. decode (`mla_decode`, `mla_decode_paged`: 128 heads, 576-wide latent rows, values 512,
     bf16), batch 64 and 128, cache 4K and 32K tokens, against XLA's attention reading the
     same cache as keys and values.
For each it prints the time, TFLOP/s (prefill; causal model FLOPs: the forward's two matmuls
and the backward's five, over the visible half) or GB/s (decode: cache bytes read), and the
ratio to the measured ceiling. Goals (issue 10): decode >= 70% of the copy bandwidth,
prefill forward >= 50% of the matmul rate. `--json PATH` also writes the rows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp


def timeit(fn, *args, inner: int, reps: int) -> float:
    """Median seconds per call: `inner` calls dispatched back to back, `reps` times."""
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))  # warm
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


class Table:
    def __init__(self):
        self.rows = []

    def add(self, **row):
        self.rows.append(row)
        r = row
        rate = (f"{r['tflops']:8.1f} TFLOP/s" if r.get("tflops") is not None
                else f"{r['gbs']:8.0f} GB/s   " if r.get("gbs") is not None else " " * 16)
        ratio = f"{r['ratio'] * 100:5.1f}% of {r['ceiling']}" if r.get("ratio") is not None else ""
        ms = f"{r['ms']:9.3f} ms" if r.get("ms") is not None else "     --     "
        print(f"  {r['case']:<44} {r['impl']:<22} {ms} {rate}  {ratio} {r.get('note', '')}",
              flush=True)


def attempt(table, case, impl, thunk):
    """Run one measurement; a failure (a kernel that does not compile on this GPU, a
    baseline that does not take the shape) becomes a row instead of ending the run."""
    try:
        return thunk()
    except Exception as e:  # noqa: BLE001
        table.add(case=case, impl=impl, ms=None,
                  note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
        return None


def ceilings(table, quick, reps):
    n = 1 << (20 if quick else 29)  # 2 GiB of float32 on the GPU
    x = jnp.ones((n,), jnp.float32)
    copy = jax.jit(lambda x: x + 1.0)
    t = timeit(copy, x, inner=2 if quick else 10, reps=reps)
    gbs = 2 * x.nbytes / t / 1e9
    table.add(case=f"copy {x.nbytes / 2**30:.2f} GiB (read+write)", impl="xla", ms=t * 1e3,
              gbs=gbs)
    del x
    m = 256 if quick else 8192
    ka, kb = jax.random.split(jax.random.key(2))
    a = jax.random.normal(ka, (m, m), jnp.bfloat16)
    b = jax.random.normal(kb, (m, m), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    t = timeit(mm, a, b, inner=2 if quick else 10, reps=reps)
    tflops = 2 * m ** 3 / t / 1e12
    table.add(case=f"matmul bf16 {m}^3", impl="xla", ms=t * 1e3, tflops=tflops)
    return gbs, tflops


def prefill(table, B, T, H, K, V, *, interpret, mm_peak, reps, inner, sweep=()):
    from dsv2_jax.kernels import flash_mla

    keys = jax.random.split(jax.random.key(0), 4)  # drawn on the device: no host copies
    q, k = (jax.random.normal(kk, (B, T, H, K), jnp.bfloat16) for kk in keys[:2])
    v, do = (jax.random.normal(kk, (B, T, H, V), jnp.bfloat16) for kk in keys[2:])
    scale = K ** -0.5
    visible = (T + 1) / (2 * T)  # causal: fraction of the score matrix computed
    flops_fwd = 2 * B * H * T * T * (K + V) * visible
    flops_bwd = 2 * B * H * T * T * (3 * K + 2 * V) * visible

    def ours(q, k, v):
        return flash_mla(q, k, v, causal=True, scale=scale, interpret=interpret)

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                            implementation="cudnn")

    def xla(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                            implementation="xla")

    def with_grad(f):
        def g(q, k, v, do):
            o, vjp = jax.vjp(f, q, k, v)
            return o, vjp(do)
        return g

    case = f"prefill B={B} T={T} H={H} qk={K} v={V}"
    for bs in sweep:
        f = lambda q, k, v, bs=bs: flash_mla(q, k, v, causal=True, scale=scale, block_sizes=bs,
                                             interpret=interpret)
        label = (f"pallas q{bs.block_q}/k{bs.block_k} dq{bs.block_q_dq}/{bs.block_k_dq} "
                 f"dkv{bs.block_q_dkv}/{bs.block_k_dkv} w{bs.num_warps} s{bs.num_stages}")
        for part, fn, args, fl in (
                (" fwd", f, (q, k, v), flops_fwd),
                (" fwd+bwd", with_grad(f), (q, k, v, do), flops_fwd + flops_bwd)):
            t = attempt(table, case + part, label, lambda: timeit(
                jax.jit(fn), *args, inner=inner, reps=reps))
            if t is not None:
                table.add(case=case + part, impl=label, ms=t * 1e3, tflops=fl / t / 1e12,
                          ratio=fl / t / 1e12 / mm_peak, ceiling="matmul")
    ref = None
    for name, f in (("flash_mla (pallas)", ours), ("cudnn", cudnn), ("xla", xla)):
        fv, note = f, ""
        try:
            out = jax.jit(fv)(q, k, v)
        except Exception as e:  # noqa: BLE001
            if f is ours:
                table.add(case=case, impl=name, ms=None,
                          note=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
                continue
            # jax.nn.dot_product_attention (0.10) wants v's head dim equal to q's: pad v
            # with zero columns (the same result, more work) and slice the output back.
            def fv(q, k, v, f=f):
                return f(q, k, jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, K - V))))[..., :V]
            out = attempt(table, case, name, lambda: jax.jit(fv)(q, k, v))
            if out is None:
                continue
            note = f"(v padded to {K}: {type(e).__name__})"
        if ref is None:
            ref = out.astype(jnp.float32)
            err = ""
        else:
            diff = float(jnp.abs(out.astype(jnp.float32) - ref).max())
            err = f"max abs diff vs pallas {diff:.2e}"
        for label, fn, args, fl, nt in (
                (" fwd", fv, (q, k, v), flops_fwd, f"{note} {err}"),
                (" fwd+bwd", with_grad(fv), (q, k, v, do), flops_fwd + flops_bwd, note)):
            t = attempt(table, case + label, name, lambda: timeit(
                jax.jit(fn), *args, inner=inner, reps=reps))
            if t is not None:
                table.add(case=case + label, impl=name, ms=t * 1e3, tflops=fl / t / 1e12,
                          ratio=fl / t / 1e12 / mm_peak, ceiling="matmul", note=nt)


def decode(table, B, S, H, D, Vd, *, interpret, copy_peak, reps, inner, page=64,
           sweep=()):
    from dsv2_jax.kernels import mla_decode, mla_decode_paged

    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    q = jax.random.normal(k1, (B, H, D), jnp.bfloat16)
    cache = jax.random.normal(k2, (B, S, D), jnp.bfloat16)  # 4.8 GB at B=128, S=32K
    lengths = jnp.full((B,), S, jnp.int32)
    M = S // page
    table_ = jax.random.permutation(k3, B * M).astype(jnp.int32).reshape(B, M)
    # The pool holds the same rows, scattered over shuffled pages.
    pages = jnp.zeros((B * M, page, D), jnp.bfloat16).at[table_.reshape(-1)].set(
        cache.reshape(B * M, page, D))
    scale = D ** -0.5
    nbytes = B * S * D * 2

    def ours(q, cache, lengths):
        return mla_decode(q, cache, lengths, v_dim=Vd, scale=scale, interpret=interpret)

    def paged(q, pages, table_, lengths):
        return mla_decode_paged(q, pages, table_, lengths, v_dim=Vd, scale=scale,
                                interpret=interpret)

    def xla(q, cache, lengths):
        # MQA with one kv head: the cache is both keys and values (values sliced after).
        kv = cache[:, :, None, :]
        out = jax.nn.dot_product_attention(q[:, None], kv, kv, scale=scale,
                                           key_value_seq_lengths=lengths, implementation="xla")
        return out[:, 0, :, :Vd]

    case = f"decode B={B} S={S} H={H} D={D} v={Vd}"
    for bs in sweep:
        f = lambda q, cache, lengths, bs=bs: mla_decode(q, cache, lengths, v_dim=Vd, scale=scale,
                                                        block_sizes=bs, interpret=interpret)
        label = f"pallas h{bs.block_h} k{bs.block_k} w{bs.num_warps} s{bs.num_stages}"
        t = attempt(table, case, label, lambda: timeit(jax.jit(f), q, cache, lengths,
                                                       inner=inner, reps=reps))
        if t is not None:
            table.add(case=case, impl=label, ms=t * 1e3, gbs=nbytes / t / 1e9,
                      ratio=nbytes / t / 1e9 / copy_peak, ceiling="copy")
    ref = None
    for name, f, args in (("mla_decode (pallas)", ours, (q, cache, lengths)),
                          ("mla_decode_paged", paged, (q, pages, table_, lengths)),
                          ("xla", xla, (q, cache, lengths))):
        out = attempt(table, case, name, lambda: jax.jit(f)(*args).astype(jnp.float32))
        if out is None:
            continue
        err = "" if ref is None else f"max abs diff vs pallas {float(jnp.abs(out - ref).max()):.2e}"
        ref = out if ref is None else ref
        t = attempt(table, case, name, lambda: timeit(jax.jit(f), *args, inner=inner, reps=reps))
        if t is not None:
            table.add(case=case, impl=name, ms=t * 1e3, gbs=nbytes / t / 1e9,
                      ratio=nbytes / t / 1e9 / copy_peak, ceiling="copy", note=err)


def print_markdown(rows):
    """The table for docs/benchmarks.md, and the issue's two goals."""
    print("\n| case | implementation | ms | TFLOP/s | GB/s | % of ceiling | note |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cell = lambda key, fmt: format(r[key], fmt) if r.get(key) is not None else ""
        pct = f"{r['ratio'] * 100:.1f}% {r['ceiling']}" if r.get("ratio") is not None else ""
        print(f"| {r['case']} | {r['impl']} | {cell('ms', '.3f')} | {cell('tflops', '.1f')} | "
              f"{cell('gbs', '.0f')} | {pct} | {r.get('note', '').strip()} |")
    best = lambda pred: max((r["ratio"] for r in rows if r.get("ratio") is not None
                             and pred(r)), default=None)
    dec = best(lambda r: r["case"].startswith("decode")
               and ("pallas" in r["impl"] or r["impl"] == "mla_decode_paged"))
    pre = best(lambda r: r["case"].endswith(" fwd") and "pallas" in r["impl"])
    for what, got, goal in (("decode, best Pallas, of copy", dec, 0.70),
                            ("prefill forward, best Pallas, of matmul", pre, 0.50)):
        verdict = ("n/a" if got is None
                   else f"{got * 100:.1f}% ({'met' if got >= goal else 'not met'})")
        print(f"goal {what} >= {goal * 100:.0f}%: {verdict}")


def sweeps(quick):
    from dsv2_jax.kernels.flash_mla import BlockSizes as FB
    from dsv2_jax.kernels.mla_decode import BlockSizes as DB

    if quick:
        return (FB(16, 16, 16, 16, 16, 16),), (DB(block_h=16, block_k=16),)
    flash = (FB(128, 128, 64, 64, 64, 64, num_warps=8, num_stages=2),
             FB(128, 64, 64, 128, 128, 64, num_warps=8, num_stages=3),
             FB(64, 64, 32, 64, 64, 32, num_warps=4, num_stages=2))
    dec = tuple(DB(block_h=h, block_k=k, num_warps=w)
                for h, k, w in ((16, 64, 4), (32, 64, 8), (64, 64, 8), (32, 128, 8)))
    return flash, dec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="tiny shapes in interpret mode on CPU: a smoke test of this script")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sweep", action="store_true",
                    help="also time a few other block sizes of the Pallas kernels (adds ~2 min)")
    a = ap.parse_args(argv)

    backend = jax.default_backend()
    if not a.quick and backend != "gpu":
        sys.exit(f"bench_kernels: needs a GPU (jax backend is {backend!r}); "
                 "--quick runs the tiny CPU version")
    interpret = True if a.quick else False
    reps = 1 if a.quick else a.reps
    inner = 1 if a.quick else 10
    t0 = time.perf_counter()
    print(f"jax {jax.__version__}, backend {backend}, devices {jax.devices()}", flush=True)
    table = Table()
    copy_peak, mm_peak = ceilings(table, a.quick, reps)
    if a.quick:
        prefill_cases = [(1, 40, 2, 48, 32)]
        decode_cases = [(2, 128, 3, 48, 32)]
    else:
        prefill_cases = [(1, 4096, 16, 192, 128), (1, 4096, 128, 192, 128)]
        decode_cases = [(B, S, 128, 576, 512) for B in (64, 128) for S in (4096, 32768)]
    flash_sweep, decode_sweep = sweeps(a.quick) if a.sweep else ((), ())
    for B, T, H, K, V in prefill_cases:
        prefill(table, B, T, H, K, V, interpret=interpret, mm_peak=mm_peak, reps=reps,
                inner=inner, sweep=flash_sweep)
    for i, (B, S, H, D, Vd) in enumerate(decode_cases):
        decode(table, B, S, H, D, Vd, interpret=interpret, copy_peak=copy_peak, reps=reps,
               inner=inner, page=16 if a.quick else 64, sweep=decode_sweep if i == 0 else ())
    print(f"total {time.perf_counter() - t0:.0f} s", flush=True)
    print_markdown(table.rows)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
                       "rows": table.rows}, f, indent=1)


if __name__ == "__main__":
    main()
