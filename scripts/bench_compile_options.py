"""The bench config's forward (or train step) compiled with XLA's default options and with
`dsv2_jax.compile_options.forward_compiler_options`, timed side by side in one process.

    python scripts/bench_compile_options.py                  # forward, batch 4 x 512
    python scripts/bench_compile_options.py --what train --rounds 3

Both programs are compiled from the same function and weights; rounds alternate them so that
machine noise hits both. Prints seconds and tokens/s of each (median over rounds), their
ratio, and the largest difference of their outputs (logits, or the train step's loss).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=("forward", "train"), default="forward")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    from dsv2_jax import init_model
    from dsv2_jax.benchmark import _batch, bench_config
    from dsv2_jax.compile_options import forward_compiler_options
    from dsv2_jax.train.optim import lr_schedule, make_optimizer
    from dsv2_jax.train.step import ModelFns, init_state, make_train_step, params_of

    cfg = bench_config()
    model = init_model(cfg, seed=0)
    _, batch = _batch(cfg, a.batch, a.seq_len)
    if a.what == "forward":
        graphdef, state = nnx.split(model)
        fn, args = (lambda st, x: nnx.merge(graphdef, st)(x)), (state, batch["inputs"])
        out = lambda r: r  # noqa: E731
    else:
        sched = lr_schedule(1e-4, 1000, 0, "constant")
        tx = make_optimizer(sched)
        fn = make_train_step(ModelFns.from_model(model), cfg, tx, sched)
        args = (init_state(params_of(model), tx), batch)
        out = lambda r: r[1]["loss"]  # noqa: E731
    options = forward_compiler_options()
    if not options:
        raise SystemExit(f"no forward options on {jax.default_backend()}: nothing to compare")
    compiled = {}
    for name, opts in (("default", None), ("forward options", options)):
        t = time.perf_counter()
        compiled[name] = jax.jit(fn, compiler_options=opts).lower(*args).compile()
        print(f"{name}: compiled in {time.perf_counter() - t:.1f} s", flush=True)
    first = [out(c(*args)) for c in compiled.values()]
    diff = float(jnp.max(jnp.abs(first[0] - first[1])))
    secs = {k: [] for k in compiled}
    for _ in range(a.rounds):
        for k, c in compiled.items():
            t = time.perf_counter()
            jax.block_until_ready(c(*args))
            secs[k].append(time.perf_counter() - t)
    tokens = a.batch * a.seq_len
    med = {k: statistics.median(v) for k, v in secs.items()}
    print(f"bench config, {a.what}, {a.batch} x {a.seq_len}, {a.rounds} rounds; outputs differ by {diff:.1e}")
    for k, v in secs.items():
        print(f"{k:16s} {med[k]:6.2f} s  {tokens / med[k]:6.0f} tok/s   ({' '.join(f'{x:.2f}' for x in v)})")
    print(f"forward options / default: {med['default'] / med['forward options']:.2f}x")


if __name__ == "__main__":
    main()
