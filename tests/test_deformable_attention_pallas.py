"""The Pallas MSDA kernels (Triton on GPUs), run by Pallas' interpreter on
CPU: the same kernel code, against the XLA cores' values and gradients
(test_deformable_attention.py checks it against the original's golden with
the other cores); and compiled for an H100 where JAX's CUDA plugin is
installed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avsegformer_jax import deformable_attention as da
from avsegformer_jax import deformable_attention_pallas as dp

SHAPES = ((6, 5), (3, 3), (2, 1))


def _inputs(n=2, lq=13, nh=2, d=8, npts=3, dtype=jnp.float32, seed=0):
  """Locations beyond both edges of every level: the zero-padding path."""
  s = sum(h * w for h, w in SHAPES)
  r = np.random.RandomState(seed)
  value = jnp.asarray(r.standard_normal((n, s, nh, d)), dtype)
  loc = jnp.asarray(r.uniform(-0.2, 1.2, (n, lq, nh, 3, npts, 2)),
                    jnp.float32)
  aw = jax.nn.softmax(jnp.asarray(r.standard_normal((n, lq, nh, 3 * npts)),
                                  jnp.float32), -1)
  ct = jnp.asarray(r.standard_normal((n, lq, nh * d)), jnp.float32)
  return value, loc, aw.reshape(n, lq, nh, 3, npts), ct


def _grads(fn, value, loc, aw, ct):
  f = lambda v, l, a: jnp.sum(fn(v, l, a).astype(jnp.float32) * ct)  # noqa
  with jax.default_matmul_precision("highest"):
    return jax.jit(jax.value_and_grad(f, (0, 1, 2)))(value, loc, aw)


@pytest.mark.parametrize("fwd_block", [1, 8, 128])
def test_values_and_gradients_match_the_xla_core(fwd_block):
  """Output and the gradients with respect to value (the atomic scatter),
  locations (through the bilinear weights, x w and x h) and attention
  weights equal gather4's autodiff, with blocks that do not divide the 52
  rows."""
  value, loc, aw, ct = _inputs()
  ref_val, ref = _grads(
      lambda v, l, a: da.ms_deform_attn_core(v, SHAPES, l, a, "gather4"),
      value, loc, aw, ct)
  val, got = _grads(
      lambda v, l, a: dp.ms_deform_attn_pallas(v, SHAPES, l, a,
                                               interpret=True,
                                               fwd_block=fwd_block),
      value, loc, aw, ct)
  np.testing.assert_allclose(val, ref_val, rtol=1e-5)
  for g, rg, name in zip(got, ref, ("value", "locations", "weights")):
    assert g.shape == rg.shape and g.dtype == rg.dtype, name
    np.testing.assert_allclose(g, rg, atol=2e-5, rtol=1e-5, err_msg=name)
  # Bigger backward blocks: the location and weight gradients are per row
  # (the interpreter's atomic add drops duplicates, so value's is not
  # checked there; on a GPU the adds are atomic).
  _, got8 = _grads(
      lambda v, l, a: dp.ms_deform_attn_pallas(v, SHAPES, l, a,
                                               interpret=True, bwd_block=8),
      value, loc, aw, ct)
  for i in (1, 2):
    np.testing.assert_allclose(got8[i], ref[i], atol=2e-5, rtol=1e-5)


def test_bfloat16_value():
  """bf16 value: bf16 output within bf16 rounding of float32, float32
  accumulation, and a bf16 value gradient."""
  value, loc, aw, ct = _inputs(d=16)
  out32 = dp.ms_deform_attn_pallas(value, SHAPES, loc, aw, interpret=True)
  v16 = value.astype(jnp.bfloat16)
  out16 = dp.ms_deform_attn_pallas(v16, SHAPES, loc, aw, interpret=True)
  assert out16.dtype == jnp.bfloat16
  ref16 = da.ms_deform_attn_core(v16, SHAPES, loc, aw, "taps")
  np.testing.assert_allclose(np.asarray(out16, np.float32),
                             np.asarray(ref16, np.float32), atol=1e-2)
  err = np.abs(np.asarray(out16, np.float32) - np.asarray(out32)).max()
  assert err <= 1e-2 * np.abs(np.asarray(out32)).max(), err
  _, grads = _grads(
      lambda v, l, a: dp.ms_deform_attn_pallas(v, SHAPES, l, a,
                                               interpret=True),
      v16, loc, aw, ct)
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.float32, jnp.float32]


def test_named_errors():
  value, loc, aw, _ = _inputs(d=6)
  with pytest.raises(ValueError, match="power-of-two head channels.*6"):
    dp.ms_deform_attn_pallas(value, SHAPES, loc, aw, interpret=True)
  value, loc, aw, _ = _inputs()
  with pytest.raises(ValueError, match="do not match value's 41 pixels"):
    dp.ms_deform_attn_pallas(value, ((6, 5), (3, 3), (1, 1)), loc, aw,
                             interpret=True)


def test_compiles_to_triton_kernels_for_an_h100():
  """With JAX's CUDA plugin (no GPU needed): forward and backward at the
  encoder's sizes (224: 1029 pixels and queries, 8 heads of 32, bf16)
  lower to two Triton kernels (forward, backward) and no XLA
  gather or scatter: the taps never reach HBM."""
  from benchmarks import plan as bench_plan
  try:
    mesh = bench_plan.target_mesh("h100", 1)
  except SystemExit:
    pytest.skip("JAX's CUDA plugin is not installed (deviceless compile)")
  from jax.sharding import NamedSharding, PartitionSpec as P
  sharding = NamedSharding(mesh, P())
  shapes = ((28, 28), (14, 14), (7, 7))

  def sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  args = (sds((2, 1029, 8, 32), jnp.bfloat16),
          sds((2, 1029, 8, 3, 4, 2), jnp.float32),
          sds((2, 1029, 8, 3, 4), jnp.float32))

  def loss(v, l, a):
    out = dp.ms_deform_attn_pallas(v, shapes, l, a, interpret=False)
    return jnp.sum(out.astype(jnp.float32) ** 2)
  text = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args).compile().as_text()
  assert text.count("__gpu$xla.gpu.triton") == 2, text.count("triton")
  assert " gather(" not in text and " scatter(" not in text


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_triton_kernels_on_a_gpu_match_the_xla_core():
  """The compiled kernels (real atomics, default blocks, dead lanes in the
  last block) at the encoder's 224 sizes on two frames: what the
  interpreter cannot check."""
  shapes = ((28, 28), (14, 14), (7, 7))
  r = np.random.RandomState(0)
  value = jnp.asarray(r.standard_normal((2, 1029, 8, 32)), jnp.float32)
  loc = jnp.asarray(r.uniform(-0.1, 1.1, (2, 999, 8, 3, 4, 2)), jnp.float32)
  aw = jax.nn.softmax(jnp.asarray(r.standard_normal((2, 999, 8, 12)),
                                  jnp.float32), -1).reshape(2, 999, 8, 3, 4)
  ct = jnp.asarray(r.standard_normal((2, 999, 256)), jnp.float32)
  ref_val, ref = _grads(
      lambda v, l, a: da.ms_deform_attn_core(v, shapes, l, a, "taps"),
      value, loc, aw, ct)
  val, got = _grads(
      lambda v, l, a: dp.ms_deform_attn_pallas(v, shapes, l, a),
      value, loc, aw, ct)
  np.testing.assert_allclose(val, ref_val, rtol=1e-4)
  for g, rg, name in zip(got, ref, ("value", "locations", "weights")):
    np.testing.assert_allclose(g, rg, atol=1e-3, rtol=1e-4, err_msg=name)
