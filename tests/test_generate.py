"""Inference: absorbed MLA decode over the latent cache, `generate`, `dsv2 generate`.

Greedy tokens are compared with HF `generate` on tiny models built in-process (float32, EOS
off on both sides); decode-step logits with the model's own full-sequence forward."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.extend as jax_extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import hf_reference as ref
import dsv2_jax
from dsv2_jax import from_pretrained
from dsv2_jax.attention import attention_mask, mla_attention_reference
from dsv2_jax.cache import (CACHE_KINDS, LayerView, cache_size, dequantise, init_cache, mha_bytes_per_token,
                            quantise, read_layer)
from dsv2_jax.cli import main as cli_main
from dsv2_jax.decode import (absorb, absorbed_attention, decode_attention, decode_logits, few_row_products,
                             layer_copies, decode_step, mla_decode_blocked, mla_decode_xla, prefill, teacher_forced_logits)
from dsv2_jax.kernels.mla_decode import mla_decode_reference
from dsv2_jax.generation import _generate_jit, bucket, sample_logits
from dsv2_jax.rope import rope_cos_sin
from procenv import cpu_env

# One prompt width and length budget for the HF comparisons: every call shares a bucket.
B, T, NEW = 2, 7, 10
YARN_KW = dict(ref.V2, rope_parameters=ref.YARN)  # original window 16


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (HF model, our model loaded from its saved directory)."""
    out = {}
    for name, kw, seed in (("lite", ref.LITE, 1), ("v2", ref.V2, 2), ("yarn", YARN_KW, 3)):
        hf = ref.build(kw, seed)
        path = ref.save(hf, str(tmp_path_factory.mktemp(name)))
        out[name] = (hf, from_pretrained(path))
    return out


def hf_greedy(hf, ids, new):
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    with torch.no_grad():
        # The configs have no EOS (eos_token_id None), so HF never stops or masks a logit.
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                          do_sample=False, eos_token_id=None)
    return out.numpy()


def prompts(seed, shape, vocab=97):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


# --------------------------------------------------------------------------------------
# Greedy tokens equal HF generate.


@pytest.mark.parametrize("name", ["lite", "v2"])
def test_greedy_equals_hf(hf_models, name):
    """lite: no q compression, greedy routing; v2: q_lora_rank set, group-limited routing."""
    hf, model = hf_models[name]
    ids = prompts(10, (B, T))
    ours = dsv2_jax.generate(model, ids, NEW)
    assert ours.shape == (B, T + NEW) and ours.dtype == np.int32
    np.testing.assert_array_equal(ours, hf_greedy(hf, ids, NEW))


def test_greedy_equals_hf_yarn_past_original_window(hf_models):
    hf, model = hf_models["yarn"]
    ids = prompts(11, (B, 9))
    ours = dsv2_jax.generate(model, ids, 21)  # positions up to 29 against a window of 16
    np.testing.assert_array_equal(ours, hf_greedy(hf, ids, 21))


def test_mixed_prompt_lengths_equal_hf_row_by_row(hf_models):
    hf, model = hf_models["v2"]
    lengths = np.array([5, 2])  # both padded; B and the buckets as in test_greedy_equals_hf[v2]
    ids = prompts(12, (B, T))
    ids[np.arange(T)[None, :] >= lengths[:, None]] = -1  # padding is ignored, whatever it holds
    ours = dsv2_jax.generate(model, ids, NEW, prompt_lengths=lengths)
    assert ours.shape == (B, T + NEW)
    for b, n in enumerate(lengths):
        alone = hf_greedy(hf, ids[b:b + 1, :n], NEW)[0]
        np.testing.assert_array_equal(ours[b, : n + NEW], alone)
        assert (ours[b, n + NEW:] == 0).all()  # pad_id: no eos, no cfg.pad_token_id -> 0


def test_eos_stops_rows_independently(hf_models):
    hf, model = hf_models["lite"]
    ids = prompts(10, (B, T))
    free = dsv2_jax.generate(model, ids, NEW)
    eos = int(free[0, T + 3])  # row 0's fourth new token
    stop = [int(np.argmax(free[b, T:] == eos)) if (free[b, T:] == eos).any() else NEW for b in range(B)]
    out = dsv2_jax.generate(model, ids, NEW, eos_id=eos)
    assert stop[0] <= 3
    width = T + min(NEW, max(s + 1 for s in stop))  # trimmed once every row has stopped
    assert out.shape == (B, width)
    for b in range(B):
        end = T + min(stop[b] + 1, NEW)
        np.testing.assert_array_equal(out[b, :end], free[b, :end])
        assert (out[b, end:] == eos).all()  # padded with eos_id after it


def test_several_eos_ids_each_stop_and_streaming_reports_stops(hf_models):
    """eos_id as a list stops a row at whichever comes first (a config.json may name several);
    on_token's `done` marks rows that stopped before the step, never the step's own token."""
    _, model = hf_models["lite"]
    ids = prompts(10, (B, T))
    free = dsv2_jax.generate(model, ids, NEW)
    a, b = int(free[0, T + 2]), int(free[1, T])  # row 0's third new token, row 1's first
    out = dsv2_jax.generate(model, ids, NEW, eos_id=[a, b])
    for r in range(B):
        new = free[r, T:]
        hits = np.flatnonzero((new == a) | (new == b))
        end = T + (hits[0] + 1 if hits.size else NEW)
        np.testing.assert_array_equal(out[r, :end], free[r, :end])
        assert (out[r, end:] == a).all()  # padded with the first stop id
    seen = []
    dsv2_jax.generate(model, ids, NEW, eos_id=b, on_token=lambda s, t, d: seen.append((s, t.copy(), d.copy())))
    assert seen[0][0] == 0 and seen[0][1][1] == b and not seen[0][2].any()  # its own stop token
    assert seen[1][2][1]  # then row 1 has stopped
    with pytest.raises(ValueError, match="eos_id"):
        dsv2_jax.generate(model, ids, NEW, eos_id=[])
    before = _generate_jit._cache_size()  # none, one or several stop ids: one compiled loop
    for eos in (None, a, [a, b, 3]):
        dsv2_jax.generate(model, ids, NEW, eos_id=eos)
    assert _generate_jit._cache_size() == before


def test_streamed_tokens_are_the_output_up_to_each_stop(hf_models):
    """`dsv2 generate` prints what on_token reports while `done` is False: each row's new
    tokens, its stop id included, then nothing. One report per step, steps counted from 0,
    and the stream reassembles the returned array (a `done` raised on the stop token's own
    step would drop that token from the printed text)."""
    _, model = hf_models["lite"]
    ids = prompts(10, (B, T))
    free = dsv2_jax.generate(model, ids, NEW)
    eos = int(free[0, T + 2])  # row 0's third new token
    seen = []
    out = dsv2_jax.generate(model, ids, NEW, eos_id=eos,
                            on_token=lambda s, t, d: seen.append((s, t.copy(), d.copy())))
    assert [s for s, _, _ in seen] == list(range(out.shape[1] - T))
    for r in range(B):
        hits = np.flatnonzero(free[r, T:] == eos)
        end = hits[0] + 1 if hits.size else NEW
        streamed = [int(t[r]) for _, t, d in seen if not d[r]]
        assert streamed == out[r, T:T + end].tolist() == free[r, T:T + end].tolist(), r
    assert seen[2][1][0] == eos and not seen[2][2][0] and seen[3][2][0]


