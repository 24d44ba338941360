"""Layer-level parity with the transformers modules, float32, fresh random inputs.

Each case builds a widened tiny HF model (tests/hf_reference.py), takes one of its modules
(`DeepseekV2Attention`, `DeepseekV2Moe`, `DeepseekV2TopkRouter`, a decoder layer), copies its
weights straight into a freshly built module of ours (no checkpoint code involved: HF Linear
weights are [out, in], ours [in, out]; HF fuses the experts' gate and up projections) and
feeds both the same random activations.
"""

import numpy as np
import pytest
import torch
from flax import nnx

import jax.numpy as jnp

import hf_reference as ref
from dsv2_jax import DeepseekV2Config
from dsv2_jax.attention import MLA, attention_mask
from dsv2_jax.model import DecoderLayer
from dsv2_jax.moe import MoE, Router
from dsv2_jax.rope import rope_cos_sin

TOL = 1e-5

# Odd sizes: 3 heads, q rank 11, v dim 5, 6 experts in 3 groups (qk_nope and the latent stay
# even: transformers views the rope parts as complex pairs and needs even row strides).
ODD = dict(ref.BASE, hidden_size=45, num_attention_heads=3, num_key_value_heads=3,
           kv_lora_rank=14, q_lora_rank=11, qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=5,
           intermediate_size=33, moe_intermediate_size=9, n_routed_experts=6, n_shared_experts=1,
           num_experts_per_tok=3, topk_method="group_limited_greedy", n_group=3, topk_group=2,
           routed_scaling_factor=2.5)
CASES = {
    "lite": ref.LITE,
    "v2": ref.V2,
    "v2-yarn": dict(ref.V2, rope_parameters=ref.YARN),
    "odd": ODD,
}


def _build(kw, seed):
    """The HF model, its experts run by the plain per-expert loop ("eager"): the default
    grouped_mm path needs 16-byte-aligned strides, which odd sizes do not have."""
    hf = ref.build(kw, seed)
    hf.config._experts_implementation = "eager"
    return hf


def _ours_cfg(kw) -> DeepseekV2Config:
    return DeepseekV2Config.from_hf(ref.hf_config(**kw).to_dict())


def _hf_state(hf_mod) -> dict:
    sd = {k: v.detach().float().numpy() for k, v in hf_mod.state_dict().items()}
    for prefix in [k[: -len("gate_up_proj")] for k in sd if k.endswith("experts.gate_up_proj")]:
        gate_up = sd.pop(prefix + "gate_up_proj")  # [E, 2F, D], rows [gate | up]
        F = gate_up.shape[1] // 2
        sd[prefix + "gate_proj"] = gate_up[:, :F].transpose(0, 2, 1)  # -> [E, D, F]
        sd[prefix + "up_proj"] = gate_up[:, F:].transpose(0, 2, 1)
        sd[prefix + "down_proj"] = sd.pop(prefix + "down_proj").transpose(0, 2, 1)  # [E,D,F] -> [E,F,D]
    return sd


def copy_weights(ours: nnx.Module, hf_mod: torch.nn.Module) -> None:
    """Every HF weight into the parameter of ours with the same name; both sides must be
    covered exactly."""
    sd = _hf_state(hf_mod)
    used, new = set(), []
    for path, var in nnx.to_flat_state(nnx.state(ours, nnx.Param)):
        name = ".".join(map(str, path))
        if path[-1] == "kernel":
            hf_name = ".".join(map(str, path[:-1] + ("weight",)))
            value = sd[hf_name].T
        else:
            hf_name, value = name, sd[name]
        assert value.shape == var.shape, (name, value.shape, var.shape)
        used.add(hf_name)
        new.append((path, var.replace(jnp.asarray(value, var.dtype))))
    assert used == set(sd), set(sd) ^ used
    nnx.update(ours, nnx.from_flat_state(new))


@nnx.jit
def _apply(module, *args):
    """Our module under jit: one compile per test instead of one per primitive."""
    return module(*args)


