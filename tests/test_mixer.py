"""The channel-attention mixer's one-query attention: the CPU form against
the einsum form (GPU/TPU) and a float64 reference."""
import jax
import jax.numpy as jnp
import numpy as np

from avsegformer_jax import mixer


def _inputs(dtype, n=3, hw=200, nh=8, d=32, seed=0):
  r = np.random.RandomState(seed)
  q = r.standard_normal((n, nh, d)) * d ** -0.5
  kv = r.standard_normal((n, hw, 2, nh, d))
  return q, kv, jnp.asarray(q, dtype), jnp.asarray(kv, dtype)


def _reference(q, kv):                                       # float64 numpy
  k, v = kv[:, :, 0], kv[:, :, 1]
  logits = np.einsum("nhd,nkhd->nhk", q, k)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum("nhk,nkhd->nhd", p, v)


def test_cpu_form_equals_the_einsum_form_in_float32():
  q, kv, qj, kvj = _inputs(jnp.float32)
  want = _reference(q, kv)
  with jax.default_matmul_precision("highest"):
    plain = np.asarray(jax.jit(mixer._one_query)(qj, kvj))
  cpu = np.asarray(jax.jit(mixer._one_query_cpu)(qj, kvj))
  np.testing.assert_allclose(plain, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cpu, want, rtol=1e-5, atol=1e-6)


def test_cpu_form_in_bfloat16_is_no_less_exact():
  """bfloat16 inputs: the CPU form keeps its logits and sums in float32, so
  it lands at least as close to the exact result as the einsum form."""
  q, kv, qj, kvj = _inputs(jnp.bfloat16, seed=1)
  want = _reference(np.asarray(qj, np.float64), np.asarray(kvj, np.float64))
  plain = np.asarray(jax.jit(mixer._one_query)(qj, kvj), np.float64)
  cpu = np.asarray(jax.jit(mixer._one_query_cpu)(qj, kvj), np.float64)
  assert cpu.dtype == plain.dtype
  err_cpu, err_plain = np.abs(cpu - want).max(), np.abs(plain - want).max()
  assert err_cpu <= err_plain, (err_cpu, err_plain)
  assert err_cpu < 2 ** -7 * np.abs(want).max()


def test_each_platform_lowers_its_form():
  """CPU gets the sums over kv's layout, GPUs and TPUs the einsums."""
  m = mixer.ChannelAttentionMixer(dim=64, num_heads=2)
  fm, audio = jnp.ones((2, 4, 4, 64)), jnp.ones((2, 1, 64))
  variables = m.init(jax.random.PRNGKey(0), fm, audio)
  f = jax.jit(lambda v, x, a: m.apply(v, x, a))

  def dots(platform):
    text = f.trace(variables, fm, audio).lower(
        lowering_platforms=(platform,)).as_text()
    return text.count("stablehlo.dot_general")
  # q, kv and proj are dots everywhere; the attention adds two off CPU.
  assert dots("cuda") == dots("tpu") == dots("cpu") + 2
  out = f(variables, fm, audio)
  assert out.shape == fm.shape and np.isfinite(np.asarray(out)).all()
