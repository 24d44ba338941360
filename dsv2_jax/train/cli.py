"""`dsv2 train`, `dsv2 eval`, `dsv2 plot`."""

from __future__ import annotations

import argparse


def add_cli(sub) -> None:
    from dsv2_jax.train.loop import TrainArgs

    d = TrainArgs()
    p = sub.add_parser("train", help="train (or resume training) a DeepSeek-V2",
                       description="Rerunning the same command on the same --workdir resumes from "
                                   "its newest good checkpoint.")
    p.add_argument("--config", default=d.config, help="preset (tiny, v2-lite, v2) or config.json path")
    p.add_argument("--workdir", default=d.workdir)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--mesh", default=None,
                   help="axis=n,... over data,fsdp,expert,tensor (data and expert > 1 so far); "
                        "default: all devices on data")
    p.add_argument("--data", default=d.data, help="data SPEC (see docs/data.md); default: stdlib")
    p.add_argument("--init-from", default=None, help="HF safetensors dir or dsv2 Orbax checkpoint")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=None, help="default: min(2000, steps/10)")
    p.add_argument("--schedule", default=d.schedule, choices=["step", "cosine", "constant"],
                   help="step: x0.316 at 60%% and 90%% of training (the paper's); cosine")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--clip", type=float, default=d.clip, help="global gradient-norm clip (0: off)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--max-nonfinite", type=int, default=d.max_nonfinite,
                   help="stop after this many consecutive non-finite steps")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for the MFU estimate")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run_train)

    e = sub.add_parser("eval", help="loss, perplexity and bits per byte of a model on data")
    e.add_argument("--model", required=True, help="training workdir, HF dir or dsv2 Orbax checkpoint")
    e.add_argument("--data", default="stdlib", help="data SPEC; stdlib evaluates its held-out split")
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--max-batches", type=int, default=None)
    e.set_defaults(func=run_eval)

    pl = sub.add_parser("plot", help="PNG of the loss and expert-load curves of a run")
    pl.add_argument("workdir")
    pl.add_argument("--out", default=None, help="default: WORKDIR/metrics.png")
    pl.set_defaults(func=run_plot)


def run_train(a) -> int:
    import dataclasses

    from dsv2_jax.train.loop import TrainArgs, train

    args = TrainArgs(**{f.name: getattr(a, f.name) for f in dataclasses.fields(TrainArgs)})
    rec = train(args)
    if rec:
        print(f"done: step {rec['step']} loss {rec['loss']:.4f}; metrics in {a.workdir}/metrics.jsonl")
    return 0


def run_eval(a) -> int:
    from dsv2_jax.train.evaluate import evaluate

    res = evaluate(a.model, a.data, batch_size=a.batch_size, seq_len=a.seq_len, max_batches=a.max_batches)
    bpb = "n/a (no byte counts)" if res["bits_per_byte"] is None else f"{res['bits_per_byte']:.4f}"
    print(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.3f}  "
          f"bits/byte {bpb}  ({res['tokens']} tokens, {res['bytes']} bytes)")
    return 0


def run_plot(a) -> int:
    from dsv2_jax.train.plot import plot

    print(plot(a.workdir, a.out))
    return 0
