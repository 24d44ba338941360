"""Routed experts: both grouped-matmul backends against a plain per-token numpy reference,
with hypothesis-drawn ragged groups (empty groups, everything on one expert); gradients of the
two backends against each other; routing rules that the HF parity cases do not pin down."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dsv2_jax import load_config
from dsv2_jax.moe import expert_ffn, gmm_backend, routed_experts, select_experts

BACKENDS = ("blocked", "ragged_dot")
E, D, F = 5, 6, 7
# Deterministic examples (CI must not flake); each distinct shape costs one compile.
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, print_blob=True)


def _weights(seed):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((E, D, F)).astype(np.float32) / D ** 0.5,
            rng.standard_normal((E, D, F)).astype(np.float32) / D ** 0.5,
            rng.standard_normal((E, F, D)).astype(np.float32) / F ** 0.5)


def _ffn_np(x, wg, wu, wd):
    """One SwiGLU expert in float64."""
    x, wg, wu, wd = (np.asarray(a, np.float64) for a in (x, wg, wu, wd))
    g = x @ wg
    return (g / (1.0 + np.exp(-g)) * (x @ wu)) @ wd


def _close(got, want, tol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(np.max(np.abs(want)), 1e-30)
    assert np.max(np.abs(got - want)) <= tol * scale, np.max(np.abs(got - want)) / scale


@functools.partial(jax.jit, static_argnames="backend")
def _expert_ffn(xs, group_sizes, wg, wu, wd, backend):
    return expert_ffn(xs, group_sizes, wg, wu, wd, backend)


@functools.partial(jax.jit, static_argnames="backend")
def _routed(x, idx, w, wg, wu, wd, backend):
    return routed_experts(x, idx, w, wg, wu, wd, backend)


@st.composite
def ragged_groups(draw):
    """(M, group sizes [E]) with sum M: E - 1 sorted cut points in [0, M], so empty groups and
    single-expert splits come up often."""
    M = draw(st.sampled_from([1, 9, 24]))
    cuts = sorted(draw(st.lists(st.integers(0, M), min_size=E - 1, max_size=E - 1)))
    bounds = [0] + cuts + [M]
    return M, [b - a for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(groups=ragged_groups(), seed=st.integers(0, 2**16))
@example(groups=(24, [24, 0, 0, 0, 0]), seed=0)  # everything on the first expert
@example(groups=(24, [0, 0, 0, 0, 24]), seed=1)  # everything on the last
@example(groups=(9, [0, 4, 0, 5, 0]), seed=2)  # empty groups between and around
@example(groups=(1, [0, 0, 1, 0, 0]), seed=3)
def test_expert_ffn_matches_per_row_reference(backend, groups, seed):
    M, sizes = groups
    wg, wu, wd = _weights(seed)
    xs = np.random.default_rng(seed + 1).standard_normal((M, D)).astype(np.float32)
    got = _expert_ffn(xs, jnp.asarray(sizes, jnp.int32), wg, wu, wd, backend)
    expert_of_row = np.repeat(np.arange(E), sizes)
    want = np.stack([_ffn_np(xs[r], wg[e], wu[e], wd[e]) for r, e in enumerate(expert_of_row)])
    _close(got, want)


@st.composite
def routings(draw):
    """(T, topk_idx [T, K], topk_weight [T, K]): K distinct experts per token, drawn freely,
    or skewed so that one expert takes every token and others none."""
    T = draw(st.sampled_from([1, 13]))
    K = draw(st.sampled_from([1, 3]))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    kind = draw(st.sampled_from(["random", "one_hot_expert", "two_experts"]))
    if kind == "random":
        idx = np.stack([rng.permutation(E)[:K] for _ in range(T)])
    elif kind == "one_hot_expert":  # every token's first choice is expert `hot`
        hot = draw(st.integers(0, E - 1))
        rest = [e for e in range(E) if e != hot]
        idx = np.stack([np.r_[hot, rng.permutation(rest)[: K - 1]] for _ in range(T)])
    else:  # only experts 1 and 3 (and for K = 3 one more) ever chosen
        idx = np.stack([np.r_[[1, 3][:K], [4][: max(0, K - 2)]] for _ in range(T)])[:, :K]
    weight = rng.uniform(0.1, 2.0, (T, K)).astype(np.float32)
    return T, idx.astype(np.int32), weight


def _routed_np(x, idx, weight, wg, wu, wd):
    """Every token through its own chosen experts, one at a time."""
    out = np.zeros(x.shape, np.float64)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[t, k]
            out[t] += weight[t, k] * _ffn_np(x[t], wg[e], wu[e], wd[e])
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(routing=routings(), seed=st.integers(0, 2**16))
def test_routed_experts_matches_per_token_reference(backend, routing, seed):
    T, idx, weight = routing
    wg, wu, wd = _weights(seed)
    x = np.random.default_rng(seed + 7).standard_normal((T, D)).astype(np.float32)
    got = _routed(x, idx, weight, wg, wu, wd, backend)
    _close(got, _routed_np(x, idx, weight, wg, wu, wd))


def _loss_grads(backend, x, idx, weight, wg, wu, wd, probe):
    def loss(x, weight, wg, wu, wd):
        return jnp.sum(routed_experts(x, idx, weight, wg, wu, wd, backend) * probe)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(x, weight, wg, wu, wd)


def _dense_jnp(x, idx, weight, wg, wu, wd):
    """Differentiable plain reference: gather each token's expert weights."""
    g = jnp.einsum("td,tkdf->tkf", x, wg[idx])
    u = jnp.einsum("td,tkdf->tkf", x, wu[idx])
    y = jnp.einsum("tkf,tkfd->tkd", jax.nn.silu(g) * u, wd[idx])
    return jnp.einsum("tkd,tk->td", y, weight)


