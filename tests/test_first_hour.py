"""What a new user meets in the first hour: refused runs leave nothing behind, the README's
mesh example runs on the shipped preset, no silent waits, help shows defaults, units that fit."""

import os
import subprocess
import sys

import pytest

from dsv2_jax.cli import main as cli_main
from procenv import cpu_env

SMALL = ["--batch-size", "2", "--seq-len", "32", "--log-every", "1000", "--set", "num_hidden_layers=2"]


def _snapshot(path):
    """{relative path: (size, mtime)} of everything under path, or None if absent."""
    if not os.path.exists(path):
        return None
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("extra,msg", [
    (["--mesh", "data=3"], "has 3 devices"),
    (["--mesh", "expert=1,model=2"], "unknown axis"),
    (["--data", "jsonl:/nonexistent/*.jsonl,tokenizer=bytes"], "nonexistent"),
    (["--data", "nosuchkind:x"], "nosuchkind"),
    (["--set", "no_such_field=1"], "no_such_field"),
    (["--set", "num_experts_per_tok=99"], "num_experts_per_tok"),
    (["--init-from", "/nonexistent/model"], "no such directory"),
])
def test_refused_run_leaves_no_workdir(tmp_path, capsys, extra, msg):
    wd = str(tmp_path / "run")
    rc = cli_main(["train", "--workdir", wd, "--steps", "1", *SMALL, *extra])
    err = capsys.readouterr().err
    assert rc == 1 and msg in err, err
    assert not os.path.exists(wd)


def test_refused_rerun_leaves_an_existing_workdir_unchanged(tmp_path, capsys):
    wd = str(tmp_path / "run")
    assert cli_main(["train", "--workdir", wd, "--steps", "1", "--checkpoint-every", "1", *SMALL]) == 0
    before = _snapshot(wd)
    for extra in (["--set", "hidden_size=64"], ["--data", "nosuchkind:x"], ["--mesh", "data=5"],
                  ["--seq-len", "16"]):
        assert cli_main(["train", "--workdir", wd, "--steps", "2", *SMALL, *extra]) == 1
    capsys.readouterr()
    assert _snapshot(wd) == before


def test_rerun_of_a_finished_run_says_nothing_to_do(tmp_path, capsys):
    wd = str(tmp_path / "run")
    args = ["train", "--workdir", wd, "--steps", "2", "--checkpoint-every", "2", *SMALL]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "compiling the training step..." in out
    assert "model tiny (" in out and "data stdlib" in out and f"workdir {wd}" in out
    before = _snapshot(wd)
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "already at step 2 of 2; nothing to do" in out and "--steps" in out
    assert _snapshot(wd) == before


