"""`dsv2 bench`: this project against HF transformers' DeepseekV2ForCausalLM (PyTorch,
float32, all cores), side by side in one run on the same machine, same config, same weights.

Rows (the `bench` preset: hidden 1024, 4 layers with the first dense, 8 heads, kv_lora 256,
32 routed experts top-6 + 2 shared, vocab 32000):

    ceilings      float32 matmul GFLOP/s (a large square product), memory read GB/s, each
                  measured at the start and at the end of the run, the better one kept:
                  MFU and the decode bounds are shares of it
    train         tokens/s of one optimizer step (batch 4 x 512: loss + balance losses +
                  router statistics, AdamW, clipping), MFU against the matmul ceiling
    prefill       tokens/s of the forward pass (batch 4 x 512)
    decode        decode-only tokens/s (time for n+1 new tokens minus time for 1, see
                  `decode_seconds`) at batch 1 with a 256-token prompt and batch 4 with
                  2048-token prompts, each against its memory bound: the bytes one step must
                  read (the weights of the experts the tokens use, every other weight, the
                  latent cache) over the read ceiling
    moe           one MoE layer (forward + backward, 2048 tokens) against a dense SwiGLU of the
                  same active FLOPs
    compile       one training step of the full 60-layer `v2` preset from abstract shapes,
                  and of a 4-layer cut of it: compile time does not grow with depth
    memory        peak resident memory each side adds while it runs (sampled)

Both frameworks run in this process; `--isolate` gives each a worker process of its own
(`bench_sides`: transformers gains ~5% from it, our ratio loses ~8%). Machines are noisy:
each row alternates ours and theirs and reports the median of rounds, the ratio of the
medians with, in brackets, the range of the per-round ratios (each round's two sides ran
back to back); only ratios from one run are comparable. Results go to the
terminal and, unless --no-doc, to docs/benchmarks.md between the `dsv2 bench` markers, with
the command and the machine.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time

import numpy as np

DOC_BEGIN = "<!-- dsv2 bench: begin -->"
DOC_END = "<!-- dsv2 bench: end -->"


# ---------------------------------------------------------------------------------------
# Configs and models.


def bench_config(quick: bool = False):
    """The bench preset (or, with quick, a toy cut of it for a smoke run), float32."""
    from dsv2_jax.config import load_config

    cfg = load_config("bench", dtype="float32", param_dtype="float32", eos_token_id=None,
                      bos_token_id=None)
    if quick:
        cfg = cfg.replace(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                          kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                          n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                          max_position_embeddings=512)
    return cfg


def hf_config(cfg, attn: str = "sdpa"):
    """The transformers config of one of ours; `attn` its attention implementation (sdpa, the
    fastest transformers has on CPU, is the default reference)."""
    from transformers import DeepseekV2Config as HFConfig

    d = cfg.to_hf_dict()
    rs = d.pop("rope_scaling")
    rope = {"rope_type": "default", "rope_theta": d.pop("rope_theta")}
    if rs:
        rope.update({k: v for k, v in rs.items() if k != "type"}, rope_type=rs["type"])
    keep = {k: v for k, v in d.items() if k not in ("architectures", "model_type", "dsv2_jax", "torch_dtype",
                                                    "ep_size", "moe_layer_freq", "scoring_func",
                                                    "aux_loss_alpha", "seq_aux")}
    hf = HFConfig(**keep, rope_parameters=rope)
    hf._attn_implementation = attn
    return hf


def save_reference(cfg, path: str):
    """The transformers model of the bench's weights (random init, seed 0), saved to `path`
    as an HF checkpoint, the one our model loads: -> the transformers model."""
    import torch
    from transformers import DeepseekV2ForCausalLM

    torch.manual_seed(0)
    hf = DeepseekV2ForCausalLM(hf_config(cfg)).float()
    hf.save_pretrained(path)
    return hf


def models(cfg):
    """(HF model, our model with the same weights: through save_pretrained/from_pretrained)."""
    import tempfile

    from dsv2_jax.bench_sides import OURS, load_side

    with tempfile.TemporaryDirectory() as d:
        hf = save_reference(cfg, d)
        ours = load_side(OURS, cfg, d)
    return hf, ours


# ---------------------------------------------------------------------------------------
# Measuring.


class PeakRSS:
    """Peak resident memory added while the block runs, sampled every 5 ms."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.proc.memory_info().rss)
                time.sleep(0.005)

        self._t = threading.Thread(target=sample, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def added_mb(self) -> float:
        return (self.peak - self.base) / 1e6


def ceilings(quick: bool) -> dict:
    """float32 matmul GFLOP/s and memory read GB/s, measured with JAX on this machine."""
    import jax
    import jax.numpy as jnp

    n = 512 if quick else 2048
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda a: a @ a)
    mm(a).block_until_ready()
    best = min(_timed(lambda: mm(a).block_until_ready()) for _ in range(3 if quick else 5))
    elems = (8 << 20) if quick else (256 << 20)  # 1 GB of float32
    big = jnp.ones((elems,), jnp.float32)
    rd = jax.jit(lambda x: jnp.sum(x))
    rd(big).block_until_ready()
    read = min(_timed(lambda: rd(big).block_until_ready()) for _ in range(3 if quick else 5))
    return {"matmul_gflops": 2 * n ** 3 / best / 1e9, "read_gbps": elems * 4 / read / 1e9}


