"""What a `dsv2 train` run is: its arguments, the config it trains, and on a resume what it
keeps from the workdir, what it may change (said, and recorded in run.json's history) and what
it refuses. Everything here runs before the first file of a run is written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex

import jax

from dsv2_jax.config import DeepseekV2Config, load_config
from dsv2_jax.errors import UserError
from dsv2_jax.train.checkpointing import checkpoint_steps

# Arguments that define the data stream a checkpointed iterator belongs to.
DATA_ARGS = ("data", "seq_len", "batch_size", "seed")
# Arguments of the schedule, the optimizer's update and the mesh: a resume may change them
# (extending a run is common, so is moving it to other devices); the change is said and
# recorded (a mesh with another expert size also changes device-limited routing).
SCHEDULE_ARGS = ("steps", "lr", "warmup_steps", "schedule", "clip", "weight_decay", "mesh",
                 "grad_accum")
# What a resume takes from the run when the command does not give it (`TrainArgs.given`):
# rerunning with only a larger --steps continues the same run, not one with default settings.
KEPT_ON_RESUME = DATA_ARGS + SCHEDULE_ARGS
# Config fields that shape neither the parameters nor the optimizer state and compute the same
# model (to rounding): a resume may change them, and says so.
RESUMABLE_FIELDS = ("remat", "ce_chunk", "scan_unroll", "attn_impl", "moe_backend", "moe_dispatch")


class TrainingError(UserError, RuntimeError):
    """A run that cannot go on; the message says why and what was kept."""


@dataclasses.dataclass
class TrainArgs:
    config: str = "tiny"
    workdir: str | None = None  # default: runs/<config name>
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
    master_dtype: str | None = None  # parameter + optimizer dtype; default float32
    log_every: int = 10
    profile_steps: str | None = None  # "A:B": a profiler trace of steps A..B into workdir/profile
    peak_tflops: float | None = None
    stop_after: int | None = None  # stop (with a checkpoint) after this step; for tests
    # Multi-process runs (explicit; TPU pods and SLURM are detected): see sharding/hosts.py.
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    # The fields the command gave (the CLI sets it): a resume takes the others of
    # KEPT_ON_RESUME from the run. None: every field counts as given (the Python API).
    given: frozenset | None = None


def default_workdir(config: str, init_from: str | None = None) -> str:
    """runs/<name>: the preset's name, a config file's stem (its folder's name for a file
    called config.json), or the --init-from directory's name."""
    src = init_from or config
    path = os.path.abspath(os.path.expanduser(os.fspath(src)))  # ".." names its folder
    name = os.path.basename(path)
    if name.endswith(".json"):
        stem = name[:-5]
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) if stem == "config" else stem
    return os.path.join("runs", name or "run")


def config_name(args: TrainArgs) -> str:
    return args.init_from or args.config


def check_args(args: TrainArgs) -> None:
    for name in ("steps", "batch_size", "seq_len", "checkpoint_every", "keep_checkpoints",
                 "grad_accum", "log_every", "max_nonfinite"):
        if getattr(args, name) < 1:
            raise TrainingError(f"{flag(name)} must be >= 1, got {getattr(args, name)}")
    for name, least in (("lr", 0.0), ("weight_decay", 0.0), ("clip", 0.0), ("warmup_steps", 0)):
        v = getattr(args, name)
        if v is not None and not least <= v < math.inf:
            raise TrainingError(f"{flag(name)} must be >= 0 and finite, got {v}")
    if args.peak_tflops is not None and not 0 < args.peak_tflops < math.inf:
        raise TrainingError(f"--peak-tflops must be positive, got {args.peak_tflops}")
    if args.init_from and args.given is not None and "config" in args.given:
        raise TrainingError("--config and --init-from both name the model: --init-from brings its "
                            "own config (change its fields with --set)")
    if args.batch_size % args.grad_accum:
        raise TrainingError(f"--batch-size {args.batch_size} is not divisible by --grad-accum {args.grad_accum}")
    if args.schedule not in ("step", "cosine", "constant"):
        raise TrainingError(f"--schedule: unknown {args.schedule!r}; expected step|cosine|constant")
    parse_profile_steps(args.profile_steps, 0)