def test_a_resume_keeps_the_settings_the_command_does_not_give(tmp_path, capsys):
    """`dsv2 train --workdir W --steps N` extends W's run with its own learning rate, schedule,
    batch and model (they fell back to the defaults, and a different batch was refused)."""
    import json

    wd = str(tmp_path / "run")
    assert cli_main(["train", "--workdir", wd, "--steps", "1", *SMALL, "--lr", "0.001",
                     "--schedule", "constant", "--clip", "0.5"]) == 0
    capsys.readouterr()
    assert cli_main(["train", "--workdir", wd, "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "resuming with the run's --seq-len 32, --batch-size 2, --lr 0.001" in out
    assert "settings changed from step 1: --steps 1 -> 2\n" in out
    with open(os.path.join(wd, "run.json")) as f:
        run = json.load(f)
    assert run["history"] == [{"step": 1, "changes": {"steps": {"old": 1, "new": 2}}}]
    assert "given" not in run
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        assert abs([json.loads(line)["lr"] for line in f][-1] - 1e-3) < 1e-9  # constant, not cosine


def test_a_resume_keeps_the_runs_seed_and_refuses_another(tmp_path, capsys):
    """--seed orders the data: the iterator state a checkpoint holds belongs to the run's seed.
    A resume without --seed takes the run's; one with another seed is refused, naming it
    (resuming the saved stream position under another order would repeat and skip data)."""
    import json

    wd = str(tmp_path / "run")
    assert cli_main(["train", "--workdir", wd, "--steps", "2", "--stop-after", "1", "--seed", "3",
                     *SMALL]) == 0
    capsys.readouterr()
    assert cli_main(["train", "--workdir", wd, "--steps", "2", "--seed", "0"]) == 1
    err = capsys.readouterr().err
    assert "other data settings (--seed 3)" in err, err
    assert cli_main(["train", "--workdir", wd, "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "resuming with the run's" in out and "--seed 3" in out, out
    assert "settings changed" not in out
    with open(os.path.join(wd, "run.json")) as f:
        assert json.load(f)["seed"] == 3
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]


def test_the_flags_a_resume_keeps_count_as_given_only_when_given():
    """`dsv2 train` leaves every flag a resume takes from the run unset (None) unless the
    command names it: a flag parsed to its default would count as given and reset the run's
    setting to the default on every resume."""
    from dsv2_jax.cli import build_parser
    from dsv2_jax.train.run_settings import KEPT_ON_RESUME

    a = build_parser().parse_args(["train"])
    assert {k: getattr(a, k) for k in KEPT_ON_RESUME} == dict.fromkeys(KEPT_ON_RESUME)
    flags = {k: "--" + k.replace("_", "-") for k in KEPT_ON_RESUME}
    values = dict(data="stdlib", seq_len="256", batch_size="8", seed="0", steps="300", lr="0.003",
                  warmup_steps="0", schedule="cosine", clip="1.0", weight_decay="0.1", mesh="data=1",
                  grad_accum="1")
    a = build_parser().parse_args(["train", *[x for k in KEPT_ON_RESUME for x in (flags[k], values[k])]])
    assert all(getattr(a, k) is not None for k in KEPT_ON_RESUME)


def test_optimizer_flags_and_init_from_with_config_are_refused(tmp_path, capsys):
    wd = str(tmp_path / "run")
    for flag, value in (("--lr", "-1"), ("--weight-decay", "-5"), ("--warmup-steps", "-3"),
                        ("--clip", "-1"), ("--peak-tflops", "0"), ("--lr", "inf")):
        assert cli_main(["train", "--workdir", wd, flag, value]) == 1
        assert flag in capsys.readouterr().err
    assert cli_main(["train", "--workdir", wd, "--init-from", str(tmp_path), "--config", "v2"]) == 1
    assert "--config and --init-from both name the model" in capsys.readouterr().err
    assert not os.path.exists(wd)


def test_counts_below_one_and_an_uneven_accumulation_are_refused_in_one_line(tmp_path, capsys):
    """Each count flag below 1 is refused naming it, before any file is written (a zero
    --grad-accum would otherwise end in a division by zero, a zero --steps in a run that
    trains nothing); so is a batch that --grad-accum does not divide."""
    wd = str(tmp_path / "run")
    for flag in ("--steps", "--batch-size", "--seq-len", "--checkpoint-every", "--keep-checkpoints",
                 "--grad-accum", "--log-every", "--max-nonfinite"):
        assert cli_main(["train", "--workdir", wd, flag, "0"]) == 1
        err = capsys.readouterr().err
        assert err == f"dsv2: error: {flag} must be >= 1, got 0\n", err
    assert cli_main(["train", "--workdir", wd, "--batch-size", "6", "--grad-accum", "4"]) == 1
    assert "--batch-size 6 is not divisible by --grad-accum 4" in capsys.readouterr().err
    assert not os.path.exists(wd)


def test_device_losses_without_device_groups_are_said_to_be_zero(tmp_path, capsys):
    args = ["train", "--workdir", str(tmp_path / "run"), "--steps", "1", *SMALL, "--set",
            "num_device_groups=0", "max_devices_per_token=0", "comm_aux_loss_alpha=0.02"]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "there are no device groups" in out
    assert "model tiny (538.43K parameters" in out  # 2 layers: a second --set adds to the first


def test_readme_mesh_example_runs_on_the_shipped_preset(tmp_path):
    """tiny ships num_device_groups=4, max_devices_per_token=2; on expert=2 the devices are the
    groups: 2 of 4 becomes 1 of 2, said in one line."""
    env = cpu_env(2)
    cmd = [sys.executable, "-m", "dsv2_jax.cli", "train", "--config", "tiny", "--mesh", "data=1,expert=2",
           "--workdir", str(tmp_path / "ep"), "--steps", "2", "--batch-size", "2", "--seq-len", "32"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "each token reaches at most 1 of 2 (the config says 2 of 4 groups)" in r.stdout
    assert "mesh expert=2 over 2 cpu device(s)" in r.stdout
    # MFU: the step's FLOPs over both devices' peak (float32 on CPU: 0.155 TFLOP/s each)
    import json

    from dsv2_jax import load_config
    from dsv2_jax.train.metrics import train_flops_per_token

    flops = train_flops_per_token(load_config("tiny"), 32) * 2 * 32
    for rec in map(json.loads, open(tmp_path / "ep" / "metrics.jsonl")):
        assert rec["mfu"] == pytest.approx(flops / rec["step_time"] / (2 * 0.155e12), rel=1e-9)
    # a micro-batch must give every token shard whole sequences
    r = subprocess.run(cmd[:-8] + ["--workdir", str(tmp_path / "ga"), "--steps", "2", "--batch-size", "2",
                                   "--grad-accum", "2", "--seq-len", "32"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "1 sequences per micro-batch is not divisible by the 2" in r.stderr, \
        r.stderr[-2000:]


def test_default_workdir_is_named_after_the_config():
    from dsv2_jax.train.loop import default_workdir

    assert default_workdir("tiny") == os.path.join("runs", "tiny")
    assert default_workdir("v2-lite") == os.path.join("runs", "v2-lite")
    assert default_workdir("some/dir/my-model.json") == os.path.join("runs", "my-model")
    assert default_workdir("some/dir/config.json") == os.path.join("runs", "dir")
    assert default_workdir("tiny", "/ckpts/DeepSeek-V2-Lite/") == os.path.join("runs", "DeepSeek-V2-Lite")


def test_init_from_without_a_workdir_runs_in_runs_named_after_it(tmp_path, monkeypatch, capsys):
    """`dsv2 train --init-from DIR` without --workdir uses runs/<DIR's name>, not runs/tiny
    (the --config default's): here that workdir already holds a run of another model, and
    the command is refused naming it (nothing is loaded or trained)."""
    from dsv2_jax import load_config

    src = tmp_path / "my-model"
    src.mkdir()
    load_config("tiny").save(str(src / "config.json"))
    wd = tmp_path / "runs" / "my-model"
    os.makedirs(wd / "checkpoints" / "1")
    load_config("tiny", hidden_size=64).save(str(wd / "config.json"))
    monkeypatch.chdir(tmp_path)
    assert cli_main(["train", "--init-from", str(src), "--steps", "2"]) == 1
    err = capsys.readouterr().err
    assert f"{os.path.join('runs', 'my-model')} holds a run of a different config (hidden_size" in err, err


@pytest.mark.parametrize("cmd", ["train", "eval", "convert"])
def test_help_lists_defaults(cmd, capsys):
    with pytest.raises(SystemExit):
        cli_main([cmd, "--help"])
    out = capsys.readouterr().out
    assert "default" in out
    if cmd == "train":
        for want in ("(default: tiny)", "(default: 300)", "(default: 256)", "(default: stdlib)",
                     "runs/<config name>", "HF safetensors directory", "dsv2 Orbax checkpoint",
                     "training workdir", "(default: cosine)", "peak learning rate (default: 0.003)",
                     "AdamW weight decay (default: 0.1)", "clip, 0: off (default: 1.0)",
                     "micro-batches per step, their gradients averaged (default: 1)"):
            assert want in " ".join(out.split()), want
        assert "(default: [])" not in out  # --set: none


def test_eval_refuses_bad_flags_before_loading_a_model(tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")  # loading it would fail with another message
    for flag in ("--batch-size", "--seq-len", "--max-batches"):
        assert cli_main(["eval", "--model", missing, flag, "0"]) == 1
        assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err
    from dsv2_jax.train.evaluate import evaluate

    with pytest.raises(ValueError, match="--max-batches must be >= 1, got 0"):  # the API too
        evaluate(missing, "stdlib", max_batches=0, progress=False)
    assert cli_main(["eval", "--model", missing, "--data", "jsonl:x.jsonl"]) == 1
    assert "needs tokenizer=" in capsys.readouterr().err


def test_info_uses_units_that_fit(capsys):
    assert cli_main(["info", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "(1.09M)" in out and "0.00B" not in out
    assert "tiny: 4 layers, hidden 128, 8 routed experts (top-2)" in out  # the tiny preset's shape
    from dsv2_jax.params import human_count

    assert human_count(235_741_434_880) == "235.74B"
    assert human_count(999) == "999"


def test_plot_has_losses_lr_and_load(tmp_path):
    import json

    from dsv2_jax.train.plot import plot, smooth

    wd = tmp_path / "run"
    wd.mkdir()
    with open(wd / "metrics.jsonl", "w") as f:
        for s in range(1, 30):
            f.write(json.dumps({"step": s, "loss": 3.0 - s * 0.05 + 0.01, "ce": 3.0 - s * 0.05,
                                "lr": 1e-3 * min(1, s / 5), "load_max_over_mean": 1.5,
                                "load_min_over_mean": 0.5, "dropped_fraction": 0.0}) + "\n")
    out = plot(str(wd))
    assert os.path.getsize(out) > 1000
    assert smooth([1.0, 1.0, float("nan"), 1.0]) == [1.0, 1.0, 1.0, 1.0]


def test_plot_draws_each_curve_from_its_own_metric(tmp_path, monkeypatch):
    """The losses panel: raw and smoothed CE, the smoothed total, and on its own axis the
    smoothed balance-loss part total - CE (positive: the balance losses add to CE); the
    learning rate and the expert load below. (The figure is kept open to read its lines.)
    An output folder gets metrics.png inside it."""
    import json

    import matplotlib.pyplot as plt

    from dsv2_jax.train.plot import plot, smooth

    wd = tmp_path / "run"
    wd.mkdir()
    recs = [{"step": s, "ce": 3.0 - 0.05 * s, "loss": 3.0 - 0.05 * s + 0.01 * (1 + s % 3),
             "lr": 1e-3 * min(1, s / 5), "load_max_over_mean": 1.5 + 0.01 * s,
             "load_min_over_mean": 0.5 - 0.01 * s, "dropped_fraction": 0.02 * (s % 2)} for s in range(1, 21)]
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    monkeypatch.setattr(plt, "close", lambda *a: None)
    out = plot(str(wd), str(tmp_path))  # a folder: the PNG goes inside
    assert out == str(tmp_path / "metrics.png") and os.path.getsize(out) > 1000
    fig = plt.gcf()
    try:
        lines = {ln.get_label(): list(ln.get_ydata()) for ax in fig.axes for ln in ax.get_lines()}
    finally:
        plt.close(fig)
    col = lambda k: [r[k] for r in recs]
    aux = [t - c for t, c in zip(col("loss"), col("ce"))]
    assert lines["cross entropy"] == col("ce")
    assert lines["cross entropy (smoothed)"] == smooth(col("ce"))
    assert lines["total loss (smoothed)"] == smooth(col("loss"))
    assert lines["total - CE: balance losses (smoothed)"] == pytest.approx(smooth(aux), abs=1e-12)
    assert min(lines["total - CE: balance losses (smoothed)"]) > 0
    assert [lines[k] for k in ("max / mean expert load", "min / mean expert load", "dropped fraction")] == [
        col("load_max_over_mean"), col("load_min_over_mean"), col("dropped_fraction")]
    assert list(fig.axes[1].get_lines()[0].get_ydata()) == col("lr")  # the middle panel


def test_smooth_is_a_bias_corrected_moving_average():
    """smooth: the exponential moving average with weight alpha on the newest value, divided
    by the weight seen so far, so the first point is the first value (not alpha times it)
    and NaNs are skipped."""
    import math

    from dsv2_jax.train.plot import smooth

    a = 0.1
    want2 = (a * 0.9 * 2.0 + a * 4.0) / (a * 0.9 + a)
    assert smooth([2.0, 4.0]) == pytest.approx([2.0, want2], rel=1e-12)
    assert smooth([2.0, 4.0], alpha=0.5) == pytest.approx([2.0, (0.25 * 2.0 + 0.5 * 4.0) / 0.75], rel=1e-12)
    got = smooth([float("nan"), 2.0, float("nan")])
    assert math.isnan(got[0]) and got[1:] == [2.0, 2.0]


def test_malformed_input_is_one_line_not_a_traceback(tmp_path, capsys):
    """Found by a review (2026-12-07): each of these ended in a traceback, was silently
    dropped, or wrote elsewhere than it said."""
    import json

    from dsv2_jax.sharding.mesh import parse_mesh
    from dsv2_jax.train.plot import plot

    (tmp_path / "list.json").write_text("[1, 2]")
    cases = [
        (["info", str(tmp_path / "list.json")], "a config is a JSON object, got list"),
        (["info", "tiny", "--set", "rope_scaling=5"], "rope_scaling: an object (or null)"),
        (["info", "tiny", "--set", "hidden_size=64", "hidden_size=32"], "--set hidden_size: given twice, as 64 and 32"),
        (["info", "tiny", "--set", "rms_norm_eps=-1"], "rms_norm_eps: must be positive"),
        (["train", "--workdir", str(tmp_path / "w"), "--seq-len", "5000"],
         "--seq-len 5000 exceeds the model's max_position_embeddings 4096"),
        (["convert", str(tmp_path), str(tmp_path / "o"), "--to", "hf", "--shard-size", "0"], None),
        (["train", "--workdir", "gs://bucket/runs/x"], "mount the bucket"),
    ]
    for argv, words in cases:
        if words is None:  # argparse's own refusal: exit 2
            with pytest.raises(SystemExit) as e:
                cli_main(argv)
            assert e.value.code == 2 and "a shard size must be positive" in capsys.readouterr().err
            continue
        assert cli_main(argv) == 1, argv
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, (argv, err)
    for spec in ("", "fsdp=2,,tensor=1"):
        with pytest.raises(ValueError, match="empty"):
            parse_mesh(spec, 2)
    (tmp_path / "dense.json").write_text(json.dumps({"num_hidden_layers": 2}))
    assert cli_main(["info", str(tmp_path / "dense.json")]) == 0
    assert "dense (no routed experts)" in capsys.readouterr().out
    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "lr": 1e-3}) + "\n")
    assert plot(str(wd), str(tmp_path / "myplot")) == str(tmp_path / "myplot.png")
    assert os.path.exists(tmp_path / "myplot.png")
    # the file system's refusals (here: no such folder to write into) are one line too
    capsys.readouterr()
    assert cli_main(["plot", str(wd), "--out", str(tmp_path / "no" / "such" / "p.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dsv2: error: ") and "no/such/p.png" in err and err.count("\n") == 1, err


def test_out_of_memory_is_one_line_with_what_would_help(monkeypatch, capsys):
    import jax

    from dsv2_jax import cli

    def oom(_args):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 687294747248 "
                                         "bytes.\nmore lines of backend detail")

    parser = cli.build_parser()
    args = parser.parse_args(["info", "tiny"])
    args.func = oom
    monkeypatch.setattr(cli, "build_parser", lambda: type("P", (), {"parse_args": lambda self, a: args})())
    assert cli.main(["info", "tiny"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dsv2: error: out of memory (RESOURCE_EXHAUSTED: Out of memory allocating")
    assert "dsv2 plan" in err and len(err.strip().splitlines()) == 1


def test_info_prints_the_counts_of_the_config(capsys):
    """`dsv2 info` prints count_params' total and active figures, each in its own unit
    (a count of exactly one unit is 1.00 of it, not 1000 of the unit below)."""
    from dsv2_jax import load_config
    from dsv2_jax.params import count_params, human_count

    assert cli_main(["info", "tiny"]) == 0
    out = capsys.readouterr().out
    total, active = count_params(load_config("tiny"))
    assert total != active
    assert f"total parameters:  {total:,} ({human_count(total)})" in out
    assert f"active per token:  {active:,} ({human_count(active)}, input embedding excluded)" in out
    assert human_count(10**6) == "1.00M" and human_count(1000) == "1.00K" and human_count(10**9) == "1.00B"


def test_a_subcommand_whose_import_breaks_is_not_silently_dropped(tmp_path, monkeypatch):
    """A subcommand module that is absent is left out of `dsv2` (an optional part not
    installed), but one that is there and fails to import a dependency raises, naming the
    dependency, instead of vanishing from the command line."""
    from dsv2_jax import cli

    (tmp_path / "dsv2_broken_cmd.py").write_text("import dsv2_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "_COMMAND_MODULES", ("dsv2_jax.cli_info", "dsv2_not_installed_cmd"))
    assert "info" in cli.build_parser().format_help()
    monkeypatch.setattr(cli, "_COMMAND_MODULES", ("dsv2_jax.cli_info", "dsv2_broken_cmd"))
    with pytest.raises(ModuleNotFoundError) as e:
        cli.build_parser()
    assert e.value.name == "dsv2_no_such_dependency"
