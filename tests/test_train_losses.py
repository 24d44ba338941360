"""Balance losses, token dropping and training gradients, each against an independent
reference (hand-written numpy; torch autograd of the HF model)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_reference as ref
from batches import token_batch
from dsv2_jax import DeepseekV2Config, from_pretrained
from dsv2_jax.checkpoint.hf import param_map
from dsv2_jax.moe import RouterOutput, balance_losses, capacity_keep, never_drop_tokens, select_experts
from dsv2_jax.train.step import ModelFns, loss_and_stats, params_of


def _cfg(**kw):
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=24, moe_intermediate_size=8,
                num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=8, q_lora_rank=None,
                qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, n_routed_experts=8,
                n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1)
    base.update(kw)
    return DeepseekV2Config(**base)


def _router_out(scores, idx):
    T, K = idx.shape
    return RouterOutput(jnp.log(scores), jnp.asarray(scores), jnp.asarray(idx, jnp.int32),
                        jnp.ones((T, K)), jnp.zeros(scores.shape[1], jnp.int32), jnp.ones((T, K), bool),
                        jnp.ones(T, bool))


def _numpy_losses(scores, idx, B, E, K, D, M, seq_aux):
    """The paper's formulas, written with plain loops."""
    T_all = scores.shape[0]
    lanes = B if seq_aux else 1
    T = T_all // lanes
    exp_l, dev_l, com_l = [], [], []
    per = E // D
    for b in range(lanes):
        s = scores[b * T:(b + 1) * T]
        ch = idx[b * T:(b + 1) * T]
        f = np.zeros(E)
        for t in range(T):
            for e in ch[t]:
                f[e] += 1
        f *= E / (K * T)
        P = s.mean(0)
        exp_l.append(sum(f[i] * P[i] for i in range(E)))
        fd = [np.mean(f[d * per:(d + 1) * per]) for d in range(D)]
        Pd = [np.sum(P[d * per:(d + 1) * per]) for d in range(D)]
        dev_l.append(sum(fd[d] * Pd[d] for d in range(D)))
        fc = np.zeros(D)
        for t in range(T):
            for d in {int(e) // per for e in ch[t]}:
                fc[d] += 1
        fc *= D / (M * T)
        com_l.append(sum(fc[d] * Pd[d] for d in range(D)))
    return np.mean(exp_l), np.mean(dev_l), np.mean(com_l)


@pytest.mark.parametrize("seq_aux", [True, False])
def test_balance_losses_match_hand_computation(seq_aux):
    rng = np.random.default_rng(7)
    B, S, E, K, D, M = 3, 5, 8, 3, 4, 2
    cfg = _cfg(n_routed_experts=E, num_experts_per_tok=K, num_device_groups=D,
               max_devices_per_token=M, seq_aux=seq_aux)
    logits = rng.normal(size=(B * S, E)) * 2
    scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    idx, _ = select_experts(jnp.asarray(scores, jnp.float32), cfg, train=True)
    idx = np.asarray(idx)
    assert all(len({int(e) // (E // D) for e in row}) <= M for row in idx)  # device-limited
    got = balance_losses(_router_out(scores.astype(np.float32), idx), cfg, B)
    want = _numpy_losses(scores, idx, B, E, K, D, M, seq_aux)
    for name, w in zip(("expert", "device", "comm"), want):
        np.testing.assert_allclose(float(got[name]), w, rtol=1e-5, err_msg=name)


def test_balance_losses_are_one_when_perfectly_balanced():
    # Every expert chosen equally often with uniform scores: f_i = 1, P_i = 1/E -> loss 1.
    E, K = 4, 2
    cfg = _cfg(n_routed_experts=E, num_experts_per_tok=K, num_device_groups=2, max_devices_per_token=2)
    idx = np.array([[0, 1], [2, 3], [0, 2], [1, 3]])
    scores = np.full((4, E), 1 / E, np.float32)
    got = balance_losses(_router_out(scores, idx), cfg, 1)
    assert math.isclose(float(got["expert"]), 1.0, rel_tol=1e-6)
    assert math.isclose(float(got["device"]), 1.0, rel_tol=1e-6)


def test_comm_loss_counts_at_most_k_devices_per_token():
    """A token reaches at most K device groups, so a limit M above K (the mesh mapping gives
    M = the expert axis when the config sets no limit) normalises by K: balanced sends give
    a communication loss of 1, not K / M."""
    E, K, D = 8, 2, 4
    cfg = _cfg(n_routed_experts=E, num_experts_per_tok=K, num_device_groups=D, max_devices_per_token=D)
    idx = np.array([[0, 2], [4, 6], [1, 5], [3, 7]])  # every token to two groups, each group 2x
    scores = np.full((4, E), 1 / E, np.float32)
    got = balance_losses(_router_out(scores, idx), cfg, 1)
    assert math.isclose(float(got["comm"]), 1.0, rel_tol=1e-6), float(got["comm"])


def test_training_loss_weighs_each_balance_loss_by_its_own_alpha():
    """loss = ce + alpha1 * expert + alpha2 * device + alpha3 * comm, each from the step's own
    statistics. With three different weights and device != comm a swapped pair shows."""
    from dsv2_jax import init_model, load_config

    a1, a2, a3 = 0.01, 0.5, 0.05
    cfg = load_config("tiny", num_hidden_layers=2, aux_loss_alpha=a1, device_aux_loss_alpha=a2,
                      comm_aux_loss_alpha=a3)
    assert cfg.num_device_groups and cfg.max_devices_per_token < cfg.num_device_groups
    model = init_model(cfg, seed=2)
    B, T = 2, 8
    batch = token_batch(cfg.vocab_size, B, T, seed=3)
    loss, st = jax.jit(lambda p: loss_and_stats(ModelFns.from_model(model), cfg, p, batch))(params_of(model))
    ce, expert, device, comm = (float(st[k]) for k in ("ce", "expert_loss", "device_loss", "comm_loss"))
    assert min(expert, device, comm) > 0.1 and abs(device - comm) > 0.05, (expert, device, comm)
    want = ce + a1 * expert + a2 * device + a3 * comm
    assert float(loss) == pytest.approx(want, rel=1e-6, abs=0)
    swapped = ce + a1 * expert + a3 * device + a2 * comm
    assert abs(want - swapped) > 100 * 1e-6 * want  # the check above can tell them apart


def test_router_statistics_are_per_layer_figures_averaged_over_the_moe_layers():
    """The step's expert-load metrics, from the routers' own decisions: load_max_over_mean
    and load_min_over_mean are each MoE layer's busiest and idlest expert over its mean load,
    averaged over the layers; dropped_fraction the share of the real tokens' K assignments
    removed by dropping; rows_per_token the mean device rows of the real tokens (padding is
    never sent and counts nowhere), rows_per_token_max the most of any token. Three layers
    (two MoE), capacity 0.5 and a padded row make each figure tell its alternatives apart."""
    from dsv2_jax import init_model, load_config

    cfg = load_config("tiny", num_hidden_layers=3, capacity_factor=0.5)
    model = init_model(cfg, seed=4)
    batch = token_batch(cfg.vocab_size, 2, 16, seed=5, pad=6)
    fns, params = ModelFns.from_model(model), params_of(model)
    _, st = jax.jit(lambda p: loss_and_stats(fns, cfg, p, batch))(params)
    _, routers = model.hidden_states(batch["inputs"], batch["positions"], batch["segment_ids"], train=True)
    counts = np.concatenate([np.asarray(r.expert_counts) for r in routers]).astype(np.float64)  # [L, E]
    valid = np.concatenate([np.asarray(r.valid) for r in routers])  # [L, T]
    keep = np.concatenate([np.asarray(r.keep) for r in routers])  # [L, T, K]
    rows = np.concatenate([np.asarray(r.rows) for r in routers]).astype(np.float64)  # [L, T]
    L, K = counts.shape[0], keep.shape[-1]
    assert L == 2 and not valid.all() and valid.sum() == L * (2 * 16 - 6)
    mean = counts.mean(-1)
    want = {"load_max_over_mean": np.mean(counts.max(-1) / mean),
            "load_min_over_mean": np.mean(counts.min(-1) / mean),
            "dropped_fraction": np.mean([1 - (keep[i] & valid[i][:, None]).sum() / (valid[i].sum() * K)
                                         for i in range(L)]),
            "rows_per_token": np.mean([rows[i][valid[i]].mean() for i in range(L)]),
            "rows_per_token_max": rows.max()}
    got = {k: float(st[k]) for k in want}
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-6, err_msg=str(got))
    # the figures are not degenerate: each alternative reading would differ
    assert want["load_max_over_mean"] > 1 > want["load_min_over_mean"]
    assert np.ptp(counts.max(-1) / mean) > 0 and want["dropped_fraction"] > 0
    assert rows[~valid].max() < want["rows_per_token"]


def test_token_dropping_drops_lowest_affinity_rows_and_spares_protected():
    """A row is one token sent to one device group (all its experts there); each group takes
    `capacity` rows; over it the rows with the lowest summed score on that group go."""
    rng = np.random.default_rng(3)
    T, K, E, G = 40, 2, 8, 4
    logits = rng.normal(size=(T, E)).astype(np.float32)
    logits[:20, :2] += 4.0  # overload group 0 (experts 0, 1)
    scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    idx = np.argsort(-scores, axis=1)[:, :K]
    protected = np.zeros(T, bool)
    protected[:4] = True
    valid = np.ones(T, bool)
    cap = math.ceil(1.0 * T * K / G)
    keep, rows = capacity_keep(jnp.asarray(idx, jnp.int32), jnp.asarray(scores), jnp.asarray(valid),
                               jnp.asarray(protected), E, G, cap)
    keep, rows = np.asarray(keep), np.asarray(rows)
    group = idx // (E // G)
    for g in range(G):
        sent = (group == g).any(axis=1)  # tokens with a row to g
        aff = np.where(group == g, np.take_along_axis(scores, idx, 1), 0).sum(axis=1)
        kept = sent & (keep & (group == g)).any(axis=1)
        # all of a token's experts in g share the row's fate
        assert ((keep & (group == g)).any(1) == ((keep | (group != g)).all(1) & sent)).all()
        assert kept[sent & protected].all()  # protected rows are never dropped
        assert kept.sum() == max(min(sent.sum(), cap), (sent & protected).sum())
        if sent.sum() > cap:
            dropped = sent & ~kept
            kept_unprot = kept & ~protected
            assert aff[dropped].max() <= aff[kept_unprot].min()
    assert (rows == [len(set(r[keep[i]] // (E // G))) for i, r in enumerate(idx)]).all()
    assert keep.sum() < T * K  # something was dropped


def test_never_drop_fraction():
    m = np.asarray(never_drop_tokens(10, 3, 0.1))
    assert m.sum() == 3 and m[:3].all()
    assert np.asarray(never_drop_tokens(10, 3, 0.0)).sum() == 0


def test_never_drop_fraction_rounds_half_up_and_its_twin_agrees():
    """round(fraction * batch) sequences are protected, halves rounded up (6 x 0.25 = 1.5
    -> 2 sequences), at least one when fraction > 0 and batch >= 2, none for a batch of one
    at the usual fractions.
    `protected_rows` sizes the dispatch buffers for them: it must count the same tokens."""
    from dsv2_jax.moe.routing import protected_rows

    for batch, fraction, n in ((6, 0.25, 2), (4, 0.625, 3), (2, 0.75, 2), (4, 0.125, 1),
                               (10, 0.1, 1), (10, 0.04, 1), (1, 0.1, 0), (1, 0.25, 0),
                               (5, 1.0, 5), (8, 0.0, 0)):
        m = np.asarray(never_drop_tokens(batch, 3, fraction))
        assert m.sum() == 3 * n and m[:3 * n].all(), (batch, fraction, m.sum())
    for batch in range(1, 13):
        for fraction in (0.0, 0.05, 0.1, 0.125, 0.25, 0.3, 0.375, 0.5, 0.625, 0.75, 0.9, 1.0):
            m = np.asarray(never_drop_tokens(batch, 2, fraction))
            assert protected_rows(batch, 2, fraction) == m.sum(), (batch, fraction)


def _kept_rows_per_group(idx, keep, n_experts, n_groups):
    """[G]: tokens with a kept row to each group (a row: all of a token's experts there)."""
    group = np.asarray(idx) // (n_experts // n_groups)
    return np.array([((group == g) & np.asarray(keep)).any(axis=1).sum() for g in range(n_groups)])


def _sent_rows_per_group(idx, n_experts, n_groups):
    group = np.asarray(idx) // (n_experts // n_groups)
    return np.array([(group == g).any(axis=1).sum() for g in range(n_groups)])


_E, _G, _B, _S = 8, 4, 4, 16


def _moe_and_router(monkeypatch, valid=None):
    """The MoE layer's own dropping and `Router`'s on the same tokens (E experts in G device
    groups, capacity factor 0.5, M = 2; `valid` [B, S] marks padding): (cfg, the layer's
    router output, the router's, the rows the grouped matmul computed in each call)."""
    from flax import nnx

    from dsv2_jax.moe import MoE, gmm

    cfg = _cfg(capacity_factor=0.5, num_device_groups=_G, max_devices_per_token=2)
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (_B, _S, cfg.hidden_size))
    computed = []
    ffn = gmm.expert_ffn

    def counting_ffn(xs, group_sizes, *args):
        jax.debug.callback(lambda n: computed.append(int(n)), jnp.sum(group_sizes))
        return ffn(xs, group_sizes, *args)

    monkeypatch.setattr(gmm, "expert_ffn", counting_ffn)
    _, r_moe = moe(x, train=True, valid=valid)
    jax.effects_barrier()
    r_router = moe.gate(x.reshape(_B * _S, -1), train=True, batch=_B,
                        valid=None if valid is None else valid.reshape(-1))
    return cfg, r_moe, r_router, computed


def test_moe_layer_drops_exactly_the_rows_the_router_drops(monkeypatch):
    """Token dropping is written twice: `Router` / `route` (`capacity_keep`, hand-checked
    above) and inline in the MoE layer's dispatch, the path training runs. Both must keep the
    same rows: each group's `capacity` of them, or its protected rows if more."""
    from dsv2_jax.moe.routing import dynamic_capacity, protected_rows

    E, G, B, S = _E, _G, _B, _S
    cfg, r_moe, r_router, _ = _moe_and_router(monkeypatch)
    np.testing.assert_array_equal(np.asarray(r_moe.topk_idx), np.asarray(r_router.topk_idx))
    np.testing.assert_array_equal(np.asarray(r_moe.keep), np.asarray(r_router.keep))
    np.testing.assert_array_equal(np.asarray(r_moe.rows), np.asarray(r_router.rows))
    np.testing.assert_allclose(np.asarray(r_moe.topk_weight), np.asarray(r_router.topk_weight),
                               rtol=1e-6)
    cap = int(dynamic_capacity(cfg, jnp.ones(B * S, bool), G))
    assert cap == math.ceil(0.5 * B * S * 2 / G) == 16
    protected = np.asarray(never_drop_tokens(B, S, cfg.never_drop_fraction))
    assert protected.sum() == protected_rows(B, S, cfg.never_drop_fraction) == S
    sent = _sent_rows_per_group(r_moe.topk_idx, E, G)
    prot = _sent_rows_per_group(np.asarray(r_moe.topk_idx)[protected], E, G)
    kept = _kept_rows_per_group(r_moe.topk_idx, r_moe.keep, E, G)
    np.testing.assert_array_equal(kept, np.maximum(np.minimum(sent, cap), prot))
    assert (sent > cap).any()  # some group was over its capacity
    assert np.asarray(r_moe.keep)[protected].all()


def test_moe_layer_gives_padding_no_capacity_and_computes_only_kept_assignments(monkeypatch):
    """The layer's own dropping with padding (the last 12 of 64 tokens): each group's
    capacity comes from the 52 real tokens, ceil(0.5 * 52 * 2 / 4) = 13 rows, as in
    `Router` (16 if padding earned capacity). And what is dropped is not computed: the
    grouped matmul runs exactly the kept assignments' rows, not every token's K (the work
    a capacity exists to bound)."""
    from dsv2_jax.moe.routing import dynamic_capacity

    E, G, B, S = _E, _G, _B, _S
    valid = jnp.ones((B, S), bool).at[-1, 4:].set(False)
    cfg, r_moe, r_router, computed = _moe_and_router(monkeypatch, valid)
    cap = int(dynamic_capacity(cfg, valid.reshape(-1), G))
    assert cap == 13
    for field in ("topk_idx", "keep", "rows"):
        np.testing.assert_array_equal(np.asarray(getattr(r_moe, field)), np.asarray(getattr(r_router, field)))
    keep = np.asarray(r_moe.keep)
    kept = _kept_rows_per_group(r_moe.topk_idx, keep, E, G)
    assert (kept <= np.maximum(cap, _sent_rows_per_group(np.asarray(r_moe.topk_idx)[:S], E, G))).all()
    assert (kept == cap).any() and not keep[~np.asarray(valid).reshape(-1)].any()
    assert computed == [int(keep.sum())] and keep.sum() < B * S * cfg.num_experts_per_tok


def test_capacity_rounds_up():
    """A group's capacity is ceil(cf * T * M / G) over the real tokens: 9 tokens reaching
    at most M = 2 of G = 4 groups give 4.5 rows on average, so 5 (4 would drop a row at
    exactly the average load). Padding earns no capacity: 7 real tokens give ceil(3.5) = 4."""
    from dsv2_jax.moe.routing import capacity_rows, dynamic_capacity, route

    E, G, T = 8, 4, 9
    cfg = _cfg(capacity_factor=1.0, num_device_groups=G, max_devices_per_token=2,
               topk_method="greedy", never_drop_fraction=0.0)
    assert int(dynamic_capacity(cfg, jnp.ones(T, bool), G)) == 5
    assert int(dynamic_capacity(cfg, jnp.arange(T) < 7, G)) == 4
    assert capacity_rows(1.0, T, 2, G) == 5  # the static buffer of the same rule
    # Every token pushed to group 0 (experts 0 and 1): 5 of its 9 rows survive.
    D = cfg.hidden_size
    x = jnp.asarray(np.random.default_rng(4).normal(size=(T, D)), jnp.float32).at[:, 0].set(5.0)
    kernel = jnp.asarray(np.random.default_rng(5).normal(size=(D, E)) * 0.1, jnp.float32)
    kernel = kernel.at[0, :2].add(2.0)
    r = route(x, kernel, cfg, train=True, batch=1)
    sent = _sent_rows_per_group(r.topk_idx, E, G)
    kept = _kept_rows_per_group(r.topk_idx, r.keep, E, G)
    assert sent[0] == T
    np.testing.assert_array_equal(kept, np.minimum(sent, 5))


def test_no_dropping_at_inference():
    cfg = _cfg(capacity_factor=0.25)
    from flax import nnx

    from dsv2_jax.moe import MoE

    moe = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 9, cfg.hidden_size))
    _, r_eval = moe(x, train=False)
    _, r_train = moe(x, train=True)
    assert bool(r_eval.keep.all())
    assert not bool(r_train.keep.all())


def test_gradients_match_torch_autograd(tmp_path):
    """d(cross entropy)/d(every parameter) against torch autograd through the HF model."""
    kw = dict(ref.V2, rope_parameters=ref.YARN)
    hf = ref.build(kw, seed=11)
    path = ref.save(hf, str(tmp_path / "hf"))
    model = from_pretrained(path)
    cfg = model.cfg.replace(aux_loss_alpha=0.0)
    B, T = 2, 12
    ids = np.random.default_rng(12).integers(0, kw["vocab_size"], (B, T + 1))
    # torch: HF shifts labels itself
    hf.train()
    hf.zero_grad()
    out = hf(torch.as_tensor(ids, dtype=torch.long), labels=torch.as_tensor(ids, dtype=torch.long))
    out.loss.backward()
    tgrads = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    # ours
    fns = ModelFns.from_model(model)
    params = params_of(model)
    batch = {"inputs": jnp.asarray(ids[:, :-1], jnp.int32), "targets": jnp.asarray(ids[:, 1:], jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T)),
             "segment_ids": jnp.ones((B, T), jnp.int32), "loss_mask": jnp.ones((B, T), jnp.int32)}
    (loss, _), grads = jax.value_and_grad(lambda p: loss_and_stats(fns, cfg, p, batch), has_aux=True)(params)
    tl = out.loss.item()
    assert abs(float(loss) - tl) <= 1e-5 * abs(tl)
    flat = {tuple(k): v for k, v in _flatten(grads)}
    worst = 0.0
    for e in param_map(cfg, nnx_state(model)):
        g = np.asarray(flat[e.path])[e.index]
        g = g.T if e.transpose else g
        t = tgrads[e.hf_name] if e.hf_name in tgrads else None
        if t is None:  # HF fuses experts as gate_up_proj / down_proj
            t = _hf_expert_grad(hf, tgrads, e.hf_name)
        scale = max(np.abs(t).max(), 1e-8)
        err = np.abs(g - t).max() / scale
        worst = max(worst, err)
        assert err <= 1e-4, (e.hf_name, err)
    print(f"worst relative gradient error: {worst:.2e}")


def nnx_state(model):
    from flax import nnx

    return nnx.state(model)


def _flatten(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    else:
        yield prefix, tree


def _hf_expert_grad(hf, tgrads, name):
    # model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight
    parts = name.split(".")
    i, e, proj = int(parts[2]), int(parts[5]), parts[6]
    base = f"model.layers.{i}.mlp.experts."
    F = hf.config.moe_intermediate_size
    if proj == "down_proj":
        return tgrads[base + "down_proj"][e]
    gu = tgrads[base + "gate_up_proj"][e]
    return gu[:F] if proj == "gate_proj" else gu[F:]


def test_padding_tokens_count_nowhere():
    """Balance losses and counts with padding equal those of the real tokens alone; padding
    is never kept when dropping and takes no capacity."""
    rng = np.random.default_rng(9)
    S, real, E, K, D = 10, 7, 8, 2, 4
    cfg = _cfg(n_routed_experts=E, num_experts_per_tok=K, num_device_groups=D,
               max_devices_per_token=2, seq_aux=True)
    logits = rng.normal(size=(S, E)).astype(np.float32)
    scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    idx = np.asarray(select_experts(jnp.asarray(scores), cfg, train=True)[0])
    valid = np.arange(S) < real
    r_pad = _router_out(scores, idx).replace(valid=jnp.asarray(valid))
    r_real = _router_out(scores[:real], idx[:real])
    got, want = balance_losses(r_pad, cfg, 1), balance_losses(r_real, cfg, 1)
    for k in ("expert", "device", "comm"):
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-6, err_msg=k)
    keep, _ = capacity_keep(jnp.asarray(idx), jnp.asarray(scores), jnp.asarray(valid),
                            jnp.zeros(S, bool), E, D, 100)
    keep = np.asarray(keep)
    assert keep[:real].all() and not keep[real:].any()
    from flax import nnx

    from dsv2_jax.moe import Router

    router = Router(cfg, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (S, cfg.hidden_size))
    out = router(x, valid=jnp.asarray(valid))
    assert int(out.expert_counts.sum()) == real * K


@pytest.mark.parametrize("clip", [1.0, 0.5, 0.0])  # 0.5: a clip that is not 1 scales the clipped gradient
def test_fused_adamw_equals_the_optax_chain(clip):
    """AdamW (one in-place pass per parameter) against optax's clip_by_global_norm + adamw
    with the same mask and schedule, over steps with large, small and non-finite gradients,
    one of them with a norm just above the clip (clipped, though not twice the clip)."""
    import optax

    from dsv2_jax.train.optim import lr_schedule, make_optax_optimizer, make_optimizer

    sched = lr_schedule(1e-2, 20, 3, "cosine")
    ours, ref = make_optimizer(sched, clip=clip), make_optax_optimizer(sched, clip=clip)
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(7, 5)), jnp.float32),
              "input_layernorm": {"weight": jnp.ones(5, jnp.float32)}}
    s_ours, s_ref = ours.init(params), ref.init(params)
    p_ours, p_ref = params, params
    norms = []
    for i, scale in enumerate([0.1, 10.0, float("nan"), 3.0, 0.25, 0.01, 50.0]):
        g = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32) * scale, params)
        norm = optax.tree.norm(g)
        norms.append(float(norm))
        finite = jnp.isfinite(norm)
        p_ours, s_ours = ours.apply(p_ours, g, s_ours, norm, finite)
        if bool(finite):
            u, s_ref = ref.update(g, s_ref, p_ref)
            p_ref = optax.apply_updates(p_ref, u)
        chex.assert_trees_all_close(p_ours, p_ref, rtol=1e-6, atol=1e-7, custom_message=f"update {i}")
    assert int(s_ours["count"]) == 6  # the non-finite step applied nothing
    assert any(1.0 < n < 2.0 for n in norms), norms
