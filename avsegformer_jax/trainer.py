"""The training loop around the steps of `train.py`, and the evaluation of a
checkpoint (`evaluation.py` scores a split).

One loop for every task: an iterator over all epochs (step s trains on its
batch s, so the step is the data position), the backbone unfrozen when its
frozen epochs end, validation at the end of each epoch, orbax checkpoints
every `checkpoint.every_steps`, at epoch ends and on SIGTERM, and a resume
from the latest one when the workdir already has checkpoints.
"""
from __future__ import annotations

import contextlib
import json
import math
import time

import jax
from absl import logging

from avsegformer_jax import (avsegformer, checkpoint, errors, evaluation,
                             files, losses, multihost, progress, run_config,
                             run_log, train)


class NonFiniteLossError(errors.ReportedError, RuntimeError):
  pass


def _is_main():
  return jax.process_index() == 0


def initial_variables(config, model, rng, with_pretrained: bool = True):
  """Random init, then the pretrained weights the config names (if any and
  `with_pretrained`: a resumed run needs, and may no longer have, none of
  those files)."""
  variables = avsegformer.init_variables(model, rng,
                                         min(config.data.image_size, 64))
  p = config.pretrained
  if with_pretrained and (p.backbone or p.vggish or p.checkpoint):
    from avsegformer_jax import pretrained  # pylint: disable=g-import-not-at-top
    variables = pretrained.load_pretrained(config, variables)
  return variables


def _check_finite(pending, step):
  for s, stats in pending:
    loss = float(stats["loss"])
    if not math.isfinite(loss):
      raise NonFiniteLossError(
          f"non-finite loss {loss} at step {s}; stopped. The last good "
          f"checkpoint (before step {step}) is kept; lower the learning rate "
          "or use float32 (model.dtype) and resume from it.")


def _start_anew(workdir, step) -> str:
  return ("start a new workdir from these weights: "
          "--config.pretrained.checkpoint="
          f"{files.join(workdir, 'checkpoints', str(step))}")


def _resume_hint(changes, workdir, step) -> str:
  return (run_config.model_changes(changes) + "Resume with the config it "
          f"was trained with (--config=configs/run.py:{workdir}), or "
          f"{_start_anew(workdir, step)}")


def _check_batch(meta, global_batch, accum, workdir, step):
  """A step counts batches (the data position, the epochs, the schedule):
  another train.batch_size cannot resume the run, nor another
  train.grad_accum_steps (its optimizer state holds the gradients summed
  so far)."""
  before = meta.get("global_batch")    # in checkpoints since 2026-11-28
  if before is not None and before != global_batch:
    raise errors.InputError(
        f"{workdir}: its run trains {before} clips per step (train."
        f"batch_size), this config {global_batch}: resume with "
        f"--config.train.batch_size={before}, or "
        f"{_start_anew(workdir, step)}")
  before = meta.get("grad_accum_steps", 1)
  if before != accum:
    raise errors.InputError(
        f"{workdir}: its run averages the gradients of {before} step(s) per "
        f"update (train.grad_accum_steps), this config {accum}: resume with "
        f"--config.train.grad_accum_steps={before}, or "
        f"{_start_anew(workdir, step)}")