def against_ceilings(res: dict, first: dict, last: dict) -> None:
    """In place: res["ceilings"] the better of the two measurements (taken at the start and at
    the end of the run: one alone read 13.8 and 20.2 GB/s in two quiet runs of one tree), and
    the figures that are shares of a ceiling (train MFU, decode against its memory bound)
    computed against it, so that a slow moment while measuring cannot flatter them."""
    res["ceilings_measured"] = [first, last]
    c = res["ceilings"] = {k: max(first[k], last[k]) for k in first}
    if "train" in res:
        r = res["train"]
        per = r["flops_per_token"] / (c["matmul_gflops"] * 1e9)
        r["ours_mfu"], r["hf_mfu"] = r["ours_tok_s"] * per, r["hf_tok_s"] * per
    for key in ("decode_1x256", "decode_4x2048"):
        if key in res:
            r = res[key]
            r["bound_tok_s"] = r["batch"] * c["read_gbps"] * 1e9 / r["bytes_per_step"]
            r["ours_of_bound"] = r["ours_tok_s"] / r["bound_tok_s"]


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _alternate(ours, theirs, rounds: int):
    """Seconds of each over `rounds` alternating rounds, after one warm-up each; ours() and
    theirs() return the seconds of one call: (median of ours, median of theirs, the per-round
    ratios theirs / ours)."""
    ours(), theirs()
    o, h = [], []
    for _ in range(rounds):
        o.append(ours())
        h.append(theirs())
    return statistics.median(o), statistics.median(h), _round_ratios(h, o)


def _round_ratios(num, den) -> list:
    """num[i] / den[i] of each round: the two sides of a round ran back to back, so the spread
    of these shows how far the machine moved the ratio within the run."""
    return [a / b for a, b in zip(num, den)]


def _ratio_cell(r: dict) -> str:
    """The ratio (of the medians), and the per-round ratios' range when there are several."""
    rr = r.get("ratio_rounds") or []
    spread = f" ({min(rr):.2f}-{max(rr):.2f})" if len(rr) > 1 else ""
    return f"{r['ratio']:.2f}x{spread}"


def _batch(cfg, B, T, seed=0):
    import jax.numpy as jnp

    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T + 1))
    return ids, {"inputs": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32),
                 "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
                 "segment_ids": jnp.ones((B, T), jnp.int32), "loss_mask": jnp.ones((B, T), jnp.int32)}


def hf_train_steps(hf, opt, tids, n: int) -> None:
    """n optimizer steps of the transformers model on token ids tids (labels = inputs,
    gradient norm clipped at 1): the reference side of every train benchmark."""
    import torch

    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        hf(tids, labels=tids).loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()


def _side_by_side(sides, key, rounds, **kw):
    """Prepares case `key` on both sides (ours first), alternates `rounds` timed calls, then
    drops it: (median seconds ours, theirs, per-round ratios, peak MB ours, theirs)."""
    mo = sides.ours.prepare(key, key, **kw)
    mh = sides.theirs.prepare(key, key, **kw)
    o, h, rr = _alternate(lambda: sides.ours.time(key), lambda: sides.theirs.time(key), rounds)
    sides.ours.drop(key), sides.theirs.drop(key)
    return o, h, rr, mo, mh


def bench_train(sides, cfg, B, T, steps, rounds) -> dict:
    from dsv2_jax.train.metrics import train_flops_per_token

    o, h, rr, mo, mh = _side_by_side(sides, "train", rounds, B=B, T=T, steps=steps)
    tok = B * T * steps
    return {"ours_tok_s": tok / o, "hf_tok_s": tok / h, "ratio": h / o, "ratio_rounds": rr,
            "flops_per_token": train_flops_per_token(cfg, T), "ours_peak_mb": mo, "hf_peak_mb": mh}


