"""Runs a tiny training in its own process, for the multi-device,
multi-process and kill-and-resume tests (XLA device flags must be set before
JAX starts).

  python tests/train_driver.py WORKDIR OUT.npz [--devices N] [--steps K]
      [--processes P --process_id I --coordinator HOST:PORT] [--visualize K]
      [--set model.scan_layers=True ...]

With --processes, P such processes (each with N CPU devices) form one JAX
cluster through `jax.distributed.initialize`, as `main.py --distributed`
does on a multi-host machine; process 0 writes OUT.npz.

Data is an in-memory AVSBench-shaped source (deterministic), so the test
needs no prepared dataset; the loop, checkpoints and iterator are the real
ones.
"""
import argparse
import ast
import os
import sys
import traceback


def tiny_config():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  c = tiny.get_config("pvt2")
  c.model.dropout = 0.0       # per-device RNG differs by design; the
  c.model.drop_path = 0.0     # device-count test compares deterministic runs
  c.data.image_size = 32
  c.data.num_frames = 2
  c.data.num_workers = 0
  c.train.batch_size = 4
  c.train.num_epochs = 2
  c.train.freeze_backbone_epochs = 1   # exercises the unfreeze on resume
  # The source supervises some later frames (different counts per device:
  # the global loss normalisation); the S4 first-frame path has its own test.
  c.train.first_frame_only = False
  c.train.learning_rate = 1e-3
  # Adam's first steps are sign descent (m/sqrt(v) = +-1): with eps 1e-8 a
  # gradient entry that is round-off-small (most of a random tiny backbone's)
  # moves by a full +-lr whichever way round-off tips it, so 1 and 4 devices
  # end up ~lr apart. With eps above those entries the update is linear in
  # the gradient and summation-order round-off stays round-off.
  c.train.adam_eps = 1e-3
  c.train.log_every_steps = 1
  c.checkpoint.every_steps = 1
  c.eval.batch_size = 4
  return c


def synthetic_source(n, t, size, seed):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rs = np.random.RandomState(seed)
  out = []
  for i in range(n):
    masks = (rs.rand(t, size, size, 1) > 0.6).astype(np.uint8)
    out.append(dict(
        frames=rs.randint(0, 255, (t, size, size, 3)).astype(np.uint8),
        masks=masks, log_mel=rs.randn(t, 96, 64).astype(np.float32),
        gt_flag=np.array([1] + [i % 2] * (t - 1), np.float32),
        vid_flag=np.ones(t, np.float32), clip_id=f"clip{i}".encode(),
        category=b"synthetic"))
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("workdir")
  p.add_argument("out")
  p.add_argument("--devices", type=int, default=1)
  p.add_argument("--steps", type=int, default=-1)
  p.add_argument("--processes", type=int, default=1)
  p.add_argument("--process_id", type=int, default=0)
  p.add_argument("--coordinator", default="")
  p.add_argument("--visualize", type=int, default=0,
                 help="then evaluate the best checkpoint, saving K clips")
  p.add_argument("--every_steps", type=int, default=1,
                 help="checkpoint.every_steps (epoch ends save too)")
  p.add_argument("--workers", type=int, default=0, help="data.num_workers")
  p.add_argument("--line_s", type=float, default=None,
                 help="progress.EVERY_S: seconds between progress lines")
  p.add_argument("--set", action="append", default=[],
                 help="FIELD=VALUE: a config override (a Python literal)")
  a = p.parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={a.devices}")
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from avsegformer_jax import avsegformer, checkpoint, progress, trainer  # pylint: disable=g-import-not-at-top
  if a.processes > 1:
    import cluster_cache  # pylint: disable=g-import-not-at-top
    cluster_cache.enable()      # (process 1's programs cached too)
    jax.distributed.initialize(a.coordinator, a.processes, a.process_id)
  assert jax.process_count() == a.processes, jax.process_count()
  assert jax.device_count() == a.devices * a.processes, jax.devices()
  if a.line_s is not None:
    progress.EVERY_S = a.line_s
  c = tiny_config()
  c.train.max_steps = a.steps
  c.checkpoint.every_steps = a.every_steps
  c.data.num_workers = a.workers
  for item in a.set:
    field, value = item.split("=", 1)
    c.update_from_flattened_dict({field: ast.literal_eval(value)})
  sources = {"train": synthetic_source(10, 2, 40, 0),
             "validation": synthetic_source(6, 2, 40, 1)}
  res = trainer.train_and_evaluate(c, a.workdir, source_fn=sources.get)
  extra = {}
  if a.visualize:
    c.eval.num_visualize = a.visualize
    ev = trainer.evaluate_checkpoint(c, a.workdir, a.workdir, "validation",
                                     source=sources["validation"])
    extra = {"eval_" + k: ev[k] for k in ("miou", "fscore", "miou_dataset")}
  # In the layout of the tiny config's model (unrolled layers), whatever
  # model.scan_layers the run had.
  v = checkpoint.fit_variables(
      checkpoint.load_variables(a.workdir, prefer="latest"),
      avsegformer.variable_shapes(avsegformer.build_model(tiny_config())),
      a.workdir)
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_leaves_with_path(v["params"])}
  if jax.process_index() == 0:
    np.savez(a.out, miou=res["miou"], fscore=res["fscore"],
             miou_dataset=res["miou_dataset"], **extra, **flat)


if __name__ == "__main__":
  try:
    main()
  except BaseException as e:  # pylint: disable=broad-except
    if type(e).__name__ == "Preempted":    # a SIGTERM test: no traceback
      print(e, file=sys.stderr)
      sys.stderr.flush()
      os._exit(e.status)
    # Exit now: a failed process of a JAX cluster would otherwise wait
    # minutes at the distributed shutdown barrier for the others.
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
