"""`dsv2 convert`: HF <-> Orbax round trips (bit-exact), logits of converted models, plain-Orbax
restores onto meshes, FP8 dequantisation, every refused input, and the memory bound."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO

import ml_dtypes
import numpy as np
import pytest
import torch

import hf_reference as ref
from dsv2_jax import from_pretrained
from dsv2_jax.checkpoint import CheckpointError, convert, fp8, orbax_io
from dsv2_jax.checkpoint.safetensors_io import DTYPE_NAMES, SafetensorsDir, write_safetensors
from dsv2_jax.cli import main
from procenv import cpu_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*argv) -> int:
    return main(["convert", *map(str, argv)])


def _cli_err(*argv) -> tuple[int, str]:
    """`_cli` with its stderr captured (stdout dropped): (exit code, stderr)."""
    err = StringIO()
    with redirect_stderr(err), redirect_stdout(StringIO()):
        rc = _cli(*argv)
    return rc, err.getvalue()


def _mismatches(a_path, b_path) -> list[str]:
    """Tensors that differ between two HF directories in name, dtype, shape or any byte."""
    a, b = SafetensorsDir(str(a_path)), SafetensorsDir(str(b_path))
    bad = sorted(set(a.keys()) ^ set(b.keys()))
    for n in set(a.keys()) & set(b.keys()):
        if (a.dtype_name(n) != b.dtype_name(n) or a.shape(n) != b.shape(n)
                or a.get(n).tobytes() != b.get(n).tobytes()):
            bad.append(n)
    return bad


def _ids(vocab, seed=7, shape=(2, 11)):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def _no_leftovers(dst) -> bool:
    dst = str(dst)
    return not os.path.lexists(dst) and not glob.glob(os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.dsv2-*"))


def _read_tensors(path) -> dict:
    """Every tensor of the checkpoint directory `path`, by name, as host arrays."""
    st = SafetensorsDir(str(path))
    return {n: np.array(st.get(n)) for n in st.keys()}


def _write_tensors(path, arrays: dict, **kw) -> None:
    """{name: array} as the one .safetensors file `path` (replacing it), each tensor stored
    in its own dtype."""
    if os.path.exists(path):
        os.remove(path)
    write_safetensors(str(path), [(n, DTYPE_NAMES[a.dtype], a.shape) for n, a in arrays.items()],
                      arrays.__getitem__, **kw)


@pytest.fixture(scope="module")
def v2_bf16(tmp_path_factory):
    """A sharded bf16 checkpoint written by transformers' save_pretrained, and its model."""
    root = tmp_path_factory.mktemp("v2bf16")
    hf = ref.build(ref.V2, seed=2)
    path = ref.save(hf, str(root / "hf"), max_shard_size="20KB", dtype=torch.bfloat16)
    assert os.path.exists(os.path.join(path, SafetensorsDir.INDEX))
    assert len(glob.glob(os.path.join(path, "*.safetensors"))) > 3
    return path, hf


@pytest.fixture(scope="module")
def v2_orbax(v2_bf16, tmp_path_factory):
    dst = tmp_path_factory.mktemp("v2orbax") / "ob"
    assert _cli(v2_bf16[0], dst, "--to", "orbax") == 0
    return str(dst)


# ------------------------------------------------------------------------------------------
# Round trips and logits.


def test_roundtrip_bf16_sharded_is_bit_exact(v2_bf16, v2_orbax, tmp_path, capsys):
    src, _ = v2_bf16
    meta = json.load(open(os.path.join(v2_orbax, orbax_io.META_FILE)))
    assert meta["hf_dtypes"]["default"] == "BF16"
    reader = orbax_io.OrbaxParams(v2_orbax)
    # Our layout: stacked experts [L, E, D, F]; the router float32 (exactly widened).
    assert reader.shape(("segments", 1, "layers", "mlp", "experts", "gate_proj")) == (2, 8, 48, 24)
    assert reader.dtype(("segments", 1, "layers", "mlp", "gate", "kernel")) == np.float32
    assert reader.dtype(("embed_tokens", "weight")) == ml_dtypes.bfloat16
    back = tmp_path / "back"
    assert _cli(v2_orbax, back, "--to", "hf", "--shard-size", "30KB") == 0
    out = capsys.readouterr().out
    assert "tensors" in out and "MB/s" in out  # plain progress when not a TTY
    assert _mismatches(src, back) == []
    st = SafetensorsDir(str(back))
    assert st.dtype_name("model.layers.1.mlp.gate.weight") == "BF16"
    assert st.shape("model.layers.2.mlp.experts.7.down_proj.weight") == (48, 24)  # [out, in]
    index = json.load(open(back / SafetensorsDir.INDEX))
    assert index["metadata"]["total_size"] == st.total_bytes()
    assert len(set(index["weight_map"].values())) > 1
    cfg = json.load(open(back / "config.json"))
    assert cfg["model_type"] == "deepseek_v2" and cfg["architectures"] == ["DeepseekV2ForCausalLM"]
    assert "rope_scaling" in cfg and "rope_parameters" not in cfg and cfg["torch_dtype"] == "bfloat16"


def test_converted_models_give_the_reference_logits(v2_bf16, v2_orbax, tmp_path):
    """Orbax -> our model equals HF -> our model bit for bit; both match transformers; and
    transformers loads the exported directory and gives the original model's logits."""
    from transformers import DeepseekV2ForCausalLM

    src, _ = v2_bf16
    ids = _ids(ref.V2["vocab_size"])
    ours_orbax = np.asarray(from_pretrained(v2_orbax, dtype="float32")(ids.astype(np.int32)))
    ours_hf = np.asarray(from_pretrained(src, dtype="float32")(ids.astype(np.int32)))
    np.testing.assert_array_equal(ours_orbax, ours_hf)
    original = DeepseekV2ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    want = ref.logits(original, ids)
    assert ref.rel_err(ours_orbax, want) <= 1e-5
    back = tmp_path / "back"
    assert _cli(v2_orbax, back, "--to", "hf", "--no-progress") == 0
    exported = DeepseekV2ForCausalLM.from_pretrained(str(back), dtype=torch.float32).eval()
    np.testing.assert_array_equal(ref.logits(exported, ids), want)


def test_roundtrip_f32_official_yarn_config(tmp_path):
    kw = dict(ref.LITE, rope_parameters=dict(ref.YARN, mscale=0.707))
    hf = ref.build(kw, seed=4)
    src = ref.save(hf, str(tmp_path / "hf"), max_shard_size="40KB")
    ref.to_official_config(src)
    assert _cli(src, tmp_path / "ob", "--to", "orbax", "--no-progress") == 0
    ids = _ids(kw["vocab_size"], shape=(2, 30))  # past original_max_position_embeddings = 16
    model = from_pretrained(str(tmp_path / "ob"))
    assert model.cfg.param_dtype == "float32" and model.cfg.rope_type == "yarn"
    assert ref.rel_err(np.asarray(model(ids.astype(np.int32))), ref.logits(hf, ids)) <= 1e-5
    assert _cli(tmp_path / "ob", tmp_path / "back", "--to", "hf", "--no-progress") == 0
    assert _mismatches(src, tmp_path / "back") == []


