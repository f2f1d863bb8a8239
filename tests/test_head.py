"""head.UpsampledConv: the head's x4 upsampling + 3x3 conv as one conv (CPU,
TPU)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avsegformer_jax import head, layers


class _Reference(nn.Module):
  """What `fc_1`, `fc_2` were: upsample, then `layers.conv`."""
  features: int
  scale: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = layers.resize_bilinear(x, (x.shape[1] * self.scale,
                                   x.shape[2] * self.scale))
    return layers.conv(self.features, 3, padding=1, dtype=self.dtype,
                       name="conv")(x)


def _pair(shape, features, scale, dtype=jnp.float32):
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  new = head.UpsampledConv(features, scale, dtype=dtype)
  params = jax.jit(new.init)(jax.random.PRNGKey(0), x)["params"]
  # A non-zero bias, so that a misplaced bias would show.
  params = dict(params, bias=jnp.linspace(-1, 1, features))
  ref = _Reference(features, scale, dtype=dtype)
  return x, new, ref, params


@pytest.mark.parametrize("shape,scale", [((2, 7, 5, 6), 4), ((1, 4, 6, 3), 2),
                                         ((1, 2, 3, 4), 3), ((1, 1, 4, 3), 4)])
def test_matches_upsample_then_conv(shape, scale):
  """Every pixel, the outer rows and columns (the conv's zero padding) and
  the corners included, and the gradients, equal upsample-then-conv."""
  x, new, ref, params = _pair(shape, 5, scale)
  f_new = lambda p, v: new.apply({"params": p}, v)              # noqa: E731
  f_ref = lambda p, v: ref.apply({"params": {"conv": p}}, v)    # noqa: E731
  probe = jax.random.normal(jax.random.PRNGKey(2), (
      shape[0], shape[1] * scale, shape[2] * scale, 5))

  @jax.jit
  def outputs_and_grads(p, v):
    def both(f):
      loss = lambda p, v: jnp.sum(jnp.tanh(f(p, v)) * probe)     # noqa: E731
      return f(p, v), jax.grad(loss, (0, 1))(p, v)
    return both(f_new), both(f_ref)
  with jax.default_matmul_precision("highest"):
    (y_new, g_new), (y_ref, g_ref) = outputs_and_grads(params, x)
  np.testing.assert_allclose(y_new, y_ref, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_bfloat16_close_to_float32():
  x, new, _, params = _pair((2, 8, 8, 16), 4, 4, jnp.bfloat16)
  y16 = jax.jit(new.apply)({"params": params}, x)
  assert y16.dtype == jnp.bfloat16
  with jax.default_matmul_precision("highest"):
    y32 = jax.jit(head.UpsampledConv(4, 4).apply)({"params": params}, x)
  err = np.abs(np.asarray(y16, np.float32) - np.asarray(y32)).max()
  assert err <= 2e-2 * np.abs(np.asarray(y32)).max(), err


def test_parameters_are_the_convs():
  """Same names, shapes and initial values as the `nn.Conv` it replaces,
  so checkpoints and converted torch weights load unchanged."""
  x = jnp.zeros((1, 6, 6, 8))
  init = jax.jit(head.UpsampledConv(4, 4).init)
  new = init(jax.random.PRNGKey(3), x)["params"]
  old = layers.conv(4, 3, padding=1).init(
      jax.random.PRNGKey(3), jnp.zeros((1, 24, 24, 8)))["params"]
  assert jax.tree.map(jnp.shape, new) == jax.tree.map(jnp.shape, old)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
    np.testing.assert_array_equal(a, b)


def test_lowering_per_platform():
  """CPU and TPU: the phase conv plus four edge convs; GPU: the plain
  upsample-then-conv, one convolution."""
  x, new, _, params = _pair((1, 8, 8, 4), 3, 4)
  f = jax.jit(lambda p, v: new.apply({"params": p}, v))

  def convs(platform):
    text = f.trace(params, x).lower(lowering_platforms=(platform,)).as_text()
    return text.count("stablehlo.convolution")
  assert convs("cpu") == 5
  assert convs("cuda") == 1
  assert convs("tpu") == 5
