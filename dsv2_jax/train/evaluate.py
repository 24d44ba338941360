"""`dsv2 eval`: loss, perplexity and bits per byte on held-out data."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp

from dsv2_jax.config import DeepseekV2Config
from dsv2_jax.train.step import ModelFns, init_state, make_eval_step, params_of


def load_for_eval(path: str):
    """(model config, params pure dict, ModelFns) from a training workdir (newest good
    checkpoint), an HF directory or a dsv2 Orbax checkpoint."""
    from flax import nnx

    from dsv2_jax.model import DeepseekV2ForCausalLM

    if os.path.isdir(os.path.join(path, "checkpoints")):
        from dsv2_jax.train.checkpointing import TrainCheckpoints
        from dsv2_jax.train.optim import lr_schedule, make_optimizer

        cfg = DeepseekV2Config.from_hf(os.path.join(path, "config.json"))
        with open(os.path.join(path, "run.json")) as f:
            run = json.load(f)
        model = nnx.eval_shape(lambda: DeepseekV2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
        tx = make_optimizer(lr_schedule(run["lr"], run["steps"], 0, "constant"),
                            weight_decay=run["weight_decay"], clip=run["clip"])
        params = params_of(model)
        abstract = jax.eval_shape(lambda p: init_state(p, tx), params)
        ckpts = TrainCheckpoints(os.path.join(path, "checkpoints"), keep=run["keep_checkpoints"])
        step, state = ckpts.restore_latest(abstract, None)
        ckpts.close()
        if step is None:
            raise FileNotFoundError(f"{path}: the training workdir has no checkpoint yet")
        return cfg, state["params"], ModelFns.from_model(model)
    from dsv2_jax import from_pretrained

    model = from_pretrained(path)
    return model.cfg, params_of(model), ModelFns.from_model(model)


def evaluate(model_path: str, data: str, *, batch_size: int = 8, seq_len: int = 256,
             max_batches: int | None = None) -> dict:
    from dsv2_jax.train.data import make_eval_iter

    cfg, params, fns = load_for_eval(model_path)
    step = jax.jit(make_eval_step(fns, cfg))
    ce_sum, tokens, nbytes = 0.0, 0.0, 0
    for batch in make_eval_iter(data, seq_len=seq_len, batch_size=batch_size,
                                max_batches=max_batches, vocab_size=cfg.vocab_size):
        nb = int(batch["num_bytes"].sum())
        s, n = step(params, {k: jnp.asarray(v) for k, v in batch.items() if k != "num_bytes"})
        ce_sum += float(s)
        tokens += float(n)
        nbytes += nb
    if tokens == 0:
        raise ValueError(f"--data {data!r}: no evaluation tokens")
    loss = ce_sum / tokens
    # Pre-tokenised (npy) data carries no byte counts: no bits per byte then.
    bpb = ce_sum / (math.log(2) * nbytes) if nbytes else None
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": bpb,
            "tokens": int(tokens), "bytes": nbytes}
