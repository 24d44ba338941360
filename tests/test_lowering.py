"""The model and the training step lower for GPU (CUDA) and TPU, checked here without those
devices through `jax.export` (StableHLO for the named platforms). This proves lowering only,
not speed or numerics on those chips."""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from dsv2_jax import init_model, load_config
from dsv2_jax.train.optim import lr_schedule, make_optimizer
from dsv2_jax.train.step import ModelFns, init_state, make_train_step, params_of


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_train_step_and_forward_lower_for_accelerators(platform):
    cfg = load_config("tiny", moe_backend="ragged_dot", num_hidden_layers=2, dtype="bfloat16",
                      capacity_factor=1.0, remat="dots")
    model = init_model(cfg)
    fns = ModelFns.from_model(model)
    sched = lr_schedule(1e-3, 10, 0, "constant")
    tx = make_optimizer(sched)
    state = init_state(params_of(model), tx)
    batch = {k: jnp.zeros((2, 16), jnp.int32)
             for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
    step = export.export(jax.jit(make_train_step(fns, cfg, tx, sched)), platforms=[platform])(state, batch)
    text = step.mlir_module()
    assert "ragged_dot" in text  # the grouped matmul really is the ragged one on accelerators
    fwd = export.export(jax.jit(lambda p, ids: fns.model(p)(ids)), platforms=[platform])(
        params_of(model), batch["inputs"])
    assert fwd.out_avals[0].shape == (2, 16, cfg.vocab_size)