def test_a_continuation_one_past_the_cache_bucket_keeps_its_last_token(hf_models):
    """Cache and output lengths come in buckets (64, 128, ...): a prompt plus max_new_tokens
    one past a bucket edge (7 + 58 = 65) must still give every token, the last included, as
    HF does."""
    hf, model = hf_models["lite"]
    ids = prompts(16, (1, T))
    new = 64 - T + 1
    out = dsv2_jax.generate(model, ids, new)
    assert out.shape == (1, T + new)
    np.testing.assert_array_equal(out, hf_greedy(hf, ids, new))


def test_tiny_temperature_samples_the_argmax():
    """logits / temperature overflows float32 for temperatures near 0; the sample must still
    be the largest logit, not the first of many infinities."""
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(4, 50)) * 3, jnp.float32)
    want = np.asarray(jnp.argmax(logits, axis=-1))
    for t in (1e-30, 1e-39, 1e-45):
        for filtered in (False, True):
            got = sample_logits(logits, jax.random.key(1), t, 0, 1.0, greedy=False, filtered=filtered)
            np.testing.assert_array_equal(np.asarray(got), want)


def test_new_prompt_length_in_the_same_bucket_does_not_recompile(hf_models):
    _, model = hf_models["lite"]
    dsv2_jax.generate(model, prompts(13, (B, T)), NEW)
    before = _generate_jit._cache_size()
    dsv2_jax.generate(model, prompts(14, (B, T - 3)), NEW + 3)  # same buckets (prompt 16, cache 64)
    assert _generate_jit._cache_size() == before
    assert [bucket(n) for n in (1, 16, 17, 1024, 1025, 2176)] == [16, 16, 32, 1024, 2048, 3072]
    assert bucket(17, minimum=64) == 64


# --------------------------------------------------------------------------------------
# Decode steps against the full forward; absorbed against expanded.


@functools.partial(jax.jit, static_argnames=("graphdef", "kind", "steps", "max_len"))
def _teacher_forced(graphdef, state, ids, lengths, *, kind, steps, max_len):
    model = nnx.merge(graphdef, state)
    cache = init_cache(model.cfg, ids.shape[0], max_len, kind)
    return teacher_forced_logits(model, ids, lengths, steps, cache)


def _decode_logits(model, kind, ids, lengths, steps, max_len=64):
    graphdef, state = nnx.split(model)
    return np.asarray(_teacher_forced(graphdef, state, jnp.asarray(ids), jnp.asarray(lengths),
                                      kind=kind, steps=steps, max_len=max_len))


def test_decode_logits_equal_full_forward_at_every_position(hf_models):
    """The YaRN model (q compression, group-limited routing, positions past the original
    window), mixed prompt lengths: every decode step against the full-sequence forward."""
    _, model = hf_models["yarn"]
    ids = prompts(20, (2, 30))
    lengths = np.array([3, 9], np.int32)
    steps = 30 - 9
    full = np.asarray(model(ids))
    want = np.stack([full[b, lengths[b] - 1: lengths[b] + steps] for b in range(2)])
    got = _decode_logits(model, "float32", ids, lengths, steps)
    errs = [ref.rel_err(got[:, j], want[:, j]) for j in range(want.shape[1])]
    print(f"max relative logit error, decode vs full forward: {max(errs):.2e}")
    assert max(errs) <= 1e-5, errs


# Stated bounds (docs/inference.md), against the float32 cache on the trained smoke model, 88
# decoded positions: the median over positions of max |dlogit| / max |logit|, and the mean KL
# divergence of the next-token distributions. Measured on such models: int8 ~2e-4 / ~6e-8,
# fp8 ~1e-3 / ~5e-6. The worst single position is reported, not bounded: it is set by the
# rare token whose top-k expert choice flips under a rounding (0.04-0.1 after 300 training
# steps, for a bfloat16 cache too), a discontinuity of routing rather than a cost of the cache.
QUANT_BOUNDS = {"int8": (2e-3, 1e-5), "fp8": (1e-2, 2e-4)}


@pytest.mark.parametrize("kind", [k for k in ("int8", "fp8") if k in CACHE_KINDS])
def test_quantised_cache_within_stated_error(workdir, kind):
    model = trained_model(workdir)
    text = open(__file__, "rb").read()[:2 * 96]
    ids = np.frombuffer(text, np.uint8).astype(np.int32).reshape(2, 96)
    lengths = np.array([8, 8], np.int32)
    f32 = _decode_logits(model, "float32", ids, lengths, 88, max_len=128).astype(np.float64)
    got = _decode_logits(model, kind, ids, lengths, 88, max_len=128).astype(np.float64)
    rel = np.abs(got - f32).max(-1) / np.abs(f32).max(-1)
    logp0, logp = jax.nn.log_softmax(f32, -1), jax.nn.log_softmax(got, -1)
    kl = float(np.mean(np.sum(np.exp(logp0) * (logp0 - logp), -1)))
    print(f"{kind} cache vs f32: relative logit error median {np.median(rel):.1e} max {rel.max():.1e}, "
          f"mean KL {kl:.1e}")
    med_bound, kl_bound = QUANT_BOUNDS[kind]
    assert np.median(rel) <= med_bound and kl <= kl_bound, (np.median(rel), kl)


def test_int8_cache_decodes_close_to_float32_where_attention_matters(hf_models):
    """The widened YaRN model, whose logits depend on every cached position (unlike the
    smoke model 10 steps into training): 21 decode steps over an int8 cache give the float32
    cache's logits to ~2% (median over positions; measured 1.9e-2, max 5.0e-2), so every
    token decode writes is stored with its own scales and read back with them, not only the
    prefilled ones (a step that dropped its scales: median 0.35)."""
    _, model = hf_models["yarn"]
    ids = prompts(21, (2, 30))
    lengths = np.array([3, 9], np.int32)
    f32 = _decode_logits(model, "float32", ids, lengths, 21)
    got = _decode_logits(model, "int8", ids, lengths, 21)
    errs = [ref.rel_err(got[:, j], f32[:, j]) for j in range(f32.shape[1])]
    print(f"int8 cache vs float32, relative logit error per position: median {np.median(errs):.1e} "
          f"max {max(errs):.1e}")
    assert np.median(errs) <= 0.05 and max(errs) <= 0.2, errs