def bench_prefill(sides, B, T, rounds) -> dict:
    o, h, rr, mo, mh = _side_by_side(sides, "prefill", rounds, B=B, T=T)
    return {"ours_tok_s": B * T / o, "hf_tok_s": B * T / h, "ratio": h / o, "ratio_rounds": rr,
            "ours_peak_mb": mo, "hf_peak_mb": mh}


def decode_bytes_per_step(cfg, B: int, S: int, dtype_bytes: int = 4) -> float:
    """What one decode step of B rows at cache length S must read: every weight but the
    routed experts and the input embedding, the experts the B tokens use (on average
    E (1 - (1 - K/E)^B) per MoE layer), the latent cache."""
    from dsv2_jax.params import count_params

    total, active = count_params(cfg)
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    D, F = cfg.hidden_size, cfg.moe_intermediate_size
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    per_expert = 3 * D * F
    dense = active - moe_layers * K * per_expert  # active per token, minus its routed experts
    used = E * (1 - (1 - K / E) ** B)
    cache = B * S * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers
    return (dense + moe_layers * used * per_expert + cache) * dtype_bytes


def decode_seconds(gen, new: int) -> float:
    """The seconds `new` decode steps take, prefill excluded: gen(new + 1) - gen(1), with
    gen(n) the seconds of one n-token call. The prefill is most of each call (~6 of ~8 s for
    ours at 4 x 2048), so a second's noise in either term is most of the difference: a first
    call, after the other framework ran, is discarded (0.2-0.7 s slower than the calls after
    it in two of three rounds measured), and the one-token call is timed before and after
    the long one and averaged, so that drift during the three calls cancels."""
    gen(1)
    first = gen(1)
    long = gen(new + 1)
    return long - (first + gen(1)) / 2


