"""dots.py: bfloat16 products made in float32 and rounded once on CPU (plain
elsewhere), with the backward and the remat behaviour of plain bfloat16
products."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from avsegformer_jax import dots, layers

DN = (((1,), (0,)), ((), ()))
PRODUCTS = {   # name -> (ours, plain jax, lhs shape, rhs shape)
    "dot_general": (lambda a, b: dots.dot_general(a, b, DN),
                    lambda a, b: lax.dot_general(a, b, DN), (24, 40), (40, 16)),
    "einsum": (lambda a, b: dots.einsum("nqc,ncf->nqf", a, b),
               lambda a, b: jnp.einsum("nqc,ncf->nqf", a, b),
               (3, 24, 40), (3, 40, 16)),
    "matmul": (dots.matmul, lambda a, b: a @ b, (2, 3, 24, 40), (2, 3, 40, 16)),
}


def _operands(dtype, lhs_shape, rhs_shape):
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  return (jax.random.normal(ka, lhs_shape, dtype),
          jax.random.normal(kb, rhs_shape, dtype))


def _dots(f, args, platform="cpu"):
  """(operand, result) element types of every dot_general that `f` lowers
  to for `platform` (lowering needs no such device)."""
  text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  return sorted(re.findall(r"stablehlo.dot_general .*: \(tensor<[0-9x]*(\w+)>, "
                           r"tensor<[^>]*>\) -> tensor<[0-9x]*(\w+)>", text))


@pytest.mark.parametrize("name", PRODUCTS)
def test_float32_operands_are_plain_jax(name):
  """The parity path is untouched: the same jaxpr as jax's own product."""
  ours, plain, ls, rs = PRODUCTS[name]
  a, b = _operands(jnp.float32, ls, rs)
  assert str(jax.make_jaxpr(ours)(a, b)) == str(jax.make_jaxpr(plain)(a, b))


@pytest.mark.parametrize("name", PRODUCTS)
def test_bfloat16_product_is_float32_rounded_once(name):
  ours, plain, ls, rs = PRODUCTS[name]
  a, b = _operands(jnp.bfloat16, ls, rs)
  assert _dots(ours, (a, b)) == [("bf16", "f32")]
  assert _dots(ours, (a, b), "cuda") == [("bf16", "bf16")]
  assert _dots(ours, (a, b), "tpu") == [("bf16", "bf16")]
  got = np.asarray(ours(a, b))
  assert got.dtype == jnp.bfloat16
  with jax.default_matmul_precision("highest"):
    want = np.asarray(plain(a.astype(jnp.float32), b.astype(jnp.float32))
                      ).astype(jnp.bfloat16)
  # float32 sums in another order may round across a bfloat16 boundary:
  # at most one ulp of the result, never bfloat16 accumulation's error.
  ulp = np.abs(np.spacing(want.astype(np.float32)) * 2 ** 16)
  assert np.all(np.abs(got.astype(np.float64) - want.astype(np.float64))
                <= ulp), name


@pytest.mark.parametrize("name", PRODUCTS)
def test_backward_is_the_plain_bfloat16_backward(name):
  """Gradients are bit for bit those of jax's bfloat16 product, through
  bfloat16 GEMMs only (a float32 cotangent would make XLA:GPU run the
  backward GEMMs in float32); a zero tangent costs no product; on a GPU
  the forward is the plain product too."""
  ours, plain, ls, rs = PRODUCTS[name]
  a, b = _operands(jnp.bfloat16, ls, rs)
  w = jax.random.normal(jax.random.PRNGKey(1), ours(a, b).shape, jnp.bfloat16)
  loss = lambda f: lambda a, b: jnp.sum((f(a, b) * w).astype(jnp.float32))
  got = jax.grad(loss(ours), (0, 1))(a, b)
  want = jax.grad(loss(plain), (0, 1))(a, b)
  for g, h in zip(got, want):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g, np.float32),
                                  np.asarray(h, np.float32))
  grads = jax.value_and_grad(loss(ours), (0, 1))
  assert _dots(grads, (a, b)) == [("bf16", "bf16")] * 2 + [("bf16", "f32")]
  assert _dots(grads, (a, b), "cuda") == [("bf16", "bf16")] * 3
  assert _dots(jax.value_and_grad(loss(ours)), (a, b)) == [("bf16", "bf16"),
                                                   ("bf16", "f32")]


