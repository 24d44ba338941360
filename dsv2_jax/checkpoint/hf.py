"""HF <-> dsv2_jax parameter names: one explicit map, and loading HF safetensors into a model.

Every HF tensor is one parameter of ours or one slice of a stacked one:
    model.layers.{i}.<rest>        -> segments[s].layers.<rest>[i - first_layer_of_s]
    ...mlp.experts.{e}.<p>.weight  -> segments[s].layers.mlp.experts.<p>[i - first, e]
Linear weights are [out, in] in HF and [in, out] here (transposed); embeddings and norms keep
their layout. Nothing else changes: RoPE is applied to adjacent pairs, so no rope rows are
permuted.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv2_jax.checkpoint import CheckpointError, path_problem
from dsv2_jax.checkpoint.safetensors_io import SafetensorsDir
from dsv2_jax.config import DeepseekV2Config
from dsv2_jax.model import DeepseekV2ForCausalLM

_LINEARS = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_name: str
    path: tuple  # path of our parameter in nnx.state(model)
    index: tuple  # leading indices into our (stacked) parameter
    transpose: bool
    shape: tuple  # HF shape


def _layer_rest(cfg: DeepseekV2Config, moe: bool):
    """(hf suffix, our sub-path, transpose, expert-indexed) within one decoder layer."""
    out = [("input_layernorm.weight", ("input_layernorm", "weight"), False),
           ("post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), False),
           ("self_attn.kv_a_layernorm.weight", ("self_attn", "kv_a_layernorm", "weight"), False)]
    linears = ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    if cfg.q_lora_rank is None:
        linears.append("q_proj")
    else:
        linears += ["q_a_proj", "q_b_proj"]
        out.append(("self_attn.q_a_layernorm.weight", ("self_attn", "q_a_layernorm", "weight"), False))
    out += [(f"self_attn.{n}.weight", ("self_attn", n, "kernel"), True) for n in linears]
    projs = ("gate_proj", "up_proj", "down_proj")
    if moe:
        out.append(("mlp.gate.weight", ("mlp", "gate", "kernel"), True))
        if cfg.n_shared_experts:
            out += [(f"mlp.shared_experts.{p}.weight", ("mlp", "shared_experts", p, "kernel"), True)
                    for p in projs]
    else:
        out += [(f"mlp.{p}.weight", ("mlp", p, "kernel"), True) for p in projs]
    return [(s, p, t, False) for s, p, t in out] + (
        [(f"mlp.experts.{{e}}.{p}.weight", ("mlp", "experts", p), True, True) for p in projs]
        if moe else [])


def param_map(cfg: DeepseekV2Config, abstract_state) -> list[Entry]:
    """All HF tensors of a config, in checkpoint order, with their place in our state."""
    shapes = {tuple(k): v.shape for k, v in _flat(abstract_state).items()}

    def entry(hf, path, index, transpose):
        ours = shapes[path][len(index):]
        return Entry(hf, path, index, transpose, tuple(reversed(ours)) if transpose else tuple(ours))

    entries = [entry("model.embed_tokens.weight", ("embed_tokens", "weight"), (), False)]
    for s, (kind, first, count) in enumerate(cfg.layer_segments()):
        for j in range(count):
            i = first + j
            for suffix, sub, transpose, per_expert in _layer_rest(cfg, kind == "moe"):
                path = ("segments", s, "layers") + sub
                if per_expert:
                    for e in range(cfg.n_routed_experts):
                        entries.append(entry(f"model.layers.{i}.{suffix.format(e=e)}", path, (j, e), transpose))
                else:
                    entries.append(entry(f"model.layers.{i}.{suffix}", path, (j,), transpose))
    entries.append(entry("model.norm.weight", ("norm", "weight"), (), False))
    if not cfg.tie_word_embeddings:
        entries.append(entry("lm_head.weight", ("lm_head", "kernel"), (), True))
    return entries


def _flat(state) -> dict:
    return {tuple(k): v for k, v in nnx.to_flat_state(state)}


def abstract_model(cfg: DeepseekV2Config):
    return nnx.eval_shape(lambda: DeepseekV2ForCausalLM(cfg, rngs=nnx.Rngs(0)))


# Safetensors dtypes a checkpoint's parameters can keep as they are.
PARAM_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _checkpoint_dtype(src: SafetensorsDir) -> str:
    """The parameter dtype of the checkpoint: the dtype most of its bytes are stored in."""
    dt = src.dominant_dtype()
    if dt.startswith("F8"):  # scales or not, loading does not dequantise
        raise CheckpointError(f"{src.path}: most weights are FP8 ({dt}), which loading does not "
                              f"dequantise; convert first: dsv2 convert {src.path} OUT --to hf "
                              f"--dtype bfloat16")
    if dt not in PARAM_DTYPES:
        raise CheckpointError(f"{src.path}: most weights are {dt}; pass dtype= to choose a "
                              f"parameter dtype")
    return PARAM_DTYPES[dt]


def check_tensors(src: SafetensorsDir, entries: list[Entry], allow_fp8: bool = False) -> None:
    """Missing, unexpected or mis-shaped tensors raise, naming the tensor and both shapes."""
    expected = {e.hf_name for e in entries}
    present = set(src.keys())
    scale_inv = {n for n in present if n.endswith(".weight_scale_inv")}
    missing = sorted(expected - present)
    # Tensors of no elements carry nothing: transformers writes empty shared experts for
    # n_shared_experts = 0 (shapes (0, D) and (D, 0)), which this model does not build.
    unexpected = sorted(n for n in present - expected - (scale_inv if allow_fp8 else set())
                        if math.prod(src.shape(n)))
    if missing:
        raise CheckpointError(f"{src.path}: missing tensor {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        hint = (" (FP8 scales: this checkpoint is FP8-quantised)" if scale_inv else "")
        raise CheckpointError(f"{src.path}: unexpected tensor {unexpected[0]!r}"
                              + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "") + hint)
    for e in entries:
        got = tuple(src.shape(e.hf_name))
        if got != e.shape:
            raise CheckpointError(f"{src.file_of(e.hf_name).path}: tensor {e.hf_name!r} has shape "
                                  f"{got}, config expects {e.shape}")


def read_tensor(src: SafetensorsDir, name: str) -> np.ndarray:
    """One HF tensor as stored; FP8 weights with a `weight_scale_inv` are refused (see
    `dsv2_jax.checkpoint.fp8` for dequantisation)."""
    if src.dtype_name(name).startswith("F8"):
        raise CheckpointError(f"{src.file_of(name).path}: tensor {name!r} is FP8 "
                              f"({src.dtype_name(name)}); convert with dequantisation first")
    return src.get(name)


def _hf_block(src: SafetensorsDir, e: Entry, trailing: tuple, dtype) -> np.ndarray:
    """The part `trailing` (slices of our trailing dims) of one HF tensor, laid out as ours
    and cast to dtype, reading only the rows of the HF tensor it needs."""
    if src.dtype_name(e.hf_name).startswith("F8"):
        read_tensor(src, e.hf_name)  # raises the FP8 refusal
    hf_slices = tuple(reversed(trailing)) if e.transpose else trailing
    if not hf_slices:  # a 0-d tensor
        block = src.read_rows(e.hf_name, 0, 1)
    else:
        rows = hf_slices[0]
        block = src.read_rows(e.hf_name, rows.start, rows.stop)[(slice(None),) + hf_slices[1:]]
    if e.transpose:
        block = block.T
    return np.ascontiguousarray(block.astype(dtype, copy=False))


def _normalise(index: tuple, shape: tuple) -> tuple:
    return tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(index, shape)) + tuple(
        slice(0, n) for n in shape[len(index):])


def load_sharded(cfg: DeepseekV2Config, src: SafetensorsDir, abstract_state, shardings: dict, *,
                 progress=None) -> dict:
    """Every parameter as a `jax.Array` placed straight onto its sharding: each device's shard
    is assembled from the byte ranges of the HF tensors it covers (a stacked expert shard from
    its experts' tensors, a row-split weight from those rows), so this process reads only what
    its own devices hold and host memory peaks at about one shard block, never a whole
    model. shardings: {path tuple: jax.sharding.Sharding}. Returns {path: jax.Array}."""
    entries = param_map(cfg, abstract_state)
    check_tensors(src, entries)
    by_path: dict[tuple, dict[tuple, Entry]] = {}
    for e in entries:
        by_path.setdefault(e.path, {})[e.index] = e
    out = {}
    for path, var in _flat(abstract_state).items():
        shape, dtype = tuple(var.shape), np.dtype(var.dtype)
        parts = by_path[path]
        lead = len(next(iter(parts)))

        def block(index, parts=parts, lead=lead, shape=shape, dtype=dtype):
            idx = _normalise(index, shape)
            ranges = [range(sl.start, sl.stop) for sl in idx[:lead]]
            buf = np.empty(tuple(sl.stop - sl.start for sl in idx), dtype)
            for combo in np.ndindex(*[len(r) for r in ranges]):
                key = tuple(r[c] for r, c in zip(ranges, combo))
                buf[combo] = _hf_block(src, parts[key], idx[lead:], dtype)
            if progress is not None:
                progress(".".join(map(str, path)), buf.nbytes)
            return buf

        out[path] = _place(shape, shardings[path], block)
    return out


def _place(shape, sharding, block):
    """A global array built one device at a time: each addressable device's block is read,
    copied to its device and dropped before the next is read, so the host holds one block
    (the Python-side buffers of `make_array_from_callback` would hold every block of the
    array at once). Devices that hold the same block (replicas) share one read."""
    import jax

    index_map = sharding.addressable_devices_indices_map(shape)
    arrays, done = [], {}
    for device, index in index_map.items():
        key = tuple((sl.start, sl.stop) for sl in _normalise(index, shape))
        if key not in done:
            done.clear()  # keep at most one block alive
            done[key] = block(index)
        arrays.append(jax.device_put(done[key], device))
    done.clear()
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def from_pretrained(path, dtype=None, compute_dtype=None, mesh=None, rules=None,
                    **overrides) -> DeepseekV2ForCausalLM:
    """Loads an HF directory (single or sharded safetensors; official or transformers-5
    config.json), a dsv2 Orbax checkpoint or a training workdir into a
    `DeepseekV2ForCausalLM`.

    dtype: parameter dtype (default: the dtype most of the checkpoint's bytes are stored in);
    the router stays float32. Every other tensor is cast to it, as transformers does: a
    float32 tensor in a mostly-bfloat16 checkpoint is rounded (pass dtype="float32" to keep
    every value; `dsv2 convert` refuses such a cast unless --dtype asks for it).
    compute_dtype: activation dtype (default: the parameter dtype; an Orbax checkpoint's
    config.json may name its own pair, e.g. float32 weights computing in bfloat16).
    mesh: place every parameter straight onto its sharding under this mesh (the rules table
    of `dsv2_jax.sharding.rules`, or `rules`): each process reads only the parts of tensors
    its devices hold. Default: everything on the first device.
    Any mismatch between config and tensors raises `CheckpointError`; nothing is initialised
    at random.
    """
    path = os.path.expanduser(os.fspath(path))
    if why := path_problem(path):
        raise CheckpointError(f"{path}: {why}")
    from dsv2_jax.checkpoint import orbax_io

    if orbax_io.is_orbax_checkpoint(path) or orbax_io.is_training_workdir(path):
        return orbax_io.load_model(path, dtype=dtype, compute_dtype=compute_dtype, mesh=mesh,
                                   rules=rules, **overrides)
    cfg = DeepseekV2Config.from_hf(path)
    src = SafetensorsDir(path)
    pdt = dtype if dtype is not None else _checkpoint_dtype(src)
    pdt = jnp.dtype(pdt).name
    cfg = cfg.replace(param_dtype=pdt, dtype=jnp.dtype(compute_dtype or pdt).name, **overrides)
    abstract = abstract_model(cfg)
    graphdef, abs_state = nnx.split(abstract)
    shardings = flat_shardings(abstract, mesh, rules)
    arrays = load_sharded(cfg, src, abs_state, shardings)
    return assemble_model(graphdef, abs_state, arrays)


def flat_shardings(abstract, mesh=None, rules=None) -> dict:
    """{param path: sharding} of an abstract model: the rules table's under `mesh`, else the
    first device."""
    import jax

    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return {p: one for p in _flat(nnx.state(abstract))}
    from dsv2_jax.sharding.rules import param_shardings

    out = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(prefix + (k,), v)
        else:
            out[prefix] = node

    walk((), param_shardings(abstract, mesh, rules))
    return out


def assemble_model(graphdef, abs_state, arrays: dict) -> DeepseekV2ForCausalLM:
    missing = [p for p in _flat(abs_state) if p not in arrays]
    if missing:
        raise CheckpointError(f"no value for parameter {'.'.join(map(str, missing[0]))}")
    state = nnx.from_flat_state([(p, v.replace(arrays[tuple(p)] if not isinstance(arrays[tuple(p)], np.ndarray)
                                                else jnp.asarray(arrays[tuple(p)])))
                                 for p, v in nnx.to_flat_state(abs_state)])
    return nnx.merge(graphdef, state)
