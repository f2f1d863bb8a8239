"""PyTorch weights into the Flax model: released checkpoints and the
pretrained parts the original starts training from.

* `python -m avsegformer_jax.convert --config=configs/s4.py:pvt2
  --checkpoint=FILE.pth --out=DIR` turns a released AVSegFormer `.pth` (the
  original model's state_dict) into an orbax checkpoint of model variables
  that `main.py --mode=eval` and `predict` read, and reports which torch keys
  it used and which it knowingly dropped (convert.KNOWN_UNUSED). With
  `--out=FILE.pth` it goes back: any checkpoint of the model -> the
  original's state dict (export_pth).
* `load_pretrained(config, variables)` applies `config.pretrained`:
  - `checkpoint`: a released AVSegFormer `.pth`, or one of ours (an export,
    a workdir's best checkpoint, or WORKDIR/checkpoints/<step>): every
    variable replaced (fine-tuning, or a run with another batch size).
    `load_model_variables` reads the same for `--mode=eval` and `predict`;
  - `backbone`: torchvision's ImageNet ResNet-50 (`conv1`, `bn1`,
    `layer1..4` with `downsample`; the original's B2_ResNet copies `layerN`
    into both of its branches, the port holds only branch 1, `layerN_1`), or
    an official PVTv2 B0-B5 file (`patch_embed1.proj`, `block1.0.norm1`, ...,
    `norm1..4`; the classifier `head.*` is dropped);
  - `vggish`: torchvggish's `vggish-10086976.pth` (`features.N`,
    `embeddings.N`).
  The files are read by torch_io (no torch, no code from the file).
"""
from __future__ import annotations

import collections
import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from absl import logging

from avsegformer_jax import (avsegformer, checkpoint, convert, errors, files,
                             run_config, torch_io, xla_cpu)
from avsegformer_jax.convert import ConversionError

_BN_COUNTER = re.compile(r".*\.num_batches_tracked$")
RESNET_UNUSED = (re.compile(r"^fc\."), re.compile(r"^layer[34]_2\."),
                 _BN_COUNTER)
PVT_UNUSED = (re.compile(r"^head\."), _BN_COUNTER)
VGGISH_UNUSED = (re.compile(r"^pproc\."),)


def resnet_torchvision_names(sd: Mapping[str, Any]) -> dict[str, Any]:
  """torchvision ResNet-50 names -> B2_ResNet branch 1 (layer3 -> layer3_1).

  A B2_ResNet state dict (already `layer3_1`, `layer3_2`) passes unchanged.
  """
  return {re.sub(r"^layer([34])\.", r"layer\1_1.", k): v
          for k, v in sd.items()}


def _file_kind(sd: Mapping[str, Any]) -> str:
  if any(k.startswith("patch_embed1.") for k in sd):
    return "pvt2"
  if "conv1.weight" in sd and any(k.startswith("layer1.") for k in sd):
    return "res50"
  if any(k.startswith("features.") for k in sd):
    return "vggish"
  if any(k.startswith(("backbone.", "head.")) for k in sd):
    return "avsegformer"
  return "unknown"


def _load_into(variables, module: str, sd, path: str, unused,
               what: str):
  """variables with every leaf under `module` replaced from `sd` (strict)."""
  target = {col: tree[module] for col, tree in variables.items()
            if isinstance(tree, Mapping) and module in tree}
  if not target:
    raise ConversionError(f"the model has no '{module}' variables to load "
                          f"{path} into")
  try:
    loaded, report = convert.map_state_dict(sd, target, unused=unused)
  except ConversionError as e:
    raise ConversionError(f"{path} ({what}): {e}") from None
  out = {col: dict(tree) for col, tree in variables.items()}
  for col, tree in loaded.items():
    out[col][module] = _like(tree, variables[col][module])
  logging.info("%s: loaded %d tensors from %s into %s (%d dropped: %s)",
               what, len(report["used"]), path, module, len(report["unused"]),
               summarize_unused(report["unused"], unused))
  return out, report


def _like(new, old):
  """`new` (numpy) with the dtypes of `old` as jax arrays."""
  return jax.tree_util.tree_map(
      lambda n, o: jnp.asarray(n, dtype=o.dtype), new, old)


def load_backbone(path: str, config, variables):
  """ImageNet ResNet-50 (torchvision) or official PVTv2 weights."""
  mc = config.model
  sd = torch_io.load_state_dict(path)
  kind = _file_kind(sd)
  if kind != mc.backbone:
    raise ConversionError(
        f"{path}: looks like a {kind} state dict, but model.backbone is "
        f"{mc.backbone!r} (pretrained.backbone must match it)")
  if kind == "res50":
    return _load_into(variables, "backbone", resnet_torchvision_names(sd),
                      path, RESNET_UNUSED, "ResNet-50")
  return _load_into(variables, "backbone", sd, path, PVT_UNUSED,
                    f"PVTv2-{mc.pvt_variant.upper()}")


