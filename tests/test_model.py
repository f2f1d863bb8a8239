"""The model's behaviour on tiny configs: shapes, single frames, masks,
train-mode randomness, ablation switches, remat equivalence."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avsegformer_jax import avsegformer, build_model
from configs import tiny


def _inputs(n, size=64, seed=0):
  r = np.random.RandomState(seed)
  return (r.standard_normal((n, size, size, 3)).astype(np.float32),
          r.standard_normal((n, 96, 64)).astype(np.float32))


@pytest.fixture(scope="module", params=["pvt2", "res50"])
def tiny_model(request):
  config = tiny.get_config(request.param)
  model = build_model(config)
  variables = avsegformer.init_variables(model, jax.random.PRNGKey(0))
  return config, model, variables


def test_shapes_and_single_frame(tiny_model):
  """N = 1 works (the original crashes there through a squeeze())."""
  config, model, variables = tiny_model
  frames, audio = _inputs(3)
  apply = jax.jit(model.apply)
  logits, mf = apply(variables, frames, audio)
  assert logits.shape == (3, 64, 64, 1) and logits.dtype == jnp.float32
  assert mf.shape == (3, 16, 16, config.model.embed_dim)
  one, mf1 = apply(variables, frames[1:2], audio[1:2])
  # Frames never interact: a frame alone gives what it gives in a batch.
  np.testing.assert_allclose(one[0], logits[1], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(mf1[0], mf[1], atol=1e-4, rtol=1e-4)


def test_frame_mask_zeroes_padded_frames(tiny_model):
  _, model, variables = tiny_model
  frames, audio = _inputs(4)
  mask = jnp.asarray([1.0, 0.0, 1.0, 0.0])
  logits, mf = jax.jit(model.apply)(variables, frames, audio, mask)
  assert float(jnp.abs(logits[1]).max()) == 0.0 and float(jnp.abs(mf[3]).max()) == 0.0
  ref, _ = jax.jit(model.apply)(variables, frames, audio)
  np.testing.assert_allclose(logits[0], ref[0], atol=1e-5)


def test_audio_changes_the_prediction(tiny_model):
  _, model, variables = tiny_model
  frames, audio = _inputs(2)
  apply = jax.jit(model.apply)     # (op by op, pvt2 took ~40 s on 2 cores)
  a, _ = apply(variables, frames, audio)
  b, _ = apply(variables, frames, audio[::-1])
  assert float(jnp.abs(a - b).max()) > 1e-6


def test_train_mode_uses_dropout_rng(tiny_model):
  config, model, variables = tiny_model
  frames, audio = _inputs(2)
  mutable = ["batch_stats"] if "batch_stats" in variables else []

  @jax.jit
  def run(seed):
    out, _ = model.apply(variables, frames, audio, train=True,
                         rngs={"dropout": jax.random.PRNGKey(seed)},
                         mutable=mutable)
    return out[0]
  a, b, c = run(0), run(0), run(1)
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - c).max()) > 0
  # eval is deterministic and needs no rng
  apply = jax.jit(model.apply)
  e1, _ = apply(variables, frames, audio)
  e2, _ = apply(variables, frames, audio)
  np.testing.assert_array_equal(e1, e2)


@pytest.mark.parametrize("override", [
    {"mixer": "cra"}, {"mixer": "none"}, {"learnable_queries": False},
    {"num_queries": 3}, {"num_classes": 5}])
def test_ablation_switches(override):
  config = tiny.get_config("pvt2")
  config.model.update(override)
  model = build_model(config)
  v = avsegformer.init_variables(model, jax.random.PRNGKey(0))
  head = v["params"]["head"]
  assert ("fusion_block" in head) == (config.model.mixer != "none")
  assert ("learnable_query" in head) == config.model.learnable_queries
  frames, audio = _inputs(2)
  logits, _ = jax.jit(model.apply)(v, frames, audio)
  assert logits.shape == (2, 64, 64, config.model.num_classes)
  assert head["mlp"]["layers_0"]["kernel"].shape[0] == config.model.num_queries


def test_bad_config_values_are_named():
  config = tiny.get_config("pvt2")
  config.model.mixer = "xyz"
  with pytest.raises(ValueError, match="model.mixer"):
    avsegformer.init_variables(build_model(config), jax.random.PRNGKey(0))
  config = tiny.get_config("pvt2")
  config.model.backbone = "vit"
  with pytest.raises(ValueError, match="model.backbone"):
    build_model(config)


@pytest.mark.parametrize("field,value,error", [
    ("data.image_size", 70, "data.image_size must be a multiple of 4 and at "
     "least 32, got 70"),
    ("data.image_size", 28, "data.image_size must be a multiple of 4 and at "
     "least 32, got 28"),
    ("data.num_frames", 0, "data.num_frames must be at least 1, got 0"),
    ("model.num_classes", 0, "model.num_classes must be 1 for task 's4', "
     "got 0 (configs/s4.py sets it)"),
    # A task switched alone: AVSS labels 0..70 against one logit trained and
    # scored without an error (demo: mIoU 0.95, all of it background).
    ("task", "avss", "model.num_classes must be 71 for task 'avss', got 1 "
     "(configs/avss.py sets it)"),
    ("task", "s5", "task must be one of ['avss', 'ms3', 's4'], got 's5'"),
    ("model.mixer", "xyz", "model.mixer must be one of ('cha', 'cra', "
     "'none'), got 'xyz'"),
    ("model.dtype", "fp16", "model.dtype must be one of"),
    ("model.attention_impl", "cudnn", "model.attention_impl='cudnn' needs "
     "16-bit compute"),
    # Zero widths divided by zero at init; 4 levels failed in the MSDA
    # core's broadcasting; rates of 1 or more trained on garbage or NaNs.
    ("model.num_queries", 0, "model.num_queries must be at least 1, got 0"),
    ("model.num_points", 0, "model.num_points must be at least 1, got 0"),
    ("model.head_mlp_dim", 0, "model.head_mlp_dim must be at least 1, got 0"),
    ("model.num_encoder_layers", -1,
     "model.num_encoder_layers must be at least 0, got -1"),
    ("model.num_levels", 4, "model.num_levels must be 1, 2 or 3, got 4"),
    ("model.dropout", 1.5, "model.dropout must be in [0, 1), got 1.5"),
    ("model.drop_path", 1.0, "model.drop_path must be in [0, 1), got 1.0"),
    ("model.attention_dropout", -0.1,
     "model.attention_dropout must be in [0, 1), got -0.1")])
def test_check_config_names_what_would_fail_in_a_traced_step(field, value,
                                                             error):
  """Before any work, as a ConfigError (main.py and predict report those in
  one line): a 70 px input came back as 72 px logits and failed in the loss
  against 70 px labels, a bad mixer only when the head was traced."""
  from avsegformer_jax import errors  # pylint: disable=g-import-not-at-top
  config = tiny.get_config("pvt2")
  avsegformer.check_config(config, "cpu")
  config.data.image_size = 100                  # not a multiple of 32: fine
  avsegformer.check_config(config, "cpu")
  config.update_from_flattened_dict({field: value})
  with pytest.raises(errors.ConfigError) as e:
    avsegformer.check_config(config, "cpu")
  assert str(e.value).startswith(error), e.value


def test_cudnn_attention_option(cudnn_as_xla):
  """model.attention_impl='cudnn' reaches every dense attention (PVTv2
  blocks, query generator, decoder) and gives the XLA path's logits;
  combinations that cannot run are named before anything traces."""
  from avsegformer_jax import pvt_v2, train
  config = tiny.get_config("pvt2")
  config.model.attention_impl = "cudnn"
  with pytest.raises(ValueError, match="model.attention_impl.*bfloat16"):
    build_model(config)                                   # float32
  config.model.dtype = "bfloat16"
  with pytest.raises(ValueError, match="NVIDIA GPUs only.*'cpu'"):
    train.Steps(build_model(config), config, train.make_mesh())
  frames, audio = _inputs(2)
  xla_config = tiny.get_config("pvt2")
  xla_config.model.dtype = "bfloat16"
  variables = avsegformer.init_variables(build_model(xla_config),
                                         jax.random.PRNGKey(0))
  with jax.default_matmul_precision("highest"):
    want, _ = jax.jit(build_model(xla_config).apply)(variables, frames, audio)
    got, _ = jax.jit(build_model(config).apply)(variables, frames, audio)
  m = config.model
  assert len(cudnn_as_xla) == (sum(pvt_v2.VARIANTS["b0"]["depths"])
                               + 2 * m.num_query_layers
                               + 2 * m.num_decoder_layers)
  # bfloat16 either way, in another order: ~1% apart on average (float32 is
  # ~1.4% from either); a wrong softmax scale is ~20% off.
  got, want = np.asarray(got), np.asarray(want)
  np.testing.assert_allclose(got, want, atol=0.1 * np.abs(want).max())
  assert np.abs(got - want).mean() < 0.03 * np.abs(want).mean()
  # Training: the decoder's attention dropout keeps its XLA path, unless
  # it is 0: model.attention_dropout, unset = model.dropout (the original's).
  rngs = {"dropout": jax.random.PRNGKey(1)}
  fused = 2 * m.num_decoder_layers
  for dropout, rate, decoder_calls in ((0.1, None, 0), (0.0, None, fused),
                                       (0.1, 0.0, fused), (0.0, 0.1, 0)):
    config.model.dropout, config.model.attention_dropout = dropout, rate
    del cudnn_as_xla[:]
    jax.jit(functools.partial(build_model(config).apply, train=True,
                              mutable=["batch_stats"]))(
        variables, frames, audio, rngs=rngs)
    assert len(cudnn_as_xla) == (sum(pvt_v2.VARIANTS["b0"]["depths"])
                                 + 2 * m.num_query_layers + decoder_calls)
  config.model.attention_impl = "flash"
  with pytest.raises(ValueError, match="model.attention_impl must be one of"):
    build_model(config)


def test_pallas_msda_option(monkeypatch):
  """model.msda_impl='pallas' reaches the encoder and, its kernels run by
  Pallas' interpreter, gives the default core's logits (its gradients are
  tested on the core); steps on a platform without Triton are refused by
  name."""
  from avsegformer_jax import deformable_attention_pallas, train
  monkeypatch.setattr(deformable_attention_pallas, "INTERPRET", True)
  calls = []
  real = deformable_attention_pallas.ms_deform_attn_pallas
  monkeypatch.setattr(deformable_attention_pallas, "ms_deform_attn_pallas",
                      lambda *a, **k: calls.append(1) or real(*a, **k))
  config = tiny.get_config("pvt2")
  frames, audio = _inputs(2)
  model = build_model(config)
  variables = avsegformer.init_variables(model, jax.random.PRNGKey(0))
  config.model.msda_impl = "pallas"
  with jax.default_matmul_precision("highest"):
    want, _ = jax.jit(model.apply)(variables, frames, audio)
    got, _ = jax.jit(build_model(config).apply)(variables, frames, audio)
  assert len(calls) == config.model.num_encoder_layers
  np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
  with pytest.raises(ValueError, match="msda_impl='pallas'.*GPUs only"):
    train.Steps(build_model(config), config, train.make_mesh())