def test_int8_cache_rounds_each_part_to_half_a_step_of_its_own_scale():
    """int8 rows keep one scale per part (the normed latent, the un-normed rope key): each
    value comes back within half a quantisation step of its own part, so a rope key 300x
    the latent's range costs the latent nothing. A zero row stays zero and finite."""
    rng = np.random.default_rng(8)
    C, R = 24, 8
    for lat, rope in ((1.0, 300.0), (300.0, 1.0)):
        rows = jnp.asarray(np.concatenate([lat * rng.normal(size=(3, 5, C)),
                                           rope * rng.normal(size=(3, 5, R))], -1), jnp.float32)
        rows = rows.at[0, 0].set(0.0)
        q, s = quantise(rows, "int8", C)
        assert q.dtype == jnp.int8 and s.shape == (3, 5, 2) and s.dtype == jnp.float32
        back = np.asarray(dequantise(q, s, C, jnp.float32))
        assert np.all(back[0, 0] == 0)
        for part in (slice(0, C), slice(C, C + R)):
            x = np.asarray(rows)[..., part]
            step = np.abs(x).max(-1, keepdims=True) / 127
            assert np.all(np.abs(back[..., part] - x) <= 0.5 * step * (1 + 1e-5) + 1e-30), (lat, part)


def test_fp8_cache_clips_instead_of_overflowing():
    """e4m3 has no infinity: a value past +-448 would be stored as NaN and reach every
    output through the value product. It is clipped to +-448 instead."""
    rows = jnp.asarray([[[1e3, -1e5, 3.0, 448.0, -500.0, 0.5]]], jnp.float32)
    q, s = quantise(rows, "fp8", 4)
    assert s is None
    back = np.asarray(dequantise(q, None, 4, jnp.float32))
    np.testing.assert_array_equal(back, [[[448.0, -448.0, 3.0, 448.0, -448.0, 0.5]]])


def test_absorbed_attention_equals_expanded(hf_models):
    _, model = hf_models["v2"]
    cfg = model.cfg
    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 11, cfg.hidden_size)), jnp.float32)

    @jax.jit
    def both(x):
        attn = model.layer(1).self_attn
        pos = jnp.broadcast_to(jnp.arange(11), (2, 11))
        cos, sin = rope_cos_sin(cfg, pos)
        seg = jnp.ones((2, 11), jnp.int32)
        expanded = attn(x, cos, sin, attention_mask(seg, seg))[:, -1]
        c, kr = attn.latent(x, cos, sin)
        kv = jnp.pad(jnp.concatenate([c, kr], -1), ((0, 0), (0, 5), (0, 0)))  # 5 unused positions
        w = absorb(model)
        w_uk, w_uv = w.w_uk[1][0], w.w_uv[1][0]  # layer 1 = first of the MoE segment
        q_nope, q_rope = attn.queries(x[:, -1:], cos[:, -1:], sin[:, -1:])
        absorbed = absorbed_attention(attn, q_nope, q_rope, kv, jnp.full((2,), 10), w_uk, w_uv)[:, 0]
        return absorbed, expanded

    absorbed, expanded = both(x)
    err = ref.rel_err(absorbed, expanded)
    print(f"absorbed vs expanded attention output: {err:.2e}")
    assert err <= 1e-5


def test_decode_core_contract_and_pallas_seam(monkeypatch):
    """The XLA core against the expanded reference (identity W_UK and W_UV: the key's latent
    part is each head's k_nope and the value); impl='pallas' runs the kernel of
    dsv2_jax.kernels.mla_decode (interpreted on CPU) and falls back to the XLA core when that
    module is missing."""
    rng = np.random.default_rng(6)
    Bq, H, S, C, R = 2, 3, 64, 8, 4
    q = jnp.asarray(rng.normal(size=(Bq, H, C + R)), jnp.float32)
    kv = jnp.asarray(rng.normal(size=(Bq, S, C + R)), jnp.float32)
    lengths = jnp.array([4, 50])
    got = mla_decode_xla(q, kv, lengths, v_dim=C, scale=0.3)
    k_nope = jnp.broadcast_to(kv[:, :, None, :C], (Bq, S, H, C))
    mask = (jnp.arange(S)[None, :] < lengths[:, None])[:, None, None, :]
    want = mla_attention_reference(q[:, None, :, :C], q[:, None, :, C:], k_nope, kv[:, :, C:],
                                   k_nope, mask, 0.3)[:, 0]
    assert got.shape == (Bq, H, C) and ref.rel_err(got, want) <= 1e-6
    assert ref.rel_err(decode_attention(q, kv, lengths, v_dim=C, scale=0.3, impl="pallas"), want) <= 1e-5
    monkeypatch.setitem(sys.modules, "dsv2_jax.kernels.mla_decode", None)  # as if absent
    assert ref.rel_err(decode_attention(q, kv, lengths, v_dim=C, scale=0.3, impl="pallas"), want) <= 1e-6


