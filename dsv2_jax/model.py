"""The decoder and the causal LM.

    ids [B,T] -> embed -> { RMSNorm -> MLA -> + ; RMSNorm -> MLP | MoE -> + } x L -> RMSNorm
        -> lm_head -> logits [B,T,V]

Consecutive identical layers are stacked: each run of dense or MoE layers
(`cfg.layer_segments()`) holds its parameters with a leading layer axis and runs under one
`jax.lax.scan`, so compile time does not grow with depth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv2_jax.attention import MLA, attention_mask
from dsv2_jax.config import DeepseekV2Config
from dsv2_jax.layers import MLP, Embed, Linear, RMSNorm, dtype_of, use
from dsv2_jax.moe import MoE
from dsv2_jax.rope import rope_cos_sin
from dsv2_jax.sharding.rules import constrain

# Logical layouts of the activations at layer boundaries (sharding/rules.py maps them).
ACT_BTD = ("act_batch", "act_seq", "act_embed")
ACT_BTV = ("act_batch", "act_seq", "act_vocab")

_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: DeepseekV2Config, moe: bool, *, rngs: nnx.Rngs):
        pdt = dtype_of(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt, axis_name="embed")
        self.self_attn = MLA(cfg, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt,
                                                axis_name="embed")
        if moe:
            self.mlp = MoE(cfg, rngs=rngs)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, std=cfg.initializer_range,
                           dtype=dtype_of(cfg.dtype), param_dtype=pdt)
        self.is_moe = moe

    def __call__(self, x, cos, sin, mask, valid=None, *, train: bool = False, segment_ids=None,
                 stacked_experts=None):
        """valid [B,T] bool marks real (non-padding) tokens; segment_ids [B,T] the packed
        documents (for the `pallas` attention); stacked_experts: see `MoE.__call__`'s
        `stacked`. Returns (x, router output or None)."""
        a = constrain(self.self_attn(constrain(self.input_layernorm(x), ACT_BTD), cos, sin, mask,
                                     segment_ids), ACT_BTD)
        x = x + a
        h = constrain(self.post_attention_layernorm(x), ACT_BTD)
        if self.is_moe:
            h, router = self.mlp(h, train=train, valid=valid, stacked=stacked_experts)
        else:
            h, router = self.mlp(h), None
        return x + constrain(h, ACT_BTD), router


def _stacked(make, n: int, rngs: nnx.Rngs) -> nnx.Module:
    """n independently initialised copies of `make(rngs)`, parameters stacked on axis 0."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    keys = jax.random.split(rngs.params(), n)
    state = jax.vmap(lambda k: nnx.state(make(nnx.Rngs(params=k))))(keys)
    module = nnx.merge(graphdef, state)
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Variable) and "logical_axes" in var.get_metadata():
            var.set_metadata("logical_axes", ("layers",) + tuple(var.get_metadata()["logical_axes"]))
    return module


class LayerStack(nnx.Module):
    """`count` identical decoder layers (all dense or all MoE), run by one scan.

    A scan hands each layer its slice of the stacked parameters, and XLA:CPU copies a slice
    before a product reads it. Outside training the routed experts (most of a MoE layer's
    bytes) are therefore read from the stacks by index instead (`stacked_experts`): the
    bench config's 4 x 512 forward copied 9 x 46 MB (~0.45 s of op time by profile, ~2% of
    the pass measured, as XLA:CPU overlapped them; its peak memory ~0.4 GB lower). Training keeps
    the slices: its gradients are per-layer slices too, stacked by the scan.
    """

    def __init__(self, cfg: DeepseekV2Config, moe: bool, first: int, count: int, *, rngs: nnx.Rngs):
        self.cfg, self.moe, self.first, self.count = cfg, moe, first, count
        self.layers = _stacked(lambda r: DecoderLayer(cfg, moe, rngs=r), count, rngs)

    def __call__(self, x, cos, sin, mask, valid=None, *, train: bool = False, segment_ids=None):
        graphdef, state = nnx.split(self.layers)
        experts = self.stacked_experts(train)

        def body(h, xs):
            layer_state, i = xs
            layer = nnx.merge(graphdef, layer_state)
            h, router = layer(h, cos, sin, mask, valid, train=train, segment_ids=segment_ids,
                              stacked_experts=None if experts is None else (experts, i))
            return h, router

        if self.cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
        xs = (state, jnp.arange(self.count, dtype=jnp.int32))
        return jax.lax.scan(body, x, xs, unroll=max(1, min(self.cfg.scan_unroll, self.count)))

    def stacked_experts(self, train: bool):
        """The stacked routed experts a forward pass reads by layer index, or None (dense
        segments, training)."""
        return None if train or not self.moe else self.layers.mlp.experts


class DeepseekV2ForCausalLM(nnx.Module):
    def __init__(self, cfg: DeepseekV2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, std=cfg.initializer_range,
                                  dtype=dt, param_dtype=pdt)
        self.segments = nnx.List([
            LayerStack(cfg, kind == "moe", first, count, rngs=rngs)
            for kind, first, count in cfg.layer_segments()
        ])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=pdt, axis_name="embed")
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, rngs=rngs, std=cfg.initializer_range,
                                  dtype=dt, param_dtype=pdt, axes=("embed", "vocab"))

    def hidden_states(self, input_ids, positions=None, segment_ids=None, *, train: bool = False):
        """ids [B,T] int -> (final normed hidden [B,T,D], routers: list per MoE segment)."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        B, T = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        cos, sin = rope_cos_sin(self.cfg, positions)
        mask = attention_mask(segment_ids, segment_ids)
        x = constrain(self.embed_tokens(input_ids), ACT_BTD)
        routers = []
        for seg in self.segments:
            x, router = seg(x, cos, sin, mask, segment_ids > 0, train=train, segment_ids=segment_ids)
            if seg.moe:
                routers.append(router)
        return constrain(self.norm(x), ACT_BTD), routers

    def logits_from_hidden(self, h):
        if self.cfg.tie_word_embeddings:
            return constrain(self.embed_tokens.attend(h), ACT_BTV)
        return constrain(self.lm_head(h), ACT_BTV)

    def output_kernel(self):
        """The unembedding as [D, V] in the compute dtype (lm_head, or the tied embedding
        transposed): what a chunked loss multiplies the hidden states with."""
        if self.cfg.tie_word_embeddings:
            return use(self.embed_tokens.weight, self.embed_tokens.dtype).T
        return use(self.lm_head.kernel, self.lm_head.dtype)

    def __call__(self, input_ids, positions=None, segment_ids=None, *, train: bool = False,
                 return_routers: bool = False):
        """ids [B,T] int32 -> logits [B,T,V] float32.

        positions / segment_ids [B,T] (optional) support packed documents: attention never
        crosses a segment boundary. With return_routers=True also returns the router outputs
        of every MoE layer (stacked per MoE segment, leading axis = layer).
        """
        h, routers = self.hidden_states(input_ids, positions, segment_ids, train=train)
        logits = self.logits_from_hidden(h).astype(jnp.float32)
        return (logits, routers) if return_routers else logits

    def layer(self, i: int) -> DecoderLayer:
        """Decoder layer i as a standalone module (a view: parameters are copied slices)."""
        for seg in self.segments:
            if seg.first <= i < seg.first + seg.count:
                graphdef, state = nnx.split(seg.layers)
                return nnx.merge(graphdef, jax.tree.map(lambda a: a[i - seg.first], state))
        raise IndexError(f"layer {i} out of range [0, {self.cfg.num_hidden_layers})")
