"""pretrained: ImageNet ResNet-50 / PVTv2 / VGGish files and released
checkpoints into the Flax model.

The source state dicts are synthetic, in the source projects' own naming
(torchvision, the official PVTv2 release, torchvggish), written as `.pth`
files by tests/pth_writer.py. Values are checked where they land (arrays
equal to the transposed source) and through a forward pass of the first
layer against a numpy convolution computed from the torch-layout weights.
"""
import functools
import os
import sys

import jax
import numpy as np
import pytest

from avsegformer_jax import (avsegformer, checkpoint, convert, export_pth,
                             layers, pretrained, pvt_v2, resnet, run_config,
                             vggish)
from avsegformer_jax.convert import ConversionError
from configs import tiny

sys.path.insert(0, os.path.dirname(__file__))
from pth_writer import write_pth  # noqa: E402


def _w(rng, *shape):
  fan_in = int(np.prod(shape[1:])) or 1
  return rng.standard_normal(shape, np.float32) / np.float32(np.sqrt(fan_in))


def _bn(sd, rng, name, c):
  sd[f"{name}.weight"] = 1 + 0.1 * rng.standard_normal(c, np.float32)
  sd[f"{name}.bias"] = 0.1 * rng.standard_normal(c, np.float32)
  sd[f"{name}.running_mean"] = 0.1 * rng.standard_normal(c, np.float32)
  sd[f"{name}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
  sd[f"{name}.num_batches_tracked"] = np.array(100, np.int64)


def torchvision_resnet50(seed=0):
  rng = np.random.default_rng(seed)
  sd = {"conv1.weight": _w(rng, 64, 3, 7, 7)}
  _bn(sd, rng, "bn1", 64)
  inplanes = 64
  for s, (depth, planes) in enumerate(zip(resnet.DEPTHS, resnet.WIDTHS)):
    for i in range(depth):
      p = f"layer{s + 1}.{i}."
      sd[p + "conv1.weight"] = _w(rng, planes, inplanes, 1, 1)
      sd[p + "conv2.weight"] = _w(rng, planes, planes, 3, 3)
      sd[p + "conv3.weight"] = _w(rng, planes * 4, planes, 1, 1)
      for j, c in ((1, planes), (2, planes), (3, planes * 4)):
        _bn(sd, rng, p + f"bn{j}", c)
      if i == 0:
        sd[p + "downsample.0.weight"] = _w(rng, planes * 4, inplanes, 1, 1)
        _bn(sd, rng, p + "downsample.1", planes * 4)
      inplanes = planes * 4
  sd["fc.weight"] = _w(rng, 1000, 2048)
  sd["fc.bias"] = np.zeros(1000, np.float32)
  return sd


def official_pvt_v2(variant, seed=0):
  rng = np.random.default_rng(seed)
  spec = pvt_v2.VARIANTS[variant]
  sd, cin = {}, 3
  for s in range(4):
    c, k = spec["embed_dims"][s], (7 if s == 0 else 3)
    hid, sr = c * spec["mlp_ratios"][s], pvt_v2.SR_RATIOS[s]
    sd[f"patch_embed{s + 1}.proj.weight"] = _w(rng, c, cin, k, k)
    sd[f"patch_embed{s + 1}.proj.bias"] = _w(rng, c)
    shapes = {"norm1.weight": (c,), "norm1.bias": (c,),
              "attn.q.weight": (c, c), "attn.q.bias": (c,),
              "attn.kv.weight": (2 * c, c), "attn.kv.bias": (2 * c,),
              "attn.proj.weight": (c, c), "attn.proj.bias": (c,),
              "norm2.weight": (c,), "norm2.bias": (c,),
              "mlp.fc1.weight": (hid, c), "mlp.fc1.bias": (hid,),
              "mlp.dwconv.dwconv.weight": (hid, 1, 3, 3),
              "mlp.dwconv.dwconv.bias": (hid,),
              "mlp.fc2.weight": (c, hid), "mlp.fc2.bias": (c,)}
    if sr > 1:
      shapes.update({"attn.sr.weight": (c, c, sr, sr), "attn.sr.bias": (c,),
                     "attn.norm.weight": (c,), "attn.norm.bias": (c,)})
    for j in range(spec["depths"][s]):
      sd.update({f"block{s + 1}.{j}.{n}": _w(rng, *sh)
                 for n, sh in shapes.items()})
    for n in (f"patch_embed{s + 1}.norm", f"norm{s + 1}"):
      sd[n + ".weight"] = 1 + _w(rng, c)
      sd[n + ".bias"] = _w(rng, c)
    cin = c
  sd["head.weight"], sd["head.bias"] = _w(rng, 1000, cin), _w(rng, 1000)
  return sd


def torchvggish(seed=0):
  rng = np.random.default_rng(seed)
  sd, cin, idx = {}, 1, 0
  for item in vggish.CFG:
    if item != "M":
      sd[f"features.{idx}.weight"] = _w(rng, item, cin, 3, 3)
      sd[f"features.{idx}.bias"] = _w(rng, item)
      cin, idx = item, idx + 2
    else:
      idx += 1
  for i, (o, n) in enumerate(((4096, 12288), (4096, 4096), (128, 4096))):
    sd[f"embeddings.{2 * i}.weight"] = _w(rng, o, n)
    sd[f"embeddings.{2 * i}.bias"] = _w(rng, o)
  return sd


@functools.lru_cache(maxsize=None)
def _model_shapes(backbone, scan, vggish_fc_dim):
  if scan:      # the backbone alone: tracing a second whole model is slow
    module = pvt_v2.PyramidVisionTransformerV2("b0", scan_layers=True)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
    return {"params": {"backbone": jax.eval_shape(
        module.init, jax.random.PRNGKey(0), x)["params"]}}
  return avsegformer.variable_shapes(
      avsegformer.build_model(config_with(backbone,
                                          vggish_fc_dim=vggish_fc_dim)))


def zeros_like_model(config):
  """Variables of the model, as zeros (cheap: no init compute)."""
  shapes = _model_shapes(config.model.backbone, config.model.scan_layers,
                         config.model.vggish_fc_dim)
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def np_conv(x, w, b=None, stride=1, pad=0):
  """NHWC input, torch-layout [O, I, k, k] weight: cross-correlation."""
  o, i, k, _ = w.shape
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho = (xp.shape[1] - k) // stride + 1
  wo = (xp.shape[2] - k) // stride + 1
  cols = np.stack([xp[:, a:a + stride * ho:stride, c:c + stride * wo:stride]
                   for a in range(k) for c in range(k)], axis=-1)
  out = np.einsum("nhwiq,oiq->nhwo", cols.astype(np.float64),
                  w.reshape(o, i, k * k).astype(np.float64))
  return out + (0 if b is None else b)


def np_bn(y, sd, name):
  return ((y - sd[name + ".running_mean"])
          / np.sqrt(sd[name + ".running_var"] + 1e-5)
          * sd[name + ".weight"] + sd[name + ".bias"])


def np_bottleneck(x, sd, p):
  """torchvision Bottleneck (stride 1) in numpy, from torch-layout weights."""
  relu = lambda a: np.maximum(a, 0)
  y = relu(np_bn(np_conv(x, sd[p + "conv1.weight"]), sd, p + "bn1"))
  y = relu(np_bn(np_conv(y, sd[p + "conv2.weight"], pad=1), sd, p + "bn2"))
  y = np_bn(np_conv(y, sd[p + "conv3.weight"]), sd, p + "bn3")
  short = np_bn(np_conv(x, sd[p + "downsample.0.weight"]), sd,
                p + "downsample.1")
  return relu(y + short)


def config_with(backbone, **model):
  c = tiny.get_config(backbone)
  c.model.update(model)
  return c


# ------------------------------------------------------------ ResNet-50 ----
@pytest.fixture(scope="module")
def res50(tmp_path_factory):
  sd = torchvision_resnet50()
  path = str(tmp_path_factory.mktemp("r") / "resnet50.pth")
  return sd, write_pth(path, sd)


def test_resnet50_torchvision_lands_in_branch_one(res50):
  sd, path = res50
  config = config_with("res50")
  config.pretrained.backbone = path
  before = zeros_like_model(config)
  v = pretrained.load_pretrained(config, before)
  p, bs = v["params"]["backbone"], v["batch_stats"]["backbone"]
  np.testing.assert_array_equal(
      p["layer3_1_0"]["conv2"]["kernel"],
      sd["layer3.0.conv2.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["layer4_1_2"]["bn3"]["scale"],
                                sd["layer4.2.bn3.weight"])
  np.testing.assert_array_equal(bs["layer2_0"]["downsample_1"]["var"],
                                sd["layer2.0.downsample.1.running_var"])
  np.testing.assert_array_equal(p["layer1_0"]["downsample_0"]["kernel"],
                                sd["layer1.0.downsample.0.weight"]
                                .transpose(2, 3, 1, 0))
  # Everything outside the backbone is untouched.
  assert v["params"]["head"] is before["params"]["head"]
  assert v["params"]["vggish"] is before["params"]["vggish"]
  # A whole bottleneck (with downsample) through the Flax module == numpy.
  x = np.random.default_rng(1).standard_normal((1, 8, 8, 64), np.float32)
  with jax.default_matmul_precision("highest"):
    got = resnet.Bottleneck(64, 1, downsample=True).apply(
        {"params": p["layer1_0"], "batch_stats": bs["layer1_0"]}, x)
  np.testing.assert_allclose(np.asarray(got), np_bottleneck(x, sd, "layer1.0."),
                             atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- PVTv2 ----
@pytest.mark.parametrize("scan", [False, True])
def test_pvt_v2_b0_official_names(tmp_path, scan):
  sd = official_pvt_v2("b0")
  config = config_with("pvt2", scan_layers=scan)
  config.pretrained.backbone = write_pth(tmp_path / "pvt_v2_b0.pth", sd,
                                         nested=True)
  v = pretrained.load_pretrained(config, zeros_like_model(config))
  p = v["params"]["backbone"]
  blk = (lambda s, j: jax.tree_util.tree_map(lambda a: a[j], p[f"block{s}"])
         ) if scan else (lambda s, j: p[f"block{s}_{j}"])
  np.testing.assert_array_equal(blk(2, 1)["attn"]["kv"]["kernel"],
                                sd["block2.1.attn.kv.weight"].T)
  np.testing.assert_array_equal(blk(1, 0)["attn"]["sr"]["kernel"],
                                sd["block1.0.attn.sr.weight"]
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(blk(3, 1)["mlp"]["dwconv"]["dwconv"]["kernel"],
                                sd["block3.1.mlp.dwconv.dwconv.weight"]
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(blk(4, 0)["norm2"]["bias"],
                                sd["block4.0.norm2.bias"])
  np.testing.assert_array_equal(p["norm4"]["scale"], sd["norm4.weight"])
  # Stage-1 patch embedding through the Flax module == numpy conv + LN.
  x = np.random.default_rng(2).standard_normal((1, 16, 16, 3), np.float32)
  with jax.default_matmul_precision("highest"):
    got = pvt_v2.PatchEmbed(32, 7, 4).apply({"params": p["patch_embed1"]}, x)
  y = np_conv(x, sd["patch_embed1.proj.weight"], sd["patch_embed1.proj.bias"],
              stride=4, pad=3)
  y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True)
                                                 + 1e-5)
  want = y * sd["patch_embed1.norm.weight"] + sd["patch_embed1.norm.bias"]
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_mapping_errors_name_file_key_and_shapes(tmp_path, res50):
  sd = official_pvt_v2("b0")
  config = config_with("pvt2")                 # b0
  variables = zeros_like_model(config)

  def load(name, state_dict):
    config.pretrained.backbone = write_pth(tmp_path / name, state_dict)
    return pretrained.load_pretrained(config, variables)

  with pytest.raises(ConversionError, match=r"pvt_v2_b1\.pth \(PVTv2-B0\).*"
                     r"\(64, 3, 7, 7\).*\(7, 7, 3, 32\)"):
    load("pvt_v2_b1.pth", official_pvt_v2("b1"))
  missing = {k: v for k, v in sd.items() if k != "block2.1.attn.kv.bias"}
  with pytest.raises(ConversionError,
                     match=r"m\.pth.*block2\.1\.attn\.kv\.bias missing"):
    load("m.pth", missing)
  bad = dict(sd)
  bad["block3.0.mlp.fc2.weight"] = np.zeros((160, 5), np.float32)
  with pytest.raises(ConversionError, match=r"s\.pth.*block3\.0\.mlp\.fc2"
                     r"\.weight.*\(160, 5\).*\(640, 160\)"):
    load("s.pth", bad)
  with pytest.raises(ConversionError, match=r"x\.pth.*block5\.0\.q\.weight"):
    load("x.pth", dict(sd, **{"block5.0.q.weight": np.zeros(2, np.float32)}))
  config.pretrained.backbone = res50[1]
  with pytest.raises(ConversionError, match="res50 state dict, but "
                     "model.backbone is 'pvt2'"):
    pretrained.load_pretrained(config, variables)


# --------------------------------------------------------------- VGGish ----
def test_vggish_torchvggish_names(tmp_path):
  sd = torchvggish()
  config = config_with("pvt2")
  config.pretrained.vggish = write_pth(tmp_path / "vggish-10086976.pth", sd)
  with pytest.raises(ConversionError, match=r"vggish-10086976\.pth: VGGish's "
                     r"hidden FCs are 4096 wide, the model's 128 "
                     r"\(model\.vggish_fc_dim\)"):
    pretrained.load_pretrained(config, zeros_like_model(config))
  config.model.vggish_fc_dim = 4096          # the release's (tiny: 128)
  before = zeros_like_model(config)
  v = pretrained.load_pretrained(config, before)
  p = v["params"]["vggish"]
  np.testing.assert_array_equal(p["features_13"]["kernel"],
                                sd["features.13.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["embeddings_4"]["kernel"],
                                sd["embeddings.4.weight"].T)
  np.testing.assert_array_equal(p["embeddings_0"]["bias"],
                                sd["embeddings.0.bias"])
  assert v["params"]["backbone"] is before["params"]["backbone"]
  # VGGish's first conv, with its loaded params, == numpy conv.
  x = np.random.default_rng(3).standard_normal((1, 96, 64, 1), np.float32)
  with jax.default_matmul_precision("highest"):
    got = layers.conv(64, 3, padding=1).apply({"params": p["features_0"]}, x)
  want = np_conv(x, sd["features.0.weight"], sd["features.0.bias"], pad=1)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
  config.pretrained.vggish = write_pth(tmp_path / "not.pth",
                                       official_pvt_v2("b0"))
  with pytest.raises(ConversionError, match=r"not\.pth: not a VGGish"):
    pretrained.load_pretrained(config, before)


def test_no_pretrained_fields_is_identity():
  config = config_with("pvt2")
  v = {"params": {"a": np.ones(2)}}
  assert pretrained.load_pretrained(config, v) is v


# ------------------------------------------------- released checkpoint CLI --
def flax_to_torch(variables, config=None):
  """The original's state dict for a tiny pvt2 model's variables, less what
  the original holds but never uses (export_pth, tests/test_export_pth.py)."""
  sd = export_pth.state_dict(variables, config or config_with("pvt2"))
  return {k: v for k, v in sd.items() if not convert.is_known_unused(k)}


def test_convert_cli_writes_an_export_that_loads_back(tmp_path, capsys):
  config = config_with("pvt2")
  rng = np.random.default_rng(5)
  want = jax.tree_util.tree_map(
      lambda z: rng.standard_normal(z.shape, np.float32) * np.float32(0.02),
      zeros_like_model(config))
  sd = flax_to_torch(want)
  sd["head.fpn.0.weight"] = np.zeros((4, 4), np.float32)   # known unused
  pth = write_pth(tmp_path / "released.pth", sd, prefix="module.")
  out = tmp_path / "export"
  cfg = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
  with pytest.raises(SystemExit) as e:
    pretrained.cli_main(["convert", f"--config={cfg}:pvt2",
                         f"--checkpoint={pth}", f"--out={out}"])
  assert e.value.code == 0
  printed = capsys.readouterr().out
  assert f"used {len(sd) - 1} torch tensors" in printed
  assert "unused 1" in printed and "head.fpn.* (1)" in printed
  got = checkpoint.load_variables(out)
  assert not want.get("batch_stats") and not got["batch_stats"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, got["params"],
                         want["params"])
  # The export keeps the config it was converted with, as a workdir keeps
  # its run's: eval and predict compare theirs with it.
  assert run_config.changes(tiny.get_config("pvt2"), out) == []
  # Bad input: one clear line, exit status 1, no export written.
  evil = tmp_path / "evil.pth"
  evil.write_bytes(b"\x80\x02cposix\nsystem\nX\x02\x00\x00\x00ls\x85R.")
  with pytest.raises(SystemExit) as e:
    pretrained.cli_main(["convert", f"--config={cfg}:pvt2",
                         f"--checkpoint={evil}", f"--out={tmp_path / 'x'}"])
  assert "refusing global 'posix.system'" in str(e.value.code)
  assert not (tmp_path / "x").exists()


def test_checkpoint_config_mismatches_are_named(tmp_path):
  res50_ckpt = {"backbone.conv1.weight": np.zeros((64, 3, 7, 7), np.float32),
                "head.fc.4.weight": np.zeros((71, 32, 1, 1), np.float32)}
  path = write_pth(tmp_path / "avss_res50.pth", res50_ckpt)
  with pytest.raises(ConversionError, match=r"avss_res50\.pth: holds a res50 "
                     r"AVSegFormer.*'pvt2' \(use --config=\.\.\.:res50\)"):
    pretrained.load_checkpoint(path, config_with("pvt2"))
  with pytest.raises(ConversionError, match="predicts 71 classes, the config "
                     "1"):
    pretrained.load_checkpoint(path, config_with("res50"))


def test_our_checkpoint_as_pretrained_in_the_other_layout(tmp_path):
  """`pretrained.checkpoint` also takes our exports and workdirs (fine-tune,
  or a run with another batch size), stacked layers (model.scan_layers)
  going into unrolled ones: each layer where the converter, whose stacking
  gives the same outputs (test_convert), puts the original's."""
  rng = np.random.default_rng(3)
  want = jax.tree_util.tree_map(
      lambda z: rng.standard_normal(z.shape, np.float32),
      zeros_like_model(config_with("pvt2")))
  scanned = config_with("pvt2", scan_layers=True)
  stacked = convert.torch_to_flax(flax_to_torch(want), scanned)
  assert "layers" in stacked["params"]["head"]["transformer"]["encoder"]
  checkpoint.save_variables(tmp_path / "export", stacked)
  run_config.save(scanned, tmp_path / "export")    # as a workdir has
  c = config_with("pvt2")
  c.pretrained.checkpoint = str(tmp_path / "export")
  got = pretrained.load_pretrained(c, zeros_like_model(c))
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(
      want)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  # A model with another depth is refused, by name.
  c = config_with("pvt2", num_decoder_layers=2)
  c.pretrained.checkpoint = str(tmp_path / "export")
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"export: does not fit the config: \d+ missing "
                     r"\(params/head/transformer/decoder/layers_1/.*\)\. Its "
                     r"run had model.num_decoder_layers=1 \(this config: 2\)\. "
                     r"Pass the config it was trained with "
                     r"\(--config=configs/run.py:.*/export takes it\)\.$"):
    pretrained.load_pretrained(c, jax.tree_util.tree_map(
        lambda s: np.zeros(s.shape, s.dtype),
        avsegformer.variable_shapes(avsegformer.build_model(c))))


def test_eval_and_predict_read_a_released_pth(tmp_path):
  """`--mode=eval` and `predict` take a released `.pth` as it is (converted
  on the fly, as `convert` would) and name a checkpoint that is not there."""
  config = config_with("pvt2")
  rng = np.random.default_rng(7)
  want = jax.tree_util.tree_map(
      lambda z: rng.standard_normal(z.shape, np.float32),
      zeros_like_model(config))
  pth = write_pth(tmp_path / "released.pth", flax_to_torch(want),
                  prefix="module.")
  got = pretrained.load_model_variables(str(pth), config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got["params"],
                         want["params"])
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"nope\.pth: no such checkpoint"):
    pretrained.load_model_variables(str(tmp_path / "nope.pth"), config)
  with pytest.raises(ConversionError, match=r"released\.pth: holds a pvt2 "):
    pretrained.load_model_variables(str(pth), config_with("res50"))


def test_a_run_from_random_weights_is_told():
  """The original starts from ImageNet backbone weights and VGGish's, and
  never trains VGGish: a real run without them cannot reach the published
  scores, and nothing else fails. The demo's synthetic set means to."""
  from configs import demo, s4  # pylint: disable=g-import-not-at-top
  c = s4.get_config("pvt2")
  assert pretrained.random_start_note(c).startswith(
      "pretrained.backbone and pretrained.vggish not set: this run starts "
      "the visual backbone from random weights (the original starts from "
      "ImageNet's) and VGGish from random weights, which it never trains")
  c.pretrained.backbone = "pvt_v2_b5.pth"
  assert pretrained.random_start_note(c).startswith(
      "pretrained.vggish not set: this run starts VGGish from random")
  c.pretrained.vggish = "vggish.pth"
  assert pretrained.random_start_note(c) == ""
  c.pretrained.backbone = c.pretrained.vggish = ""
  c.pretrained.checkpoint = "released.pth"       # the whole model
  assert pretrained.random_start_note(c) == ""
  assert pretrained.random_start_note(demo.get_config()) == ""