@pytest.mark.parametrize("B", [1, 3])
def test_few_row_products_give_the_dot_logits(B):
    """At 1-8 rows on one CPU device decode runs on one copy of its parts per layer, and at
    2-8 rows those copies and the output head are laid out [out, in] (the head [vocab, D],
    every Linear of a decode step: q with its latent, kv_a, o_proj, the dense MLP, the shared
    experts). Logits and the written cache equal the plain stacked `dot` form's within float32
    rounding over several steps; one row keeps the dot layout."""
    cfg = dsv2_jax.load_config("tiny", num_hidden_layers=3, q_lora_rank=24, n_shared_experts=2)
    model = dsv2_jax.init_model(cfg, seed=3)
    one_cpu = jax.default_backend() == "cpu" and jax.device_count() == 1
    assert few_row_products(3) == one_cpu and layer_copies(1) == one_cpu and layer_copies(8) == one_cpu
    assert not few_row_products(1) and not few_row_products(9) and not layer_copies(9)
    rows, plain = absorb(model, B), absorb(model)
    assert plain.head_rows is None and plain.layer_states is None
    L, D = model.segments[1].count, cfg.hidden_size
    assert len(rows.layer_states[1]) == L  # one state per layer
    assert set(rows.layer_states[0][0]) == {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"}
    assert "mlp.shared_experts" in rows.layer_states[1][0]
    attn = jax.tree.map(lambda *a: jnp.stack(a), *[st["self_attn"] for st in rows.layer_states[1]])
    shared = jax.tree.map(lambda *a: jnp.stack(a), *[st["mlp.shared_experts"] for st in rows.layer_states[1]])
    if B == 1:  # the copies as stored, [L, in, out]
        assert rows.head_rows is None
        assert attn["q_a_proj"]["kernel"][...].shape == (L, D, cfg.q_lora_rank)
        assert shared["gate_proj"]["kernel"][...].shape == (L, D, 2 * cfg.moe_intermediate_size)
    else:
        assert rows.head_rows.shape == (cfg.vocab_size, cfg.hidden_size)
        # [L, out, in]; q_a and kv_a stacked (one product per input); kv_b as stored (absorbed).
        assert attn["a_proj"]["kernel"][...].shape == (L, cfg.q_lora_rank + cfg.kv_lora_rank + cfg.qk_rope_head_dim, D)
        assert "q_a_proj" not in attn and "kv_a_proj_with_mqa" not in attn
        assert attn["q_b_proj"]["kernel"][...].shape == (L, cfg.num_attention_heads * cfg.qk_head_dim,
                                                         cfg.q_lora_rank)
        assert shared["gate_up"]["kernel"][...].shape == (L, 2 * 2 * cfg.moe_intermediate_size, D)
    assert attn["kv_b_proj"]["kernel"][...].shape == (L, cfg.kv_lora_rank, cfg.num_attention_heads
                                                       * (cfg.qk_nope_head_dim + cfg.v_head_dim))
    ids = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (B, 12)), jnp.int32)
    lengths = jnp.array([5, 9, 12][-B:], jnp.int32)

    @jax.jit
    def run(weights):
        cache = init_cache(cfg, B, 64)
        logits, cache = prefill(model, ids, lengths, cache)
        return steps(weights, cache, logits)

    def steps(weights, cache, logits):
        out = []
        for _ in range(2):
            logits, cache = decode_step(model, weights, cache, jnp.argmax(logits, -1).astype(jnp.int32))
            out.append(logits)
        return jnp.stack(out), cache.kv

    def weight_dots(weights):
        """The decode steps' dot_generals with a weight of the model as an operand."""
        layers = [seg.layers for seg in model.segments]
        mods = [m.self_attn for m in layers] + [layers[0].mlp, layers[1].mlp.shared_experts]
        shapes = {tuple(a.shape[-2:]) for m in mods for a in jax.tree.leaves(nnx.state(m, nnx.Param))
                  if a.ndim >= 2}
        shapes |= {tuple(model.output_kernel().shape), tuple(model.output_kernel().shape[::-1])}
        cache, logits = init_cache(cfg, B, 64), jnp.zeros((B, cfg.vocab_size))
        found = []

        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                if eqn.primitive.name == "dot_general":
                    found.extend(v.aval.shape for v in eqn.invars if tuple(v.aval.shape[-2:]) in shapes)
                for sub in jax_extend.core.jaxprs_in_params(eqn.params):
                    walk(sub)

        walk(jax.make_jaxpr(steps)(weights, cache, logits).jaxpr)
        return found

    def scans(weights):
        cache, logits = init_cache(cfg, B, 64), jnp.zeros((B, cfg.vocab_size))
        return [e for e in jax.make_jaxpr(steps)(weights, cache, logits).jaxpr.eqns if e.primitive.name == "scan"]

    # The copies are what runs: no scan slices a layer out of the stacks (the plain path's
    # does), and at 2-8 rows no dot_general reads a weight (the plain path's head and
    # projections do; the routed experts' windows read them by expert, not whole).
    assert scans(plain) and not scans(rows)
    assert weight_dots(plain) and (B == 1 or not weight_dots(rows)), weight_dots(rows)
    (got, kv_got), (want, kv_want) = run(rows), run(plain)
    assert got.dtype == jnp.float32 and ref.rel_err(got, want) <= 1e-6
    for a, b in zip(kv_got, kv_want):
        assert ref.rel_err(a, b) <= 1e-6
    x = jax.random.normal(jax.random.key(4), (B, 1, cfg.hidden_size), jnp.float32)
    assert ref.rel_err(decode_logits(model, rows, x), model.logits_from_hidden(model.norm(x))[:, 0]) <= 1e-6


@pytest.mark.parametrize("backend", ["blocked", "ragged_dot"])
@pytest.mark.parametrize("T", [1, 9])
def test_moe_few_tokens_equals_the_moe_layer(backend, T):
    """Decode's MoE reads the chosen experts from the segment's stacks; it must be the MoE
    layer's function. On GPU/TPU (any backend but 'blocked') up to 2E (token, expert) pairs
    go through one gather of the chosen matrices (T = 1: 2 rows x 2 experts <= 16), more
    through the grouped matmul (T = 9: 36 pairs); CPU decode only ever takes 'blocked', so
    the other branches are checked here, against `MoE.__call__` on the same weights."""
    from dsv2_jax import load_config
    from dsv2_jax.decode import moe_few_tokens
    from dsv2_jax.moe import MoE

    cfg = load_config("tiny", moe_backend=backend)
    moe = MoE(cfg, rngs=nnx.Rngs(3))
    e = moe.experts
    # Layer 1 of a two-layer segment; layer 0 holds other experts that must not be read.
    other = lambda w: jax.random.normal(jax.random.key(5), w.shape, w.dtype)
    stacks = [jnp.stack([other(w[...]), w[...]]) for w in (e.gate_proj, e.up_proj, e.down_proj)]
    # Pre-activations of O(1) (not the 0.02 init's), where silu(g) * u and silu(u) * g differ.
    x = 20.0 * jax.random.normal(jax.random.key(4), (2, T, cfg.hidden_size), jnp.float32)
    got = moe_few_tokens(moe.gate, moe.shared_experts, *stacks, 1, x, backend)
    want, r = moe(x)
    gather = 2 * T * cfg.num_experts_per_tok <= 2 * cfg.n_routed_experts
    assert gather == (T == 1)
    assert got.shape == want.shape and ref.rel_err(got, want) <= 1e-6, ref.rel_err(got, want)
    # The routed experts' part is not lost in the shared experts' one.
    shared = moe.shared_experts(x.reshape(-1, cfg.hidden_size)).reshape(want.shape)
    assert ref.rel_err(shared, want) > 0.1


@pytest.mark.parametrize("kind", ["float32", "int8"])
def test_blocked_decode_reads_layers_in_place(kind):
    """The XLA core walks the live blocks of one layer of a stacked [L, B, S, K] buffer:
    equal to the plain reference on that layer copied out, for block lengths that split the
    live positions unevenly, rows of length 0, 1, a block edge and the whole buffer, live
    positions past the last full block (walked in tail blocks), under jit with a traced layer
    index."""
    rng = np.random.default_rng(11)
    L, Bq, H, S, C, R = 3, 4, 5, 256, 24, 8
    q = jnp.asarray(rng.normal(size=(Bq, H, C + R)), jnp.float32)
    kv, scale = quantise(jnp.asarray(rng.normal(size=(L, Bq, S, C + R)), jnp.float32), kind, C)
    lengths = jnp.array([0, 1, 64, 256])

    @functools.partial(jax.jit, static_argnames="block")
    def blocked(layer, lengths, block):
        view = LayerView(kv, scale, layer, C, jnp.float32)
        return mla_decode_blocked(q, view, lengths, v_dim=C, scale=0.3, block=block)

    for layer in range(L):
        want = mla_decode_reference(q, read_layer(kv, scale, layer, C, jnp.float32), lengths, v_dim=C, scale=0.3)
        assert not jnp.any(want[0])  # a row of length 0 gives zeros
        for block in (64, 256):
            got = blocked(layer, lengths, block)
            assert got.shape == (Bq, H, C) and ref.rel_err(got, want) <= 1e-6, (layer, block)
    short = jnp.array([3, 5, 2, 9])  # one live block of four: the others are never read
    want = mla_decode_reference(q, read_layer(kv, scale, 1, C, jnp.float32), short, v_dim=C, scale=0.3)
    assert ref.rel_err(blocked(1, short, 64), want) <= 1e-6
    # One full block of 128, then the rest in tail blocks of 64 (one, then two); less than
    # one block of 256 (read as that block); a full block of 64 and one more.
    for part, block in (([0, 1, 70, 150], 128), ([0, 9, 200, 1], 128), ([0, 1, 70, 130], 256),
                        ([64, 65, 3, 1], 64)):
        part = jnp.array(part)
        want = mla_decode_reference(q, read_layer(kv, scale, 2, C, jnp.float32), part, v_dim=C, scale=0.3)
        assert ref.rel_err(blocked(2, part, block), want) <= 1e-6, (part, block)
    with pytest.raises(ValueError, match="must divide"):
        blocked(0, lengths, 96)