def check_config(config, training: bool) -> None:
  """The model's and inputs' settings (`avsegformer.check_config`) and, to
  train, the run's: each bad one a ConfigError before any work."""
  avsegformer.check_config(config, jax.default_backend())
  t = config.train
  if training:
    losses.check_loss(t.loss, config.task)
    train.prng_impl(config)
  given = [("eval.batch_size", config.eval.batch_size, 1)]
  if training:
    given += [("train.batch_size", t.batch_size, 1),
              ("train.grad_accum_steps", t.get("grad_accum_steps", 1), 1),
              ("train.num_epochs", t.num_epochs, 1),
              ("train.log_every_steps", t.log_every_steps, 1),
              ("checkpoint.every_steps", config.checkpoint.every_steps, 1),
              # 0 kept no checkpoint at all: nothing to resume or evaluate
              ("checkpoint.keep", config.checkpoint.keep, 1)]
    # Negative: silently a weight growth or a loss term trained the wrong way
    given += [(f"train.{f}", t[f], 0) for f in (
        "weight_decay", "iou_loss_weight", "mix_loss_weight",
        "freeze_backbone_epochs")]
  for field, value, least in given:
    if value < least:
      raise errors.ConfigError(f"{field} must be at least {least}, got "
                               f"{value}")
  if training and t.get("first_frame_only") and config.task != "s4":
    # Only frame 0 is loaded or scored then: MS3's and AVSS's labels of the
    # other frames were dropped without a word (--config.task=ms3 on S4's).
    raise errors.ConfigError(
        f"train.first_frame_only is for S4 (its training clips label frame "
        f"0 only); task {config.task!r} labels every frame: set --config."
        f"train.first_frame_only=False (configs/{config.task}.py does)")
  if training and t.batch_size % jax.device_count():
    raise errors.ConfigError(
        f"train.batch_size={t.batch_size} does not split evenly over the "
        f"{jax.device_count()} devices: give a multiple of "
        f"{jax.device_count()}")
  if training and not t.learning_rate > 0:
    raise errors.ConfigError(
        f"train.learning_rate must be > 0, got {t.learning_rate}")
  if training and not t.adam_eps > 0:   # 0: a zero second moment is inf
    raise errors.ConfigError(f"train.adam_eps must be > 0, got {t.adam_eps}")


def memory_advice(config, training: bool) -> str:
  """What to change when the device runs out of memory, from the settings
  not already at their lightest (AVSS PVTv2-B5 at 4 clips: ~34 GiB plain,
  13 GiB with remat, 8.4 GiB in bfloat16 with remat; README, Speed)."""
  m, tips = config.model, []
  batch = config.train.batch_size if training else config.eval.batch_size
  field = "train.batch_size" if training else "eval.batch_size"
  if batch > (jax.device_count() if training else 1):
    tips.append(f"a smaller --config.{field} (now {batch}"
                + (f", a multiple of the {jax.device_count()} devices; "
                   "--config.train.grad_accum_steps=K keeps K times that "
                   "many clips per update)" if training else ")"))
  if training and not m.remat:
    tips.append("--config.model.remat=True")
  if m.dtype == "float32":
    tips.append("--config.model.dtype=bfloat16")
  return ((f"try {', '.join(tips)}; " if tips else "")
          + "`python -m benchmarks.plan` prints a setting's memory plan "
          "without running it (README: Speed)")


def train_and_evaluate(config, workdir: str, source_fn=None) -> dict:
  """Trains with per-epoch validation; returns the last validation scores.

  `source_fn(split)` replaces the TFDS data sources (tests, demos). One run
  at a time trains in a workdir (`exclusive`).
  """
  check_config(config, training=True)
  files.makedirs(workdir)
  with exclusive(workdir):
    return _train_and_evaluate(config, workdir, source_fn)


@contextlib.contextmanager
def exclusive(workdir: str):
  """`files.exclusive(workdir)`, held by process 0; when it is refused,
  every process stops with its message."""
  with contextlib.ExitStack() as held:
    multihost.on_process0("workdir lock", lambda: held.enter_context(
        files.exclusive(workdir)))
    yield


