"""Progress: a bar on a terminal; plain lines, at most every EVERY_S
seconds, into a file or pipe (a batch job's log got a carriage-return update
per step and cursor-up escapes)."""
import io

from avsegformer_jax import progress


class Terminal(io.StringIO):

  def isatty(self):
    return True


def test_a_log_gets_lines_and_no_bar(monkeypatch, capsys):
  log = io.StringIO()
  shown = progress.Progress(total=3, desc="train", file=log)
  shown.line("too soon")                      # within EVERY_S of the start
  monkeypatch.setattr(progress, "EVERY_S", 0)
  for i in range(3):
    shown.bar.update(1)
    shown.line(lambda i=i: f"step {i + 1}/3")
  shown.close()
  assert log.getvalue() == ""                 # no bar, no "\r"
  assert capsys.readouterr().out.splitlines() == [
      "step 1/3", "step 2/3", "step 3/3"]


def test_a_terminal_gets_the_bar_and_no_lines(monkeypatch, capsys):
  monkeypatch.setattr(progress, "EVERY_S", 0)
  term = Terminal()
  shown = progress.Progress(total=2, desc="eval", file=term)
  shown.bar.update(2)
  shown.line("batch 2/2")
  shown.close()
  assert "\r" in term.getvalue() and "eval: 100%" in term.getvalue()
  assert capsys.readouterr().out == ""


def test_other_processes_say_nothing(monkeypatch, capsys):
  monkeypatch.setattr(progress, "EVERY_S", 0)
  for file in (io.StringIO(), Terminal()):
    shown = progress.Progress(False, total=2, file=file)
    shown.bar.update(2)
    shown.line("step 2/2")
    shown.close()
    assert file.getvalue() == ""
  assert capsys.readouterr().out == ""