def _rope_and_mask(cfg, hf, positions, segments):
    cos, sin = rope_cos_sin(cfg, jnp.asarray(positions))
    mask = attention_mask(jnp.asarray(segments), jnp.asarray(segments))
    x_dummy = torch.zeros(1)
    freqs = hf.model.rotary_emb(x_dummy, torch.as_tensor(positions))
    additive = torch.where(torch.as_tensor(np.array(mask)), 0.0, torch.finfo(torch.float32).min)
    return cos, sin, mask, freqs, additive


def _inputs(rng, B, T, D, start=0, packed=False):
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    positions = np.broadcast_to(np.arange(start, start + T), (B, T)).copy()
    segments = np.ones((B, T), np.int32)
    if packed:  # two documents per row; positions restart at the boundary
        cut = T // 2
        segments[:, cut:] = 2
        positions[:, cut:] = np.arange(T - cut)
    return x, positions, segments


ATTN_SHAPES = [  # (case, batch, seq, first position, packed)
    ("lite", 2, 13, 0, False),
    ("v2", 3, 7, 0, False),
    ("v2", 1, 1, 0, False),
    ("v2-yarn", 2, 11, 29, False),  # positions 29..39, past original_max_position_embeddings 16
    ("odd", 3, 9, 5, False),
    ("odd", 2, 10, 0, True),
]


@pytest.mark.parametrize("case,B,T,start,packed", ATTN_SHAPES)
def test_attention_parity(case, B, T, start, packed):
    kw = CASES[case]
    hf = _build(kw, seed=11)
    cfg = _ours_cfg(kw)
    hf_attn = hf.model.layers[1].self_attn
    ours = MLA(cfg, rngs=nnx.Rngs(0))
    copy_weights(ours, hf_attn)
    x, positions, segments = _inputs(np.random.default_rng(B * 100 + T), B, T, cfg.hidden_size,
                                     start, packed)
    cos, sin, mask, freqs, additive = _rope_and_mask(cfg, hf, positions, segments)
    with torch.no_grad():
        want, _ = hf_attn(torch.as_tensor(x), attention_mask=additive, position_embeddings=freqs)
    got = _apply(ours, jnp.asarray(x), cos, sin, mask)
    err = ref.rel_err(got, want.numpy())
    print(f"attention {case} B={B} T={T}: relative error {err:.2e}")
    assert err <= TOL, err


def _sorted_choice(idx, weight):
    order = np.argsort(idx, axis=-1)
    return np.take_along_axis(idx, order, -1), np.take_along_axis(weight, order, -1)


def _router_compare(cfg, hf_gate, x2d):
    ours = Router(cfg, rngs=nnx.Rngs(0))
    copy_weights(ours, hf_gate)
    with torch.no_grad():
        hf_logits, hf_w, hf_idx = hf_gate(torch.as_tensor(x2d))
    r = _apply(ours, jnp.asarray(x2d))
    idx_a, w_a = _sorted_choice(np.asarray(r.topk_idx), np.asarray(r.topk_weight))
    idx_b, w_b = _sorted_choice(hf_idx.numpy(), hf_w.numpy())
    return r, hf_logits.numpy(), (idx_a, w_a), (idx_b, w_b)


@pytest.mark.parametrize("case", ["lite", "v2", "odd"])
def test_router_choices_identical(case):
    kw = CASES[case]
    hf = _build(kw, seed=12)
    cfg = _ours_cfg(kw)
    x = np.random.default_rng(5).standard_normal((97, cfg.hidden_size)).astype(np.float32)
    r, hf_logits, (idx, w), (hf_idx, hf_w) = _router_compare(cfg, hf.model.layers[1].mlp.gate, x)
    assert ref.rel_err(r.logits, hf_logits) <= TOL
    np.testing.assert_array_equal(idx, hf_idx)
    assert ref.rel_err(w, hf_w) <= TOL
    counts = np.bincount(hf_idx.reshape(-1), minlength=cfg.n_routed_experts)
    np.testing.assert_array_equal(np.asarray(r.expert_counts), counts)
    if cfg.topk_method == "group_limited_greedy":
        # The group limit must matter for these inputs, or this case tests plain top-K.
        plain = np.sort(np.argsort(-np.asarray(r.scores), axis=-1)[:, : cfg.num_experts_per_tok], -1)
        assert (plain != idx).any(axis=-1).sum() >= 5


