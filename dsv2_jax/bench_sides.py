"""The two sides of `dsv2 bench` (this project, HF transformers), here or each in a worker
process of its own (`dsv2 bench --isolate`).

A user trains or decodes with one framework in a process, not both; in one process the two
share a malloc heap and two thread pools. `WorkerSide` gives a side a process of its own,
started once and kept for the run: it loads the same checkpoint, prepares a case on command
(compiles, warms up, measures the resident memory it adds), then times calls of it, while
the parent alternates the two sides' calls as before, so that both still see the same
moments of a noisy machine. `Side` is the same thing in this process, the default.

Measured on this repository's 2-core host (2026-12-01, `dsv2 bench --only train --rounds 3`,
the two modes alternating, two runs each; docs/benchmarks.md): with a process each,
transformers ran 289 / 293 tok/s against 277 / 274 in one process, ours 224 / 244 against
235 / 249, the ratio 0.78x / 0.83x against 0.85x / 0.91x. Each side alone, in a process of
its own and not alternating, ran ~266-286 (ours) and ~279-306 tok/s (transformers); inside
one isolated run our rounds took 14.9 s back to back and 17.4 s with one of transformers'
between each, transformers' 13.9 and 14.7: the other process's rounds cost our step 10-15%,
transformers' ~5%. The default stays one process, the measurement every earlier table used.

A case is a function of (the side's model, cfg, **kw) that returns the work: a callable
whose calls are timed. `CASES[side][name]` holds them.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import traceback

OURS, THEIRS = "dsv2_jax", "transformers"


# ---------------------------------------------------------------------------------------
# The cases, one function per side and row. Inputs come from `benchmark._batch` with a fixed
# seed, so the two sides see the same tokens.


def _ours_train(model, cfg, B, T, steps):
    import jax

    from dsv2_jax.benchmark import _batch
    from dsv2_jax.train.optim import lr_schedule, make_optimizer
    from dsv2_jax.train.step import ModelFns, init_state, make_train_step, params_of

    _, batch = _batch(cfg, B, T)
    sched = lr_schedule(1e-4, 1000, 0, "constant")
    tx = make_optimizer(sched)
    step = jax.jit(make_train_step(ModelFns.from_model(model), cfg, tx, sched), donate_argnums=0)
    holder = {"state": init_state(jax.tree.map(lambda a: a.copy(), params_of(model)), tx)}

    def run():
        for _ in range(steps):
            holder["state"], m = step(holder["state"], batch)
        jax.block_until_ready(m["loss"])
    return run


def _theirs_train(hf, cfg, B, T, steps):
    import torch

    from dsv2_jax.benchmark import _batch, hf_train_steps

    ids, _ = _batch(cfg, B, T)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tids = torch.as_tensor(ids[:, :T], dtype=torch.long)
    return lambda: hf_train_steps(hf, opt, tids, steps)


def _ours_prefill(model, cfg, B, T):
    import jax
    from flax import nnx

    from dsv2_jax.benchmark import _batch
    from dsv2_jax.compile_options import jit_forward

    _, batch = _batch(cfg, B, T, seed=1)
    graphdef, state = nnx.split(model)
    fwd = jit_forward(lambda st, x: nnx.merge(graphdef, st)(x))  # the options `dsv2 eval` compiles with
    return lambda: jax.block_until_ready(fwd(state, batch["inputs"]))


def _theirs_prefill(hf, cfg, B, T):
    import torch

    from dsv2_jax.benchmark import _batch

    ids, _ = _batch(cfg, B, T, seed=1)
    hf.eval()
    tids = torch.as_tensor(ids[:, :T], dtype=torch.long)

    def run():
        with torch.no_grad():
            hf(tids)
    return run


def _decode_ids(cfg, B, T):
    import numpy as np

    return np.random.default_rng(2).integers(0, cfg.vocab_size, (B, T)).astype(np.int32)


def _ours_decode(model, cfg, B, T):
    from dsv2_jax.generation import generate

    ids = _decode_ids(cfg, B, T)
    return lambda n: generate(model, ids, n)


def _theirs_decode(hf, cfg, B, T):
    import torch

    tids = torch.as_tensor(_decode_ids(cfg, B, T), dtype=torch.long)
    hf.eval()

    def run(n):
        with torch.no_grad():
            hf.generate(tids, attention_mask=torch.ones_like(tids), max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, eos_token_id=None, pad_token_id=0)
    return run


CASES = {
    OURS: {"train": _ours_train, "prefill": _ours_prefill, "decode": _ours_decode},
    THEIRS: {"train": _theirs_train, "prefill": _theirs_prefill, "decode": _theirs_decode},
}


# ---------------------------------------------------------------------------------------
# A side in this process, and the same side behind a pipe in a worker process.


def load_side(side: str, cfg, checkpoint: str):
    """The side's model from the HF checkpoint directory both sides load."""
    if side == THEIRS:
        from transformers import DeepseekV2ForCausalLM

        from dsv2_jax.benchmark import hf_config

        hf = DeepseekV2ForCausalLM.from_pretrained(checkpoint, config=hf_config(cfg), attn_implementation="sdpa")
        return hf.float()
    from dsv2_jax import from_pretrained

    knobs = {k: getattr(cfg, k) for k in ("scan_unroll", "attn_impl", "moe_backend", "ce_chunk", "remat")}
    return from_pretrained(checkpoint, dtype="float32", **knobs)  # the runtime knobs of the preset