def _train_and_evaluate(config, workdir: str, source_fn) -> dict:
  from datasets import input_pipeline  # pylint: disable=g-import-not-at-top
  mesh = train.make_mesh()
  multihost.connect(mesh)
  model = avsegformer.build_model(config, axis_name=train.AXIS)
  t = config.train
  accum = t.get("grad_accum_steps", 1)
  ckpt = checkpoint.Checkpointer(workdir, config.checkpoint.keep,
                                 config.checkpoint.keep_best)
  start = ckpt.latest_step() or 0
  changes = run_config.changes(config, workdir) if start else []
  if changes:
    logging.warning("resuming %s with settings its last run did not have: %s",
                    workdir, "; ".join(f"{k}: {a} -> {b}"
                                       for k, a, b in changes))
  if not start and _is_main():
    from avsegformer_jax import pretrained  # pylint: disable=g-import-not-at-top
    note = pretrained.random_start_note(config)
    if note:
      logging.warning(note)
  rng = jax.random.PRNGKey(config.seed)
  init_rng, state_rng = jax.random.split(rng)
  variables = initial_variables(config, avsegformer.build_model(config),
                                init_rng, with_pretrained=not start)
  state = train.create_train_state(config, model, state_rng, variables)
  src = (lambda s: source_fn(s)) if source_fn else (lambda s: None)
  # Step s trains on batch s of the run, so the data position is the step:
  # the iterator starts there, whatever the number of input workers or of
  # processes now (grain's saved iterator state depends on both).
  ds, info = input_pipeline.create_dataset(
      config, config.data.train_split, train=True, num_epochs=t.num_epochs,
      source=src(config.data.train_split),
      train_frames=train.clip_frames(config, model), start_batch=start)
  data_iter = iter(ds)
  bpe = info["batches_per_epoch"]
  total = bpe * t.num_epochs
  if t.max_steps > 0:
    total = min(total, t.max_steps)
  if start:
    meta = ckpt.restore_meta(start)
    _check_batch(meta, info["global_batch"], accum, workdir, start)
    if meta.get("backbone_trainable"):
      state = train.unfreeze_backbone(state, config)
    state, meta = ckpt.restore(start, state,
                               hint=_resume_hint(changes, workdir, start))
    # Restored onto this process's own device: through host memory, so that
    # `replicate` builds the global arrays as it does for a fresh state (a
    # device-to-device put across processes needs cross-host transfers,
    # which multi-process CPU and GPU runs do not set up).
    state = jax.device_get(state)
    logging.info("resumed from %s at step %d (epoch %d)", workdir, start,
                 start // bpe)
  if _is_main():     # what the next resume compares its config with
    run_config.save(config, workdir)
  state = train.replicate(state, mesh)
  steps = train.Steps(model, config, mesh)
  log = run_log.RunLog(workdir)
  last_eval, pending, t0, clips = {}, [], time.time(), 0
  waited = 0.0     # seconds in next(data_iter) since the last log line
  t_run = time.time()
  # Before the bar, which keeps the sys.stderr it finds (the notice's).
  notice, preempted = multihost.PreemptionNotice(), 0
  shown = progress.Progress(_is_main(), total=total, initial=start,
                            desc="train", dynamic_ncols=True)

  def save(step, extra=None):
    _check_finite(pending, step)
    pending.clear()
    meta = {"step": step, "epoch": step / bpe,
            "global_batch": info["global_batch"],
            "grad_accum_steps": accum,
            "backbone_trainable": state.opt_state["backbone"] is not None,
            **(extra or {})}
    ckpt.save(step, state, meta)

  def validate(step, loss=None):
    """The validation of epoch-end `step` (saved already): its scores (and
    per category), the best checkpoint, a line in run_log.EVAL_LOG; None if
    a notice (one process) came during it."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    res = evaluation.evaluate(
        config, steps, variables, config.data.eval_split,
        source=src(config.data.eval_split), stop=notice.pending,
        per_clip=True)              # for its `per_category`
    if res is None:
      return None
    res.pop("clips")
    msg = (f"epoch {math.ceil(step / bpe)}/{t.num_epochs} step {step}: "
           + (f"loss {loss:.4f}  " if loss is not None else "")
           + f"{config.data.eval_split} mIoU {res['miou']:.4f} "
           f"F {res['fscore']:.4f}")
    shown.bar.write(msg) if _is_main() else None
    logging.info(msg)
    ckpt.save_best(step, variables, {"step": step, "miou": res["miou"]})
    log.eval(step, step / bpe, res)
    return res

  try:
    todo = range(start, total)
    if start and meta.get("validated") is False and not run_log.validated(
        workdir, start):         # stopped during its epoch-end validation
      last_eval = validate(start) or {}
      if not last_eval:          # a notice during it: stop again
        preempted, todo = start, ()
    for step in todo:
      epoch = step // bpe
      if (epoch >= t.freeze_backbone_epochs and
          state.opt_state["backbone"] is None):
        state = train.replicate(train.unfreeze_backbone(state, config), mesh)
        logging.info("epoch %d: visual backbone unfrozen", epoch)
      # Steps are dispatched asynchronously, so time blocked here is time the
      # device had nothing queued: the input pipeline's stall.
      t_in = time.time()
      batch = next(data_iter)
      waited += time.time() - t_in
      train.check_supervision(batch, config)
      state, stats = steps.train(state, train.shard_batch(batch, mesh))
      pending.append((step, stats))
      clips += info["global_batch"]
      shown.bar.update(1)
      done = step + 1
      if done % t.log_every_steps == 0 or done == total:
        s = jax.tree_util.tree_map(float, jax.device_get(stats))
        elapsed = max(time.time() - t0, 1e-9)
        rate, wait = clips / elapsed, min(waited / elapsed, 1.0)
        t0, clips, waited = time.time(), 0, 0.0
        s.update(learning_rate=t.learning_rate, clips_per_s=rate,
                 input_wait_fraction=wait)
        log.train(done, s)
        shown.bar.set_postfix(loss=f"{s['loss']:.4f}",
                              clips_s=f"{rate:.2f}", input_wait=f"{wait:.0%}")
        left = (time.time() - t_run) / (done - start) * (total - done)
        shown.line(f"step {done}/{total}: loss {s['loss']:.4f}, {rate:.2f} "
                   f"clips/s, input wait {wait:.0%}, about {left / 60:.0f} "
                   "min to go")
      epoch_end = done % bpe == 0 or done == total
      # A preemption notice (or Ctrl-C): save this step, then stop (not
      # after the last).
      stop = done < total and notice.reached(done)
      if epoch_end or done % config.checkpoint.every_steps == 0 or stop:
        # Saved before the validation: a kill or a notice during it loses
        # no step (the resume validates the step first).
        save(done, {"validated": False} if epoch_end else None)
      if epoch_end and not stop:
        res = validate(done, float(stats["loss"]))
        stop = res is None               # a notice came during it
        last_eval = res or last_eval
      if stop:
        if _is_main():
          shown.bar.write(f"{notice.name}: step {done} saved; stopping")
        preempted = done
        break
  finally:
    notice.close()
    input_pipeline.close(data_iter)
  shown.close()
  ckpt.close()
  log.close()
  if preempted:
    raise errors.Preempted(preempted, workdir, notice.signum)
  results = files.join(workdir, "train_results.json")
  if not last_eval:        # the run was complete already: no step, no eval
    logging.info("%s: trained to step %d already", workdir, start)
    return json.loads(files.read_text(results)) if files.exists(results) \
        else {}
  if _is_main():
    files.write_text(results, json.dumps(last_eval, indent=2))
  return last_eval


def evaluate_checkpoint(config, workdir: str, checkpoint_dir: str, split: str,
                        *, shuffle_audio=False, source=None) -> dict:
  """`main.py --mode=eval`: scores a checkpoint (ours, or a released `.pth`)
  and writes `eval_results_<split>.json` (with `per_category`), each clip's
  scores in `eval_clips_<split>.jsonl` and, for `eval.num_visualize` clips,
  masks and overlays in `visualizations/<split>` (with shuffled audio:
  `<split>_shuffled_audio` in all three names)."""
  check_config(config, training=False)
  files.makedirs(workdir)
  mesh = train.make_mesh()
  multihost.connect(mesh)
  model = avsegformer.build_model(config)
  from avsegformer_jax import pretrained  # pylint: disable=g-import-not-at-top
  variables, read_from = pretrained.read_model_variables(checkpoint_dir,
                                                         config)
  differ = run_config.output_changes(config, checkpoint_dir)
  if differ and _is_main():
    logging.warning(run_config.output_changes_note(checkpoint_dir, differ))
  steps = train.Steps(model, config, mesh)
  # One name per split and audio: evaluating the test split after the
  # validation one, or the shuffled-audio control after the true audio,
  # must not overwrite the other's results or overlays.
  name = f"{split}_shuffled_audio" if shuffle_audio else split
  vis = files.join(workdir, "visualizations", name)
  res = evaluation.evaluate(
      config, steps, variables, split, shuffle_audio=shuffle_audio,
      vis_dir=vis, num_visualize=config.eval.num_visualize, source=source,
      per_clip=True)
  clips = res.pop("clips")
  res["checkpoint"] = read_from  # a workdir's: the step read (best/<step>)
  if differ:                 # {field: [its run's value, this config's]}
    res["checkpoint_made_with"] = {k: [a, b] for k, a, b in differ}
  if _is_main():
    files.write_text(files.join(workdir, f"eval_clips_{name}.jsonl"),
                     "".join(json.dumps(c) + "\n" for c in clips))
    files.write_text(files.join(workdir, f"eval_results_{name}.json"),
                     json.dumps(res, indent=2))
  return res