@settings(SETTINGS, max_examples=12)
@given(routing=routings(), seed=st.integers(0, 2**16))
def test_backend_gradients_agree(routing, seed):
    T, idx, weight = routing
    wg, wu, wd = _weights(seed)
    rng = np.random.default_rng(seed + 11)
    x = rng.standard_normal((T, D)).astype(np.float32)
    probe = rng.standard_normal((T, D)).astype(np.float32)
    blocked = _loss_grads("blocked", x, idx, weight, wg, wu, wd, probe)
    ragged = _loss_grads("ragged_dot", x, idx, weight, wg, wu, wd, probe)
    dense = jax.grad(lambda *a: jnp.sum(_dense_jnp(a[0], idx, *a[1:]) * probe),
                     argnums=(0, 1, 2, 3, 4))(x, weight, wg, wu, wd)
    unused = np.setdiff1d(np.arange(E), idx)
    for name, a, b, c in zip(("x", "weight", "w_gate", "w_up", "w_down"), blocked, ragged, dense):
        _close(a, b)
        _close(a, c)
        assert np.all(np.isfinite(np.asarray(a))), name
        if name.startswith("w_"):
            # Experts no token chose get exactly no gradient; every chosen one gets some.
            assert not np.any(np.asarray(a)[unused]), name
            used = np.unique(idx)
            assert np.all(np.abs(np.asarray(a)[used]).reshape(len(used), -1).max(-1) > 0), name


@pytest.mark.parametrize("backend", BACKENDS)
@settings(SETTINGS, max_examples=8)
@given(routing=routings(), seed=st.integers(0, 2**16))
def test_layer_of_stacks_equals_its_slice(backend, routing, seed):
    """Experts read from a segment's stacks by layer index (forward passes): the values and
    the gradients of routing through layer i's slice; the other layers get no gradient."""
    T, idx, weight = routing
    L, i = 3, seed % 3
    rng = np.random.default_rng(seed + 5)
    per_layer = [_weights(seed + j) for j in range(L)]
    stacks = [np.stack([w[k] for w in per_layer]) for k in range(3)]  # [L, E, ...] each
    x = rng.standard_normal((T, D)).astype(np.float32)
    probe = rng.standard_normal((T, D)).astype(np.float32)

    def loss(x, wg, wu, wd, layer):
        return jnp.sum(routed_experts(x, idx, weight, wg, wu, wd, backend, layer=layer) * probe)

    got, g_got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, *stacks, jnp.int32(i))
    want, g_want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, *(s[i] for s in stacks), None)
    _close(got, want)
    _close(g_got[0], g_want[0])
    for a, b in zip(g_got[1:], g_want[1:]):
        _close(np.asarray(a)[i], b)
        assert not np.any(np.delete(np.asarray(a), i, axis=0))


def test_boundary_rejects_mismatched_shapes():
    """A caller's shape error stops at the routed experts' boundary with the shapes named,
    instead of surfacing as a broadcast error deep inside a backend's loop."""
    wg, wu, wd = map(jnp.asarray, _weights(0))
    T, K = 5, 2
    x = jnp.zeros((T, D), jnp.float32)
    idx, weight = jnp.zeros((T, K), jnp.int32), jnp.full((T, K), 0.5, jnp.float32)
    routed_experts(x, idx, weight, wg, wu, wd, "blocked")  # the right shapes pass
    with pytest.raises(AssertionError, match="shape"):
        routed_experts(x, idx, weight, wg, wu, jnp.swapaxes(wd, 1, 2), "blocked")  # w_down [E, D, F]
    with pytest.raises(AssertionError):
        routed_experts(x[:, :-1], idx, weight, wg, wu, wd, "blocked")  # x's width is not D
    with pytest.raises(AssertionError):
        routed_experts(x, idx, weight[:, :1], wg, wu, wd, "blocked")  # weights [T, 1] for K = 2
    with pytest.raises(AssertionError):
        routed_experts(x, idx, weight, wg, wu, wd, "blocked", layer=0)  # stacks expected


