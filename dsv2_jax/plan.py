"""Per-device memory and traffic of one training step, before any device exists.

`make_plan(cfg, mesh, batch_size, seq_len)` is arithmetic on the abstract model (shapes only,
`jax.eval_shape`) and on the one sharding table: each parameter's PartitionSpec comes from
`sharding.rules.param_specs` on an `AbstractMesh` of the requested sizes, exactly as
`param_shardings` builds the real ones. No device is needed, whatever the device count.

What one device holds at the step's peak (B sequences of T tokens per token shard, the batch
being split over data x fsdp x expert; D hidden, V vocabulary):

    parameters     the master weights' shards (master dtype; router kernels stay float32)
    gradients      shaped and typed like the parameters
    optimizer      AdamW mu and nu, shaped and typed like the parameters
    activations    what the backward pass keeps, by `cfg.remat`:
                     full  each layer's input [B, T, D] (the layer scan's carries)
                     dots  also the projections' outputs (matmuls without batch dimensions)
                     none  every intermediate of every layer and every FSDP-gathered weight
                   plus the router outputs of every MoE layer, which the balance losses read
    held           alive across the backward: the gathered output projection, the embedding
                   table's gradient before its reduce-scatter ([V, D]), and the
                   gathered weights of one-layer stacks (not looped: their forward and
                   recomputed gathers merge into one)
    working set    the largest of: one layer's backward (its gathered weights, its recomputed
                   intermediates and their cotangents: attention scores with each query
                   block's key slices, the MoE dispatch buffers and expert rows) and one
                   chunk of the loss ([B, ce_chunk, V] float32 logits, thrice)

The expert-dispatch buffers of one MoE layer (`moe.dispatch`): C rows per destination (T*B
when dropless; ceil(cf*T*B*M/ep) + the protected rows under a capacity), send and receive
buffers [ep, C, D] with k = min(K, E/ep) expert slots per row, and ep*C*k assignment rows into
the receiver's grouped matmul.

Bytes sent per step over each mesh axis by one device (ring collectives: an all-gather or a
reduce-scatter of S bytes over n devices sends S*(n-1)/n, an all-reduce twice that):
    fsdp, expert   every parameter gathered for use before each forward (again in the
                   backward under remat), its gradient reduce-scattered
    data           the gradient shards all-reduced
    tensor         activation all-reduces: after the row-parallel projections (attention
                   out, MLP down, experts) and for the input gradients of column-parallel ones
    expert         also the MoE exchange: dispatch and return of every MoE layer, each pass

Targets differ in what the compiler materialises. `cpu` is XLA:CPU, which the tests compile
against: it computes bfloat16 arithmetic in float32 (a gathered weight is held as float32 and
as bfloat16, temporaries are float32), and the model picks the
blocked grouped matmul and whole-buffer exchange there. `gpu` and `tpu` count the compute
dtype, an in-place update, `ragged_dot` and the ragged exchange (when dropless): the same
program model with the compiler's habits removed, not measured here (no device).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping

from dsv2_jax.config import DeepseekV2Config
from dsv2_jax.moe.routing import expert_parallel_config

GB = 1e9
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclasses.dataclass(frozen=True)
class Target:
    """A compiler's habits that change the count."""

    name: str
    temp_bytes: int | None  # bytes per element of temporaries; None: the compute dtype's
    moe_backend: str  # what moe_backend=auto resolves to
    ragged_exchange: bool  # a dropless dispatch sends exactly its rows (else whole buffers)


