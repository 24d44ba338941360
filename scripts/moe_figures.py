"""Figures of the MoE dispatch on a mesh.

    python scripts/moe_figures.py rows      # rows per token each way for M = 1, 2, 3, unlimited (V2 shape)
    python scripts/moe_figures.py buffers   # dispatch buffer bytes per device at V2's shape
    python scripts/moe_figures.py step --mesh data=8 --devices 8   # per-device FLOPs + step time

`step` runs itself in a subprocess with --devices simulated CPU devices; it uses only APIs
that existed before the per-shard MoE (train.step, sharding.rules), so it can be pointed at
an older checkout with PYTHONPATH for a before/after comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cmd_rows(a):
    import jax
    import jax.numpy as jnp

    sys.path.insert(0, ROOT)
    from dsv2_jax import load_config
    from dsv2_jax.moe.routing import group_rows, select_experts

    v2 = load_config("v2")
    E, K, D, ep = v2.n_routed_experts, v2.num_experts_per_tok, v2.hidden_size, 8
    T = a.tokens
    # Router logits of a realistic spread: a random router on random unit-variance inputs.
    x = jax.random.normal(jax.random.key(0), (T, D))
    w = jax.random.normal(jax.random.key(1), (D, E)) * a.router_scale / D ** 0.5
    scores = jax.nn.softmax(x @ w, axis=-1)
    for M in (1, 2, 3, ep):
        cfg = v2.replace(num_device_groups=ep, max_devices_per_token=M,
                         topk_method="greedy" if M == ep else v2.topk_method)
        idx, weight = select_experts(scores, cfg, train=True)
        send, _ = group_rows(idx, weight, scores, jnp.ones(T, bool), E, ep)
        rows = send.sum(axis=1)
        k = min(K, E // ep)
        row_bytes = D * 2 + k * 8  # bf16 activations + k (local id, weight) pairs
        print(json.dumps({
            "M": M if M < ep else "unlimited", "rows_per_token_mean": float(rows.mean()),
            "rows_per_token_max": int(rows.max()), "per_expert_rows_per_token": K,
            "bytes_per_token_each_way": float(rows.mean()) * row_bytes,
            "per_expert_bytes_per_token_each_way": K * (D * 2 + 4),
        }), flush=True)


def cmd_buffers(a):
    sys.path.insert(0, ROOT)
    from dsv2_jax import load_config
    from dsv2_jax.moe import traffic_figures

    v2 = load_config("v2")
    for devices, ep, M in ((8, 8, 3), (64, 8, 3), (64, 32, 6)):
        cfg = v2.replace(num_device_groups=ep, max_devices_per_token=M, capacity_factor=1.0)
        for dropping in (False, True):
            f = traffic_figures(cfg, a.tokens, ep, 2, dropping, batch=max(1, a.tokens // 4096))
            print(json.dumps({"devices": devices, "expert_axis": ep, "M": M, "capacity": dropping,
                              "tokens_per_device": a.tokens,
                              "buffer_mb_per_device_each_way": round(f["buffer_bytes"] / 1e6, 1),
                              "before_mb_per_device_each_way": round(f["per_expert_scheme_buffer_bytes"] / 1e6, 1),
                              "rows_per_destination": f["rows_per_destination"]}), flush=True)


_STEP = r"""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from dsv2_jax import load_config
from dsv2_jax.model import DeepseekV2ForCausalLM
from dsv2_jax.sharding.mesh import batch_sharding, make_mesh
from dsv2_jax.sharding.rules import param_shardings
from dsv2_jax.train.step import ModelFns, loss_and_stats, params_of
spec, B, T, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
mesh = make_mesh(spec)
ep = dict(mesh.shape)["expert"]
cfg = load_config("tiny").replace(num_hidden_layers=3, hidden_size=256, moe_intermediate_size=128,
    n_routed_experts=16, num_experts_per_tok=4, topk_method="greedy", n_group=1, topk_group=1,
    num_device_groups=ep if ep > 1 else 0, max_devices_per_token=min(2, ep) if ep > 1 else 0)
model = DeepseekV2ForCausalLM(cfg, rngs=nnx.Rngs(params=0))
fns, params = ModelFns.from_model(model), params_of(model)
rng = np.random.default_rng(0)
ids = rng.integers(0, 256, (B, T + 1))
data = {"inputs": ids[:, :-1].astype(np.int32), "targets": ids[:, 1:].astype(np.int32),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(),
        "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.int32)}
vg = jax.jit(lambda p, b: jax.value_and_grad(lambda p: loss_and_stats(fns, cfg, p, b)[0])(p))
def flops(c):
    cost = c.cost_analysis(); cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])
one = flops(vg.lower(params, data).compile())
p = jax.device_put(params, param_shardings(model, mesh))
b = jax.device_put(data, batch_sharding(mesh))
with jax.set_mesh(mesh):
    c = vg.lower(p, b).compile()
    jax.block_until_ready(c(p, b))
    t = time.perf_counter()
    for _ in range(reps):
        out = c(p, b)
    jax.block_until_ready(out)
    dt = (time.perf_counter() - t) / reps
print(json.dumps({"mesh": spec, "flops_per_device_over_one_device": flops(c) / one,
                  "step_s": dt, "tokens": B * T}))
"""


def cmd_step(a):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={a.devices}",
               JAX_PLATFORMS="cpu")
    if a.checkout:
        env["PYTHONPATH"] = a.checkout
    r = subprocess.run([sys.executable, "-c", _STEP, a.mesh, str(a.batch), str(a.seq_len), str(a.reps)],
                       env=env, capture_output=True, text=True, cwd=a.checkout or ROOT)
    if r.returncode:
        print(r.stderr[-3000:], file=sys.stderr)
        return 1
    print(r.stdout.strip().splitlines()[-1])
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("rows")
    r.add_argument("--tokens", type=int, default=4096)
    r.add_argument("--router-scale", type=float, default=1.0)
    b = sub.add_parser("buffers")
    b.add_argument("--tokens", type=int, default=4096)
    s = sub.add_parser("step")
    s.add_argument("--mesh", default="data=8")
    s.add_argument("--devices", type=int, default=8)
    s.add_argument("--batch", type=int, default=16)
    s.add_argument("--seq-len", type=int, default=128)
    s.add_argument("--reps", type=int, default=5)
    s.add_argument("--checkout", default=None, help="run another checkout's code (PYTHONPATH)")
    a = ap.parse_args(argv)
    return {"rows": cmd_rows, "buffers": cmd_buffers, "step": cmd_step}[a.cmd](a) or 0


if __name__ == "__main__":
    sys.exit(main())
