"""Grouped matmul: each row times its expert's weights, over rows sorted by expert.

One backend per platform, chosen in `gmm_backend`:
  * `ragged_dot`: `jax.lax.ragged_dot` (GPU/TPU; XLA:CPU lowers it to a dense product over
    all experts, ~50x slower there);
  * `blocked` (CPU): a loop over the experts that have rows, each expert's three matrices
    sliced once (XLA:CPU copies a dynamic slice before a product reads it), then a loop
    over windows of b rows of that expert's rows (its last window cut at its end), one
    [b, D] x [D, F] product per window. Only windows that hold rows run: ceil(n_e / b)
    per expert, so worst-case buffers (expert-parallel dropless dispatch, dropped rows)
    cost nothing past their real rows. The three products of a window run in one
    iteration (SwiGLU fused), with its own backward (a custom_vjp): dx by the same
    windows; an expert's weight gradients summed in float32 over its windows and written
    once in the weights' dtype, so no float32 [E, D, F] buffer is kept.
Neither unrolls a Python loop over experts nor computes rows against experts they did not choose.

`routed_experts` moves rows between token order and expert order with gathers both ways (a
permutation and its inverse), never scatters, which XLA:CPU runs element by element.

Shapes: M rows, D hidden, F expert width, E experts, T tokens, K experts per token, b window.
"""

from __future__ import annotations

import functools
import math

import chex
import jax
import jax.numpy as jnp

from dsv2_jax.config import DeepseekV2Config


def gmm_backend(cfg: DeepseekV2Config) -> str:
    """The one place the grouped-matmul backend is chosen."""
    if cfg.moe_backend != "auto":
        return cfg.moe_backend
    return "blocked" if jax.default_backend() == "cpu" else "ragged_dot"