def test_backend_choice_is_one_place():
    cfg = load_config("tiny")
    assert gmm_backend(cfg.replace(moe_backend="ragged_dot")) == "ragged_dot"
    assert gmm_backend(cfg.replace(moe_backend="blocked")) == "blocked"
    want = "blocked" if jax.default_backend() == "cpu" else "ragged_dot"
    assert gmm_backend(cfg.replace(moe_backend="auto")) == want
    # A backend name the grouped matmul does not know is refused, not run as another one.
    wg, wu, wd = _weights(0)
    with pytest.raises(ValueError, match="unknown grouped-matmul backend 'ragged'"):
        expert_ffn(jnp.zeros((4, D), jnp.float32), jnp.asarray([4, 0, 0, 0, 0], jnp.int32), wg, wu, wd, "ragged")


def _scores(rows):
    s = np.asarray(rows, np.float32)
    return jnp.asarray(s / s.sum(-1, keepdims=True))


def test_group_limit_keeps_groups_by_their_best_expert():
    """V2 keeps the groups with the highest MAX score (V3 would sum the top two). Group 0 has
    the single best expert; group 1 has the larger sum of its top two."""
    cfg = load_config("tiny").replace(
        n_routed_experts=4, n_group=2, topk_group=1, num_experts_per_tok=2, norm_topk_prob=False,
        routed_scaling_factor=1.0, num_device_groups=0, max_devices_per_token=0)
    s = _scores([[0.40, 0.01, 0.30, 0.29]])
    idx, w = select_experts(s, cfg)
    assert sorted(np.asarray(idx)[0].tolist()) == [0, 1]
    # Greedy over all experts would have taken 0 and 2.
    idx, _ = select_experts(s, cfg.replace(topk_method="greedy", n_group=1, topk_group=1))
    assert sorted(np.asarray(idx)[0].tolist()) == [0, 2]


def test_scaling_and_normalisation_rules():
    base = load_config("tiny").replace(
        n_routed_experts=4, topk_method="greedy", n_group=1, topk_group=1, num_experts_per_tok=2,
        routed_scaling_factor=16.0, num_device_groups=0, max_devices_per_token=0)
    s = _scores([[0.5, 0.2, 0.2, 0.1], [0.1, 0.1, 0.3, 0.5]])
    _, w = select_experts(s, base.replace(norm_topk_prob=False))
    np.testing.assert_allclose(np.asarray(w), [[8.0, 3.2], [8.0, 4.8]], rtol=1e-6)
    _, w = select_experts(s, base.replace(norm_topk_prob=True))
    np.testing.assert_allclose(np.asarray(w), [[5 / 7, 2 / 7], [5 / 8, 3 / 8]], rtol=1e-6)
    _, w = select_experts(s, base.replace(norm_topk_prob=True, num_experts_per_tok=1))
    np.testing.assert_allclose(np.asarray(w), [[8.0], [8.0]], rtol=1e-6)


def test_device_limit_applies_in_training_only():
    cfg = load_config("tiny").replace(
        n_routed_experts=4, topk_method="greedy", n_group=1, topk_group=1, num_experts_per_tok=2,
        routed_scaling_factor=1.0, num_device_groups=2, max_devices_per_token=1)
    s = _scores([[0.4, 0.1, 0.3, 0.2]])
    idx, _ = select_experts(s, cfg, train=False)
    assert sorted(np.asarray(idx)[0].tolist()) == [0, 2]
    idx, _ = select_experts(s, cfg, train=True)
    assert sorted(np.asarray(idx)[0].tolist()) == [0, 1]