# --------------------------------------------------------------------------------------
# Sampling.


def test_sampling_filters():
    V, n = 50, 4000
    base = jnp.asarray(np.random.default_rng(7).normal(size=(V,)) * 2, jnp.float32)
    logits = jnp.broadcast_to(base, (n, V))
    key = jax.random.key(0)
    draw = jax.jit(sample_logits, static_argnames=("greedy", "filtered"))
    order = np.argsort(-np.asarray(base))
    k = draw(logits, key, 1.0, 5, 1.0, greedy=False)
    assert set(np.asarray(k).tolist()) <= set(order[:5].tolist())
    assert len(set(np.asarray(k).tolist())) == 5  # and all of them do appear
    p = np.asarray(jax.nn.softmax(base))[order]
    nucleus = int(np.searchsorted(np.cumsum(p), 0.6) + 1)  # smallest prefix reaching 0.6
    s = draw(logits, key, 1.0, 0, 0.6, greedy=False)
    assert set(np.asarray(s).tolist()) == set(order[:nucleus].tolist())
    both = draw(logits, key, 1.0, 2, 0.999, greedy=False)
    assert set(np.asarray(both).tolist()) <= set(order[:2].tolist())
    argmax = int(order[0])
    assert (np.asarray(draw(logits, key, 1.0, 1, 1.0, greedy=False)) == argmax).all()
    assert (np.asarray(draw(logits, key, 1.0, 0, 1e-6, greedy=False)) == argmax).all()
    again = draw(logits, key, 1.0, 5, 1.0, greedy=False)
    np.testing.assert_array_equal(k, again)


def test_top_p_stops_at_exactly_reaching_the_mass():
    """The nucleus is the smallest set whose mass REACHES top_p, as HF's TopPLogitsWarper
    keeps it: with probabilities [0.5, 0.25, 0.25] and top_p = 0.5 the first token alone
    reaches 0.5, so a sampler counting the tied mass in would also draw the others."""
    n = 2000
    logits = jnp.broadcast_to(jnp.log(jnp.asarray([0.5, 0.25, 0.25], jnp.float32)), (n, 3))
    draw = jax.jit(sample_logits, static_argnames=("greedy", "filtered"))
    for seed in range(3):
        tokens = np.asarray(draw(logits, jax.random.key(seed), 1.0, 0, 0.5, greedy=False))
        assert (tokens == 0).all(), np.bincount(tokens, minlength=3)
    # Just past 0.5 the next token joins: the filter above is not greedy by accident.
    tokens = np.asarray(draw(logits, jax.random.key(0), 1.0, 0, 0.51, greedy=False))
    assert {0, 1} <= set(tokens.tolist())


def test_temperature_divides_the_logits_before_top_p():
    """HF's order: the nucleus is the one of softmax(logits / temperature). A hot sampler
    (t = 2) keeps the 14 tokens reaching 0.6 of its flatter distribution, a cold one
    (t = 0.5) only the argmax; a nucleus taken of the untempered logits keeps 3 either way."""
    V, n = 50, 4000
    base = jnp.asarray(np.random.default_rng(7).normal(size=(V,)) * 2, jnp.float32)
    logits = jnp.broadcast_to(base, (n, V))
    draw = jax.jit(sample_logits, static_argnames=("greedy", "filtered"))
    order = np.argsort(-np.asarray(base))
    for t, size in ((2.0, 14), (0.5, 1)):
        p = np.asarray(jax.nn.softmax(base / t))[order]
        nucleus = int(np.searchsorted(np.cumsum(p), 0.6) + 1)
        assert nucleus == size
        got = np.asarray(draw(logits, jax.random.key(2), t, 0, 0.6, greedy=False))
        assert set(got.tolist()) == set(order[:nucleus].tolist()), t


def test_every_step_draws_with_its_own_key():
    """Sampling folds the step into the seed's key: the first token and every decode step
    draw independently. With the output head zeroed every step's distribution is uniform, so
    two steps agree in about 1/vocab of the rows; a step reusing another's key would repeat
    its token in every row."""
    cfg = dsv2_jax.load_config("tiny", num_hidden_layers=2)
    model = dsv2_jax.init_model(cfg, seed=0)
    head = model.embed_tokens.weight if cfg.tie_word_embeddings else model.lm_head.kernel
    head[...] = jnp.zeros_like(head[...])
    ids = prompts(17, (64, 4), cfg.vocab_size)
    new = dsv2_jax.generate(model, ids, 4, temperature=1.0, seed=3)[:, 4:]
    assert new.shape == (64, 4)
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.mean(new[:, a] == new[:, b]) < 0.25, (a, b)


def test_generate_sampling_reproducible_and_degenerate_filters_are_greedy(hf_models):
    _, model = hf_models["lite"]
    ids = prompts(10, (B, T))
    greedy = dsv2_jax.generate(model, ids, NEW)
    top_1 = dsv2_jax.generate(model, ids, NEW, temperature=1.3, top_k=1, seed=4)
    tiny_p = dsv2_jax.generate(model, ids, NEW, temperature=1.3, top_p=1e-6, seed=4)
    np.testing.assert_array_equal(top_1, greedy)
    np.testing.assert_array_equal(tiny_p, greedy)
    a = dsv2_jax.generate(model, ids, NEW, temperature=1.5, top_p=0.95, seed=1)
    b = dsv2_jax.generate(model, ids, NEW, temperature=1.5, top_p=0.95, seed=1)
    c = dsv2_jax.generate(model, ids, NEW, temperature=1.5, top_p=0.95, seed=2)
    np.testing.assert_array_equal(a, b)
    assert (a[:, T:] != c[:, T:]).any() and (a[:, :T] == ids).all()


# --------------------------------------------------------------------------------------
# Cache sizes and input errors.