def window_rows(rows: int, n_experts: int) -> int:
    """Rows per window of the blocked backend: about a quarter of the mean group, between 8
    and 128 (smaller wastes the product's efficiency, larger wastes the rows an expert's last
    window computes past its end)."""
    mean_group = max(1, rows // max(1, n_experts))
    return int(min(128, max(8, 2 ** int(math.log2(max(1, mean_group // 2))))))


def decode_window_rows(tokens: int) -> int:
    """Rows per window when decode's few tokens go through their experts (forward only, each
    window reads its expert's matrices once): 1 for one token (the products are then
    vector-matrix), else half the largest power of two <= tokens, between 2 and 8. A window
    per (token, expert) pair reads an expert once per token that chose it; wide windows
    multiply mostly padding rows. `python scripts/bench_decode_moe.py` times every size (XLA:CPU,
    bench shape, three layers per step; docs/benchmarks.md): 1 token 16.4 ms (b = 8) -> 9.3
    (b = 1), 4 tokens 42.5 -> 27.0 (b = 2), 8 tokens 62.0 -> 51.4 (b = 4)."""
    if tokens <= 1:
        return 1
    return int(min(8, max(2, 2 ** int(math.log2(tokens)) // 2)))


def _varying(a) -> set:
    """The manual mesh axes `a` varies over inside a shard_map (none outside one)."""
    mat = getattr(jax.typeof(a), "manual_axis_type", None)
    return set(mat.varying) if mat is not None else set()


def _zeros(shape, dtype, *like):
    """Zeros that vary over every manual mesh axis one of `like` varies over: inside a
    shard_map a loop's carry must keep its type, and the products it accumulates vary over
    the axes of their operands."""
    axes = set().union(*(_varying(a) for a in like))
    z = jnp.zeros(shape, dtype)
    return jax.lax.pcast(z, tuple(sorted(axes)), to="varying") if axes else z


def _as_type_of(ct, primal):
    """A cotangent summed over the manual mesh axes it varies over and its primal does not
    (what autodiff does for an invariant operand used with varying ones: the transpose of
    the implicit broadcast is a psum)."""
    extra = _varying(ct) - _varying(primal)
    return jax.lax.psum(ct, tuple(sorted(extra))) if extra else ct


def _experts_in_use(group_sizes, b: int):
    """The experts that have rows, for loops over them: (their ids in order [E] (padded with
    0), how many, each expert's first row [E], end row [E], windows of b rows [E])."""
    E = group_sizes.shape[0]
    gs = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(gs)
    used = jnp.nonzero(gs > 0, size=E, fill_value=0)[0].astype(jnp.int32)
    return used, jnp.sum(gs > 0), ends - gs, ends, (gs + b - 1) // b


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _windowed_swiglu(x, wg, wu, wd, group_sizes, b: int):
    """down(silu(x Wg) * (x Wu)) of each row with its expert's weights, the three products of
    a window in one loop iteration (x read once, h never written whole)."""
    return _swiglu_fwd(x, wg, wu, wd, group_sizes, b)[0]


def _swiglu_loop(x, weight, group_sizes, b: int, keep_pre: bool, per_expert: bool = True):
    """The forward loop; weight(e, name) gives expert e's matrix. Returns y [M, D] and, with
    keep_pre, the pre-activations (gate, up) [M + b, F], kept one window longer so that the
    backward reads an expert's last window where the forward wrote it (a dynamic slice
    running past the end would be moved back, onto other rows).

    per_expert: a loop over the experts with rows, their matrices sliced once, around a loop
    over each one's windows (many rows per expert); else one loop over all windows, each
    slicing its own expert's matrices (decode: about one window per expert, where the inner
    loop's overhead measured ~0.2 ms per layer per token)."""
    M, D = x.shape
    F = weight(0, "gate").shape[1]
    used, n_used, starts, ends, per = _experts_in_use(group_sizes, b)
    xp = jnp.concatenate([x, jnp.zeros((b, D), x.dtype)])
    names = ("gate", "up", "down")

    def window(e, j, mats, carry):
        wg, wu, wd = mats
        r0 = starts[e] + j * b
        xs = jax.lax.dynamic_slice_in_dim(xp, r0, b)
        g, u = xs @ wg, xs @ wu
        out = (jax.nn.silu(g) * u) @ wd
        keep = ((r0 + jnp.arange(b)) < ends[e])[:, None]
        put = lambda buf, v: jax.lax.dynamic_update_slice_in_dim(
            buf, jnp.where(keep, v, jax.lax.dynamic_slice_in_dim(buf, r0, b)), r0, 0)
        return (put(carry[0], out),) + ((put(carry[1], g), put(carry[2], u)) if keep_pre else ())

    ws = [weight(0, n) for n in names]
    init = (_zeros((M + b, D), x.dtype, x, *ws),)
    if keep_pre:
        init += (_zeros((M + b, F), x.dtype, x, *ws[:2]), _zeros((M + b, F), x.dtype, x, *ws[:2]))
    if per_expert:
        def expert_body(k, carry):
            e = used[k]
            mats = tuple(weight(e, n) for n in names)  # once per expert
            return jax.lax.fori_loop(0, per[e], lambda j, c: window(e, j, mats, c), carry)

        out = jax.lax.fori_loop(0, n_used, expert_body, init)
    else:
        # Each window's expert and index among its expert's windows, found before the loop.
        E = per.shape[0]
        ends_w = jnp.cumsum(per)
        w = jnp.arange(M // b + E, dtype=jnp.int32)  # a static bound on the windows
        owner = jnp.minimum(jnp.searchsorted(ends_w, w, side="right"), E - 1).astype(jnp.int32)
        index = w - (ends_w - per)[owner]

        def window_body(i, carry):
            e = owner[i]
            return window(e, index[i], tuple(weight(e, n) for n in names), carry)

        out = jax.lax.fori_loop(0, ends_w[-1], window_body, init)
    return (out[0][:M],) + out[1:]


def _swiglu_fwd(x, wg, wu, wd, group_sizes, b: int):
    mats = {"gate": wg, "up": wu, "down": wd}
    y, gate, up = _swiglu_loop(x, lambda e, n: mats[n][e], group_sizes, b, keep_pre=True)
    # The pre-activations are kept (2 x [M + b, F]) so the backward recomputes no product.
    return y, (x, wg, wu, wd, group_sizes, gate, up)


def windowed_swiglu_stacked(x, w_gate, w_up, w_down, layer, group_sizes, b: int, per_expert: bool = True):
    """The experts of layer `layer` of a segment's stacks [L, E, D, F] / [L, E, F, D], each
    window's matrices read from the stacks (slicing the layer's [E, D, F] out first would copy
    every expert of it: one copy per layer of a forward pass, one per step of decode).
    x [M, D] sorted by expert, b rows per window -> [M, D]. Differentiable, but meant for
    forward passes: the backward slices the layer out and returns whole-stack gradients.
    per_expert: see `_swiglu_loop`."""
    return _stacked_swiglu(x, w_gate, w_up, w_down, layer, group_sizes, b, per_expert)


def _stacked_loop(x, w_gate, w_up, w_down, layer, group_sizes, b: int, per_expert: bool):
    mats = {"gate": w_gate, "up": w_up, "down": w_down}
    dt = x.dtype
    return _swiglu_loop(x, lambda e, n: mats[n][layer, e].astype(dt), group_sizes, b, keep_pre=False,
                        per_expert=per_expert)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _stacked_swiglu(x, w_gate, w_up, w_down, layer, group_sizes, b: int, per_expert: bool):
    return _stacked_loop(x, w_gate, w_up, w_down, layer, group_sizes, b, per_expert)


def _stacked_fwd(x, w_gate, w_up, w_down, layer, group_sizes, b: int, per_expert: bool):
    y = _stacked_loop(x, w_gate, w_up, w_down, layer, group_sizes, b, per_expert)
    return y, (x, w_gate, w_up, w_down, layer, group_sizes)


def _stacked_bwd(b: int, per_expert: bool, res, dy):
    x, w_gate, w_up, w_down, layer, group_sizes = res
    ws = [jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False).astype(x.dtype)
          for w in (w_gate, w_up, w_down)]
    _, vjp = jax.vjp(lambda x, *ws: _windowed_swiglu(x, *ws, group_sizes, b), x, *ws)
    dx, *dws = vjp(dy)
    stacks = [jax.lax.dynamic_update_index_in_dim(jnp.zeros_like(w), dw.astype(w.dtype), layer, 0)
              for w, dw in zip((w_gate, w_up, w_down), dws)]
    return (dx, *stacks, None, None)


_stacked_swiglu.defvjp(_stacked_fwd, _stacked_bwd)


def _swiglu_bwd(b: int, res, dy):
    x, wg, wu, wd, group_sizes, gate, up = res
    M, D = x.shape
    used, n_used, starts, ends, per = _experts_in_use(group_sizes, b)
    xp = jnp.concatenate([x, jnp.zeros((b, D), x.dtype)])
    dyp = jnp.concatenate([dy, jnp.zeros((b, D), dy.dtype)])
    f32 = jnp.float32
    like = (x, dy, gate, up, wg, wu, wd)

    # Per expert with rows: its matrices sliced once, its windows' weight gradients summed in
    # float32 accumulators of that expert alone ([D, F] each) and written, in the weights'
    # dtype, into its slot once: no float32 [E, D, F] buffer is ever held.
    def expert_body(k, carry):
        dx, dwg, dwu, dwd = carry
        e = used[k]
        wg_e, wu_e, wd_e = wg[e], wu[e], wd[e]

        def window(j, carry):
            dx, ag, au, ad = carry
            r0 = starts[e] + j * b
            keep = ((r0 + jnp.arange(b)) < ends[e])[:, None]
            xs = jax.lax.dynamic_slice_in_dim(xp, r0, b)
            dys = jnp.where(keep, jax.lax.dynamic_slice_in_dim(dyp, r0, b), 0)
            g = jax.lax.dynamic_slice_in_dim(gate, r0, b)
            u = jax.lax.dynamic_slice_in_dim(up, r0, b)
            sg = jax.nn.sigmoid(g)
            act = g * sg  # silu(g)
            dh = dys @ wd_e.T
            dg = dh * u * (sg * (1 + g * (1 - sg)))
            du = dh * act
            ad = ad + jnp.einsum("bf,bd->fd", act * u, dys, preferred_element_type=f32)
            ag = ag + jnp.einsum("bd,bf->df", xs, dg, preferred_element_type=f32)
            au = au + jnp.einsum("bd,bf->df", xs, du, preferred_element_type=f32)
            dxs = dg @ wg_e.T + du @ wu_e.T
            old = jax.lax.dynamic_slice_in_dim(dx, r0, b)
            dx = jax.lax.dynamic_update_slice_in_dim(dx, jnp.where(keep, dxs, old), r0, 0)
            return dx, ag, au, ad

        acc = (_zeros(wg.shape[1:], f32, *like), _zeros(wu.shape[1:], f32, *like),
               _zeros(wd.shape[1:], f32, *like))
        dx, ag, au, ad = jax.lax.fori_loop(0, per[e], window, (dx,) + acc)
        return (dx, dwg.at[e].set(ag.astype(dwg.dtype)), dwu.at[e].set(au.astype(dwu.dtype)),
                dwd.at[e].set(ad.astype(dwd.dtype)))

    init = (_zeros((M + b, D), x.dtype, *like), _zeros(wg.shape, wg.dtype, *like),
            _zeros(wu.shape, wu.dtype, *like), _zeros(wd.shape, wd.dtype, *like))
    dx, dwg, dwu, dwd = jax.lax.fori_loop(0, n_used, expert_body, init)
    return (_as_type_of(dx[:M], x), _as_type_of(dwg, wg), _as_type_of(dwu, wu),
            _as_type_of(dwd, wd), None)


_windowed_swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def _ragged_dot_matmul(x, w, group_sizes):
    """Rows past sum(group_sizes) (dropped assignments) come out as zeros."""
    y = jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)
    return jnp.where((jnp.arange(x.shape[0]) < jnp.sum(group_sizes))[:, None], y, 0)


def expert_ffn(xs, group_sizes, w_gate, w_up, w_down, backend: str, layer=None):
    """SwiGLU of each row with its expert's weights. xs [M, D] sorted by expert,
    group_sizes [E] (sum <= M; rows past the sum give zeros), w_gate/w_up [E, D, F],
    w_down [E, F, D] -> [M, D]. With `layer`, the weights are a segment's stacks
    [L, E, D, F] / [L, E, F, D] and layer `layer` of them is used: the blocked backend reads
    its windows from the stacks, the others slice the layer out first."""
    if layer is not None and backend == "blocked":
        return windowed_swiglu_stacked(xs, w_gate, w_up, w_down, layer, group_sizes,
                                       window_rows(xs.shape[0], w_gate.shape[1]))
    if layer is not None:
        w_gate, w_up, w_down = (jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False)
                                for w in (w_gate, w_up, w_down))
    if backend == "blocked":
        dt = xs.dtype
        return _windowed_swiglu(xs, w_gate.astype(dt), w_up.astype(dt), w_down.astype(dt), group_sizes,
                                window_rows(xs.shape[0], w_gate.shape[0]))
    if backend != "ragged_dot":
        raise ValueError(f"unknown grouped-matmul backend {backend!r}")
    mm = _ragged_dot_matmul
    h = jax.nn.silu(mm(xs, w_gate, group_sizes)) * mm(xs, w_up, group_sizes)
    return mm(h, w_down, group_sizes)


# ---------------------------------------------------------------------------------------
# Rows between token order and expert order, by gathers in both directions.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _expand(x, order, pos, K: int):
    """x [T, D] -> rows [T*K, D] in expert order: row j is token order[j] // K."""
    return x[order // K]


def _expand_fwd(x, order, pos, K):
    return x[order // K], (order, pos, x.shape[0])


def _expand_bwd(K, res, d):
    order, pos, T = res
    # Token t's gradient: the sum of its K rows, found through the inverse permutation.
    return d[pos].reshape(T, K, -1).sum(axis=1), None, None


_expand.defvjp(_expand_fwd, _expand_bwd)


@jax.custom_vjp
def _unsort(ys, order, pos):
    """ys [T*K, D] in expert order -> token-major order: row a is ys[pos[a]]."""
    return ys[pos]


def _unsort_fwd(ys, order, pos):
    return ys[pos], (order, pos)


def _unsort_bwd(res, d):
    order, pos = res
    return d[order], None, None


_unsort.defvjp(_unsort_fwd, _unsort_bwd)


def _by_expert(topk_idx, n_experts: int, keep=None):
    """(order, pos, group_sizes) of the T*K assignment rows: `order` sorts them by expert
    (dropped ones, and ids >= E, last), `pos` is its inverse."""
    flat = topk_idx.reshape(-1)
    if keep is not None:
        flat = jnp.where(keep.reshape(-1), flat, n_experts)  # dropped rows sort past every group
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    pos = jnp.zeros_like(order).at[order].set(jnp.arange(flat.shape[0], dtype=jnp.int32))
    return order, pos, jnp.bincount(flat, length=n_experts + 1)[:n_experts]


def _combine(ys, order, pos, topk_weight, dtype):
    """Expert-order results ys [T*K, D] -> sum_k weight[t, k] * row (t, k): [T, D]."""
    T, K = topk_weight.shape
    y = _unsort(ys, order, pos).reshape(T, K, -1)
    return jnp.einsum("tkd,tk->td", y.astype(jnp.float32), topk_weight).astype(dtype)


def assert_expert_args(x, topk_idx, topk_weight, w_gate, w_up, w_down, layer=None, keep=None):
    """The routed experts' boundary, checked at trace time: x [T, D], topk_idx / topk_weight
    (/ keep) [T, K]; w_gate / w_up [E, D, F] and w_down [E, F, D], or with `layer` a
    segment's stacks [L, E, D, F] / [L, E, F, D] (F may be a tensor-parallel slice)."""
    chex.assert_rank([x, topk_idx, topk_weight], 2)
    chex.assert_equal_shape([topk_idx, topk_weight] + ([] if keep is None else [keep]))
    chex.assert_equal_shape_prefix([x, topk_idx], 1)
    chex.assert_rank([w_gate, w_up, w_down], 3 if layer is None else 4)
    chex.assert_equal_shape([w_gate, w_up])
    *lead, D, F = w_gate.shape
    chex.assert_shape(w_down, (*lead, F, D))
    chex.assert_axis_dimension(x, 1, D)


def routed_experts(x, topk_idx, topk_weight, w_gate, w_up, w_down, backend: str, keep=None, layer=None):
    """Routed-expert output: x [T, D], topk_idx/weight [T, K] -> [T, D]. Dropless unless
    `keep` [T, K] marks assignments removed by token dropping (they are not computed; ids
    >= E are treated the same way). With `layer`, w_* are a segment's stacks (`expert_ffn`)."""
    assert_expert_args(x, topk_idx, topk_weight, w_gate, w_up, w_down, layer, keep)
    K = topk_idx.shape[1]
    E = w_gate.shape[0 if layer is None else 1]
    order, pos, group_sizes = _by_expert(topk_idx, E, keep)
    ys = expert_ffn(_expand(x, order, pos, K), group_sizes, w_gate, w_up, w_down, backend, layer)
    return _combine(ys, order, pos, topk_weight, x.dtype)


def routed_experts_stacked(x, topk_idx, topk_weight, w_gate, w_up, w_down, layer, window: int | None = None):
    """`routed_experts` (dropless) for decode's few tokens, with the experts of layer `layer`
    of a segment's stacks w_gate / w_up [L, E, D, F], w_down [L, E, F, D], each chosen expert
    read once (decode's cost is reading the weights). window: rows per window (default
    `decode_window_rows` of the tokens)."""
    assert_expert_args(x, topk_idx, topk_weight, w_gate, w_up, w_down, layer)
    K = topk_idx.shape[1]
    order, pos, group_sizes = _by_expert(topk_idx, w_gate.shape[1])
    b = window or decode_window_rows(x.shape[0])
    ys = windowed_swiglu_stacked(x[order // K], w_gate, w_up, w_down, layer, group_sizes, b, per_expert=False)
    return _combine(ys, order, pos, topk_weight, x.dtype)