class Side:
    """One side's model and prepared cases, in this process."""

    def __init__(self, side: str, cfg, checkpoint: str):
        self.side, self.cfg = side, cfg
        self.model = load_side(side, cfg, checkpoint)
        self.work: dict = {}

    def prepare(self, key: str, case: str, warm=((),), **kw) -> float:
        """Builds case `case` as `key` and calls it once per argument tuple of `warm` (compiles,
        first-call costs): -> the megabytes of resident memory those calls added at their peak."""
        from dsv2_jax.benchmark import PeakRSS

        self.work[key] = fn = CASES[self.side][case](self.model, self.cfg, **kw)
        with PeakRSS() as p:
            for args in warm:
                fn(*args)
        return p.added_mb

    def time(self, key: str, *args) -> float:
        """Seconds of one call of a prepared case."""
        from dsv2_jax.benchmark import _timed

        fn = self.work[key]
        return _timed(lambda: fn(*args))

    def drop(self, key: str) -> None:
        """Forgets a case (and the optimizer state or caches it held)."""
        import gc

        self.work.pop(key, None)
        gc.collect()

    def close(self) -> None:
        self.work.clear()
        self.model = None


def _serve(conn, side: str, cfg, checkpoint: str) -> None:
    """A worker's loop: build the Side, then answer ("ok", result) or ("error", traceback) to
    each (method, args, kwargs) until told to close."""
    try:
        s = Side(side, cfg, checkpoint)
        conn.send(("ok", os.getpid()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            method, args, kwargs = conn.recv()
        except EOFError:  # the parent is gone
            return
        try:
            out = getattr(s, method)(*args, **kwargs)
            conn.send(("ok", out))
        except BaseException:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))
        if method == "close":
            return


class WorkerSide:
    """A Side in a spawned worker process: the same methods, each a round trip over a pipe.
    A failure in the worker is raised here with the worker's traceback."""

    def __init__(self, side: str, cfg, checkpoint: str):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited heap or threads
        self.side = side
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, side, cfg, checkpoint), daemon=True,
                                 name=f"bench-{side}")
        self._proc.start()
        child.close()
        self._answer("start")

    def _died(self, what: str) -> RuntimeError:
        self._proc.join(5)
        return RuntimeError(f"the {self.side} bench worker died during {what} (exit code "
                            f"{self._proc.exitcode}; its output, above, says why; killed by the "
                            f"kernel if negative, e.g. out of memory)")

    def _answer(self, what: str):
        try:
            status, out = self._conn.recv()
        except (EOFError, OSError):
            raise self._died(what) from None
        if status == "error":
            raise RuntimeError(f"the {self.side} bench worker failed during {what}:\n{out}")
        return out

    def _call(self, method: str, *args, **kwargs):
        try:
            self._conn.send((method, args, kwargs))
        except OSError:  # the pipe's other end is gone
            raise self._died(method) from None
        return self._answer(method)

    def prepare(self, key: str, case: str, warm=((),), **kw) -> float:
        return self._call("prepare", key, case, warm, **kw)

    def time(self, key: str, *args) -> float:
        return self._call("time", key, *args)

    def drop(self, key: str) -> None:
        self._call("drop", key)

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._call("close")
            except (RuntimeError, OSError):
                pass
            self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()


class Sides:
    """Both sides of a run (isolate: each in a worker process), from one random-init
    transformers model (seed 0) saved once to a temporary HF checkpoint that both load. A
    context manager: the workers and the directory are gone on exit, whatever happened."""

    def __init__(self, cfg, isolate: bool = False):
        self.cfg, self.isolate = cfg, isolate
        self.ours = self.theirs = None

    def __enter__(self):
        from dsv2_jax.benchmark import save_reference

        self._dir = tempfile.TemporaryDirectory(prefix="dsv2-bench-")
        save_reference(self.cfg, self._dir.name)
        make = WorkerSide if self.isolate else Side
        try:
            self.theirs = make(THEIRS, self.cfg, self._dir.name)
            self.ours = make(OURS, self.cfg, self._dir.name)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for s in (self.ours, self.theirs):
            if s is not None:
                s.close()
        self.ours = self.theirs = None
        self._dir.cleanup()
