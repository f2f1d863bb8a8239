"""Which checkpoint `load_variables` picks from a workdir, and its errors."""
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from avsegformer_jax import checkpoint


def _variables(value):
  return {"params": {"w": np.full((2, 3), value, np.float32)},
          "batch_stats": {"mean": np.full((3,), -value, np.float32)}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Steps 1 and 2 saved; the best is step 1 (higher mIoU)."""
  root = tmp_path_factory.mktemp("workdir")
  ckpt = checkpoint.Checkpointer(root)
  for step, miou in ((1, 0.9), (2, 0.5)):
    ckpt.save(step, _variables(step), {"epoch": step})
    ckpt.save_best(step, _variables(step), {"miou": miou})
  ckpt.close()
  return root


def _value(variables):
  np.testing.assert_array_equal(variables["batch_stats"]["mean"],
                                -variables["params"]["w"][0, 0])
  return float(variables["params"]["w"][0, 0])


def test_best_by_default_latest_on_request(workdir, caplog):
  with caplog.at_level(logging.WARNING):
    assert _value(checkpoint.load_variables(workdir)) == 1
    assert _value(checkpoint.load_variables(workdir, prefer="latest")) == 2
  # Loading is quiet (a read-only orbax manager logged three warnings).
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_interrupted_save_is_not_a_step(workdir, tmp_path):
  """A run killed mid-save leaves `<step>.orbax-checkpoint-tmp-*`: the
  finalized steps are what counts."""
  root = tmp_path / "w"
  shutil.copytree(workdir, root)
  src = root / "checkpoints" / "2"
  shutil.copytree(src, root / "checkpoints" / "7.orbax-checkpoint-tmp-123")
  assert _value(checkpoint.load_variables(root, prefer="latest")) == 2
  # With best/ gone, "best" falls back to the latest.
  shutil.rmtree(root / "best")
  assert _value(checkpoint.load_variables(root)) == 2


def test_resolve_names_the_step_read(workdir):
  """Results record the step they came from, not just the workdir (its
  best changes while a run trains)."""
  root = str(workdir)
  assert checkpoint.resolve(root) == f"{root}/best/1"
  assert checkpoint.resolve(root, prefer="latest") == f"{root}/checkpoints/2"
  assert checkpoint.resolve(f"{root}/checkpoints/1") == f"{root}/checkpoints/1"
  variables, source = checkpoint.read_variables(root)
  assert (_value(variables), source) == (1, f"{root}/best/1")


def test_a_best_step_replaced_while_it_is_read_is_followed(workdir, tmp_path,
                                                           monkeypatch):
  """`--mode=eval --checkpoint=WORKDIR` while the run trains there: the
  run saves a better step and deletes best/<old> between the listing and
  the read. The new best is read, not an error about missing files."""
  root = tmp_path / "w"
  shutil.copytree(workdir, root)
  read = checkpoint._restore_tree
  calls = []
  def trainer_saves_a_better_step_first(path):
    if not calls:
      ckpt = checkpoint.Checkpointer(root)
      ckpt.save_best(3, _variables(3), {"miou": 0.95})
      ckpt.close()
      assert not (root / "best" / "1").exists()
    calls.append(path)
    return read(path)
  monkeypatch.setattr(checkpoint, "_restore_tree",
                      trainer_saves_a_better_step_first)
  variables, source = checkpoint.read_variables(root)
  assert (_value(variables), source) == (3, f"{root}/best/3")
  assert calls == [f"{root}/best/1/state", f"{root}/best/3/state"]
  # Caught while it is being deleted (its folder still there, emptying).
  calls.clear()
  def deleting_it(path):
    if not calls:
      shutil.copytree(root / "best" / "3", root / "best" / "4")
      shutil.rmtree(root / "best" / "3" / "state")
    calls.append(path)
    return read(path)
  monkeypatch.setattr(checkpoint, "_restore_tree", deleting_it)
  variables, source = checkpoint.read_variables(root)
  assert (_value(variables), source) == (3, f"{root}/best/4")
  # A step that cannot be read, with no successor, is still named.
  shutil.rmtree(root / "best" / "4" / "state")
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf"^{root}/best/4/state: cannot be read"):
    checkpoint.read_variables(root)


def test_errors_name_the_directory(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="no such"):
    checkpoint.load_variables(tmp_path / "missing")
  os.makedirs(tmp_path / "empty" / "checkpoints")
  with pytest.raises(checkpoint.CheckpointError,
                     match=str(tmp_path / "empty") + ".*neither"):
    checkpoint.load_variables(tmp_path / "empty")


def test_a_step_directory_loads(workdir):
  assert _value(checkpoint.load_variables(workdir / "checkpoints" / "2")) == 2
  assert _value(checkpoint.load_variables(workdir / "best" / "1")) == 1


# --------------------------------------------- fitting trees to a config --
def _layers(n, stacked):
  """An encoder of `n` layers (layer i's weights are i), as nn.scan stacks
  them or unrolled, with a non-layer leaf and a name that only looks like
  a layer's (fc_0)."""
  w = lambda i: np.full((2, 3), i, np.float32)
  enc = ({"layers": {"w": np.stack([w(i) for i in range(n)])}} if stacked
         else {f"layers_{i}": {"w": w(i)} for i in range(n)})
  return {"encoder": enc, "fc_0": {"b": np.arange(4.0, dtype=np.float32)}}


@pytest.mark.parametrize("stacked", [False, True])
def test_fit_tree_stacks_and_unrolls_layers(stacked):
  got = checkpoint.fit_tree(_layers(3, not stacked), _layers(3, stacked), "x")
  want = _layers(3, not stacked)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(
      want)
  for a, b in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_fit_tree_names_what_does_not_fit():
  # A deeper checkpoint must not load silently as the shallower model.
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"ck: does not fit the config: 1 not in this model "
                     r"\(encoder/layers_2/w\)\. Pass the config"):
    checkpoint.fit_tree(_layers(2, False), _layers(3, False), "ck")
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"1 missing \(encoder/layers/w\); 3 not in this "
                     r"model \(encoder/layers_0/w, encoder/layers_1/w, "
                     r"encoder/layers_2/w\)\. use 3 layers"):
    checkpoint.fit_tree(_layers(4, True), _layers(3, False), "ck",
                        "use 3 layers")
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"1 not in this model \(encoder/layers/w: 3 layers, "
                     r"the config 2\)"):
    checkpoint.fit_tree(_layers(2, False), _layers(3, True), "ck")
  small = _layers(2, False)
  small["fc_0"]["b"] = np.zeros(5, np.float32)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"1 of another shape \(fc_0/b: checkpoint \(5,\), "
                     r"config \(4,\)\)"):
    checkpoint.fit_tree(_layers(2, False), small, "ck")


