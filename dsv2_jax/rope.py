"""Rotary position embedding as DeepSeek-V2 applies it: on ADJACENT pairs (2j, 2j+1), with
YaRN frequency interpolation and mscale factors.

Two YaRN factors exist and both matter (missing either is a known port bug):
  * cos/sin are multiplied by mscale(factor, mscale) / mscale(factor, mscale_all_dim);
  * the softmax scale is multiplied by mscale(factor, mscale_all_dim)^2
    (`DeepseekV2Config.softmax_scale`).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from dsv2_jax.config import DeepseekV2Config


def _yarn_correction_range(beta_fast, beta_slow, dim, base, original_max_pos, truncate=True):
    """The ramp's ends (rotary dimensions); rounded outwards to whole dimensions unless the
    config says `truncate: false`."""
    def corr_dim(n_rot):
        return (dim * math.log(original_max_pos / (n_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def inv_freq(cfg: DeepseekV2Config) -> np.ndarray:
    """Inverse frequencies [qk_rope_head_dim // 2], float32 (computed as the references do)."""
    dim = cfg.qk_rope_head_dim
    base = float(cfg.rope_theta)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrap = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if cfg.rope_type == "default":
        return extrap
    rs = cfg.rope_scaling
    factor = float(rs["factor"])
    interp = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
    low, high = _yarn_correction_range(
        rs.get("beta_fast") or 32, rs.get("beta_slow") or 1, dim, base,
        rs["original_max_position_embeddings"], rs.get("truncate", True))
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low))
                   / np.float32(high - low), 0, 1).astype(np.float32)
    extrap_weight = np.float32(1.0) - ramp
    return (interp * (1 - extrap_weight) + extrap * extrap_weight).astype(np.float32)


def attention_factor(cfg: DeepseekV2Config) -> float:
    """The factor YaRN applies to cos and sin."""
    if cfg.rope_type == "default":
        return 1.0
    rs = cfg.rope_scaling
    if rs.get("attention_factor") is not None:
        return float(rs["attention_factor"])
    m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
    if m and m_all:
        return cfg.yarn_mscale(m) / cfg.yarn_mscale(m_all)
    return cfg.yarn_mscale(1.0)


def rope_cos_sin(cfg: DeepseekV2Config, positions: jnp.ndarray):
    """positions [B, T] int -> (cos, sin), each [B, T, qk_rope_head_dim // 2] float32."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq(cfg))
    a = attention_factor(cfg)
    return jnp.cos(freqs) * a, jnp.sin(freqs) * a


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates adjacent pairs of the last dim of x [B, T, ..., R]; cos/sin [B, T, R/2]."""
    extra = x.ndim - cos.ndim
    cos = cos.reshape(cos.shape[:2] + (1,) * extra + cos.shape[2:])
    sin = sin.reshape(sin.shape[:2] + (1,) * extra + sin.shape[2:])
    xf = x.astype(jnp.float32)
    x0, x1 = xf[..., 0::2], xf[..., 1::2]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
