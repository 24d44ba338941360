"""`dsv2 train`: the training loop. Rerunning the same command on the same workdir resumes
from the newest good checkpoint there, with bit-identical losses.

workdir/
  config.json       the model config the run trains (official form + dsv2_jax knobs)
  run.json          the training arguments of the first run
  checkpoints/N/    Orbax: state (params, optimizer, step, counters) + data iterator
  damaged/N/        checkpoints that failed to restore, moved aside
  metrics.jsonl     one JSON object per step
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time

import jax

from dsv2_jax.config import DeepseekV2Config, load_config
from dsv2_jax.errors import UserError
from dsv2_jax.train import metrics as M
from dsv2_jax.train.checkpointing import TrainCheckpoints
from dsv2_jax.train.optim import lr_schedule, make_optimizer
from dsv2_jax.train.step import ModelFns, init_state, make_train_step, params_of


# Arguments that define the data stream a checkpointed iterator belongs to.
_DATA_ARGS = ("data", "seq_len", "batch_size", "seed")


class TrainingError(UserError, RuntimeError):
    """A run that cannot go on; the message says why and what was kept."""


@dataclasses.dataclass
class TrainArgs:
    config: str = "tiny"
    workdir: str = "runs/tiny"
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 256
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    data: str = "stdlib"
    init_from: str | None = None
    set: list = dataclasses.field(default_factory=list)
    lr: float = 3e-3
    warmup_steps: int | None = None
    schedule: str = "cosine"
    weight_decay: float = 0.1
    clip: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    max_nonfinite: int = 10
    mesh: str | None = None
    log_every: int = 10
    peak_tflops: float | None = None
    stop_after: int | None = None  # stop (with a checkpoint) after this step; for tests


def _resolve_config(args: TrainArgs) -> DeepseekV2Config:
    saved = os.path.join(args.workdir, "config.json")
    if args.init_from:
        cfg = DeepseekV2Config.from_hf(os.path.join(args.init_from, "config.json"))
    else:
        cfg = load_config(args.config)
    cfg = cfg.with_overrides(args.set)
    if os.path.exists(saved):
        prev = DeepseekV2Config.from_hf(saved)
        if prev != cfg:
            diff = [f.name for f in dataclasses.fields(cfg) if getattr(prev, f.name) != getattr(cfg, f.name)]
            raise TrainingError(f"{args.workdir} holds a run of a different config (fields {diff}); "
                                f"use another --workdir or the same --config/--set")
    return cfg


def _initial_params(cfg: DeepseekV2Config, args: TrainArgs, abstract_params) -> dict:
    """Fresh parameters, or those of --init-from (checked against the run's config, whose
    --set overrides govern the graph either way)."""
    from flax import nnx

    from dsv2_jax.model import DeepseekV2ForCausalLM

    if not args.init_from:
        return params_of(DeepseekV2ForCausalLM(cfg, rngs=nnx.Rngs(params=args.seed)))
    from dsv2_jax import from_pretrained

    params = params_of(from_pretrained(args.init_from, dtype=cfg.param_dtype, compute_dtype=cfg.dtype))
    want = jax.tree.map(lambda a: (a.shape, a.dtype), abstract_params)
    got = jax.tree.map(lambda a: (a.shape, a.dtype), params)
    if want != got:
        raise TrainingError(f"--init-from {args.init_from}: its parameters do not fit the config "
                            f"after --set (an architecture field was overridden?)")
    return params


def _expert_parallel_config(cfg: DeepseekV2Config, ep: int) -> DeepseekV2Config:
    """The config the graph runs with on an `expert` axis of size ep > 1: device-limited
    routing and the device/communication losses count the ep devices as the device groups
    (num_device_groups 0 -> ep with max_devices_per_token = ep: no limit). The config
    saved in the workdir stays the one given."""
    if ep == 1:
        return cfg
    if cfg.capacity_factor is not None:
        raise TrainingError("token dropping (capacity_factor) is not supported with expert "
                            "parallelism yet: use --set capacity_factor=null or no expert axis")
    if cfg.n_routed_experts % ep:
        raise TrainingError(f"--mesh expert={ep}: n_routed_experts={cfg.n_routed_experts} is not "
                            f"divisible by {ep}")
    if cfg.num_device_groups == 0:
        return cfg.replace(num_device_groups=ep, max_devices_per_token=ep)
    if cfg.num_device_groups != ep:
        raise TrainingError(f"--mesh expert={ep}: num_device_groups={cfg.num_device_groups} must "
                            f"equal the expert-parallel size (the devices are the device groups); "
                            f"use --set num_device_groups={ep} (or 0)")
    return cfg


def train(args: TrainArgs, log=print) -> dict:
    """Runs (or resumes) training; returns the last step's metrics."""
    from dsv2_jax.sharding.mesh import batch_sharding, make_mesh, replicated
    from dsv2_jax.sharding.rules import optimizer_shardings, param_shardings

    try:
        mesh = make_mesh(args.mesh)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    if args.batch_size % n_batch_shards or args.batch_size % jax.process_count():
        raise TrainingError(f"--batch-size {args.batch_size} is not divisible by the {n_batch_shards} "
                            f"data-parallel devices and {jax.process_count()} processes")
    for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "keep_checkpoints",
                 "grad_accum", "log_every", "max_nonfinite"):
        if getattr(args, name) < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.batch_size % args.grad_accum:
        raise TrainingError(f"--batch-size {args.batch_size} is not divisible by --grad-accum {args.grad_accum}")
    os.makedirs(args.workdir, exist_ok=True)
    cfg = _resolve_config(args)
    cfg.save(os.path.join(args.workdir, "config.json"))
    cfg = _expert_parallel_config(cfg, mesh.shape["expert"])
    run_json = os.path.join(args.workdir, "run.json")
    if os.path.exists(run_json):
        # The saved data-iterator state only means something for the same data stream.
        with open(run_json) as f:
            first = json.load(f)
        changed = [k for k in _DATA_ARGS if k in first and first[k] != getattr(args, k)]
        if changed:
            raise TrainingError(
                f"{args.workdir} was trained with other data settings ("
                + ", ".join(f"--{k.replace('_', '-')} {first[k]!r}" for k in changed)
                + "); resume with the same ones or use a new --workdir")
    else:
        with open(run_json, "w") as f:
            json.dump(dataclasses.asdict(args), f, indent=2)

    from dsv2_jax.train.data import make_train_iter

    # Each process reads its own share of the global batch.
    data_iter = make_train_iter(args.data, seq_len=args.seq_len,
                                batch_size=args.batch_size // jax.process_count(),
                                seed=args.seed, vocab_size=cfg.vocab_size)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(2000, args.steps // 10)
    schedule = lr_schedule(args.lr, args.steps, warmup, args.schedule)
    tx = make_optimizer(schedule, weight_decay=args.weight_decay, clip=args.clip)

    from flax import nnx

    from dsv2_jax.model import DeepseekV2ForCausalLM

    ckpts = TrainCheckpoints(os.path.join(args.workdir, "checkpoints"), keep=args.keep_checkpoints, log=log)
    # The graph always comes from the run's config (overrides included).
    abstract_model = nnx.eval_shape(lambda: DeepseekV2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    fns = ModelFns.from_model(abstract_model)
    params = params_of(abstract_model) if ckpts.steps() else _initial_params(cfg, args, params_of(abstract_model))
    # Parameters and optimizer state are replicated over the mesh except the routed experts
    # (and their Adam moments), split over `expert`; batches are split over data x expert.
    rep, bsh = replicated(mesh), batch_sharding(mesh)
    state_shape = jax.eval_shape(lambda p: init_state(p, tx), params)
    params_sh = param_shardings(abstract_model, mesh)
    state_sh = {"params": params_sh,
                "opt_state": optimizer_shardings(tx, state_shape["opt_state"], params_sh, mesh),
                "step": rep, "nonfinite": rep}
    if ckpts.steps():
        abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                state_shape, state_sh)
        step0, state = ckpts.restore_latest(abstract, data_iter)
        log(f"resumed from {ckpts.directory}/{step0}")
    else:
        step0, state = 0, jax.device_put(init_state(params, tx), state_sh)
    del params

    step_fn = jax.jit(make_train_step(fns, cfg, tx, schedule, args.grad_accum), donate_argnums=0,
                      out_shardings=(state_sh, rep))
    tokens_per_step = args.batch_size * args.seq_len
    flops_tok = M.train_flops_per_token(cfg, args.seq_len)
    peak = (args.peak_tflops * 1e12 if args.peak_tflops else M.peak_flops_per_device(cfg.dtype))
    peak = peak * jax.device_count() if peak else None
    mlog = M.MetricsLog(os.path.join(args.workdir, "metrics.jsonl"), step0)
    last_stop = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    progress = M.Progress(step0, args.steps, args.log_every)
    consecutive_bad, rec = 0, {}
    # SIGTERM / a first Ctrl-C ask for a checkpoint at the next step boundary and a clean stop
    # (saving from inside a step could pair the state with the wrong step or batch); a second
    # Ctrl-C interrupts at once.
    interrupted: list[str] = []

    def on_signal(signum, _frame):
        if signum == signal.SIGINT and interrupted:
            raise KeyboardInterrupt
        interrupted.append(signal.Signals(signum).name)

    # Signal handlers can only be installed from the main thread (train() may run elsewhere,
    # e.g. in a notebook worker thread; there signals keep their default behaviour).
    old_handlers = ({sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
                    if threading.current_thread() is threading.main_thread() else {})
    # Under the mesh: the MoE layers see its `expert` axis and dispatch over it.
    mesh_ctx = jax.set_mesh(mesh)
    mesh_ctx.__enter__()
    try:
        step = step0
        while step < last_stop:
            batch = next(data_iter)
            batch = {k: jax.make_array_from_process_local_data(bsh, v)
                     for k, v in batch.items() if k != "num_bytes"}
            t0 = time.perf_counter()
            state, m = step_fn(state, batch)
            m = jax.device_get(m)
            dt = time.perf_counter() - t0
            step += 1
            rec = {"step": step, **{k: float(v) for k, v in m.items()
                                    if k not in ("finite", "ce_sum", "nonfinite_total")},
                   "finite": bool(m["finite"]), "step_time": dt, "tokens_per_sec": tokens_per_step / dt,
                   "nonfinite_total": int(m["nonfinite_total"])}
            rec["mfu"] = (flops_tok * tokens_per_step / dt / peak) if peak else None
            mlog.write(rec)
            progress.update(rec)
            consecutive_bad = 0 if rec["finite"] else consecutive_bad + 1
            if consecutive_bad >= args.max_nonfinite:
                ckpts.wait()
                kept = ckpts.steps()
                raise TrainingError(
                    f"loss or gradients were non-finite for {consecutive_bad} consecutive steps "
                    f"(up to step {step}); stopping. Updates of those steps were skipped; the last "
                    f"good checkpoint is step {kept[-1] if kept else 'none'} in {ckpts.directory}")
            # No checkpoint while steps are non-finite: the newest one stays the last good one.
            due = step % args.checkpoint_every == 0 or step == last_stop or interrupted
            if due and consecutive_bad == 0:
                ckpts.save(step, state, data_iter)
            if interrupted:
                saved = "saved step" if consecutive_bad == 0 else "non-finite, not saved: step"
                log(f"{interrupted[0]}: {saved} {step}, stopping")
                break
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        progress.close()
        mlog.close()
        ckpts.close()
        mesh_ctx.__exit__(None, None, None)
    return rec