def test_cache_size_formula():
    v2 = dsv2_jax.load_config("v2")
    layers = v2.num_hidden_layers
    assert cache_size(v2, "bfloat16").bytes_per_token == 576 * layers * 2
    assert cache_size(v2, "int8").bytes_per_token == (576 + 8) * layers
    if "fp8" in CACHE_KINDS:
        assert cache_size(v2, "fp8").bytes_per_token == 576 * layers
    assert mha_bytes_per_token(v2, 1, head_dim=128) == 2 * 128 * 128 * layers
    tiny = dsv2_jax.load_config("tiny")
    for kind in CACHE_KINDS:
        made = jax.eval_shape(lambda: init_cache(tiny, 3, 40, kind))
        nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves((made.kv, made.scale)))
        assert cache_size(tiny, kind, 3, 40).total_bytes == nbytes, kind


@pytest.mark.parametrize("kw,msg", [
    (dict(prompt_ids=np.zeros((1, 0), np.int32)), "empty prompt"),
    (dict(prompt_lengths=[0, 3]), "empty prompt"),
    (dict(prompt_ids=np.full((2, 3), 97)), "outside the vocabulary"),
    (dict(max_new_tokens=200), "exceeds max_position_embeddings"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(prompt_lengths=[4, 3]), "exceeds the prompt width 3"),
    (dict(prompt_lengths=[3]), "prompt_lengths must be 2 integers"),
    (dict(prompt_ids=np.full((2, 3), -1)), "outside the vocabulary"),
    (dict(eos_id=-1), "eos_id -1 is outside"),
])
def test_bad_arguments_raise_value_error(hf_models, kw, msg):
    _, model = hf_models["lite"]
    kw = dict(dict(prompt_ids=np.ones((2, 3), np.int32), max_new_tokens=4), **kw)
    with pytest.raises(ValueError, match=msg):
        dsv2_jax.generate(model, kw.pop("prompt_ids"), kw.pop("max_new_tokens"), **kw)


# --------------------------------------------------------------------------------------
# `dsv2 generate` on a freshly trained tiny model.


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from dsv2_jax.train.loop import TrainArgs, train

    wd = str(tmp_path_factory.mktemp("tiny_run"))
    train(TrainArgs(config="tiny", workdir=wd, steps=10, batch_size=2, seq_len=64, checkpoint_every=10,
                    log_every=1000, set=["num_hidden_layers=2"]), log=lambda *a: None)
    return wd


@functools.lru_cache(maxsize=None)
def trained_model(wd):
    return from_pretrained(wd)