def test_resume_into_the_other_layout(tmp_path):
  """A training state saved with unrolled layers restores into a stacked
  one (the optimizer's moments too), and the manager keeps working."""
  import optax  # pylint: disable=g-import-not-at-top
  def state(stacked, scale):
    p = jax.tree_util.tree_map(lambda x: x * scale, _layers(3, stacked))
    tx = optax.adam(1.0)
    s = tx.init(p)
    s = (s[0]._replace(mu=jax.tree_util.tree_map(lambda x: x + 1, p)),
         s[1])
    return {"params": p, "opt": {"main": s, "backbone": None},
            "step": np.int32(7 * scale)}
  ckpt = checkpoint.Checkpointer(tmp_path, keep_best=False)
  ckpt.save(7, jax.device_put(state(False, 1)), {"step": 7})
  got, meta = ckpt.restore(7, jax.device_put(state(True, 0)))
  assert meta == {"step": 7}
  want = state(True, 1)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(
      want)
  for a, b in zip(jax.tree_util.tree_leaves(got),
                  jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"checkpoints/7: does not fit the config: 6 not in "
                     r"this model \(params/encoder/layers_1/w, params/encoder/"
                     r"layers_2/w, opt/main/0/mu/encoder/layers_1/w, \.\.\.\)\. "
                     r"resume with 3"):
    shallow = jax.tree_util.tree_map(
        lambda x: x[:1] if x.ndim == 3 else x, state(True, 0))
    ckpt.restore(7, jax.device_put(shallow), hint="resume with 3")
  ckpt.close()


def _truncate_data(step_dir):
  """Each of the step's array data files cut to 8 bytes (a disk or a copy
  that failed), its metadata intact."""
  cut = 0
  for f in step_dir.rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:8])
      cut += 1
  assert cut


def test_a_checkpoint_that_cannot_be_read_is_named(workdir, tmp_path):
  """Its path and the first error of the chain in one CheckpointError, for
  resuming and for loading alike."""
  root = tmp_path / "w"
  shutil.copytree(workdir, root)
  _truncate_data(root / "checkpoints" / "2")
  ckpt = checkpoint.Checkpointer(root, keep_best=False)
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf"^{root}/checkpoints/2: cannot be read \("
                     r"ValueError: OUT_OF_RANGE: .*\); move it "
                     "away to resume from the checkpoint before it"):
    ckpt.restore(2, jax.device_put(_variables(0)))
  ckpt.close()
  assert _value(checkpoint.load_variables(root)) == 1      # best/ is intact
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf"^{root}/checkpoints/2/state: cannot be read \("
                     "ValueError: OUT_OF_RANGE"):
    checkpoint.load_variables(root, prefer="latest")


def test_a_failed_read_leaves_no_tracebacks_behind(tmp_path):
  """The reads still pending when one fails call back into orbax's closed
  event loop from TensorStore's threads: each printed an "Event loop is
  closed" traceback around the one-line error (4-10 in a run of 200
  arrays)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  checkpoint.save_variables(tmp_path, {"params": {
      f"w{i}": np.full((64, 64), i, np.float32) for i in range(200)}})
  _truncate_data(tmp_path / "variables")
  r = subprocess.run(
      [sys.executable, "-c", "import sys\n"
       "from avsegformer_jax import checkpoint\n"
       "try:\n  checkpoint.load_variables(sys.argv[1])\n"
       "except checkpoint.CheckpointError as e:\n  print(e)\n", tmp_path],
      capture_output=True, text=True, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.startswith(f"{tmp_path}/variables: cannot be read"), r.stdout
  assert "Event loop is closed" not in r.stderr, r.stderr[-3000:]


def test_a_checkpoint_that_cannot_be_saved_is_named(tmp_path):
  """A save that fails (here the folder became a file; in a run, a full
  disk) is one CheckpointError saying the earlier ones are intact, not
  orbax's traceback from its writer threads."""
  ckpt = checkpoint.Checkpointer(tmp_path, keep_best=False)
  ckpt.save(1, _variables(1), {"step": 1})
  shutil.rmtree(tmp_path / "checkpoints")
  (tmp_path / "checkpoints").write_text("not a folder")
  with pytest.raises(checkpoint.CheckpointError,
                     match=rf"^{tmp_path}/checkpoints/2: cannot be saved \("
                     r"NotADirectoryError: .*\); the checkpoints before it "
                     "are intact"):
    ckpt.save(2, _variables(2), {"step": 2})
