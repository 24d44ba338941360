"""Run by tests/test_ep.py in a subprocess with 4 simulated CPU devices: the expert-parallel
MoE layer against the one-device layer, forward and gradients, at odd token counts."""

import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dsv2_jax import load_config
from dsv2_jax.moe import MoE


def check(mesh_shape, B, T, backend, train):
    cfg = load_config("tiny").replace(moe_backend=backend, num_device_groups=mesh_shape[2],
                                      max_devices_per_token=min(2, mesh_shape[2]))
    moe = MoE(cfg, rngs=nnx.Rngs(params=1))
    graphdef, state = nnx.split(moe)
    x = jax.random.normal(jax.random.key(2), (B, T, cfg.hidden_size), jnp.float32)
    ct = jax.random.normal(jax.random.key(3), (B, T, cfg.hidden_size), jnp.float32)

    def f(state, x):
        y, r = nnx.merge(graphdef, state)(x, train=train)
        return jnp.sum(y * ct) + jnp.sum(r.scores * r.topk_weight.sum()), (y, r)

    g = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
    (l1, (y1, r1)), (gs1, gx1) = g(state, x)
    mesh = Mesh(np.asarray(jax.devices()).reshape(mesh_shape), ("data", "fsdp", "expert", "tensor"))
    with jax.set_mesh(mesh):
        exp = NamedSharding(mesh, P("expert"))
        state_ep = jax.tree.map(lambda a: jax.device_put(a, exp if a.ndim == 3 else NamedSharding(mesh, P())),
                                state)
        (l2, (y2, r2)), (gs2, gx2) = g(state_ep, x)
        assert "all-to-all" in g.lower(state_ep, x).as_text(dialect="hlo")  # the EP path ran
    tol = 2e-5
    np.testing.assert_array_equal(np.asarray(r1.topk_idx), np.asarray(r2.topk_idx))
    np.testing.assert_allclose(np.asarray(y2), np.asarray(y1), atol=tol, rtol=tol)
    np.testing.assert_allclose(float(l2), float(l1), rtol=tol)
    np.testing.assert_allclose(np.asarray(gx2), np.asarray(gx1), atol=tol, rtol=tol)
    chex.assert_trees_all_close(gs2, gs1, atol=tol, rtol=tol)
    assert float(jnp.max(jnp.abs(gx1))) > 0
    print("ok", mesh_shape, B, T, backend, train)


if __name__ == "__main__":
    assert jax.device_count() == 4, jax.devices()
    check((2, 1, 2, 1), 2, 7, "blocked", True)     # 14 tokens: 7 per data row, odd per device
    check((1, 1, 4, 1), 3, 5, "blocked", True)     # 15 tokens over 4 devices: padded
    check((1, 1, 4, 1), 1, 9, "ragged_dot", False)
    check((2, 1, 2, 1), 2, 3, "ragged_dot", True)
    print("all ok")
    sys.exit(0)