def load_vggish(path: str, variables):
  """torchvggish's AudioSet weights (vggish-10086976.pth)."""
  sd = torch_io.load_state_dict(path)
  if _file_kind(sd) != "vggish":
    raise ConversionError(f"{path}: not a VGGish state dict (no 'features.*' "
                          f"keys; first keys: {list(sd)[:4]})")
  ours = variables["params"]["vggish"]["embeddings_0"]["kernel"].shape[-1]
  theirs = getattr(sd.get("embeddings.0.weight"), "shape", (ours,))[0]
  if theirs != ours:
    raise ConversionError(f"{path}: VGGish's hidden FCs are {theirs} wide, "
                          f"the model's {ours} (model.vggish_fc_dim)")
  return _load_into(variables, "vggish", sd, path, VGGISH_UNUSED, "VGGish")


def load_checkpoint(path: str, config):
  """(variables, report) of a released AVSegFormer `.pth` for `config`."""
  sd = torch_io.load_state_dict(path)
  _check_checkpoint_fits(sd, config, path)
  try:
    return convert.torch_to_flax(sd, config, return_report=True)
  except ConversionError as e:
    mc = config.model
    raise ConversionError(
        f"{path}: does not fit model.backbone={mc.backbone!r}"
        f"{' ' + mc.pvt_variant if mc.backbone == 'pvt2' else ''}, "
        f"num_classes={mc.num_classes}: {e}") from None


def _check_checkpoint_fits(sd, config, path):
  """Name the config/checkpoint mismatches people make (backbone, task)."""
  mc = config.model
  kind = ("res50" if "backbone.conv1.weight" in sd else
          "pvt2" if "backbone.patch_embed1.proj.weight" in sd else None)
  if kind and kind != mc.backbone:
    raise ConversionError(
        f"{path}: holds a {kind} AVSegFormer, but the config's "
        f"model.backbone is {mc.backbone!r} (use --config=...:{kind})")
  final = sd.get("head.fc.4.weight")
  if final is not None and final.shape[0] != mc.num_classes:
    raise ConversionError(
        f"{path}: predicts {final.shape[0]} classes, the config "
        f"{mc.num_classes} (S4/MS3 checkpoints: 1, AVSS: 71; pick the "
        "matching configs/<task>.py)")


def read_model_variables(path: str, config, shapes=None):
  """(variables, what they were read from) for `config` from any checkpoint
  of the model: our export, workdir (its best: the source names the step)
  or WORKDIR/checkpoints/<step>, fitted to the config's layout
  (`checkpoint.fit_variables`), or a released `.pth`, converted on the fly.
  `shapes`: the config's variables or their shapes, if the caller has
  them."""
  if files.is_dir(path):
    if shapes is None:
      shapes = avsegformer.variable_shapes(avsegformer.build_model(config))
    hint = run_config.model_changes(run_config.changes(config, path))
    variables, source = checkpoint.read_variables(path)
    return checkpoint.fit_variables(
        variables, shapes, source,
        hint and hint + "Pass the config it was trained with "
        f"(--config=configs/run.py:{path} takes it)."), source
  if not files.exists(path):
    raise checkpoint.CheckpointError(f"{path}: no such checkpoint")
  variables, report = load_checkpoint(path, config)
  logging.info("converted %d tensors of %s (%d known unused)",
               len(report["used"]), path, len(report["unused"]))
  return variables, files.absolute(path)


def load_model_variables(path: str, config, shapes=None):
  """`read_model_variables`' variables alone."""
  return read_model_variables(path, config, shapes)[0]


def load_pretrained(config, variables):
  """`variables` with config.pretrained.{checkpoint, backbone, vggish}
  applied, in that order (so an explicit backbone / vggish file overrides the
  checkpoint's). Empty fields leave the variables as they are."""
  p = config.get("pretrained") or {}
  if p.get("checkpoint"):
    loaded = load_model_variables(p.checkpoint, config, variables)
    variables = {col: _like(loaded[col], variables[col]) if col in loaded
                 else variables[col] for col in variables}
  if p.get("backbone"):
    variables, _ = load_backbone(p.backbone, config, variables)
  if p.get("vggish"):
    variables, _ = load_vggish(p.vggish, variables)
  return variables


def random_start_note(config) -> str:
  """A new run's warning where it starts from random weights the original
  loads ("" if it loads them, or on the synthetic set: the demo and tests
  mean to). VGGish is never trained, so without its weights the audio
  features stay random projections for the whole run: far below the
  published scores, and without an error."""
  p = config.pretrained
  if p.get("checkpoint") or config.data.get("synthetic", {}).get("enabled"):
    return ""
  starts = {"backbone": "the visual backbone from random weights (the "
                        "original starts from ImageNet's)",
            "vggish": "VGGish from random weights, which it never trains "
                      "(the audio features stay random)"}
  unset = [k for k in starts if not p.get(k)]
  if not unset:
    return ""
  return (" and ".join(f"pretrained.{k}" for k in unset) + " not set: this "
          "run starts " + " and ".join(starts[k] for k in unset) + "; give "
          "the .pth files (README: pretrained backbones) or "
          "pretrained.checkpoint")


