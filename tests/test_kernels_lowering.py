"""The Pallas kernels lower for GPU (Triton) and TPU (Mosaic) on this CPU-only machine,
through `jax.export` at V2's head dims (192/128 prefill, 576/512 decode), bf16.

What this proves: the Pallas -> Triton IR lowering (it runs at export time and checks, for
instance, that every tensor has a power-of-two size) and the Pallas -> Mosaic MLIR lowering
(block-shape rules) accept the kernels. What it cannot prove without the device: the Triton
compiler (PTX) and Mosaic's layout passes run later, inside XLA's compile on the chip.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from dsv2_jax.kernels import flash_mla, mla_decode, mla_decode_paged
from dsv2_jax.kernels._backend import export_disabled_checks

SDS = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16
CUSTOM_CALL = {"cuda": "__gpu$xla.gpu.triton", "tpu": "tpu_custom_call"}


def _prefill(q, k, v, seg):
    # With segments: causal; without: no mask at all (only the padded tail is hidden).
    return flash_mla(q, k, v, causal=seg is not None, scale=192 ** -0.5, segment_ids=seg,
                     interpret=False)


def _prefill_grad(q, k, v, seg):
    loss = lambda q, k, v: _prefill(q, k, v, seg).astype(jnp.float32).sum()
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


def _decode(q, kv, lengths):
    return mla_decode(q, kv, lengths, v_dim=512, scale=576 ** -0.5, interpret=False)


def _decode_paged(q, pages, table, lengths):
    return mla_decode_paged(q, pages, table, lengths, v_dim=512, scale=576 ** -0.5,
                            interpret=False)


B, T, H = 2, 300, 4  # T not a multiple of any block
PREFILL_ARGS = (SDS((B, T, H, 192), BF16), SDS((B, T, H, 192), BF16), SDS((B, T, H, 128), BF16),
                SDS((B, T), jnp.int32))
CASES = {
    # name: (function, abstract args, kernels in the module)
    "flash_mla_fwd": (_prefill, PREFILL_ARGS, 1),
    "flash_mla_bwd": (_prefill_grad, PREFILL_ARGS, 3),  # forward, dq, dk/dv
    "flash_mla_bwd_no_mask": (_prefill_grad, PREFILL_ARGS[:3] + (None,), 3),
    "mla_decode": (_decode, (SDS((8, 16, 576), BF16), SDS((8, 1000, 576), BF16),
                             SDS((8,), jnp.int32)), 1),
    "mla_decode_paged": (_decode_paged, (SDS((8, 16, 576), BF16), SDS((64, 64, 576), BF16),
                                         SDS((8, 16), jnp.int32), SDS((8,), jnp.int32)), 1),
    # Shorter than the default blocks and not a power of two: the GPU blocks are shrunk to
    # the next power of two (40 -> 64), never to the length itself, nor 20 heads to a
    # 20-row head block; Triton refuses tensors of other sizes.
    "flash_mla_bwd_short": (_prefill_grad, (SDS((1, 40, 2, 192), BF16), SDS((1, 40, 2, 192), BF16),
                                            SDS((1, 40, 2, 128), BF16), SDS((1, 40), jnp.int32)), 3),
    "mla_decode_odd_heads": (_decode, (SDS((2, 20, 576), BF16), SDS((2, 100, 576), BF16),
                                       SDS((2,), jnp.int32)), 1),
}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_lowers(platform, name):
    fn, args, n_kernels = CASES[name]
    exp = export.export(jax.jit(fn), platforms=[platform],
                        disabled_checks=export_disabled_checks(platform))(*args)
    text = exp.mlir_module()
    assert text.count(CUSTOM_CALL[platform]) == n_kernels, name
    other = CUSTOM_CALL["tpu" if platform == "cuda" else "cuda"]
    assert other not in text  # the platform's own variant, and only it


@pytest.mark.xfail(reason="jax 0.10.2: a pallas_call inside lax.platform_dependent cannot be "
                          "lowered for several platforms in one module ('Compiler params for "
                          "platform gpu cannot be used for tpu lowering'); export one "
                          "platform at a time", strict=False)
def test_one_module_for_both_platforms():
    fn, args, _ = CASES["flash_mla_fwd"]
    export.export(jax.jit(fn), platforms=["cuda", "tpu"],
                  disabled_checks=export_disabled_checks("cuda"))(*args)
