"""Tiny DeepSeek-V2 models built in-process with transformers (the parity reference)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from transformers import DeepseekV2Config as HFConfig
from transformers import DeepseekV2ForCausalLM as HFModel

from compare import rel as rel_err  # noqa: F401  (the tests' name for it)

# Small shapes that still exercise everything; odd sizes on purpose.
BASE = dict(
    vocab_size=97, hidden_size=48, intermediate_size=72, moe_intermediate_size=24,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=20,
    qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=8,
    n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1,
    max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)

LITE = dict(BASE, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
            routed_scaling_factor=1.0)
V2 = dict(BASE, q_lora_rank=16, topk_method="group_limited_greedy", n_group=4, topk_group=2,
          routed_scaling_factor=16.0)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.707}


def hf_config(**kw) -> HFConfig:
    kw = dict(kw)
    kw.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0})
    cfg = HFConfig(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def widen(model: HFModel, seed: int) -> HFModel:
    """Re-draws every weight at a scale where activations are O(1) and the router's scores are
    far apart (the default 0.02 init makes routing a near-tie lottery)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 2.0 / p.shape[1] ** 0.5)
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model


def build(kw: dict, seed: int = 0) -> HFModel:
    torch.manual_seed(seed)
    model = HFModel(hf_config(**kw)).float().eval()
    return widen(model, seed)


def save(model: HFModel, path: str, max_shard_size=None, dtype=None) -> str:
    if dtype is not None:
        model = model.to(dtype)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    return path


def to_official_config(path: str) -> None:
    """Rewrites a transformers-5 config.json into the official deepseek-ai form."""
    p = os.path.join(path, "config.json")
    with open(p) as f:
        c = json.load(f)
    rp = c.pop("rope_parameters")
    c["rope_theta"] = rp.pop("rope_theta")
    rtype = rp.pop("rope_type")
    c["rope_scaling"] = None if rtype == "default" else dict(rp, type=rtype)
    c.update(aux_loss_alpha=0.001, seq_aux=True, moe_layer_freq=1, scoring_func="softmax", ep_size=1)
    for k in ("qk_head_dim", "head_dim"):
        c.pop(k, None)
    with open(p, "w") as f:
        json.dump(c, f)


def logits(model: HFModel, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def official_norm_topk(model: HFModel) -> HFModel:
    """Patches the reference router to the official DeepSeek-V2 norm_topk_prob semantics:
    top-K weights divided by their sum and NOT scaled (transformers 5 always scales)."""
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is None:
            continue
        orig = gate.forward

        def forward(h, _orig=orig, _gate=gate):
            logits_, w, idx = _orig(h)
            w = w / _gate.routed_scaling_factor
            if _gate.top_k > 1:
                w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
            else:
                w = w * _gate.routed_scaling_factor
            return logits_, w, idx

        gate.forward = forward
    return model