def summarize_unused(keys, patterns=convert.KNOWN_UNUSED) -> str:
  """'head.fpn.* (12), ...': unused keys counted by the pattern they match."""
  counts = collections.Counter()
  for k in keys:
    pat = next((p.pattern for p in patterns if p.match(k)), "other")
    counts[_glob(pat)] += 1
  return ", ".join(f"{p} ({n})" for p, n in counts.items()) or "none"


def _glob(pattern: str) -> str:
  r"""A KNOWN_UNUSED regex as a glob: '^head\.fpn\.' -> 'head.fpn.*'."""
  text = pattern.strip("^$")
  glob = text.replace("\\.", "\0").replace(".*", "*").replace("\0", ".")
  return glob + "*" if text.endswith("\\.") else glob


def format_report(report: Mapping[str, list], list_keys: bool = False) -> str:
  """Used keys counted by top-level module, unused ones by reason."""
  used = collections.Counter(k.split(".", 1)[0] for k in report["used"])
  lines = [f"used {len(report['used'])} torch tensors: "
           + ", ".join(f"{m} {n}" for m, n in sorted(used.items())),
           f"unused {len(report['unused'])} (held by the original, never "
           f"used for its outputs): {summarize_unused(report['unused'])}"]
  if report.get("unknown"):
    lines.append(f"unknown {len(report['unknown'])}: {report['unknown']}")
  if list_keys:
    lines += [f"  used    {k}" for k in report["used"]]
    lines += [f"  unused  {k}" for k in report["unused"]]
  return "\n".join(lines)


def convert_checkpoint(config, checkpoint: str, out: str) -> dict:
  """Released `.pth` -> orbax checkpoint at `out`; returns the key report."""
  from avsegformer_jax import checkpoint as ckpt
  variables, report = load_checkpoint(checkpoint, config)
  mc = config.model
  info = {"source": os.path.abspath(checkpoint), "task": config.get("task"),
          "backbone": mc.backbone,
          "pvt_variant": mc.pvt_variant if mc.backbone == "pvt2" else None,
          "num_classes": mc.num_classes}
  ckpt.save_variables(files.absolute(out), variables, info=info,
                     config=config)
  return report


def _define_flags():
  from absl import flags
  if "config" in flags.FLAGS:        # a second in-process call (tests)
    return
  errors.define_config_flag("Model config, e.g. configs/s4.py:pvt2 (for "
                            "--out=FILE.pth, default: the checkpoint's own).")
  flags.DEFINE_string("checkpoint", None,
                      "A released AVSegFormer .pth; with --out=FILE.pth any "
                      "checkpoint of the model (export, workdir, step).")
  flags.DEFINE_string("out", None,
                      "Directory for the orbax checkpoint, or FILE.pth: the "
                      "original's state dict (export_pth).")
  flags.DEFINE_bool("list_keys", False, "Print every used / unused key.")
  flags.mark_flags_as_required(["checkpoint", "out"])


def _run(argv) -> int | str:
  from absl import flags
  if len(argv) > 1:
    return f"convert: unexpected arguments {argv[1:]}"
  f = flags.FLAGS
  if not f["verbosity"].present:       # orbax's INFO lines only with --v=0
    logging.set_verbosity(logging.WARNING)
  to_pth = f.out.endswith((".pth", ".pt"))
  config = f.config
  if config is None and not to_pth:
    return ("convert: --config is needed to convert a released .pth (it "
            "holds none), e.g. --config=configs/s4.py:pvt2")
  try:                               # ours -> .pth: the checkpoint's own
    config = config or run_config.own_config(f.checkpoint)
  except errors.InputError as e:
    return f"convert: {e}"
  if not to_pth and files.is_dir(f.checkpoint):
    return (f"convert: {f.checkpoint}: a directory, and --out=DIR takes a "
            "released .pth; to write a checkpoint of ours in the original's "
            "format, give --out=FILE.pth")
  try:
    if to_pth:
      from avsegformer_jax import export_pth
      done = export_pth.export(config, f.checkpoint, f.out)
    else:
      report = convert_checkpoint(config, f.checkpoint, f.out)
  except OSError as e:                # a full disk names no file itself
    return f"convert: {e if e.filename else f'{f.out}: {e.strerror or e}'}"
  except (torch_io.TorchFileError, ConversionError,
          checkpoint.CheckpointError) as e:
    return f"convert: {e}"            # absl prints it and exits 1
  if to_pth:
    print(f"exported {f.checkpoint} -> {os.path.abspath(f.out)}: "
          f"{done['tensors']} tensors, the original's state dict "
          f"({done['unused_zeros']} it holds but never uses, as zeros); "
          "in torch: torch.load with weights_only=True, then "
          "model.load_state_dict")
    return 0
  print(f"converted {f.checkpoint} -> {files.absolute(f.out)}")
  print(format_report(report, list_keys=f.list_keys))
  return 0


def cli_main(argv=None, run: Callable = _run):
  """Entry point of `python -m avsegformer_jax.convert`."""
  from absl import app
  xla_cpu.configure()
  _define_flags()
  app.run(run, argv=argv, flags_parser=errors.parse_flags)
