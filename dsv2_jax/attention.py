"""Multi-head Latent Attention (MLA), expanded form (training and prefill).

Shapes: B batch, T query positions, S key positions, N heads, P qk_nope_head_dim,
R qk_rope_head_dim, V v_head_dim, C kv_lora_rank (the latent), Q q_lora_rank.

    q        = q_b(norm(q_a(x)))   or q_proj(x)          [B,T,N,P+R]  rows per head [nope|rope]
    [c ; kr] = kv_a_proj_with_mqa(x)                      [B,T,C+R]
    c        = kv_a_layernorm(c)                          (the norm covers the latent only)
    [kn ; v] = kv_b(c)                                    [B,T,N,P+V]  rows per head [k_nope|v]
    q_rope, kr rotated on adjacent pairs; kr is ONE vector shared by all heads
    logits   = (q_nope . kn + q_rope . kr) * softmax_scale

The attention core is chosen in one place (`cfg.attn_impl`): `xla` (blocked causal, the
default), `reference` (the plain formula, whose shared rope key is never broadcast) or
`pallas` (`dsv2_jax.kernels.flash_mla`: flash attention with a Pallas forward and backward,
from the packed documents' segment ids instead of a dense mask).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from dsv2_jax.config import DeepseekV2Config
from dsv2_jax.layers import Linear, RMSNorm, dtype_of
from dsv2_jax.rope import apply_rope

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(segment_ids_q, segment_ids_k, q_positions=None, k_positions=None):
    """Causal mask [B,1,T,S] that also keeps packed documents apart (equal segment ids)."""
    T, S = segment_ids_q.shape[1], segment_ids_k.shape[1]
    if q_positions is None:
        q_idx = jnp.arange(T)[None, :] + (S - T)
        k_idx = jnp.arange(S)[None, :]
    else:
        q_idx, k_idx = q_positions, k_positions
    causal = q_idx[:, :, None] >= k_idx[:, None, :]
    same = segment_ids_q[:, :, None] == segment_ids_k[:, None, :]
    return (causal & same)[:, None]


def mla_attention_reference(q_nope, q_rope, k_nope, k_rope, v, mask, scale):
    """Plain-jnp MLA core.

    q_nope [B,T,N,P], q_rope [B,T,N,R], k_nope [B,S,N,P], k_rope [B,S,R], v [B,S,N,V],
    mask [B,1,T,S] bool -> [B,T,N,V]. Softmax in float32.
    """
    logits = jnp.einsum("btnp,bsnp->bnts", q_nope, k_nope, preferred_element_type=jnp.float32)
    logits = logits + jnp.einsum("btnr,bsr->bnts", q_rope, k_rope, preferred_element_type=jnp.float32)
    logits = jnp.where(mask, logits * scale, _NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnts,bsnv->btnv", probs, v)


def _causal_block(T: int) -> int:
    """Query block of the XLA core: at least 64, at most 16 blocks per sequence."""
    return max(64, -(-T // 16))


def mla_attention_xla(q_nope, q_rope, k_nope, k_rope, v, mask, scale):
    """The training / prefill core. Same contract as `mla_attention_reference`, for a mask
    that is causal by index (query t never sees key s > t + S - T), which is what the model
    builds.

    Two things make it several times faster than the reference on CPU (forward + backward
    ~5x at T=256): queries run in blocks that only visit the keys at or before the block's
    end (the fully masked upper triangle of blocks is never computed), and the nope and rope
    parts are concatenated into one [P+R] contraction, the shared rope key broadcast to
    every head, instead of two logit tensors summed.
    """
    B, T, N, _ = q_nope.shape
    S = k_nope.shape[1]
    q = jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1)
    kr = jnp.broadcast_to(k_rope[:, :, None, :], (B, S, N, k_rope.shape[-1]))
    k = jnp.concatenate([k_nope, kr.astype(k_nope.dtype)], axis=-1)
    block = _causal_block(T)
    outs = []
    for start in range(0, T, block):
        end = min(T, start + block)
        kend = end + S - T  # keys a query in [start, end) may see
        logits = jnp.einsum("btnh,bsnh->bnts", q[:, start:end], k[:, :kend],
                            preferred_element_type=jnp.float32)
        logits = jnp.where(mask[:, :, start:end, :kend], logits * scale, _NEG)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bnts,bsnv->btnv", probs, v[:, :kend]))
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)


def mla_attention_pallas(q_nope, q_rope, k_nope, k_rope, v, mask, scale, segment_ids=None):
    """The Pallas flash-attention core (`dsv2_jax.kernels.flash_mla`), causal within the
    documents of `segment_ids` [B,T] (the mask is not read: the kernel builds it per block and
    skips fully masked blocks). Under a mesh it runs per shard (batch over the data axes,
    heads over `tensor`): a kernel is one device's program, which XLA cannot split."""
    from dsv2_jax.kernels import flash_mla

    del mask
    B, T, N, _ = q_nope.shape
    if segment_ids is None:
        segment_ids = jnp.ones((B, T), jnp.int32)
    q = jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1)
    kr = jnp.broadcast_to(k_rope[:, :, None, :], (B, T, N, k_rope.shape[-1]))
    k = jnp.concatenate([k_nope, kr.astype(k_nope.dtype)], axis=-1)

    def core(q, k, v, seg):
        return flash_mla(q, k, v, causal=True, scale=float(scale), segment_ids=seg)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return core(q, k, v, segment_ids)
    from jax.sharding import PartitionSpec as P

    from dsv2_jax.sharding.rules import batch_axes

    sizes = dict(mesh.shape)
    rows = tuple(a for a in batch_axes(mesh) if sizes[a] > 1)
    if B % max(1, math.prod(sizes[a] for a in rows)):
        rows = ()  # a batch the data axes do not divide (inference) stays whole
    heads = "tensor" if sizes.get("tensor", 1) > 1 and N % sizes["tensor"] == 0 else None
    spec = P(rows or None, None, heads, None)
    return jax.shard_map(core, in_specs=(spec, spec, spec, P(rows or None, None)), out_specs=spec,
                         check_vma=False)(q, k, v, segment_ids)


