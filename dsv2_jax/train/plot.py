"""`dsv2 plot WORKDIR`: loss and expert-load curves from metrics.jsonl as a PNG."""

from __future__ import annotations

import os


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics (is {workdir} a training workdir?)")
    from dsv2_jax.train.metrics import read_records

    recs = [rec for _, rec in read_records(path)]
    if not recs:
        raise ValueError(f"{path}: no step records")
    return recs


def smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    """Exponential moving average (NaNs skipped), bias-corrected so the first points are not
    pulled towards 0."""
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        if v == v:  # not NaN
            avg = (1 - alpha) * avg + alpha * v
            weight = (1 - alpha) * weight + alpha
        out.append(avg / weight if weight else float("nan"))
    return out


def plot(workdir: str, out: str | None = None) -> str:
    """Three panels: the losses (raw and smoothed cross entropy, smoothed total dashed on top,
    and the balance-loss part total - CE on its own axis, since it is too small to tell apart
    on the loss scale), the learning rate, the expert load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(workdir)
    steps = [r["step"] for r in recs]

    def series(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in recs]

    fig, (a1, a2, a3) = plt.subplots(3, 1, figsize=(8, 9), sharex=True,
                                     gridspec_kw={"height_ratios": [3, 1, 2]})
    ce, total = series("ce"), series("loss")
    a1.plot(steps, ce, color="C0", alpha=0.25, lw=0.8, label="cross entropy")
    a1.plot(steps, smooth(ce), color="C0", lw=1.8, label="cross entropy (smoothed)")
    a1.plot(steps, smooth(total), color="C3", lw=1.2, ls="--", zorder=3,
            label="total loss (smoothed)")
    a1.set_ylabel("loss (nats)")
    a1.grid(alpha=0.3)
    aux = [t - c for t, c in zip(total, ce)]
    b1 = a1.twinx()
    b1.plot(steps, smooth(aux), color="C2", lw=1.0, label="total - CE: balance losses (smoothed)")
    b1.set_ylabel("balance losses (nats)", color="C2")
    lines = a1.get_legend_handles_labels()
    more = b1.get_legend_handles_labels()
    a1.legend(lines[0] + more[0], lines[1] + more[1], loc="upper right", fontsize=8)
    a2.plot(steps, series("lr"), color="C4")
    a2.set_ylabel("learning rate")
    a2.grid(alpha=0.3)
    a3.plot(steps, series("load_max_over_mean"), label="max / mean expert load")
    a3.plot(steps, series("load_min_over_mean"), label="min / mean expert load")
    if any(r.get("dropped_fraction") for r in recs):
        a3.plot(steps, series("dropped_fraction"), label="dropped fraction")
    a3.axhline(1.0, color="gray", lw=0.8, ls="--")
    a3.set_xlabel("step")
    a3.set_ylabel("expert load\n(mean over MoE layers)")
    a3.legend(fontsize=8)
    a3.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(workdir)))
    fig.tight_layout()
    out = out or os.path.join(workdir, "metrics.png")
    if os.path.isdir(out):
        out = os.path.join(out, "metrics.png")
    elif not os.path.splitext(out)[1]:
        out += ".png"  # what the figure writer would name it: say the real name
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
