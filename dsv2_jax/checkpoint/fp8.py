"""Block-wise FP8 weights (DeepSeek's format): dequantisation and checks.

An FP8 checkpoint stores a Linear weight W [out, in] as float8_e4m3fn plus
`<name>_scale_inv` [ceil(out / bo), ceil(in / bi)] float32, one scale per bo x bi block
(128 x 128 unless `quantization_config.weight_block_size` says otherwise):

    W[r, c] = float32(W_fp8[r, c]) * scale_inv[r // bo, c // bi]

computed in float32, then cast to the target dtype, which is what DeepSeek's own
`weight_dequant` does. Blocks at the right and bottom edges may be partial.
"""

from __future__ import annotations

import numpy as np

from dsv2_jax.checkpoint import CheckpointError

SCALE_SUFFIX = "_scale_inv"
DEFAULT_BLOCK = (128, 128)


def is_fp8(dtype_name: str) -> bool:
    return dtype_name.startswith("F8")


def block_size(raw_config: dict) -> tuple[int, int]:
    qc = raw_config.get("quantization_config") or {}
    b = qc.get("weight_block_size") or DEFAULT_BLOCK
    if len(b) != 2 or not all(isinstance(x, int) and x > 0 for x in b):
        raise CheckpointError(f"config.json: quantization_config.weight_block_size {b!r} is not "
                              f"two positive integers")
    return int(b[0]), int(b[1])


def scale_shape(weight_shape: tuple, block: tuple[int, int]) -> tuple[int, int]:
    out, inp = weight_shape
    return -(-out // block[0]), -(-inp // block[1])


def dequantize(w: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = DEFAULT_BLOCK,
               dtype=np.float32) -> np.ndarray:
    """W = float32(w) * scale_inv broadcast over its block, cast to `dtype`. Works one row
    block at a time, so the float32 intermediate is bo rows, not the whole matrix."""
    if w.ndim != 2:
        raise CheckpointError(f"FP8 dequantisation needs a 2-D weight, got shape {w.shape}")
    if tuple(scale_inv.shape) != scale_shape(w.shape, block):
        raise CheckpointError(f"scale shape {tuple(scale_inv.shape)} does not match weight "
                              f"{tuple(w.shape)} in {block[0]}x{block[1]} blocks")
    bo, bi = block
    out = np.empty(w.shape, dtype)
    s = np.asarray(scale_inv, np.float32)
    for r in range(s.shape[0]):
        rows = slice(r * bo, min((r + 1) * bo, w.shape[0]))
        per_col = np.repeat(s[r], bi)[: w.shape[1]]
        out[rows] = (w[rows].astype(np.float32) * per_col[None, :]).astype(dtype)
    return out


def check_fp8(src, block: tuple[int, int]) -> dict[str, str]:
    """Pairs every FP8 weight of a `SafetensorsDir` with its scale; returns {weight: scale}.
    Refuses an FP8 tensor without a scale, a scale without an FP8 weight, and a scale of the
    wrong shape, naming the tensor."""
    pairs: dict[str, str] = {}
    names = set(src.keys())
    for name in sorted(names):
        where = src.file_of(name).path
        if name.endswith(SCALE_SUFFIX):
            w = name[: -len(SCALE_SUFFIX)]
            if w not in names or not is_fp8(src.dtype_name(w)):
                raise CheckpointError(f"{where}: {name!r} scales no FP8 tensor "
                                      f"({w!r} is {'missing' if w not in names else src.dtype_name(w)})")
            continue
        if not is_fp8(src.dtype_name(name)):
            continue
        scale = name + SCALE_SUFFIX
        if scale not in names:
            raise CheckpointError(f"{where}: tensor {name!r} is {src.dtype_name(name)} without a "
                                  f"{scale!r}; refusing (cannot dequantise without its scale)")
        if len(src.shape(name)) != 2:
            raise CheckpointError(f"{where}: FP8 tensor {name!r} has shape {src.shape(name)}; only "
                                  f"2-D block-quantised weights are supported")
        want = scale_shape(src.shape(name), block)
        if tuple(src.shape(scale)) != want:
            raise CheckpointError(f"{src.file_of(scale).path}: {scale!r} has shape "
                                  f"{tuple(src.shape(scale))}, expected {want} for "
                                  f"{src.shape(name)} in {block[0]}x{block[1]} blocks")
        pairs[name] = scale
    return pairs
