"""`dsv2 train`: the training loop. Rerunning the same command on the same workdir resumes
from the newest good checkpoint there, with bit-identical losses.

workdir/
  config.json       the model config the run trains (official form + dsv2_jax knobs)
  run.json          the training arguments of the first run, the process count, and the
                    history of schedule changes made by later resumes
  checkpoints/N/    Orbax: state (params, optimizer, step, counters) + data iterator
  damaged/N/        checkpoints that failed to restore, moved aside
  metrics.jsonl     one JSON object per step

Everything a run could be refused for (config, mesh, data spec, init source, resume
arguments) is checked before the first file is written, so a refused run leaves the workdir
as it was.

Multi-process runs: every process runs the same command (`sharding/hosts.py` joins them);
process 0 alone writes config.json, run.json, metrics.jsonl and moves damaged checkpoints;
Orbax has every process write its own shards of a checkpoint. Every process raises its
errors.

What a run's arguments are, and what a resume keeps, may change or refuses: `run_settings`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time

import jax
import numpy as np

from dsv2_jax.checkpoint import path_problem
from dsv2_jax.config import DeepseekV2Config
from dsv2_jax.train import metrics as M
from dsv2_jax.train.checkpointing import TrainCheckpoints, checkpoint_steps, unreadable
from dsv2_jax.train.optim import lr_schedule, make_optimizer
from dsv2_jax.train.run_settings import (TrainArgs, TrainingError, check_args, check_resume,
                                         config_name, default_workdir, flag, keep_run_settings,
                                         parse_profile_steps, resolve_config, schedule_changes,
                                         warmup_length)
from dsv2_jax.train.step import ModelFns, init_state, make_train_step, params_of


def _quiet(*_args, **_kw) -> None:
    pass


def _initial_state(cfg: DeepseekV2Config, args: TrainArgs, tx, abstract_params, mesh, state_sh):
    """The step-0 training state, created straight onto its shardings: fresh parameters by a
    jitted init with `out_shardings` (no device ever holds a whole split parameter), or those
    of --init-from, each tensor read onto its sharding (checked against the run's config,
    whose --set overrides govern the graph either way)."""
    from flax import nnx

    from dsv2_jax.model import DeepseekV2ForCausalLM

    if not args.init_from:
        def fresh():
            return init_state(params_of(DeepseekV2ForCausalLM(cfg, rngs=nnx.Rngs(params=args.seed))), tx)

        return jax.jit(fresh, out_shardings=state_sh)()
    from dsv2_jax import from_pretrained

    try:
        params = params_of(from_pretrained(args.init_from, dtype=cfg.param_dtype,
                                           compute_dtype=cfg.dtype, mesh=mesh))
    except ValueError as e:  # CheckpointError and config refusals
        raise TrainingError(f"--init-from {args.init_from}: {e}") from None
    want = jax.tree.map(lambda a: (a.shape, a.dtype), abstract_params)
    got = jax.tree.map(lambda a: (a.shape, a.dtype), params)
    if want != got:
        raise TrainingError(f"--init-from {args.init_from}: its parameters do not fit the config "
                            f"after --set (an architecture field was overridden?)")
    return jax.jit(lambda p: init_state(p, tx), out_shardings=state_sh, donate_argnums=0)(params)


def expert_parallel_config(cfg: DeepseekV2Config, ep: int, log=print) -> DeepseekV2Config:
    """`moe.routing.expert_parallel_config`, its refusals as TrainingError."""
    from dsv2_jax.moe.routing import expert_parallel_config as mapped

    try:
        return mapped(cfg, ep, log)
    except ValueError as e:
        raise TrainingError(str(e)) from None


def _keep_tokenizer(data: str, workdir: str) -> None:
    """The data's tokenizer.json, copied into the workdir (where `dsv2 generate` and `dsv2
    convert --to hf` look first): the run stays usable when the data moves or is named by a
    relative path."""
    from dsv2_jax.train.data import parse_spec

    tok = parse_spec(data).tokenizer
    dst = os.path.join(workdir, "tokenizer.json")
    if tok not in (None, "bytes") and not os.path.exists(dst):
        shutil.copyfile(tok, f"{dst}.tmp{os.getpid()}")
        os.replace(f"{dst}.tmp{os.getpid()}", dst)


def _write_json(path: str, obj) -> None:
    """Whole or not at all: other processes may read it while it is rewritten."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _describe(args: TrainArgs, cfg: DeepseekV2Config, mesh) -> str:
    from dsv2_jax.params import count_params, human_count

    total, active = count_params(cfg)
    from dsv2_jax.sharding.mesh import mesh_spec

    axes = mesh_spec(mesh) or "one device"
    dev = jax.devices()[0]
    return (f"model {config_name(args)} ({human_count(total)} parameters, {human_count(active)} "
            f"active per token); data {args.data}; mesh {axes} over {jax.device_count()} "
            f"{dev.platform} device(s); workdir {args.workdir}")


def train(args: TrainArgs, log=print) -> dict:
    """Runs (or resumes) training; returns the last step's metrics ({} when the run was
    already finished)."""
    from dsv2_jax.sharding import hosts

    try:
        hosts.initialize(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    if not hosts.is_primary():
        log = _quiet  # one voice: process 0's; errors still raise everywhere
    from dsv2_jax.sharding.mesh import batch_sharding, make_mesh, replicated
    from dsv2_jax.sharding.rules import optimizer_shardings, param_shardings

    if not args.workdir:
        args = dataclasses.replace(args, workdir=default_workdir(args.config, args.init_from))
    args = dataclasses.replace(args, workdir=os.path.expanduser(args.workdir),
                               init_from=args.init_from and os.path.expanduser(args.init_from))
    # --- everything that can refuse the run, before any file is written ---------------
    if "://" in args.workdir:
        raise TrainingError(f"--workdir {args.workdir}: a URL; the run writes plain files (config, "
                            f"metrics) there: mount the bucket (e.g. gcsfuse) and pass the mount path")
    for name in ("workdir", "init_from"):
        path = getattr(args, name)
        if path and (why := path_problem(path)):
            raise TrainingError(f"{flag(name)} {path}: {why}")
    if os.path.islink(args.workdir) and not os.path.exists(args.workdir):
        raise TrainingError(f"--workdir {args.workdir}: a symbolic link to {os.readlink(args.workdir)}, "
                            f"which does not exist: create that folder first")
    args = keep_run_settings(args, log)
    check_args(args)
    try:
        mesh = make_mesh(args.mesh)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
    if args.batch_size % n_batch_shards or args.batch_size % jax.process_count():
        raise TrainingError(f"--batch-size {args.batch_size} is not divisible by the {n_batch_shards} "
                            f"data-parallel devices and {jax.process_count()} processes")
    micro = args.batch_size // args.grad_accum
    if micro % n_batch_shards:  # each device's share of a micro-batch: whole sequences
        raise TrainingError(f"--batch-size {args.batch_size} / --grad-accum {args.grad_accum} = {micro} "
                            f"sequences per micro-batch is not divisible by the {n_batch_shards} "
                            f"data-parallel devices")
    ckdir = os.path.join(args.workdir, "checkpoints")
    done = checkpoint_steps(ckdir)
    given_cfg = resolve_config(args, resuming=bool(done), log=log)
    if args.seq_len > given_cfg.max_position_embeddings:
        raise TrainingError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings "
                            f"{given_cfg.max_position_embeddings} (--set max_position_embeddings=N "
                            f"raises it; with YaRN, mind its factor)")
    cfg = expert_parallel_config(given_cfg, mesh.shape["expert"], log)
    if cfg.n_routed_experts and not cfg.num_device_groups and (
            cfg.device_aux_loss_alpha or cfg.comm_aux_loss_alpha):
        log("device_aux_loss_alpha / comm_aux_loss_alpha are set but there are no device groups "
            "(num_device_groups 0, no expert axis): those losses are 0")
    first_run = check_resume(args, resuming=bool(done))
    changes = schedule_changes(first_run, args)
    last_stop = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    if done and done[-1] >= last_stop:
        damage = unreadable(ckdir, done[-1])
        if jax.process_count() > 1:  # one verdict for all: process 0's
            from jax.experimental import multihost_utils

            whole = bool(multihost_utils.broadcast_one_to_all(np.int32(damage is None)))
            damage = None if whole else (damage or "found damaged by process 0")
        if damage is None:
            log(f"{args.workdir}: already at step {done[-1]} of {args.steps}; nothing to do "
                f"(rerun with a larger --steps to train further)")
            return {}
        log(f"checkpoint step {done[-1]} cannot be opened ({damage}); restoring an earlier one")

    from dsv2_jax.train.data import make_train_iter

    # Each process reads its own share of the global batch.
    try:
        data_iter = make_train_iter(args.data, seq_len=args.seq_len,
                                    batch_size=args.batch_size // jax.process_count(),
                                    seed=args.seed, vocab_size=cfg.vocab_size)
    except (ValueError, FileNotFoundError) as e:
        raise TrainingError(str(e)) from None
    warmup = warmup_length(args.steps, args.warmup_steps)
    schedule = lr_schedule(args.lr, args.steps, warmup, args.schedule)
    tx = make_optimizer(schedule, weight_decay=args.weight_decay, clip=args.clip)

    from flax import nnx

    from dsv2_jax.model import DeepseekV2ForCausalLM

    log(_describe(args, cfg, mesh))
    # The graph always comes from the run's config (overrides included).
    abstract_model = nnx.eval_shape(lambda: DeepseekV2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
    fns = ModelFns.from_model(abstract_model)
    # Parameters and their Adam moments are laid out by the rules table (sharding/rules.py);
    # batches are split over data x fsdp x expert.
    rep, bsh = replicated(mesh), batch_sharding(mesh)
    state_shape = jax.eval_shape(lambda p: init_state(p, tx), params_of(abstract_model))
    try:
        params_sh = param_shardings(abstract_model, mesh)
    except ValueError as e:
        raise TrainingError(str(e)) from None
    state_sh = {"params": params_sh,
                "opt_state": optimizer_shardings(tx, state_shape["opt_state"], params_sh, mesh),
                "step": rep, "nonfinite": rep}
    # Made by this run (so removed if it fails before its first checkpoint): judged on the
    # normalised path, as "new/.." names the current directory once "new" exists.
    workdir_abs = os.path.abspath(args.workdir)
    created = not os.path.exists(workdir_abs)
    primary = hosts.is_primary()
    ckpts = None
    try:
        if done:
            ckpts = TrainCheckpoints(ckdir, keep=args.keep_checkpoints, log=log, primary=primary)
            abstract = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                    state_shape, state_sh)
            step0, state = ckpts.restore_latest(abstract, data_iter)
            log(f"resumed from {ckpts.directory}/{step0}")
            if step0 >= last_stop:  # only damaged steps lay beyond it
                log(f"{args.workdir}: at step {step0} of {args.steps}; nothing to do")
                ckpts.close()
                return {}
        else:
            step0, state = 0, _initial_state(cfg, args, tx, params_of(abstract_model), mesh, state_sh)
        if changes:
            log(f"settings changed from step {step0}: "
                + ", ".join(f"{flag(k)} {v['old']} -> {v['new']}" for k, v in changes.items()))
        # --- the run is accepted: its files (process 0's) ---------------------------------
        if primary:
            os.makedirs(args.workdir, exist_ok=True)
            given_cfg.save(os.path.join(args.workdir, "config.json"))
            _keep_tokenizer(args.data, args.workdir)
            run_json = os.path.join(args.workdir, "run.json")
            if first_run is None:
                record = {k: v for k, v in dataclasses.asdict(args).items() if k != "given"}
                _write_json(run_json, dict(record, process_count=jax.process_count(),
                                           data_cwd=os.getcwd(), history=[]))
            elif changes:
                first_run.setdefault("history", []).append({"step": step0, "changes": changes})
                _write_json(run_json, first_run)
        hosts.barrier("dsv2_train_files")
        if ckpts is None:
            ckpts = TrainCheckpoints(ckdir, keep=args.keep_checkpoints, log=log, primary=primary)
    except BaseException:
        if ckpts is not None:
            ckpts.close()
        if primary and created and os.path.isdir(workdir_abs) and not checkpoint_steps(ckdir):
            shutil.rmtree(workdir_abs, ignore_errors=True)
        raise
    return _run_steps(args, cfg, fns, tx, schedule, state, step0, last_stop, data_iter, ckpts,
                      mesh, state_sh, rep, bsh, log)


def _run_steps(args, cfg, fns, tx, schedule, state, step0, last_stop, data_iter, ckpts, mesh,
               state_sh, rep, bsh, log) -> dict:
    """The step loop. The host never waits for a step it does not need to: batch i+1 is read
    and placed by the prefetch thread while step i runs, and step i's metrics are read back
    after step i+1 is dispatched; only a step that ends in a checkpoint (or a trace boundary,
    or the end) is waited for before the next is dispatched."""
    from dsv2_jax.sharding.hosts import is_primary
    from dsv2_jax.train.prefetch import Prefetcher

    step_fn = jax.jit(make_train_step(fns, cfg, tx, schedule, args.grad_accum), donate_argnums=0,
                      out_shardings=(state_sh, rep))
    tokens_per_step = args.batch_size * args.seq_len
    flops_tok = M.train_flops_per_token(cfg, args.seq_len)
    peak = (args.peak_tflops * 1e12 if args.peak_tflops else M.peak_flops_per_device(cfg.dtype))
    peak = peak * jax.device_count() if peak else None
    profile = parse_profile_steps(args.profile_steps, step0)
    if profile and profile[0] > min(profile[1], last_stop):
        log(f"--profile-steps {args.profile_steps}: outside the steps this run trains "
            f"({step0 + 1}..{last_stop}); no trace")
        profile = None
    primary = is_primary()
    mlog = M.MetricsLog(os.path.join(args.workdir, "metrics.jsonl"), step0, enabled=primary)
    board = M.TensorBoard(os.path.join(args.workdir, "tensorboard"), enabled=primary, resume_step=step0)
    progress = None
    consecutive_bad, rec = 0, {}
    # SIGTERM / a first Ctrl-C ask for a checkpoint at the next step boundary and a clean stop
    # (saving from inside a step could pair the state with the wrong step or batch); a second
    # Ctrl-C interrupts at once.
    interrupted: list[str] = []

    def on_signal(signum, _frame):
        if signum == signal.SIGINT and interrupted:
            raise KeyboardInterrupt
        interrupted.append(signal.Signals(signum).name)

    def place(batch):
        return {k: jax.make_array_from_process_local_data(bsh, v) for k, v in batch.items()
                if k != "num_bytes"}

    last_done = [time.perf_counter()]

    def record(step: int, m) -> dict:
        """Reads a step's metrics back (waiting for that step only) and writes them."""
        nonlocal consecutive_bad
        m = jax.device_get(m)
        now = time.perf_counter()
        dt, last_done[0] = now - last_done[0], now
        r = {"step": step, **{k: float(v) for k, v in m.items()
                              if k not in ("finite", "ce_sum", "nonfinite_total")},
             "finite": bool(m["finite"]), "step_time": dt, "tokens_per_sec": tokens_per_step / dt,
             "nonfinite_total": int(m["nonfinite_total"])}
        r["mfu"] = (flops_tok * tokens_per_step / dt / peak) if peak else None
        mlog.write(r)
        board.write(r)
        progress.update(r)
        consecutive_bad = 0 if r["finite"] else consecutive_bad + 1
        if consecutive_bad >= args.max_nonfinite:
            ckpts.wait()
            kept = ckpts.steps()
            raise TrainingError(
                f"loss or gradients were non-finite for {consecutive_bad} consecutive steps "
                f"(up to step {step}); stopping. Updates of those steps were skipped; the last "
                f"good checkpoint is step {kept[-1] if kept else 'none'} in {ckpts.directory}")
        return r

    # Signal handlers can only be installed from the main thread (train() may run elsewhere,
    # e.g. in a notebook worker thread; there signals keep their default behaviour).
    old_handlers = ({sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
                    if threading.current_thread() is threading.main_thread() else {})
    # Under the mesh: the MoE layers see its `expert` axis and dispatch over it.
    mesh_ctx = jax.set_mesh(mesh)
    mesh_ctx.__enter__()
    batches = Prefetcher(data_iter, place)
    pending = None  # (step, metrics) dispatched and not yet read back
    tracing = False
    try:
        step = step0
        while step < last_stop:
            batch = next(batches)
            if progress is None:
                log("compiling the training step...")
                t0 = time.perf_counter()
                step_fn = step_fn.lower(state, batch).compile()
                log(f"compiled in {time.perf_counter() - t0:.1f}s; training steps {step0 + 1}..{last_stop}")
                progress = M.Progress(step0, args.steps, args.log_every, enabled=primary)
                last_done[0] = time.perf_counter()
            if profile and step + 1 == profile[0] and not tracing:
                if pending:
                    rec, pending = record(*pending), None
                jax.profiler.start_trace(os.path.join(args.workdir, "profile"))
                tracing = True
            state, m = step_fn(state, batch)
            step += 1
            if pending:  # the previous step's metrics, while this one runs
                rec, pending = record(*pending), None
            pending = (step, m)
            end_trace = tracing and (step >= profile[1] or step == last_stop or bool(interrupted))
            due = step % args.checkpoint_every == 0 or step == last_stop or interrupted or end_trace
            if not due:
                continue
            rec, pending = record(*pending), None
            if end_trace:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                tracing = False
                log(f"profiler trace of steps {profile[0]}..{step} in {args.workdir}/profile")
                if step % args.checkpoint_every and step != last_stop and not interrupted:
                    continue
            # No checkpoint while steps are non-finite: the newest one stays the last good one.
            if consecutive_bad == 0:
                ckpts.save(step, state, batches.consumed_state())
            if interrupted:
                saved = "saved step" if consecutive_bad == 0 else "non-finite, not saved: step"
                log(f"{interrupted[0]}: {saved} {step}, stopping")
                break
        if pending:
            rec = record(*pending)
        if interrupted and rec:  # for the caller (not metrics.jsonl): the run is not finished
            rec = dict(rec, stopped_by=interrupted[0])
    finally:
        batches.close()
        if tracing:
            jax.profiler.stop_trace()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
        if progress is not None:
            progress.close()
        mlog.close()
        board.close()
        ckpts.close()
        mesh_ctx.__exit__(None, None, None)
    return rec
