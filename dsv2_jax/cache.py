"""The latent KV cache of MLA decode, as an explicit value (no module state).

Shapes: L layers of one segment, B batch, S cache positions, C kv_lora_rank, R
qk_rope_head_dim, K = C + R.

One buffer per layer segment (the model's runs of identical, stacked layers), leading layer
axis like the segment's parameters:

    kv [L, B, S, K]      row = [c ; k_rope]: the normed latent (`MLA.latent`'s c), then the
                         rotated rope key shared by all heads
    scale [L, B, S, 2]   int8 only: float32 scales of the latent part and of the rope part
    lengths [B] int32    positions filled in each row (all layers alike)

The two parts live in one row because absorbed decode reads it as one K-wide key whose first
C values are also the value (the contract of `dsv2_jax.kernels.mla_decode`: cache [B, S, K]):
no concatenation per step. Nothing expanded is stored, so a token costs K values per layer.

Storage kinds:
  * `float32`, `bfloat16`, `float16`: the values as they are.
  * `int8`: symmetric, one scale per token for each part (the latent is RMS-normed, the rope
    key is not: their ranges differ), so K bytes + 8 scale bytes per token per layer.
  * `fp8`: `float8_e4m3fn`, no scale: e4m3 is a float, so a scale would not buy relative
    precision, only range; values are clipped to +-448 (e4m3 has no infinity and overflows to
    NaN, which masked attention would still turn into NaN outputs).

A new cache is all zeros: positions past `lengths` are never attended, but their values still
reach the value product multiplied by zero, so they must be finite.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from dsv2_jax.config import DeepseekV2Config

_FLOAT_KINDS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_FP8 = getattr(jnp, "float8_e4m3fn", None)
CACHE_KINDS = tuple(_FLOAT_KINDS) + ("int8",) + (("fp8",) if _FP8 is not None else ())
_FP8_MAX = 448.0
_INT8_SCALE_BYTES = 2 * 4  # two float32 scales per token per layer


def resolve_kind(cfg: DeepseekV2Config, kind: str | None) -> str:
    """None -> the compute dtype; otherwise checked against `CACHE_KINDS`."""
    kind = cfg.dtype if kind is None else kind
    if kind not in CACHE_KINDS:
        raise ValueError(f"cache dtype {kind!r}: expected one of {', '.join(CACHE_KINDS)}")
    return kind


def storage_dtype(kind: str):
    if kind == "int8":
        return jnp.int8
    if kind == "fp8":
        return _FP8
    return _FLOAT_KINDS[kind]


@struct.dataclass
class LatentCache:
    kv: tuple  # per segment [L, B, S, C+R], storage dtype
    scale: tuple  # per segment [L, B, S, 2] float32 (int8), else None
    lengths: jax.Array  # [B] int32
    kind: str = struct.field(pytree_node=False)
    latent_dim: int = struct.field(pytree_node=False)  # C: where the rope part starts

    @property
    def batch(self) -> int:
        return self.kv[0].shape[1]

    @property
    def max_len(self) -> int:
        return self.kv[0].shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes the cache arrays hold (lengths excluded)."""
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves((self.kv, self.scale)))


def init_cache(cfg: DeepseekV2Config, batch: int, max_len: int, kind: str | None = None) -> LatentCache:
    """An empty (all-zero, lengths 0) cache for `batch` rows of `max_len` positions."""
    kind = resolve_kind(cfg, kind)
    K = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    kv, scale = [], []
    for _, _, count in cfg.layer_segments():
        kv.append(jnp.zeros((count, batch, max_len, K), storage_dtype(kind)))
        scale.append(jnp.zeros((count, batch, max_len, 2), jnp.float32) if kind == "int8" else None)
    return LatentCache(tuple(kv), tuple(scale), jnp.zeros((batch,), jnp.int32), kind, cfg.kv_lora_rank)


# ---------------------------------------------------------------------------------------
# Sizes.


@dataclasses.dataclass(frozen=True)
class CacheSize:
    kind: str
    values_per_token_per_layer: int  # C + R
    bytes_per_element: int
    scale_bytes_per_token_per_layer: int  # 8 for int8, else 0
    bytes_per_token: int  # all layers
    total_bytes: int  # bytes_per_token * batch * max_len


def cache_size(cfg: DeepseekV2Config, kind: str | None = None, batch: int = 1,
               max_len: int = 1) -> CacheSize:
    """(kv_lora_rank + qk_rope_head_dim) x layers x bytes per element (+ int8's scales) per
    token, and that times batch x max_len in total. Equals `init_cache(...).nbytes`."""
    kind = resolve_kind(cfg, kind)
    K = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    item = jnp.dtype(storage_dtype(kind)).itemsize
    extra = _INT8_SCALE_BYTES if kind == "int8" else 0
    per_token = (K * item + extra) * cfg.num_hidden_layers
    return CacheSize(kind, K, item, extra, per_token, per_token * batch * max_len)


def mha_bytes_per_token(cfg: DeepseekV2Config, bytes_per_element: int, head_dim: int | None = None) -> int:
    """An MHA cache of the same heads for comparison: keys and values of every head, every
    layer. head_dim None: this model's own (keys qk_head_dim, values v_head_dim); the paper
    compares against d_h = 128 for both (2 * 128 heads * 128 at V2's shape)."""
    N = cfg.num_attention_heads
    per_head = 2 * head_dim if head_dim else cfg.qk_head_dim + cfg.v_head_dim
    return N * per_head * cfg.num_hidden_layers * bytes_per_element


