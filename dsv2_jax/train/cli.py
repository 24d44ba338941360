"""`dsv2 train`, `dsv2 eval`, `dsv2 plot`."""

from __future__ import annotations

import argparse


def add_cli(sub) -> None:
    from dsv2_jax.cli import HelpFormatter
    from dsv2_jax.train.loop import TrainArgs

    d = TrainArgs()
    fmt = HelpFormatter
    p = sub.add_parser("train", help="train (or resume training) a DeepSeek-V2", formatter_class=fmt,
                       description="Rerunning the same command on the same --workdir resumes from "
                                   "its newest good checkpoint.")
    p.add_argument("--config", default=None,
                   help=f"preset (tiny, bench, v2-lite, v2) or config.json path (default: {d.config}); "
                        f"not with --init-from, which brings its own")
    p.add_argument("--workdir", default=None,
                   help="run directory (default: runs/<config name>, or runs/<--init-from name>)")
    p.add_argument("--steps", type=int, default=None, help=f"total optimizer steps of the run{_kept(d.steps)}")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"global batch, in sequences{_kept(d.batch_size)}")
    p.add_argument("--seq-len", type=int, default=None, help=f"tokens per sequence{_kept(d.seq_len)}")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="save a checkpoint every this many steps (and at the end)")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                   help="newest checkpoints kept")
    p.add_argument("--mesh", default=None,
                   help="axis=n,... over data,fsdp,expert,tensor (default: all devices on data; a "
                        "resume keeps the run's)")
    p.add_argument("--data", default=None, help=f"data SPEC (see docs/data.md){_kept(d.data)}")
    p.add_argument("--init-from", default=None,
                   help="start from these weights and their config: an HF safetensors directory, "
                        "a dsv2 Orbax checkpoint (dsv2 convert --to orbax) or a training workdir "
                        "(its newest checkpoint)")
    p.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config fields (values parsed as JSON)")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate{_kept(d.lr)}")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear warm-up steps (default: min(2000, steps/10); a resume keeps the run's)")
    p.add_argument("--schedule", default=None, choices=["step", "cosine", "constant"],
                   help="after warm-up: step (x0.316 at 60%% and 90%% of training, the paper's), "
                        f"cosine or constant{_kept(d.schedule)}")
    p.add_argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay{_kept(d.weight_decay)}")
    p.add_argument("--clip", type=float, default=None, help=f"global gradient-norm clip, 0: off{_kept(d.clip)}")
    p.add_argument("--grad-accum", type=int, default=None,
                   help=f"micro-batches per step, their gradients averaged{_kept(d.grad_accum)}")
    p.add_argument("--seed", type=int, default=None, help=f"initialisation and data-order seed{_kept(d.seed)}")
    p.add_argument("--max-nonfinite", type=int, default=d.max_nonfinite,
                   help="stop after this many consecutive non-finite steps")
    p.add_argument("--master-dtype", default=None, choices=["float32", "bfloat16"],
                   help="dtype of the parameters and optimizer state (default: float32, whatever "
                        "the preset or checkpoint stores; compute runs in the config's dtype)")
    p.add_argument("--log-every", type=int, default=d.log_every,
                   help="print a progress line every this many steps (when not on a terminal)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for the MFU estimate (default: known for the device)")
    p.add_argument("--profile-steps", default=None, metavar="A:B",
                   help="write a profiler trace (TensorBoard / Perfetto) of steps A..B into "
                        "WORKDIR/profile")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    _add_process_flags(p)
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="loss, perplexity and bits per byte of a model on data",
                       formatter_class=fmt)
    e.add_argument("--model", required=True, help="training workdir, HF dir or dsv2 Orbax checkpoint")
    e.add_argument("--data", default="stdlib", help="data SPEC; stdlib evaluates its held-out split")
    e.add_argument("--batch-size", type=int, default=8, help="sequences per batch")
    e.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    e.add_argument("--max-batches", type=int, default=None,
                   help="stop after this many batches (default: the whole held-out split)")
    e.add_argument("--mesh", default=None,
                   help="axis=n,... over data,fsdp,expert,tensor: load the model sharded "
                        "(default: one device)")
    _add_process_flags(e)
    e.set_defaults(func=run_eval)

    pl = sub.add_parser("plot", help="PNG of the loss, learning-rate and expert-load curves of a run",
                        formatter_class=fmt)
    pl.add_argument("workdir", help="a training workdir (reads its metrics.jsonl)")
    pl.add_argument("--out", default=None, help="output PNG (default: WORKDIR/metrics.png)")
    pl.set_defaults(func=run_plot)


def _kept(default) -> str:
    return f" (default: {default}); a resume keeps the run's"


def _add_process_flags(p) -> None:
    g = p.add_argument_group("multi-process runs (detected on TPU pods and under SLURM)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordinator service")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the run")
    g.add_argument("--process-id", type=int, default=None, help="this process's index")


def run_train(a) -> int:
    import dataclasses

    from dsv2_jax.train.loop import TrainArgs, default_workdir, train

    fields = [f.name for f in dataclasses.fields(TrainArgs) if f.name != "given"]
    given = frozenset(k for k in fields if getattr(a, k) is not None)
    d = TrainArgs()
    args = TrainArgs(**{k: getattr(d, k) if getattr(a, k) is None else getattr(a, k) for k in fields},
                     given=given)
    if not args.workdir:
        args = dataclasses.replace(args, workdir=default_workdir(args.config, args.init_from))
    rec = train(args)
    import jax

    if rec and rec.get("stopped_by"):
        # not finished: a non-zero status (128 + the signal, as a shell reports it) lets a
        # wrapper or scheduler tell it from a completed run
        import signal

        if jax.process_index() == 0:
            print(f"stopped by {rec['stopped_by']} at step {rec['step']} of {args.steps}; rerun the "
                  f"same command to resume")
        return 128 + int(getattr(signal, rec["stopped_by"]))
    if rec and jax.process_index() == 0:  # one voice: process 0's
        print(f"done: step {rec['step']} loss {rec['loss']:.4f}; metrics in {args.workdir}/metrics.jsonl")
    return 0


def run_eval(a) -> int:
    from dsv2_jax.train.evaluate import evaluate

    res = evaluate(a.model, a.data, batch_size=a.batch_size, seq_len=a.seq_len, max_batches=a.max_batches,
                   mesh=a.mesh, coordinator=a.coordinator, num_processes=a.num_processes,
                   process_id=a.process_id)
    import jax

    if jax.process_index():  # one voice: process 0's (every process has the same figures)
        return 0
    bpb = "n/a (no byte counts)" if res["bits_per_byte"] is None else f"{res['bits_per_byte']:.4f}"
    print(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.3f}  "
          f"bits/byte {bpb}  ({res['tokens']} tokens, {res['bytes']} bytes)")
    return 0


def run_plot(a) -> int:
    from dsv2_jax.train.plot import plot

    print(plot(a.workdir, a.out))
    return 0
