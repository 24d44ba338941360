"""Train-step throughput: dsv2_jax (the `dsv2 train` step) vs HF transformers (PyTorch) on the
same config, batch and sequence length, measured side by side in one process.

    python scripts/bench_train.py --config tiny --batch-size 8 --seq-len 256

Both run float32 on the CPU, AdamW, the same batches; rounds alternate (ours, theirs) so that
machine noise hits both. Prints tokens/s of each per round and the median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def hf_model(cfg):
    import torch
    from transformers import DeepseekV2ForCausalLM

    from dsv2_jax.benchmark import hf_config

    torch.manual_seed(0)
    return DeepseekV2ForCausalLM(hf_config(cfg)).float().train()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()

    import torch

    from dsv2_jax import init_model, load_config
    from dsv2_jax.benchmark import hf_train_steps
    from dsv2_jax.train.optim import lr_schedule, make_optimizer
    from dsv2_jax.train.step import ModelFns, init_state, make_train_step, params_of

    cfg = load_config(a.config, dtype="float32", param_dtype="float32")
    B, T = a.batch_size, a.seq_len
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (B, T + 1))

    model = init_model(cfg)
    fns = ModelFns.from_model(model)
    sched = lr_schedule(1e-4, 1000, 0, "constant")
    tx = make_optimizer(sched)
    step = jax.jit(make_train_step(fns, cfg, tx, sched), donate_argnums=0)
    state = init_state(params_of(model), tx)
    batch = {"inputs": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
             "segment_ids": jnp.ones((B, T), jnp.int32), "loss_mask": jnp.ones((B, T), jnp.int32)}

    hf = hf_model(cfg)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tids = torch.as_tensor(ids[:, :T], dtype=torch.long)

    def ours(n):
        nonlocal state
        for _ in range(n):
            state, m = step(state, batch)
        jax.block_until_ready(m["loss"])

    def theirs(n):
        hf_train_steps(hf, opt, tids, n)

    ours(2)
    theirs(2)  # warm-up (compilation, allocator)
    rows = []
    for r in range(a.rounds):
        t = time.perf_counter(); ours(a.steps); t_ours = time.perf_counter() - t
        t = time.perf_counter(); theirs(a.steps); t_hf = time.perf_counter() - t
        tok = B * T * a.steps
        rows.append((tok / t_ours, tok / t_hf))
        print(f"round {r}: dsv2_jax {tok / t_ours:9.0f} tok/s   transformers {tok / t_hf:9.0f} tok/s   "
              f"ratio {t_hf / t_ours:.2f}x", flush=True)
    ratio = statistics.median(o / h for o, h in rows)
    print(f"config {a.config}, batch {B} x seq {T}, float32, {jax.devices()[0].platform}: "
          f"median ratio dsv2_jax / transformers = {ratio:.2f}x "
          f"(jax {jax.__version__}, torch {torch.__version__}, {torch.get_num_threads()} torch threads)")


if __name__ == "__main__":
    main()
