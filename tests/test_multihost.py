"""Multi-process runs: two local processes (jax.distributed on 127.0.0.1, CPU collectives,
4 simulated devices each) train with fsdp and expert axes, save, resume on another mesh
shape, and give the losses of one process with 8 devices; only process 0 writes the run
files. `dsv2 eval` over two processes gives one process's figures. Resume checks (process
count, schedule changes) and which restore failures
quarantine a checkpoint."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from procenv import cpu_env

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

ARGS = ["--config", "tiny", "--batch-size", "8", "--seq-len", "32", "--checkpoint-every", "2",
        "--lr", "3e-3", "--warmup-steps", "1", "--log-every", "1", "--data", "stdlib,shard=global",
        "--set", "num_hidden_layers=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_two_processes(workdir, extra):
    port = _free_port()
    procs = []
    for pid in (0, 1):
        cmd = [sys.executable, "-m", "dsv2_jax.cli", "train", "--workdir", str(workdir), *ARGS, *extra,
               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)]
        procs.append(subprocess.Popen(cmd, env=cpu_env(4), cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-3000:]
    return outs


def _metrics(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_two_processes_equal_one_process_and_resume_on_another_mesh(tmp_path):
    one = subprocess.run([sys.executable, "-m", "dsv2_jax.cli", "train", "--workdir", str(tmp_path / "one"),
                          *ARGS, "--steps", "4", "--mesh", "fsdp=2,expert=4"],
                         env=cpu_env(8), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    two = tmp_path / "two"
    outs = _train_two_processes(two, ["--steps", "4", "--stop-after", "2", "--mesh", "fsdp=2,expert=4"])
    # Process 0 speaks; process 1 is silent but for errors.
    assert "compiling the training step" in outs[0][0]
    assert "compiling the training step" not in outs[1][0] and "step 1:" not in outs[1][0]
    # Resume on another mesh shape (fsdp -> data), same processes.
    outs = _train_two_processes(two, ["--steps", "4", "--mesh", "data=2,expert=4"])
    assert "resumed from" in outs[0][0]
    a, b = _metrics(tmp_path / "one"), _metrics(two)
    assert [m["step"] for m in b] == [1, 2, 3, 4]  # one line per step: one writer
    for key in ("loss", "ce", "expert_loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in b], [m[key] for m in a], rtol=2e-5, err_msg=key)
    diff = max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b))
    print(f"two-process vs one-process loss difference: {diff:.2e}")
    run = json.load(open(two / "run.json"))
    assert run["process_count"] == 2
    assert sorted(os.listdir(two)) == ["checkpoints", "config.json", "metrics.jsonl", "run.json",
                                       "tensorboard"]
    # TensorBoard events from process 0 only: one file per run (the first and the resume).
    assert len([f for f in os.listdir(two / "tensorboard") if "tfevents" in f]) == 2
    # Another process count is refused in one line, and nothing changes.
    r = subprocess.run([sys.executable, "-m", "dsv2_jax.cli", "train", "--workdir", str(two), *ARGS,
                        "--steps", "6", "--mesh", "data=2,expert=4"],
                       env=cpu_env(8), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 1 and "trained by 2 process(es), this run has 1" in r.stderr
    assert "Traceback" not in r.stderr
    # `dsv2 eval` over the same two processes gives one process's figures, said once.
    ev = ["eval", "--model", str(two), "--batch-size", "8", "--seq-len", "32", "--max-batches", "2"]
    single = subprocess.run([sys.executable, "-m", "dsv2_jax.cli", *ev], env=cpu_env(1), cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "dsv2_jax.cli", *ev, "--mesh", "data=8",
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(pid)], env=cpu_env(4), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    def figures(out):  # loss, perplexity, bits/byte (summed over 8 shards: equal to rounding)
        (line,) = [s for s in out.splitlines() if s.startswith("loss ")]
        w = line.split()
        return [float(w[1]), float(w[3]), float(w[5])], line.split("(")[1]

    (f1, counts1), (f2, counts2) = figures(single.stdout), figures(outs[0][0])
    np.testing.assert_allclose(f2, f1, rtol=5e-5)
    assert counts2 == counts1  # the same tokens and bytes
    assert "loss " not in outs[1][0]


def test_a_changed_schedule_is_said_recorded_and_followed(tmp_path):
    from dsv2_jax.train.loop import TrainArgs, train

    small = dict(config="tiny", batch_size=4, seq_len=32, log_every=1000, warmup_steps=1,
                 set=["num_hidden_layers=2"], checkpoint_every=2)
    wd = str(tmp_path / "run")
    train(TrainArgs(workdir=wd, steps=2, lr=3e-3, **small))
    logs = []
    train(TrainArgs(workdir=wd, steps=4, lr=1e-3, schedule="constant", **small), log=logs.append)
    line = [s for s in logs if "settings changed" in s]
    assert line == ["settings changed from step 2: --steps 2 -> 4, --lr 0.003 -> 0.001, "
                    "--schedule cosine -> constant"], logs
    run = json.load(open(os.path.join(wd, "run.json")))
    assert run["history"] == [{"step": 2, "changes": {"steps": {"old": 2, "new": 4},
                                                       "lr": {"old": 0.003, "new": 0.001},
                                                       "schedule": {"old": "cosine", "new": "constant"}}}]
    recs = _metrics(wd)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert recs[-1]["lr"] == pytest.approx(1e-3)
    # A third run with the same arguments changes nothing more.
    train(TrainArgs(workdir=wd, steps=5, lr=1e-3, schedule="constant", **small), log=logs.append)
    assert len(json.load(open(os.path.join(wd, "run.json")))["history"]) == 2


def test_a_transient_restore_error_stops_without_quarantine(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    from dsv2_jax.errors import UserError
    from dsv2_jax.train.loop import TrainArgs, train

    small = dict(config="tiny", batch_size=4, seq_len=32, log_every=1000, warmup_steps=1,
                 set=["num_hidden_layers=2"], checkpoint_every=2)
    wd = str(tmp_path / "run")
    train(TrainArgs(workdir=wd, steps=2, **small))
    real = ocp.CheckpointManager.restore
    calls = []

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(5, "Input/output error (simulated storage blip)")
        return real(self, *a, **k)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky)
    with pytest.raises(UserError, match="left in place"):
        train(TrainArgs(workdir=wd, steps=4, **small))
    assert not os.path.exists(os.path.join(wd, "damaged"))
    assert os.path.isdir(os.path.join(wd, "checkpoints", "2"))
    logs = []
    train(TrainArgs(workdir=wd, steps=4, **small), log=logs.append)  # the blip is gone
    assert any(s.endswith("/2") and "resumed from" in s for s in logs)


def test_damage_is_recognised_and_other_failures_are_not():
    from dsv2_jax.checkpoint.integrity import is_damage

    for e in (FileNotFoundError("x"), ValueError("DATA_LOSS: Error decoding local file"),
              ValueError("NOT_FOUND: Error reading Byte range"), ValueError("OUT_OF_RANGE: ..."),
              json.JSONDecodeError("Expecting value", "x", 0),
              ValueError("FAILED_PRECONDITION: Error reading ...: Truncated Zstd-compressed stream")):
        assert is_damage(e), e
    try:  # Orbax's wrapper names no cause; the one it wraps does
        try:
            raise ValueError("NOT_FOUND: Error reading local file")
        except ValueError as inner:
            raise RuntimeError("Encountered error while reading array index") from inner
    except RuntimeError as e:
        assert is_damage(e)
    for e in (OSError(5, "Input/output error"), MemoryError(), TimeoutError(), PermissionError(),
              ValueError("Sharding ... implies that array axis 0 is partitioned 8 times")):
        assert not is_damage(e), e


def test_process_flags_go_together(capsys):
    from dsv2_jax.cli import main

    assert main(["train", "--coordinator", "127.0.0.1:1234", "--steps", "1"]) == 1
    assert "go together" in capsys.readouterr().err


def test_a_slurm_task_alone_on_its_node_drives_all_its_gpus(monkeypatch):
    """JAX's SLURM default is one GPU per task (its local id); the launch recipe runs one
    task per node, which must drive every GPU of the node."""
    from dsv2_jax.sharding import hosts

    seen = {}
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: seen.update(kw))
    base = dict(SLURM_JOB_ID="7", SLURM_NTASKS="16", SLURM_TASKS_PER_NODE="1(x16)",
                SLURM_STEP_NODELIST="node[1-16]")
    for env, want in ((dict(CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"), list(range(8))),
                      (dict(SLURM_GPUS_ON_NODE="4"), [0, 1, 2, 3]),
                      (dict(SLURM_TASKS_PER_NODE="8(x2)", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"), None),
                      ({}, None)):
        for k in ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_NTASKS_PER_NODE"):
            monkeypatch.delenv(k, raising=False)
        for k, v in {**base, **env}.items():
            monkeypatch.setenv(k, v)
        seen.clear()
        assert hosts.initialize() is True
        assert seen == {"local_device_ids": want}, (env, seen)

    monkeypatch.delenv("SLURM_STEP_NODELIST")  # an allocation's shell, not a job step
    with pytest.raises(ValueError, match="not in a job step: run it under srun"):
        hosts.initialize()


def _clear_cluster_env(monkeypatch):
    for k in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS",
              "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_TASKS_PER_NODE",
              "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(k, raising=False)


def test_only_a_multi_process_environment_is_a_cluster(monkeypatch):
    """A single-host TPU VM (one worker hostname) and a one-task SLURM job are single-process
    runs: taking them for clusters would make every such run wait for peers that never come
    (jax.distributed.initialize blocks)."""
    from dsv2_jax.sharding import hosts

    _clear_cluster_env(monkeypatch)
    assert hosts.detected_cluster() is None
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2")  # a v4-8 / v5e-8 VM: one host
    assert hosts.detected_cluster() is None
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.2,10.0.0.3")
    assert hosts.detected_cluster() == "tpu"
    _clear_cluster_env(monkeypatch)
    monkeypatch.setenv("MEGASCALE_COORDINATOR_ADDRESS", "10.0.0.2:8080")  # multislice
    assert hosts.detected_cluster() == "tpu"
    _clear_cluster_env(monkeypatch)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    for tasks, want in (("1", None), ("2", "slurm"), ("x", None)):
        monkeypatch.setenv("SLURM_NTASKS", tasks)
        assert hosts.detected_cluster() == want, tasks
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")  # this step runs one task of the allocation
    assert hosts.detected_cluster() is None


def test_explicit_process_flags_are_checked_before_joining(monkeypatch):
    """--process-id must be in [0, --num-processes), the coordinator HOST:PORT; one process is
    no distributed run at all. Each refusal comes before jax.distributed would wait for peers."""
    from dsv2_jax.sharding import hosts

    _clear_cluster_env(monkeypatch)
    joined = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: joined.append(kw))
    for coord, n, pid, msg in (("127.0.0.1:1234", 2, 2, r"--process-id 2 is not in \[0"),
                               ("127.0.0.1:1234", 2, -1, "is not in"),
                               ("127.0.0.1:1234", 0, 0, "is not in"),
                               ("127.0.0.1", 2, 0, "expected HOST:PORT"),
                               ("127.0.0.1:http", 2, 0, "expected HOST:PORT"),
                               (":1234", 2, 0, "expected HOST:PORT")):
        with pytest.raises(ValueError, match=msg):
            hosts.initialize(coord, n, pid)
    assert joined == []
    assert hosts.initialize("127.0.0.1:1234", 1, 0) is False and joined == []
    assert hosts.initialize("127.0.0.1:1234", 2, 1) is True
    assert joined == [dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1)]
    assert hosts.initialize() is False and len(joined) == 1  # no flags, no cluster
