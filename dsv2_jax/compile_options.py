"""XLA compiler options per kind of program: the one place they are chosen.

A forward pass over many tokens (`dsv2 eval`, the bench's prefill row) is a chain of large
GEMMs. On XLA:CPU the default library fusions hand those products, and the elementwise work
around them, to YNNPACK; at this model's shapes its products ran slower than XLA's own
(Eigen) GEMMs: [2048, 1024] x [1024, 2816] 82 vs 112 GFLOP/s, the [2048, 1024] x
[1024, 32000] head 77 vs 105 (float32, 2 cores). The bench config's 4 x 512 forward measured
1.06-1.11x faster with only its reductions left to YNNPACK (scripts/bench_compile_options.py,
docs/benchmarks.md). Decode steps keep the defaults: their few-row products stream weights
faster through YNNPACK (a decode step measured 1.1-1.2x slower with the option), and
`generate`'s prefill shares one program with its decode loop. Training keeps them too (1.01x
and 1.05x in two side-by-side runs, within their rounds' spread). Accelerators get none.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_CPU_FORWARD = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}


def forward_compiler_options() -> dict:
    """Options for `jax.jit(..., compiler_options=...)` of a many-token forward pass: on CPU,
    YNNPACK kept for reductions only; none elsewhere, nor where this XLA does not know the
    option."""
    return dict(_CPU_FORWARD) if _cpu_forward_known() else {}


@functools.cache
def _cpu_forward_known() -> bool:
    """Whether this process runs XLA:CPU and it takes the options (checked once, by compiling
    a tiny program)."""
    if jax.default_backend() != "cpu":
        return False
    try:
        jax.jit(lambda a: a @ a, compiler_options=_CPU_FORWARD).lower(jnp.ones((2, 2))).compile()
    except Exception:  # an XLA without the option: the defaults
        return False
    return True


def jit_forward(fn, **kw):
    """`jax.jit(fn, **kw)` compiled with `forward_compiler_options`."""
    return jax.jit(fn, compiler_options=forward_compiler_options() or None, **kw)
