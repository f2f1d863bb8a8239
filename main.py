"""Train or evaluate AVSegFormer.

  python main.py --config=configs/s4.py:pvt2 --workdir=/tmp/s4           # train
  python main.py --config=configs/s4.py --workdir=W --mode=eval \\
      --checkpoint=DIR --split=test                                       # eval
  python main.py --workdir=W --mode=eval --split=test  # eval, W's config
  python main.py --config=configs/demo.py --workdir=/tmp/demo             # demo

Every config field can be overridden, e.g. `--config.train.batch_size=4`.
Running the same train command again resumes from the workdir's latest
checkpoint. Multi-host: add `--distributed` (see launch/).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys

from absl import app, flags, logging

from avsegformer_jax import compile_cache, errors  # no JAX import yet

_CONFIG = errors.define_config_flag(
    "Config file: configs/<task>.py:<backbone>, or configs/run.py:WORKDIR "
    "(a run's own config; without --config, the config of the workdir's run "
    "is taken to resume it, and for eval that of --checkpoint or the "
    "workdir).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs, results.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "What to do.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "eval: a training workdir (its best checkpoint), "
    "WORKDIR/checkpoints/<step>, a converted export or a released .pth "
    "(default: --workdir).")
_SPLIT = flags.DEFINE_string("split", None, "eval split (default: the "
                             "config's data.eval_split).")
_SHUFFLED = flags.DEFINE_bool(
    "shuffle_audio", False, "eval: give every clip another clip's audio (the "
    "control showing what the model takes from sound).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (multi-host "
    "GPU/TPU; the coordinator is found from SLURM / TPU / env variables).")
_XLA_CACHE = flags.DEFINE_string(
    "xla_cache_dir", compile_cache.DEFAULT_DIR, "Persistent compilation "
    "cache: compiled steps are kept here and reused by later runs (empty: "
    "off; $JAX_COMPILATION_CACHE_DIR wins).")
flags.mark_flags_as_required(["workdir"])


def _demo_data(config, workdir):
  """The synthetic AVSBench, written and prepared into the workdir once (by
  process 0 of a multi-process run, while the others wait for it); not
  written again where `data.data_dir` holds it prepared (an evaluation of
  the demo's run in another workdir)."""
  from avsegformer_jax import multihost  # pylint: disable=g-import-not-at-top
  from datasets.avsbench import prepare, synthesize  # pylint: disable=g-import-not-at-top
  s = config.data.synthetic
  raw = os.path.join(workdir, "synthetic_raw")
  config.data.data_dir = config.data.data_dir or os.path.join(workdir, "tfds")

  def write():
    if not prepare.is_prepared(config.task, config.data.data_dir):
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      tfds.display_progress_bar(sys.stderr.isatty())  # no bars into a log
      synthesize.synthesize(config.task, raw, num_videos=s.num_videos,
                            seed=s.seed, size=s.size)
      prepare.prepare(config.task, raw, config.data.data_dir)

  multihost.on_process0("demo data", write)   # however long it takes


def main(argv):
  """Bad input (a missing dataset or checkpoint, a diverged loss) or a full
  disk ends with one line naming it and status 2, not a traceback; a
  preemption notice (SIGTERM), a first Ctrl-C or a hangup (SIGHUP) in
  training with a saved checkpoint and status 143, 130 or 129."""
  try:
    _main(argv)
  except errors.ReportedError as e:
    errors.exit_with("main.py", e)
  except errors.Preempted as e:
    print(f"main.py: {e}", file=sys.stderr)
    raise SystemExit(e.status) from None
  except KeyboardInterrupt:    # a second Ctrl-C, or one outside the loop
    errors.exit_interrupted("main.py", "a training run resumes from its last "
                            "checkpoint with the same command")
  except Exception as e:  # pylint: disable=broad-except
    errors.exit_if_disk_full(
        "main.py", _WORKDIR.value, e, "run the same command again (a "
        "training run resumes from its last checkpoint)")
    raise


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from avsegformer_jax import xla_cpu  # pylint: disable=g-import-not-at-top
  xla_cpu.configure()                  # before JAX starts its CPU backend
  if not flags.FLAGS["verbosity"].present:
    # orbax logs ~50 INFO lines per checkpoint save; the progress bar and the
    # per-epoch line are printed. --verbosity=0 brings the INFO logs back.
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  compile_cache.enable(_XLA_CACHE.value)
  if _DISTRIBUTED.value:
    jax.distributed.initialize()
  from avsegformer_jax import checkpoint, files, run_config, trainer  # pylint: disable=g-import-not-at-top
  workdir = _WORKDIR.value
  config = _CONFIG.value or run_config.own_config(
      _CHECKPOINT.value or workdir if _MODE.value == "eval" else workdir)
  logging.info("JAX process %d/%d, devices: %s", jax.process_index(),
               jax.process_count(), jax.devices())
  # Bad settings and inputs before the demo's data is written for nothing.
  trainer.check_config(config, training=_MODE.value == "train")
  source = _CHECKPOINT.value or workdir
  if _MODE.value == "eval" and not files.exists(source):
    raise checkpoint.CheckpointError(f"{source}: no such checkpoint")
  files.make_output_dir(workdir, "the workdir")
  training = _MODE.value == "train"
  try:
    _run(config, workdir, source, training)
  except RuntimeError as e:     # XLA's, through jit: what to change instead
    oom = errors.out_of_memory(e, trainer.memory_advice(config, training))
    if oom is None:
      raise
    raise oom from None


def _run(config, workdir, source, training):
  from avsegformer_jax import terminal, trainer  # pylint: disable=g-import-not-at-top
  # One run at a time in a workdir, from its demo data on.
  with trainer.exclusive(workdir) if training else contextlib.nullcontext():
    with config.unlocked():
      if config.data.get("synthetic") and config.data.synthetic.enabled:
        _demo_data(config, workdir)
    res = trainer.train_and_evaluate(config, workdir) if training else None
  if training and not config.eval.get("shuffled_audio_control"):
    print(json.dumps(res, indent=2))
    return
  # Evaluations have nothing to save midway: a hangup leaves them going.
  with terminal.survive_hangup():
    if training:
      _control(config, workdir)
    else:
      split = _SPLIT.value or config.data.eval_split
      res = trainer.evaluate_checkpoint(config, workdir, source, split,
                                        shuffle_audio=_SHUFFLED.value)
      print(json.dumps({k: v for k, v in res.items()
                        if not k.endswith(("per_class", "per_category"))},
                       indent=2))


def _control(config, workdir):
  """Scores the best checkpoint with true and with shuffled audio."""
  from avsegformer_jax import files, trainer  # pylint: disable=g-import-not-at-top
  split = config.data.eval_split
  true = trainer.evaluate_checkpoint(config, workdir, workdir, split)
  shuf = trainer.evaluate_checkpoint(config, workdir, workdir, split,
                                     shuffle_audio=True)
  print(f"\n{split} mIoU with the true audio:     {true['miou']:.4f} "
        f"(F {true['fscore']:.4f})\n{split} mIoU with shuffled audio:     "
        f"{shuf['miou']:.4f} (F {shuf['fscore']:.4f})\n"
        f"gap (what the model takes from sound): "
        f"{true['miou'] - shuf['miou']:+.4f}")
  files.write_text(files.join(workdir, "audio_control.json"), json.dumps(
      {"true_audio": true, "shuffled_audio": shuf}, indent=2))


if __name__ == "__main__":
  app.run(main, flags_parser=errors.parse_flags)
