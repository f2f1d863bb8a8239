"""The attention core: its two forms against softmax(q k^T) v, the platforms'
lowerings, and softmax_in's backward."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avsegformer_jax import attention


def _operands(lq, lk, d, dtype, heads=3, seed=0):
  r = np.random.RandomState(seed)
  q = r.randn(2, heads, lq, d) * 0.5
  k, v = r.randn(2, 2, heads, lk, d)
  return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


def _reference(q, k, v):     # float64 numpy, written out
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = q @ k.swapaxes(-1, -2)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return (p / p.sum(-1, keepdims=True)) @ v


# (Lq, Lk, d): more keys than channels (the output is normalised), fewer
# (the maps are), and lengths that are not multiples of the padding.
SHAPES = [(30, 103, 8), (30, 5, 8), (21, 21, 4)]


@pytest.mark.parametrize("lq,lk,d", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 2e-6),
                                       (jnp.bfloat16, 4e-2)])
def test_both_forms_are_attention(lq, lk, d, dtype, tol):
  q, k, v = _operands(lq, lk, d, dtype)
  ref = _reference(q, k, v)
  with jax.default_matmul_precision("highest"):
    for train in (True, False):
      out = jax.jit(lambda q, k, v: attention.attend(
          q, k, v, train=train, pad_to=8))(q, k, v)
      assert out.shape == ref.shape and out.dtype == dtype
      np.testing.assert_allclose(np.asarray(out, np.float64), ref,
                                 atol=tol, rtol=0, err_msg=f"train={train}")


def test_cpu_inference_is_more_accurate_in_bfloat16():
  # Logits straight from the float32 product, the float32 exponentials
  # multiplied once: closer to the exact result than the bfloat16 maps.
  q, k, v = _operands(30, 103, 8, jnp.bfloat16, seed=1)
  ref = _reference(q, k, v)
  err = {train: np.abs(np.asarray(attention.attend(
      q, k, v, train=train, pad_to=8), np.float64) - ref).max()
         for train in (True, False)}
  assert err[False] < 0.5 * err[True], err


def _lowered(platform, train, lk=103, d=8, dtype=jnp.bfloat16):
  q, k, v = _operands(30, lk, d, dtype)
  f = jax.jit(lambda q, k, v: attention.attend(q, k, v, train=train,
                                               pad_to=8))
  return f.trace(q, k, v).lower(lowering_platforms=(platform,)).as_text()


def _signature(text):
  """The products' result types and the element-wise work on the maps
  (the lowering wraps each platform_dependent in a `case`, but holds only
  the branch of the platform it lowers for)."""
  lines = text.splitlines()
  return (sorted(re.findall(r"stablehlo.dot_general .*-> (tensor<[^>]*>)",
                            text)),
          {op: sorted(re.findall(r"tensor<[^>]*>", l)[-1]
                      for l in lines if f"stablehlo.{op} " in l)
           for op in ("pad", "divide", "exponential", "reduce")})


def test_gpu_and_tpu_programs_are_the_training_form():
  for platform in ("cuda", "tpu"):
    maps = _signature(_lowered(platform, True))
    assert _signature(_lowered(platform, False)) == maps
    assert maps[0] == ["tensor<2x3x32x104xbf16>", "tensor<2x3x32x8xbf16>"]


def test_cpu_inference_pads_nothing_and_divides_the_output():
  maps, infer = _lowered("cpu", True), _lowered("cpu", False)
  assert "stablehlo.pad" in maps and "stablehlo.pad" not in infer
  # Normalised: the [2,3,30,103] maps (training) or the [2,3,30,8]
  # output (inference, more keys than channels).
  assert "stablehlo.divide" in maps
  assert _signature(infer)[1]["divide"] == ["tensor<2x3x30x8xf32>"]
  # Fewer keys than channels: the maps are divided.
  few = _signature(_lowered("cpu", False, lk=5, d=8))
  assert few[1]["divide"] == ["tensor<2x3x30x5xf32>"]


def test_large_cpu_inference_maps_are_made_in_pieces(monkeypatch):
  """Maps over the limit are made one (batch, head) group at a time (a
  while loop) and give the whole call's result."""
  q, k, v = _operands(30, 103, 8, jnp.float32, heads=6)
  with jax.default_matmul_precision("highest"):
    whole = jax.jit(attention.inference_cpu)(q, k, v)
    maps = 2 * 6 * 30 * 103 * 4
    monkeypatch.setattr(attention, "_CHUNK_ABOVE", maps - 1)
    monkeypatch.setattr(attention, "_CHUNK_BYTES", maps // 3)
    f = jax.jit(attention.inference_cpu)
    pieces = f(q, k, v)
  assert "stablehlo.while" in f.lower(q, k, v).as_text()
  np.testing.assert_allclose(pieces, whole, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(pieces, _reference(q, k, v), atol=2e-6)


def test_softmax_in_gradients_and_residuals():
  x = jax.random.normal(jax.random.PRNGKey(5), (3, 4, 7)) * 3
  g = jax.random.normal(jax.random.PRNGKey(6), (3, 4, 7))
  plain = lambda x, dt: jax.nn.softmax(                       # noqa: E731
      x.astype(jnp.float32), axis=-1).astype(dt)
  for dt, tol in ((jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)):
    xs = x.astype(dt)
    out, vjp = jax.vjp(lambda x: attention.softmax_in(x, dt), xs)
    ref_out, ref_vjp = jax.vjp(lambda x: plain(x, dt), xs)
    assert out.dtype == dt
    np.testing.assert_array_equal(np.asarray(out, np.float32),
                                  np.asarray(ref_out, np.float32))
    (d,), (rd,) = vjp(g.astype(dt)), ref_vjp(g.astype(dt))
    assert d.dtype == dt
    np.testing.assert_allclose(np.asarray(d, np.float32),
                               np.asarray(rd, np.float32), atol=tol, rtol=tol)
    # Only the dtype-sized probabilities are kept for the backward.
    kept = [r for r in jax.tree.leaves(vjp) if r.size == x.size]
    assert [r.dtype for r in kept] == [dt], [r.dtype for r in kept]
