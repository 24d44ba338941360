"""The model as a research library: nnx.jit, nnx.grad (against finite differences),
jax.eval_shape, nnx.split/merge, no hidden state, parameter and compute dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from compare import rel

from dsv2_jax import init_model, load_config

# The tiny preset (4 layers: 1 dense + 3 MoE, 8 experts in 4 groups) at a larger init scale,
# so that activations are O(1) and router scores are well apart.
CFG = load_config("tiny").replace(initializer_range=0.1)
B, T = 2, 8


def _ids(seed=0, vocab=CFG.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (B, T)), jnp.int32)


def _loss(model, ids, targets):
    logits = model(ids)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


@nnx.jit
def _forward(model, ids):
    return model(ids, return_routers=True)


@nnx.jit
def _logits(model, ids):
    return model(ids)


@pytest.fixture(scope="module")
def model():
    return init_model(CFG, seed=0)


def _flat(state):
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


def test_jit_equals_eager(model):
    ids = _ids(1)
    eager = np.asarray(model(ids))
    jitted, _ = _forward(model, ids)
    np.testing.assert_allclose(np.asarray(jitted), eager, rtol=1e-5, atol=1e-5 * np.abs(eager).max())
    assert np.abs(eager).max() > 1.0  # not a degenerate all-zero output


@pytest.fixture(scope="module")
def grads(model):
    ids, targets = _ids(2), _ids(3)
    loss, g = nnx.jit(nnx.value_and_grad(_loss))(model, ids, targets)
    _, routers = _forward(model, ids)
    return ids, targets, float(loss), g, routers


def test_grad_is_finite_and_reaches_every_parameter_that_matters(model, grads):
    """Exactly the entries that cannot affect this loss have zero gradient: embedding rows of
    tokens absent from the batch, and routed experts no token chose (per layer)."""
    ids, _, loss, g, routers = grads
    assert np.isfinite(loss)
    counts = np.asarray(routers[0].expert_counts)  # [moe layers, E]
    assert (counts == 0).any() and (counts > 0).any()  # both cases occur at this size
    present = np.zeros(CFG.vocab_size, bool)
    present[np.asarray(ids).reshape(-1)] = True
    flat = _flat(g)
    assert set(flat) == set(_flat(nnx.state(model, nnx.Param)))
    for name, var in flat.items():
        a = np.asarray(var.get_value() if hasattr(var, "get_value") else var.value)
        assert np.all(np.isfinite(a)), name
        if name == "embed_tokens.weight":
            row_nonzero = np.any(a != 0, axis=-1)
            np.testing.assert_array_equal(row_nonzero, present, err_msg=name)
        elif ".experts." in name and "shared" not in name:
            per_expert = np.any(a.reshape(a.shape[0], a.shape[1], -1) != 0, axis=-1)
            np.testing.assert_array_equal(per_expert, counts > 0, err_msg=name)
        else:
            assert np.mean(a == 0) < 0.01, (name, np.mean(a == 0))


def _perturbed(state, name, index, delta):
    out = []
    for p, v in nnx.to_flat_state(state):
        if ".".join(map(str, p)) == name:
            value = v.get_value() if hasattr(v, "get_value") else v.value
            v = v.replace(value.at[index].add(delta))
        out.append((p, v))
    return nnx.from_flat_state(out)


FD_PARAMS = [
    "lm_head.kernel",
    "norm.weight",
    "embed_tokens.weight",
    "segments.0.layers.mlp.down_proj.kernel",
    "segments.1.layers.self_attn.q_b_proj.kernel",
    "segments.1.layers.self_attn.kv_a_proj_with_mqa.kernel",  # includes the rope key rows
    "segments.1.layers.self_attn.kv_a_layernorm.weight",
    "segments.1.layers.mlp.gate.kernel",
    "segments.1.layers.mlp.experts.down_proj",
    "segments.1.layers.mlp.shared_experts.up_proj.kernel",
]


def test_grad_matches_finite_differences(model, grads):
    """Central differences in float32 on the largest-gradient entry of several parameters
    (and one random entry each), with routing checked to stay the same under the step."""
    ids, targets, _, g, routers = grads
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss_and_choice(st):
        m = nnx.merge(graphdef, st)
        logits, r = m(ids, return_routers=True)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1)), r[0].topk_idx

    flat_g = _flat(g)
    rng = np.random.default_rng(0)
    eps = 3e-3
    checked = 0
    for name in FD_PARAMS:
        ga = flat_g[name]
        ga = np.asarray(ga.get_value() if hasattr(ga, "get_value") else ga.value)
        picks = [np.unravel_index(np.argmax(np.abs(ga)), ga.shape)]
        nz = np.argwhere(np.abs(ga) > 0.2 * np.abs(ga).max())
        picks.append(tuple(nz[rng.integers(len(nz))]))
        for idx in picks:
            lp, cp = loss_and_choice(_perturbed(state, name, idx, eps))
            lm, cm = loss_and_choice(_perturbed(state, name, idx, -eps))
            if not np.array_equal(np.asarray(cp), np.asarray(cm)):
                continue  # a routing flip inside the step: not differentiable there
            fd = (float(lp) - float(lm)) / (2 * eps)
            # The quotient cannot resolve below the float32 rounding of the two losses (a few
            # ulps each after the mean over tokens): 4 ulps over 2 eps, ~1.6e-4 at loss ~3.5.
            noise = 4 * float(np.spacing(np.float32(max(abs(float(lp)), abs(float(lm)))))) / (2 * eps)
            assert abs(fd - ga[idx]) <= 1e-2 * abs(ga[idx]) + noise + 2e-5, (name, idx, fd, ga[idx], noise)
            checked += 1
    assert checked >= len(FD_PARAMS) * 2 - 2


def test_split_merge_round_trip(model):
    ids = _ids(4)
    want = np.asarray(_logits(model, ids))
    graphdef, state = nnx.split(model)
    np.testing.assert_array_equal(np.asarray(_logits(nnx.merge(graphdef, state), ids)), want)
    # Through plain nested dicts of arrays (what a checkpointer stores) into a fresh model.
    pure = nnx.to_pure_dict(state)
    fresh = init_model(CFG, seed=123)
    assert not np.array_equal(np.asarray(_logits(fresh, ids)), want)
    fresh_graphdef, fresh_state = nnx.split(fresh)
    nnx.replace_by_pure_dict(fresh_state, pure)
    np.testing.assert_array_equal(np.asarray(_logits(nnx.merge(fresh_graphdef, fresh_state), ids)), want)
    # A pure function of (state, ids) under jax.jit.
    f = jax.jit(lambda st, i: nnx.merge(graphdef, st)(i))
    np.testing.assert_allclose(np.asarray(f(state, ids)), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_eval_shape_builds_nothing():
    abstract = nnx.eval_shape(lambda: init_model(CFG, seed=0))
    leaves = jax.tree.leaves(nnx.state(abstract))
    assert leaves and all(isinstance(a, jax.ShapeDtypeStruct) for a in leaves)
    graphdef, state = nnx.split(abstract)
    out, routers = jax.eval_shape(lambda s, i: nnx.merge(graphdef, s)(i, return_routers=True),
                                  state, jax.ShapeDtypeStruct((3, 5), jnp.int32))
    n_moe = CFG.num_hidden_layers - CFG.first_k_dense_replace
    assert out.shape == (3, 5, CFG.vocab_size) and out.dtype == jnp.float32
    assert routers[0].topk_idx.shape == (n_moe, 15, CFG.num_experts_per_tok)
    assert routers[0].scores.shape == (n_moe, 15, CFG.n_routed_experts)


def test_no_hidden_state(model):
    """Only parameters live in the model; a forward (eval or train) changes nothing; the same
    seed gives the same model whatever was built before; the output depends on nothing else."""
    state = nnx.state(model)
    assert len(nnx.to_flat_state(state)) == len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    ids = _ids(5)
    first = np.asarray(_logits(model, ids))
    nnx.jit(lambda m, i: m(i, train=True))(model, ids)
    init_model(CFG, seed=7)  # building another model must not disturb anything
    np.testing.assert_array_equal(np.asarray(_logits(model, ids)), first)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    jax.tree.map(np.testing.assert_array_equal, before, after)
    again = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(init_model(CFG, seed=0))))
    jax.tree.map(np.testing.assert_array_equal, before, again)
    other = nnx.state(init_model(CFG, seed=1), nnx.Param)
    assert not np.array_equal(np.asarray(other["lm_head"]["kernel"][...]), before["lm_head"]["kernel"])


@pytest.mark.parametrize("param_dtype,dtype", [("bfloat16", "bfloat16"), ("float32", "bfloat16"),
                                               ("bfloat16", "float32")])
def test_reduced_precision(model, param_dtype, dtype):
    """Same seed, lower precision: the router stays float32, activations take the compute
    dtype, logits come back float32 and stay close to the float32 model's."""
    cfg = CFG.replace(param_dtype=param_dtype, dtype=dtype)
    low = init_model(cfg, seed=0)
    for name, var in _flat(nnx.state(low, nnx.Param)).items():
        want = jnp.float32 if name.endswith("mlp.gate.kernel") else jnp.dtype(param_dtype)
        assert var.dtype == want, (name, var.dtype)
    ids = _ids(6)
    h, _ = nnx.jit(lambda m, i: m.hidden_states(i))(low, ids)
    assert h.dtype == jnp.dtype(dtype)
    logits, routers = _forward(low, ids)
    ref_logits, ref_routers = _forward(model, ids)
    assert logits.dtype == jnp.float32
    err = rel(logits, ref_logits)
    print(f"{param_dtype} params, {dtype} compute: logit relative error {err:.2e}")
    assert err < 0.1, err
    # Most routing decisions survive the precision change.
    same = np.asarray(routers[0].topk_idx) == np.asarray(ref_routers[0].topk_idx)
    assert same.mean() > 0.8, same.mean()
    assert err > 1e-5 or (param_dtype, dtype) == ("float32", "float32")  # bf16 really used