def test_dtype_flag_casts_and_records(v2_bf16, v2_orbax, tmp_path):
    """--dtype float32 widens every tensor exactly; going back without --dtype restores the
    source's bf16 bit for bit; --dtype on the way out is honoured."""
    src, _ = v2_bf16
    assert _cli(src, tmp_path / "ob32", "--to", "orbax", "--dtype", "float32", "--no-progress") == 0
    r = orbax_io.OrbaxParams(str(tmp_path / "ob32"))
    assert r.dtype(("embed_tokens", "weight")) == np.float32
    assert _cli(tmp_path / "ob32", tmp_path / "back", "--to", "hf", "--no-progress") == 0
    assert _mismatches(src, tmp_path / "back") == []
    # config.json's torch_dtype names the tensors written, not the Orbax source's float32.
    assert json.load(open(tmp_path / "back" / "config.json"))["torch_dtype"] == "bfloat16"
    assert _cli(v2_orbax, tmp_path / "f32", "--to", "hf", "--dtype", "float32", "--no-progress") == 0
    assert json.load(open(tmp_path / "f32" / "config.json"))["torch_dtype"] == "float32"
    a, b = SafetensorsDir(src), SafetensorsDir(str(tmp_path / "f32"))
    for n in a.keys():
        assert b.dtype_name(n) == "F32"
        np.testing.assert_array_equal(b.get(n), a.get(n).astype(np.float32))


def test_written_dtype_names_the_dtype_of_most_bytes():
    """config.json's torch_dtype for a mixed export (e.g. float32 router weights beside
    bf16 experts) names the dtype most of the written bytes have, by bytes, not by count."""
    from types import SimpleNamespace as E

    entries = [E(hf_name="big", shape=(64, 64)), E(hf_name="gate", shape=(8, 64)),
               E(hf_name="norm", shape=(64,))]
    assert convert.written_dtype(entries, {"big": "BF16", "gate": "F32", "norm": "F32"}) == "bfloat16"
    assert convert.written_dtype(entries, {"big": "F32", "gate": "BF16", "norm": "BF16"}) == "float32"
    # 2 float32 tensors of 600 elements (4800 bytes) against 3 bf16 ones of 700 (4200 bytes)
    more = [E(hf_name=f"f{i}", shape=(600,)) for i in range(2)] + [E(hf_name=f"b{i}", shape=(700,)) for i in range(3)]
    targets = {e.hf_name: "F32" if e.hf_name[0] == "f" else "BF16" for e in more}
    assert convert.written_dtype(more, targets) == "float32"
    assert convert.written_dtype(entries[:1], {"big": "F16"}) == "float16"


def test_both_forms_of_a_checkpoint_compute_alike(v2_bf16, v2_orbax):
    """A bf16 HF checkpoint and its Orbax form load with the same parameter and compute
    dtypes, so they give the same logits bit for bit (the Orbax form once computed in
    float32 while the HF directory computed in bfloat16)."""
    src, _ = v2_bf16
    ids = _ids(ref.V2["vocab_size"]).astype(np.int32)
    a, b = from_pretrained(src), from_pretrained(v2_orbax)
    assert (a.cfg.param_dtype, a.cfg.dtype) == (b.cfg.param_dtype, b.cfg.dtype) == ("bfloat16", "bfloat16")
    np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))


def test_config_keys_not_the_models_travel_through_conversions(lite, tmp_path):
    """auto_map, a list of stop ids and other keys of the source's config.json reach the
    exported config.json through the Orbax form; quantization_config (describing tensors
    that were dequantised) and the writer's own keys do not."""
    path = os.path.join(lite, "config.json")
    raw = json.load(open(path))
    raw.update(auto_map={"AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"},
               eos_token_id=[5, 6], use_cache=True, transformers_version="0.0-test",
               quantization_config={"quant_method": "made-up"})
    json.dump(raw, open(path, "w"))
    assert _cli(lite, tmp_path / "ob", "--to", "orbax", "--no-progress") == 0
    assert _cli(tmp_path / "ob", tmp_path / "back", "--to", "hf", "--no-progress") == 0
    out = json.load(open(tmp_path / "back" / "config.json"))
    assert out["auto_map"] == raw["auto_map"] and out["use_cache"] is True
    assert out["eos_token_id"] == [5, 6]
    assert "quantization_config" not in out and out.get("transformers_version") != "0.0-test"
    assert _mismatches(lite, tmp_path / "back") == []


def test_refuses_a_silent_narrowing(tmp_path):
    """A checkpoint mostly bf16 with one float32 tensor: storing it as bf16 would round, so
    conversion without --dtype refuses, naming the tensor."""
    hf = ref.build(ref.LITE, seed=1)
    src = ref.save(hf, str(tmp_path / "hf"), dtype=torch.bfloat16)
    arrays = _read_tensors(src)
    arrays["model.norm.weight"] = arrays["model.norm.weight"].astype(np.float32) + np.float32(1e-3)
    _write_tensors(os.path.join(src, "model.safetensors"), arrays)
    err = _expect_refusal(src, tmp_path / "ob", "model.norm.weight")
    assert "--dtype float32" in err
    assert _cli(src, tmp_path / "ob", "--to", "orbax", "--dtype", "float32", "--no-progress") == 0
    assert _cli(tmp_path / "ob", tmp_path / "back", "--to", "hf", "--no-progress") == 0
    assert _mismatches(src, tmp_path / "back") == []  # the F32 tensor comes back F32


# ------------------------------------------------------------------------------------------
# Plain Orbax: our checkpoints restore with it (onto meshes), and its checkpoints export.


_MESH_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, jax, orbax.checkpoint as ocp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from flax import nnx
    from dsv2_jax.checkpoint import orbax_io
    from dsv2_jax.checkpoint.hf import _flat, abstract_model
    from dsv2_jax.config import DeepseekV2Config
    path = sys.argv[1]
    cfg = DeepseekV2Config.from_hf(path + "/config.json")
    _, abs_state = nnx.split(abstract_model(cfg))
    reader = orbax_io.OrbaxParams(path)
    for shape in ((2, 2), (4, 1), (1, 4)):
        mesh = Mesh(np.array(jax.devices()).reshape(shape), ("data", "expert"))
        def spec(p, v):
            if "experts" in p and "shared_experts" not in p:
                return P(None, "expert")          # experts split over the expert axis
            if len(v.shape) >= 2 and v.shape[-1] % shape[0] == 0:
                return P(*([None] * (len(v.shape) - 1)), "data")
            return P()
        flat = {tuple(p): v for p, v in _flat(abs_state).items()}
        # 1) plain Orbax: StandardCheckpointer with abstract leaves carrying NamedShardings
        target = orbax_io.nest({p: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                sharding=NamedSharding(mesh, spec(p, v))) for p, v in flat.items()})
        got = ocp.StandardCheckpointer().restore(path + "/params", target)
        # 2) our helper (what the trainer's --init-from uses)
        mine = orbax_io.restore_params(path, {p: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                       sharding=NamedSharding(mesh, spec(p, v))) for p, v in flat.items()})
        for p, v in flat.items():
            a = got
            for k in p:
                a = a[str(k)]
            want = reader.read(p)
            assert a.sharding == NamedSharding(mesh, spec(p, v)), p
            assert np.asarray(a).tobytes() == want.tobytes(), p
            assert np.asarray(mine[p]).tobytes() == want.tobytes(), p
            assert mine[p].sharding == a.sharding, p
    # 3) plain Orbax without a target: numpy leaves
    raw = ocp.PyTreeCheckpointer().restore(path + "/params")
    e = raw["segments"]["1"]["layers"]["mlp"]["experts"]["up_proj"]
    assert isinstance(e, np.ndarray) and e.tobytes() == reader.read(
        ("segments", 1, "layers", "mlp", "experts", "up_proj")).tobytes()
    print("MESH OK")
