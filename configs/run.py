"""The config a checkpoint was made with: its run's, or its conversion's.

  python main.py --config=configs/run.py:/runs/s4 --workdir=/runs/s4_eval \\
      --mode=eval --checkpoint=/runs/s4 --split=test
  python -m avsegformer_jax.predict --config=configs/run.py:/runs/s4 \\
      --checkpoint=/runs/s4 --video=clip.mp4 --out=/tmp/pred

The argument is a training workdir (its WORKDIR/config.json: the last run's
config, overrides included), one of its steps, a model export of `convert`,
or a config.json itself; overrides apply on top as with any config
(`--config.eval.batch_size=8`). Fields this version does not have are left
out and named.
"""
from avsegformer_jax import run_config


def get_config(arg=None):
  if not arg:
    raise OSError("give the checkpoint whose config to take: "
                  "--config=configs/run.py:WORKDIR (or an export, a step, "
                  "a config.json)")
  return run_config.load(arg)[0]
