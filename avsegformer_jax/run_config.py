"""The config a checkpoint was made with, kept beside it.

A training workdir keeps its last run's config in WORKDIR/config.json, and a
model export (`convert`) the config it was converted with in DIR/config.json.
Why: most of a config does not show in the variables. A model trained at
224 px runs at 512 without an error, an MS3 model has the same variables as
an S4 one; resuming, evaluating or predicting with a config that differs from
the checkpoint's run gives other results without a word. So a resume logs the
fields that changed, a mismatch in shapes names the model fields behind it,
eval and predict warn about the fields that change their outputs, and
`--config=configs/run.py:PATH` (`load`) takes the run's config itself.
"""
from __future__ import annotations

import json
import sys
from typing import Any

from avsegformer_jax import files

FILE = "config.json"

# Model fields that change how it computes, not its variables.
COMPUTE_ONLY = ("dtype", "remat", "remat_policy", "scan_layers", "msda_impl",
                "attention_impl", "dropout_impl", "dropout",
                "attention_dropout", "drop_path")

# Fields outside the model that change its outputs for the same input: the
# task (S4 and MS3 models have the same variables), the resolution it sees
# and the window of frames its audio is aligned to.
OUTPUT_FIELDS = ("task", "data.image_size", "data.num_frames")


def save(config, directory) -> None:
  files.write_text(files.join(directory, FILE),
                   config.to_json_best_effort(indent=2, sort_keys=True))


def file_of(path) -> str:
  """The config.json of a workdir, one of its steps (WORKDIR/checkpoints/
  <step>, WORKDIR/best/<step>) or an export; a `.json` path as it is."""
  root = files.absolute(path).rstrip("/")
  if root.endswith(".json"):
    return root
  parent = root.rsplit("/", 2)
  if len(parent) == 3 and parent[1] in ("checkpoints", "best") and \
      parent[2].isdigit():
    root = parent[0]
  return files.join(root, FILE)


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def changes(config, path) -> list[tuple[str, Any, Any]]:
  """(field, its run's value, `config`'s) for each field where `config`
  differs from the run that made the checkpoint at `path`; [] without its
  config.json (a released `.pth`) or with one that is not ours."""
  saved = file_of(path)
  if not files.exists(saved):
    return []
  try:
    before = _flat(json.loads(files.read_text(saved)))
  except (ValueError, AttributeError):   # not ours, or cut short
    return []
  now = _flat(json.loads(config.to_json_best_effort()))
  return [(k, before.get(k, "unset"), now.get(k, "unset"))
          for k in sorted(set(before) | set(now))
          if before.get(k) != now.get(k)]


def _model_field(key: str) -> bool:
  return key.startswith("model.") and key[6:] not in COMPUTE_ONLY


def model_changes(diff) -> str:
  """The `model.*` fields of `changes` that shape the variables, as a
  sentence ("" if none)."""
  model = [f"{k}={a} (this config: {b})" for k, a, b in diff
           if _model_field(k)]
  return f"Its run had {'; '.join(model)}. " if model else ""


def output_changes(config, path) -> list[tuple[str, Any, Any]]:
  """The `changes` that change the model's outputs for the same input (the
  OUTPUT_FIELDS and the model's variable fields, which by now fit). A field
  the run's config lacks (a run of an earlier version) is not compared."""
  return [(k, a, b) for k, a, b in changes(config, path)
          if (k in OUTPUT_FIELDS or _model_field(k)) and a != "unset"]


def output_changes_note(path, diff) -> str:
  """`output_changes` as the sentence eval and predict warn with."""
  return (f"{path} was made with "
          + ", ".join(f"{k}={a}" for k, a, _ in diff) + "; this config has "
          + ", ".join(f"{k}={b}" for k, _, b in diff) + ". It runs with this "
          "config's settings, so its outputs are not those of the run that "
          f"made it; --config=configs/run.py:{path} takes that run's config")


def load(path, defaults=None):
  """`defaults` (a config with every field of ours, typed; by default
  configs/default.py's) with the values of the config.json of `path` (see
  `file_of`); OSError, naming the file, where it cannot be read or is not a
  config of ours. A field it has that `defaults` lacks (a field since
  removed) is left out, named on stderr and in `dropped`: returns (config,
  dropped)."""
  if str(path).endswith((".pth", ".pt")):
    raise OSError(f"{path}: a released .pth holds no config")
  if defaults is None:
    from configs import default  # pylint: disable=g-import-not-at-top
    defaults = default.get_config()
  file = file_of(path)
  try:
    flat = _flat(json.loads(files.read_text(file)))
  except FileNotFoundError:
    raise OSError(f"{file}: no such file (a training workdir, one of its "
                  "steps or a model export keeps its config there)") from None
  except (ValueError, AttributeError) as e:
    raise OSError(f"{file}: not a config written by avsegformer-jax "
                  f"({e})") from None
  dropped = []
  for key, value in flat.items():
    *groups, name = key.split(".")
    node = defaults
    for g in groups:
      node = node.get(g) if hasattr(node, "get") else None
    if not hasattr(node, "keys") or name not in node.keys():
      dropped.append(key)
      continue
    try:
      setattr(node, name, value)
    except (TypeError, ValueError) as e:
      raise OSError(f"{file}: {key}={value!r} does not fit the field "
                    f"({e})") from None
  if dropped:          # on stderr: absl's logging may not be set up yet
    print(f"{file}: fields this version does not have, left out: "
          f"{', '.join(dropped)}", file=sys.stderr)
  return defaults, dropped


def own_config(path, error=None):
  """Without --config (main.py, predict, convert): the config the workdir
  or checkpoint at `path` was made with, its file named on stdout. Where
  there is none, `error` (default errors.InputError) says so in one line."""
  from avsegformer_jax import errors  # pylint: disable=g-import-not-at-top
  try:
    config, _ = load(path)
  except OSError as e:
    raise (error or errors.InputError)(
        f"no --config given, and {e}; give one, e.g. "
        "--config=configs/s4.py:pvt2") from None
  print(f"config: {file_of(path)}", flush=True)
  return config