""")


def test_plain_orbax_restores_onto_meshes(v2_orbax):
    env = cpu_env(4, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, v2_orbax], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0 and "MESH OK" in r.stdout, r.stderr[-3000:]


def test_orbax_parameter_the_config_lacks_is_refused(tmp_path):
    """A checkpoint holding a parameter the config does not build (a layer more than
    num_hidden_layers says, a shared expert it lacks) is refused by name, as an HF checkpoint
    with an unexpected tensor is: restoring only the expected ones would silently load a
    different model than the one saved."""
    def arr(shape):
        a = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
        return orbax_io.StreamedArray(shape, np.dtype(np.float32), 0, lambda: [((), a)])

    path = str(tmp_path / "params")
    orbax_io.save_streamed(path, {"norm": {"weight": arr((4,))}, "extra": {"kernel": arr((2, 3))}})
    with pytest.raises(CheckpointError, match="unexpected parameter 'extra.kernel'"):
        orbax_io.check_params(path, {("norm", "weight"): (4,)})
    orbax_io.check_params(path, {("norm", "weight"): (4,), ("extra", "kernel"): (2, 3)})


def test_exports_a_checkpoint_written_by_plain_orbax(v2_bf16, tmp_path):
    """A checkpoint saved by Orbax's own handlers (e.g. by the trainer) converts to HF."""
    import orbax.checkpoint as ocp
    from flax import nnx
    from transformers import DeepseekV2ForCausalLM

    src, _ = v2_bf16
    model = from_pretrained(src, dtype="float32")
    d = tmp_path / "plain"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(str(d / "params"), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    ckptr.wait_until_finished()
    model.cfg.save(str(d))
    assert _cli(d, tmp_path / "hf", "--to", "hf", "--no-progress") == 0
    ids = _ids(ref.V2["vocab_size"])
    exported = DeepseekV2ForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert SafetensorsDir(str(tmp_path / "hf")).dtype_name("model.layers.1.mlp.gate.weight") == "F32"
    # Values are the bf16 originals widened: transformers on them equals transformers on src.
    original = DeepseekV2ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    np.testing.assert_array_equal(ref.logits(exported, ids), ref.logits(original, ids))


# ------------------------------------------------------------------------------------------
# FP8.


def _quantise(w: torch.Tensor, block):
    """Block-wise e4m3 quantisation as DeepSeek does it: scale = amax / 448 per block."""
    out, inp = w.shape
    bo, bi = block
    so, si = -(-out // bo), -(-inp // bi)
    scale = torch.empty(so, si)
    q = torch.empty(out, inp, dtype=torch.float8_e4m3fn)
    for i in range(so):
        for j in range(si):
            blk = w[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi].float()
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * bo:(i + 1) * bo, j * bi:(j + 1) * bi] = (blk / s).to(torch.float8_e4m3fn)
    return q, scale


def _torch_dequant(q: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    bo, bi = block
    full = scale.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[: q.shape[0], : q.shape[1]]
    return q.to(torch.float32) * full


def _np(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy()


def test_fp8_dequantise_matches_torch_with_partial_blocks():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g) * 0.05
    q, s = _quantise(w, (128, 128))
    want = _torch_dequant(q, s, (128, 128))
    got = fp8.dequantize(_np(q), s.numpy(), (128, 128), np.float32)
    np.testing.assert_array_equal(got, want.numpy())
    got16 = fp8.dequantize(_np(q), s.numpy(), (128, 128), ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got16.view(np.int16), _np(want.to(torch.bfloat16)).view(np.int16))
    with pytest.raises(CheckpointError):  # a mis-shaped scale is refused
        fp8.dequantize(_np(q), s.numpy()[:, :1], (128, 128))

def test_fp8_dequantise_with_oblong_blocks():
    """quantization_config.weight_block_size need not be square: a row takes the scale of
    its row block, a column that of its column block (partial edge blocks included)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(100, 70, generator=g) * 0.05
    for block in ((32, 16), (16, 48)):
        q, s = _quantise(w, block)
        got = fp8.dequantize(_np(q), s.numpy(), block, np.float32)
        np.testing.assert_array_equal(got, _torch_dequant(q, s, block).numpy(), err_msg=str(block))


def _fp8_checkpoint(root, block=(8, 8)):
    """The V2 toy model's checkpoint with every 2-D projection weight quantised block-wise to
    e4m3 (the DeepSeek FP8 layout; router, norms, embeddings and head stay bf16), the
    reference dequantisation of every tensor (torch), and a transformers model holding it."""
    from transformers import DeepseekV2ForCausalLM

    hf = ref.build(ref.V2, seed=9)
    plain = ref.save(hf, str(root / "plain"))
    st = SafetensorsDir(plain)
    tensors, dequant = {}, {}
    for n in st.keys():
        t = torch.from_numpy(np.array(st.get(n)))
        if n.endswith("proj.weight") or n.endswith("proj_with_mqa.weight"):
            q, s = _quantise(t, block)
            tensors[n], tensors[n + "_scale_inv"] = _np(q), s.numpy()
            dequant[n] = _torch_dequant(q, s, block)
        else:
            tensors[n] = _np(t.to(torch.bfloat16))
            dequant[n] = t.to(torch.bfloat16).float()
    path = str(root / "fp8")
    os.makedirs(path)
    c = json.load(open(os.path.join(plain, "config.json")))
    c["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": list(block)}
    json.dump(c, open(os.path.join(path, "config.json"), "w"))
    _write_tensors(os.path.join(path, "model.safetensors"), tensors)
    # The dequantised model, loaded by transformers from its own checkpoint.
    _write_tensors(os.path.join(plain, "model.safetensors"), {n: t.numpy() for n, t in dequant.items()},
                   metadata={"format": "pt"})
    model = DeepseekV2ForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    return path, model, dequant


def test_fp8_checkpoint_is_dequantised_when_asked(tmp_path):
    path, hf, dequant = _fp8_checkpoint(tmp_path)
    err = _expect_refusal(path, tmp_path / "ob", "FP8")
    assert "--dtype" in err and "8x8" in err
    assert _cli(path, tmp_path / "ob", "--to", "orbax", "--dtype", "float32", "--no-progress") == 0
    ids = _ids(ref.V2["vocab_size"])
    ours = np.asarray(from_pretrained(str(tmp_path / "ob"))(ids.astype(np.int32)))
    assert ref.rel_err(ours, ref.logits(hf, ids)) <= 1e-5
    assert _cli(tmp_path / "ob", tmp_path / "back", "--to", "hf", "--no-progress") == 0
    st = SafetensorsDir(str(tmp_path / "back"))
    assert not any(n.endswith("_scale_inv") for n in st.keys())
    for n, want in dequant.items():
        np.testing.assert_array_equal(st.get(n).astype(np.float32), want.numpy(), err_msg=n)
    # HF -> HF straight to bf16, as DeepSeek's own fp8 -> bf16 script does.
    assert _cli(path, tmp_path / "bf16", "--to", "hf", "--dtype", "bfloat16", "--no-progress") == 0
    st = SafetensorsDir(str(tmp_path / "bf16"))
    n = "model.layers.1.mlp.experts.3.up_proj.weight"
    np.testing.assert_array_equal(st.get(n).view(np.int16), _np(dequant[n].to(torch.bfloat16)).view(np.int16))


def test_fp8_without_scale_is_refused(tmp_path):
    path, _, _ = _fp8_checkpoint(tmp_path)
    arrays = _read_tensors(path)
    del arrays["model.layers.0.mlp.up_proj.weight_scale_inv"]
    _write_tensors(os.path.join(path, "model.safetensors"), arrays)
    err = _expect_refusal(path, tmp_path / "ob", "model.layers.0.mlp.up_proj.weight", "--dtype", "float32")
    assert "scale" in err


# ------------------------------------------------------------------------------------------
# Bad input: one line naming the file or tensor, non-zero exit, nothing left at DST.


@pytest.fixture
def lite(tmp_path):
    hf = ref.build(ref.LITE, seed=3)
    return ref.save(hf, str(tmp_path / "hf"), max_shard_size="30KB")


def _expect_refusal(src, dst, needle, *extra, to="orbax"):
    """Runs the CLI in-process; checks the exit code, the single stderr line (naming
    `needle`), and that neither DST nor a temporary sibling exists."""
    err, out = StringIO(), StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        rc = _cli(src, dst, "--to", to, *extra)
    msg = err.getvalue()
    assert rc != 0, out.getvalue()
    assert msg.count("\n") == 1 and msg.startswith("dsv2 convert: error: "), msg
    assert "Traceback" not in msg
    assert needle in msg, msg
    assert _no_leftovers(dst)
    return msg


def _shards(path):
    return json.load(open(os.path.join(path, SafetensorsDir.INDEX)))["weight_map"]


def test_truncated_shard(lite, tmp_path):
    shard = sorted(set(_shards(lite).values()))[1]
    p = os.path.join(lite, shard)
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 100)
    _expect_refusal(lite, tmp_path / "ob", shard)


def test_corrupted_shard_header(lite, tmp_path):
    shard = sorted(set(_shards(lite).values()))[0]
    p = os.path.join(lite, shard)
    with open(p, "r+b") as f:
        f.seek(12)
        f.write(b"\x00garbage\xff")
    _expect_refusal(lite, tmp_path / "ob", shard)


def test_missing_shard(lite, tmp_path):
    shard = sorted(set(_shards(lite).values()))[-1]
    os.remove(os.path.join(lite, shard))
    _expect_refusal(lite, tmp_path / "ob", shard)


def test_index_names_a_tensor_its_shard_lacks(lite, tmp_path):
    wm = _shards(lite)
    shards = sorted(set(wm.values()))
    name = next(n for n, s in wm.items() if s == shards[0])
    wm[name] = shards[1]
    json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(lite, SafetensorsDir.INDEX), "w"))
    _expect_refusal(lite, tmp_path / "ob", name)


def test_unknown_model_type(lite, tmp_path):
    p = os.path.join(lite, "config.json")
    c = json.load(open(p))
    c["model_type"] = "llama"
    json.dump(c, open(p, "w"))
    msg = _expect_refusal(lite, tmp_path / "ob", "config.json")
    assert "llama" in msg


def test_config_disagrees_with_shapes(lite, tmp_path):
    p = os.path.join(lite, "config.json")
    c = json.load(open(p))
    c["moe_intermediate_size"] += 1
    json.dump(c, open(p, "w"))
    msg = _expect_refusal(lite, tmp_path / "ob", ".safetensors: tensor 'model.layers.1.mlp.")
    assert "config expects" in msg


def _rewrite(path, drop=(), add=None):
    """Rewrites a sharded checkpoint without some tensors / with extra ones (index kept true)."""
    st = SafetensorsDir(path)
    wm = _shards(path)
    by_shard: dict = {}
    for n, s in wm.items():
        if n not in drop:
            by_shard.setdefault(s, []).append(n)
    if add:
        by_shard[sorted(by_shard)[0]] += list(add)
    data = {n: np.array(st.get(n)) for s in by_shard for n in by_shard[s] if n in st.where}
    data.update(add or {})
    for s, names in by_shard.items():
        os.remove(os.path.join(path, s))
        write_safetensors(os.path.join(path, s), [(n, "F32", data[n].shape) for n in names], data.__getitem__)
    json.dump({"metadata": {}, "weight_map": {n: s for s, ns in by_shard.items() for n in ns}},
              open(os.path.join(path, SafetensorsDir.INDEX), "w"))


def test_missing_tensor(lite, tmp_path):
    _rewrite(lite, drop={"model.layers.2.mlp.experts.5.down_proj.weight"})
    _expect_refusal(lite, tmp_path / "ob", "model.layers.2.mlp.experts.5.down_proj.weight")


def test_unexpected_tensor(lite, tmp_path):
    _rewrite(lite, add={"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)})
    _expect_refusal(lite, tmp_path / "ob", "rotary_emb.inv_freq")


def test_destination_exists_needs_overwrite(lite, tmp_path):
    dst = tmp_path / "ob"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    rc, err = _cli_err(lite, dst, "--to", "orbax")
    assert rc == 1
    assert str(dst) in err and "--overwrite" in err
    assert (dst / "keep.txt").exists()  # untouched
    assert _cli(lite, dst, "--to", "orbax", "--overwrite", "--no-progress") == 0
    assert not (dst / "keep.txt").exists() and orbax_io.is_orbax_checkpoint(str(dst))
    assert not glob.glob(str(tmp_path / ".ob.dsv2-*"))


def test_orbax_source_disagreeing_with_its_config(v2_orbax, tmp_path):
    src = tmp_path / "ob"
    shutil.copytree(v2_orbax, src)
    c = json.load(open(src / "config.json"))
    c["moe_intermediate_size"] += 2
    json.dump(c, open(src / "config.json", "w"))
    msg = _expect_refusal(src, tmp_path / "hf", "'segments.1.layers.mlp.", to="hf")
    assert "config expects" in msg


def test_failure_midway_leaves_nothing(lite, tmp_path, monkeypatch):
    calls = {"n": 0}
    orig = convert.HFSource.read

    def flaky(self, e, dtype):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError(28, "No space left on device")
        return orig(self, e, dtype)

    monkeypatch.setattr(convert.HFSource, "read", flaky)
    _expect_refusal(lite, tmp_path / "ob", "No space left on device")
    assert calls["n"] == 20


# ------------------------------------------------------------------------------------------
# Memory: bounded by the largest tensor and the commit size, not the checkpoint size.


def _bench():
    spec = importlib.util.spec_from_file_location("convert_memory_bench",
                                                  os.path.join(ROOT, "scripts", "convert_memory_bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peak_memory_does_not_grow_with_checkpoint_size(tmp_path):
    bench = _bench()
    kw = dict(hidden=256, moe_inter=512, experts=16, vocab=2048, inter=1024)
    commit = 2 << 20
    runs = {}
    for layers in (2, 18):
        hf = str(tmp_path / f"hf{layers}")
        gen = bench.generate(hf, bench.bench_config(layers, **kw), shard_bytes=40 << 20)
        runs[layers] = dict(gen=gen,
                            orbax=bench.measure(hf, str(tmp_path / f"ob{layers}"), "orbax", commit),
                            hf=bench.measure(str(tmp_path / f"ob{layers}"), str(tmp_path / f"back{layers}"), "hf"))
        assert bench.compare(hf, str(tmp_path / f"back{layers}"))[0] == 0
    small, big = runs[2], runs[18]
    grow = big["gen"]["bytes"] - small["gen"]["bytes"]
    largest = big["gen"]["largest_tensor"]
    assert largest == small["gen"]["largest_tensor"] and grow > 150e6
    for d in ("orbax", "hf"):
        extra_small = small[d]["peak_rss"] - small[d]["baseline_rss"]
        extra_big = big[d]["peak_rss"] - big[d]["baseline_rss"]
        print(f"{d}: {small['gen']['bytes'] / 1e6:.0f} MB -> +{extra_small / 1e6:.0f} MB RSS; "
              f"{big['gen']['bytes'] / 1e6:.0f} MB -> +{extra_big / 1e6:.0f} MB RSS")
        assert extra_big - extra_small < 0.1 * grow, (d, extra_small, extra_big)
        assert extra_big < 100e6 + 8 * max(largest, commit), (d, extra_big)
    # The measurement can fail: one OCDBT transaction for the whole checkpoint holds all of it
    # (zstd-compressed, as tensorstore encodes chunks that are fully overwritten).
    unbounded = bench.measure(str(tmp_path / "hf18"), str(tmp_path / "ob_unbounded"), "orbax", 1 << 40)
    extra_unbounded = unbounded["peak_rss"] - unbounded["baseline_rss"]
    print(f"one transaction: +{extra_unbounded / 1e6:.0f} MB RSS")
    assert extra_unbounded - (big["orbax"]["peak_rss"] - big["orbax"]["baseline_rss"]) > 0.3 * grow


def test_training_workdir_exports_to_hf(tmp_path):
    """`dsv2 convert WORKDIR DST --to hf` exports the newest training checkpoint's parameters;
    transformers loads them and gives our logits."""
    from transformers import DeepseekV2ForCausalLM

    from dsv2_jax.train.loop import TrainArgs, train

    wd = tmp_path / "run"
    train(TrainArgs(config="tiny", workdir=str(wd), steps=2, checkpoint_every=1, batch_size=2,
                    seq_len=32, log_every=1000, set=["num_hidden_layers=2"]))
    ours = from_pretrained(str(wd))
    assert _cli(wd, tmp_path / "hf", "--to", "hf", "--no-progress") == 0
    exported = DeepseekV2ForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    ids = _ids(256, shape=(2, 9))
    assert ref.rel_err(ref.logits(exported, ids), np.asarray(ours(ids.astype(np.int32)))) <= 1e-5


def test_index_naming_a_shard_outside_the_directory_is_refused(lite, tmp_path):
    wm = _shards(lite)
    name = sorted(wm)[0]
    outside = tmp_path / "outside.safetensors"
    shutil.copy(os.path.join(lite, wm[name]), outside)
    wm[name] = "../outside.safetensors"
    json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(lite, SafetensorsDir.INDEX), "w"))
    _expect_refusal(lite, tmp_path / "ob", "not a file name inside")


def test_wrongly_typed_index_is_refused_naming_it(lite, tmp_path):
    json.dump([1, 2], open(os.path.join(lite, SafetensorsDir.INDEX), "w"))
    _expect_refusal(lite, tmp_path / "ob", SafetensorsDir.INDEX)


def test_overlapping_tensors_in_a_shard_are_refused(tmp_path):
    import struct

    src = tmp_path / "hf"
    src.mkdir()
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(src / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    with pytest.raises(CheckpointError, match="overlapping or gapped"):
        SafetensorsDir(str(src))


def test_destination_appearing_during_the_conversion_is_not_replaced(lite, tmp_path, monkeypatch):
    dst = tmp_path / "ob"
    real = convert._copy_aux_files

    def and_then_someone_creates_dst(src, tmp):
        out = real(src, tmp)
        os.makedirs(dst / "precious")
        return out

    monkeypatch.setattr(convert, "_copy_aux_files", and_then_someone_creates_dst)
    rc, err = _cli_err(lite, dst, "--to", "orbax")
    assert rc == 1
    assert "appeared while converting" in err
    assert os.path.isdir(dst / "precious")
    assert not glob.glob(str(tmp_path / ".ob.dsv2-*"))


def test_only_known_aux_files_travel_and_links_out_are_not_followed(lite, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not publish")
    os.symlink(secret, os.path.join(lite, "tokenizer.json"))
    with open(os.path.join(lite, "notes.txt"), "w") as f:
        f.write("private")
    with open(os.path.join(lite, "tokenizer_config.json"), "w") as f:
        f.write("{}")
    dst = tmp_path / "ob"
    assert _cli(lite, dst, "--to", "orbax", "--no-progress") == 0
    assert os.path.exists(dst / "tokenizer_config.json")
    assert not os.path.exists(dst / "tokenizer.json") and not os.path.exists(dst / "notes.txt")


def test_temporaries_of_killed_conversions_are_cleaned(lite, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".ob.dsv2-tmp-{dead}"
    (stale / "params").mkdir(parents=True)
    assert _cli(lite, tmp_path / "ob", "--to", "orbax", "--no-progress") == 0
    assert not stale.exists()


# ------------------------------------------------------------------------------------------
# Output layout, progress, and what travels with a checkpoint (mutation round 6).


def test_hf_shards_fill_up_to_the_shard_size_and_carry_transformers_names(v2_orbax, tmp_path):
    """--shard-size is the largest a shard may be, not one byte less: a limit equal to the
    model's bytes gives one file, one byte less two (the last tensor alone in the second).
    The files are named as transformers names them (model-00001-of-00002.safetensors,
    counting from 1), and every shard keeps under the limit."""
    assert _cli(v2_orbax, tmp_path / "whole", "--to", "hf", "--no-progress", "--shard-size", "1TB") == 0
    total = SafetensorsDir(str(tmp_path / "whole")).total_bytes()
    for limit, names in ((total, ["model-00001-of-00001.safetensors"]),
                         (total - 1, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])):
        out = tmp_path / f"s{limit}"
        assert _cli(v2_orbax, out, "--to", "hf", "--no-progress", "--shard-size", f"{limit}B") == 0
        assert sorted(set(_shards(out).values())) == names, limit
        st = SafetensorsDir(str(out))
        assert all(sum(e[3] - e[2] for e in st.files[n].entries.values()) <= limit for n in names)
        assert _mismatches(tmp_path / "whole", out) == []


def test_plain_progress_counts_tensors_and_reports_every_tenth(capsys):
    """Off a terminal, progress is a header and a line each time another tenth of the bytes
    is done, counting the tensors written so far: a tensor that jumps past several tenths
    gives one line, not one per tenth crossed spread over the tensors after it."""
    bar = convert.Progress(4, 100, "src -> orbax")
    for name, nbytes in (("a", 35), ("b", 2), ("c", 13), ("d", 50)):
        bar.tensor(name, nbytes)
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "src -> orbax: 4 tensors, 0.00 GB"
    assert [line.split(",")[0].strip() for line in lines[1:]] == ["1/4 tensors", "3/4 tensors", "4/4 tensors"]
    convert.Progress(4, 100, "quiet", enabled=False).tensor("a", 100)
    assert capsys.readouterr().out == ""


def test_sizes_take_decimal_and_binary_units_in_any_case():
    """--shard-size and plan's --device-memory: KB/MB/GB/TB are powers of 10, KiB/... of 2,
    as `du --si` and `du` count them; units in any case, a bare number is bytes."""
    assert convert.parse_size("30KB") == 30_000 and convert.parse_size("30kb") == 30_000
    assert convert.parse_size("2GiB") == 2 << 30 and convert.parse_size("2 gib") == 2 << 30
    assert convert.parse_size("1.5MB") == 1_500_000 and convert.parse_size("7") == 7
    assert convert.parse_size("1TB") == 10**12 and convert.parse_size("1MiB") == 1 << 20
    with pytest.raises(ValueError, match="not a size"):
        convert.parse_size("-5MB")


def test_destination_inside_or_around_the_source_is_refused(lite, tmp_path):
    """DST inside SRC, or SRC inside DST (which --overwrite would delete on the way), is
    refused before anything is written, and the source is left as it was."""
    before = sorted(os.listdir(lite))
    _expect_refusal(lite, os.path.join(lite, "ob"), "overlaps the source")
    rc, err = _cli_err(lite, tmp_path, "--to", "orbax", "--overwrite")
    assert rc == 1
    assert "overlaps the source" in err
    assert sorted(os.listdir(lite)) == before and _mismatches(lite, lite) == []


def test_sigterm_midway_exits_130_and_leaves_nothing(lite, tmp_path, monkeypatch):
    """SIGTERM (a scheduler's kill) cleans up as Ctrl-C does: exit 130, one line saying DST
    was not written, no DST and no temporary; the previous SIGTERM handler is restored."""
    import signal

    calls = {"n": 0}
    orig = convert.HFSource.read

    def killed(self, e, dtype):
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(self, e, dtype)

    monkeypatch.setattr(convert.HFSource, "read", killed)
    before = signal.getsignal(signal.SIGTERM)
    rc, err = _cli_err(lite, tmp_path / "ob", "--to", "orbax")
    assert rc == 130
    assert f"interrupted; {tmp_path / 'ob'} not written" in err
    assert _no_leftovers(tmp_path / "ob") and signal.getsignal(signal.SIGTERM) is before


def test_a_swap_that_died_half_way_gives_the_old_checkpoint_back(lite, tmp_path):
    """A conversion with --overwrite killed between moving the old DST aside and moving the
    new one in leaves only `.DST.dsv2-old-PID`: the next conversion puts it back at DST
    (and, without --overwrite, refuses to replace it before converting anything), rather
    than deleting the user's checkpoint as a stale temporary."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    old = tmp_path / f".ob.dsv2-old-{dead}"
    old.mkdir()
    (old / "precious.txt").write_text("the checkpoint from before")
    rc, err = _cli_err(lite, tmp_path / "ob", "--to", "orbax")
    assert rc == 1
    assert "already exists (pass --overwrite" in err  # not "appeared while converting"
    assert (tmp_path / "ob" / "precious.txt").read_text() == "the checkpoint from before"
    assert not glob.glob(str(tmp_path / ".ob.dsv2-*"))


def test_the_files_of_a_hub_snapshot_travel(lite, tmp_path):
    """The Hugging Face cache keeps a snapshot's files as links into its blobs/ folder: those
    are followed (the tokenizer and the generation settings reach DST with their contents),
    and every known auxiliary file travels beside the weights."""
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "3f2a").write_text('{"model": "bpe"}')
    os.symlink(blobs / "3f2a", os.path.join(lite, "tokenizer.json"))
    aux = {"generation_config.json": '{"do_sample": true}', "tokenizer.model": "sp",
           "special_tokens_map.json": "{}", "chat_template.jinja": "{{ x }}", "modeling_deepseek.py": "#",
           "README.md": "card", "LICENSE": "terms"}
    for name, text in aux.items():
        with open(os.path.join(lite, name), "w") as f:
            f.write(text)
    dst = tmp_path / "ob"
    assert _cli(lite, dst, "--to", "orbax", "--no-progress") == 0
    assert (dst / "tokenizer.json").read_text() == '{"model": "bpe"}' and not os.path.islink(dst / "tokenizer.json")
    for name, text in aux.items():
        assert (dst / name).read_text() == text, name
    assert _cli(dst, tmp_path / "back", "--to", "hf", "--no-progress") == 0
    assert (tmp_path / "back" / "generation_config.json").read_text() == aux["generation_config.json"]


def test_dtype_flag_on_an_orbax_source_sets_the_compute_dtype_too(v2_orbax, tmp_path):
    """--dtype casts the parameters and makes the checkpoint compute in that dtype, whatever
    the source: an Orbax source cast to float32 loads as float32 / float32 (not float32
    weights computing in the source's bfloat16), as the same cast of its HF form does."""
    assert convert.convert(v2_orbax, str(tmp_path / "ob32"), "orbax", dtype="float32", progress=False)
    assert convert.convert(v2_orbax, str(tmp_path / "hf32"), "hf", dtype="float32", progress=False)
    via_orbax = from_pretrained(str(tmp_path / "ob32")).cfg
    via_hf = from_pretrained(str(tmp_path / "hf32")).cfg
    assert (via_orbax.param_dtype, via_orbax.dtype) == (via_hf.param_dtype, via_hf.dtype) == ("float32", "float32")


def test_export_back_to_bf16_refuses_values_bf16_cannot_hold(v2_bf16, v2_orbax, tmp_path):
    """An Orbax checkpoint from a bf16 HF source exports back to bf16 (the dtype it had)
    only while that is exact: once a float32 parameter holds a value bf16 cannot (weights
    trained in float32), the export refuses, naming the tensor, unless --dtype chooses."""
    import orbax.checkpoint as ocp
    from flax import nnx

    model = from_pretrained(v2_orbax, dtype="float32")
    model.norm.weight[...] = model.norm.weight[...] + 1e-3
    d = tmp_path / "trained"
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(str(d / "params"), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    ckptr.wait_until_finished()
    model.cfg.save(str(d))
    shutil.copy(os.path.join(v2_orbax, orbax_io.META_FILE), d)  # hf_dtypes: BF16
    err = _expect_refusal(d, tmp_path / "hf", "'model.norm.weight' holds values not exactly representable", to="hf")
    assert "BF16" in err and "--dtype" in err
    assert _cli(d, tmp_path / "hf", "--to", "hf", "--dtype", "float32", "--no-progress") == 0
    assert SafetensorsDir(str(tmp_path / "hf")).dtype_name("model.norm.weight") == "F32"


def test_no_progress_prints_nothing(lite, tmp_path, capsys):
    assert _cli(lite, tmp_path / "ob", "--to", "orbax", "--no-progress") == 0
    assert capsys.readouterr().out == ""


def test_a_scale_beside_a_weight_that_is_not_fp8_is_refused(lite, tmp_path):
    """A `weight_scale_inv` whose weight is bf16 or float32 is refused by name, in an FP8
    checkpoint (where scales are expected, and ignoring this one would load its weight
    unscaled) and in a plain one."""
    path, _, _ = _fp8_checkpoint(tmp_path)
    stray = "model.layers.1.mlp.gate.weight_scale_inv"  # the router stays bf16
    _write_tensors(os.path.join(path, "model.safetensors"),
                   {**_read_tensors(path), stray: np.ones((1, 6), np.float32)})
    err = _expect_refusal(path, tmp_path / "ob", f"{stray!r} scales no FP8 tensor", "--dtype", "float32")
    assert "BF16" in err
    _rewrite(lite, add={"model.norm.weight_scale_inv": np.ones((1,), np.float32)})
    _expect_refusal(lite, tmp_path / "ob2", "'model.norm.weight_scale_inv' scales no FP8 tensor")


def test_destination_that_is_a_file_is_refused_before_converting(lite, tmp_path):
    dst = tmp_path / "ob"
    dst.write_text("not a checkpoint")
    rc, err = _cli_err(lite, dst, "--to", "orbax")
    assert rc == 1
    assert "already exists (pass --overwrite" in err and dst.read_text() == "not a checkpoint"


def test_overwrite_puts_the_old_destination_back_when_the_swap_fails(lite, tmp_path, monkeypatch):
    """--overwrite moves the old DST aside, then the new one in; when that second move
    fails (here: injected), the old DST is moved back, and nothing else is left."""
    dst = tmp_path / "ob"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    real = os.rename

    def rename(a, b):
        if os.path.basename(str(a)).startswith(".ob.dsv2-tmp-") and str(b) == str(dst):
            raise OSError(5, "Input/output error")
        return real(a, b)

    monkeypatch.setattr(os, "rename", rename)
    rc, err = _cli_err(lite, dst, "--to", "orbax", "--overwrite")
    assert rc == 1
    assert "Input/output error" in err
    assert (dst / "keep.txt").read_text() == "old" and sorted(os.listdir(dst)) == ["keep.txt"]
    assert not glob.glob(str(tmp_path / ".ob.dsv2-*"))


def test_api_refuses_an_unknown_format_or_dtype_before_reading(tmp_path):
    """convert() called from Python (no argparse choices to stop it) refuses a --to or
    --dtype it does not know, before looking at SRC."""
    with pytest.raises(CheckpointError, match="--to 'safetensors': expected 'orbax' or 'hf'"):
        convert.convert(str(tmp_path / "absent"), str(tmp_path / "out"), "safetensors")
    with pytest.raises(CheckpointError, match=r"--dtype 'int8': expected one of \['bfloat16', 'float16', 'float32'\]"):
        convert.convert(str(tmp_path / "absent"), str(tmp_path / "out"), "orbax", dtype="int8")
    assert not os.path.exists(tmp_path / "out")


def test_an_auxiliary_file_too_large_to_be_one_stays_behind(lite, tmp_path):
    """A file with a tokenizer's name but over 100 MiB (sparse here: nothing is written) is
    not one: it is not copied into DST."""
    with open(os.path.join(lite, "tokenizer.model"), "wb") as f:
        f.truncate(convert._AUX_MAX_BYTES + 1)
    with open(os.path.join(lite, "tokenizer_config.json"), "w") as f:
        f.write("{}")
    assert _cli(lite, tmp_path / "ob", "--to", "orbax", "--no-progress") == 0
    assert os.path.exists(tmp_path / "ob" / "tokenizer_config.json")
    assert not os.path.exists(tmp_path / "ob" / "tokenizer.model")


def _raw_safetensors(path, header: dict, data: bytes) -> None:
    """A .safetensors file written byte by byte (header as given, padded to 8 bytes)."""
    import struct

    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header,data,why", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}}, 24, "overlapping or gapped"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12, "truncated or corrupted safetensors file"),  # 4 trailing bytes
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 12]}}, 12, "do not match shape (2,) F32"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"format": "pt"}}, 8, None),
])
def test_shard_data_must_be_tiled_exactly_by_its_tensors(tmp_path, header, data, why):
    """Every byte of a shard's data belongs to exactly one tensor of the size its shape and
    dtype say: a gap, trailing bytes or a tensor whose byte range disagrees with its shape
    mean a damaged or foreign file and are refused naming it; the metadata entry is not a
    tensor."""
    path = str(tmp_path / "model.safetensors")
    _raw_safetensors(path, header, b"\0" * data)
    if why is None:
        assert list(SafetensorsDir(str(tmp_path)).keys()) == ["a"]
        return
    with pytest.raises(CheckpointError, match=re.escape(why)) as e:
        SafetensorsDir(str(tmp_path))
    assert path in str(e.value)


