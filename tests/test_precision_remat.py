"""Speed options that must not change the model: bfloat16 compute (float32
parameters, optimizer state, loss and metrics), rematerialisation and
scanned layers (identical gradients), on tiny configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avsegformer_jax import avsegformer, build_model, train
from benchmarks.model import random_batch
from configs import tiny


def _dtypes(tree):
  return {str(x.dtype) for x in jax.tree_util.tree_leaves(tree)}


def test_bfloat16_train_and_eval_steps():
  """bf16 compute end to end through the real steps: finite float32 loss,
  float32 params/optimizer state before and after, float32 metric sums,
  and logits close to the float32 model's with the same parameters."""
  config = tiny.get_config("pvt2")
  config.train.freeze_backbone_epochs = 0
  config.model.dtype = "bfloat16"
  mesh = train.make_mesh()
  model = avsegformer.build_model(config, axis_name=train.AXIS)
  state = train.create_train_state(config, build_model(config),
                                   jax.random.PRNGKey(0))
  assert _dtypes(state.params) == {"float32"}
  batch = train.shard_batch(random_batch(config, clips=1), mesh)
  steps = train.Steps(model, config, mesh)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  stats, logits16, _ = steps.eval(variables, batch)
  assert logits16.dtype == jnp.float32 and _dtypes(stats) == {"float32"}

  config32 = tiny.get_config("pvt2")
  frames = batch["frames"].reshape((-1,) + batch["frames"].shape[2:])
  frames = train.normalize_frames(frames, jnp.ones(frames.shape[:1]))
  logits32, _ = jax.jit(build_model(config32).apply)(
      variables, frames, batch["audio"].reshape((-1, 96, 64)))
  logits16 = np.asarray(logits16).reshape(logits32.shape)
  logits32 = np.asarray(logits32)
  # bf16 keeps ~3 significant digits; 6+ layers of it drift further. The
  # bound is loose but a wrong cast (e.g. bf16 sampling locations, or
  # float32 params silently truncated and re-expanded wrongly) breaks it.
  scale = np.abs(logits32).max()
  err = np.abs(logits16 - logits32)
  assert err.max() <= 0.1 * scale, (err.max(), scale)
  assert err.mean() <= 0.02 * np.abs(logits32).mean() + 1e-3, err.mean()
  assert np.corrcoef(logits16.ravel(), logits32.ravel())[0, 1] > 0.99

  state = train.replicate(state, mesh)
  new_state, stats = steps.train(state, batch)
  assert np.isfinite(float(stats["loss"])) and stats["loss"].dtype == jnp.float32
  assert _dtypes(new_state.params) == {"float32"}
  assert _dtypes(new_state.opt_state) <= {"float32", "int32"}


@pytest.mark.parametrize("backbone,scan", [("pvt2", False), ("res50", True)])
def test_cast_weights_is_exact_and_casts_only_weights(backbone, scan):
  """Weights cast once for a bfloat16 eval give the logits of the float32
  weights bit for bit (every casted leaf is converted before any use), and
  norms, embeddings and batch statistics keep float32."""
  config = tiny.get_config(backbone)
  config.model.dtype = "bfloat16"
  config.model.scan_layers = scan
  model = build_model(config)
  variables = avsegformer.init_variables(model, jax.random.PRNGKey(0))
  # Non-zero biases and norm shifts: zeros would hide a wrong cast.
  # (numpy: a jax.random draw per leaf shape compiled ~200 programs)
  rs = np.random.RandomState(1)
  variables = jax.tree.map(
      lambda x: x + np.float32(0.05) * rs.standard_normal(x.shape).astype(
          np.float32), variables)
  cast = avsegformer.cast_weights(variables, "bfloat16")
  r = np.random.RandomState(0)
  frames = jnp.asarray(r.randn(2, 64, 64, 3), jnp.float32)
  audio = jnp.asarray(r.randn(2, 96, 64), jnp.float32)
  apply = jax.jit(model.apply)
  want, cast_out = apply(variables, frames, audio), apply(cast, frames, audio)
  for a, b in zip(want, cast_out):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  flat = jax.tree_util.tree_flatten_with_path(cast)[0]
  dtypes = {jax.tree_util.keystr(p): str(x.dtype) for p, x in flat}
  kernels = [k for k in dtypes if k.endswith("['kernel']")]
  assert kernels and all(dtypes[k] == "bfloat16" for k in kernels)
  others = [k for k, d in dtypes.items() if d == "float32"]
  assert any("['scale']" in k for k in others)       # norms
  assert any("learnable_query" in k for k in others)
  assert all(d == "float32" for k, d in dtypes.items()
             if "batch_stats" in k or "['scale']" in k
             or "level_embed" in k or "['embedding']" in k)
  assert avsegformer.cast_weights(variables, "float32") is variables