def test_router_norm_topk_prob_official_semantics():
    """norm_topk_prob=True, K > 1: weights are the top-K scores over their sum, not scaled
    (official DeepSeek-V2). transformers 5 ignores the flag and scales by
    routed_scaling_factor; we compare against its router patched to the official rule and
    check that the unpatched one really differs."""
    kw = dict(ref.V2, norm_topk_prob=True)  # routed_scaling_factor 16, K = 3
    cfg = _ours_cfg(kw)
    assert cfg.norm_topk_prob and cfg.num_experts_per_tok == 3
    x = np.random.default_rng(6).standard_normal((41, cfg.hidden_size)).astype(np.float32)
    hf = _build(kw, seed=13)
    gate = hf.model.layers[1].mlp.gate
    r, _, (idx, w), (idx_raw, w_raw) = _router_compare(cfg, gate, x)
    ref.official_norm_topk(hf)
    _, _, _, (idx_off, w_off) = _router_compare(cfg, gate, x)
    np.testing.assert_array_equal(idx, idx_off)
    np.testing.assert_array_equal(idx, idx_raw)
    assert ref.rel_err(w, w_off) <= TOL
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    scores = np.take_along_axis(np.asarray(r.scores), idx, -1)
    np.testing.assert_allclose(w, scores / scores.sum(-1, keepdims=True), rtol=1e-6)
    # transformers: the raw scores times 16, whatever norm_topk_prob says.
    np.testing.assert_allclose(w_raw, scores * 16.0, rtol=1e-5)
    assert not np.allclose(w, w_raw, rtol=1e-2)


def test_router_norm_topk_prob_single_expert_scales():
    """K = 1: the official code does not normalise (a single weight would always be 1) and
    scales instead, which is also what transformers does."""
    kw = dict(ref.V2, norm_topk_prob=True, num_experts_per_tok=1)
    cfg = _ours_cfg(kw)
    x = np.random.default_rng(7).standard_normal((23, cfg.hidden_size)).astype(np.float32)
    hf = _build(kw, seed=14)
    r, _, (idx, w), (hf_idx, hf_w) = _router_compare(cfg, hf.model.layers[1].mlp.gate, x)
    np.testing.assert_array_equal(idx, hf_idx)
    assert ref.rel_err(w, hf_w) <= TOL
    np.testing.assert_allclose(w[:, 0], np.asarray(r.scores).max(-1) * 16.0, rtol=1e-6)


@pytest.mark.parametrize("backend", ["blocked", "ragged_dot"])
@pytest.mark.parametrize("case,B,T", [("lite", 2, 13), ("v2", 3, 5), ("odd", 1, 17)])
def test_moe_parity(case, B, T, backend):
    kw = CASES[case]
    hf = _build(kw, seed=15)
    cfg = _ours_cfg(kw).replace(moe_backend=backend)
    hf_moe = hf.model.layers[1].mlp
    ours = MoE(cfg, rngs=nnx.Rngs(0))
    copy_weights(ours, hf_moe)
    x = np.random.default_rng(B * 7 + T).standard_normal((B, T, cfg.hidden_size)).astype(np.float32)
    with torch.no_grad():
        want = hf_moe(torch.as_tensor(x)).numpy()
        _, _, hf_idx = hf_moe.gate(torch.as_tensor(x))
    got, r = _apply(ours, jnp.asarray(x))
    np.testing.assert_array_equal(np.sort(np.asarray(r.topk_idx), -1), np.sort(hf_idx.numpy(), -1))
    err = ref.rel_err(got, want)
    print(f"moe {case} {backend} B={B} T={T}: relative error {err:.2e}")
    assert err <= TOL, err