TARGETS: Mapping[str, Target] = {
    "cpu": Target("cpu", 4, "blocked", False),
    "gpu": Target("gpu", None, "ragged_dot", True),
    "tpu": Target("tpu", None, "ragged_dot", True),
}


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter array on the mesh (element counts are per device)."""

    path: str
    shape: tuple
    itemsize: int
    layers: int  # its stacked-layer axis (1 if none)
    stored: int  # elements each device stores
    used: int  # elements each device uses, once its storage-only (FSDP) axes are gathered
    gather_axes: tuple  # the mesh axes gathered over for use
    segment: int | None  # its layer stack (None: embedding, final norm, output projection)

    @property
    def expert(self) -> bool:
        return ".experts." in f".{self.path}."

    @property
    def cast(self) -> bool:
        """Cast to the compute dtype before use: not norm weights, not the router."""
        matrix = len(self.shape) - (self.segment is not None) > 1
        return matrix and not self.path.endswith("gate.kernel")


@dataclasses.dataclass(frozen=True)
class Plan:
    cfg: DeepseekV2Config
    sizes: dict  # mesh axis -> size
    batch_size: int
    seq_len: int
    device_memory: int
    target: str
    memory: dict  # term -> bytes per device; the total is their sum
    details: dict  # term -> {part: bytes} for the terms made of parts
    dispatch: dict  # one MoE layer's expert-dispatch buffers
    traffic: dict  # mesh axis -> bytes one device sends per step
    grad_accum: int = 1  # micro-batches per step

    @property
    def devices(self) -> int:
        return math.prod(self.sizes.values())

    @property
    def per_shard_batch(self) -> int:
        return self.batch_size // token_shards(self.sizes)

    @property
    def total(self) -> int:
        return sum(self.memory.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.device_memory

    @property
    def largest(self) -> str:
        return max(self.memory, key=self.memory.get)


def mesh_sizes(spec: str | None, n_devices: int | None = None) -> dict[str, int]:
    """{axis: size} of a --mesh spec. The device count is the product of the axes given,
    unless n_devices is (which an axis of -1 needs)."""
    from dsv2_jax.sharding.mesh import parse_mesh

    if n_devices is None:
        items = [i.partition("=")[2].strip() for i in (spec or "").split(",") if i.strip()]
        if "-1" in items:
            raise ValueError(f"--mesh {spec!r}: an axis of -1 needs --devices N")
        n_devices = math.prod(int(n) for n in items if n.isdigit() and int(n) > 0)
    return parse_mesh(spec, n_devices, " (--devices)")


def token_shards(sizes: Mapping[str, int]) -> int:
    """Devices holding different tokens: the batch axes of the rules."""
    from dsv2_jax.sharding.rules import RULES

    return math.prod(sizes.get(a, 1) for a in RULES["act_batch"])


@functools.lru_cache(maxsize=8)
def _abstract_model(cfg: DeepseekV2Config):
    from dsv2_jax.checkpoint.hf import abstract_model

    return abstract_model(cfg)


def parameter_table(cfg: DeepseekV2Config, sizes: Mapping[str, int]) -> list[Param]:
    """Every parameter's per-device shard under the rules, and what it becomes once its
    storage-only dimensions (`rules.STORAGE_ONLY`) are gathered for use."""
    import jax
    import numpy as np
    from flax import nnx
    from jax.sharding import AbstractMesh, PartitionSpec

    from dsv2_jax.sharding.rules import STORAGE_ONLY, entry_axes, param_specs

    model = _abstract_model(cfg)
    mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes))
    specs = jax.tree.leaves(param_specs(model, mesh), is_leaf=lambda x: isinstance(x, PartitionSpec))
    out = []
    for (path, var), spec in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)), specs):
        names = tuple(var.get_metadata().get("logical_axes", (None,) * len(var.shape)))
        stored_div = used_div = 1
        gather = ()
        for name, entry in zip(names, tuple(spec) + (None,) * (len(var.shape) - len(spec))):
            axes = entry_axes(entry)
            n = math.prod(sizes[a] for a in axes)
            stored_div *= n
            if name in STORAGE_ONLY:
                gather += axes
            else:
                used_div *= n
        numel = math.prod(var.shape)
        out.append(Param(
            path=".".join(str(k) for k in path), shape=tuple(var.shape),
            itemsize=np.dtype(var.dtype).itemsize,
            layers=var.shape[0] if names[:1] == ("layers",) else 1,
            stored=numel // stored_div, used=numel // used_div, gather_axes=gather,
            segment=path[1] if path[0] == "segments" else None))
    return out


# ---------------------------------------------------------------------------------------
# One layer's intermediates.


def _moe_backend(cfg: DeepseekV2Config, target: Target) -> str:
    return target.moe_backend if cfg.moe_backend == "auto" else cfg.moe_backend


def _flavor(cfg: DeepseekV2Config, target: Target, dropping: bool) -> str:
    """The exchange `moe.dispatch.a2a_flavor` would pick on the target."""
    if cfg.moe_dispatch != "auto":
        return cfg.moe_dispatch
    return "ragged" if target.ragged_exchange and not dropping else "fixed"


def dispatch_buffers(cfg: DeepseekV2Config, tokens: int, batch: int, ep: int, c: int,
                     target: Target) -> dict:
    """One MoE layer's exchange on one device holding `tokens` tokens in `batch` sequences,
    activations of c bytes (`moe.dispatch.traffic_figures`)."""
    from dsv2_jax.moe.dispatch import traffic_figures

    dropping = cfg.capacity_factor is not None
    if ep == 1:
        return {"rows_per_destination": tokens, "slots": cfg.num_experts_per_tok, "buffer_bytes": 0,
                "return_bytes": 0, "assignment_rows": tokens * cfg.num_experts_per_tok,
                "flavor": "none"}
    f = traffic_figures(cfg, tokens, ep, c, dropping, batch=batch, train=True)
    C, k = f["rows_per_destination"], min(cfg.num_experts_per_tok, cfg.n_routed_experts // ep)
    return {"rows_per_destination": C, "slots": k, "buffer_bytes": f["buffer_bytes"],
            "return_bytes": ep * C * cfg.hidden_size * c, "assignment_rows": ep * C * k,
            "flavor": _flavor(cfg, target, dropping)}


def _blocked_rows(rows: int, experts: int) -> int:
    """Rows of the blocked grouped matmul's buffers (`moe.gmm._windowed_swiglu`): the sorted
    rows and one window past their end, which an expert's last window may write."""
    from dsv2_jax.moe.gmm import window_rows

    return rows + window_rows(rows, experts)