def bench_decode(sides, cfg, B, T, new, rounds) -> dict:
    key = f"decode_{B}x{T}"
    mo = sides.ours.prepare(key, "decode", warm=((1,), (new + 1,)), B=B, T=T)  # compiles (one bucket)
    mh = sides.theirs.prepare(key, "decode", warm=((1,),), B=B, T=T)
    o, h = [], []
    for _ in range(rounds):
        o.append(decode_seconds(lambda n: sides.ours.time(key, n), new))
        h.append(decode_seconds(lambda n: sides.theirs.time(key, n), new))
    sides.ours.drop(key), sides.theirs.drop(key)
    rr = _round_ratios(h, o)
    o, h = statistics.median(o), statistics.median(h)
    tok = B * new
    return {"ours_tok_s": tok / o, "hf_tok_s": tok / h, "ratio": h / o, "ratio_rounds": rr, "batch": B,
            "bytes_per_step": decode_bytes_per_step(cfg, B, T + new // 2), "ours_peak_mb": mo, "hf_peak_mb": mh}


def bench_moe(cfg, T, rounds) -> dict:
    """One MoE layer against a dense SwiGLU of the same active FLOPs (width (K + shared) * F),
    forward + backward, T tokens, both compiled by XLA here."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dsv2_jax.layers import MLP
    from dsv2_jax.moe import MoE

    moe = MoE(cfg, rngs=nnx.Rngs(0))
    width = (cfg.num_experts_per_tok + (cfg.n_shared_experts or 0)) * cfg.moe_intermediate_size
    dense = MLP(cfg.hidden_size, width, rngs=nnx.Rngs(1), std=0.02, dtype=jnp.float32, param_dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(0), (1, T, cfg.hidden_size), jnp.float32)

    @nnx.jit
    def g_moe(m, x):
        return nnx.grad(lambda m, x: jnp.sum(m(x, train=True)[0] ** 2), argnums=(0, 1))(m, x)

    @nnx.jit
    def g_dense(m, x):
        return nnx.grad(lambda m, x: jnp.sum(m(x) ** 2), argnums=(0, 1))(m, x)

    def run(f, m):
        return lambda: _timed(lambda: jax.block_until_ready(f(m, x)))

    o, d, rr = _alternate(run(g_moe, moe), run(g_dense, dense), rounds)
    return {"moe_ms": o * 1e3, "dense_ms": d * 1e3, "ratio": o / d, "ratio_rounds": [1 / x for x in rr]}


def bench_compile(quick: bool) -> dict:
    """Compile seconds of one train step of the v2 preset from abstract shapes (nothing is
    allocated), at full depth and cut to 4 layers."""
    import jax
    import jax.numpy as jnp

    from dsv2_jax.checkpoint.hf import abstract_model
    from dsv2_jax.config import load_config
    from dsv2_jax.train.optim import make_optimizer
    from dsv2_jax.train.step import ModelFns, init_state, make_train_step, params_of

    out = {}
    base = load_config("tiny" if quick else "v2").replace(dtype="bfloat16", remat="full", param_dtype="float32")
    for layers in sorted({min(4, base.num_hidden_layers // 2) if quick else 4, base.num_hidden_layers}):
        cfg = base.replace(num_hidden_layers=layers)
        m = abstract_model(cfg)
        tx = make_optimizer(lambda s: 1e-3)
        state = jax.eval_shape(lambda p: init_state(p, tx), params_of(m))
        batch = {k: jax.ShapeDtypeStruct((1, 512), jnp.int32)
                 for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
        step = jax.jit(make_train_step(ModelFns.from_model(m), cfg, tx, lambda s: 1e-3), donate_argnums=0)
        t = time.perf_counter()
        step.lower(state, batch).compile()
        out[f"{layers}_layers_s"] = time.perf_counter() - t
    return out


# ---------------------------------------------------------------------------------------
# Reporting.


TARGETS = {"train": 1.5, "prefill": 1.2, "decode_1x256": 1.5, "decode_4x2048": 10.0}


def machine() -> str:
    import jax
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__} ({jax.default_backend()}), "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}, "
            f"LD_PRELOAD={os.environ.get('LD_PRELOAD') or '(unset)'}, "
            f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES') or '(unset)'}")


def table(res: dict) -> str:
    c = res.get("ceilings", {})
    lines = ["| row | dsv2_jax | transformers | ratio | target | notes |", "|---|---|---|---|---|---|"]
    if c:
        lines.append(f"| ceilings | {c['matmul_gflops']:.0f} GFLOP/s f32 matmul, {c['read_gbps']:.1f} GB/s read | | | | best of the run's start and end |")
    if "train" in res:
        r = res["train"]
        lines.append(f"| train ({r.get('shape', '4 x 512')}) | {r['ours_tok_s']:.0f} tok/s, MFU {r['ours_mfu']:.0%} | "
                     f"{r['hf_tok_s']:.0f} tok/s, MFU {r['hf_mfu']:.0%} | {_ratio_cell(r)} | >= 1.5x, MFU >= 65% | "
                     f"peak +{r['ours_peak_mb']:.0f} MB vs +{r['hf_peak_mb']:.0f} MB |")
    if "prefill" in res:
        r = res["prefill"]
        lines.append(f"| prefill ({r.get('shape', '4 x 512')}) | {r['ours_tok_s']:.0f} tok/s | {r['hf_tok_s']:.0f} tok/s | "
                     f"{_ratio_cell(r)} | >= 1.2x | peak +{r['ours_peak_mb']:.0f} MB vs +{r['hf_peak_mb']:.0f} MB |")
    for key, name, target in (("decode_1x256", "batch 1, 256 prompt", ">= 1.5x, >= 75% of bound"),
                              ("decode_4x2048", "batch 4, 2048 prompt", ">= 10x")):
        if key in res:
            r = res[key]
            lines.append(f"| decode {r.get('shape', name)} | {r['ours_tok_s']:.1f} tok/s ({r['ours_of_bound']:.0%} of the "
                         f"{r['bound_tok_s']:.0f} tok/s bound) | {r['hf_tok_s']:.1f} tok/s | {_ratio_cell(r)} | "
                         f"{target} | peak +{r['ours_peak_mb']:.0f} MB vs +{r['hf_peak_mb']:.0f} MB |")
    if "moe" in res:
        r = res["moe"]
        lines.append(f"| MoE layer vs dense SwiGLU, same active FLOPs (fwd+bwd) | {r['moe_ms']:.0f} ms vs "
                     f"{r['dense_ms']:.0f} ms | | {_ratio_cell(r)} | <= 1.5x | |")
    if "compile" in res:
        r = res["compile"]
        by_depth = sorted((int(k.split("_")[0]), v) for k, v in r.items())
        lines.append("| v2 train-step compile (abstract) | " + ", ".join(
            f"{v:.0f} s ({n} layers)" for n, v in reversed(by_depth)) + " | | | < 120 s | |")
    return "\n".join(lines)


def write_doc(path: str, res: dict, command: str) -> None:
    sides = f"; the two frameworks in {res['sides']}" if "sides" in res else ""
    block = (f"{DOC_BEGIN}\n`{command}`, {time.strftime('%Y-%m-%d')}, {machine()}{sides}:\n\n{table(res)}\n\n"
             f"Raw figures: `{json.dumps(res, sort_keys=True)}`\n{DOC_END}")
    text = open(path).read() if os.path.exists(path) else "# Measured figures\n"
    if DOC_BEGIN in text and DOC_END in text:
        a, b = text.index(DOC_BEGIN), text.index(DOC_END) + len(DOC_END)
        text = text[:a] + block + text[b:]
    else:
        text = text.rstrip() + "\n\n## `dsv2 bench` (side by side with transformers)\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


ROWS = ("ceilings", "train", "prefill", "decode", "moe", "compile")


def run(a) -> dict:
    import jax

    quick = a.quick
    cfg = bench_config(quick)
    res: dict = {}
    only = set(a.only.split(",")) if a.only else set(ROWS)
    first = ceilings(quick)
    print(f"ceilings (start): {first}", flush=True)
    B, T = (2, 32) if quick else (4, 512)
    rounds = 1 if quick else a.rounds
    if only & {"train", "prefill", "decode"}:
        from dsv2_jax.bench_sides import Sides

        with Sides(cfg, isolate=a.isolate) as sides:
            if "train" in only:
                res["train"] = bench_train(sides, cfg, B, T, 1 if quick else a.steps, rounds)
                res["train"]["shape"] = f"{B} x {T}"
                print(f"train: {res['train']}", flush=True)
            if "prefill" in only:
                res["prefill"] = bench_prefill(sides, B, T, rounds)
                res["prefill"]["shape"] = f"{B} x {T}"
                print(f"prefill: {res['prefill']}", flush=True)
            if "decode" in only:
                new = 8 if quick else a.new
                for b, t, key in ((1, 32 if quick else 256, "decode_1x256"),
                                  (2 if quick else 4, 64 if quick else 2048, "decode_4x2048")):
                    res[key] = bench_decode(sides, cfg, b, t, new, rounds)
                    res[key]["shape"] = f"batch {b}, {t} prompt"
                    print(f"{key}: {res[key]}", flush=True)
        res["sides"] = "a process each" if a.isolate else "one process"
    if "moe" in only:
        res["moe"] = bench_moe(cfg, 256 if quick else 2048, max(3, rounds))
        print(f"moe: {res['moe']}", flush=True)
    if "compile" in only:
        res["compile"] = bench_compile(quick)
        print(f"compile: {res['compile']}", flush=True)
    last = ceilings(quick)
    print(f"ceilings (end): {last}", flush=True)
    against_ceilings(res, first, last)
    del jax
    return res


def add_cli(sub) -> None:
    from dsv2_jax.cli import HelpFormatter

    p = sub.add_parser("bench", help="speed side by side with HF transformers (needs torch)",
                       formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help=f"comma-separated rows of {','.join(ROWS)} (default: all)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per row (median reported)")
    p.add_argument("--steps", type=int, default=2, help="train steps per round")
    p.add_argument("--new", type=int, default=64, help="decode: new tokens timed per case")
    p.add_argument("--quick", action="store_true", help="a toy config, seconds: a smoke run")
    p.add_argument("--isolate", action="store_true",
                   help="run each framework in a worker process of its own (default: both in this process, "
                        "as every table so far)")
    p.add_argument("--doc", default="docs/benchmarks.md",
                   help="markdown file whose `dsv2 bench` block is replaced with the results")
    p.add_argument("--no-doc", action="store_true", help="print only")
    p.set_defaults(func=main)


def check_args(a) -> None:
    """Every refusal before minutes of timing."""
    bad = sorted(set(a.only.split(",")) - set(ROWS)) if a.only is not None else []
    if bad or a.only == "":
        raise ValueError(f"--only: unknown row(s) {', '.join(map(repr, bad or ['']))}; expected a "
                         f"comma-separated subset of {','.join(ROWS)}")
    for flag, v in (("--rounds", a.rounds), ("--steps", a.steps), ("--new", a.new)):
        if v < 1:
            raise ValueError(f"{flag} must be >= 1, got {v}")
    folder = os.path.dirname(os.path.abspath(a.doc))
    if not a.no_doc and not a.quick and not os.path.isdir(folder):
        raise ValueError(f"--doc {a.doc}: no folder {folder} to write into (run from the checkout, "
                         f"or give --doc PATH or --no-doc)")


def main(a) -> int:
    check_args(a)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise ValueError(f"dsv2 bench compares against HF transformers: install torch==2.13.0 and "
                         f"transformers ({e})") from None
    res = run(a)
    print()
    print(table(res))
    if not a.no_doc and not a.quick:
        command = "dsv2 bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "dsv2 bench"
        write_doc(a.doc, res, command.strip())
        print(f"\nwritten to {a.doc}")
    return 0

