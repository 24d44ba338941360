"""The one place where a kernel variant is chosen for a platform.

Every kernel here comes in two bodies:

* a *Triton-style* body (one program per query/head block, an in-kernel loop over key
  blocks, masked power-of-two loads): lowered with the Triton backend on GPU
  (`compiler_params=pallas.triton.CompilerParams`), and the body the plain Pallas
  interpreter runs on CPU (`interpret=True`);
* a *Mosaic* body (the key loop is the innermost, sequential grid axis; running softmax
  state in VMEM scratch; lane-dense blocks): lowered with Mosaic on TPU, and run under the
  TPU simulator when `interpret` is a `pltpu.InterpretParams`.

`interpret` decides:

| `interpret`              | variant                                                        |
|--------------------------|----------------------------------------------------------------|
| None                     | True when `jax.default_backend() == "cpu"`, else False         |
| True                     | Triton-style body under the Pallas interpreter (any backend)   |
| `pltpu.InterpretParams`  | Mosaic body under the TPU simulator (slow: ~100x)              |
| False                    | compiled: Triton on `cuda`/`rocm`, Mosaic on `tpu`, chosen when |
|                          | the computation is lowered (`lax.platform_dependent`), so one   |
|                          | jitted function exports for either platform                     |
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

# Large but finite, so that a fully masked row never computes inf - inf.
MASK_VALUE = -0.7 * float(jax.numpy.finfo(jax.numpy.float32).max)

# Exports of a Triton kernel must name its custom call; nothing else is needed for TPU.
TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


def export_disabled_checks(platform: str) -> list:
    """The `disabled_checks` that `jax.export.export` needs for these kernels on `platform`."""
    if platform in ("cuda", "rocm"):
        return [jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]
    return []


def resolve_interpret(interpret: Any) -> Any:
    if interpret is None:
        return jax.default_backend() == "cpu"
    return interpret


def is_tpu_interpret(interpret: Any) -> bool:
    return isinstance(interpret, pltpu.InterpretParams)


def dispatch(interpret: Any, *args, triton: Callable, mosaic: Callable):
    """Run `triton(interpret, *args)` or `mosaic(interpret, *args)` as the table above says.

    Both callables must return the same pytree of shapes and dtypes: when compiled, both
    are traced and the platform picks one at lowering time.
    """
    interpret = resolve_interpret(interpret)
    if is_tpu_interpret(interpret):
        return mosaic(interpret, *args)
    if interpret:
        return triton(True, *args)
    return jax.lax.platform_dependent(
        *args,
        cuda=lambda *a: triton(False, *a),
        rocm=lambda *a: triton(False, *a),
        tpu=lambda *a: mosaic(False, *a),
    )


def triton_params(num_warps: int, num_stages: int):
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def mosaic_params(*semantics: str):
    return pltpu.CompilerParams(dimension_semantics=semantics)


# --- shape helpers shared by the kernels ----------------------------------------------------


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def pow2_chunks(width: int, minimum: int = 16) -> tuple[tuple[int, int], ...]:
    """Split a feature width into power-of-two pieces (offset, size), largest first.

    Triton tensors must have power-of-two sizes and its dots need K >= 16, so a head dim of
    192 is read as 128 + 64 and a latent row of 576 as 512 + 64, without padding. `width`
    must be a multiple of `minimum` (the caller pads otherwise).
    """
    assert width % minimum == 0, (width, minimum)
    chunks, offset, bit = [], 0, 1 << (width.bit_length() - 1)
    while bit >= minimum:
        if width - offset >= bit:
            chunks.append((offset, bit))
            offset += bit
        bit //= 2
    return tuple(chunks)


def chunk_sum(parts):
    """Sum of the per-chunk partial products (no leading `0 +`, unlike `sum`)."""
    return functools.reduce(operator.add, parts)


def next_pow2(n: int) -> int:
    return pl.next_power_of_2(n)
