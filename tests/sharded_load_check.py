"""Run by tests/test_sharding.py with 8 simulated CPU devices: `from_pretrained(..., mesh=)`
of an HF directory and of an Orbax checkpoint gives the one-device logits, every parameter
lands on its rules-table sharding, and no read ever covers more than one device's shard.

    python tests/sharded_load_check.py HF_DIR ORBAX_DIR
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv2_jax import from_pretrained
from dsv2_jax.checkpoint import hf as hf_mod
from dsv2_jax.sharding.mesh import make_mesh
from dsv2_jax.sharding.rules import param_shardings
from dsv2_jax.train.step import params_of


def main(hf_dir, orbax_dir):
    assert jax.device_count() == 8
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 96, (8, 11)), jnp.int32)
    one = from_pretrained(hf_dir)
    want = np.asarray(one(ids))
    # Every block read for a device must be at most that device's shard.
    blocks = []
    real_block = hf_mod._hf_block

    def spy(src, e, trailing, dtype):
        out = real_block(src, e, trailing, dtype)
        blocks.append((e.hf_name, out.size, int(np.prod(src.shape(e.hf_name)))))
        return out

    hf_mod._hf_block = spy
    for spec in ("fsdp=8", "fsdp=2,expert=2,tensor=2"):
        mesh = make_mesh(spec)
        for src in (hf_dir, orbax_dir):
            blocks.clear()
            model = from_pretrained(src, mesh=mesh)
            want_sh = param_shardings(model, mesh)
            for a, sh in zip(jax.tree.leaves(params_of(model)), jax.tree.leaves(want_sh)):
                assert a.sharding.is_equivalent_to(sh, a.ndim), (spec, a.sharding, sh)
                for shard in a.addressable_shards:
                    assert shard.data.shape == sh.shard_shape(a.shape)
            with jax.set_mesh(mesh):
                got = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
            err = float(np.abs(got - want).max() / np.abs(want).max())
            assert err <= 1e-5, (spec, src, err)
            if src == hf_dir:
                split = [b for b in blocks if b[1] < b[2]]
                assert split, "no tensor was read in parts"
                print(f"{spec} {'hf' if src == hf_dir else 'orbax'}: rel err {err:.2e}; "
                      f"{len(split)} of {len(blocks)} block reads were partial tensors")
            else:
                print(f"{spec} orbax: rel err {err:.2e}")
    hf_mod._hf_block = real_block
    check_eval(hf_dir)
    print("all ok")


def check_eval(hf_dir):
    """`dsv2 eval --mesh`: loaded sharded, each batch split over the data-carrying axes (here
    fsdp x expert = 4 of the 8 devices; tensor carries none), the one-device figures. The
    batch size must divide over those 4, not over all 8 devices."""
    import tempfile

    import pytest

    from dsv2_jax.train.evaluate import evaluate

    with tempfile.TemporaryDirectory() as d:
        for i in range(8):  # one 32-token document per row: 31 targets each
            np.save(f"{d}/{i}.npy", np.arange(i, i + 32, dtype=np.int32) % 96)
        spec = f"npy:{d}/*.npy,eval={d}/*.npy"
        kw = dict(batch_size=4, seq_len=32, max_batches=2, progress=False)
        want = evaluate(hf_dir, spec, **kw)
        got = evaluate(hf_dir, spec, mesh="fsdp=2,expert=2,tensor=2", **kw)
        with pytest.raises(ValueError, match="--batch-size 2 is not divisible by the 4 data-parallel"):
            evaluate(hf_dir, spec, mesh="fsdp=2,expert=2,tensor=2", **dict(kw, batch_size=2))
    assert want["tokens"] == got["tokens"] == 8 * 31, (want, got)
    assert abs(got["loss"] - want["loss"]) <= 1e-5 * want["loss"], (want, got)
    print(f"eval under fsdp=2,expert=2,tensor=2: loss {got['loss']:.6f} vs {want['loss']:.6f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
