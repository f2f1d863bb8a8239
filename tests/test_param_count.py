"""The port's parameter count plus what it deliberately does not hold equals
the original's float parameter count (from its state-dict key lists)."""
import csv
import math

import pytest

from avsegformer_jax import convert, param_count
from configs import avss, ms3, s4

CONFIGS = {"s4": s4, "ms3": ms3, "avss": avss}


def original_counts(tsv):
  total = unused = 0
  with open(tsv) as f:
    for name, shape, dtype in csv.reader(f, delimiter="\t"):
      if "int" in dtype or name.endswith(("running_mean", "running_var")):
        continue                                   # buffers, not parameters
      n = math.prod(int(x) for x in shape.strip("[]").split(",") if x)
      total += n
      unused += n if convert.is_known_unused(name) else 0
  return total, unused


@pytest.mark.parametrize("task,backbone", [
    ("s4", "res50"), ("s4", "pvt2"), ("ms3", "res50"), ("avss", "res50"),
    ("avss", "pvt2")])
def test_counts_match_original(task, backbone):
  counts = param_count.count(CONFIGS[task].get_config(backbone))
  total, unused = original_counts(
      f"tests/reference/state_dict_{task}_{backbone}.tsv")
  assert counts["original/total"] == total
  assert counts["original/total"] - counts["port/total"] == unused
  if (task, backbone) == ("avss", "res50"):
    assert total == 150_907_008     # the figure quoted by the issue
