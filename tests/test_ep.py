"""Expert parallelism: `dsv2 train --mesh data=2,expert=2` and `--mesh expert=4` on simulated
CPU devices equal the one-device run (with a stop and resume on the mesh); the EP MoE layer
equals the one-device layer, forward and gradients, at odd token counts (ep_layer_check.py);
the parameter and optimizer shardings put the routed experts (only) on `expert`."""

import os
import subprocess
import sys

import numpy as np

from test_mesh import _metrics, _run, one_device_metrics
from procenv import cpu_env

HERE = os.path.dirname(os.path.abspath(__file__))


def _same_losses(a, b):
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for key in ("loss", "ce", "expert_loss", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in b], [m[key] for m in a], rtol=2e-5, err_msg=key)


def test_data_and_expert_parallel_matches_one_device_and_resumes(tmp_path):
    # tiny has 4 device groups; on expert=2 the devices are the groups, so say 2 for both runs.
    groups = ["--set", "num_hidden_layers=2", "num_device_groups=2"]
    r = _run(tmp_path / "ep", 4, [*groups, "--mesh", "data=2,expert=2", "--stop-after", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    r = _run(tmp_path / "ep", 4, [*groups, "--mesh", "data=2,expert=2"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout + r.stderr
    _same_losses(one_device_metrics(tuple(groups)), _metrics(tmp_path / "ep"))


def test_expert_parallel_4_matches_one_device(tmp_path):
    r = _run(tmp_path / "ep", 4, ["--mesh", "expert=4"])
    assert r.returncode == 0, r.stderr[-2000:]
    _same_losses(one_device_metrics(), _metrics(tmp_path / "ep"))


def test_ep_moe_layer_matches_one_device():
    env = cpu_env(4)
    r = subprocess.run([sys.executable, os.path.join(HERE, "ep_layer_check.py")], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "all ok" in r.stdout


def test_routed_experts_split_by_expert_everything_else_stored_over_it():
    code = """
import jax
from flax import nnx
from dsv2_jax import load_config
from dsv2_jax.model import DeepseekV2ForCausalLM
from dsv2_jax.sharding.mesh import make_mesh
from dsv2_jax.sharding.rules import optimizer_shardings, param_shardings
from dsv2_jax.train.optim import make_optimizer
from dsv2_jax.train.step import init_state, params_of
cfg = load_config('tiny')
m = nnx.eval_shape(lambda: DeepseekV2ForCausalLM(cfg, rngs=nnx.Rngs(0)))
mesh = make_mesh('data=2,expert=2')
psh = param_shardings(m, mesh)
tx = make_optimizer(lambda s: 1e-3)
osh = optimizer_shardings(tx, jax.eval_shape(lambda p: init_state(p, tx), params_of(m))['opt_state'], psh, mesh)
for tree in (psh, osh):
    for path, sh in jax.tree_util.tree_leaves_with_path(tree):
        name = jax.tree_util.keystr(path)
        spec = tuple(sh.spec)
        if 'experts' in name and 'shared' not in name:  # [L, E, ...]: split by expert along E
            assert spec[:2] == (None, 'expert'), (name, spec)
        elif "count" not in name and "step" not in name:  # stored over expert (ZeRO), gathered for use
            assert 'expert' in spec and (not spec or spec[0] != 'expert' or 'layers' not in name), (name, spec)
print('ok')
"""
    env = cpu_env(4)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=300, cwd=os.path.dirname(HERE))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
