"""Inference over the latent cache: prefill in the expanded form, decode steps in the absorbed
form.

Letters as in attention.py: B batch, T prompt positions, S cache positions, N heads, P
qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, C kv_lora_rank, K = C + R, D hidden_size,
L layers of one segment, E routed experts, F moe_intermediate_size.

Weight absorption. kv_b_proj's kernel [C, N*(P+V)] is, per head n, [W_UK_n | W_UV_n] with
W_UK_n [C, P] and W_UV_n [C, V], so for a query at one position and cached latents c_s

    q_nope . k_nope_s = q_nope . (c_s W_UK_n) = (W_UK_n q_nope) . c_s
    sum_s p_s v_s     = sum_s p_s (c_s W_UV_n) = (sum_s p_s c_s) W_UV_n

and a decode step is multi-query attention: N queries of width K, [W_UK_n q_nope ; q_rope],
against ONE key per position, the cached row [c ; k_rope], whose first C values are also the
value; W_UV and o_proj follow. The cache is read as stored, never re-projected through
kv_b_proj (HF and MaxText re-expand all S positions at every step: S*C*N*(P+V) multiply-adds
per layer per step, against N*C*(P+V) here).

Prefill is compute-bound over T positions, where the expanded form is cheaper (its attention
contracts P+R per head instead of K); it runs the model's own decoder layers and adds only
`MLA.latent` to fill the cache (the same kv_a_proj on the same input: XLA computes it once).

The attention core of a decode step is `decode_attention`, with the contract of
`dsv2_jax.kernels.mla_decode.mla_decode`: q [B, N, K], cache [B, S, K], lengths [B] ->
[B, N, C]. cfg.attn_impl == "pallas" selects that kernel when the module exists; otherwise
(and for every other impl) the XLA form `mla_decode_blocked` runs, walking only the live
blocks of the layer where it lies in the segment's buffer (`cache.LayerView`).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx, struct

from dsv2_jax.attention import attention_mask
from dsv2_jax.cache import LatentCache, LayerView, fill_segment, write_token
from dsv2_jax.layers import dtype_of, rows_product
from dsv2_jax.moe import expert_parallel_size, gmm_backend, routed_experts
from dsv2_jax.moe.gmm import routed_experts_stacked
from dsv2_jax.rope import rope_cos_sin

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


# ---------------------------------------------------------------------------------------
# The attention core of a decode step.


def decode_block(S: int) -> int:
    """The block length the XLA decode core walks a cache of S positions in: the largest of
    512, 256, 128, 64 dividing S (cache lengths are multiples of 64), else S."""
    return next((b for b in (512, 256, 128, 64) if S % b == 0), S)


def tail_block(blk: int) -> int:
    """The block length the XLA decode core walks the positions past its last full block
    in: 64 where it divides blk (so a step reads at most 63 dead positions, not up to
    blk - 1), else blk."""
    return 64 if blk % 64 == 0 else blk


def mla_decode_blocked(q, cache: LayerView, lengths, *, v_dim: int, scale: float, block: int | None = None):
    """Multi-query attention over the latent cache, one block of positions at a time.

    q [B, H, K], cache: a `LayerView` of S positions (one key per position shared by the H
    heads; its first v_dim values are the value), lengths [B] int (row b attends to positions
    < lengths[b]) -> [B, H, v_dim] in q's dtype (zeros where lengths is 0). Softmax in float32,
    online over the blocks.

    Only live positions are read: the floor(max(lengths) / block) full blocks, then the rest
    in blocks of `tail_block(block)` (at 2049-2112 live positions of a 3072 buffer, four
    blocks of 512 and one of 64 instead of five of 512); fewer than one block's live
    positions are read as that one block. Each block is copied once into a
    [B, block, K] tile that both products then read from cache: a decode step's attention
    costs one pass over the live positions, not two passes (plus a copy) over the buffer.
    """
    B, H, K = q.shape
    S = cache.max_len
    blk = block or decode_block(S)
    if S % blk:
        raise ValueError(f"block {blk} must divide the cache length {S}")
    small = tail_block(blk)
    chex.assert_shape(lengths, (B,))
    live_max = jnp.minimum(jnp.max(lengths), S)
    n_full, rest = live_max // blk, live_max % blk
    # Fewer live positions than one block: that block, whole (small blocks' loop overhead
    # outweighs the dead positions a short cache reads).
    n_big = jnp.where(n_full > 0, n_full, (rest > 0).astype(n_full.dtype))
    n_tail = jnp.where(n_full > 0, (rest + small - 1) // small, 0)

    def walk(start, size, carry):
        m, l, acc = carry  # [B,H], [B,H], [B,H,K] float32
        kb = cache.block(start, size).astype(q.dtype)  # [B,size,K]
        s = jnp.einsum("bhk,bsk->bhs", q, kb, preferred_element_type=jnp.float32) * scale
        live = (start + jnp.arange(size))[None, None, :] < lengths[:, None, None]
        m_new = jnp.maximum(m, jnp.max(jnp.where(live, s, _NEG), axis=-1))
        p = jnp.where(live, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        acc = acc * corr[..., None] + jnp.einsum("bhs,bsk->bhk", p.astype(q.dtype), kb,
                                                 preferred_element_type=jnp.float32)
        return m_new, l * corr + jnp.sum(p, axis=-1), acc

    init = (jnp.full((B, H), _NEG, jnp.float32), jnp.zeros((B, H), jnp.float32),
            jnp.zeros((B, H, K), jnp.float32))
    carry = jax.lax.fori_loop(0, n_big, lambda j, c: walk(j * blk, blk, c), init)
    _, l, acc = jax.lax.fori_loop(0, n_tail, lambda j, c: walk(n_big * blk + j * small, small, c), carry)
    # The product ran over whole rows; the rope columns are dropped here.
    return (acc[..., :v_dim] / jnp.where(l > 0, l, 1.0)[..., None]).astype(q.dtype)


def mla_decode_xla(q, kv_cache, lengths, *, v_dim: int, scale: float):
    """`mla_decode_blocked` over a plain cache: kv_cache [B, S, K] (the kernel's contract)."""
    return mla_decode_blocked(q, LayerView.of(kv_cache, q.dtype), lengths, v_dim=v_dim, scale=scale)


def _pallas_mla_decode():
    """The Pallas kernel when `dsv2_jax.kernels.mla_decode` exists, else None."""
    try:
        from dsv2_jax.kernels.mla_decode import mla_decode
    except ModuleNotFoundError as e:
        if e.name not in ("dsv2_jax.kernels", "dsv2_jax.kernels.mla_decode"):
            raise
        return None
    return mla_decode


def decode_attention(q, cache, lengths, *, v_dim: int, scale: float, impl: str = "xla"):
    """The one place a decode step's attention core is chosen. cache: a `LayerView`, or a
    plain [B, S, K] array. impl 'pallas' runs `dsv2_jax.kernels.mla_decode` on the layer
    (copied out whole: the kernel's contract) when that module exists; otherwise
    `mla_decode_blocked` reads the live blocks where they lie."""
    if not isinstance(cache, LayerView):
        cache = LayerView.of(cache, q.dtype)
    if impl == "pallas":
        kernel = _pallas_mla_decode()
        if kernel is not None:
            return kernel(q, cache.whole(), lengths, v_dim=v_dim, scale=scale)
    return mla_decode_blocked(q, cache, lengths, v_dim=v_dim, scale=scale)


# ---------------------------------------------------------------------------------------
# Absorbed weights.


@struct.dataclass
class AbsorbedWeights:
    w_uk: tuple  # per segment [L, N, C, P]
    w_uv: tuple  # per segment [L, N, C, V]
    head_rows: jax.Array | None = None  # the output head as [vocab, D] (see `few_row_products`)
    # Per segment, copies of the decode parts, one state per layer (`layer_copies`), in the
    # few-row form when `few_row_products`; graphdefs (static) beside; None: decode slices the
    # model's stacked parts.
    layer_states: tuple | None = None
    layer_graphdefs: tuple | None = struct.field(pytree_node=False, default=None)


def layer_copies(batch: int) -> bool:
    """Whether decode runs on one copy of its parts per layer (made once per `generate` call,
    the layers unrolled) instead of slicing each layer out of the segment's stacks: the one
    place this choice is made. Only on one CPU device at 1-8 rows, where a step is a stream of
    weights and XLA:CPU copies a layer's slice of a stacked weight before every product that
    reads it (its fused products do not read slices in place): at one row that was ~1/4 of a
    step's time (profile of the bench config's batch-1 decode). Costs a second copy of the
    non-expert weights while generating; `few_row_products` picks the copies' layout."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1 and 1 <= batch <= 8


def few_row_products(batch: int) -> bool:
    """Whether decode multiplies its few rows by weights laid out [out, in] (a multiply-reduce
    along each output's row) instead of a `dot` with [in, out]: the one place this backend
    choice is made. It covers the output head and every Linear a decode step runs (attention
    projections, the dense MLP, the shared experts). Only on one CPU device at 2-8 rows, where
    XLA:CPU streams a weight through a few-row `dot` at a third of its one-row rate and the
    reduce form reads it 2.4-3.5x faster (scripts/bench_small_m.py); it costs a second copy
    of those weights while generating. Accelerators multiply on their matrix units, and one
    row is a `dot`'s best case."""
    return batch >= 2 and layer_copies(batch)  # laid out in the per-layer copies


def _copy_part(graphdef, state, rows: bool):
    """(graphdef, state) of a copy of a decode part (an MLA, an MLP, a norm); with `rows`, in
    the few-row form: each weight a step multiplies laid out [..., out, in], weights that
    share an input stacked (`to_rows_major` of MLA and MLP)."""
    module = nnx.merge(graphdef, state)  # new module objects over the same arrays
    if rows and hasattr(module, "to_rows_major"):
        module.to_rows_major()
    return nnx.split(module)


def absorb(model, batch: int | None = None, rows: bool | None = None) -> AbsorbedWeights:
    """Splits every layer's kv_b_proj kernel [C, N*(P+V)] into per-head W_UK [N, C, P] and
    W_UV [N, C, V], in the compute dtype; when `layer_copies(batch)`, copies the decode parts
    one layer at a time, and when `rows` (None: `few_row_products(batch)`; a benchmark may
    force either layout), lays the output head out as [vocab, D] and every decode Linear of
    those copies as [out, in]. Done once per generate call, outside the loop."""
    cfg = model.cfg
    N, P, V = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    dt = dtype_of(cfg.dtype)
    w_uk, w_uv = [], []
    for seg in model.segments:
        k = seg.layers.self_attn.kv_b_proj.kernel[...]  # [L, C, N*(P+V)]
        k = k.reshape(k.shape[0], k.shape[1], N, P + V).astype(dt)
        w_uk.append(jnp.einsum("lcnp->lncp", k[..., :P]))
        w_uv.append(jnp.einsum("lcnv->lncv", k[..., P:]))
    out = AbsorbedWeights(tuple(w_uk), tuple(w_uv))
    if batch is None or not layer_copies(batch):
        return out
    if rows is None:
        rows = few_row_products(batch)
    states, graphdefs = [], []
    for seg in model.segments:
        parts = {name: _copy_part(*gs, rows) for name, gs in _decode_parts(seg)[0].items()}
        graphdefs.append(tuple((k, g) for k, (g, _) in parts.items()))  # hashable: static
        stacked = {k: st for k, (_, st) in parts.items()}
        states.append(tuple(jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(seg.count)))
    out = out.replace(layer_states=tuple(states), layer_graphdefs=tuple(graphdefs))
    if rows:
        out = out.replace(head_rows=jnp.asarray(model.output_kernel(), dt).T)  # [V, D], one copy per call
    return out


def decode_logits(model, weights: AbsorbedWeights, x):
    """x [B, 1, D] (the last layer's output) -> logits [B, vocab] float32."""
    if weights.head_rows is None:
        return model.logits_from_hidden(model.norm(x))[:, 0].astype(jnp.float32)
    return rows_product(model.norm(x)[:, 0], weights.head_rows)  # the head read once for all rows


def absorbed_attention(attn, q_nope, q_rope, kv_layer, positions, w_uk, w_uv, impl: str = "xla"):
    """One decode position of one MLA layer, in the absorbed form.

    attn: an `MLA` (one layer), q_nope [B, 1, N, P], q_rope [B, 1, N, R] (its queries, rope
    applied), kv_layer: this layer's cache (a `LayerView` or [B, S, K]), the new token
    already written at `positions`, positions [B] int, w_uk [N, C, P], w_uv [N, C, V]
    -> [B, 1, D].
    """
    cfg = attn.cfg
    B = q_nope.shape[0]
    N, C, V = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.v_head_dim
    q_lat = jnp.einsum("bnp,ncp->bnc", q_nope[:, 0], w_uk)  # W_UK folded into the query
    q = jnp.concatenate([q_lat, q_rope[:, 0].astype(q_lat.dtype)], axis=-1)  # [B,N,K]
    o = decode_attention(q, kv_layer, positions + 1, v_dim=C, scale=cfg.softmax_scale, impl=impl)
    o = jnp.einsum("bnc,ncv->bnv", o.astype(w_uv.dtype), w_uv)  # [B,N,V]
    return attn.o_proj(o.reshape(B, 1, N * V))


# ---------------------------------------------------------------------------------------
# MoE for a handful of tokens.


def moe_few_tokens(gate, shared_experts, w_gate, w_up, w_down, layer, x, backend: str = "blocked"):
    """The MoE layer for decode's few tokens, the same function as `MoE.__call__` (dropless).

    gate: the layer's `Router`; shared_experts: its shared `MLP` or None; w_gate / w_up
    [L, E, D, F], w_down [L, E, F, D]: the routed experts of the WHOLE segment, `layer` the
    index of this layer in it; x [B, T, D] -> [B, T, D].

    At decode a token meets K experts and the cost is reading their weights, so the experts
    stay stacked and only the chosen ones are read: slicing a layer's [E, D, F] out of the
    segment first would copy all of them every step. With the blocked backend (CPU) the
    rows sorted by expert go through windows that read each chosen expert from the stacks
    (`routed_experts_stacked`); elsewhere up to 2E (token, expert) pairs go through one
    gather of the chosen matrices, and past that the layer's experts through `backend`.
    """
    B, T, D = x.shape
    xt = x.reshape(B * T, D)
    r = gate(xt)
    M, K = r.topk_idx.shape
    E = w_gate.shape[1]
    if backend == "blocked":
        y = routed_experts_stacked(xt, r.topk_idx, r.topk_weight, w_gate, w_up, w_down, layer)
    elif M * K <= 2 * E:
        idx = r.topk_idx
        wg, wu, wd = (w[layer, idx].astype(x.dtype) for w in (w_gate, w_up, w_down))  # [M,K,...]
        h = jax.nn.silu(jnp.einsum("md,mkdf->mkf", xt, wg)) * jnp.einsum("md,mkdf->mkf", xt, wu)
        y = jnp.einsum("mkd,mk->md", jnp.einsum("mkf,mkfd->mkd", h, wd).astype(jnp.float32),
                       r.topk_weight)
    else:
        wg, wu, wd = (jax.lax.dynamic_index_in_dim(w, layer, 0, keepdims=False)
                      for w in (w_gate, w_up, w_down))
        y = routed_experts(xt, r.topk_idx, r.topk_weight, wg, wu, wd, backend)
    y = y.astype(x.dtype)
    if shared_experts is not None:
        y = y + shared_experts(xt)
    return y.reshape(B, T, D)


def _decode_parts(seg):
    """The submodules a decode step runs, each split into (graphdef, stacked state), and the
    segment's routed-expert stacks (kept whole, see `moe_few_tokens`), or None."""
    layers = seg.layers
    names = ["input_layernorm", "self_attn", "post_attention_layernorm"]
    experts = None
    if not seg.moe or expert_parallel_size() > 1:
        # Expert parallelism: the dispatch lives in MoE.__call__; keep one copy of it.
        names.append("mlp")
    else:
        names.append("mlp.gate")
        if layers.mlp.shared_experts is not None:
            names.append("mlp.shared_experts")
        e = layers.mlp.experts
        experts = (e.gate_proj[...], e.up_proj[...], e.down_proj[...])
    parts = {}
    for name in names:
        module = layers
        for attr in name.split("."):
            module = getattr(module, attr)
        parts[name] = nnx.split(module)
    return parts, experts


# ---------------------------------------------------------------------------------------
# Prefill and one decode step.


def _unroll(cfg, count: int) -> int:
    return max(1, min(cfg.scan_unroll, count))


def prefill(model, ids, lengths, cache: LatentCache):
    """Runs right-padded prompts through the model's own (expanded) layers and fills the cache.

    ids [B, T] int32 (row b real up to lengths[b], padding after), lengths [B] int32, cache
    with max_len >= T -> (logits [B, vocab] float32 at each row's last real position, cache
    holding positions [0, T) with lengths = lengths). Padding positions are cached too; they
    lie at or past `lengths` and decode overwrites each before it is ever attended.
    """
    cfg = model.cfg
    B, T = ids.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    # Padding gets its own segment id, as packed batches do: it sees only itself.
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
    mask = attention_mask(segment_ids, segment_ids)
    cos, sin = rope_cos_sin(cfg, positions)
    valid = segment_ids > 0
    x = model.embed_tokens(ids)
    for s, seg in enumerate(model.segments):
        graphdef, state = nnx.split(seg.layers)
        experts = seg.stacked_experts(train=False)

        def body(h, xs, graphdef=graphdef, experts=experts):
            layer_state, i = xs
            layer = nnx.merge(graphdef, layer_state)
            c, kr = layer.self_attn.latent(layer.input_layernorm(h), cos, sin)
            h, _ = layer(h, cos, sin, mask, valid, segment_ids=segment_ids,
                         stacked_experts=None if experts is None else (experts, i))
            return h, jnp.concatenate([c, kr.astype(c.dtype)], axis=-1)

        xs = (state, jnp.arange(seg.count, dtype=jnp.int32))
        x, rows = jax.lax.scan(body, x, xs, unroll=_unroll(cfg, seg.count))  # rows [L,B,T,K]
        cache = fill_segment(cache, s, rows, lengths)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [B,1,D]
    logits = model.logits_from_hidden(model.norm(last))[:, 0]
    return logits.astype(jnp.float32), cache


def decode_step(model, weights: AbsorbedWeights, cache: LatentCache, tokens):
    """tokens [B] int32, each at position cache.lengths[b] -> (logits [B, vocab] float32,
    cache with the tokens' latents written and lengths + 1)."""
    cfg = model.cfg
    C = cfg.kv_lora_rank
    dt = dtype_of(cfg.dtype)
    pos = cache.lengths  # [B]
    cos, sin = rope_cos_sin(cfg, pos[:, None])
    x = model.embed_tokens(tokens[:, None])  # [B,1,D]
    kvs, scales = list(cache.kv), list(cache.scale)
    for s, seg in enumerate(model.segments):
        parts, experts = _decode_parts(seg)
        graphdefs = {k: g for k, (g, _) in parts.items()}
        states = {k: st for k, (_, st) in parts.items()}
        per_layer = weights.layer_states is not None  # layer_copies
        if per_layer:
            graphdefs = dict(weights.layer_graphdefs[s])

        def body(carry, xs, graphdefs=graphdefs, experts=experts):
            h, kv, scale = carry
            states, w_uk, w_uv, i = xs
            m = {k: nnx.merge(graphdefs[k], states[k]) for k in graphdefs}
            attn = m["self_attn"]
            xn = m["input_layernorm"](h)
            q_nope, q_rope, c, kr = attn.queries_and_latent(xn, cos, sin)
            row = jnp.concatenate([c, kr.astype(c.dtype)], axis=-1)[:, 0]  # [B,K]
            kv, scale = write_token(kv, scale, i, row, pos, cache.kind, C)
            keys = LayerView(kv, scale, i, C, dt)  # layer i, read in place
            h = h + absorbed_attention(attn, q_nope, q_rope, keys, pos, w_uk, w_uv, cfg.attn_impl)
            hn = m["post_attention_layernorm"](h)
            if experts is not None:
                ffn = moe_few_tokens(m["mlp.gate"], m.get("mlp.shared_experts"), *experts, i, hn,
                                     gmm_backend(cfg))
            elif seg.moe:
                ffn = m["mlp"](hn)[0]
            else:
                ffn = m["mlp"](hn)
            return (h + ffn, kv, scale), None

        carry = (x, kvs[s], scales[s])
        if per_layer:  # one copy per layer, the layers unrolled: no per-step slice of a stack
            for i, layer_states in enumerate(weights.layer_states[s]):
                carry, _ = body(carry, (layer_states, weights.w_uk[s][i], weights.w_uv[s][i], i))
        else:
            xs = (states, weights.w_uk[s], weights.w_uv[s], jnp.arange(seg.count))
            carry, _ = jax.lax.scan(body, carry, xs, unroll=_unroll(cfg, seg.count))
        x, kvs[s], scales[s] = carry
    logits = decode_logits(model, weights, x)
    cache = cache.replace(kv=tuple(kvs), scale=tuple(scales), lengths=pos + 1)
    return logits, cache


def teacher_forced_logits(model, ids, lengths, steps: int, cache: LatentCache):
    """Decode-path logits of known continuations (for checking the cache path against the
    full forward, and quantised caches against float ones).

    ids [B, T] int32, lengths [B]: row b's first lengths[b] tokens are prefilled, then its
    next `steps` tokens are fed one decode step at a time (lengths[b] + steps <= T) ->
    logits [B, 1 + steps, vocab] float32 at positions lengths[b] - 1 + j.
    """
    first, cache = prefill(model, ids, lengths, cache)
    weights = absorb(model)

    def step(cache, j):
        tok = jnp.take_along_axis(ids, (lengths + j)[:, None], axis=1)[:, 0]
        logits, cache = decode_step(model, weights, cache, tok)
        return cache, logits

    _, rest = jax.lax.scan(step, cache, jnp.arange(steps))
    return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)
