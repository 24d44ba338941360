"""Decode's routed experts (`routed_experts_stacked`) at several window sizes, side by side.

    python scripts/bench_decode_moe.py                 # 1, 2, 4 and 8 tokens
    python scripts/bench_decode_moe.py --tokens 4 --rounds 7

The bench config's expert shape (32 experts of D 1024, F 352, top-6) stacked over 3 MoE
layers as a segment holds them; each timing runs 32 steps of the three layers in one jitted
loop, the chosen experts shifting every step. Rounds alternate the window sizes. Prints
milliseconds per step (the three layers) for each window size, the one
`decode_window_rows` picks marked, and each form's error against a dense reference.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--windows", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    from dsv2_jax.benchmark import bench_config
    from dsv2_jax.moe.gmm import decode_window_rows, routed_experts_stacked

    cfg = bench_config()
    L, E, K = 3, cfg.n_routed_experts, cfg.num_experts_per_tok
    D, F, steps = cfg.hidden_size, cfg.moe_intermediate_size, 32
    keys = jax.random.split(jax.random.key(0), 4)
    w = (jax.random.normal(keys[0], (L, E, D, F)) * 0.02, jax.random.normal(keys[1], (L, E, D, F)) * 0.02,
         jax.random.normal(keys[2], (L, E, F, D)) * 0.02)
    rng = np.random.default_rng(0)
    for T in a.tokens:
        x0 = jax.random.normal(keys[3], (T, D))
        idx0 = jnp.asarray(np.stack([rng.choice(E, K, replace=False) for _ in range(T)]), jnp.int32)
        gate = jnp.full((T, K), 1.0 / K, jnp.float32)

        def run(w, x, window):
            def body(i, carry):
                x, acc = carry
                idx = (idx0 + i) % E
                y = sum(routed_experts_stacked(x, idx, gate, *w, layer, window) for layer in range(L))
                return x + 1e-3 * y, acc + y.sum()
            return jax.lax.fori_loop(0, steps, body, (x, 0.0))

        def reference(w, x):
            wg, wu, wd = (m[1][idx0] for m in w)  # [T, K, ...] of layer 1
            h = jax.nn.silu(jnp.einsum("td,tkdf->tkf", x, wg, precision="highest")) * jnp.einsum(
                "td,tkdf->tkf", x, wu, precision="highest")
            return jnp.einsum("tkf,tkfd,tk->td", h, wd, gate, precision="highest")

        want = jax.jit(reference)(w, x0)
        compiled, err = {}, {}
        for b in a.windows:
            compiled[b] = jax.jit(run, static_argnums=2).lower(w, x0, b).compile()
            got = jax.jit(lambda w, x, b=b: routed_experts_stacked(x, idx0, gate, *w, 1, b))(w, x0)
            err[b] = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        ms = {b: [] for b in a.windows}
        for _ in range(a.rounds):
            for b, c in compiled.items():
                t = time.perf_counter()
                jax.block_until_ready(c(w, x0))
                ms[b].append((time.perf_counter() - t) / steps * 1e3)
        chosen = decode_window_rows(T)
        print(f"{T} token(s), {L} layers, {K} of {E} experts:")
        for b, v in ms.items():
            mark = "  <- decode_window_rows" if b == chosen else ""
            print(f"  window {b}: {statistics.median(v):6.2f} ms/step  (error {err[b]:.1e}){mark}")


if __name__ == "__main__":
    main()
