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


@pytest.mark.parametrize("cmd", ["train", "eval", "convert"])
def test_help_lists_defaults(cmd, capsys):
    with pytest.raises(SystemExit):
        cli_main([cmd, "--help"])
    out = capsys.readouterr().out
    assert "default" in out
    if cmd == "train":
        for want in ("(default: tiny)", "(default: 300)", "(default: 256)", "(default: stdlib)",
                     "runs/<config name>", "HF safetensors directory", "dsv2 Orbax checkpoint",
                     "training workdir", "(default: cosine)"):
            assert want in " ".join(out.split()), want


def test_eval_refuses_bad_flags_before_loading_a_model(tmp_path, capsys):
    missing = str(tmp_path / "no-such-model")  # loading it would fail with another message
    for flag in ("--batch-size", "--seq-len", "--max-batches"):
        assert cli_main(["eval", "--model", missing, flag, "0"]) == 1
        assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err
    assert cli_main(["eval", "--model", missing, "--data", "jsonl:x.jsonl"]) == 1
    assert "needs tokenizer=" in capsys.readouterr().err


def test_info_uses_units_that_fit(capsys):
    assert cli_main(["info", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "(1.09M)" in out and "0.00B" not in out
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