ATTENTION_IMPLS = {"xla": mla_attention_xla, "reference": mla_attention_reference,
                   "pallas": mla_attention_pallas}


class MLA(nnx.Module):
    def __init__(self, cfg: DeepseekV2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        kw = dict(rngs=rngs, std=cfg.initializer_range, dtype=dt, param_dtype=pdt)
        D, N = cfg.hidden_size, cfg.num_attention_heads
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(D, N * cfg.qk_head_dim, axes=("embed", "q_heads"), **kw)
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, axes=("embed", "q_lora"), **kw)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6, param_dtype=pdt, axis_name="q_lora")
            self.q_b_proj = Linear(cfg.q_lora_rank, N * cfg.qk_head_dim, axes=("q_lora", "q_heads"), **kw)
        self.kv_a_proj_with_mqa = Linear(D, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                         axes=("embed", "kv_lora"), **kw)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6, param_dtype=pdt, axis_name="kv_lora")
        self.kv_b_proj = Linear(cfg.kv_lora_rank, N * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                axes=("kv_lora", "kv_heads"), **kw)
        self.o_proj = Linear(N * cfg.v_head_dim, D, axes=("o_heads", "embed"), **kw)
        self.rows_major = False

    def to_rows_major(self):
        """In place, on a copy, for decode's few-row form: q_proj (or q_a_proj) and
        kv_a_proj_with_mqa as one Linear `a_proj` [..., Q + C + R, D], q_b_proj and o_proj
        laid out [..., out, in]. kv_b_proj stays: decode reads it only absorbed."""
        first = self.q_proj if self.cfg.q_lora_rank is None else self.q_a_proj
        first.to_rows_major(self.kv_a_proj_with_mqa)
        self.a_proj = first
        if self.cfg.q_lora_rank is None:
            del self.q_proj
        else:
            del self.q_a_proj
            self.q_b_proj.to_rows_major()
        del self.kv_a_proj_with_mqa
        self.o_proj.to_rows_major()
        self.rows_major = True

    def latent(self, x, cos, sin):
        """x [B,T,D] -> (c [B,T,C] normed latent, kr [B,T,R] rotated shared rope key): what a
        KV cache holds."""
        return self._latent_of(self.kv_a_proj_with_mqa(x), cos, sin)

    def queries(self, x, cos, sin):
        """x [B,T,D] -> (q_nope [B,T,N,P], q_rope [B,T,N,R] rotated)."""
        first = self.q_proj(x) if self.cfg.q_lora_rank is None else self.q_a_proj(x)
        return self._queries_of(first, cos, sin)

    def queries_and_latent(self, x, cos, sin):
        """`queries` and `latent` of one x -> (q_nope, q_rope, c, kr); a rows-major copy
        multiplies x once by its stacked first projections."""
        if not self.rows_major:
            return (*self.queries(x, cos, sin), *self.latent(x, cos, sin))
        a = self.a_proj(x)
        Q = a.shape[-1] - self.cfg.kv_lora_rank - self.cfg.qk_rope_head_dim
        return (*self._queries_of(a[..., :Q], cos, sin), *self._latent_of(a[..., Q:], cos, sin))

    def _latent_of(self, ckv, cos, sin):
        C = self.cfg.kv_lora_rank
        c, kr = ckv[..., :C], ckv[..., C:]
        return self.kv_a_layernorm(c), apply_rope(kr, cos, sin)

    def _queries_of(self, first, cos, sin):
        """first: q_proj(x), or q_a_proj(x) with a q latent -> (q_nope, q_rope)."""
        cfg = self.cfg
        B, T, _ = first.shape
        q = first if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(first))
        q = q.reshape(B, T, cfg.num_attention_heads, cfg.qk_head_dim)
        q_nope, q_rope = q[..., : cfg.qk_nope_head_dim], q[..., cfg.qk_nope_head_dim:]
        return q_nope, apply_rope(q_rope, cos, sin)

    def __call__(self, x, cos, sin, mask, segment_ids=None):
        """x [B,T,D], cos/sin [B,T,R/2], mask [B,1,T,T], segment_ids [B,T] (the documents the
        mask keeps apart; read by the `pallas` core only) -> [B,T,D]."""
        cfg = self.cfg
        B, T, _ = x.shape
        N, P = cfg.num_attention_heads, cfg.qk_nope_head_dim
        q_nope, q_rope = self.queries(x, cos, sin)
        c, kr = self.latent(x, cos, sin)
        kv = self.kv_b_proj(c).reshape(B, T, N, P + cfg.v_head_dim)
        k_nope, v = kv[..., :P], kv[..., P:]
        if cfg.attn_impl == "pallas":
            out = mla_attention_pallas(q_nope, q_rope, k_nope, kr, v, mask, cfg.softmax_scale,
                                       segment_ids)
        else:
            out = ATTENTION_IMPLS[cfg.attn_impl](q_nope, q_rope, k_nope, kr, v, mask, cfg.softmax_scale)
        return self.o_proj(out.reshape(B, T, N * cfg.v_head_dim))