def parse_profile_steps(spec: str | None, step0: int) -> tuple[int, int] | None:
    if not spec:
        return None
    a, sep, b = spec.partition(":")
    try:
        first, last = int(a), int(b) if sep else int(a)
    except ValueError:
        raise TrainingError(f"--profile-steps {spec!r}: expected A:B (steps to trace)") from None
    if not 1 <= first <= last:
        raise TrainingError(f"--profile-steps {spec!r}: expected 1 <= A <= B")
    return (max(first, step0 + 1), last)


def resolve_config(args: TrainArgs, resuming: bool, log=print) -> DeepseekV2Config:
    """The run's config; `resuming` (the workdir holds checkpoints): checked against the
    config the workdir was trained with."""
    saved = os.path.join(args.workdir, "config.json")
    if (resuming and args.given is not None and os.path.exists(saved) and not args.init_from
            and not ({"config", "master_dtype"} & args.given) and not args.set):
        try:  # a resume naming no model: the workdir's own
            return DeepseekV2Config.from_hf(saved)
        except ValueError as e:
            raise TrainingError(str(e)) from None
    try:
        if args.init_from:
            if not os.path.isdir(args.init_from):
                raise TrainingError(f"--init-from {args.init_from}: no such directory (expected an "
                                    f"HF safetensors directory, a dsv2 Orbax checkpoint or a "
                                    f"training workdir)")
            cfg = DeepseekV2Config.from_hf(os.path.join(args.init_from, "config.json"))
            from dsv2_jax.checkpoint.orbax_io import is_training_workdir

            if not is_training_workdir(args.init_from):
                # A converted checkpoint records the dtype it is served in (its parameters');
                # training computes in the default unless --set says otherwise, whichever
                # form the weights come in. Another training run's choice is kept.
                cfg = cfg.replace(dtype="float32")
        else:
            cfg = load_config(args.config)
        cfg = cfg.with_overrides(args.set)
        # Master weights and optimizer state are float32 whatever the preset or checkpoint
        # stores (bf16 presets describe the released weights), unless asked otherwise.
        explicit = any(str(item).split("=", 1)[0].strip() == "param_dtype" for item in args.set)
        if args.master_dtype or not explicit:
            cfg = cfg.replace(param_dtype=args.master_dtype or "float32")
    except (ValueError, FileNotFoundError) as e:
        raise TrainingError(str(e)) from None
    if resuming and os.path.exists(saved):
        try:
            prev = DeepseekV2Config.from_hf(saved)
        except ValueError as e:
            raise TrainingError(str(e)) from None
        diff = [f.name for f in dataclasses.fields(cfg) if getattr(prev, f.name) != getattr(cfg, f.name)]
        fixed = [k for k in diff if k not in RESUMABLE_FIELDS]
        if fixed:
            how = ", ".join(f"--master-dtype {prev.param_dtype}" if k == "param_dtype" else
                            "--set " + shlex.quote(f"{k}={json.dumps(getattr(prev, k), separators=(',', ':'))}")
                            for k in fixed)
            raise TrainingError(
                f"{args.workdir} holds a run of a different config ("
                + ", ".join(f"{k}: {getattr(prev, k)!r} there, {getattr(cfg, k)!r} now" for k in fixed)
                + f"); resume with {how}, or use another --workdir")
        if diff:
            log("config changed on resume: " + ", ".join(
                f"{k} {getattr(prev, k)!r} -> {getattr(cfg, k)!r}" for k in diff))
    return cfg


