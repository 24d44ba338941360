"""`dsv2 train` end to end on the tiny preset: loss falls, exact resume, crash safety,
damaged-checkpoint fallback, non-finite stop, eval and plot."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from batches import token_batch
from dsv2_jax.cli import main as cli_main
from dsv2_jax.train.loop import TrainArgs, TrainingError, train

SMALL = dict(config="tiny", batch_size=4, seq_len=64, log_every=1000, lr=3e-3, warmup_steps=5)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(s) for s in os.listdir(d) if s.isdigit())


def test_loss_falls_and_metrics_are_complete(tmp_path):
    wd = str(tmp_path / "run")
    train(TrainArgs(workdir=wd, steps=60, checkpoint_every=60, **SMALL))
    recs = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["step"] for r in recs] == list(range(1, 61))
    for key in ("loss", "ce", "expert_loss", "device_loss", "comm_loss", "grad_norm", "lr",
                "tokens_per_sec", "mfu", "load_max_over_mean", "dropped_fraction"):
        assert key in recs[0], key
    first, last = np.mean([r["ce"] for r in recs[:5]]), np.mean([r["ce"] for r in recs[-5:]])
    assert last < first - 1.0, (first, last)
    assert _steps(wd) == [60]


def test_throughput_and_mfu_count_the_whole_batch_against_the_given_peak(tmp_path):
    """tokens_per_sec counts every sequence of the global batch (under --grad-accum too, not
    one micro-batch's), and mfu is those tokens' training FLOPs per second over --peak-tflops
    (given in TFLOP/s per device)."""
    from dsv2_jax import load_config
    from dsv2_jax.train.metrics import train_flops_per_token

    wd = str(tmp_path / "run")
    train(TrainArgs(workdir=wd, config="tiny", set=["num_hidden_layers=2"], steps=2, checkpoint_every=2,
                    batch_size=4, seq_len=32, grad_accum=2, peak_tflops=2.0, log_every=1000))
    recs = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    flops = train_flops_per_token(load_config("tiny", num_hidden_layers=2), 32)
    assert len(recs) == 2
    for r in recs:
        assert r["tokens_per_sec"] == pytest.approx(4 * 32 / r["step_time"], rel=1e-9)
        assert r["mfu"] == pytest.approx(flops * 4 * 32 / r["step_time"] / 2e12, rel=1e-9)


def test_the_cpu_peak_follows_the_compute_dtype():
    """Without --peak-tflops the MFU's peak is the device's for the compute dtype: on CPU the
    measured float32 and bfloat16 matmul peaks (0.155 and 0.13 TFLOP/s)."""
    import jax

    from dsv2_jax.train.metrics import peak_flops_per_device

    if jax.devices()[0].platform != "cpu":
        pytest.skip("the CPU figures")
    assert peak_flops_per_device("float32") == pytest.approx(0.155e12)
    assert peak_flops_per_device("bfloat16") == pytest.approx(0.13e12)


def test_stop_and_resume_is_bit_identical(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train(TrainArgs(workdir=a, steps=12, checkpoint_every=100, **SMALL))
    train(TrainArgs(workdir=b, steps=12, checkpoint_every=100, stop_after=5, **SMALL))
    assert _steps(b) == [5]
    train(TrainArgs(workdir=b, steps=12, checkpoint_every=100, **SMALL))
    assert _losses(a) == _losses(b)  # exact float equality


def test_damaged_newest_checkpoint_falls_back(tmp_path, capsys):
    wd = str(tmp_path / "run")
    train(TrainArgs(workdir=wd, steps=8, checkpoint_every=4, **SMALL))
    assert _steps(wd) == [4, 8]
    # Damage every array file of step 8.
    for root, _, files in os.walk(os.path.join(wd, "checkpoints", "8", "state")):
        for f in files:
            if not f.endswith(".json") and not f.startswith("_"):
                with open(os.path.join(root, f), "r+b") as fh:
                    fh.truncate(3)
    logs = []
    train(TrainArgs(workdir=wd, steps=10, checkpoint_every=100, **SMALL), log=logs.append)
    assert any("step 8 is damaged" in line for line in logs), logs
    assert any("resumed from" in line and line.endswith("/4") for line in logs), logs
    assert os.path.isdir(os.path.join(wd, "damaged", "8"))
    recs = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["step"] for r in recs] == list(range(1, 11))


def _tiny_iter():
    from dsv2_jax.train.data import make_train_iter

    return make_train_iter("stdlib", seq_len=8, batch_size=2, seed=0, vocab_size=256)


def test_checkpoints_fall_back_past_every_damaged_step_and_move_each_aside(tmp_path, monkeypatch):
    """TrainCheckpoints on its own (real Orbax steps, no training): the newest step that
    restores wins, with the data iterator saved with it; every newer damaged step is moved to
    workdir/damaged/N (replacing what an earlier quarantine of that step left there) and
    logged; the failed restores' echoes are quieted from the first restore on; a directory
    without checkpoints restores nothing, and one whose every step is damaged is refused."""
    import shutil
    import sys

    import jax
    import jax.numpy as jnp

    from dsv2_jax.train.checkpointing import CheckpointMismatch, TrainCheckpoints

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)  # not yet quieted
    ckdir = str(tmp_path / "checkpoints")
    ck = TrainCheckpoints(ckdir, keep=5, async_save=False, log=_quiet_log)
    it, batches = _tiny_iter(), {}
    for step in (1, 2, 3):
        next(it)
        ck.save(step, {"w": jnp.full((4,), float(step))}, it)
        batches[step] = next(it)  # what a resume from `step` reads first
    ck.close()
    for step in (2, 3):
        shutil.rmtree(os.path.join(ckdir, str(step), "state", "d"))
    stale = tmp_path / "damaged" / "3"
    os.makedirs(stale)
    (stale / "stale").write_text("an earlier quarantine of step 3")
    logs = []
    ck = TrainCheckpoints(ckdir, keep=5, async_save=False, log=logs.append)
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = {"w": jax.ShapeDtypeStruct((4,), jnp.float32, sharding=sh)}
    it = _tiny_iter()
    step, state = ck.restore_latest(abstract, it)
    assert getattr(sys.unraisablehook, "_dsv2_quiet", False)
    assert step == 1 and np.asarray(state["w"]).tolist() == [1.0] * 4
    got = next(it)
    assert all(np.array_equal(got[k], batches[1][k]) for k in batches[1])
    assert [s for s in (3, 2) if any(f"step {s} is damaged" in x for x in logs)] == [3, 2], logs
    assert ck.steps() == [1] and sorted(os.listdir(ckdir)) == ["1"]
    assert sorted(os.listdir(tmp_path / "damaged")) == ["2", "3"]
    assert "stale" not in os.listdir(stale) and "3" not in os.listdir(stale)
    assert os.path.isdir(stale / "state")
    ck.close()

    empty = TrainCheckpoints(str(tmp_path / "none"), keep=5, async_save=False, log=_quiet_log)
    assert empty.restore_latest(abstract, None) == (None, None)
    empty.close()
    shutil.rmtree(os.path.join(ckdir, "1", "state", "d"))
    ck = TrainCheckpoints(ckdir, keep=5, async_save=False, log=_quiet_log)
    with pytest.raises(CheckpointMismatch, match="no checkpoint restores cleanly"):
        ck.restore_latest(abstract, _tiny_iter())
    ck.close()
    assert sorted(os.listdir(tmp_path / "damaged")) == ["1", "2", "3"]


def _quiet_log(*_):
    pass


def test_checkpoint_steps_are_the_committed_step_folders_in_order(tmp_path):
    """The steps a rerun compares with --steps (`done[-1]`) are the newest last: numeric
    order, whatever order the folder lists them in; a file named like a step and an
    unfinished save's temporary folder are not steps."""
    from dsv2_jax.train.checkpointing import checkpoint_steps

    steps = [1, 2, 3, 5, 8, 9, 10, 11, 20, 64, 100, 999, 1000, 12345]
    for s in reversed(steps):
        os.makedirs(tmp_path / str(s))
    (tmp_path / "7").write_text("not a step")
    os.makedirs(tmp_path / "13.orbax-checkpoint-tmp-1700000000")
    assert checkpoint_steps(str(tmp_path)) == steps
    assert checkpoint_steps(str(tmp_path / "absent")) == []


def test_the_seed_draws_the_initial_parameters():
    """--seed is the initialisation seed as well as the data order's: a fresh step-0 state
    from the same seed has the same parameters, from another seed other ones."""
    import jax

    from dsv2_jax import load_config
    from dsv2_jax.checkpoint.hf import abstract_model
    from dsv2_jax.sharding.mesh import make_mesh, replicated
    from dsv2_jax.train.loop import _initial_state
    from dsv2_jax.train.optim import make_optimizer
    from dsv2_jax.train.step import params_of

    cfg = load_config("tiny", num_hidden_layers=1)
    abstract, tx, mesh = abstract_model(cfg), make_optimizer(lambda s: 1e-3), make_mesh(None)

    def params(seed):
        state = _initial_state(cfg, TrainArgs(seed=seed), tx, params_of(abstract), mesh, replicated(mesh))
        return [np.asarray(a) for a in jax.tree.leaves(state["params"])]

    a, b, c = params(0), params(0), params(1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c) if x.std() > 0)