def test_cli_generate_streams_text_from_a_trained_workdir(workdir, capsys):
    rc = cli_main(["generate", "--model", workdir, "--prompt", "def ", "--max-new-tokens", "12",
                   "--temperature", "0.8", "--top-k", "20", "--seed", "1"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("def ") and len(out.encode()) > len("def \n")


def test_cli_generate_uses_the_directory_tokenizer_json(hf_models, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf, _ = hf_models["lite"]
    path = ref.save(hf, str(tmp_path / "hf"))
    words = [f"w{i}" for i in range(97)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(path, "tokenizer.json"))
    rc = cli_main(["generate", "--model", path, "--prompt", "w5 w17 w3", "--max-new-tokens", "6"])
    out = capsys.readouterr().out.split()
    want = hf_greedy(hf, [[5, 17, 3]], 6)[0]
    assert rc == 0 and out == [words[i] for i in want]


@pytest.mark.parametrize("args,msg", [
    (["--prompt", ""], "empty prompt"),
    (["--ids", "1,2,300"], "outside the vocabulary"),
    (["--ids", "1,2", "--max-new-tokens", "5000"], "exceeds max_position_embeddings"),
    (["--ids", "1,2", "--top-p", "0"], "--top-p"),
    (["--ids", "1,2", "--top-p", "1.01"], "--top-p"),
    (["--ids", "1,2", "--temperature", "-1"], "--temperature"),
    (["--ids", "1,x"], "--ids"),
    (["--ids", "1,,2"], "--ids"),
    (["--ids", "1,2", "--eos-id", "500"], "eos_id 500"),
    (["--ids", "1,2", "--eos-id", ""], "--eos-id"),  # not "no stop id"
])
def test_cli_errors_are_one_line(workdir, capsys, args, msg):
    rc = cli_main(["generate", "--model", workdir, *args])
    cap = capsys.readouterr()
    assert rc == 1
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dsv2: error:") and msg in lines[0], cap.err
    assert cap.out == ""  # refused before the prompt is echoed


def test_cli_prompt_starts_with_bos_where_the_tokenizer_config_says(hf_models, tmp_path, capsys):
    """HF's convention: tokenizer_config.json's add_bos_token puts the config's BOS before a
    text prompt (as the DeepSeek-V2 releases' tokenizers do); without it the text alone."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf, _ = hf_models["lite"]
    path = ref.save(hf, str(tmp_path / "hf"))
    cfg = json.load(open(os.path.join(path, "config.json")))
    json.dump(dict(cfg, bos_token_id=9), open(os.path.join(path, "config.json"), "w"))
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(path, "tokenizer.json"))
    for add, prompt in ((None, [5, 17]), (False, [5, 17]), (True, [9, 5, 17])):
        if add is not None:
            json.dump({"add_bos_token": add}, open(os.path.join(path, "tokenizer_config.json"), "w"))
        assert cli_main(["generate", "--model", path, "--prompt", "w5 w17", "--max-new-tokens", "3"]) == 0
        out = capsys.readouterr().out.split()
        want = hf_greedy(hf, [prompt], 3)[0][len(prompt) - 2:]  # the echo starts at the text
        assert out == [f"w{i}" for i in want], add
    # a prompt that already starts with BOS gets no second one
    assert cli_main(["generate", "--model", path, "--prompt", "w9 w5 w17", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [f"w{i}" for i in hf_greedy(hf, [[9, 5, 17]], 3)[0]]


def test_cli_stops_at_any_config_eos_id_and_prints_nothing_after(hf_models, tmp_path, capsys):
    """config.json may name several stop ids (a list); `dsv2 generate` stops at whichever
    comes first, prints it, and prints nothing past it (not the padding that follows)."""
    hf, model = hf_models["lite"]
    path = ref.save(hf, str(tmp_path / "hf"))
    prompt = [5, 17, 3]
    free = dsv2_jax.generate(model, [prompt], 8)[0, 3:].tolist()
    k = next(i for i in range(1, 8) if free[i] not in free[:i])  # a first occurrence past step 0
    other = min(set(range(97)) - set(free))  # never generated: stops nothing
    cfg = json.load(open(os.path.join(path, "config.json")))
    json.dump(dict(cfg, eos_token_id=[other, free[k]]), open(os.path.join(path, "config.json"), "w"))
    capsys.readouterr()
    assert cli_main(["generate", "--model", path, "--ids", "5,17,3", "--max-new-tokens", "8"]) == 0
    printed = [int(t) for t in capsys.readouterr().out.split()]  # no tokenizer: ids
    assert printed == prompt + free[:k + 1]


def test_cli_refuses_a_directory_where_a_shard_belongs_in_one_line(hf_models, tmp_path, capsys):
    hf, _ = hf_models["lite"]
    path = ref.save(hf, str(tmp_path / "hf"))
    shard = os.path.join(path, "model.safetensors")
    os.remove(shard)
    os.mkdir(shard)
    capsys.readouterr()
    assert cli_main(["generate", "--model", path, "--ids", "1,2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsv2: error:"), err


def test_cli_error_has_no_traceback_in_a_real_process(workdir):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-m", "dsv2_jax.cli", "generate", "--model", workdir,
                        "--ids", "5", "--top-p", "2"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_generate_under_the_training_mesh_gives_the_one_device_tokens():
    """8 simulated devices: heads over tensor, experts over expert, weights stored over fsdp
    (tests/generate_mesh_check.py)."""
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = cpu_env(8)
    r = subprocess.run([sys.executable, os.path.join(here, "generate_mesh_check.py")], env=env,
                       capture_output=True, text=True, timeout=1200, cwd=os.path.dirname(here))
    assert r.returncode == 0 and "all ok" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


def test_a_run_keeps_its_tokenizer_and_a_lost_one_is_refused(tmp_path):
    """Training copies the data's tokenizer.json into the workdir (byte-level data has none
    to copy); a workdir whose run.json
    names a tokenizer not found from here is refused for --prompt (it was read as bytes)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from dsv2_jax.cli_generate import FileTokenizer, load_tokenizer
    from dsv2_jax.train.loop import _keep_tokenizer

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    run = tmp_path / "run"
    run.mkdir()
    spec = f"text:{tmp_path}/*.txt,tokenizer={tmp_path}/tok/tokenizer.json"
    _keep_tokenizer(spec, str(run))
    assert isinstance(load_tokenizer(str(run), 256), FileTokenizer)
    for no_file in ("stdlib", f"text:{tmp_path}/*.txt,tokenizer=bytes"):  # nothing to copy
        plain = tmp_path / no_file[:4]
        plain.mkdir()
        _keep_tokenizer(no_file, str(plain))
        assert os.listdir(plain) == []
    lost = tmp_path / "lost"
    lost.mkdir()
    (lost / "run.json").write_text(json.dumps({"data": "text:x/*.txt,tokenizer=gone/tokenizer.json"}))
    with pytest.raises(ValueError, match="whose tokenizer is not found from here.*--tokenizer"):
        load_tokenizer(str(lost), 256)


def test_the_tokenizer_lookup_order(tmp_path):
    """DIR/tokenizer.json first; then the tokenizer of run.json's data spec (byte-level for
    `stdlib` and `tokenizer=bytes`); then byte-level for vocab_size 256; else none. An
    unreadable run.json counts as absent."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from dsv2_jax.cli_generate import ByteTokenizer, FileTokenizer, load_tokenizer

    def model_dir(name, run_json=None):
        d = tmp_path / name
        d.mkdir()
        if run_json is not None:
            (d / "run.json").write_text(run_json)
        return str(d)

    both = model_dir("both", json.dumps({"data": "stdlib"}))
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(both, "tokenizer.json"))
    assert isinstance(load_tokenizer(both, 256), FileTokenizer)
    byte_run = model_dir("bytes", json.dumps({"data": f"text:{tmp_path}/*.txt,tokenizer=bytes"}))
    assert isinstance(load_tokenizer(byte_run, 1000), ByteTokenizer)
    for i, text in enumerate(("{not json", "[1, 2]", None)):
        d = model_dir(f"plain{i}", text)
        assert isinstance(load_tokenizer(d, 256), ByteTokenizer), text
        assert load_tokenizer(d, 97) is None, text


def test_streaming_holds_back_a_character_split_over_tokens(tmp_path):
    """Printed token by token, a character whose bytes come in several tokens appears once
    whole (not as a replacement character); an invalid byte is replaced, not an error."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from dsv2_jax.cli_generate import ByteTokenizer, FileTokenizer

    text = "héllo 日本 🎉!"
    feed = ByteTokenizer().stream_decoder()
    assert "".join(feed([b]) for b in text.encode()) == text
    assert ByteTokenizer().stream_decoder()([0xFF, 0x61]) == "\ufffda"
    tok = Tokenizer(models.BPE())  # byte-level BPE without merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=256, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    ft = FileTokenizer(str(tmp_path / "tokenizer.json"))
    ids = ft.encode(text)
    assert len(ids) == len(text.encode())
    feed = ft.stream_decoder()
    parts = [feed([i]) for i in ids]
    assert "".join(parts) == text and not any("\ufffd" in p for p in parts)


def test_cli_tokenizer_flag_and_ids_past_a_lost_tokenizer(hf_models, tmp_path, capsys):
    """--tokenizer PATH serves a directory without tokenizer.json; --ids need no tokenizer, so
    a run.json naming a lost one does not stop them (the output is ids); a config stop id
    outside the vocabulary can never be generated and is left out, not refused."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf, _ = hf_models["lite"]
    path = ref.save(hf, str(tmp_path / "hf"))
    words = [f"w{i}" for i in range(97)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "elsewhere.json"))
    want = hf_greedy(hf, [[5, 17, 3]], 4)[0]
    capsys.readouterr()
    assert cli_main(["generate", "--model", path, "--tokenizer", str(tmp_path / "elsewhere.json"),
                     "--prompt", "w5 w17 w3", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.split() == [words[i] for i in want]
    with open(os.path.join(path, "run.json"), "w") as f:
        json.dump({"data": "text:x/*.txt,tokenizer=gone/tokenizer.json"}, f)
    cfg = json.load(open(os.path.join(path, "config.json")))
    json.dump(dict(cfg, eos_token_id=500), open(os.path.join(path, "config.json"), "w"))
    assert cli_main(["generate", "--model", path, "--ids", "5,17,3", "--max-new-tokens", "4"]) == 0
    assert [int(t) for t in capsys.readouterr().out.split()] == want.tolist()


def _kept(monkeypatch, logits, temperature, top_k, top_p):
    """Which tokens `sample_logits` leaves drawable (a finite logit) for each row: the draw
    itself is replaced by a recorder, so even a token of probability 1e-8 shows."""
    seen = []

    def record(key, filtered, axis=-1):
        seen.append(np.asarray(filtered))
        return jnp.zeros(filtered.shape[:-1], jnp.int32)

    monkeypatch.setattr(jax.random, "categorical", record)
    sample_logits(jnp.asarray(logits, jnp.float32), jax.random.key(0), temperature, top_k, top_p,
                  greedy=False)
    (got,) = seen
    return np.isfinite(got)


def test_top_p_one_keeps_the_whole_top_k_and_top_p_is_of_the_top_k_survivors(monkeypatch):
    """top_p = 1 filters nothing, even where float32 rounding makes the mass before a tail
    token 1.0 (here 1 - 2e-8): top-k alone decides. top_p after top_k is taken of the
    renormalised top-k distribution, as HF applies its warpers in turn: [0.4, 0.35, 0.25]
    cut to the top 2 is [0.53, 0.47], so top_p = 0.5 keeps one token (of the untruncated
    distribution it keeps two)."""
    tail = [[0.0, 0.0, -17.0, -17.0]]
    assert _kept(monkeypatch, tail, 1.0, 4, 1.0).tolist() == [[True] * 4]
    assert _kept(monkeypatch, tail, 1.0, 2, 1.0).tolist() == [[True, True, False, False]]
    three = np.log([[0.4, 0.35, 0.25]])
    assert _kept(monkeypatch, three, 1.0, 2, 0.5).tolist() == [[True, False, False]]
    assert _kept(monkeypatch, three, 1.0, 0, 0.5).tolist() == [[True, True, False]]


def test_rows_that_all_stop_end_the_loop_and_everything_after_is_pad_id(hf_models):
    """Once every row has emitted a stop id the loop ends and the output is trimmed to the
    last row's stop (not run on to max_new_tokens); after a row's stop, and past a short
    row's end, every position is pad_id, also an explicit pad_id that is no stop id (a
    stopped row stays stopped though the pad it emits stops nothing)."""
    _, model = hf_models["v2"]
    lengths = np.array([5, 2])  # the shapes of test_mixed_prompt_lengths_equal_hf_row_by_row
    ids = prompts(12, (B, T))
    free = dsv2_jax.generate(model, ids, NEW, prompt_lengths=lengths)
    new = [free[b, n:n + NEW] for b, n in enumerate(lengths)]
    # Row 0 stops at its first token, row 1 two or more steps later: the stopped row's pad
    # must keep it stopped meanwhile.
    a = int(new[0][0])
    k = next(k for k in range(2, NEW - 1) if a not in new[1][:k + 1] and new[1][k] not in new[1][:k])
    eos = sorted({a, int(new[1][k])})
    pad = next(t for t in range(1, 97) if t not in eos)
    out = dsv2_jax.generate(model, ids, NEW, prompt_lengths=lengths, eos_id=eos, pad_id=pad)
    ends = [n + int(np.flatnonzero(np.isin(r, eos))[0]) + 1 for n, r in zip(lengths, new)]
    steps = max(e - n for e, n in zip(ends, lengths))
    assert ends[0] - lengths[0] == 1 and steps == k + 1 < NEW and out.shape == (B, T + steps)
    for b, end in enumerate(ends):
        np.testing.assert_array_equal(out[b, :end], free[b, :end])
        assert (out[b, end:] == pad).all(), (b, out[b])


def test_the_arguments_the_compiled_loop_gets(hf_models, monkeypatch):
    """What `generate` hands its compiled loop (recorded instead of run): pad_id defaults to
    the first stop id, else the config's pad_token_id, else 0; any int seed is taken modulo
    2**32 (a negative one too, as `dsv2 generate --seed -1` passes it)."""
    import dsv2_jax.generation as generation

    _, model = hf_models["lite"]
    calls = []

    def record(*args, max_len, **kw):
        calls.append(dict(zip(("seed", "eos", "pad"), (int(a) if a.ndim == 0 else a.tolist()
                                                       for a in args[8:11]))))
        return np.zeros((1, max_len), np.int32), 1

    monkeypatch.setattr(generation, "_generate_jit", record)
    ids = np.ones((1, 3), np.int32)
    dsv2_jax.generate(model, ids, 2, temperature=1.0, seed=-1)
    dsv2_jax.generate(model, ids, 2, eos_id=[7, 8])
    monkeypatch.setattr(model, "cfg", model.cfg.replace(pad_token_id=5))
    dsv2_jax.generate(model, ids, 2, seed=2**32 + 3)
    dsv2_jax.generate(model, ids, 2, eos_id=9)
    assert [c["seed"] for c in calls] == [2**32 - 1, 0, 3, 0]
    assert [c["pad"] for c in calls] == [0, 7, 5, 9]
    assert calls[1]["eos"] == [7, 8] + [-1] * 6


def test_prompt_plus_new_tokens_may_fill_the_positions_exactly():
    """The last new token is never fed back, so a prompt of T and n new tokens use positions
    up to T + n - 2: T + n == max_position_embeddings is accepted, one more refused."""
    from dsv2_jax.generation import check_inputs

    cfg = dsv2_jax.load_config("tiny")
    ids, lengths, n = np.ones((1, 3), np.int32), np.array([3]), cfg.max_position_embeddings - 3
    check_inputs(cfg, ids, lengths, n, 0.0, 0, 1.0, None)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        check_inputs(cfg, ids, lengths, n + 1, 0.0, 0, 1.0, None)


@pytest.mark.parametrize("args,msg", [
    (["--ids", "1", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--ids", "1", "--max-new-tokens", "-3"], "--max-new-tokens must be >= 1"),
    (["--ids", "1", "--top-k", "-1"], "--top-k must be >= 0"),
    (["--ids", "1", "--temperature", "nan"], "--temperature must be >= 0"),
    (["--ids", ""], "empty prompt"),
])
def test_cli_refuses_bad_flags_before_loading_the_model(tmp_path, capsys, args, msg):
    """Flags are checked before the (slow) model load: the directory named here does not
    exist, so any other message means the flag was not checked first."""
    rc = cli_main(["generate", "--model", str(tmp_path / "no-such-model"), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and msg in err[0], err


def test_cli_hands_every_flag_to_generate(hf_models, tmp_path, capsys, monkeypatch):
    """--temperature, --top-k, --top-p, --seed, --eos-id, --cache-dtype and --max-new-tokens
    reach `generate` as given (recorded instead of run)."""
    import dsv2_jax.generation as generation

    hf, _ = hf_models["lite"]
    path = ref.save(hf, str(tmp_path / "hf"))
    calls = []
    monkeypatch.setattr(generation, "generate", lambda model, ids, n, **kw: calls.append((ids, n, kw)))
    kind = "int8" if "int8" in CACHE_KINDS else CACHE_KINDS[0]
    assert cli_main(["generate", "--model", path, "--ids", "5,17", "--max-new-tokens", "3",
                     "--temperature", "0.7", "--top-k", "4", "--top-p", "0.9", "--seed", "-2",
                     "--eos-id", "4,6", "--cache-dtype", kind]) == 0
    ((ids, n, kw),) = calls
    assert ids == [[5, 17]] and n == 3
    assert {k: kw[k] for k in ("temperature", "top_k", "top_p", "seed", "eos_id", "cache_dtype")} == dict(
        temperature=0.7, top_k=4, top_p=0.9, seed=-2, eos_id=[4, 6], cache_dtype=kind)
    assert capsys.readouterr().out.split() == ["5", "17"]