def _attention_scores(cfg: DeepseekV2Config, T: int) -> tuple[int, int]:
    """(score elements, key rows sliced) per sequence and head of the XLA core, whose query
    blocks visit only the keys at or before the block's end (`attention.mla_attention_xla`)."""
    from dsv2_jax.attention import _causal_block

    if cfg.attn_impl == "reference":
        return T * T, T
    if cfg.attn_impl == "pallas":
        # flash_mla keeps one [block_q, block_k] tile of scores per program, never a row of
        # them: nothing of size T x T (not calibrated: XLA:CPU only runs it interpreted)
        return 0, T
    block = _causal_block(T)
    starts = range(0, T, block)
    return (sum((min(T, s + block) - s) * min(T, s + block) for s in starts),
            sum(min(T, s + block) for s in starts))


def layer_parts(cfg: DeepseekV2Config, kind: str, B: int, T: int, sizes: Mapping[str, int],
                c: int, target: Target, working: bool) -> dict:
    """Intermediates of one decoder layer (dense | moe) on one device, bytes by part.
    working: while the layer's backward runs (recomputed values and cotangents); else what
    its forward leaves for the backward."""
    t = target.temp_bytes or c
    tp, ep = sizes["tensor"], sizes["expert"]
    n = B * T
    D, H = cfg.hidden_size, cfg.num_attention_heads // tp
    P, R, V, Cl = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    parts = {}
    # q [n,H,P+R], latent and rope key [n,C+R], k_nope and v [n,H,P+V], out [n,H*V], o [n,D]
    proj = n * (H * (P + R) + Cl + R + H * (P + V) + H * V + D + 2 * (cfg.q_lora_rank or 0))
    parts["attention projections"] = proj * t
    parts["attention q/k"] = 2 * n * H * (P + R) * t  # [nope|rope] concatenated, both sides
    # Each query block keeps its probabilities (float32 for the softmax, compute dtype for
    # the product with the values) and its slices of the keys and values; while the layer's
    # backward runs, also the logits and their cotangent, and the slices' cotangents.
    scores, key_rows = _attention_scores(cfg, T)
    per_score = (12 if working else 4) + t
    per_key = (P + R + V) * t * (2 if working else 1)
    parts["attention scores"] = B * H * (scores * per_score + key_rows * per_key)
    parts["norms and residuals"] = 4 * n * D * t
    if kind == "dense":
        parts["mlp"] = (3 * n * cfg.intermediate_size // tp + n * D) * t
        return parts
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    F = cfg.moe_intermediate_size // tp
    parts["router"] = n * E * 8 + n * K * 13  # logits, scores; ids, weights, keep
    if cfg.n_shared_experts:
        parts["shared experts"] = (3 * n * F * cfg.n_shared_experts + n * D) * t
    d = dispatch_buffers(cfg, n, B, ep, c, target)
    if ep > 1:
        # send and received buffers, the results and their return, per-token slot tables
        # [n, ep, k] and the float32 combine [n, D]
        parts["dispatch buffers"] = (2 * d["buffer_bytes"] + 2 * d["return_bytes"]
                                     + n * ep * d["slots"] * 8 + n * D * 4)
    rows = d["assignment_rows"]
    padded = rows
    if _moe_backend(cfg, target) == "blocked":
        padded = _blocked_rows(rows, E // ep)
    # rows sorted by expert [rows, D] (and their float32 weighted form); over the padded
    # rows, in the compute dtype: the output and its cotangent, the gate and up
    # pre-activations kept for the backward (the hidden rows exist one window at a time)
    parts["expert rows"] = rows * D * (c + 4) + padded * (2 * D + 2 * F) * c
    return parts


# ---------------------------------------------------------------------------------------
# The plan.


def make_plan(cfg: DeepseekV2Config, mesh: str | Mapping[str, int] | None, batch_size: int,
              seq_len: int, *, device_memory: float = 80 * GB, master_dtype: str = "float32",
              target: str = "gpu", n_devices: int | None = None, grad_accum: int = 1) -> Plan:
    """The plan of a training step: `mesh` a --mesh spec (or {axis: size}), `batch_size`
    sequences of `seq_len` tokens over the whole mesh, in `grad_accum` micro-batches (the
    activations and buffers of one micro-batch, plus the running sum of the gradients)."""
    if target not in TARGETS:
        raise ValueError(f"--target: unknown {target!r}; expected one of {', '.join(TARGETS)}")
    if master_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--master-dtype: unknown {master_dtype!r}; expected float32 or bfloat16")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch size and sequence length must be positive, got {batch_size} "
                         f"and {seq_len}")
    tg = TARGETS[target]
    if isinstance(mesh, Mapping):
        from dsv2_jax.sharding.mesh import AXES

        sizes = {a: int(mesh.get(a, 1)) for a in AXES}
    else:
        sizes = mesh_sizes(mesh, n_devices)
    shards = token_shards(sizes)
    if batch_size % shards:
        raise ValueError(f"--batch-size {batch_size} does not divide over the {shards} token "
                         f"shards of the mesh (data x fsdp x expert)")
    if grad_accum < 1 or (batch_size // shards) % grad_accum:
        raise ValueError(f"--grad-accum {grad_accum}: the {batch_size // shards} sequence(s) per "
                         f"token shard do not split into {grad_accum} micro-batches")
    cfg = cfg.replace(param_dtype=master_dtype)
    ep, tp = sizes["expert"], sizes["tensor"]
    if cfg.n_routed_experts and cfg.n_routed_experts % ep:
        raise ValueError(f"n_routed_experts={cfg.n_routed_experts} does not divide over the "
                         f"expert axis ({ep})")
    # The routing `dsv2 train` runs on this expert axis (its device groups are the devices).
    cfg = expert_parallel_config(cfg, ep, log=lambda *_: None)
    params = parameter_table(cfg, sizes)
    c = _DTYPE_BYTES[cfg.dtype]
    t = tg.temp_bytes or c
    B, T = batch_size // shards // grad_accum, seq_len
    n, D = B * T, cfg.hidden_size
    segs = cfg.layer_segments()

    def in_use(p: Param, per_layer: bool = True) -> int:
        """Bytes of a parameter while a layer uses it: gathered, and cast to the compute
        dtype; each of the forms {compute dtype, temporaries' dtype} that is not the stored
        array itself is a buffer of its own."""
        used = p.used // p.layers if per_layer else p.used
        forms = {c, t} if p.cast else {p.itemsize}
        return used * sum(b for b in forms if b != p.itemsize or p.gather_axes)

    p_bytes = sum(p.stored * p.itemsize for p in params)
    memory = {"parameters": p_bytes, "gradients": p_bytes, "optimizer": 2 * p_bytes}
    if grad_accum > 1:  # the micro-batches' gradients summed, laid out as the parameters
        memory["gradient accumulator"] = p_bytes

    kinds = {kind for kind, _, _ in segs}
    saved = {k: layer_parts(cfg, k, B, T, sizes, c, tg, working=False) for k in kinds}
    live = {k: layer_parts(cfg, k, B, T, sizes, c, tg, working=True) for k in kinds}
    weights = [sum(in_use(p) for p in params if p.segment == s) for s in range(len(segs))]
    # At the peak of a layer the experts' gate and up projections are in use together, the
    # down projection after them: two of the three expert matrices.
    peak_weights = [sum(in_use(p) * (2 if p.expert else 3) // 3 for p in params if p.segment == s)
                    for s in range(len(segs))]

    acts = {"layer inputs": (cfg.num_hidden_layers + 2) * n * D * c}
    L_moe = sum(count for kind, _, count in segs if kind == "moe")
    if L_moe:
        acts["router outputs"] = L_moe * (n * cfg.n_routed_experts * 8 + n * cfg.num_experts_per_tok * 13)
    for s, (kind, _, count) in enumerate(segs):
        if cfg.remat == "dots":
            part = saved[kind]
            dots = (part["attention projections"] + part.get("mlp", 0) + part.get("shared experts", 0))
            acts[f"{kind} projections"] = acts.get(f"{kind} projections", 0) + count * dots * c // t
        elif cfg.remat == "none":
            acts[f"{kind} intermediates"] = (acts.get(f"{kind} intermediates", 0)
                                             + count * sum(saved[kind].values()))
            # every gathered weight, as gathered
            w = sum(p.used // p.layers * t for p in params if p.segment == s and p.gather_axes)
            acts["gathered weights"] = acts.get("gathered weights", 0) + count * w
    memory["activations"] = sum(acts.values())

    held = {}
    for p in params:
        if p.path.startswith("lm_head"):
            held["output projection"] = in_use(p, per_layer=False)
        elif p.path.startswith("embed_tokens"):
            held["embedding gradient"] = p.used * t
            if cfg.tie_word_embeddings:
                held["output projection"] = in_use(p, per_layer=False)
    single = sum(weights[s] for s, (_, _, count) in enumerate(segs) if count == 1)
    if single and cfg.remat != "none":
        held["one-layer stacks' weights"] = single
    memory["held"] = sum(held.values())

    best = {}
    for s, (kind, _, count) in enumerate(segs):
        ws = {f"{kind} layer: {k}": v for k, v in live[kind].items()}
        if count > 1 and cfg.remat != "none":
            ws[f"{kind} layer: weights in use"] = peak_weights[s]
        if sum(ws.values()) > sum(best.values()):
            best = ws
    chunk = min(T, cfg.ce_chunk) if cfg.ce_chunk else T
    loss = {"loss chunk: logits, exp, cotangent": 3 * B * chunk * (cfg.vocab_size // tp) * 4}
    working = max(best, loss, key=lambda d: sum(d.values()))
    memory["working set"] = sum(working.values())

    dispatch = dispatch_buffers(cfg, n, B, ep, c, tg) if cfg.n_routed_experts else {}
    traffic = {a: v * grad_accum for a, v in step_traffic(cfg, params, sizes, B, T, c, tg).items()}
    return Plan(cfg, sizes, batch_size, seq_len, int(device_memory), target, memory,
                {"activations": acts, "held": held, "working set": working}, dispatch, traffic,
                grad_accum)


def _ring(nbytes: float, n: int) -> float:
    """Bytes one device sends in a ring all-gather / reduce-scatter of nbytes over n."""
    return nbytes * (n - 1) / n if n > 1 else 0.0


def _expected_devices(cfg: DeepseekV2Config, ep: int) -> float:
    """Expert devices a token reaches on average, its K experts drawn uniformly (the
    balance losses' aim): ep * (1 - P(no chosen expert on a given device))."""
    E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
    miss = math.comb(E - E // ep, K) / math.comb(E, K)
    m = ep * (1 - miss)
    if cfg.num_device_groups == ep and cfg.max_devices_per_token:
        m = min(m, cfg.max_devices_per_token)
    return m


def step_traffic(cfg: DeepseekV2Config, params: list[Param], sizes: Mapping[str, int], B: int,
                 T: int, c: int, target: Target) -> dict:
    """Bytes one device sends per step over each mesh axis (the module docstring)."""
    out = {a: 0.0 for a in sizes}
    gathers = 1 if cfg.remat == "none" else 2  # forward, and the backward's recomputation
    for p in params:
        nbytes = p.used * (c if p.cast else p.itemsize)
        # Innermost axis first: an outer axis then moves the inner axes' gathered blocks.
        block = nbytes / math.prod(sizes[a] for a in p.gather_axes)
        for a in reversed(p.gather_axes):
            block *= sizes[a]
            out[a] += (gathers + 1) * _ring(block, sizes[a])  # + the gradient's reduce-scatter
    out["data"] += 2 * _ring(sum(p.stored * (c if p.cast else p.itemsize) for p in params),
                             sizes["data"])
    n, D, tp = B * T, cfg.hidden_size, sizes["tensor"]
    if tp > 1:
        act = n * D * c
        fwd = bwd = 0.0
        for kind, _, count in cfg.layer_segments():
            # forward: attention out; MLP down, or the experts' sum (float32) and shared down
            f = act + (act if kind == "dense" else n * D * 4 + (act if cfg.n_shared_experts else 0))
            # backward: input gradients of q (from the q latent or the input), the kv latent
            # and the MLP / shared / routed inputs
            b = n * c * ((cfg.q_lora_rank or D) + cfg.kv_lora_rank) + act * (
                1 if kind == "dense" else 1 + bool(cfg.n_shared_experts))
            fwd += count * f
            bwd += count * b
        passes = fwd * (1 if cfg.remat == "none" else 2) + bwd + 2 * act  # + embedding, head
        out["tensor"] += 2 * _ring(passes, tp)
    ep = sizes["expert"]
    if cfg.n_routed_experts and ep > 1:
        d = dispatch_buffers(cfg, n, B, ep, c, target)
        if d["flavor"] == "ragged":  # exactly the rows, to the other devices
            rows = n * _expected_devices(cfg, ep) * (ep - 1) / ep
            per_layer = rows * (D * c + d["slots"] * 8) + rows * D * c
        else:
            per_layer = _ring(d["buffer_bytes"] + d["return_bytes"], ep)
        L_moe = sum(count for kind, _, count in cfg.layer_segments() if kind == "moe")
        out["expert"] += L_moe * per_layer * (2 if cfg.remat == "none" else 3)
    return {a: int(v) for a, v in out.items()}


# ---------------------------------------------------------------------------------------
# Verdict and advice.


def _spec(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "one device"


def _alternatives(plan: Plan):
    """(change, kwargs for make_plan) worth trying when a plan does not fit."""
    s = plan.sizes
    yield from ((f"--mesh {_spec(m)} ({why})", {"mesh": m}) for why, m in _mesh_moves(plan.cfg, s))
    if plan.cfg.param_dtype == "float32":
        yield "--master-dtype bfloat16", {"master_dtype": "bfloat16"}
    if plan.cfg.remat != "full":
        yield "--set remat=full", {"cfg": plan.cfg.replace(remat="full")}
    if plan.cfg.n_routed_experts and plan.cfg.capacity_factor is None:
        yield "--set capacity_factor=1.25", {"cfg": plan.cfg.replace(capacity_factor=1.25)}


def _mesh_moves(cfg: DeepseekV2Config, s: Mapping[str, int]):
    """Meshes of the same device count one move away: data -> fsdp, and doubling tensor or
    expert at the expense of data or fsdp."""
    if s["data"] > 1:
        yield "data devices moved to fsdp", dict(s, data=1, fsdp=s["fsdp"] * s["data"])
    experts_divide = bool(cfg.n_routed_experts) and cfg.n_routed_experts % (2 * s["expert"]) == 0
    for axis in ("tensor", "expert"):
        if axis == "expert" and not experts_divide:
            continue
        for src in ("data", "fsdp"):
            if s[src] % 2 == 0:
                yield f"{axis} raised from {src}", dict(s, **{src: s[src] // 2, axis: s[axis] * 2})
                break


def advice(plan: Plan) -> list[str]:
    """The verdict, and when it does not fit, the changes that would bring the total down,
    each planned (best first)."""
    gb = lambda x: f"{x / GB:.2f} GB"
    largest = f"largest term: {plan.largest} ({gb(plan.memory[plan.largest])})"
    if plan.fits:
        return [f"fits: {gb(plan.total)} of {gb(plan.device_memory)} per device; {largest}"]
    lines = [f"does not fit: {gb(plan.total)} > {gb(plan.device_memory)} per device; {largest}"]
    tried = []
    for change, kw in _alternatives(plan):
        args = dict(cfg=plan.cfg, mesh=plan.sizes, batch_size=plan.batch_size, seq_len=plan.seq_len,
                    device_memory=plan.device_memory, master_dtype=plan.cfg.param_dtype,
                    target=plan.target, grad_accum=plan.grad_accum)
        args.update(kw)
        try:
            alt = make_plan(args.pop("cfg"), args.pop("mesh"), args.pop("batch_size"),
                            args.pop("seq_len"), **args)
        except ValueError:  # the mesh does not divide the model or the batch
            continue
        if alt.total < plan.total:
            tried.append((alt.total, change, alt.fits))
    for total, change, fits in sorted(tried)[:4]:
        lines.append(f"  would help: {change} -> {gb(total)}" + (" (fits)" if fits else ""))
    if not any(fits for _, _, fits in tried):
        fewer = (f"fewer sequences per device (now {plan.per_shard_batch} per token shard) or "
                 if plan.per_shard_batch > 1 else "")
        lines.append(f"  also: {fewer}more devices")
    return lines


MAX_BATCH_SEARCH = 4096  # sequences per token shard and micro-batch


def max_batch(cfg: DeepseekV2Config, mesh: str | Mapping[str, int] | None, seq_len: int, *,
              limit: int = MAX_BATCH_SEARCH, **kw) -> int:
    """The largest global batch (a multiple of the token shards times `grad_accum`) whose
    plan fits, searched up to `limit` sequences per token shard and micro-batch; 0 if not
    even one sequence per token shard and micro-batch does."""
    sizes = dict(mesh) if isinstance(mesh, Mapping) else mesh_sizes(mesh, kw.pop("n_devices", None))
    shards = token_shards(sizes) * kw.get("grad_accum", 1)  # whole micro-batches per shard
    fits = lambda b: make_plan(cfg, sizes, b * shards, seq_len, **kw).fits
    lo, hi = 0, 1
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * shards


def format_plan(plan: Plan) -> str:
    """The plan as a table (GB with 2 decimals), then the verdict."""
    cfg = plan.cfg
    g = lambda x: f"{x / GB:10.2f}"
    lines = [
        f"mesh {_spec(plan.sizes)} ({plan.devices} devices), batch {plan.batch_size} x "
        f"{plan.seq_len} tokens = {plan.per_shard_batch} sequence(s) per token shard"
        + (f" in {plan.grad_accum} micro-batches" if plan.grad_accum > 1 else "")
        + f"; target {plan.target}",
        f"compute {cfg.dtype}, master {cfg.param_dtype}, remat {cfg.remat}, capacity factor "
        f"{cfg.capacity_factor if cfg.capacity_factor is not None else 'none (dropless)'}",
        "",
        f"{'memory per device':40s}{'GB':>10s}",
    ]
    for term, nbytes in plan.memory.items():
        lines.append(f"  {term:38s}{g(nbytes)}")
        for part, b in plan.details.get(term, {}).items():
            if b >= 0.005 * GB:
                lines.append(f"    {part:36s}{g(b)}")
    lines.append(f"  {'total':38s}{g(plan.total)}   of {plan.device_memory / GB:.2f}")
    d = plan.dispatch
    if d and plan.sizes["expert"] > 1:
        lines += ["", f"expert dispatch, one MoE layer ({d['flavor']} exchange)",
                  f"  {'rows per destination C':38s}{d['rows_per_destination']:10d}",
                  f"  {'send (= receive) buffers':38s}{g(d['buffer_bytes'])}",
                  f"  {'results returned':38s}{g(d['return_bytes'])}",
                  f"  {'assignment rows into the experts':38s}{d['assignment_rows']:10d}"]
    elif d:
        lines += ["", "expert dispatch, one MoE layer: none (no expert axis; every device runs "
                      f"all experts on its {d['assignment_rows']} token-expert rows)"]
    lines += ["", f"{'bytes sent per step, per device':40s}{'GB':>10s}"]
    for axis, nbytes in plan.traffic.items():
        if plan.sizes[axis] > 1:
            lines.append(f"  {axis + ' (' + str(plan.sizes[axis]) + ')':38s}{g(nbytes)}")
    best = max_batch(cfg, plan.sizes, plan.seq_len, device_memory=plan.device_memory,
                     master_dtype=cfg.param_dtype, target=plan.target, grad_accum=plan.grad_accum)
    shards = token_shards(plan.sizes)
    at_least = "at least " if best // shards >= MAX_BATCH_SEARCH * plan.grad_accum else ""  # the search's end
    most = (f"largest batch that fits: {at_least}{best} ({best // shards} per token shard)" if best
            else "not even one sequence per token shard fits")
    return "\n".join(lines + [""] + advice(plan) + [most])
