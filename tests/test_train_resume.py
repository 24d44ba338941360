"""`dsv2 train` on a workdir it has seen before, at its edges: a first run that failed before
any checkpoint, a damaged checkpoint at the last step, settings changed on resume, and what
else a resume reads (run.json, metrics.jsonl)."""

import json
import os
import shutil
import time

import numpy as np
import pytest

from dsv2_jax.cli import main as cli_main
from dsv2_jax.train.loop import TrainArgs, TrainingError, train

SMALL = dict(config="tiny", batch_size=4, seq_len=32, log_every=1000, lr=3e-3, warmup_steps=1,
             set=["num_hidden_layers=2"])


def _records(wd):
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _steps(wd):
    return sorted(int(s) for s in os.listdir(os.path.join(wd, "checkpoints")) if s.isdigit())


def test_a_first_run_that_failed_before_its_first_checkpoint_does_not_lock_the_workdir(tmp_path):
    """Its run.json and config.json were written, but nothing was trained: a rerun with other
    data and another config starts afresh instead of being refused as a changed run."""
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((3, 4), np.int32))  # 2-D: refused when the first batch is read
    wd = str(tmp_path / "run")
    with pytest.raises(Exception, match="bad.npy"):
        train(TrainArgs(workdir=wd, steps=2, checkpoint_every=1, data=f"npy:{bad}", **SMALL))
    logs = []
    other = dict(SMALL, seq_len=16, set=SMALL["set"] + ["hidden_size=64"])
    train(TrainArgs(workdir=wd, steps=2, checkpoint_every=1, **other), log=logs.append)
    assert _steps(wd) == [1, 2]
    assert json.load(open(os.path.join(wd, "run.json")))["data"] == "stdlib"
    assert json.load(open(os.path.join(wd, "config.json")))["hidden_size"] == 64
    assert [r["step"] for r in _records(wd)] == [1, 2]


def _largest_file(d):
    files = [os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs]
    return max(files, key=os.path.getsize)


