"""`dsv2 plot WORKDIR`: loss and expert-load curves from metrics.jsonl as a PNG."""

from __future__ import annotations

import json
import os


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics (is {workdir} a training workdir?)")
    recs = []
    with open(path) as f:
        for line in f:
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    if not recs:
        raise ValueError(f"{path}: empty")
    return recs


def plot(workdir: str, out: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(workdir)
    steps = [r["step"] for r in recs]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in recs]

    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    a1.plot(steps, series("loss"), label="total loss")
    a1.plot(steps, series("ce"), label="cross entropy", alpha=0.8)
    a1.set_ylabel("loss (nats)")
    a1.legend()
    a1.grid(alpha=0.3)
    a2.plot(steps, series("load_max_over_mean"), label="max / mean expert load")
    a2.plot(steps, series("load_min_over_mean"), label="min / mean expert load")
    if any(r.get("dropped_fraction") for r in recs):
        a2.plot(steps, series("dropped_fraction"), label="dropped fraction")
    a2.axhline(1.0, color="gray", lw=0.8, ls="--")
    a2.set_xlabel("step")
    a2.set_ylabel("expert load (averaged over MoE layers)")
    a2.legend()
    a2.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(workdir)))
    fig.tight_layout()
    out = out or os.path.join(workdir, "metrics.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
