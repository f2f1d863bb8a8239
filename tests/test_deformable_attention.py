"""MSDeformAttn against the original's outputs (goldens/msda.npz).

Every core, "pallas" included: its Triton kernels run compiled on a GPU and
in Pallas' interpreter elsewhere (tests/test_deformable_attention_pallas.py
has the rest of its tests)."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avsegformer_jax import convert, dots, layers
from avsegformer_jax import deformable_attention as da
from avsegformer_jax import deformable_attention_pallas

GOLDEN = "tests/goldens/msda.npz"


@pytest.fixture(autouse=True)
def _pallas_interpreted_off_gpu(monkeypatch):
  monkeypatch.setattr(deformable_attention_pallas, "INTERPRET",
                      jax.default_backend() != "gpu")


@pytest.fixture(scope="module")
def g():
  return dict(np.load(GOLDEN))


def _shapes(g):
  return tuple((int(h), int(w)) for h, w in g["spatial_shapes"])


@pytest.mark.parametrize("impl", da.IMPLS)
def test_core_matches_golden(g, impl):
  with jax.default_matmul_precision("highest"):
    out = jax.jit(da.ms_deform_attn_core, static_argnums=(1, 4))(
        g["core_value"], _shapes(g), g["core_sampling_locations"],
        g["core_attention_weights"], impl)
  err = np.abs(np.asarray(out) - g["core_output"]).max()
  assert err <= 2e-5, err


def test_core_zero_padding_outside():
  """A location far outside every map samples exactly zero (grid_sample zeros)."""
  value = jnp.ones((1, 4 * 4, 1, 2))
  loc = jnp.full((1, 1, 1, 1, 1, 2), 5.0)
  out = da.ms_deform_attn_core(value, ((4, 4),), loc, jnp.ones((1, 1, 1, 1, 1)))
  assert float(jnp.abs(out).max()) == 0.0
  # On a pixel centre it returns that pixel exactly.
  value = jnp.arange(16.0).reshape(1, 16, 1, 1)
  loc = jnp.asarray([(2 + 0.5) / 4, (1 + 0.5) / 4]).reshape(1, 1, 1, 1, 1, 2)
  out = da.ms_deform_attn_core(value, ((4, 4),), loc, jnp.ones((1, 1, 1, 1, 1)))
  assert float(out[0, 0, 0]) == 1 * 4 + 2


def test_module_matches_golden(g):
  module = da.MSDeformAttn(256, 3, 8, 4)
  shapes = _shapes(g)
  target = jax.eval_shape(
      lambda k: module.init(k, g["query"], g["reference_points"],
                            g["input_flatten"], shapes), jax.random.PRNGKey(0))
  sd = {k: g[k] for k in g if k.startswith("msda.")}
  variables, report = convert.map_state_dict(sd, target, prefix="msda.")
  assert len(report["used"]) == 8 and not report["unknown"]
  with jax.default_matmul_precision("highest"):
    out, inter = jax.jit(
        lambda v, q, r, x: module.apply(v, q, r, x, shapes,
                                        mutable=["intermediates"]))(
                                            variables, g["query"],
                                            g["reference_points"],
                                            g["input_flatten"])
  inter = inter["intermediates"]
  loc_err = np.abs(np.asarray(inter["sampling_locations"][0])
                   - g["dbg_sampling_locations"]).max()
  aw_err = np.abs(np.asarray(inter["attention_probs"][0])
                  - g["dbg_attention_weights"]).max()
  err = np.abs(np.asarray(out) - g["output"]).max()
  assert loc_err <= 1e-5 and aw_err <= 1e-6, (loc_err, aw_err)
  assert err <= 2e-5, err


class _Sampler(nn.Module):
  """MSDeformAttn over fixed maps (remat traces every call argument)."""
  impl: str

  @nn.compact
  def __call__(self, query, ref, feats):
    return da.MSDeformAttn(32, 3, 4, 2, impl=self.impl)(
        query, ref, feats, ((6, 5), (3, 3), (2, 1)))


@pytest.mark.parametrize("mode", ["full", "dots"])
@pytest.mark.parametrize("impl", ["dense", "auto", "taps"])
def test_remat_keeps_the_dense_core_output(capsys, impl, mode):
  """Rematerialised, "dense" (TPU's core) keeps its [B, Lq, nH, D] output
  (named REMAT_KEEP) instead of building its tents again; under "auto" that
  is the TPU branch's value ([.., nH, D]), not the branch output ([.., C]),
  which remat would keep on every platform (XLA:GPU then writes `taps`'
  gathers out); "taps" keeps nothing. Gradients as without remat."""
  r = np.random.RandomState(5)
  query = jnp.asarray(r.standard_normal((2, 7, 32)), jnp.float32)
  ref = jnp.asarray(r.uniform(0, 1, (2, 7, 3, 2)), jnp.float32)
  feats = jnp.asarray(r.standard_normal((2, 41, 32)), jnp.float32)
  params = _Sampler(impl).init(jax.random.PRNGKey(0), query, ref, feats)

  def kept_and_grads(remat):
    m = layers.remat_module(_Sampler, remat)(impl)
    loss = lambda p, q, x: jnp.sum(jnp.sin(m.apply(p, q, ref, x)))
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(loss, params, query, feats)
    kept = [l for l in capsys.readouterr().out.splitlines()
            if "avsegformer_jax" in l]              # made inside the module
    return kept, jax.grad(loss, (0, 1, 2))(params, query, feats)
  kept, grads = kept_and_grads(mode)
  # Under "auto" the TPU branch's name is a residual output of the cond.
  core = [l for l in kept if "named 'remat_keep'" in l or "of cond" in l]
  if impl == "taps":
    assert core == [] and (mode == "dots" or kept == []), kept
  else:
    assert len(core) == 1 and core[0].startswith("f32[2,7,4,8]"), kept
    assert mode == "dots" or kept == core, kept
  _, want = kept_and_grads(False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-6), grads, want)


def test_init_gives_directional_offsets():
  module = da.MSDeformAttn(32, 2, 4, 3)
  x = jnp.zeros((1, 5, 32))
  v = module.init(jax.random.PRNGKey(0), x, jnp.full((1, 5, 2, 2), 0.5),
                  jnp.zeros((1, 4 + 1, 32)), ((2, 2), (1, 1)))
  b = np.asarray(v["params"]["sampling_offsets"]["bias"]).reshape(4, 2, 3, 2)
  np.testing.assert_allclose(b[0, 0, :, 0], [1, 2, 3])   # head 0 points along +x
  assert np.all(np.asarray(v["params"]["sampling_offsets"]["kernel"]) == 0)


def test_impls_agree_on_values_and_gradients():
  """Every core gives the same output and the same gradients with respect to
  value, locations and weights (taps has a hand-written backward), including
  points outside the maps and in bfloat16 within bf16 rounding."""
  shapes = ((6, 5), (3, 3), (2, 1))
  s = sum(h * w for h, w in shapes)
  r = np.random.RandomState(0)
  value = jnp.asarray(r.standard_normal((2, s, 3, 4)), jnp.float32)
  loc = jnp.asarray(r.uniform(-0.3, 1.3, (2, 7, 3, 3, 2, 2)), jnp.float32)
  aw = jnp.asarray(r.uniform(0, 1, (2, 7, 3, 3, 2)), jnp.float32)
  ct = jnp.asarray(r.standard_normal((2, 7, 12)), jnp.float32)

  def run(impl, v):
    f = lambda v, l, a: jnp.sum(da.ms_deform_attn_core(v, shapes, l, a, impl)
                                .astype(jnp.float32) * ct)
    with jax.default_matmul_precision("highest"):
      return jax.jit(jax.value_and_grad(f, (0, 1, 2)))(v, loc, aw)
  ref_val, ref_grads = run("gather4", value)
  for impl in da.IMPLS:
    val, grads = run(impl, value)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5, err_msg=impl)
    for g, rg, name in zip(grads, ref_grads, ("value", "loc", "weights")):
      np.testing.assert_allclose(g, rg, atol=1e-4, rtol=1e-4,
                                 err_msg=f"{impl} d/d{name}")
    # bfloat16 value: output within bf16 rounding of the float32 one.
    out32 = da.ms_deform_attn_core(value, shapes, loc, aw, impl)
    out16 = da.ms_deform_attn_core(value.astype(jnp.bfloat16), shapes, loc,
                                   aw, impl)
    assert out16.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out16, np.float32) - np.asarray(out32)).max()
    assert err <= 1e-2 * np.abs(np.asarray(out32)).max(), (impl, err)


def test_dense_gradient_at_pixel_centres():
  """At whole-pixel coordinates (the encoder's locations at init: reference
  points at pixel centres, offsets of whole pixels) "dense" differentiates
  as grid_sample and the gathers do: -1 on the pixel at floor(x), +1 on the
  next. A tent max(0, 1 - |x - j|) would give 0 on one side there."""
  shapes = ((4, 5), (2, 3))
  s = sum(h * w for h, w in shapes)
  r = np.random.RandomState(3)
  # Pixel centres from one outside each edge to one past it, per level.
  sizes = np.asarray([[w, h] for h, w in shapes], np.float32)   # [nL, 2]
  pix = r.randint(-1, 7, (1, 6, 2, 2, 3, 2)).astype(np.float32)
  loc = jnp.asarray((pix + 0.5) / sizes[None, None, None, :, None, :])
  value = jnp.asarray(r.standard_normal((1, s, 2, 3)), jnp.float32)
  aw = jnp.asarray(r.uniform(0, 1, (1, 6, 2, 2, 3)), jnp.float32)

  def grads(impl):
    f = lambda v, l, a: jnp.sum(da.ms_deform_attn_core(v, shapes, l, a, impl)
                                ** 2)
    with jax.default_matmul_precision("highest"):
      return jax.jit(jax.grad(f, (0, 1, 2)))(value, loc, aw)
  want = grads("gather4")
  assert np.abs(np.asarray(want[1])).max() > 0.1        # not a trivial case
  for got, ref, name in zip(grads("dense"), want, ("value", "loc", "weights")):
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5, err_msg=name)


@pytest.mark.parametrize("frames,per_group,groups", [(6, 2, 3), (5, 2, 5)])
def test_dense_backward_takes_frames_in_groups(monkeypatch, frames,
                                               per_group, groups):
  """Past DENSE_MAX_PAIRS (query, pixel) pairs, "dense"'s backward loops over
  groups of frames (a divisor of the batch: 5 frames at 2 a group go one by
  one) with the gradients of all frames at once; the forward stays whole."""
  shapes = ((6, 5), (3, 3), (2, 1))
  s = sum(h * w for h, w in shapes)
  r = np.random.RandomState(4)
  value = jnp.asarray(r.standard_normal((frames, s, 3, 4)), jnp.float32)
  loc = jnp.asarray(r.uniform(-0.3, 1.3, (frames, 7, 3, 3, 2, 2)),
                    jnp.float32)
  aw = jnp.asarray(r.uniform(0, 1, (frames, 7, 3, 3, 2)), jnp.float32)
  ct = jnp.asarray(r.standard_normal((frames, 7, 12)), jnp.float32)
  f = lambda v, l, a: jnp.sum(da.ms_deform_attn_core(v, shapes, l, a, "dense")
                              * ct)
  def grads():              # a new function each time: traced afresh
    with jax.default_matmul_precision("highest"):
      return jax.jit(jax.grad(lambda *a: f(*a), (0, 1, 2)))(value, loc, aw)
  want = grads()
  monkeypatch.setattr(da, "DENSE_MAX_PAIRS", per_group * 7 * s + 1)
  got = grads()
  for g, w, name in zip(got, want, ("value", "loc", "weights")):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=name)
  loops = re.findall(r"scan\[.*?length=(\d+)", str(jax.make_jaxpr(
      jax.grad(f, (0, 1, 2)))(value, loc, aw)), re.S)
  assert loops == [str(groups)]
  assert "scan" not in str(jax.make_jaxpr(f)(value, loc, aw))


def test_taps_branches_per_platform_agree():
  """`taps` sums its taps in one loop on CPU and as one gather + reduction
  elsewhere (XLA:GPU splits the 48-tap loop into a multi-output fusion that
  writes every tap: 4x the forward's memory traffic, benchmarks/README).
  Both branches give the same numbers, and the lowering picks by platform."""
  r = np.random.RandomState(1)
  table = jnp.asarray(r.standard_normal((40, 8)), jnp.float32)
  row = jnp.asarray(r.randint(0, 40, (30, 12)), jnp.int32)
  wgt = jnp.asarray(r.uniform(0, 1, (30, 12)), jnp.float32)
  ct = jnp.asarray(r.standard_normal((30, 8)), jnp.float32)
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(da._weighted_rows_plain(table, row, wgt),
                               da._tap_loop(table, row, wgt), rtol=1e-5)
    np.testing.assert_allclose(da._tap_dots_gather(table, row, ct),
                               da._tap_dots_loop(table, row, ct), rtol=1e-5,
                               atol=1e-6)

  def gathers(platform):
    f = jax.jit(jax.grad(lambda t, w: jnp.sum(da._weighted_rows(t, row, w)
                                              * ct), (0, 1)))
    text = f.trace(table, wgt).lower(lowering_platforms=(platform,)).as_text()
    return text.count("stablehlo.gather")
  # CPU: one per tap in the forward (its fence's two branches call one
  # function) and in d_wgt.
  assert gathers("cpu") == 2 * 12
  assert gathers("cuda") == 2


def test_taps_loop_is_not_fused_with_the_output_reshape():
  """On CPU the tap loop stays a loop over [B*Lq*nH, D] rows: fused with the
  reshape to [B*Lq, nH*D] that `output_proj` reads, XLA:CPU emitted it over
  rows of nH*D elements whose gather index changes every D, 4x slower."""
  from benchmarks import msda
  shapes, value, loc, aw = msda.inputs(64, 1, jnp.bfloat16)
  n, s, heads, d = value.shape
  w = jnp.ones((heads * d, heads * d), jnp.bfloat16)
  f = lambda v, l, a: dots.matmul(                        # noqa: E731
      da.ms_deform_attn_core(v, shapes, l, a, "taps"), w)
  text = jax.jit(f).lower(value, loc, aw).compile().as_text()
  # The computations that gather, by what they return.
  gathering = {}
  for body in re.split(r"\n(?=%[\w.-]+ \()", text)[1:]:
    head = body.split("{", 1)[0]
    if " gather(" in body:
      gathering[head.split(" ", 1)[0]] = head.rsplit("->", 1)[1].strip()
  assert gathering, text[:2000]
  assert all(shape == f"f32[{n * s * heads},{d}]" or
             shape == f"bf16[{n * s * heads},{d}]"
             for shape in gathering.values()), gathering


def test_corners_are_made_in_their_own_loop_on_cpu():
  """On CPU the corner indices and weights are made once, behind a
  conditional, from the corner offsets by broadcasting: stacked along a
  4-wide minor axis, or merged into each consumer, XLA:CPU took ~3x as
  long for the encoder's table rows. Same values as the plain arithmetic."""
  from benchmarks import msda
  shapes, value, loc, aw = msda.inputs(64, 1, jnp.bfloat16)
  f = jax.jit(lambda v, l, a: da._table_rows(v, shapes, l, a)[1:])
  text = f.lower(value, loc, aw).compile().as_text()
  assert " conditional(" in text and " concatenate(" not in text
  hs = np.asarray([h for h, _ in shapes], np.float32).reshape(-1, 1)
  ws = np.asarray([w for _, w in shapes], np.float32).reshape(-1, 1)
  got = jax.jit(lambda l: da._corners(l, hs, ws))(loc)
  want = jax.jit(lambda l: da._corners_math(l, hs, ws))(loc)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_taps_backward_keeps_no_forward_taps():
  """The backward re-gathers its taps rather than sharing the forward's (an
  optimization barrier stops XLA merging the two): shared, the forward wrote
  all 48 taps out and kept them for the backward, [M, 48, D] float32, and
  its gathers no longer fused into one loop (CPU)."""
  from benchmarks import msda
  shapes, value, loc, aw = msda.inputs(64, 1, jnp.float32)
  loss = lambda v, l, a: jnp.sum(jnp.tanh(         # noqa: E731 (nonlinear:
      da.ms_deform_attn_core(v, shapes, l, a, "taps")))  # the forward is live)
  compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(value, loc, aw).compile()
  n, s, heads, d = value.shape
  taps = len(shapes) * msda.POINTS * 4                     # levels x points x corners
  taps_bytes = n * s * heads * taps * d * 4                # [M, 48, D] f32
  temp = compiled.memory_analysis().temp_size_in_bytes
  # 1.24x the taps with the barrier (the scatter-add's updates are as big);
  # 2.15x without.
  assert temp < 1.6 * taps_bytes, (temp, taps_bytes)


def test_auto_lowers_to_the_platforms_core(monkeypatch):
  """"auto" (the default) is "taps" when lowered for CPU and GPU, and for
  TPU "dense" up to DENSE_MAX_PAIRS (query, pixel) pairs per head, then
  "gather4": the lowered program has the chosen core's gathers and scatters
  and no others, so the other branches cost nothing (XLA:TPU pads the taps
  table's [M, 48, 32] gather to 128 lanes: 28x the memory, minutes to
  compile)."""
  shapes = ((6, 5), (3, 3), (2, 1))
  s = sum(h * w for h, w in shapes)
  value = jnp.zeros((2, s, 3, 4), jnp.bfloat16)
  loc = jnp.zeros((2, 7, 3, 3, 2, 2), jnp.float32)
  aw = jnp.zeros((2, 7, 3, 3, 2), jnp.float32)

  def ops(impl, platform):
    f = jax.jit(jax.grad(lambda v, l, a: jnp.sum(da.ms_deform_attn_core(
        v, shapes, l, a, impl).astype(jnp.float32)), (0, 1, 2)))
    text = f.trace(value, loc, aw).lower(
        lowering_platforms=(platform,)).as_text()
    return [text.count(f"stablehlo.{op}") for op in ("gather", "scatter")]
  for platform, core in (("tpu", "dense"), ("cuda", "taps"),
                         ("cpu", "taps")):
    assert ops("auto", platform) == ops(core, platform), platform
  assert ops("dense", "tpu") == [0, 0]
  assert ops("gather4", "tpu") != ops("taps", "tpu")
  monkeypatch.setattr(da, "DENSE_MAX_PAIRS", 7 * s - 1)
  assert ops("auto", "tpu") == ops("gather4", "tpu") != [0, 0]
  assert da.DEFAULT_IMPL == "auto"
