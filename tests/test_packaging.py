"""setup.cfg against what its requirements themselves declare.

pip reads none of this until a user's install fails: `python_requires` once
said >=3.10 while jax 0.10.2 (our lowest) and grain 0.2.18 need 3.11, so a
3.10 install ended in a resolver error about jaxlib instead of pip's plain
"requires a different Python".
"""
import configparser
import importlib.metadata
import pathlib

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup_cfg():
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / "setup.cfg")
  return cfg


def _lowest(spec: SpecifierSet):
  """The version a `>=X` clause starts at (None without one)."""
  lows = [Version(s.version) for s in spec if s.operator == ">="]
  return max(lows) if lows else None


def _python_floor():
  return _lowest(SpecifierSet(_setup_cfg()["options"]["python_requires"]))


def _requirements():
  lines = _setup_cfg()["options"]["install_requires"].split("\n")
  return [Requirement(line) for line in lines if line.strip()]


def test_python_floor_is_one_every_lowest_requirement_installs_on():
  """Where an installed requirement is the lowest version we allow, its own
  Requires-Python must admit our lowest Python. (A newer installed version
  says nothing about the floor: a raised Requires-Python is the reason a
  range goes on past it.)"""
  floor = _python_floor()
  wrong = []
  for req in _requirements():
    try:
      dist = importlib.metadata.distribution(req.name)
    except importlib.metadata.PackageNotFoundError:
      wrong.append(f"{req.name} from setup.cfg is not installed")
      continue
    needs = dist.metadata.get("Requires-Python")
    if (Version(dist.version) == _lowest(req.specifier) and needs
        and not SpecifierSet(needs).contains(floor)):
      wrong.append(f"{req.name} {dist.version} (its lowest allowed version) "
                   f"requires Python {needs}")
  assert not wrong, (f"setup.cfg: python_requires starts at {floor}, but: "
                     + "; ".join(wrong))


def test_classifiers_list_every_python_from_the_floor():
  """The classifiers name each minor version from python_requires' floor up
  to the newest one listed, so the floor and the list move together."""
  floor = _python_floor()
  listed = sorted(
      Version(line.rsplit("::", 1)[1].strip())
      for line in _setup_cfg()["metadata"]["classifiers"].split("\n")
      if line.strip().startswith("Programming Language :: Python :: 3."))
  assert listed, "setup.cfg lists no Python 3.x classifier"
  assert listed[0] == floor, (listed, floor)
  expect = [Version(f"3.{m}") for m in range(floor.minor, listed[-1].minor + 1)]
  assert listed == expect, (listed, expect)