def test_moe_norm_topk_prob_parity():
    kw = dict(ref.V2, norm_topk_prob=True)
    hf = ref.official_norm_topk(_build(kw, seed=16))
    cfg = _ours_cfg(kw)
    ours = MoE(cfg, rngs=nnx.Rngs(0))
    copy_weights(ours, hf.model.layers[1].mlp)
    x = np.random.default_rng(8).standard_normal((2, 9, cfg.hidden_size)).astype(np.float32)
    with torch.no_grad():
        want = hf.model.layers[1].mlp(torch.as_tensor(x)).numpy()
    err = ref.rel_err(_apply(ours, jnp.asarray(x))[0], want)
    assert err <= TOL, err


@pytest.mark.parametrize("case,layer", [("v2-yarn", 0), ("v2-yarn", 2), ("odd", 1)])
def test_decoder_layer_parity(case, layer):
    """Norms, attention, the FFN and both residuals together, dense and MoE layers."""
    kw = CASES[case]
    hf = _build(kw, seed=17)
    cfg = _ours_cfg(kw)
    hf_layer = hf.model.layers[layer]
    ours = DecoderLayer(cfg, cfg.is_moe_layer(layer), rngs=nnx.Rngs(0))
    copy_weights(ours, hf_layer)
    x, positions, segments = _inputs(np.random.default_rng(9), 2, 12, cfg.hidden_size, start=20)
    cos, sin, mask, freqs, additive = _rope_and_mask(cfg, hf, positions, segments)
    with torch.no_grad():
        want = hf_layer(torch.as_tensor(x), attention_mask=additive, position_embeddings=freqs)
    got, router = _apply(ours, jnp.asarray(x), cos, sin, mask)
    assert (router is None) == (layer < cfg.first_k_dense_replace)
    err = ref.rel_err(got, want.numpy())
    print(f"decoder layer {layer} {case}: relative error {err:.2e}")
    assert err <= TOL, err


def test_parity_catches_a_wrong_weight_layout():
    """The copy is not trivially symmetric: swapping the experts' gate and up halves (a real
    conversion bug) breaks MoE parity."""
    kw = ref.V2
    hf = _build(kw, seed=15)
    cfg = _ours_cfg(kw)
    hf_moe = hf.model.layers[1].mlp
    ours = MoE(cfg, rngs=nnx.Rngs(0))
    copy_weights(ours, hf_moe)
    e = ours.experts
    e.gate_proj[...], e.up_proj[...] = e.up_proj[...], e.gate_proj[...]
    x = np.random.default_rng(1).standard_normal((2, 5, cfg.hidden_size)).astype(np.float32)
    with torch.no_grad():
        want = hf_moe(torch.as_tensor(x)).numpy()
    assert ref.rel_err(_apply(ours, jnp.asarray(x))[0], want) > 1e-2


# V2's published YaRN settings (the tests' YARN, rope dim 8 over an original window of 16,
# puts both ramp ends on whole dimensions, where any rounding of them agrees).
V2_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
           "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
           "mscale": 0.707, "mscale_all_dim": 0.707}


@pytest.mark.parametrize("extra", [{}, {"truncate": False}, {"mscale": 1.0}],
                         ids=["v2", "no-truncate", "mscale-1"])
