"""Pallas kernels for latent attention (`dsv2_jax.kernels`). See docs/kernels.md.

* `flash_mla`: training / prefill attention with qk dim != v dim, causal, packed documents,
  Pallas forward and backward (`flash_mla.py`, TPU bodies in `flash_mla_tpu.py`).
* `mla_decode`, `mla_decode_paged`: absorbed-MLA decode over a latent cache, split over the
  sequence (flash-decoding), contiguous or paged (`mla_decode.py`, `mla_decode_tpu.py`).

The functions are re-exported here; `BlockSizes` and the `*_reference` functions live in the
kernel modules (`from dsv2_jax.kernels.flash_mla import BlockSizes`). Note that the package
attribute `flash_mla` is the function, so import the module with `from ... import` rather
than `import dsv2_jax.kernels.flash_mla as m`.
"""

from dsv2_jax.kernels.flash_mla import flash_mla, flash_mla_reference
from dsv2_jax.kernels.mla_decode import (PAGE_SIZE, mla_decode, mla_decode_paged,
                                         mla_decode_paged_reference, mla_decode_reference)

__all__ = ["PAGE_SIZE", "flash_mla", "flash_mla_reference", "mla_decode", "mla_decode_paged",
           "mla_decode_paged_reference", "mla_decode_reference"]
