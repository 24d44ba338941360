"""One decode step of the bench config in its forms, timed side by side in one process.

    python scripts/bench_decode_step.py                  # batch 4, 2048-token context
    python scripts/bench_decode_step.py --batch 1 --context 256

Forms (see `dsv2_jax.decode.few_row_products` and `layer_copies`): `dot` (every product a
`dot` with the weights as stored, each layer sliced out of the segment's stacks), `head`
(only the output head laid out [vocab, D]) and `rows` (the head and every Linear of the step
laid out [out, in] in one copy per layer, what `generate` uses at 2-8 rows on one CPU device);
at batch 1, `dot` and `layers` (one copy per layer in the dot layout, what `generate` uses).
At 2-8 rows `layers` is timed too, to weigh the few-row layout against the copies alone.
The cache is prefilled once with random tokens; each timing runs --steps decode steps in one
jitted loop; rounds alternate the forms so that machine noise hits them all.
Prints milliseconds per step (median over rounds) and each round's figures.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--context", type=int, default=2048, help="prompt tokens already cached")
    p.add_argument("--steps", type=int, default=16, help="decode steps per timing")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    from dsv2_jax import init_model
    from dsv2_jax.benchmark import bench_config
    from dsv2_jax.cache import init_cache
    from dsv2_jax.decode import AbsorbedWeights, absorb, decode_step, prefill

    cfg = bench_config()
    model = init_model(cfg, seed=0)
    graphdef, state = nnx.split(model)
    B, T = a.batch, a.context
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T)), jnp.int32)
    lengths = jnp.full((B,), T, jnp.int32)
    cache = jax.jit(lambda st: prefill(nnx.merge(graphdef, st), ids, lengths,
                                       init_cache(cfg, B, T + a.steps + 64))[1])(state)
    absorbed = jax.jit(lambda st, rows: absorb(nnx.merge(graphdef, st), B, rows), static_argnums=1)
    rows = absorbed(state, None)  # what generate chooses
    if rows.layer_states is None:
        raise SystemExit(f"batch {B} on {jax.default_backend()} x {jax.device_count()} device(s) "
                         "takes neither per-layer copies nor the few-row form (decode.layer_copies)")
    forms = {"dot": AbsorbedWeights(rows.w_uk, rows.w_uv)}
    if rows.head_rows is None:  # one row: the copies keep the dot layout
        forms["layers"] = rows
    else:
        forms["layers"] = absorbed(state, False)  # the copies in the dot layout
        forms.update(head=rows.replace(layer_states=None, layer_graphdefs=None), rows=rows)

    @jax.jit
    def run(weights, cache, st):
        m = nnx.merge(graphdef, st)

        def body(_, carry):
            cache, tok = carry
            logits, cache = decode_step(m, weights, cache, tok)
            return cache, jnp.argmax(logits, -1).astype(jnp.int32)

        return jax.lax.fori_loop(0, a.steps, body, (cache, jnp.zeros((B,), jnp.int32)))[1]

    outs = {k: np.asarray(run(w, cache, state)) for k, w in forms.items()}  # compile, and agree
    same = all(np.array_equal(outs["dot"], o) for o in outs.values())
    ms = {k: [] for k in forms}
    for _ in range(a.rounds):
        for k, w in forms.items():
            t = time.perf_counter()
            run(w, cache, state).block_until_ready()
            ms[k].append((time.perf_counter() - t) / a.steps * 1e3)
    print(f"bench config, batch {B}, {T}-token context, {a.steps} steps x {a.rounds} rounds; "
          f"same greedy tokens in all forms: {same}")
    for k, v in ms.items():
        print(f"{k:6s} {statistics.median(v):7.1f} ms/step   ({' '.join(f'{x:.1f}' for x in v)})")


if __name__ == "__main__":
    main()
