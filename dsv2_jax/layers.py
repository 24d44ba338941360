"""Small building blocks: RMSNorm, a Linear with logical axis names, the SwiGLU MLP, the
embedding. Kernels are stored [in, out]; the HF checkpoint stores Linear weights [out, in]
(the converter transposes)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv2_jax.sharding.rules import gathered

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name_or_dtype):
    return DTYPES[name_or_dtype] if isinstance(name_or_dtype, str) else jnp.dtype(name_or_dtype)


def normal_param(rngs: nnx.Rngs, shape, std: float, dtype, axes: tuple) -> nnx.Param:
    """A parameter drawn from N(0, std^2), carrying its logical axis names for sharding."""
    value = (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


def use(param: nnx.Param, dtype=None):
    """A parameter's value as the computation uses it, in `dtype` (default: as stored):
    gathered over the mesh axes that split it for storage only (FSDP); unchanged on one
    device. Cast first, so that bf16 compute gathers bf16 weights."""
    value = param[...] if dtype is None else param[...].astype(dtype)
    return gathered(value, param.get_metadata().get("logical_axes", ()))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32, axis_name="norm"):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return use(self.weight).astype(x.dtype) * xf.astype(x.dtype)


def rows_product(x, w):
    """x [..., in] times a weight laid out [out, in] -> [..., out] float32, as a multiply-reduce
    along each output's row (y[m, o] = sum_i w[o, i] x[m, i]): how XLA:CPU streams a weight
    fastest through 2-8 rows (see `dsv2_jax.decode.few_row_products`)."""
    # As [rows, in]: with a unit axis kept (decode's [B, 1, in]) XLA:CPU's fused product ran
    # ~20x slower.
    xm = x.reshape(-1, x.shape[-1])
    y = jnp.sum(w[None] * xm[:, None, :].astype(w.dtype), axis=-1, dtype=jnp.float32)
    return y.reshape(*x.shape[:-1], w.shape[0])


class Linear(nnx.Module):
    """y = x @ kernel, kernel [in, out], no bias (DeepSeek-V2 has none).

    `rows_major` (False as built and as stored) marks a copy whose kernel is laid out [out, in]
    and whose product is a multiply-reduce along each output's row: decode's form for a few
    rows on XLA:CPU (see `dsv2_jax.decode.few_row_products`)."""

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs, std: float, dtype, param_dtype,
                 axes: tuple[str, str]):
        self.kernel = normal_param(rngs, (din, dout), std, param_dtype, axes)
        self.dtype = dtype
        self.rows_major = False

    def to_rows_major(self, *stacked: "Linear"):
        """In place, on a copy, for decode's few-row form: the kernel laid out [..., out, in],
        with the kernels of `stacked` (Linears of the same input) appended to its outputs.
        One product per input: XLA:CPU materialises an input broadcast that two
        multiply-reduces share."""
        value = jnp.concatenate([self.kernel[...], *(k.kernel[...] for k in stacked)], axis=-1)
        axes = tuple(self.kernel.get_metadata().get("logical_axes", ()))
        if len(axes) >= 2:
            axes = (*axes[:-2], axes[-1], axes[-2])
        self.kernel = nnx.Param(jnp.swapaxes(value, -1, -2), logical_axes=axes)
        self.rows_major = True

    def __call__(self, x):
        if self.rows_major:
            return rows_product(x.astype(self.dtype), use(self.kernel, self.dtype)).astype(self.dtype)
        return jnp.einsum("...i,io->...o", x.astype(self.dtype), use(self.kernel, self.dtype))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Used for the dense layers and the shared experts."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, std: float, dtype, param_dtype,
                 hidden_axis: str = "mlp"):
        kw = dict(rngs=rngs, std=std, dtype=dtype, param_dtype=param_dtype)
        self.gate_proj = Linear(dim, hidden, axes=("embed", hidden_axis), **kw)
        self.up_proj = Linear(dim, hidden, axes=("embed", hidden_axis), **kw)
        self.down_proj = Linear(hidden, dim, axes=(hidden_axis, "embed"), **kw)
        self.rows_major = False

    def to_rows_major(self):
        """In place, on a copy, for decode's few-row form: gate and up as one Linear `gate_up`
        [..., 2 hidden, dim], down laid out [..., dim, hidden]."""
        self.gate_proj.to_rows_major(self.up_proj)
        self.gate_up = self.gate_proj
        del self.gate_proj, self.up_proj
        self.down_proj.to_rows_major()
        self.rows_major = True

    def __call__(self, x):
        if self.rows_major:
            gate, up = jnp.split(self.gate_up(x), 2, axis=-1)
            return self.down_proj(jax.nn.silu(gate) * up)
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, std: float, dtype, param_dtype):
        self.weight = normal_param(rngs, (vocab, dim), std, param_dtype, ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, ids):
        return jnp.take(use(self.weight, self.dtype), ids, axis=0)

    def attend(self, x):
        """Tied unembedding: x [..., D] -> logits [..., V]."""
        return jnp.einsum("...d,vd->...v", x, use(self.weight, self.dtype))