def test_persistent_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    import jax.numpy as jnp

    from dsv2_jax.train import step as step_mod

    wd = str(tmp_path / "run")
    train(TrainArgs(workdir=wd, steps=4, checkpoint_every=2, **SMALL))
    real = step_mod.chunked_cross_entropy
    monkeypatch.setattr(step_mod, "chunked_cross_entropy",
                        lambda *a: (real(*a)[0] * jnp.nan, real(*a)[1]))
    # A trace is open when the run stops (steps 6-9 asked for): it is closed on the way out
    # (the profiler's own calls, passed through, are noted).
    import jax

    calls = []
    for name in ("start_trace", "stop_trace"):
        real_call = getattr(jax.profiler, name)
        monkeypatch.setattr(jax.profiler, name,
                            lambda *a, _n=name, _r=real_call, **kw: (calls.append(_n), _r(*a, **kw))[1])
    # The message names the newest checkpoint (4), not merely one that is kept (2).
    with pytest.raises(TrainingError, match="non-finite for 3 consecutive steps.*last good checkpoint is step 4 "):
        train(TrainArgs(workdir=wd, steps=20, checkpoint_every=2, max_nonfinite=3, profile_steps="6:9", **SMALL))
    assert calls == ["start_trace", "stop_trace"]
    assert _steps(wd) == [2, 4]
    recs = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["finite"] for r in recs[-3:]] == [False] * 3
    # A skipped step applies no update: each of steps 5-7 shows the rate of the next update
    # to apply (the 5th, optimizer count 4), not a rate that moves on with the skipped steps.
    from dsv2_jax.train.optim import lr_schedule

    want = float(lr_schedule(SMALL["lr"], 20, SMALL["warmup_steps"], "cosine")(4))
    assert [r["step"] for r in recs[-3:]] == [5, 6, 7]
    np.testing.assert_allclose([r["lr"] for r in recs[-3:]], [want] * 3, rtol=1e-6)