def read_run(workdir: str) -> dict | None:
    run_json = os.path.join(workdir, "run.json")
    if not os.path.exists(run_json):
        return None
    try:
        with open(run_json) as f:
            first = json.load(f)
        if not isinstance(first, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise TrainingError(f"{run_json}: unreadable ({e}); it records how the run was started, "
                            f"so the run cannot be resumed safely without it") from None
    return first


def flag(k: str) -> str:
    return "--" + k.replace("_", "-")


def keep_run_settings(args: TrainArgs, log=print) -> TrainArgs:
    """On a resume, every setting of KEPT_ON_RESUME the command did not give is the run's
    (the first run's, updated by its recorded changes), and said. Through the Python API
    (`given` None) every field counts as given but an unset warm-up: extending --steps must
    not lengthen a warm-up that is over and send the learning rate back into it."""
    if not checkpoint_steps(os.path.join(args.workdir, "checkpoints")):
        return args
    run = read_run(args.workdir)
    if run is None:
        return args
    given = args.given
    if given is None:
        given = frozenset(f.name for f in dataclasses.fields(args)
                          if not (f.name == "warmup_steps" and args.warmup_steps is None))
    now = {**{k: run[k] for k in DATA_ARGS if k in run}, **schedule_now(run)}
    kept = {k: now[k] for k in KEPT_ON_RESUME
            if k not in given and k in now and (now[k] is not None or k in ("mesh", "warmup_steps"))}
    moved = {k: v for k, v in kept.items() if v != getattr(args, k)}
    if moved:
        log("resuming with the run's " + ", ".join(f"{flag(k)} {v}" for k, v in moved.items()))
    if "config" not in given and isinstance(run.get("config"), str):
        kept["config"] = run["config"]  # its name, for the log (the model is the workdir's)
    return dataclasses.replace(args, **kept)


def check_resume(args: TrainArgs, resuming: bool) -> dict | None:
    """The workdir's run.json when it holds checkpoints (`resuming`), refusing a resume that
    changes the data stream or the process count (each process's data shard would change).
    Without checkpoints nothing was trained: the run starts afresh whatever run.json says."""
    if not resuming:
        return None
    first = read_run(args.workdir)
    if first is None:
        return None
    # The saved data-iterator state only means something for the same data stream.
    changed = [k for k in DATA_ARGS if k in first and first[k] != getattr(args, k)]
    if changed:
        raise TrainingError(
            f"{args.workdir} was trained with other data settings ("
            + ", ".join(f"{flag(k)} {first[k]!r}" for k in changed)
            + "); resume with the same ones or use a new --workdir")
    started_in = first.get("data_cwd")
    here = os.getcwd()
    if (started_in is not None and _relative_data_paths(args.data)
            and os.path.realpath(started_in) != os.path.realpath(here)):
        raise TrainingError(
            f"{args.workdir} was trained on --data {args.data!r}, whose paths are relative to "
            f"{started_in} (where the run started), and this resume runs in {here}: the same "
            f"spec would read other files here; resume from {started_in}")
    procs = first.get("process_count", 1)
    if procs != jax.process_count():
        raise TrainingError(
            f"{args.workdir} was trained by {procs} process(es), this run has "
            f"{jax.process_count()}: each process's share of the data would change; resume with "
            f"{procs} process(es) or use a new --workdir")
    return first


def _relative_data_paths(data: str | None) -> list[str]:
    from dsv2_jax.train.data.spec import parse_spec, relative_paths

    try:
        return relative_paths(parse_spec(data)) if data else []
    except ValueError:
        return []  # refused where the data is read, naming what is wrong


def schedule_now(run: dict) -> dict:
    """The schedule arguments in force: the first run's, updated by every recorded change;
    an unset warm-up as the length it took (`warmup_length`)."""
    now = {k: run.get(k) for k in SCHEDULE_ARGS}
    if now["warmup_steps"] is None and isinstance(now["steps"], int):
        now["warmup_steps"] = warmup_length(now["steps"], None)  # the first run's default
    for change in run.get("history", []):
        now.update({k: v["new"] for k, v in change.get("changes", {}).items()})
    return now


def warmup_length(steps: int, warmup_steps: int | None) -> int:
    """--warmup-steps, or by default a tenth of the steps, at most 2000."""
    return warmup_steps if warmup_steps is not None else min(2000, steps // 10)


def schedule_changes(run: dict | None, args: TrainArgs) -> dict:
    if run is None:
        return {}
    now = schedule_now(run)
    return {k: {"old": now[k], "new": getattr(args, k)} for k in SCHEDULE_ARGS
            if now[k] != getattr(args, k)}