# ---------------------------------------------------------------------------------------
# Quantisation and access.


def quantise(rows, kind: str, latent_dim: int):
    """rows [..., K] float -> (stored [..., K], scale [..., 2] float32 or None)."""
    if kind in _FLOAT_KINDS:
        return rows.astype(_FLOAT_KINDS[kind]), None
    x = rows.astype(jnp.float32)
    if kind == "fp8":
        return jnp.clip(x, -_FP8_MAX, _FP8_MAX).astype(_FP8), None
    parts = (x[..., :latent_dim], x[..., latent_dim:])
    # The floor keeps an all-zero part (a fresh or padded row) from dividing 0 by 0.
    scales = [jnp.maximum(jnp.max(jnp.abs(p), axis=-1), 1e-30) / 127.0 for p in parts]
    q = [jnp.clip(jnp.round(p / s[..., None]), -127, 127) for p, s in zip(parts, scales)]
    return jnp.concatenate(q, axis=-1).astype(jnp.int8), jnp.stack(scales, axis=-1)


def dequantise(stored, scale, latent_dim: int, dtype):
    """stored [..., K], scale [..., 2] or None -> [..., K] in `dtype`."""
    if scale is None:
        return stored.astype(dtype)
    K = stored.shape[-1]
    s = jnp.concatenate([jnp.broadcast_to(scale[..., :1], scale.shape[:-1] + (latent_dim,)),
                         jnp.broadcast_to(scale[..., 1:], scale.shape[:-1] + (K - latent_dim,))], -1)
    return (stored.astype(jnp.float32) * s).astype(dtype)


def fill_segment(cache: LatentCache, seg: int, rows, lengths) -> LatentCache:
    """Prefill: rows [L, B, T, K] (every layer of segment `seg`) stored at positions [0, T);
    lengths [B] becomes the cache's lengths."""
    q, s = quantise(rows, cache.kind, cache.latent_dim)
    kv = list(cache.kv)
    kv[seg] = jax.lax.dynamic_update_slice_in_dim(kv[seg], q, 0, axis=2)
    scale = list(cache.scale)
    if s is not None:
        scale[seg] = jax.lax.dynamic_update_slice_in_dim(scale[seg], s, 0, axis=2)
    return cache.replace(kv=tuple(kv), scale=tuple(scale), lengths=lengths.astype(jnp.int32))


def write_token(kv, scale, layer, row, positions, kind: str, latent_dim: int):
    """One new token per batch row into one segment's buffers: kv [L, B, S, K] (scale
    [L, B, S, 2] or None), row [B, K] at [layer, b, positions[b]]. A scatter into the buffer
    it was given, so inside a loop XLA updates the carried buffer in place."""
    q, s = quantise(row, kind, latent_dim)
    b = jnp.arange(row.shape[0])
    kv = kv.at[layer, b, positions].set(q)
    if s is not None:
        scale = scale.at[layer, b, positions].set(s)
    return kv, scale


def read_layer(kv, scale, layer, latent_dim: int, dtype):
    """Layer `layer` of one segment's buffers, dequantised: [B, S, K] in `dtype`."""
    x = jax.lax.dynamic_index_in_dim(kv, layer, axis=0, keepdims=False)
    s = None if scale is None else jax.lax.dynamic_index_in_dim(scale, layer, axis=0, keepdims=False)
    return dequantise(x, s, latent_dim, dtype)


@dataclasses.dataclass(frozen=True)
class LayerView:
    """One layer of the cache, read where it lies.

    kv [L, B, S, K] (scale [L, B, S, 2] or None) with `layer` its index (an int or a traced
    scalar), or kv [B, S, K] with layer None. `whole()` copies the layer out ([B, S, K]);
    `block(start, size)` copies only positions [start, start + size), so a reader that walks
    the live blocks touches each cached value once and never the dead tail of the buffer.
    """

    kv: jax.Array
    scale: jax.Array | None
    layer: object
    latent_dim: int
    dtype: object

    @classmethod
    def of(cls, kv, dtype=None) -> "LayerView":
        """A view of a plain [B, S, K] float cache."""
        return cls(kv, None, None, kv.shape[-1], kv.dtype if dtype is None else dtype)

    @property
    def max_len(self) -> int:
        return self.kv.shape[-2]

    def whole(self):
        if self.layer is None:
            return dequantise(self.kv, self.scale, self.latent_dim, self.dtype)
        return read_layer(self.kv, self.scale, self.layer, self.latent_dim, self.dtype)

    def block(self, start, size: int):
        """-> [B, size, K] in `dtype`: positions [start, start + size); start + size <= S."""
        def cut(a):
            if a is None:
                return None
            if self.layer is None:
                return jax.lax.dynamic_slice_in_dim(a, start, size, axis=1)
            i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
            B, _, W = a.shape[1:]
            return jax.lax.dynamic_slice(a, (i32(self.layer), i32(0), i32(start), i32(0)), (1, B, size, W))[0]

        return dequantise(cut(self.kv), cut(self.scale), self.latent_dim, self.dtype)