@pytest.mark.parametrize("optimizer", ["fused AdamW", "optax chain"])
def test_a_finite_loss_with_a_non_finite_gradient_norm_is_skipped(optimizer):
    """A step is skipped when its loss OR its gradient norm is not finite. Here the expert
    balance loss weighed by 1e35 keeps the loss finite (~1e35) while its gradient norm
    overflows float32: the step leaves the parameters and the optimizer state
    as they were and counts one non-finite step, with the fused AdamW and with any optax
    transformation alike."""
    import jax

    from dsv2_jax import init_model, load_config
    from dsv2_jax.train.optim import lr_schedule, make_optax_optimizer, make_optimizer
    from dsv2_jax.train.step import ModelFns, init_state, make_train_step, params_of

    cfg = load_config("tiny", num_hidden_layers=2, aux_loss_alpha=1e35)
    model = init_model(cfg, seed=3)
    fns, params = ModelFns.from_model(model), params_of(model)
    sched = lr_schedule(1e-3, 10, 0, "constant")
    tx = (make_optimizer if optimizer == "fused AdamW" else make_optax_optimizer)(sched)
    B, T = 2, 16
    batch = token_batch(cfg.vocab_size, B, T, seed=6)
    state0 = init_state(params, tx)
    state, m = jax.jit(make_train_step(fns, cfg, tx, sched))(state0, batch)
    assert np.isfinite(float(m["loss"])) and float(m["loss"]) > 1e30
    assert not np.isfinite(float(m["grad_norm"]))
    assert not bool(m["finite"]) and int(state["nonfinite"]) == 1 and int(state["step"]) == 1
    for a, b in zip(jax.tree.leaves((state["params"], state["opt_state"])),
                    jax.tree.leaves((state0["params"], state0["opt_state"]))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigkill_mid_run_then_rerun_finishes(tmp_path):
    wd = str(tmp_path / "run")
    def cmd(steps):
        return [sys.executable, "-m", "dsv2_jax.cli", "train", "--config", "tiny", "--workdir", wd,
                "--steps", str(steps), "--batch-size", "2", "--seq-len", "32", "--checkpoint-every", "3"]

    p = subprocess.Popen(cmd(400), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            d = os.path.join(wd, "checkpoints")
            if os.path.isdir(d) and len([s for s in os.listdir(d) if s.isdigit()]) >= 2:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared")
        p.send_signal(signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    done = _steps(wd)[-1]
    assert done < 400
    rc = subprocess.run(cmd(done + 4), capture_output=True, text=True, timeout=300)
    assert rc.returncode == 0, rc.stderr[-2000:]
    assert "resumed from" in rc.stdout + rc.stderr
    assert _steps(wd)[-1] == done + 4


def test_eval_and_plot_cli(tmp_path, capsys):
    wd = str(tmp_path / "run")
    # a model that holds exactly the 64 positions it trains and evaluates on
    train(TrainArgs(workdir=wd, steps=3, checkpoint_every=3, set=["max_position_embeddings=64"], **SMALL))
    assert cli_main(["eval", "--model", wd, "--batch-size", "2", "--seq-len", "64", "--max-batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "bits/byte" in out and "perplexity" in out
    # bits per byte = the summed cross entropy (nats) over ln 2 times the bytes it covers;
    # stdlib data is byte-level, so that is the loss / ln 2.
    import math

    from dsv2_jax.train.evaluate import evaluate

    r = evaluate(wd, "stdlib", batch_size=2, seq_len=64, max_batches=2, progress=False)
    assert r["bytes"] == r["tokens"] > 0
    assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["tokens"] / (math.log(2) * r["bytes"]), rel=1e-9)
    assert r["bits_per_byte"] == pytest.approx(r["loss"] / math.log(2), rel=1e-9)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-9)
    # Pre-tokenised data: bytes unknown, so no bits per byte; --max-batches batches exactly
    # (one 64-token document per row: 63 counted targets each); ids past the model's
    # vocabulary and a --seq-len past its positions are refused; progress=False prints nothing.
    d = tmp_path / "npy"
    d.mkdir()
    for i in range(3):
        np.save(d / f"{i}.npy", np.arange(i, i + 64, dtype=np.int32))
    spec = f"npy:{d}/*.npy,eval={d}/*.npy"
    r = evaluate(wd, spec, batch_size=1, seq_len=64, max_batches=2, progress=False)
    assert (r["bits_per_byte"], r["bytes"], r["tokens"]) == (None, 0, 2 * 63)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings 64"):
        evaluate(wd, spec, batch_size=1, seq_len=65, progress=False)
    np.save(d / "x_past_vocab.npy", np.array([1, 256], np.int32))
    with pytest.raises(ValueError, match="token id 256 does not fit the model vocab_size 256"):
        evaluate(wd, spec, batch_size=1, seq_len=64, progress=False)
    assert "eval:" not in capsys.readouterr().err
    assert cli_main(["plot", wd]) == 0
    assert os.path.getsize(os.path.join(wd, "metrics.png")) > 1000


def test_refuses_a_different_config_on_the_same_workdir(tmp_path, capsys):
    wd = str(tmp_path / "run")
    train(TrainArgs(workdir=wd, steps=1, checkpoint_every=1, **SMALL))
    rc = cli_main(["train", "--config", "tiny", "--workdir", wd, "--steps", "2", "--set", "hidden_size=64"])
    assert rc == 1
    assert "different config" in capsys.readouterr().err


def test_bf16_compute_remat_and_token_dropping_run(tmp_path):
    wd = str(tmp_path / "run")
    train(TrainArgs(workdir=wd, steps=3, checkpoint_every=3,
                    set=["dtype=bfloat16", "remat=full", "capacity_factor=0.5"], **SMALL))
    recs = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert all(r["finite"] for r in recs)
    assert all(r["dropped_fraction"] > 0 for r in recs)
    # float32 master weights in the checkpoint
    from dsv2_jax.train.evaluate import load_for_eval
    import jax

    cfg, params, _ = load_for_eval(wd)
    assert cfg.dtype == "bfloat16" and cfg.param_dtype == "float32"
    assert {str(a.dtype) for a in jax.tree.leaves(params)} == {"float32"}


def test_gradient_accumulation_equals_full_batch():
    import jax

    from dsv2_jax import init_model, load_config
    from dsv2_jax.train.optim import lr_schedule
    from dsv2_jax.train.step import ModelFns, init_state, make_train_step, params_of

    cfg = load_config("tiny", num_hidden_layers=2)
    model = init_model(cfg, seed=1)
    fns, params = ModelFns.from_model(model), params_of(model)
    import optax

    sched = lr_schedule(1.0, 10, 0, "constant")
    tx = optax.sgd(sched)  # the parameter change is the (averaged) gradient itself
    B, T = 4, 16
    batch = token_batch(256, B, T, seed=0)
    outs = []
    for accum in (1, 2):
        step = jax.jit(make_train_step(fns, cfg.replace(seq_aux=True), tx, sched, accum))
        state, m = step(init_state(params, tx), batch)
        outs.append((state["params"], m))
    (p1, m1), (p2, m2) = outs
    np.testing.assert_allclose(float(m1["ce"]), float(m2["ce"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m2["grad_norm"]), rtol=1e-5)
    # The metrics count the whole batch either way (tokens_per_sec and eval figures read them).
    assert float(m1["tokens"]) == float(m2["tokens"]) == B * T
    np.testing.assert_allclose(float(m1["ce_sum"]), float(m2["ce_sum"]), rtol=1e-6)
    for a, b, p0 in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), jax.tree.leaves(params)):
        g1, g2 = np.asarray(p0) - np.asarray(a), np.asarray(p0) - np.asarray(b)
        # p0 - p1 carries float32 rounding of p0 (up to half an ulp of 1.0)
        assert np.abs(g1 - g2).max() <= 1e-5 * np.abs(g1).max() + 1.2e-7


def test_cross_entropy_is_the_mean_over_the_counted_targets():
    """Targets with loss_mask 0 (padding, a document's last token) count in neither the sum
    nor the count: the loss is the mean over the counted targets only. Dividing by every
    position would shrink the loss (and its gradient) by the share of padding in the batch."""
    import jax.numpy as jnp

    from dsv2_jax import init_model, load_config
    from dsv2_jax.train.step import ModelFns, loss_and_stats, params_of

    cfg = load_config("tiny", num_hidden_layers=2)
    model = init_model(cfg, seed=2)
    fns, params = ModelFns.from_model(model), params_of(model)
    rng = np.random.default_rng(1)
    B, T = 2, 16
    ids = rng.integers(0, 256, (B, T + 1))
    mask = np.zeros((B, T), np.int32)
    mask[0, :T // 2] = 1
    mask[1, ::2] = 1  # half of the targets counted
    batch = {"inputs": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
             "segment_ids": jnp.ones((B, T), jnp.int32), "loss_mask": jnp.asarray(mask)}
    _, stats = loss_and_stats(fns, cfg, params, batch, train=False)
    logits = np.asarray(model(batch["inputs"], batch["positions"], batch["segment_ids"]), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    kept = mask.astype(bool)
    assert float(stats["tokens"]) == kept.sum() == B * T // 2
    np.testing.assert_allclose(float(stats["ce_sum"]), nll[kept].sum(), rtol=1e-5)
    np.testing.assert_allclose(float(stats["ce"]), nll[kept].mean(), rtol=1e-5)


def test_clip_flag_reaches_the_optimizer(tmp_path):
    """--clip sets the global-norm clip of the updates: one step from the same start and batch
    with a clip far below the gradient norm gives other parameters than without clipping (an
    ignored --clip would train every run at the default 1.0)."""
    import jax

    from dsv2_jax.train.evaluate import load_for_eval

    args = dict(SMALL, seq_len=32, set=["num_hidden_layers=2"], warmup_steps=0)
    out = {}
    for clip in (0.0, 1e-6):
        wd = str(tmp_path / f"clip{clip}")
        train(TrainArgs(workdir=wd, steps=1, checkpoint_every=1, clip=clip, **args))
        rec = json.loads(open(os.path.join(wd, "metrics.jsonl")).readline())
        out[clip] = (rec["grad_norm"], jax.tree.leaves(load_for_eval(wd)[1]))
    (g0, p0), (g1, p1) = out[0.0], out[1e-6]
    assert g0 == g1 > 1e-3  # the same gradients (the norm is reported before clipping)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(p0, p1))


def test_init_from_hf_starts_from_its_weights(tmp_path):
    import chex

    import hf_reference as ref
    from dsv2_jax import from_pretrained
    from dsv2_jax.train.evaluate import load_for_eval
    from dsv2_jax.train.step import params_of

    hf = ref.build(dict(ref.V2, vocab_size=256), seed=5)
    src = ref.save(hf, str(tmp_path / "hf"))
    wd = str(tmp_path / "run")
    train(TrainArgs(workdir=wd, steps=1, checkpoint_every=1, init_from=src,
                    **dict(SMALL, lr=0.0, warmup_steps=0)))
    _, params, _ = load_for_eval(wd)
    want = params_of(from_pretrained(src))
    chex.assert_trees_all_equal(params, want)


def test_set_applies_on_top_of_init_from(tmp_path):
    import hf_reference as ref

    src = ref.save(ref.build(dict(ref.V2, vocab_size=256), seed=6), str(tmp_path / "hf"))
    wd = str(tmp_path / "run")
    train(TrainArgs(workdir=wd, steps=2, checkpoint_every=2, init_from=src,
                    set=["capacity_factor=0.5"], **SMALL))
    recs = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert all(r["dropped_fraction"] > 0 for r in recs)


def test_a_differently_shaped_state_is_refused_not_quarantined(tmp_path, monkeypatch):
    """A workdir whose checkpoints hold another optimizer-state layout (here: the optax chain
    that earlier versions saved) is refused with a message, not treated as damaged."""
    from dsv2_jax.errors import UserError
    from dsv2_jax.train import loop as loop_mod
    from dsv2_jax.train.optim import make_optax_optimizer

    wd = str(tmp_path / "run")
    with monkeypatch.context() as m:
        m.setattr(loop_mod, "make_optimizer", make_optax_optimizer)
        train(TrainArgs(workdir=wd, steps=2, checkpoint_every=2, **SMALL))
    with pytest.raises(UserError, match="another shape"):
        train(TrainArgs(workdir=wd, steps=4, checkpoint_every=2, **SMALL))
    assert not os.path.exists(os.path.join(wd, "damaged"))
    assert _steps(wd) == [2]


def test_ctrl_c_saves_at_a_step_boundary_and_resumes(tmp_path):
    wd = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "dsv2_jax.cli", "train", "--config", "tiny", "--workdir", wd,
           "--batch-size", "2", "--seq-len", "32", "--checkpoint-every", "1000", "--steps", "2000"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        metrics = os.path.join(wd, "metrics.jsonl")
        while time.time() < deadline:
            if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3:
                break
            time.sleep(0.2)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, out[-2000:]  # 128 + SIGINT: stopped, not finished
    assert "SIGINT: saved step" in out and "rerun the same command to resume" in out
    saved = _steps(wd)[-1]
    recs = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert recs[-1]["step"] == saved  # the checkpoint is the last step that ran
    r = subprocess.run(cmd[:-1] + [str(saved + 2)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "resumed from" in r.stdout + r.stderr


def test_resume_with_other_data_settings_is_refused(tmp_path):
    wd = str(tmp_path / "run")
    train(TrainArgs(workdir=wd, steps=1, checkpoint_every=1, **SMALL))
    with pytest.raises(TrainingError, match="other data settings.*--seq-len 64"):
        train(TrainArgs(workdir=wd, steps=2, checkpoint_every=1, **dict(SMALL, seq_len=32)))


def test_tensorboard_scalars_and_a_profile_trace(tmp_path, monkeypatch):
    """--profile-steps 2:3 traces exactly steps 2 and 3: the trace starts once step 1 is
    done and recorded, and stops once step 3 is (the profiler's own calls, passed through,
    note how many steps metrics.jsonl holds at each). Ending a trace saves no checkpoint
    off the --checkpoint-every cadence."""
    import jax

    wd = str(tmp_path / "run")
    metrics = os.path.join(wd, "metrics.jsonl")
    calls = []

    def noting(name, real):
        def call(*a, **kw):
            calls.append((name, sum(1 for _ in open(metrics))))
            return real(*a, **kw)
        return call

    monkeypatch.setattr(jax.profiler, "start_trace", noting("start", jax.profiler.start_trace))
    monkeypatch.setattr(jax.profiler, "stop_trace", noting("stop", jax.profiler.stop_trace))
    logs = []
    train(TrainArgs(workdir=wd, steps=4, checkpoint_every=4, profile_steps="2:3", **SMALL), log=logs.append)
    assert calls == [("start", 1), ("stop", 3)], calls
    assert any("profiler trace of steps 2..3 in" in line for line in logs), logs
    assert _steps(wd) == [4]
    events = [f for f in os.listdir(os.path.join(wd, "tensorboard")) if "tfevents" in f]
    assert len(events) == 1
    data = open(os.path.join(wd, "tensorboard", events[0]), "rb").read()
    for tag in (b"train/loss", b"train/lr", b"train/tokens_per_sec", b"train/load_max_over_mean"):
        assert tag in data, tag
    traces = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(wd, "profile")) for f in fs]
    assert any(f.endswith(".xplane.pb") and os.path.getsize(f) > 0 for f in traces), traces
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]  # tracing loses no step


def test_bad_profile_steps_are_refused(tmp_path):
    with pytest.raises(TrainingError, match="--profile-steps"):
        train(TrainArgs(workdir=str(tmp_path / "run"), steps=4, profile_steps="3:2", **SMALL))
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


def test_profile_steps_are_one_based_and_start_after_the_resumed_step():
    """--profile-steps A:B (or A alone: that one step) names training steps, the first being
    1: step 0 is refused like a reversed range; a resume past A traces from its first step."""
    from dsv2_jax.train.run_settings import parse_profile_steps

    assert parse_profile_steps(None, 0) is None and parse_profile_steps("3", 0) == (3, 3)
    assert parse_profile_steps("2:5", 0) == (2, 5) and parse_profile_steps("2:5", 3) == (4, 5)
    for bad in ("0:2", "0", "3:2", "a:b", "-1:2"):
        with pytest.raises(TrainingError, match="--profile-steps"):
            parse_profile_steps(bad, 0)


def test_tensorboard_writer_loads_without_importing_torch(tmp_path):
    code = ("import sys; from dsv2_jax.train.metrics import TensorBoard\n"
            f"tb = TensorBoard({str(tmp_path)!r}); tb.write({{'step': 1, 'loss': 2.5}}); tb.close()\n"
            "assert tb.writer is not None\n"
            "assert 'torch' not in sys.modules, 'tensorboardX pulled torch in'\n"
            "import torch; assert torch.ones(1).item() == 1.0  # torch itself still imports\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    events = [f for f in os.listdir(tmp_path) if "tfevents" in f]
    assert len(events) == 1 and b"train/loss" in open(tmp_path / events[0], "rb").read()


QUICK = dict(config="tiny", set=["num_hidden_layers=2"], batch_size=2, seq_len=32, warmup_steps=1)


def test_checkpoint_cadence_final_checkpoint_stop_after_and_log_every(tmp_path, capsys):
    """One run of the step loop: a checkpoint every --checkpoint-every steps plus one at the
    last step it trains (here --stop-after's, before --steps), every step in metrics.jsonl,
    a progress line for step 1 and every --log-every-th step after it (no terminal), and a
    result that is the last step's record without `stopped_by` (the run was not signalled)."""
    wd = str(tmp_path / "run")
    rec = train(TrainArgs(workdir=wd, steps=9, stop_after=5, checkpoint_every=2, log_every=2, **QUICK))
    assert _steps(wd) == [2, 4, 5]
    recs = [json.loads(line) for line in open(os.path.join(wd, "metrics.jsonl"))]
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5]
    assert rec["step"] == 5 and rec["loss"] == recs[-1]["loss"] and "stopped_by" not in rec
    # The step's record: floats, `finite` a bool, the non-finite count an int; the loss's
    # internal sum (ce_sum) is not a metric.
    assert recs[0]["finite"] is True and recs[0]["nonfinite_total"] == 0 and "ce_sum" not in recs[0]
    printed = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert printed == ["step 1", "step 2", "step 4"], printed


def _signal_after_compiling(signum, times, lines=None):
    """A `log` for train() that sends this process `signum` `times` times as the training step
    is compiled, i.e. before step 1 runs (and keeps the lines in `lines`)."""
    sent = []

    def log(line):
        if lines is not None:
            lines.append(line)
        if line.startswith("compiled in") and not sent:
            sent.append(True)
            for _ in range(times):
                os.kill(os.getpid(), signum)
    return log


def test_sigterm_stops_at_the_next_step_boundary_saves_it_and_restores_the_handlers(tmp_path):
    """SIGTERM (what a scheduler sends before killing a job) asks for a clean stop: the step
    that was running ends, is recorded and saved, and the result says stopped_by; a second
    SIGTERM while stopping does not interrupt (only a second Ctrl-C does). The process's own
    handlers are back afterwards."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    wd = str(tmp_path / "run")
    lines = []
    try:
        rec = train(TrainArgs(workdir=wd, steps=50, checkpoint_every=1000, **QUICK),
                    log=_signal_after_compiling(signal.SIGTERM, 2, lines))
    except KeyboardInterrupt:  # (would end the whole pytest session if let through)
        pytest.fail("a second SIGTERM interrupted the run")
    assert rec["stopped_by"] == "SIGTERM" and rec["step"] == 1
    assert "SIGTERM: saved step 1, stopping" in lines, lines
    assert _steps(wd) == [1]
    assert [json.loads(line)["step"] for line in open(os.path.join(wd, "metrics.jsonl"))] == [1]
    assert {s: signal.getsignal(s) for s in before} == before


def test_a_second_ctrl_c_interrupts_at_once_and_restores_the_handlers(tmp_path):
    """A first Ctrl-C asks for a stop at the step boundary; a second one raises
    KeyboardInterrupt at once (nothing saved), and the handlers are restored on the way out."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    wd = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train(TrainArgs(workdir=wd, steps=50, checkpoint_every=1000, **QUICK),
              log=_signal_after_compiling(signal.SIGINT, 2))
    assert not os.path.isdir(os.path.join(wd, "checkpoints")) or _steps(wd) == []
    assert {s: signal.getsignal(s) for s in before} == before


def _tensorboard_scalars(logdir):
    """{(tag, step): value} of every scalar in the event files under `logdir`."""
    from tb_events import read_events

    return {(v.tag, ev.step): v.simple_value for name in os.listdir(logdir)
            for ev in read_events(os.path.join(logdir, name)) for v in ev.summary.value}


def test_tensorboard_writes_every_metric_and_leaves_out_non_finite_values(tmp_path):
    """Each of the step's scalars (TensorBoard.KEYS) is written under train/ at its step; a
    non-finite value (a skipped step's loss) or a missing one (mfu without a peak) is left
    out rather than drawn as a spike; keys that are not scalars of the run are not written."""
    pytest.importorskip("tensorboardX")
    from dsv2_jax.train.metrics import TensorBoard

    keys = TensorBoard.KEYS
    tb = TensorBoard(str(tmp_path))
    tb.write({"step": 1, **{k: float(i) + 0.5 for i, k in enumerate(keys)}, "step_time": 9.0})
    tb.write({"step": 2, **{k: 1.25 for k in keys}, "loss": float("nan"), "grad_norm": float("inf"),
              "mfu": None})
    tb.close()
    got = _tensorboard_scalars(str(tmp_path))
    want = {(f"train/{k}", 1): float(i) + 0.5 for i, k in enumerate(keys)}
    want.update({(f"train/{k}", 2): 1.25 for k in keys if k not in ("loss", "grad_norm", "mfu")})
    assert got == want
    assert {"loss", "ce", "lr", "grad_norm", "tokens_per_sec", "mfu", "expert_loss", "device_loss",
            "comm_loss", "load_max_over_mean", "load_min_over_mean", "dropped_fraction",
            "rows_per_token"} <= set(keys)


def test_non_finite_steps_apart_do_not_add_up_to_a_stop(tmp_path, monkeypatch):
    """--max-nonfinite counts CONSECUTIVE non-finite steps: steps 1, 3 and 5 non-finite (the
    loss made NaN for exactly those batches, recognised by their targets) with
    --max-nonfinite 2 is never two in a row, so the run finishes; the checkpoints due at the
    finite steps 2, 4 and 6 are saved."""
    import jax.numpy as jnp

    from dsv2_jax import load_config
    from dsv2_jax.train import step as step_mod
    from dsv2_jax.train.data import make_train_iter

    args = TrainArgs(workdir=str(tmp_path / "run"), steps=6, checkpoint_every=2, max_nonfinite=2, **QUICK)
    it = make_train_iter(args.data, seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed,
                         vocab_size=load_config("tiny").vocab_size)
    keys = [int(next(it)["targets"].astype(np.int64).sum()) for _ in range(args.steps)]
    assert len(set(keys)) == len(keys), keys  # each batch recognisable by its key
    bad = jnp.asarray([keys[0], keys[2], keys[4]])
    real = step_mod.chunked_cross_entropy

    def sometimes_nan(h, w, targets, mask, chunk):
        ce, n = real(h, w, targets, mask, chunk)
        return jnp.where(jnp.any(jnp.sum(targets) == bad), jnp.nan, ce), n

    monkeypatch.setattr(step_mod, "chunked_cross_entropy", sometimes_nan)
    rec = train(args)
    recs = [json.loads(line) for line in open(os.path.join(args.workdir, "metrics.jsonl"))]
    assert [r["finite"] for r in recs] == [False, True] * 3
    assert rec["step"] == 6 and _steps(args.workdir) == [2, 4, 6]
