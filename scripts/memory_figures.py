"""Per-device memory of real-size training steps, compiled abstractly on simulated CPU devices
(nothing is allocated: `jit(step).lower(abstract state, batch).compile().memory_analysis()`).

    python scripts/memory_figures.py state            # param/optimizer bytes, fsdp=8 vs replicated
    python scripts/memory_figures.py loss             # a step with and without the chunked loss
    python scripts/memory_figures.py step --config v2 --mesh fsdp=8,expert=8 --devices 64 \
        --batch 64 --seq-len 512                      # one compiled train step per device

Each prints JSON lines. `step` runs itself in a subprocess with --devices simulated devices.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _abstract_state(cfg, mesh, master_dtype="float32"):
    import jax

    from dsv2_jax.checkpoint.hf import abstract_model
    from dsv2_jax.sharding.rules import optimizer_shardings, param_shardings
    from dsv2_jax.train.optim import make_optimizer
    from dsv2_jax.train.step import ModelFns, init_state, params_of

    from dsv2_jax.moe.routing import expert_parallel_config

    cfg = cfg.replace(param_dtype=master_dtype)
    if mesh is not None:  # the routing dsv2 train runs on this expert axis
        cfg = expert_parallel_config(cfg, mesh.shape["expert"], log=lambda *_: None)
    m = abstract_model(cfg)
    tx = make_optimizer(lambda s: 1e-3)
    shape = jax.eval_shape(lambda p: init_state(p, tx), params_of(m))
    if mesh is None:
        return cfg, ModelFns.from_model(m), tx, shape, None
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    psh = param_shardings(m, mesh)
    sh = {"params": psh, "opt_state": optimizer_shardings(tx, shape["opt_state"], psh, mesh),
          "step": rep, "nonfinite": rep}
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shape, sh)
    return cfg, ModelFns.from_model(m), tx, state, sh


def compile_step(cfg, mesh_spec: str | None, batch_size: int, seq_len: int, grad_accum: int = 1,
                 master_dtype: str = "float32"):
    """Compiles one train step from abstract shapes; returns the figures."""
    import jax
    import jax.numpy as jnp

    from dsv2_jax.sharding.mesh import batch_sharding, make_mesh
    from dsv2_jax.train.step import make_train_step

    mesh = make_mesh(mesh_spec) if mesh_spec else None
    cfg, fns, tx, state, sh = _abstract_state(cfg, mesh, master_dtype)
    bsh = batch_sharding(mesh) if mesh else None
    batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=bsh)
             for k in ("inputs", "targets", "positions", "segment_ids", "loss_mask")}
    step = make_train_step(fns, cfg, tx, lambda s: 1e-3, grad_accum)
    t0 = time.perf_counter()
    if mesh is None:
        lowered = jax.jit(step, donate_argnums=0).lower(state, batch)
    else:
        with jax.set_mesh(mesh):
            lowered = jax.jit(step, donate_argnums=0, out_shardings=(sh, None)).lower(state, batch)
    compiled = lowered.compile()
    secs = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    out = {
        "mesh": mesh_spec or "one device", "devices": jax.device_count(), "batch": batch_size,
        "seq_len": seq_len, "compile_s": round(secs, 1),
        "argument_gb": mem.argument_size_in_bytes / 1e9, "output_gb": mem.output_size_in_bytes / 1e9,
        "alias_gb": mem.alias_size_in_bytes / 1e9, "temp_gb": mem.temp_size_in_bytes / 1e9,
    }
    # Donated state: outputs alias arguments, so the peak is arguments + temporaries.
    out["peak_gb"] = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                      + mem.temp_size_in_bytes) / 1e9
    return out


def cmd_state(_a):
    import jax

    from dsv2_jax import load_config
    from dsv2_jax.sharding.mesh import make_mesh
    from dsv2_jax.sharding.rules import shard_bytes

    for name in ("v2-lite", "v2"):
        for spec in ("data=8", "fsdp=8"):
            cfg, _, _, state, _ = _abstract_state(load_config(name), make_mesh(spec))
            print(json.dumps({"config": name, "mesh": spec,
                              "param_gb": shard_bytes(state["params"]) / 1e9,
                              "optimizer_gb": shard_bytes(state["opt_state"]) / 1e9}), flush=True)
    del jax


def cmd_loss(a):
    from dsv2_jax import load_config

    for chunk in (0, a.chunk):
        cfg = load_config("v2-lite").replace(num_hidden_layers=2, ce_chunk=chunk, dtype="bfloat16",
                                             remat="full")
        out = compile_step(cfg, None, a.batch, a.seq_len)
        out.update(config=f"v2-lite, 2 layers, vocab {cfg.vocab_size}", ce_chunk=chunk)
        print(json.dumps(out), flush=True)


def cmd_step(a):
    if os.environ.get("_DSV2_CHILD") != "1":
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={a.devices}",
                   JAX_PLATFORMS="cpu", _DSV2_CHILD="1")
        return subprocess.call([sys.executable] + sys.argv, env=env)
    from dsv2_jax import load_config

    cfg = load_config(a.config).with_overrides(a.set)
    out = compile_step(cfg, a.mesh, a.batch, a.seq_len, a.grad_accum, a.master_dtype)
    out.update(config=a.config, set=a.set, dtype=cfg.dtype, remat=cfg.remat, master_dtype=a.master_dtype)
    print(json.dumps(out), flush=True)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("state")
    lo = sub.add_parser("loss")
    lo.add_argument("--batch", type=int, default=1)
    lo.add_argument("--seq-len", type=int, default=4096)
    lo.add_argument("--chunk", type=int, default=512)
    st = sub.add_parser("step")
    st.add_argument("--config", default="v2")
    st.add_argument("--mesh", default="fsdp=8,expert=8")
    st.add_argument("--devices", type=int, default=64)
    st.add_argument("--batch", type=int, default=64)
    st.add_argument("--seq-len", type=int, default=512)
    st.add_argument("--grad-accum", type=int, default=1)
    st.add_argument("--master-dtype", default="float32", choices=["float32", "bfloat16"])
    st.add_argument("--set", nargs="*", default=["dtype=bfloat16", "remat=full"])
    a = ap.parse_args(argv)
    return {"state": cmd_state, "loss": cmd_loss, "step": cmd_step}[a.cmd](a) or 0


if __name__ == "__main__":
    sys.exit(main())
