"""Data-parallel `dsv2 train --mesh data=N` on simulated CPU devices equals the one-device
run, including a stop and resume on the mesh; bad meshes are refused clearly. Expert
parallelism is tested in test_ep.py, FSDP and tensor parallelism in test_sharding.py."""

import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from procenv import cpu_env

ARGS = ["--config", "tiny", "--batch-size", "4", "--seq-len", "32", "--steps", "4",
        "--checkpoint-every", "2", "--lr", "3e-3", "--warmup-steps", "1", "--set", "num_hidden_layers=2"]


def _run(workdir, devices, extra=()):
    env = cpu_env(devices)
    cmd = [sys.executable, "-m", "dsv2_jax.cli", "train", "--workdir", str(workdir), *ARGS, *extra]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return r


@functools.lru_cache(maxsize=None)
def one_device_metrics(extra: tuple = ()) -> tuple:
    """The one-device run of ARGS + extra, trained once per session and shared by the mesh
    tests that compare against it (test_mesh.py, test_ep.py), in every worker process: the
    first to ask trains under a lock in the session's shared directory, the others read."""
    shared = os.environ["DSV2_TEST_SHARED_DIR"]  # set by conftest.py
    key = hashlib.sha256(json.dumps(list(extra)).encode()).hexdigest()[:16]
    path = os.path.join(shared, f"one-device-{key}.json")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(path):
            wd = os.path.join(tempfile.mkdtemp(prefix="dsv2-one-device-"), "run")
            r = _run(wd, 1, list(extra))
            assert r.returncode == 0, r.stderr[-2000:]
            with open(path + ".tmp", "w") as f:
                json.dump(_metrics(wd), f)
            os.replace(path + ".tmp", path)
            shutil.rmtree(os.path.dirname(wd), ignore_errors=True)
    with open(path) as f:
        return tuple(json.load(f))


def _metrics(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_data_parallel_matches_one_device_and_resumes(tmp_path):
    # 4 devices: stop after step 2, then rerun to finish on the mesh.
    r = _run(tmp_path / "four", 4, ["--mesh", "data=4", "--stop-after", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run(tmp_path / "four", 4, ["--mesh", "data=4"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout + r.stderr
    a, b = one_device_metrics(), _metrics(tmp_path / "four")
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for key in ("loss", "ce", "expert_loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in b], [m[key] for m in a], rtol=2e-5, err_msg=key)


@pytest.mark.parametrize("mesh,msg", [("data=3", "has 3 devices"), ("model=2", "unknown axis"),
                                      ("data=-1,fsdp=-1", "only one axis may be -1")])
def test_bad_meshes_are_refused_in_one_line(tmp_path, mesh, msg):
    r = _run(tmp_path / "x", 2, ["--mesh", mesh])
    assert r.returncode == 1
    assert msg in r.stderr and "Traceback" not in r.stderr
