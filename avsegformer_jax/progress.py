"""Progress on a terminal and in a log.

tqdm draws its bar with a carriage-return update per step: into a file or
pipe (a batch job's log) that made one endless line, and its nested eval
bar wrote cursor-up escapes. `Progress` draws the bar on a terminal only
(tqdm's `disable=None`) and says the progress in a plain line at most every
`EVERY_S` seconds elsewhere.
"""
from __future__ import annotations

import time

from tqdm import tqdm

EVERY_S = 60


class Progress:
  """`bar`: the tqdm bar (disabled where `show` is False: processes other
  than 0, or `predict --noprogress`)."""

  def __init__(self, show: bool = True, **tqdm_kwargs):
    self.bar = tqdm(disable=None if show else True, **tqdm_kwargs)
    self._lines = show and self.bar.disable
    self._said = time.time()

  def line(self, text) -> None:
    """Writes `text` (or `text()`) where no bar is drawn, if `EVERY_S` have
    passed since the last line (or the start)."""
    if self._lines and time.time() - self._said >= EVERY_S:
      self._said = time.time()
      tqdm.write(text() if callable(text) else text)

  def close(self) -> None:
    self.bar.close()