def test_yarn_frequencies_match_transformers_at_v2_settings(extra):
    """Inverse frequencies and the cos/sin factor against transformers' YaRN init at V2's
    rope dim 64, factor 40 over 4096 positions: the ramp runs from dimension 10.47 to 22.51,
    rounded outwards to 10 and 23 (or not at all with truncate false). Rounded the other way
    every rotary frequency between would be off: positions past the original window would
    rotate at the wrong speeds."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from dsv2_jax import load_config
    from dsv2_jax.rope import attention_factor, inv_freq

    rope = dict(V2_YARN, **extra)
    kw = dict(ref.V2, qk_rope_head_dim=64, max_position_embeddings=163840, rope_parameters=rope)
    hf_cfg = ref.hf_config(**kw)
    assert hf_cfg.head_dim == 64 and hf_cfg.rope_parameters.get("truncate", True) == rope.get("truncate", True)
    want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    cfg = _ours_cfg(kw)
    got = inv_freq(cfg)
    assert got.shape == (32,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-7, atol=0)
    assert attention_factor(cfg) == pytest.approx(want_factor, rel=1e-12)
    if not extra:  # the shipped preset is these settings
        np.testing.assert_array_equal(inv_freq(load_config("v2")), got)
    # The ramp matters here: some frequencies are neither the extrapolated nor the
    # interpolated ones.
    base = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    between = ~np.isclose(got, base, rtol=1e-5) & ~np.isclose(got, base / 40, rtol=1e-5)
    assert between.sum() >= 10


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_rmsnorm_computes_in_float32_whatever_the_input_dtype(dtype):
    """x^2 of a float16 activation of a few hundred overflows (max 65504), and a bfloat16 mean
    of squares loses bits: the norm must square, average and rsqrt in float32, casting only
    its result. The parity tests run in float32 and cannot see this."""
    from dsv2_jax.layers import RMSNorm

    x = np.linspace(-900.0, 900.0, 64, dtype=np.float32).reshape(2, 32)
    norm = RMSNorm(32, 1e-6)
    norm.weight[...] = jnp.asarray(np.linspace(0.5, 1.5, 32), jnp.float32)
    got = norm(jnp.asarray(x, dtype))
    assert got.dtype == dtype
    xq = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
    want = xq / np.sqrt(np.mean(xq * xq, axis=-1, keepdims=True) + 1e-6)
    w = np.asarray(jnp.asarray(np.linspace(0.5, 1.5, 32), jnp.float32).astype(dtype).astype(jnp.float32))
    want = np.asarray(jnp.asarray(want, dtype).astype(jnp.float32)) * w
    got = np.asarray(got.astype(jnp.float32))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("extra", [
    {"rope_theta": 10.0, "beta_fast": 1000},  # ramp from 0 to past the last dimension: clamped to dim - 1
    {"original_max_position_embeddings": 16},  # the fast end below dimension 0: clamped to 0
    {"beta_fast": 2, "beta_slow": 20},  # both ends rounded to dimension 2: moved apart, not 0 / 0
    {"beta_fast": None, "beta_slow": None, "truncate": False},  # absent: 32 and 1
    {"mscale": None},  # no mscale: the cos/sin factor is mscale(factor, 1)
    {"mscale": None, "mscale_all_dim": None},
], ids=["high-clamped", "low-clamped", "ends-meet", "default-betas", "no-mscale", "no-mscales"])
def test_yarn_frequencies_match_transformers_where_the_ramp_is_clamped(extra):
    """The ramp's ends are clamped to the rotary dimensions [0, dim - 1], ends that meet are
    moved apart by 0.001, absent settings take their defaults, as transformers does; rope
    dim 8, factor 4."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from dsv2_jax.rope import attention_factor, inv_freq

    rope = {k: v for k, v in {**ref.YARN, "original_max_position_embeddings": 4096, **extra}.items()
            if v is not None}
    kw = dict(ref.V2, max_position_embeddings=4 * rope["original_max_position_embeddings"],
              rope_parameters=rope)
    want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](ref.hf_config(**kw), "cpu")
    cfg = _ours_cfg(kw)
    got = inv_freq(cfg)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-7, atol=0)
    assert attention_factor(cfg) == pytest.approx(want_factor, rel=1e-12)


def test_rmsnorm_adds_eps_inside_the_root():
    """y = x / sqrt(mean(x^2) + eps): for activations as small as eps the eps decides the
    scale (the parity tests' eps of 1e-6 with activations near 1 cannot tell where it goes)."""
    from dsv2_jax.layers import RMSNorm

    x = np.full((1, 4), 1e-3, np.float32)
    got = np.asarray(RMSNorm(4, 3e-6)(jnp.asarray(x)))
    np.testing.assert_allclose(got, x / np.sqrt(1e-6 + 3e-6), rtol=1e-5)  # 0.5, not ~1
