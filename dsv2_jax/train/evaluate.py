"""`dsv2 eval`: loss, perplexity and bits per byte on held-out data."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dsv2_jax.compile_options import jit_forward
from dsv2_jax.train.step import ModelFns, make_eval_step, params_of


def load_for_eval(path: str, mesh=None):
    """(model config, params pure dict, ModelFns) from a training workdir (its newest
    checkpoint that restores), an HF directory or a dsv2 Orbax checkpoint; placed sharded under `mesh`."""
    from dsv2_jax import from_pretrained

    model = from_pretrained(path, mesh=mesh)
    return model.cfg, params_of(model), ModelFns.from_model(model)


def evaluate(model_path: str, data: str, *, batch_size: int = 8, seq_len: int = 256,
             max_batches: int | None = None, progress: bool = True, mesh: str | None = None,
             coordinator: str | None = None, num_processes: int | None = None,
             process_id: int | None = None) -> dict:
    """Loss, perplexity and bits per byte of a model on held-out data. Every process sees the
    same batches; with `mesh` the model is loaded sharded and each batch split over the
    data-carrying axes."""
    import contextlib

    from dsv2_jax.sharding import hosts
    from dsv2_jax.train.data import make_eval_iter, parse_spec

    # A malformed SPEC or size is refused before the model loads.
    parse_spec(data)
    for flag, value in (("--batch-size", batch_size), ("--seq-len", seq_len), ("--max-batches", max_batches)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    hosts.initialize(coordinator, num_processes, process_id)
    place = jnp.asarray
    mesh_obj = None
    if mesh:
        from dsv2_jax.sharding.mesh import batch_sharding, make_mesh
        from dsv2_jax.sharding.rules import batch_axes

        mesh_obj = make_mesh(mesh)
        bsh = batch_sharding(mesh_obj)
        n = math.prod(dict(mesh_obj.shape)[a] for a in batch_axes(mesh_obj))
        if batch_size % n:
            raise ValueError(f"--batch-size {batch_size} is not divisible by the {n} data-parallel "
                             f"devices of --mesh {mesh}")
        # Every process holds the same batch; each device takes its rows.
        place = lambda v: jax.make_array_from_callback(v.shape, bsh, lambda idx: v[idx])
    cfg, params, fns = load_for_eval(model_path, mesh_obj)
    if seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    step = jit_forward(make_eval_step(fns, cfg))
    ce_sum, tokens, nbytes = 0.0, 0.0, 0
    bar = _EvalProgress(max_batches, enabled=progress and hosts.is_primary())
    try:
        for batch in make_eval_iter(data, seq_len=seq_len, batch_size=batch_size,
                                    max_batches=max_batches, vocab_size=cfg.vocab_size):
            nb = int(batch["num_bytes"].sum())
            with jax.set_mesh(mesh_obj) if mesh_obj is not None else contextlib.nullcontext():
                s, n = step(params, {k: place(v) for k, v in batch.items() if k != "num_bytes"})
            ce_sum += float(s)
            tokens += float(n)
            nbytes += nb
            bar.update(ce_sum / max(tokens, 1.0))
    finally:
        bar.close()
    if tokens == 0:
        raise ValueError(f"--data {data!r}: no evaluation tokens")
    loss = ce_sum / tokens
    # Pre-tokenised (npy) data carries no byte counts: no bits per byte then.
    bpb = ce_sum / (math.log(2) * nbytes) if nbytes else None
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": bpb,
            "tokens": int(tokens), "bytes": nbytes}


class _EvalProgress:
    """Progress over the evaluation batches, on stderr: a tqdm bar on a terminal, a line every
    10 batches otherwise (the number of batches is known only with --max-batches)."""

    def __init__(self, total: int | None, enabled: bool = True):
        import sys

        self.enabled, self.n, self.tty = enabled, 0, sys.stderr.isatty()
        self.bar = None
        if enabled and self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="batch", desc="eval", dynamic_ncols=True)

    def update(self, loss: float) -> None:
        import sys

        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
            self.bar.update(1)
        elif self.enabled and (self.n == 1 or self.n % 10 == 0):
            print(f"eval: {self.n} batches, running loss {loss:.4f}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
