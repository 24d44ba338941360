"""from_pretrained refuses a checkpoint that does not match its config, naming the tensor (and
both shapes when they differ); nothing is ever initialised at random to fill a gap."""

import json
import os
import re
import shutil

import numpy as np
import pytest

import hf_reference as ref
from dsv2_jax import from_pretrained
from dsv2_jax.checkpoint import CheckpointError
from dsv2_jax.checkpoint.safetensors_io import DTYPE_NAMES, SafetensorsFile, write_safetensors


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny V2-shaped HF checkpoint (q_lora, group-limited routing), one file and sharded."""
    hf = ref.build(ref.V2, seed=21)
    root = tmp_path_factory.mktemp("ckpt")
    single = ref.save(hf, str(root / "single"))
    sharded = ref.save(hf, str(root / "sharded"), max_shard_size="20KB")
    return single, sharded


def _copy(src, tmp_path, name="edited"):
    dst = str(tmp_path / name)
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, edit):
    """Rewrites one safetensors file through our streaming writer. edit(tensors) gets and
    returns {name: array}."""
    sf = SafetensorsFile(path)
    tensors = {name: np.array(sf.get(name)) for name in sf.keys()}
    sf.close()
    tensors = edit(tensors)
    write_safetensors(path, [(n, DTYPE_NAMES[a.dtype], a.shape) for n, a in tensors.items()],
                      lambda n: tensors[n], metadata={"format": "pt"})


def _load_error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        from_pretrained(path)
    return str(e.value)


def test_unedited_checkpoints_load(saved):
    single, sharded = saved
    for path in saved:
        model = from_pretrained(path)
        assert model.cfg.n_routed_experts == ref.V2["n_routed_experts"]


@pytest.mark.parametrize("name", [
    "model.layers.2.mlp.experts.5.up_proj.weight",
    "model.layers.0.self_attn.q_a_layernorm.weight",
    "lm_head.weight",
])
def test_missing_tensor(saved, tmp_path, name):
    path = _copy(saved[0], tmp_path)
    _rewrite(os.path.join(path, "model.safetensors"), lambda t: {k: v for k, v in t.items() if k != name})
    msg = _load_error(path)
    assert "missing" in msg and repr(name) in msg, msg


@pytest.mark.parametrize("name,shape", [
    ("model.layers.1.self_attn.q_proj.weight", (80, 48)),  # a V2-Lite tensor in a V2 checkpoint
    ("model.layers.1.mlp.experts.8.gate_proj.weight", (24, 48)),  # one expert too many
    ("model.layers.3.input_layernorm.weight", (48,)),  # a layer the config does not have
])
def test_unexpected_tensor(saved, tmp_path, name, shape):
    path = _copy(saved[0], tmp_path)
    extra = np.zeros(shape, np.float32)
    _rewrite(os.path.join(path, "model.safetensors"), lambda t: {**t, name: extra})
    msg = _load_error(path)
    assert "unexpected" in msg and repr(name) in msg, msg


@pytest.mark.parametrize("name,new_shape", [
    ("model.layers.1.self_attn.kv_b_proj.weight", (4 * 22 - 1, 20)),  # one row short
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", (20 + 8, 47)),  # in-dim off by one
    ("model.layers.2.mlp.experts.0.down_proj.weight", (24, 48)),  # transposed
    ("model.embed_tokens.weight", (96, 48)),  # vocab off by one
])
def test_misshaped_tensor_names_both_shapes(saved, tmp_path, name, new_shape):
    path = _copy(saved[0], tmp_path)
    state = {}

    def edit(t):
        state["expected"] = t[name].shape
        t[name] = np.zeros(new_shape, t[name].dtype)
        return t

    _rewrite(os.path.join(path, "model.safetensors"), edit)
    assert state["expected"] != new_shape
    msg = _load_error(path)
    assert repr(name) in msg, msg
    assert str(tuple(new_shape)) in msg and str(tuple(state["expected"])) in msg, msg


def test_config_that_disagrees_with_the_tensors(saved, tmp_path):
    """The config is the contract: more layers than the checkpoint holds is a missing
    tensor, fewer experts an unexpected one, a wider latent a shape mismatch."""
    for change, pattern in [
        ({"num_hidden_layers": 4}, r"missing tensor 'model\.layers\.3\."),
        ({"n_routed_experts": 4, "n_group": 2, "topk_group": 2}, r"unexpected tensor 'model\.layers\.\d\.mlp\.experts\.[4-7]\."),
        ({"kv_lora_rank": 24}, r"tensor 'model\.layers\.0\.self_attn\.kv_a_layernorm\.weight' has shape \(20,\), "
                               r"config expects \(24,\)"),
    ]:
        path = _copy(saved[0], tmp_path, f"cfg{len(os.listdir(tmp_path))}")
        p = os.path.join(path, "config.json")
        with open(p) as f:
            c = json.load(f)
        c.update(change)
        with open(p, "w") as f:
            json.dump(c, f)
        msg = _load_error(path)
        assert re.search(pattern, msg), (change, msg)


def test_sharded_missing_tensor(saved, tmp_path):
    """Dropped from its shard and from the index: a missing tensor. Dropped from the shard
    only: the index names a tensor the shard lacks. Both messages name it."""
    name = "model.layers.1.mlp.gate.weight"
    for also_index in (True, False):
        path = _copy(saved[1], tmp_path, f"sharded_{also_index}")
        index_path = os.path.join(path, "model.safetensors.index.json")
        with open(index_path) as f:
            index = json.load(f)
        shard = index["weight_map"][name]
        _rewrite(os.path.join(path, shard), lambda t: {k: v for k, v in t.items() if k != name})
        if also_index:
            del index["weight_map"][name]
            with open(index_path, "w") as f:
                json.dump(index, f)
        msg = _load_error(path)
        assert repr(name) in msg, msg
        assert ("missing" in msg) if also_index else (shard in msg), msg


def test_sharded_misshaped_tensor_names_its_file(saved, tmp_path):
    path = _copy(saved[1], tmp_path)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    name = "model.layers.2.self_attn.o_proj.weight"
    shard = weight_map[name]
    _rewrite(os.path.join(path, shard), lambda t: {**t, name: np.zeros((48, 39), np.float32)})
    msg = _load_error(path)
    assert shard in msg and repr(name) in msg and "(48, 39)" in msg and "(48, 40)" in msg, msg


def test_fp8_scales_and_unscaled_fp8_weights_are_refused(saved, tmp_path):
    """from_pretrained does not dequantise: a `weight_scale_inv` is an unexpected tensor (the
    checkpoint is FP8; `dsv2 convert --dtype` dequantises it), and an FP8 weight without a
    scale, e4m3 or e5m2, is refused rather than read as its raw FP8 values."""
    import ml_dtypes

    path = _copy(saved[0], tmp_path)
    name = "model.layers.1.self_attn.o_proj.weight"
    _rewrite(os.path.join(path, "model.safetensors"), lambda t: {**t, name + "_scale_inv": np.ones((1, 1), np.float32)})
    msg = _load_error(path)
    assert "unexpected tensor" in msg and repr(name + "_scale_inv") in msg, msg
    for dt in (ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2):
        path = _copy(saved[0], tmp_path, f"unscaled_{np.dtype(dt).name}")
        _rewrite(os.path.join(path, "model.safetensors"), lambda t: {**t, name: t[name].astype(dt)})
        msg = _load_error(path)
        assert repr(name) in msg and "is FP8 (F8_E" in msg, msg
    # A checkpoint mostly in FP8 is refused before any tensor is read, with the way out:
    # `dsv2 convert --dtype` (`dtype=` would not help: loading does not dequantise).
    path = _copy(saved[0], tmp_path, "all_fp8")
    _rewrite(os.path.join(path, "model.safetensors"),
             lambda t: {k: v.astype(ml_dtypes.float8_e4m3fn) for k, v in t.items()})
    msg = _load_error(path)
    assert "most weights are FP8 (F8_E4M3)" in msg and "dsv2 convert" in msg and "--dtype" in msg, msg


def test_compute_dtype_is_honoured(saved):
    """from_pretrained(dtype=..., compute_dtype=...): parameters in one dtype, activations in
    the other, as asked (the default computes in the parameters' dtype)."""
    model = from_pretrained(saved[0], dtype="float32", compute_dtype="bfloat16")
    assert (model.cfg.param_dtype, model.cfg.dtype) == ("float32", "bfloat16")
    assert model.embed_tokens.weight[...].dtype == np.float32
    model = from_pretrained(saved[0], dtype="bfloat16")
    assert (model.cfg.param_dtype, model.cfg.dtype) == ("bfloat16", "bfloat16")