def test_forward_compiler_options_give_the_default_logits(model, monkeypatch):
    """`dsv2 eval` and the bench's prefill compile with `forward_compiler_options` (on CPU:
    YNNPACK for reductions only): the same logits as the default compile, at an odd shape."""
    from dsv2_jax.compile_options import forward_compiler_options, jit_forward

    opts = forward_compiler_options()
    if jax.default_backend() == "cpu":
        assert opts, "this XLA:CPU should accept the forward options"
    graphdef, state = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(5).integers(0, CFG.vocab_size, (3, 13)), jnp.int32)
    f = lambda st, x: nnx.merge(graphdef, st)(x)  # noqa: E731
    want = np.asarray(jax.jit(f)(state, ids))
    got = np.asarray(jit_forward(f)(state, ids))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.abs(want).max() > 1.0
    # ...and jit_forward really compiles with them (equal logits cannot show it).
    seen = {}
    monkeypatch.setattr(jax, "jit", lambda fn, **kw: seen.update(kw) or fn)
    jit_forward(f, donate_argnums=())
    assert seen == {"compiler_options": opts or None, "donate_argnums": ()}


def test_forward_reads_routed_experts_from_the_stacks(model):
    """Outside training a MoE layer's experts are read from the segment's stacks by index: the
    compiled forward makes no [E, D, F] / [E, F, D] array (a layer's experts sliced out, which
    XLA:CPU copies), while the training-mode forward, which keeps the slices, does."""
    import re

    E, D, F = CFG.n_routed_experts, CFG.hidden_size, CFG.moe_intermediate_size
    graphdef, state = nnx.split(model)
    ids = _ids(seed=9)
    per_layer = re.compile(rf"= f32\[({E},{D},{F}|{E},{F},{D})\]")

    def hlo(train):
        f = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x, train=train))
        return f.lower(state, ids).compile().as_text()

    assert not per_layer.search(hlo(False)), "a layer's experts were sliced out of the stacks"
    assert per_layer.search(hlo(True)), "the check found no per-layer expert array in training mode"


def test_padding_segment_zero_reaches_the_routers_as_invalid(model):
    """Segment id 0 marks padding: the model hands `segment_ids > 0` to every MoE layer, whose
    router output then leaves those tokens out of counts, capacity and balance losses. The
    loss tests check that on router outputs built by hand; this checks the model's side."""
    seg = np.ones((B, T), np.int32)
    seg[1, T - 3:] = 0
    seg[0, T // 2:] = 2  # a second packed document is real
    _, routers = model(_ids(4), segment_ids=jnp.asarray(seg), return_routers=True)
    assert routers
    want = (seg > 0).reshape(-1)
    for r in routers:
        valid = np.asarray(r.valid)
        assert valid.shape[-1] == B * T, valid.shape
        rows = valid.reshape(-1, B * T)  # one row per layer of the segment
        np.testing.assert_array_equal(rows, np.broadcast_to(want, rows.shape))