DAMAGE = {
    "the whole per-process data directory": lambda s: shutil.rmtree(os.path.join(s, "ocdbt.process_0")),
    "the largest data file": lambda s: os.remove(_largest_file(s)),
    "the largest data file cut short": lambda s: os.truncate(_largest_file(s), 1000),
    "the top-level b-tree": lambda s: shutil.rmtree(os.path.join(s, "d")),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_at_the_last_step_is_not_nothing_to_do(tmp_path, damage):
    """The run looks finished, but its last checkpoint's data is damaged: the rerun restores
    the step before it and trains the missing steps, and loading for use takes the newest
    good step."""
    from dsv2_jax.checkpoint.integrity import probe

    wd = str(tmp_path / "run")
    train(TrainArgs(workdir=wd, steps=4, checkpoint_every=2, **SMALL))
    want = _records(wd)
    state = os.path.join(wd, "checkpoints", "4", "state")
    assert probe(state) is None
    DAMAGE[damage](state)
    assert probe(state) is not None
    with pytest.warns(UserWarning, match="using checkpoint step 2"):
        from dsv2_jax import from_pretrained

        from_pretrained(wd)
    logs = []
    train(TrainArgs(workdir=wd, steps=4, checkpoint_every=2, **SMALL), log=logs.append)
    assert not any("nothing to do" in line for line in logs), logs
    assert any("cannot be opened" in line for line in logs), logs
    assert os.path.isdir(os.path.join(wd, "damaged", "4")) and _steps(wd) == [2, 4]
    keys = ("step", "loss", "ce", "grad_norm", "lr")
    assert [[r[k] for k in keys] for r in _records(wd)] == [[r[k] for k in keys] for r in want]
    logs = []
    train(TrainArgs(workdir=wd, steps=4, checkpoint_every=2, **SMALL), log=logs.append)
    assert any("nothing to do" in line for line in logs), logs


def test_a_workdir_given_with_dot_segments_loads_and_convert_warns_of_damage(tmp_path, monkeypatch):
    """`./run`, `run/` and `x/../run` name the same workdir: loading it for use restores its
    newest step (tensorstore refuses "." and ".." in a path, and that refusal had been taken
    for damage: every step skipped, nothing restored). `dsv2 convert` of a workdir whose newest
    step is damaged says which step it exported and why the newer one was skipped (its
    library-warning filter had swallowed the line)."""
    import warnings

    import jax

    from dsv2_jax import from_pretrained
    from dsv2_jax.checkpoint import DamagedCheckpointWarning
    from dsv2_jax.checkpoint.integrity import probe
    from dsv2_jax.train.step import params_of

    wd = str(tmp_path / "run")
    train(TrainArgs(workdir=wd, steps=2, checkpoint_every=1, **SMALL))
    os.makedirs(tmp_path / "x")
    monkeypatch.chdir(tmp_path)
    assert probe("./run/checkpoints/2/state") is None
    want = jax.tree.leaves(params_of(from_pretrained(wd)))
    for path in ("./run", "run/", "x/../run", str(tmp_path / "x" / ".." / "run")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no step reported damaged
            got = jax.tree.leaves(params_of(from_pretrained(path)))
        assert all(np.array_equal(a, b) for a, b in zip(got, want)), path
    shutil.rmtree(os.path.join(wd, "checkpoints", "2", "state", "d"))
    with pytest.warns(DamagedCheckpointWarning, match=r"using checkpoint step 1; newer ones are damaged \(step 2: "):
        from_pretrained("./run")
    # `dsv2 convert` hides library warnings but not this one (under pytest a shown warning is
    # recorded rather than printed; the command had filtered it out before it was shown).
    with pytest.warns(DamagedCheckpointWarning, match=r"using checkpoint step 1; newer ones are damaged \(step 2: "):
        assert cli_main(["convert", "./run", "hf_out", "--to", "hf", "--no-progress"]) == 0


def test_paths_the_checkpoint_library_cannot_use_are_refused_and_dot_paths_stay_in_place(tmp_path, monkeypatch):
    """A backslash in a path is refused before anything is written (tensorstore reads it as
    '/': the arrays went elsewhere and every good step was later judged damaged); a workdir
    `new/..` is the current directory, so a run failing before its first checkpoint does not
    remove it as a folder it made; `--init-from ..` defaults its workdir to runs/<that
    folder's name>, not runs/.. (the current directory)."""
    from dsv2_jax import from_pretrained
    from dsv2_jax.checkpoint import CheckpointError
    from dsv2_jax.checkpoint.convert import convert
    from dsv2_jax.train.run_settings import default_workdir

    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrainingError, match=r"--workdir a\\b: a backslash"):
        train(TrainArgs(workdir="a\\b", steps=1, **SMALL))
    with pytest.raises(TrainingError, match=r"--init-from x\\y: a backslash"):
        train(TrainArgs(workdir="w", steps=1, init_from="x\\y", **dict(SMALL, config=None)))
    assert sorted(os.listdir(tmp_path)) == []
    for call in (lambda: from_pretrained("m\\x"), lambda: convert(str(tmp_path), "o\\x", "hf")):
        with pytest.raises(CheckpointError, match="a backslash"):
            call()
    assert sorted(os.listdir(tmp_path)) == []
    os.symlink(tmp_path / "elsewhere", "dangling")
    with pytest.raises(TrainingError, match=r"--workdir dangling: a symbolic link to .*elsewhere, which does not exist"):
        train(TrainArgs(workdir="dangling", steps=1, **SMALL))
    os.remove("dangling")
    (tmp_path / "keep.txt").write_text("x")
    os.mkdir(tmp_path / "run.json")  # writing the run's record fails: before any checkpoint
    with pytest.raises(OSError):
        train(TrainArgs(workdir="new/..", steps=1, **SMALL))
    assert (tmp_path / "keep.txt").exists()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    name = os.path.basename(str(tmp_path))
    assert default_workdir("tiny", "..") == os.path.join("runs", name)
    assert default_workdir("tiny", ".") == os.path.join("runs", "sub")
    assert default_workdir("tiny", "../sub/") == os.path.join("runs", "sub")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~ expands in the path arguments
    for call in (lambda: from_pretrained("~/m"), lambda: convert("~/m", "~/o", "hf")):
        with pytest.raises((FileNotFoundError, CheckpointError), match=str(tmp_path / "home" / "m")):
            call()


def test_a_resume_from_another_directory_does_not_read_other_files_for_a_relative_spec(tmp_path, monkeypatch):
    """`--data npy:data/*.npy` names files relative to where the run started: a resume from
    another directory holding its own data/ would train on those with no word. run.json
    records where the run started, and such a resume is refused naming it; from there it
    resumes, and an absolute spec resumes from anywhere."""
    for d, fill in (("a", None), ("b", 7)):
        (tmp_path / d / "data").mkdir(parents=True)
        for i in range(3):
            np.save(tmp_path / d / "data" / f"n{i}.npy", np.arange(300) % 100 if fill is None else np.full(300, fill))
    args = dict(SMALL, set=SMALL["set"] + ["vocab_size=128"], checkpoint_every=1)
    monkeypatch.chdir(tmp_path / "a")
    train(TrainArgs(workdir="run", steps=1, data="npy:data/*.npy", **args))
    assert json.load(open("run/run.json"))["data_cwd"] == str(tmp_path / "a")
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(TrainingError, match=r"relative to .*/a \(where the run started\).*resume from"):
        train(TrainArgs(workdir="../a/run", steps=2, data="npy:data/*.npy", **args))
    assert _steps(str(tmp_path / "a" / "run")) == [1]
    monkeypatch.chdir(tmp_path / "a")
    train(TrainArgs(workdir="run", steps=2, data="npy:data/*.npy", **args))
    assert _steps("run") == [1, 2]
    spec = f"npy:{tmp_path}/a/data/*.npy"
    train(TrainArgs(workdir="abs", steps=1, data=spec, **args))
    monkeypatch.chdir(tmp_path / "b")
    train(TrainArgs(workdir="../a/abs", steps=2, data=spec, **args))
    assert _steps(str(tmp_path / "a" / "abs")) == [1, 2]


def test_loading_a_workdir_for_use_stops_at_a_failure_that_is_not_damage(tmp_path):
    """Loading a training workdir for use skips damaged steps only: a step that fails for
    another reason (here a config override its parameters do not fit) stops the load with
    that reason, instead of being skipped like damage until no step is left; --init-from it
    under such an override is refused, and under --master-dtype its parameters are read in
    that dtype. What is skipped as damaged is warned of, by the converter's reader too (an
    unfinished save is no step, a committed one without its metadata is damaged), and when
    every step is damaged each one's damage is named."""
    from dsv2_jax import from_pretrained
    from dsv2_jax.checkpoint import CheckpointError

    wd = str(tmp_path / "run")
    train(TrainArgs(workdir=wd, steps=2, checkpoint_every=1, **SMALL))
    with pytest.raises(CheckpointError, match="has shape") as e:
        from_pretrained(wd, hidden_size=64)
    assert "no checkpoint restores" not in str(e.value) and "checkpoints/2/state" in str(e.value)
    # --init-from it with an architecture field overridden: refused before anything is written.
    other = str(tmp_path / "other")
    with pytest.raises(TrainingError, match="do not fit the config after --set"):
        train(TrainArgs(workdir=other, steps=1, init_from=wd,
                        **dict(SMALL, set=SMALL["set"] + ["hidden_size=64"])))
    assert not os.path.exists(other)
    # ... and with --master-dtype: its parameters are read in that dtype, not refused.
    import jax

    from dsv2_jax.checkpoint.hf import abstract_model
    from dsv2_jax.sharding.mesh import make_mesh, replicated
    from dsv2_jax.train.loop import _initial_state
    from dsv2_jax.train.run_settings import resolve_config
    from dsv2_jax.train.optim import make_optimizer
    from dsv2_jax.train.step import params_of

    args = TrainArgs(workdir=other, init_from=wd, master_dtype="bfloat16", set=SMALL["set"])
    cfg, mesh, tx = resolve_config(args, False), make_mesh(None), make_optimizer(lambda s: 1e-3)
    state = _initial_state(cfg, args, tx, params_of(abstract_model(cfg)), mesh, replicated(mesh))
    assert {str(a.dtype) for a in jax.tree.leaves(state["params"])} >= {"bfloat16"}
    assert not [f for f in os.listdir(wd) if ".tmp" in f]  # run.json: replaced whole, no temp file left
    # The converter's reader of a workdir (`params_location`) also warns of what it skips.
    from dsv2_jax.checkpoint.orbax_io import TRAIN_PARAMS_PREFIX, params_location

    shutil.rmtree(os.path.join(wd, "checkpoints", "2", "state", "d"))
    os.makedirs(os.path.join(wd, "checkpoints", "3.orbax-checkpoint-tmp-1700000000", "state"))
    os.makedirs(os.path.join(wd, "checkpoints", "4", "state"))  # committed, its metadata lost
    with pytest.warns(UserWarning, match=r"using checkpoint step 1; newer ones are damaged "
                                         r"\(step 4: .+_METADATA: missing; step 2: ") as w:
        where = params_location(wd)
    assert "step 3" not in str(w[0].message)
    shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
    assert where == (os.path.join(wd, "checkpoints", "1", "state"), TRAIN_PARAMS_PREFIX)
    shutil.rmtree(os.path.join(wd, "checkpoints", "1", "state", "d"))
    for load in (from_pretrained, params_location):  # nothing left: each step's damage named
        with pytest.raises(CheckpointError, match=r"no checkpoint restores \(step 2: .+; step 1: "):
            load(wd)


def test_keep_checkpoints_keeps_the_newest_ones(tmp_path):
    """--keep-checkpoints N leaves the N newest checkpoints; a disk is not filled with one
    checkpoint per --checkpoint-every over a long run."""
    wd = str(tmp_path / "run")
    train(TrainArgs(workdir=wd, steps=6, checkpoint_every=1, keep_checkpoints=2, **SMALL))
    assert _steps(wd) == [5, 6]


def test_extending_a_run_keeps_its_default_warmup(tmp_path):
    """The default warm-up is a tenth of --steps: extending 20 -> 400 steps must not restart
    a 40-step warm-up at step 21 (the learning rate would fall to about half)."""
    wd = str(tmp_path / "run")
    args = dict(SMALL, warmup_steps=None)
    train(TrainArgs(workdir=wd, steps=20, checkpoint_every=20, **args))
    logs = []
    train(TrainArgs(workdir=wd, steps=400, stop_after=21, checkpoint_every=1, **args), log=logs.append)
    line = [s for s in logs if "settings changed" in s]
    assert line == ["settings changed from step 20: --steps 20 -> 400"], logs
    logs = []  # and again: the history must not bring the new default back
    train(TrainArgs(workdir=wd, steps=400, stop_after=22, checkpoint_every=1, **args), log=logs.append)
    assert not any("settings changed" in s for s in logs), logs
    lr = {r["step"]: r["lr"] for r in _records(wd)}
    assert lr[21] > 0.95 * SMALL["lr"] and lr[22] > 0.95 * SMALL["lr"], lr


def test_a_resume_takes_each_left_out_setting_from_the_run_as_its_history_left_it(tmp_path):
    """Every data, schedule, optimizer and mesh setting the command leaves out comes from the
    run: the first run's value, updated by each recorded change in order (the latest last);
    the ones the command gives stay its own. (A workdir with a checkpoint step and a run.json;
    nothing is trained.)"""
    from dsv2_jax.train.run_settings import KEPT_ON_RESUME, keep_run_settings

    wd = tmp_path / "run"
    os.makedirs(wd / "checkpoints" / "30")
    first = dict(vars(TrainArgs(workdir=str(wd))))
    del first["given"]  # as run.json records it
    first.update(data="npy:tokens.npy", seq_len=48, batch_size=6, seed=7, steps=100, lr=1e-3,
                 warmup_steps=None, schedule="step", clip=0.25, weight_decay=0.03, mesh="fsdp=1",
                 grad_accum=3, process_count=1,
                 history=[{"step": 10, "changes": {"lr": {"old": 1e-3, "new": 2e-3},
                                                   "steps": {"old": 100, "new": 200}}},
                          {"step": 20, "changes": {"lr": {"old": 2e-3, "new": 5e-4},
                                                   "clip": {"old": 0.25, "new": 0.5}}}])
    (wd / "run.json").write_text(json.dumps(first))
    logs = []
    args = keep_run_settings(TrainArgs(workdir=str(wd), steps=300, weight_decay=0.2,
                                        given=frozenset({"workdir", "steps", "weight_decay"})), logs.append)
    want = dict(data="npy:tokens.npy", seq_len=48, batch_size=6, seed=7, steps=300, lr=5e-4,
                warmup_steps=10, schedule="step", clip=0.5, weight_decay=0.2, mesh="fsdp=1", grad_accum=3)
    assert set(want) == set(KEPT_ON_RESUME)
    assert {k: getattr(args, k) for k in want} == want
    assert len(logs) == 1 and logs[0].startswith("resuming with the run's ") and "--grad-accum 3" in logs[0]


def test_runtime_fields_may_change_on_resume_others_name_their_flag(tmp_path, capsys):
    wd = str(tmp_path / "run")
    train(TrainArgs(workdir=wd, steps=1, checkpoint_every=1, **SMALL))
    logs = []
    train(TrainArgs(workdir=wd, steps=2, checkpoint_every=1,
                    **dict(SMALL, set=SMALL["set"] + ["remat=full", "ce_chunk=8"])), log=logs.append)
    assert any(s.startswith("config changed on resume:") and "remat 'none' -> 'full'" in s for s in logs), logs
    with pytest.raises(TrainingError, match="param_dtype.*--master-dtype float32"):
        train(TrainArgs(workdir=wd, steps=3, checkpoint_every=1, master_dtype="bfloat16", **SMALL))
    with pytest.raises(TrainingError, match="hidden_size: 128 there, 64 now.*--set hidden_size=128"):
        train(TrainArgs(workdir=wd, steps=3, checkpoint_every=1,
                        **dict(SMALL, set=SMALL["set"] + ["hidden_size=64"])))
    assert _steps(wd) == [1, 2]


def _workdir_of(tmp_path, cfg, name="run"):
    """A workdir as a run leaves it, as far as the config goes: config.json and a step."""
    wd = tmp_path / name
    os.makedirs(wd / "checkpoints" / "1")
    cfg.save(str(wd / "config.json"))
    return str(wd)


def test_a_resume_naming_a_model_setting_checks_it_against_the_workdir(tmp_path):
    """`dsv2 train --workdir W` naming no model resumes W's own config; one that names a model
    setting (--config, --set, --master-dtype) is checked against W's config and refused when
    it would change the parameters, instead of being dropped for the workdir's config."""
    from dsv2_jax import load_config
    from dsv2_jax.train.run_settings import resolve_config

    saved = load_config("tiny", num_hidden_layers=2)
    wd = _workdir_of(tmp_path, saved)
    plain = frozenset({"workdir", "steps"})
    assert resolve_config(TrainArgs(workdir=wd, config="v2-lite", given=plain), True) == saved
    for extra, kw, msg in (({"master_dtype"}, dict(master_dtype="bfloat16"), "param_dtype"),
                           ({"config"}, dict(config="tiny"), "num_hidden_layers: 2 there, 4 now"),
                           ({"set"}, dict(set=["hidden_size=64"]), "hidden_size: 128 there, 64 now")):
        with pytest.raises(TrainingError, match=f"holds a run of a different config.*{msg}"):
            resolve_config(TrainArgs(workdir=wd, given=plain | extra, **kw), True)


def test_every_runtime_field_may_change_on_resume(tmp_path):
    """Each config field that shapes neither the parameters nor the optimizer state may
    change on resume: said, not refused."""
    from dsv2_jax import load_config
    from dsv2_jax.train.run_settings import RESUMABLE_FIELDS, resolve_config

    wd = _workdir_of(tmp_path, load_config("tiny"))
    new = dict(remat="full", ce_chunk=8, scan_unroll=2, attn_impl="reference",
               moe_backend="blocked", moe_dispatch="fixed")
    assert set(new) == set(RESUMABLE_FIELDS)
    logs = []
    cfg = resolve_config(TrainArgs(workdir=wd, set=[f"{k}={json.dumps(v)}" for k, v in new.items()]),
                          True, log=logs.append)
    assert {k: getattr(cfg, k) for k in new} == new
    assert len(logs) == 1 and all(f"{k} " in logs[0] for k in new), logs


def test_master_weights_are_float32_unless_asked_and_init_from_computes_in_float32(tmp_path):
    """Parameters and optimizer state train in float32 whatever the preset stores (v2-lite's
    bfloat16 describes the released weights) unless --set param_dtype or --master-dtype says
    otherwise. --init-from a converted checkpoint trains in float32 compute (its dtype is the
    one it is served in); --init-from another training workdir keeps that run's choice."""
    from dsv2_jax import load_config
    from dsv2_jax.train.run_settings import resolve_config

    def resolve(**kw):
        return resolve_config(TrainArgs(workdir=str(tmp_path / "new"), **kw), False)

    lite = resolve(config="v2-lite")
    assert (lite.param_dtype, lite.dtype) == ("float32", "bfloat16")
    assert resolve(config="tiny", set=["param_dtype=bfloat16"]).param_dtype == "bfloat16"
    assert resolve(config="tiny", master_dtype="bfloat16").param_dtype == "bfloat16"
    bf16 = load_config("tiny", dtype="bfloat16", param_dtype="bfloat16")
    converted = tmp_path / "converted"
    converted.mkdir()
    bf16.save(str(converted / "config.json"))
    got = resolve(init_from=str(converted))
    assert (got.dtype, got.param_dtype) == ("float32", "float32")
    run = _workdir_of(tmp_path, bf16, "trained")
    assert resolve(init_from=run).dtype == "bfloat16"
    assert resolve(init_from=str(converted), set=["dtype=bfloat16"]).dtype == "bfloat16"


def test_a_damaged_config_json_of_a_resume_is_refused_in_one_line(tmp_path):
    """A resume reads the workdir's config.json whether the command names a model or not;
    when it does not parse or holds a bad value, the run is refused naming why (a
    TrainingError, one line at the command line), not with a traceback."""
    from dsv2_jax import load_config
    from dsv2_jax.train.run_settings import resolve_config

    wd = _workdir_of(tmp_path, load_config("tiny"))
    config = os.path.join(wd, "config.json")
    for text, msg in (("{", "config.json: not valid JSON"), ('{"hidden_size": "x"}', "hidden_size")):
        with open(config, "w") as f:
            f.write(text)
        for given in (frozenset({"workdir", "steps"}), None):  # the command line, the Python API
            with pytest.raises(TrainingError, match=msg):
                resolve_config(TrainArgs(workdir=wd, given=given), True)


def test_what_a_resume_reads_may_be_damaged_without_a_traceback(tmp_path, capsys):
    """A metrics.jsonl line that is JSON but not a step record is skipped (resume and plot);
    an unreadable run.json is named in a one-line refusal."""
    wd = str(tmp_path / "run")
    train(TrainArgs(workdir=wd, steps=2, checkpoint_every=1, **SMALL))
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
        f.write("[1, 2]\n{\"no_step\": 1}\n")
    train(TrainArgs(workdir=wd, steps=3, checkpoint_every=1, **SMALL))
    assert [r["step"] for r in _records(wd)] == [1, 2, 3]
    with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
        f.write("[1, 2]\n")
    assert cli_main(["plot", wd]) == 0
    with open(os.path.join(wd, "run.json"), "w") as f:
        f.write("")
    base = ["train", "--config", "tiny", "--workdir", wd, "--batch-size", "4", "--seq-len", "32",
            "--set", "num_hidden_layers=2"]
    capsys.readouterr()
    assert cli_main([*base, "--steps", "4"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run.json: unreadable" in err[0], err


def test_tensorboard_hides_the_steps_a_resume_recomputes(tmp_path):
    """Steps 3-4 ran, were not saved, and ran again after the resume: TensorBoard shows each
    step once, as metrics.jsonl does. (TensorBoard drops the events of steps >= s written
    before a `SessionLog.START` at step s, the purge marker; the files are read here by the
    same rule.)"""
    pytest.importorskip("tensorboardX")
    from tensorboardX.proto import event_pb2

    from tb_events import read_events

    wd = str(tmp_path / "run")
    train(TrainArgs(workdir=wd, steps=4, checkpoint_every=2, **SMALL))
    shutil.rmtree(os.path.join(wd, "checkpoints", "4"))  # as if killed before saving step 4
    time.sleep(1.1)  # event files are named by the second they were opened
    train(TrainArgs(workdir=wd, steps=4, checkpoint_every=2, **SMALL))
    shown = []
    tb = os.path.join(wd, "tensorboard")
    files = sorted(os.listdir(tb))
    assert len(files) == 2, files
    for name in files:
        for ev in read_events(os.path.join(tb, name)):
            if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
                shown = [s for s in shown if s < ev.step]
            shown += [ev.step for v in ev.summary.value if v.tag == "train/loss"]
    assert shown == [1, 2, 3, 4], shown


def test_a_profile_range_past_the_last_step_is_closed_and_said(tmp_path):
    wd = str(tmp_path / "run")
    logs = []
    train(TrainArgs(workdir=wd, steps=3, checkpoint_every=3, profile_steps="2:5", **SMALL), log=logs.append)
    assert "profiler trace of steps 2..3 in" in " ".join(logs), logs
    logs = []
    train(TrainArgs(workdir=wd, steps=4, checkpoint_every=4, profile_steps="1:2", **SMALL), log=logs.append)
    assert any("outside the steps this run trains (4..4); no trace" in s for s in logs), logs


def _unraisable(obj, exc):
    import types

    return types.SimpleNamespace(exc_type=type(exc), exc_value=exc, exc_traceback=None,
                                 err_msg=None, object=obj)


def test_a_failed_restores_abandoned_reads_print_nothing_when_collected(monkeypatch):
    """Orbax leaves a failed restore's reads suspended on a closed loop; when the collector
    closes them, its read turns the GeneratorExit into an exception of its own, which Python
    would print (with the array's whole TensorStore spec) in the middle of training. Those
    echoes, and the object-less 'Event loop is closed' of the reads still in flight, are
    dropped; any other unraisable exception (the same message about an object included) still
    reaches the previous hook, through one quieting hook however often it is installed."""
    import sys

    from orbax.checkpoint._src.serialization import serialization

    from dsv2_jax.train import checkpointing

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpointing._quiet_orphaned_reads()
    quiet = sys.unraisablehook
    checkpointing._quiet_orphaned_reads()  # once per process: not stacked
    assert sys.unraisablehook is quiet

    read = serialization._read_array_index_and_device_put([], (), None, global_shape=(),
                                                          new_shard_shape=(), dtype=None,
                                                          byte_limiter=None, strict=True,
                                                          dll=None, memory_kind=None)
    try:
        try:
            raise GeneratorExit
        except BaseException as e:  # what Orbax's read does with it
            raise Exception("Encountered error while reading array index") from e
    except Exception as e:
        echo = e
    closed_loop = RuntimeError("Event loop is closed")

    async def ours():
        pass

    mine = ours()
    other = [_unraisable(read, ValueError("not from a close")),
             _unraisable(mine, closed_loop),  # that message, but about an object of its own
             _unraisable(mine, echo),  # not Orbax's coroutine
             _unraisable(None, RuntimeError("something else"))]
    for u in [_unraisable(read, echo), _unraisable(None, closed_loop)] + other:
        sys.unraisablehook(u)
    read.close(), mine.close()
    assert seen == other
