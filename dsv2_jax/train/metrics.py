"""metrics.jsonl writing, throughput and MFU estimates, progress display."""

from __future__ import annotations

import json
import math
import os
import sys
import time

import jax

from dsv2_jax.config import DeepseekV2Config
from dsv2_jax.params import count_params

# Dense peak FLOP/s per chip by compute dtype, for the MFU estimate. CPU: the measured
# float32/bfloat16 matmul peak of the 2-core development machine (shared/PLATFORM_NOTES.md).
_PEAK_TFLOPS = {
    ("cpu", "float32"): 0.155, ("cpu", "bfloat16"): 0.13,
    ("H200", "bfloat16"): 989.0, ("H100", "bfloat16"): 989.0, ("H200", "float32"): 67.0,
    ("H100", "float32"): 67.0, ("A100", "bfloat16"): 312.0, ("A100", "float32"): 19.5,
    ("TPU v5p", "bfloat16"): 459.0, ("TPU v5 lite", "bfloat16"): 197.0, ("TPU v4", "bfloat16"): 275.0,
    ("TPU v6 lite", "bfloat16"): 918.0,
}


def peak_flops_per_device(dtype: str) -> float | None:
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return _PEAK_TFLOPS[("cpu", "bfloat16" if dtype == "bfloat16" else "float32")] * 1e12
    kind = getattr(dev, "device_kind", "")
    for (name, dt), tf in _PEAK_TFLOPS.items():
        if name != "cpu" and name in kind and dt == dtype:
            return tf * 1e12
    return None


def train_flops_per_token(cfg: DeepseekV2Config, seq_len: int) -> float:
    """6 x active matmul parameters, plus causal attention: per layer and token, q.k and p.v
    over T/2 keys on average cost 2 N (qk + v) T/2 forward, x3 with the backward pass."""
    _, active = count_params(cfg)
    attn = 3 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return 6.0 * active + attn


def read_records(path: str):
    """(line, record) of every step record of a metrics.jsonl: a JSON object with an integer
    `step`. Other lines (one cut short by a crash, anything else written into the file) are
    skipped."""
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = rec.get("step") if isinstance(rec, dict) else None
            if isinstance(step, int) and not isinstance(step, bool):
                yield line, rec


class MetricsLog:
    """Appends one JSON object per step to workdir/metrics.jsonl (flushed each line)."""

    def __init__(self, path: str, resume_step: int | None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.f = None
        if not enabled:  # another process writes the run's metrics
            return
        if os.path.exists(path):
            # A resumed run recomputes the steps after its checkpoint: drop their old lines.
            # Rewritten whole or not at all, so a crash here cannot lose the history.
            keep = [line if line.endswith("\n") else line + "\n" for line, rec in read_records(path)
                    if resume_step is not None and rec["step"] <= resume_step]
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                f.writelines(keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        self.f = open(path, "a")

    def write(self, rec: dict) -> None:
        if self.f is None:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        self.f.write(json.dumps(clean) + "\n")
        self.f.flush()

    def close(self):
        if self.f is not None:
            self.f.close()


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it
    is installed only to accept torch tensors, which costs ~4 s per `dsv2 train` start on CPU
    and is never needed for the float scalars written here. A torch the process already
    imported is left as it is."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class TensorBoard:
    """TensorBoard scalars of every step (loss, balance losses, lr, grad norm, tokens/s, MFU,
    expert load, dropped fraction, rows per token) when tensorboardX is installed (the
    `tensorboard` extra); metrics.jsonl stays the record either way."""

    KEYS = ("loss", "ce", "expert_loss", "device_loss", "comm_loss", "lr", "grad_norm",
            "tokens_per_sec", "mfu", "load_max_over_mean", "load_min_over_mean",
            "dropped_fraction", "rows_per_token")

    def __init__(self, logdir: str, enabled: bool = True, resume_step: int = 0):
        self.writer = None
        if not enabled:
            return
        try:
            writer_class = _summary_writer_class()
        except ImportError:
            return
        # A run recomputes the steps after its checkpoint (all of them when it has none):
        # TensorBoard hides the events an earlier process wrote for them, as metrics.jsonl
        # drops their lines.
        self.writer = writer_class(logdir, purge_step=resume_step + 1)

    def write(self, rec: dict) -> None:
        if self.writer is None:
            return
        for k in self.KEYS:
            v = rec.get(k)
            if v is not None and math.isfinite(v):
                self.writer.add_scalar(f"train/{k}", v, rec["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """A tqdm bar on a terminal; plain lines every `every` steps otherwise."""

    def __init__(self, start: int, total: int, every: int = 10, enabled: bool = True):
        self.enabled = enabled
        self.tty = sys.stderr.isatty() and enabled
        self.every = every
        self.t0 = time.time()
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, rec: dict) -> None:
        msg = (f"loss {rec['loss']:.4f} ce {rec['ce']:.4f} gnorm {rec['grad_norm']:.3f} "
               f"lr {rec['lr']:.2e} tok/s {rec['tokens_per_sec']:.0f}")
        if self.tty:
            self.bar.set_postfix_str(msg, refresh=False)
            self.bar.update(1)
        elif self.enabled and (rec["step"] % self.every == 0 or rec["step"] == 1):
            print(f"step {rec['step']}: {msg}", flush=True)

    def close(self):
        if self.tty:
            self.bar.close()
