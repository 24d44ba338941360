"""Logit error of the quantised latent caches against the float32 cache, on a model.

    python scripts/cache_error.py --model runs/tiny [--text FILE] [--prompt 16] [--steps 240]

Teacher-forces one text through prefill + absorbed decode steps with each cache kind (the
same tokens, so only the cache differs) and prints, per kind, the relative logit error
(max |dlogit| / max |logit| at a position: the worst position and the median one), the mean
KL divergence from the float32 cache's next-token distribution, and how often the argmax
agrees. The text
defaults to this script's own source (Python, what the tiny preset is trained on); models
without a byte-level vocabulary get random ids.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", default=__file__)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--steps", type=int, default=240)
    a = ap.parse_args()

    from dsv2_jax import from_pretrained
    from dsv2_jax.cache import CACHE_KINDS, init_cache
    from dsv2_jax.cli_generate import load_tokenizer
    from dsv2_jax.decode import teacher_forced_logits
    from dsv2_jax.generation import bucket

    model = from_pretrained(a.model, dtype="float32")
    cfg = model.cfg
    T = a.prompt + a.steps
    tok = load_tokenizer(a.model, cfg.vocab_size)
    if tok is not None:
        flat = np.asarray(tok.encode(open(a.text, encoding="utf-8").read()), np.int32)
        need = a.batch * T
        flat = np.tile(flat, -(-need // len(flat)))[:need]
        ids = flat.reshape(a.batch, T)
    else:
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (a.batch, T)).astype(np.int32)
    lengths = jnp.full((a.batch,), a.prompt, jnp.int32)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, static_argnames="kind")
    def run(state, kind):
        m = nnx.merge(graphdef, state)
        cache = init_cache(m.cfg, a.batch, bucket(T), kind)
        return teacher_forced_logits(m, jnp.asarray(ids), lengths, a.steps, cache)

    base = np.asarray(run(state, "float32"), np.float64)
    logp0 = jax.nn.log_softmax(base, -1)
    print(f"{a.model}: {a.batch} x ({a.prompt} prompt + {a.steps} decoded) tokens, float32 compute")
    print(f"{'cache':>9} {'bytes/token':>12} {'rel logit err: max':>19} {'median':>8} "
          f"{'mean KL (nats)':>15} {'argmax agree':>13}")
    from dsv2_jax.cache import cache_size

    for kind in CACHE_KINDS:
        got = np.asarray(run(state, kind), np.float64)
        rel = np.abs(got - base).max(-1) / np.abs(base).max(-1)  # per position
        logp = jax.nn.log_softmax(got, -1)
        kl = float(np.mean(np.sum(np.exp(logp0) * (logp0 - logp), -1)))
        agree = float(np.mean(got.argmax(-1) == base.argmax(-1)))
        print(f"{kind:>9} {cache_size(cfg, kind).bytes_per_token:>12} {rel.max():>19.2e} "
              f"{np.median(rel):>8.1e} {kl:>15.2e} {agree:>13.3f}")


if __name__ == "__main__":
    main()
