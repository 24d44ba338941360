"""Where the train step's time goes, ours against transformers, component by component.

    python scripts/bench_components.py [--batch-size 4] [--seq-len 512] [--rounds 3]

On the bench config (the `dsv2 bench` model, same weights on both sides), times forward +
backward (gradients of every weight and of the input) of each part of a decoder stack alone,
alternating ours (jit) and transformers (PyTorch autograd) round by round:

* attention: layer 1's MLA (q, latent kv, up-projection, causal attention, output);
* moe: layer 1's MoE (router, 6 of 32 routed experts per token, 2 shared);
* dense mlp: layer 0's SwiGLU MLP;
* head + ce: final norm, output head and the cross entropy (ours: the train step's
  `chunked_cross_entropy`).

Prints one row per part (ms each side, ratio transformers / ours, share of our sum) and a JSON
line. A ratio under 1 is where this project is slower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from dsv2_jax.attention import attention_mask
    from dsv2_jax.benchmark import bench_config, models
    from dsv2_jax.layers import use
    from dsv2_jax.rope import rope_cos_sin
    from dsv2_jax.train.loss import chunked_cross_entropy

    cfg = bench_config()
    hf, model = models(cfg)
    hf.train()
    B, T, D = a.batch_size, a.seq_len, cfg.hidden_size
    rng = np.random.default_rng(0)
    x_np = rng.normal(size=(B, T, D)).astype(np.float32)
    labels_np = rng.integers(0, cfg.vocab_size, (B, T))
    x, labels = jnp.asarray(x_np), jnp.asarray(labels_np, jnp.int32)
    ones = jnp.ones((B, T), jnp.float32)
    tx = torch.tensor(x_np, requires_grad=True)
    tlabels = torch.as_tensor(labels_np, dtype=torch.long)

    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cos, sin = rope_cos_sin(cfg, positions)
    seg = jnp.ones((B, T), jnp.int32)
    mask = attention_mask(seg, seg)
    pos_t = torch.arange(T)[None].expand(B, T)
    freqs = hf.model.rotary_emb(tx, pos_t)

    class Head(nnx.Module):  # the final norm and output head alone (no gradient of the rest)
        def __init__(self, norm, lm_head):
            self.norm, self.lm_head = norm, lm_head

    l0, l1 = model.layer(0), model.layer(1)
    h0, h1 = hf.model.layers[0], hf.model.layers[1]

    def ours(module, f):
        g = nnx.jit(nnx.grad(f, argnums=(0, 1)))
        return lambda: jax.block_until_ready(g(module, x))

    def theirs(f, params):
        def run():
            for p in params:
                p.grad = None
            tx.grad = None
            f(tx).backward()
        return run

    parts = {
        "attention": (ours(l1.self_attn, lambda m, x: jnp.sum(m(x, cos, sin, mask) ** 2)),
                      theirs(lambda x: (h1.self_attn(x, attention_mask=None, position_embeddings=freqs)[0] ** 2).sum(),
                             list(h1.self_attn.parameters()))),
        "moe": (ours(l1.mlp, lambda m, x: jnp.sum(m(x, train=True)[0] ** 2)),
                theirs(lambda x: (h1.mlp(x) ** 2).sum(), list(h1.mlp.parameters()))),
        "dense mlp": (ours(l0.mlp, lambda m, x: jnp.sum(m(x) ** 2)),
                      theirs(lambda x: (h0.mlp(x) ** 2).sum(), list(h0.mlp.parameters()))),
        "head + ce": (ours(Head(model.norm, model.lm_head),
                           lambda m, x: chunked_cross_entropy(m.norm(x), use(m.lm_head.kernel), labels, ones,
                                                              cfg.ce_chunk)[0] / (B * T)),
                      theirs(lambda x: torch.nn.functional.cross_entropy(
                          hf.lm_head(hf.model.norm(x)).view(B * T, -1), tlabels.view(-1)),
                          list(hf.lm_head.parameters()) + list(hf.model.norm.parameters()))),
    }
    res = {}
    for name, (o, h) in parts.items():
        o(), h()
        to, th = [], []
        for _ in range(a.rounds):
            t = time.perf_counter(); o(); to.append(time.perf_counter() - t)
            t = time.perf_counter(); h(); th.append(time.perf_counter() - t)
        res[name] = {"ours_ms": 1e3 * statistics.median(to), "hf_ms": 1e3 * statistics.median(th)}
        res[name]["ratio"] = res[name]["hf_ms"] / res[name]["ours_ms"]
    total = sum(r["ours_ms"] for r in res.values())
    print(f"forward + backward, {B} x {T} tokens, median of {a.rounds} alternating rounds")
    print("| part | ours ms | transformers ms | ratio | share of ours |")
    print("|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['ours_ms']:.1f} | {r['hf_ms']:.1f} | {r['ratio']:.2f}x | "
              f"{100 * r['ours_ms'] / total:.0f}% |")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
