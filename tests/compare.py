"""How the tests compare numbers: relative errors in float64, and parameter trees checked for
the same structure and leaf shapes (chex) before their leaves are compared, so that a leaf
missing on one side cannot pass unnoticed the way a `zip` over two leaf lists would let it."""

import chex
import jax
import numpy as np


def rel(a, b) -> float:
    """max |a - b| / max |b|, in float64; `b` is the reference (an all-zero `b` makes any
    difference fail rather than divide by zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def tree_rel(got, want) -> float:
    """The largest `rel` over two trees' leaves, after asserting the trees match in structure
    and in every leaf's shape."""
    chex.assert_trees_all_equal_shapes(got, want)
    return max(rel(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