def _grads(config, train_mode, seed=0, prng_impl="threefry2x32"):
  model = build_model(config)
  v = avsegformer.init_variables(model, jax.random.PRNGKey(0))
  b = random_batch(config, clips=2, seed=seed)
  frames = b["frames"].reshape((-1,) + b["frames"].shape[2:])
  frames = train.normalize_frames(frames, np.ones(frames.shape[:1]))
  audio = b["audio"].reshape((-1, 96, 64))
  mutable = ["batch_stats"] if "batch_stats" in v else []

  def loss(p):
    (logits, mf), _ = model.apply(
        {**v, "params": p}, frames, audio, train=train_mode,
        rngs={"dropout": train.dropout_key(jax.random.PRNGKey(1), prng_impl)},
        mutable=mutable)
    return jnp.mean(jnp.tanh(logits)) + 0.1 * jnp.mean(mf * mf)
  with jax.default_matmul_precision("highest"):
    return jax.jit(jax.value_and_grad(loss))(v["params"])


# One case: every compile of a train-mode gradient costs minutes on a 2-core
# CPU. PVTv2 unscanned covers remat of backbone blocks and of the encoder,
# decoder and query-generator layers.
@pytest.mark.parametrize("backbone,scan", [("pvt2", False)])
def test_remat_gives_identical_gradients(backbone, scan):
  """Train mode (dropout, drop-path, batch statistics): rematerialised blocks
  recompute exactly what they stored, with the same random bits, whether
  they recompute everything ("full") or all but the weight GEMMs ("dots"),
  and whether the bits come from threefry or XLA's RngBitGenerator ("rbg")."""
  out = {}   # (four compiles: "dots" is checked with rbg bits only)
  for remat, policy, impl in ((False, "full", "threefry2x32"),
                              (True, "full", "threefry2x32"),
                              (False, "full", "rbg"), (True, "dots", "rbg")):
    config = tiny.get_config(backbone)
    config.model.remat, config.model.scan_layers = remat, scan
    config.model.remat_policy = policy
    out[remat and policy, impl] = _grads(config, True, prng_impl=impl)
  # Other dropout bits, another loss: the rbg key reaches the dropouts.
  assert abs(float(out[False, "rbg"][0] - out[False, "threefry2x32"][0])) > 1e-6
  for (remat, impl), (l1, g1) in out.items():
    if not remat:
      continue
    l0, g0 = out[False, impl]
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    flat0 = jax.tree_util.tree_leaves_with_path(g0)
    flat1 = dict(jax.tree_util.tree_leaves_with_path(g1))
    assert len(flat0) == len(flat1)
    for path, a in flat0:
      np.testing.assert_allclose(flat1[path], a, atol=1e-5, rtol=1e-5,
                                 err_msg=jax.tree_util.keystr(path))


def test_rbg_dropout_key_trains_and_checks_its_name():
  """`train.prng_impl`: the state keeps its threefry key (checkpoints do not
  change); the step draws dropout bits from an rbg key, deterministically."""
  config = tiny.get_config("res50")
  config.train.prng_impl = "rbg"
  mesh = train.make_mesh()
  steps = train.Steps(avsegformer.build_model(config, axis_name=train.AXIS),
                      config, mesh)
  state = train.replicate(train.create_train_state(
      config, build_model(config), jax.random.PRNGKey(0)), mesh)
  assert state.rng.shape == (2,) and state.rng.dtype == jnp.uint32
  batch = train.shard_batch(random_batch(config, clips=1), mesh)
  key = train.dropout_key(state.rng, "rbg")
  assert str(jax.random.key_impl(key)) == "rbg"
  losses = []
  for _ in range(2):                 # the state is donated: one copy each
    fresh = jax.tree_util.tree_map(jnp.copy, state)
    new_state, stats = steps.train(fresh, batch)
    losses.append(float(stats["loss"]))
  assert np.isfinite(losses[0]) and losses[0] == losses[1]
  assert new_state.rng.shape == (2,)
  config.train.prng_impl = "philox"
  with pytest.raises(ValueError, match="train.prng_impl must be one of"):
    train.Steps(None, config, mesh)


def test_unknown_remat_policy_is_named():
  config = tiny.get_config("pvt2")
  config.model.remat, config.model.remat_policy = True, "some"
  with pytest.raises(ValueError, match="model.remat_policy must be one of"):
    avsegformer.build_model(config)
