"""The converter's naming rule and its errors (every bad key is named)."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avsegformer_jax import convert
from avsegformer_jax.head import AVSegHead

sys.path.insert(0, "tests/reference")
from synth_weights import synth_state_dict  # noqa: E402


@pytest.fixture(scope="module")
def head_case():
  head = AVSegHead(num_classes=1)
  feats = [jnp.zeros((1, 16 // 2**i, 16 // 2**i, c))
           for i, c in enumerate((64, 128, 320, 512))]
  target = jax.eval_shape(lambda r: head.init(r, feats, jnp.zeros((1, 1, 256))),
                          jax.random.PRNGKey(0))
  sd = synth_state_dict("tests/reference/state_dict_s4_pvt2.tsv")
  sd = {k: v for k, v in sd.items() if k.startswith("head.")}
  return target, sd


def test_module_path_rule():
  assert convert.flax_module_path("backbone.layer1.0.conv1.weight") == (
      ("backbone", "layer1_0", "conv1"), "weight")
  assert convert.flax_module_path("head.in_proj.0.1.bias") == (
      ("head", "in_proj_0_1"), "bias")


def test_head_converts_and_transposes(head_case):
  target, sd = head_case
  v, report = convert.map_state_dict(sd, target, prefix="head.")
  assert not report["unknown"]
  assert sorted(report["unused"]) == sorted(
      k for k in sd if k.startswith(("head.fpn.", "head.attn_fc.")))
  p = v["params"]
  w = sd["head.transformer.decoder.layers.0.self_attn.in_proj_weight"]
  np.testing.assert_array_equal(
      p["transformer"]["decoder"]["layers_0"]["self_attn"]["k_proj"]["kernel"],
      w[256:512].T)
  np.testing.assert_array_equal(p["fc_0"]["kernel"],
                                sd["head.fc.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["mlp"]["layers_0"]["kernel"],
                                sd["head.mlp.layers.0.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(p["learnable_query"]["embedding"],
                                sd["head.learnable_query.weight"])


def test_wrong_shape_names_key_and_shapes(head_case):
  target, sd = head_case
  bad = dict(sd)
  bad["head.out_conv.0.weight"] = np.zeros((256, 256, 1, 1), np.float32)
  with pytest.raises(convert.ConversionError,
                     match=r"head\.out_conv\.0\.weight.*\(256, 256, 1, 1\).*"
                           r"\(3, 3, 256, 256\)"):
    convert.map_state_dict(bad, target, prefix="head.")


def test_unknown_key_is_named(head_case):
  target, sd = head_case
  bad = dict(sd, **{"head.extra_layer.weight": np.zeros((4, 4), np.float32)})
  with pytest.raises(convert.ConversionError, match=r"head\.extra_layer\.weight"):
    convert.map_state_dict(bad, target, prefix="head.")


def test_missing_key_is_named(head_case):
  target, sd = head_case
  bad = dict(sd)
  del bad["head.level_embed"]
  with pytest.raises(convert.ConversionError, match=r"level_embed"):
    convert.map_state_dict(bad, target, prefix="head.")


def test_scanned_layers_are_stacked_and_equal_unrolled(head_case):
  """nn.scan over layers: the converter stacks layers_i, outputs unchanged."""
  _, sd = head_case
  feats = [jax.random.normal(jax.random.PRNGKey(i), (2, 16 // 2**i, 16 // 2**i, c))
           for i, c in enumerate((64, 128, 320, 512))]
  audio = jax.random.normal(jax.random.PRNGKey(9), (2, 1, 256))
  outs = []
  for scan in (False, True):
    head = AVSegHead(num_classes=1, scan_layers=scan)
    target = jax.eval_shape(lambda r: head.init(r, feats, audio),
                            jax.random.PRNGKey(0))
    v, report = convert.map_state_dict(sd, target, prefix="head.")
    assert not report["unknown"]
    if scan:
      enc = v["params"]["transformer"]["encoder"]
      assert set(enc) == {"layers"}
      np.testing.assert_array_equal(
          enc["layers"]["norm1"]["scale"][5],
          sd["head.transformer.encoder.layers.5.norm1.weight"])
    with jax.default_matmul_precision("highest"):
      outs.append(jax.jit(head.apply)(v, feats, audio))
  np.testing.assert_allclose(outs[0][0], outs[1][0], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(outs[0][1], outs[1][1], atol=2e-5, rtol=1e-5)