class _Block(nn.Module):
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    h = layers.gelu(layers.dense(48, dtype=self.dtype, name="fc1")(x))
    h = layers.MultiheadAttention(dim=48, num_heads=4, dtype=self.dtype,
                                  name="attn")(h, h, h, train=True)
    return layers.dense(16, dtype=self.dtype, name="fc2")(h)


def _residuals(mode, dtype, capsys):
  """(dtype, shape) of what the block's backward keeps, parameters and
  inputs aside, and the gradients."""
  block = layers.remat_module(_Block, mode)(dtype=dtype)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 32))
  params = block.init(jax.random.PRNGKey(1), x)
  loss = lambda p, x: jnp.sum(block.apply(p, x).astype(jnp.float32))
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(loss, params, x)
  lines = [l for l in capsys.readouterr().out.splitlines()
           if l and "from the argument" not in l]
  return lines, jax.jit(jax.grad(loss))(params, x)


def test_remat_dots_keeps_the_rounded_weight_products(capsys):
  """`remat_policy="dots"` keeps the bfloat16 results of the Dense layers
  (fc1, q/k/v/out projections; fc2's is not needed), never their float32
  products, nor the attention maps; float32 keeps its plain dot outputs."""
  kept, grads = _residuals("dots", jnp.bfloat16, capsys)
  assert len(kept) == 5 and all(
      l.startswith("bf16[") and "named 'weight_dot'" in l for l in kept), kept
  _, unremat = _residuals(False, jnp.bfloat16, capsys)
  jax.tree.map(lambda g, h: np.testing.assert_array_equal(
      np.asarray(g), np.asarray(h)), grads, unremat)
  kept32, _ = _residuals("dots", jnp.float32, capsys)
  assert len(kept32) == 5 and all(
      l.startswith("f32[") and "(dot_general)" in l for l in kept32), kept32
  full, _ = _residuals("full", jnp.bfloat16, capsys)
  assert full == []


def _conv_ops(f, args, platform):
  text = jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  return (len(re.findall(r"stablehlo.convolution", text)),
          _dots(f, args, platform))


@pytest.mark.parametrize("kernel,dtype", [(1, jnp.bfloat16), (3, jnp.bfloat16),
                                          (1, jnp.float32)])
def test_pointwise_bfloat16_conv_is_a_float32_gemm_on_cpu(kernel, dtype):
  """A bfloat16 1x1 conv is a float32-out GEMM on CPU (a convolution on
  GPU/TPU), rounded once, with the plain convolution's gradients bit for
  bit; 3x3 and float32 convolutions are plain everywhere."""
  conv = layers.conv(24, kernel, padding=kernel // 2, dtype=dtype)
  plain = nn.Conv(24, (kernel, kernel), padding=((kernel // 2,) * 2,) * 2,
                  dtype=dtype)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 5, 16), dtype)
  params = jax.tree.map(lambda a: a.astype(dtype),
                        conv.init(jax.random.PRNGKey(1), x))
  ours = lambda p, x: conv.apply(p, x)                       # noqa: E731
  ref = lambda p, x: plain.apply(p, x)                       # noqa: E731
  gemm = kernel == 1 and dtype == jnp.bfloat16
  assert _conv_ops(ours, (params, x), "cpu") == (
      (0, [("bf16", "f32")]) if gemm else _conv_ops(ref, (params, x), "cpu"))
  for platform in ("cuda", "tpu"):
    assert _conv_ops(ours, (params, x), platform) == _conv_ops(
        ref, (params, x), platform)
  got = np.asarray(ours(params, x), np.float64)
  with jax.default_matmul_precision("highest"):
    want = np.asarray(plain.apply(
        jax.tree.map(lambda a: a.astype(jnp.float32), params),
        x.astype(jnp.float32)).astype(dtype), np.float64)
  ulp = np.abs(np.spacing(want.astype(np.float32))) * (
      2 ** 16 if dtype == jnp.bfloat16 else 4)
  assert np.all(np.abs(got - want) <= ulp + 1e-6)
  loss = lambda f: lambda p, x: jnp.sum(                     # noqa: E731
      jnp.sin(f(p, x).astype(jnp.float32)))
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(
      np.asarray(a), np.asarray(b)), g_ours, g_ref)
