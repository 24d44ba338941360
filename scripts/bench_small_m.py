"""How fast this machine's XLA reads a weight matrix when only a few rows multiply it.

Decode multiplies B = 1..8 rows by every weight it uses, so its speed is the rate at which
these products stream their weights. This prints, for x [M, D] @ W [D, V] in float32, the
weight bytes read per second of the product as XLA compiles it (`dot`) and of the same
product as a multiply-and-reduce over the transposed weight (`reduce over W^T`), next to
the machine's plain read rate. The shapes are the bench config's output head (1024 x 32000,
131 MB, larger than the cache) and its dense MLP (1024 x 2816, 11.5 MB).

    python scripts/bench_small_m.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def _median_ms(fn, n: int) -> float:
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    a = p.parse_args()
    from dsv2_jax.benchmark import ceilings

    c = ceilings(quick=False)
    print(f"plain read {c['read_gbps']:.1f} GB/s, f32 matmul {c['matmul_gflops']:.0f} GFLOP/s")
    rng = np.random.default_rng(0)
    dot = jax.jit(lambda x, w: x @ w)
    red = jax.jit(lambda x, wt: jnp.sum(wt[None] * x[:, None, :], axis=-1))
    print("| D x V | M | dot ms | dot GB/s | reduce over W^T ms | reduce GB/s |")
    print("|---|---|---|---|---|---|")
    for D, V in ((1024, 32000), (1024, 2816)):
        w = rng.normal(size=(D, V)).astype(np.float32)
        W, WT = jnp.asarray(w), jnp.asarray(np.ascontiguousarray(w.T))
        gb = D * V * 4 / 1e9
        for M in (1, 2, 4, 8):
            x = jnp.asarray(rng.normal(size=(M, D)), jnp.float32)
            d = _median_ms(lambda: dot(x, W).block_until_ready(), a.repeats)
            r = _median_ms(lambda: red(x, WT).block_until_ready(), a.repeats)
            print(f"| {D} x {V} | {M} | {d:.2f} | {gb / d * 1e3:.1f} | {r:.2f} | {gb / r * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
