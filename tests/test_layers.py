"""Building blocks against independent formulations (goldens cover real sizes)."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avsegformer_jax import layers


def torch_bilinear(x, out_h, out_w):
  """F.interpolate(bilinear, align_corners=False) on NHWC, written from its
  definition: source = (dst + .5) * in/out - .5, clamped at 0, two taps."""
  def axis_taps(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0
  h0, h1, lh = axis_taps(x.shape[1], out_h)
  w0, w1, lw = axis_taps(x.shape[2], out_w)
  x = x.astype(np.float64)
  rows = (x[:, h0] * (1 - lh)[None, :, None, None]
          + x[:, h1] * lh[None, :, None, None])
  return (rows[:, :, w0] * (1 - lw)[None, None, :, None]
          + rows[:, :, w1] * lw[None, None, :, None])


@pytest.mark.parametrize("shape,size", [
    ((2, 7, 5, 3), (28, 10)),       # x4 rows, x2 columns
    ((1, 28, 28, 4), (56, 56)),     # mask feature's x2
    ((1, 1, 1, 2), (4, 4)),         # every output clamps at both edges
    ((1, 14, 14, 8), (56, 56)),     # fc's x4
    ((1, 6, 6, 2), (9, 9)),         # non-integer: jax.image.resize path
    ((1, 3, 5, 1), (3, 15)),        # x1 rows
])
def test_resize_bilinear_matches_definition(shape, size):
  x = np.random.RandomState(0).standard_normal(shape).astype(np.float32)
  got = np.asarray(layers.resize_bilinear(jnp.asarray(x), size))
  assert got.shape == (shape[0], *size, shape[3])
  np.testing.assert_allclose(got, torch_bilinear(x, *size), atol=2e-6)


def test_resize_bilinear_gradient_is_the_adjoint():
  # <resize(x), y> == <x, resize^T(y)>: the VJP of a linear map.
  r = np.random.RandomState(1)
  x = jnp.asarray(r.standard_normal((2, 5, 4, 3)), jnp.float32)
  y = jnp.asarray(r.standard_normal((2, 20, 8, 3)), jnp.float32)
  fwd = lambda x: layers.resize_bilinear(x, (20, 8))
  _, vjp = jax.vjp(fwd, x)
  lhs = float(jnp.vdot(fwd(x), y))
  rhs = float(jnp.vdot(x, vjp(y)[0]))
  assert abs(lhs - rhs) < 1e-4 * abs(lhs)
  # and it matches the dense-matrix implementation's gradient
  ref = jax.grad(lambda x: jnp.vdot(jax.image.resize(
      x, (2, 20, 8, 3), "linear", antialias=False), y))(x)
  np.testing.assert_allclose(vjp(y)[0], ref, atol=1e-5)


def test_multihead_attention_matches_per_head_loop():
  r = np.random.RandomState(2)
  q = jnp.asarray(r.standard_normal((2, 5, 16)), jnp.float32)
  kv = jnp.asarray(r.standard_normal((2, 7, 16)), jnp.float32)
  mha = layers.MultiheadAttention(16, 4)
  params = mha.init(jax.random.PRNGKey(0), q, kv, kv)["params"]
  got = np.asarray(mha.apply({"params": params}, q, kv, kv))
  dense = lambda n, x: np.asarray(x) @ np.asarray(params[n]["kernel"]) \
      + np.asarray(params[n]["bias"])
  qp, kp, vp = dense("q_proj", q), dense("k_proj", kv), dense("v_proj", kv)
  heads = []
  for h in range(4):
    sl = slice(4 * h, 4 * h + 4)
    logits = qp[..., sl] @ kp[..., sl].transpose(0, 2, 1) / 2.0
    p = np.exp(logits - logits.max(-1, keepdims=True))
    heads.append((p / p.sum(-1, keepdims=True)) @ vp[..., sl])
  want = dense("out_proj", np.concatenate(heads, -1))
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Padded to multiples of 8 (the default for 16-bit compute): the padded
  # keys get no weight, the padded queries are dropped; gradients agree.
  padded = layers.MultiheadAttention(16, 4, pad_to=8)
  np.testing.assert_allclose(padded.apply({"params": params}, q, kv, kv),
                             want, atol=1e-5)
  loss = lambda m: lambda p, q, kv: jnp.sum(                 # noqa: E731
      jnp.tanh(m.apply({"params": p}, q, kv, kv)))
  with jax.default_matmul_precision("highest"):
    g1 = jax.grad(loss(mha), argnums=(0, 1, 2))(params, q, kv)
    g8 = jax.grad(loss(padded), argnums=(0, 1, 2))(params, q, kv)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g8)):
    assert np.isfinite(np.asarray(b)).all()
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
  bf16 = layers.MultiheadAttention(16, 4, dtype=jnp.bfloat16)
  np.testing.assert_allclose(
      np.asarray(bf16.apply({"params": params}, q, kv, kv), np.float32),
      want, atol=0.05)


def _grouped_conv(x, kernel, bias):
  """The reference: XLA's grouped convolution, as torch's Conv2d(groups=C)."""
  y = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1])
  return y + bias


def test_depthwise_conv_matches_grouped_conv_and_gradients():
  kx, kk, kb, kg = jax.random.split(jax.random.PRNGKey(3), 4)
  x = jax.random.normal(kx, (2, 5, 7, 6))
  kernel = jax.random.normal(kk, (3, 3, 1, 6))
  bias = jax.random.normal(kb, (6,))
  g = jax.random.normal(kg, (2, 5, 7, 6))
  conv = layers.DepthwiseConv(3)
  variables = {"params": {"kernel": kernel, "bias": bias}}
  ours = lambda x, p: conv.apply({"params": p}, x)          # noqa: E731
  ref = lambda x, p: _grouped_conv(x, p["kernel"], p["bias"])  # noqa: E731
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(ours(x, variables["params"]),
                               ref(x, variables["params"]),
                               rtol=1e-5, atol=1e-5)
    _, vjp_ours = jax.vjp(ours, x, variables["params"])
    _, vjp_ref = jax.vjp(ref, x, variables["params"])
    for a, b in zip(jax.tree.leaves(vjp_ours(g)), jax.tree.leaves(vjp_ref(g))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,r", [((2, 8, 8, 6), 2), ((1, 16, 12, 4), 4),
                                     ((2, 9, 7, 3), 2)])   # remainder dropped
def test_patch_conv_is_nn_conv_with_kernel_equal_stride(shape, r):
  """Same parameters, the same init (a model's random init does not change),
  the same values and gradients as the strided conv it replaces."""
  kx, kg, ki = jax.random.split(jax.random.PRNGKey(5), 3)
  x = jax.random.normal(kx, shape)
  ref_mod = nn.Conv(5, (r, r), strides=(r, r), padding="VALID")
  ours_mod = layers.PatchConv(5, r)
  v_ref, v_ours = ref_mod.init(ki, x), ours_mod.init(ki, x)
  assert jax.tree.map(jnp.shape, v_ref) == jax.tree.map(jnp.shape, v_ours)
  for a, b in zip(jax.tree.leaves(v_ref), jax.tree.leaves(v_ours)):
    np.testing.assert_array_equal(a, b)
  p = jax.tree.map(lambda a: a + jax.random.normal(kg, a.shape), v_ref)
  ours = lambda x, p: ours_mod.apply(p, x)                  # noqa: E731
  ref = lambda x, p: ref_mod.apply(p, x)                    # noqa: E731
  with jax.default_matmul_precision("highest"):
    y = ref(x, p)
    np.testing.assert_allclose(ours(x, p), y, rtol=1e-5, atol=1e-5)
    g = jax.random.normal(kg, y.shape)
    _, vjp_ours = jax.vjp(ours, x, p)
    _, vjp_ref = jax.vjp(ref, x, p)
    for a, b in zip(jax.tree.leaves(vjp_ours(g)), jax.tree.leaves(vjp_ref(g))):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_depthwise_conv_bfloat16_rounds_once_on_cpu():
  """On CPU, in bfloat16, the 9 taps and the bias are summed in float32 and
  rounded once: the output is the float32 sum of the same bf16 values,
  rounded (a bf16 sum rounds after each multiply-add and lands ulps away).
  GPUs and TPUs keep the bf16 sum."""
  r = np.random.RandomState(5)
  x, kernel, bias = (jnp.asarray(r.standard_normal(s), jnp.bfloat16)
                     for s in ((2, 6, 7, 64), (3, 3, 1, 64), (64,)))
  assert jax.default_backend() == "cpu"
  got = np.asarray(layers._depthwise_forward(x, kernel, bias), np.float32)
  want = _grouped_conv(*(np.asarray(a, np.float32) for a in (x, kernel, bias)))
  want_bf16 = np.asarray(jnp.asarray(want, jnp.bfloat16), np.float32)
  # Summation order may move a value across a rounding boundary, rarely.
  assert np.mean(got != want_bf16) < 0.01
  np.testing.assert_allclose(got, want, rtol=2 ** -8, atol=1e-6)

  def f32_ops(platform):
    f = jax.jit(lambda x: layers._shifted_depthwise(x, kernel, bias))
    return f.trace(x).lower(lowering_platforms=(platform,)).as_text() \
        .count("-> tensor<2x6x7x64xf32>")
  assert f32_ops("cpu") > 0 and f32_ops("cuda") == 0


def test_depthwise_conv_stays_out_of_the_gelu_fusion_on_cpu():
  """PVTv2's GELU after the depthwise conv: on CPU the conv's sum runs in a
  conditional, so XLA:CPU cannot merge the erf into its nine-window loop
  (that loop ran the erf far slower than GELU alone), and the windows come
  from one float32 array, not nine converted bf16 slices; the values are
  the same (`cpu_fence`'s branches are one function)."""
  r = np.random.RandomState(7)
  x, kernel, bias = (jnp.asarray(r.standard_normal(s), jnp.bfloat16)
                     for s in ((2, 6, 7, 64), (3, 3, 1, 64), (64,)))
  f = jax.jit(lambda x: layers.gelu(layers._depthwise_forward(x, kernel,
                                                              bias)))
  text = f.lower(x).compile().as_text()
  bodies = re.split(r"\n(?=%[\w.-]+ \()", text)
  with_erf = [b for b in bodies if " erf(" in b]
  with_slices = [b for b in bodies if " slice(" in b]
  assert with_erf and with_slices, text[:3000]
  assert not any(" slice(" in b for b in with_erf), with_erf
  # (rank >= 2: the conditional's predicate is a bf16[1] slice of x)
  assert not any(re.search(r"bf16\[\d+,[\d,]+\]\S* slice\(", b)
                 for b in with_slices), with_slices
  assert " conditional(" in text
  unfenced = jax.jit(lambda x: layers.gelu(layers._depthwise_sum_f32(
      x, kernel, bias)))
  np.testing.assert_array_equal(np.asarray(f(x), np.float32),
                                np.asarray(unfenced(x), np.float32))


def test_cpu_fence_is_the_function():
  """Both branches are fn, whatever the predicate (the first element: zero,
  non-zero, NaN) and for an empty input."""
  fn = lambda a, b: a * 2 + b                             # noqa: E731
  for first in (0.0, 1.5, np.nan):
    a = jnp.asarray([first, 3.0, -1.0])
    np.testing.assert_array_equal(jax.jit(layers.cpu_fence, static_argnums=0)(
        fn, a, 1.0), fn(a, 1.0))
  empty = jnp.zeros((0, 3))
  assert layers.cpu_fence(fn, empty, 1.0).shape == (0, 3)


def test_depthwise_conv_is_the_grouped_conv_on_tpu():
  """TPUs run XLA's grouped convolution from GROUPED_MIN_BATCH images up
  (faster there by XLA:TPU's cost model), CPU and GPU the shifted sums: the
  same values and gradients, and each platform's lowering holds only its
  own."""
  r = np.random.RandomState(6)
  x = jnp.asarray(r.standard_normal((2, 6, 5, 8)), jnp.float32)
  kernel = jnp.asarray(r.standard_normal((3, 3, 1, 8)), jnp.float32)
  bias = jnp.asarray(r.standard_normal(8), jnp.float32)
  g = jnp.asarray(r.standard_normal((2, 6, 5, 8)), jnp.float32)

  def vjp(fn):
    out, back = jax.vjp(fn, x, kernel, bias)
    return (out,) + back(g)
  with jax.default_matmul_precision("highest"):
    for a, b in zip(vjp(layers._grouped_depthwise),
                    vjp(layers._shifted_depthwise)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  conv = layers.DepthwiseConv(3)
  params = conv.init(jax.random.PRNGKey(0), x)["params"]
  f = jax.jit(jax.grad(lambda p, x: jnp.sum(conv.apply({"params": p}, x)),
                       (0, 1)))

  def grouped_convs(platform, n):
    x_n = jnp.zeros((n,) + x.shape[1:])
    text = f.trace(params, x_n).lower(
        lowering_platforms=(platform,)).as_text()
    return text.count("feature_group_count = 8")
  big = layers.GROUPED_MIN_BATCH
  assert grouped_convs("tpu", big) >= 1
  assert grouped_convs("tpu", big - 1) == 0
  assert grouped_convs("cpu", big) == grouped_convs("cuda", big) == 0


def test_depthwise_conv_backward_keeps_only_its_input():
  """The kernel gradient needs the 9 shifted windows of x; they are rebuilt
  in the backward, so the residuals are x-sized once, not nine times."""
  x = jnp.ones((2, 8, 8, 16))
  conv = layers.DepthwiseConv(3)
  params = conv.init(jax.random.PRNGKey(0), x)["params"]
  _, vjp = jax.vjp(lambda x, p: conv.apply({"params": p}, x), x, params)
  saved = sum(r.size for r in jax.tree.leaves(vjp) if r.size >= x.size // 2)
  assert saved <= x.size, f"{saved / x.size:.1f} activations kept"


def test_depthwise_conv_backward_per_platform():
  """The GPU backward (flipped-kernel sum, one stacked float32 reduction for
  the kernel gradient) and the CPU one (flipped-kernel sum, a column sum
  per tap) equal autodiff's, which TPUs keep; each platform's lowering
  holds its own."""
  r = np.random.RandomState(4)
  x = jnp.asarray(r.standard_normal((2, 6, 5, 8)), jnp.float32)
  kernel = jnp.asarray(r.standard_normal((3, 3, 1, 8)), jnp.float32)
  bias = jnp.asarray(r.standard_normal(8), jnp.float32)
  g = jnp.asarray(r.standard_normal((2, 6, 5, 8)), jnp.float32)
  with jax.default_matmul_precision("highest"):
    for dt, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 6e-2)):
      args = [a.astype(dt) for a in (x, kernel, bias, g)]
      want = layers._depthwise_bwd_autodiff(*args)
      got = (layers._depthwise_bwd_direct(*args) +
             layers._depthwise_bwd_cpu(*args))
      for a, b in zip(got, want + want):
        assert a.dtype == b.dtype == dt and a.shape == b.shape
        np.testing.assert_allclose(np.asarray(a, np.float32),
                                   np.asarray(b, np.float32), rtol=tol,
                                   atol=tol * float(np.abs(
                                       np.asarray(b, np.float32)).max()))

  def count(platform, op):
    f = jax.jit(jax.grad(lambda x, k, b: jnp.sum(
        layers._shifted_depthwise(x, k, b) * g), (0, 1, 2)))
    text = f.trace(x, kernel, bias).lower(
        lowering_platforms=(platform,)).as_text()
    return text.count(op)
  assert count("cpu", "stablehlo.reduce") == 9 + 1     # per tap, and bias
  assert count("cuda", "stablehlo.reduce") == 1 + 1    # stacked, and bias
  assert count("tpu", "stablehlo.reduce") >= 9 + 1
  # Autodiff (TPU) transposes the nine windows into nine pads; CPU and GPU
  # shift the cotangent instead.
  assert count("tpu", "stablehlo.pad") >= 9 > count("cpu", "stablehlo.pad")


def test_dropout_is_flax_dropout_and_remat_keeps_its_mask():
  """Same bits and outputs as nn.Dropout; under remat ("full" and "dots")
  the backward reuses the saved keep mask instead of drawing the bits again
  (plain nn.remat draws them twice)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 64, 32))
  rngs = {"dropout": jax.random.PRNGKey(3)}

  class Block(nn.Module):
    drop: type

    @nn.compact
    def __call__(self, x):
      y = self.drop(0.1)(nn.Dense(32)(x))
      return self.drop(0.1)(jnp.tanh(y))        # two masks: Dropout_0, _1

  params = Block(layers.Dropout).init(
      {"params": jax.random.PRNGKey(1), **rngs}, x)
  ours = Block(layers.Dropout).apply(params, x, rngs=rngs)
  ref = Block(lambda r: nn.Dropout(r, deterministic=False)).apply(
      params, x, rngs=rngs)
  np.testing.assert_array_equal(ours, ref)
  assert 0.15 < float((ours == 0).mean()) < 0.23       # 1 - 0.9 ** 2

  def count(jaxpr):                   # random_bits calls, sub-jaxprs too
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name == "random_bits"
      for v in eqn.params.values():
        for j in (v if isinstance(v, (tuple, list)) else (v,)):
          if hasattr(j, "eqns") or hasattr(j, "jaxpr"):
            n += count(getattr(j, "jaxpr", j))
    return n

  def draws(block):
    f = lambda p: block.apply(p, x, rngs=rngs).sum()      # noqa: E731
    return count(jax.make_jaxpr(jax.grad(f))(params).jaxpr)

  once = draws(Block(layers.Dropout))
  assert once == 2
  for mode in ("full", "dots"):
    assert draws(layers.remat_module(Block, mode)(layers.Dropout)) == once
  assert draws(nn.remat(Block)(layers.Dropout)) == 2 * once


@pytest.mark.parametrize("lq,lk", [(5, 7), (8, 16), (3, 1)])
def test_cudnn_attention_path_matches_xla_path(cudnn_as_xla, lq, lk):
  r = np.random.RandomState(3)
  q = jnp.asarray(r.standard_normal((2, lq, 16)), jnp.float32)
  kv = jnp.asarray(r.standard_normal((2, lk, 16)), jnp.float32)
  xla = layers.MultiheadAttention(16, 4, dropout=0.5)
  fused = layers.MultiheadAttention(16, 4, dropout=0.5, impl="cudnn")
  params = xla.init(jax.random.PRNGKey(0), q, kv, kv)["params"]
  loss = lambda m: lambda p, q, kv: jnp.sum(                 # noqa: E731
      jnp.tanh(m.apply({"params": p}, q, kv, kv)))
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(fused.apply({"params": params}, q, kv, kv),
                               xla.apply({"params": params}, q, kv, kv),
                               atol=1e-5)
    g_x = jax.grad(loss(xla), argnums=(0, 1, 2))(params, q, kv)
    g_f = jax.grad(loss(fused), argnums=(0, 1, 2))(params, q, kv)
  for a, b in zip(jax.tree.leaves(g_x), jax.tree.leaves(g_f)):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
  assert {c[0] for c in cudnn_as_xla} == {"cudnn"}
  # Unpadded lengths pass no mask; padded keys pass the real key length.
  lengths = cudnn_as_xla[0][1]
  if lk % 8 == 0 and lq % 8 == 0:
    assert lengths is None
  else:
    np.testing.assert_array_equal(lengths, [lk, lk])
  # Attention dropout in training: jax's fused attention has none, so the
  # XLA path (the same masks, from the same rng) runs.
  n = len(cudnn_as_xla)
  rngs = {"dropout": jax.random.PRNGKey(1)}
  np.testing.assert_array_equal(
      fused.apply({"params": params}, q, kv, kv, train=True, rngs=rngs),
      xla.apply({"params": params}, q, kv, kv, train=True, rngs=rngs))
  assert len(cudnn_as_xla) == n


def test_gelu_is_torchs_erf_formula():
  """x * (1 + erf(x / sqrt(2))) / 2 as torch's nn.GELU(), in float32 for
  16-bit inputs, with its analytic gradient; lowered through erf, not the
  erfc expansion (jax.nn.gelu's), which is ALU-bound on a GPU."""
  import math
  from scipy.special import erf
  x = np.concatenate([np.linspace(-8, 8, 4001),
                      np.random.RandomState(0).standard_normal(2000) * 3])
  x = x.astype(np.float32)
  x64 = x.astype(np.float64)
  want = x64 * 0.5 * (1 + erf(x64 / math.sqrt(2)))
  np.testing.assert_allclose(layers.gelu(jnp.asarray(x)), want, atol=2e-6,
                             rtol=1e-5)
  dwant = 0.5 * (1 + erf(x64 / math.sqrt(2))) + \
      x64 * np.exp(-x64 ** 2 / 2) / math.sqrt(2 * math.pi)
  np.testing.assert_allclose(jax.vmap(jax.grad(layers.gelu))(jnp.asarray(x)),
                             dwant, atol=2e-6, rtol=1e-5)
  half = layers.gelu(jnp.asarray(x, jnp.bfloat16))
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), want, atol=0.03,
                             rtol=0.01)
  text = jax.jit(layers.gelu).lower(jnp.asarray(x)).as_text()
  assert "erf" in text and "erfc" not in text
