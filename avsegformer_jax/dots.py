"""Products of bfloat16 operands, produced in float32 and rounded once, on CPU.

With the model in bfloat16 (`model.dtype`), a plain `a @ b` asks XLA for a
bfloat16 result. XLA:CPU runs that at float32 speed or below (on an AVX-512
Xeon with AMX, 2 cores: 120-170 GFLOP/s for the head's [15680,2048] x
[2048,2048]), while the same product asked in float32 goes to YNNPACK's
BF16 kernels, ~600 GFLOP/s. GPUs and TPUs accumulate in float32 either way,
and on them the plain product is kept (`lax.platform_dependent`: only the
compiling platform's form is lowered). XLA:GPU does not fuse the rounding
into every GEMM: with every product widened, the deviceless H100 roofline
of the S4 PVTv2-B5 train step went from 21.0 to 24.4 ms and its plan from
3.77 to 4.20 GiB (benchmarks/README.md).

Only the forward product changes. A custom JVP gives the tangents the plain
low-precision products, so the backward GEMMs stay bfloat16 (differentiating
`dot(preferred=float32).astype(bfloat16)` would feed them float32
cotangents). The remat policies see the custom JVP's product as one opaque
call, not a dot: the result of a batch-free `dot_general` (the Dense layers)
is named WEIGHT_DOT so that `model.remat_policy="dots"` keeps it, as it
keeps plain products (layers.remat_module). Float32 operands go straight to
lax: the parity path is unchanged.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

LOW = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
WEIGHT_DOT = "weight_dot"            # the name remat policies save


def _widened(lhs, rhs, preferred) -> bool:
  return (preferred is None and lhs.dtype == rhs.dtype
          and jnp.dtype(lhs.dtype) in LOW)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _rounded(product, batched, lhs, rhs):
  return lax.platform_dependent(
      lhs, rhs, cpu=lambda l, r: product(l, r, jnp.float32).astype(l.dtype),
      default=lambda l, r: product(l, r, None))


def _plain_tangent(plain, primals, tangents, out):
  """The tangent of a bilinear `plain(lhs, rhs)`: its own products of the
  tangents (symbolic zeros cost none)."""
  (lhs, rhs), (t_lhs, t_rhs) = primals, (
      None if isinstance(t, SymbolicZero) else t for t in tangents)
  terms = ([] if t_lhs is None else [plain(t_lhs, rhs)]) + (
      [] if t_rhs is None else [plain(lhs, t_rhs)])
  return sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)


def _rounded_jvp(product, batched, primals, tangents):
  out = _rounded(product, batched, *primals)
  if not batched:   # a weight GEMM: what remat_policy="dots" keeps
    out = checkpoint_name(out, WEIGHT_DOT)
  plain = lambda l, r: product(l, r, None)  # noqa: E731
  return out, _plain_tangent(plain, primals, tangents, out)


_rounded.defjvp(_rounded_jvp, symbolic_zeros=True)


def _lax_dot(lhs, rhs, preferred, *, dimension_numbers, precision):
  return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                         preferred_element_type=preferred)


def dot_general(lhs, rhs, dimension_numbers, precision=None,
                preferred_element_type=None, **kwargs):
  """lax.dot_general, float32-accumulated for bfloat16/float16 operands
  (flax's `nn.Dense(dot_general=...)`)."""
  if kwargs or not _widened(lhs, rhs, preferred_element_type):
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type,
                           **kwargs)
  product = functools.partial(_lax_dot, dimension_numbers=dimension_numbers,
                              precision=precision)
  return _rounded(product, bool(dimension_numbers[1][0]), lhs, rhs)


def _einsum(spec, lhs, rhs, preferred):
  return jnp.einsum(spec, lhs, rhs, preferred_element_type=preferred)


def einsum(spec: str, lhs, rhs):
  """jnp.einsum of two operands, as `dot_general` (for batched products:
  never named WEIGHT_DOT)."""
  if not _widened(lhs, rhs, None):
    return jnp.einsum(spec, lhs, rhs)
  return _rounded(functools.partial(_einsum, spec), True, lhs, rhs)


def _matmul(lhs, rhs, preferred):
  return jnp.matmul(lhs, rhs, preferred_element_type=preferred)


def matmul(lhs, rhs):
  """`lhs @ rhs`, as `dot_general`."""
  if not _widened(lhs, rhs, None):
    return lhs @ rhs
  return _rounded(_matmul, rhs.ndim > 2, lhs, rhs)


def _pointwise(lhs, rhs, kw) -> bool:
  """A 1x1 convolution: stride 1, no padding or dilation, one group, NHWC."""
  pad = kw["padding"]
  return (rhs.ndim == 4 and rhs.shape[:2] == (1, 1)
          and kw["feature_group_count"] == 1
          and lax.ConvDimensionNumbers(*kw["dimension_numbers"])
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                        ("NHWC", "HWIO", "NHWC"))
          and all(s == 1 for s in kw["window_strides"])
          and (pad == "VALID" or (not isinstance(pad, str)
                                  and all(tuple(p) == (0, 0) for p in pad)))
          and all(d in (None, 1) for d in (*(kw["lhs_dilation"] or ()),
                                           *(kw["rhs_dilation"] or ()))))


def _pointwise_gemm(lhs, rhs):
  """The 1x1 convolution as the float32-out GEMM above, on CPU: XLA:CPU's
  bfloat16 convolution does not reach YNNPACK's BF16 kernels
  ([5,56,56,256] -> 256: 13.0-16.3 ms as a convolution, 4.2-4.7 ms as a
  GEMM, 2-core AVX-512 Xeon). The other convolutions are left alone:
  widened to float32 they ran within -13%..+5% of the bfloat16 ones."""
  y = jnp.matmul(lhs.reshape(-1, lhs.shape[-1]), rhs[0, 0],
                 preferred_element_type=jnp.float32)
  return y.astype(lhs.dtype).reshape(lhs.shape[:-1] + rhs.shape[-1:])


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _conv_rounded(conv, lhs, rhs):
  return lax.platform_dependent(lhs, rhs, cpu=_pointwise_gemm, default=conv)


def _conv_rounded_jvp(conv, primals, tangents):
  out = _conv_rounded(conv, *primals)
  return out, _plain_tangent(conv, primals, tangents, out)


_conv_rounded.defjvp(_conv_rounded_jvp, symbolic_zeros=True)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, precision=None, **kwargs):
  """lax.conv_general_dilated (flax's `nn.Conv(conv_general_dilated=...)`):
  a 1x1 convolution of bfloat16/float16 operands on CPU is `_pointwise_gemm`,
  with the plain low-precision convolutions as its tangents; every other
  convolution, and every one on a GPU or TPU, is the plain one."""
  conv = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides,
      padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count, precision=precision, **kwargs)
  if (kwargs or not _widened(lhs, rhs, None)
      or not _pointwise(lhs, rhs, conv.keywords)):
    return conv(lhs, rhs)
  return _conv_rounded(conv, lhs, rhs)