def test_a_tensor_in_two_shards_and_an_empty_checkpoint_are_refused(tmp_path):
    """A tensor stored in a shard the index does not assign it to (here: in both shards) is
    refused naming that shard, not silently shadowed; a checkpoint without tensors is
    refused as such."""
    x = {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    _raw_safetensors(str(tmp_path / "s1.safetensors"), {**x, "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
                     b"\0" * 8)
    _raw_safetensors(str(tmp_path / "s2.safetensors"), x, b"\0" * 4)
    json.dump({"weight_map": {"x": "s2.safetensors", "y": "s1.safetensors"}},
              open(tmp_path / SafetensorsDir.INDEX, "w"))
    with pytest.raises(CheckpointError, match=r"s1\.safetensors: tensor 'x' is not listed for this shard"):
        SafetensorsDir(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    _raw_safetensors(str(empty / "model.safetensors"), {"__metadata__": {"format": "pt"}}, b"")
    with pytest.raises(CheckpointError, match="holds no tensors"):
        SafetensorsDir(str(empty))


def test_dominant_dtype_counts_bytes_not_tensors(tmp_path):
    """The parameter dtype a checkpoint defaults to is the dtype most of its bytes have: one
    large float32 tensor outweighs three small bf16 ones."""
    arrays = {"big": np.zeros((64, 16), np.float32), **{f"s{i}": np.zeros(8, ml_dtypes.bfloat16) for i in range(3)}}
    _write_tensors(tmp_path / "model.safetensors", arrays)
    assert SafetensorsDir(str(tmp_path)).dominant_dtype() == "F32"


def test_writer_aligns_the_data_and_refuses_a_tensor_unlike_its_header(tmp_path):
    """The header is padded so the data starts on an 8-byte boundary (as the reference
    writer does, keeping memory-mapped tensors aligned); an array produced with another
    dtype or shape than its header entry is refused, never written as mismatched bytes."""
    import struct

    path = str(tmp_path / "model.safetensors")
    for name in ("a", "ab", "abc", "abcd", "abcde", "abcdef", "abcdefg", "abcdefgh"):  # every remainder
        write_safetensors(path, [(name, "F32", (3,))], lambda n: np.arange(3, dtype=np.float32))
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        assert (8 + n) % 8 == 0, name
        assert SafetensorsDir(str(tmp_path)).get(name).tolist() == [0, 1, 2]
    with pytest.raises(CheckpointError, match="'a' is float64"):
        write_safetensors(path, [("a", "F32", (3,))], lambda n: np.zeros(3, np.float64))
    with pytest.raises(CheckpointError, match=r"'a' is float32\(4,\), expected F32\(3,\)"):
        write_safetensors(path, [("a", "F32", (3,))], lambda n: np.zeros(4, np.float32))


def test_float16_tensors_read_as_float16(tmp_path):
    """Each safetensors dtype maps to its numpy dtype: a float16 checkpoint written by
    transformers reads back as transformers' own values (bfloat16, the same width, would
    read other numbers from the same bytes)."""
    hf = ref.build(ref.LITE, seed=5)
    src = ref.save(hf, str(tmp_path / "hf16"), dtype=torch.float16)
    st = SafetensorsDir(src)
    want = {k: v.to(torch.float16).numpy() for k, v in hf.state_dict().items()}
    n = "model.layers.0.self_attn.o_proj.weight"
    assert st.dtype_name(n) == "F16" and st.get(n).dtype == np.float16
    np.testing.assert_array_equal(st.get(n), want[n])


def test_fp8_checkpoint_with_oblong_blocks_dequantises_rows_and_columns_by_their_own_block(tmp_path):
    """weight_block_size [8, 16] is 8 rows by 16 columns (quantization_config lists the
    output dimension first): each weight dequantises as the reference does, and the same
    checkpoint stated with the block the other way round is refused (its scales no longer
    fit)."""
    path, _, dequant = _fp8_checkpoint(tmp_path, block=(8, 16))
    assert _cli(path, tmp_path / "hf32", "--to", "hf", "--dtype", "float32", "--no-progress") == 0
    st = SafetensorsDir(str(tmp_path / "hf32"))
    for n, want in dequant.items():
        np.testing.assert_array_equal(st.get(n), want.numpy(), err_msg=n)
    c = json.load(open(os.path.join(path, "config.json")))
    c["quantization_config"]["weight_block_size"] = [16, 8]
    json.dump(c, open(os.path.join(path, "config.json"), "w"))
    _expect_refusal(path, tmp_path / "ob", "_scale_inv' has shape", "--dtype", "float32")


def test_fp8_block_size_must_be_two_positive_integers():
    assert fp8.block_size({}) == (128, 128)
    assert fp8.block_size({"quantization_config": {"weight_block_size": [64, 32]}}) == (64, 32)
    for bad in ([0, 128], [128], [128, 128, 1], [128, 1.5], [-8, 8]):
        with pytest.raises(CheckpointError, match="two positive integers"):
            fp8.block_size({"quantization_config": {"weight_block_size": bad}})


def test_fp8_refusals_name_the_scale_or_the_weight(tmp_path):
    """A scale of the wrong shape is refused naming it and the shape it should have, and an
    FP8 tensor that is not a 2-D weight is refused as unsupported, both before anything is
    written; an e5m2 weight with its scale dequantises like an e4m3 one."""
    path, _, _ = _fp8_checkpoint(tmp_path)
    arrays = _read_tensors(path)

    def write(arrays):
        _write_tensors(os.path.join(path, "model.safetensors"), arrays)

    scale = "model.layers.0.mlp.up_proj.weight_scale_inv"
    write({**arrays, scale: arrays[scale][:, :-1]})
    err = _expect_refusal(path, tmp_path / "ob", f"{scale!r} has shape", "--dtype", "float32")
    assert f"expected {arrays[scale].shape}" in err
    norm = "model.norm.weight"
    write({**arrays, norm: arrays[norm].astype(ml_dtypes.float8_e4m3fn), norm + "_scale_inv": np.ones((1,), np.float32)})
    _expect_refusal(path, tmp_path / "ob", "only 2-D block-quantised weights are supported", "--dtype", "float32")
    w = "model.layers.0.mlp.up_proj.weight"
    e5 = arrays[w].astype(np.float32).astype(ml_dtypes.float8_e5m2)
    write({**arrays, w: e5})
    assert _cli(path, tmp_path / "e5", "--to", "hf", "--dtype", "float32", "--no-progress") == 0
    full = np.repeat(np.repeat(arrays[scale], 8, 0), 8, 1)[: e5.shape[0], : e5.shape[1]]
    np.testing.assert_array_equal(SafetensorsDir(str(tmp_path / "e5")).get(w), e5.astype(np.float32) * full)


def test_tied_embeddings_convert_and_load_without_an_output_head(tmp_path):
    """With tie_word_embeddings the checkpoint has no lm_head.weight (the output projection
    is the embedding): it converts both ways bit for bit, and our model gives the
    reference logits."""
    hf = ref.build(dict(ref.LITE, tie_word_embeddings=True), seed=6)
    src = ref.save(hf, str(tmp_path / "hf"))
    assert "lm_head.weight" not in SafetensorsDir(src).keys()
    assert _cli(src, tmp_path / "ob", "--to", "orbax", "--no-progress") == 0
    assert _cli(tmp_path / "ob", tmp_path / "back", "--to", "hf", "--no-progress") == 0
    assert _mismatches(src, tmp_path / "back") == []
    ids = _ids(ref.LITE["vocab_size"])
    assert ref.rel_err(np.asarray(from_pretrained(src)(ids.astype(np.int32))), ref.logits(hf, ids)) <= 1e-5