def test_device_limit_ranks_devices_within_the_kept_groups():
    """Group-limited and device-limited routing together (devices splitting the expert
    groups): the devices are ranked by their best expert among those the group limit left.
    Group 0 (experts 0-3) holds the best expert and is kept; within it devices 0 {0, 1} and
    1 {2, 3} are the best two, so experts 0 and 2 are chosen. Ranking devices on the raw
    scores would keep devices 0 and 2, of which only {0, 1} survive the group limit: a token
    would lose its second-best allowed expert (and, for other scores, be left with fewer
    than K experts)."""
    cfg = load_config("tiny").replace(
        n_routed_experts=8, topk_method="group_limited_greedy", n_group=2, topk_group=1,
        num_experts_per_tok=2, norm_topk_prob=False, routed_scaling_factor=1.0,
        num_device_groups=4, max_devices_per_token=2)
    s = _scores([[0.30, 0.02, 0.03, 0.01, 0.25, 0.20, 0.10, 0.09]])
    idx, w = select_experts(s, cfg, train=True)
    assert sorted(np.asarray(idx)[0].tolist()) == [0, 2]
    np.testing.assert_allclose(np.sort(np.asarray(w)[0]), [0.03, 0.30], rtol=1e-6)
    # At inference only the group limit applies: the same two experts.
    idx, _ = select_experts(s, cfg, train=False)
    assert sorted(np.asarray(idx)[0].tolist()) == [0, 2]
    # Over random scores: every chosen expert is in a kept group and on one of at most M
    # devices, and the choice is the top-K of the experts satisfying both limits.
    rng = np.random.default_rng(0)
    s = jax.nn.softmax(jnp.asarray(rng.normal(size=(200, 8)) * 2, jnp.float32), axis=-1)
    idx, w = select_experts(s, cfg, train=True)
    idx, w, sn = np.asarray(idx), np.asarray(w), np.asarray(s)
    for t in range(len(sn)):
        group = int(np.argmax(sn[t].reshape(2, 4).max(-1)))
        assert set((idx[t] // 4).tolist()) == {group}, t
        assert len(set((idx[t] // 2).tolist())) <= 2, t
        within = sn[t].copy()
        within[np.arange(8) // 4 != group] = -1
        devices = np.argsort(-within.reshape(4, 2).max(-1))[:2]
        within[~np.isin(np.arange(8) // 2, devices)] = -1
        assert sorted(idx[t].tolist()) == sorted(np.argsort(-within)[:2].tolist()), t
        np.testing.assert_allclose(np.sort(w[t]), np.sort(sn[t][idx[t]]), rtol=1e-6)


def test_rows_per_token_limit_at_v2_shapes():
    """M, the most device groups one token reaches, sets every capacity (ceil(cf * T * M /
    G)). V2: K = 6 experts over 8 device groups with at most 3 per token: M = 3 in training
    over the device groups, min(K, G) otherwise (inference, or other groups than the
    device groups). A tiny config (K = max_devices_per_token = 2) cannot tell them apart."""
    from dsv2_jax.moe.routing import route, rows_per_token_limit

    cfg = load_config("v2")
    assert (cfg.num_experts_per_tok, cfg.num_device_groups, cfg.max_devices_per_token) == (6, 8, 3)
    assert rows_per_token_limit(cfg, 8, train=True) == 3
    assert rows_per_token_limit(cfg, 8, train=False) == 6
    assert rows_per_token_limit(cfg, 160, train=True) == 6  # every expert its own group
    assert rows_per_token_limit(cfg, 4, train=True) == 4
    off = cfg.replace(num_device_groups=0, max_devices_per_token=0)
    assert rows_per_token_limit(off, 8, train=True) == 6
    # K = 3 experts, each token confined to 1 of 2 device groups: M = 1, so a group's
    # capacity is ceil(1.0 * 8 * 1 / 2) = 4 rows (not 12 = ceil(8 * 3 / 2)). Every token
    # is pushed to group 0: 4 of its 8 rows survive.
    small = load_config("tiny").replace(
        n_routed_experts=8, topk_method="greedy", n_group=1, topk_group=1, num_experts_per_tok=3,
        num_device_groups=2, max_devices_per_token=1, capacity_factor=1.0, never_drop_fraction=0.0)
    assert rows_per_token_limit(small, 2, train=True) == 1
    D = small.hidden_size
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, D)), jnp.float32).at[:, 0].set(5.0)
    kernel = jnp.asarray(np.random.default_rng(2).normal(size=(D, 8)) * 0.1, jnp.float32)
    kernel = kernel.at[0, :4].add(2.0)  # experts 0-3 (device group 0) score far above
    r = route(x, kernel, small, train=True, batch=1)
    assert (np.asarray(r.topk_idx) < 4).all()  # every token's 3 experts in group 0
    assert np.asarray(r.rows).tolist().count(1) == 4 and int(np.asarray(r.rows).sum()) == 4
    assert int(np.asarray(r.keep).sum()) == 4 * 3


def test_expert_axis_maps_the_device_groups_onto_its_devices():
    """`expert_parallel_config` (what `dsv2 train` and the plan run on an expert axis): no
    device groups becomes the ep devices with no limit (M = ep: a token may reach every
    device, as routing without groups does); groups equal to the devices stay; other groups
    keep the fraction a token reaches, rounded, raised until M devices hold K experts."""
    from dsv2_jax.moe.routing import expert_parallel_config

    base = load_config("tiny").replace(n_routed_experts=16, num_experts_per_tok=5, topk_method="greedy",
                                       n_group=1, topk_group=1)
    said = []
    off = base.replace(num_device_groups=0, max_devices_per_token=0)
    for ep in (2, 4, 8):
        got = expert_parallel_config(off, ep, said.append)
        assert (got.num_device_groups, got.max_devices_per_token) == (ep, ep)
    same = base.replace(num_device_groups=4, max_devices_per_token=2)
    assert expert_parallel_config(same, 4, said.append) is same and expert_parallel_config(same, 1) is same
    assert not said
    # (16, 5, 8): 5 of 16 is 2.5 of 8, rounded to 2, but 2 devices of 2 experts hold 4 < K = 5.
    for (groups, limit, ep), want in {(8, 3, 4): 2, (4, 2, 2): 1, (16, 8, 8): 4, (16, 5, 8): 3}.items():
        got = expert_parallel_config(base.replace(num_device_groups=groups, max_devices_per_token=limit),
                                     ep, said.append)
        assert (got.num_device_groups, got.max_devices_per_token) == (ep, want), (groups, limit, ep)
    assert "each token reaches at most 3 of 8 (the config says 5 of 16 groups)" in said[-1]
    with pytest.raises(ValueError, match="not divisible by 3"):
        expert_parallel_config(same, 3)


@settings(SETTINGS, max_examples=10)
@given(routing=routings(), seed=st.integers(0, 2**16), window=st.sampled_from([None, 1, 2, 4]))
def test_decode_routing_reads_the_stacks_window_by_window(routing, seed, window):
    """`routed_experts_stacked` (decode: one loop over all windows, each window's expert
    found by a search over the experts' window counts) against the per-token reference, at
    the default window (`decode_window_rows`) and at 1, 2, 4 rows: a window given to the
    wrong expert, or an expert's last window cut wrongly, changes a token's output."""
    from dsv2_jax.moe.gmm import routed_experts_stacked

    T, idx, weight = routing
    L, i = 2, seed % 2
    per_layer = [_weights(seed + j) for j in range(L)]
    stacks = [np.stack([w[k] for w in per_layer]) for k in range(3)]
    x = np.random.default_rng(seed + 3).standard_normal((T, D)).astype(np.float32)
    got = jax.jit(lambda x, *s: routed_experts_stacked(x, idx, weight, *s, jnp.int32(i), window))(x, *stacks)
    _close(got, _routed_np(x, idx, weight, *per_layer[i]))


def test_window_sizes():
    """The window rows the docstrings give (and docs/benchmarks.md measured): decode's 1 row
    for one token, else half the largest power of two <= tokens, between 2 and 8; the
    blocked backend's about a quarter of the mean group, a power of two between 8 and 128."""
    from dsv2_jax.moe.gmm import decode_window_rows, window_rows

    assert [decode_window_rows(t) for t in (0, 1, 2, 3, 4, 7, 8, 15, 16, 100)] == [1, 1, 2, 2, 2, 2, 4, 4, 8, 8]
    assert window_rows(4096, 64) == 32   # mean group 64
    assert window_rows(1000, 4) == 64    # mean 250: 125 -> 64
    assert window_rows(10, 64) == 8      # tiny groups: the floor
    assert window_rows(2 ** 20, 8) == 128  # the ceiling


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_past_the_groups_come_out_as_zeros(backend):
    """Rows past sum(group_sizes) (assignments dropped by the capacity limit sort last) come
    out as zeros whatever they hold, so a dropped assignment adds nothing to its token: the
    last expert's last window, which runs past its rows, must not write into them."""
    rng, seed = np.random.default_rng(), int(np.random.SeedSequence().entropy % 2**16)
    sizes, M = [3, 0, 4, 0, 2], 13  # 9 rows in groups, the last group ending mid-window
    wg, wu, wd = _weights(seed)
    xs = rng.standard_normal((M, D)).astype(np.float32)
    got = np.asarray(_expert_ffn(xs, jnp.asarray(sizes, jnp.int32), wg, wu, wd, backend))
    assert not got[9:].any(), (seed, got[9:])
    expert_of_row = np.repeat(np.arange(E), sizes)
    _close(got[:9], np.stack([_ffn_np(xs[r], wg[e], wu[e], wd[e]) for r, e in enumerate(expert_of_row)]))
