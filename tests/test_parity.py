"""Logit parity with the transformers DeepseekV2ForCausalLM reference (float32)."""

import numpy as np
import pytest

import hf_reference as ref
from dsv2_jax import from_pretrained

TOL = 1e-5


def _check(tmp_path, kw, seq, seed, shard=None, official=False, patch=None, batch=2):
    hf = ref.build(kw, seed)
    if patch:
        hf = patch(hf)
    path = ref.save(hf, str(tmp_path / "hf"), max_shard_size=shard)
    if official:
        ref.to_official_config(path)
    model = from_pretrained(path)
    ids = np.random.default_rng(seed + 100).integers(0, kw["vocab_size"], (batch, seq))
    ours = np.asarray(model(ids.astype(np.int32)))
    err = ref.rel_err(ours, ref.logits(hf, ids))
    print(f"relative logit error: {err:.2e}")
    assert err <= TOL, err
    return err


def test_v2_lite_shape(tmp_path):
    _check(tmp_path, ref.LITE, seq=13, seed=1)


def test_v2_shape_group_limited_sharded(tmp_path):
    _check(tmp_path, ref.V2, seq=11, seed=2, shard="20KB")


def test_yarn_beyond_original_context(tmp_path):
    kw = dict(ref.V2, rope_parameters=ref.YARN)
    # 40 positions against original_max_position_embeddings = 16.
    _check(tmp_path, kw, seq=40, seed=3)


def test_yarn_without_truncation(tmp_path):
    """`truncate: false` keeps the ramp's ends unrounded (it moved logits by ~1 when ignored)."""
    kw = dict(ref.V2, qk_rope_head_dim=32, rope_parameters=dict(ref.YARN, truncate=False))
    _check(tmp_path, kw, seq=40, seed=6)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # torch, building it
def test_no_shared_experts(tmp_path):
    """n_shared_experts = 0: transformers writes empty shared-expert tensors, which load as
    nothing (they were refused as unexpected)."""
    _check(tmp_path, dict(ref.V2, n_shared_experts=0), seq=9, seed=7)


def test_official_config_json(tmp_path):
    kw = dict(ref.V2, rope_parameters=dict(ref.YARN, mscale=0.707))
    _check(tmp_path, kw, seq=23, seed=4, official=True)


def test_norm_topk_prob_official_semantics(tmp_path):
    kw = dict(ref.V2, norm_topk_prob=True)
    _check(tmp_path, kw, seq=9, seed=5, patch=ref.official_norm_topk)


def test_parity_catches_a_wrong_rope(tmp_path, monkeypatch):
    """The parity check can fail: rotating halves instead of adjacent pairs is caught."""
    import jax.numpy as jnp


    def halves(x, cos, sin):
        extra = x.ndim - cos.ndim
        cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
        sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
        h = x.shape[-1] // 2
        x0, x1 = x[..., :h], x[..., h:]
        return jnp.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1)

    monkeypatch.setattr("dsv2_jax.attention.apply_rope", halves)
    with pytest.raises(AssertionError):
        _check(tmp_path, ref.LITE, seq=13, seed=1)
