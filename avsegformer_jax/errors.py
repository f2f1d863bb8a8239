"""Errors whose message is the whole report for a user: the CLIs print them
as one line (`prog: error: ...`, status 2; `convert` keeps absl's
`convert: ...`, status 1). Anything else is a bug and keeps its traceback.
`Preempted` is no error: main.py prints it and exits with SIGTERM's 143
(Ctrl-C's 130).
`define_config_flag` makes a bad `--config` (or override) absl's one-line
flag error, status 1.
"""
from __future__ import annotations

import difflib
import re
import signal
import sys


class ReportedError(Exception):
  """The message names what went wrong and what to do; no traceback needed."""


class InputError(ReportedError, ValueError):
  """Bad input (a file, a directory, a setting), named in the message. A
  ValueError, so callers that catch ValueError still do."""


class ConfigError(InputError):
  """A config value the run cannot work with, named by its field (checked
  before any work, not met inside a traced step)."""


class Preempted(Exception):
  """Not an error: training stopped on SIGTERM (a preemption notice), a
  first Ctrl-C (SIGINT) or SIGHUP (its terminal closed) after saving the
  checkpoint of `step`; the same command resumes from it. `status`: 128 +
  the signal's number, which schedulers and shells read as "terminated",
  not "finished"."""

  def __init__(self, step: int, workdir: str, signum: int = signal.SIGTERM):
    why = {signal.SIGINT: "Ctrl-C (SIGINT)",
           signal.SIGHUP: "SIGHUP (its terminal closed)"}.get(
               signum, "SIGTERM (preemption)")
    super().__init__(
        f"stopped at step {step} on {why} after saving its checkpoint in "
        f"{workdir}; run the same command to resume")
    self.step = step
    self.status = 128 + signum


PREEMPTED_STATUS = 128 + signal.SIGTERM      # 143
INTERRUPTED_STATUS = 128 + signal.SIGINT     # 130


def exit_with(prog: str, err: BaseException, code: int = 2):
  """Print `prog: error: message` to stderr and exit (argparse's form)."""
  print(f"{prog}: error: {err}", file=sys.stderr)
  raise SystemExit(code)


def exit_interrupted(prog: str, then: str):
  """A Ctrl-C (KeyboardInterrupt) as one line and status 130: the traceback
  would only show where the program happened to be."""
  print(f"\n{prog}: interrupted (Ctrl-C); {then}", file=sys.stderr)
  raise SystemExit(INTERRUPTED_STATUS)


def exit_if_disk_full(prog: str, path, err: BaseException, then: str):
  """`exit_with` a full-disk report if the disk holding `path` is full;
  returns otherwise (the caller re-raises `err`). A full disk fails in
  whichever library writes next, as whatever it raises (libsndfile's
  "System error.", array_record's RuntimeError, PIL's OSError)."""
  from avsegformer_jax import files  # pylint: disable=g-import-not-at-top
  full = path and files.disk_full(path)
  if full:
    exit_with(prog, ReportedError(
        f"{path}: the disk is full ({full}; the write that failed: "
        f"{type(err).__name__}: {err}); free some space and {then}"))


def out_of_memory(err: BaseException, advice: str) -> ReportedError | None:
  """XLA's RESOURCE_EXHAUSTED (the device's memory: at compile time on TPU,
  at a step on GPU) as one line with XLA's own first line and `advice`, or
  None for any other error. Its traceback ran through jit's internals."""
  text = str(err).strip()
  if not isinstance(err, RuntimeError) or "RESOURCE_EXHAUSTED" not in text:
    return None
  first = " ".join(text.splitlines()[0].split())
  if len(first) > 300:
    first = first[:300] + "..."
  return ReportedError(f"out of memory ({first}); {advice}")


def define_config_flag(help_text: str, lock_config: bool = True):
  """`--config` as ml_collections defines it, except that an unreadable
  config file and an override of a field the config lacks are flag errors
  that name them. (ml_collections defers the first to the config's first
  use and raises the second from inside its parsing: both were tracebacks
  from inside the library.)"""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  holder = config_flags.DEFINE_config_file("config", None, help_text,
                                           lock_config=lock_config)
  flag = flags.FLAGS["config"]

  class ConfigFlag(type(flag)):        # the same flag, its errors named

    def _parse(self, argument):
      try:
        config = super()._parse(argument)
        getattr(config, "get", None)    # a deferred load error raises here
        return config
      except OSError as e:
        cause = str(e.__cause__ or e).strip().splitlines()[-1].strip()
        error = (f"cannot load this config file ({cause}); give one such as "
                 "configs/s4.py:pvt2")
      except (KeyError, AttributeError):  # an override's missing field
        error = _unknown_override(self.parser.parse(argument), sys.argv)
      raise flags.IllegalFlagValueError(
          f"flag --{self.name}={argument}: {error}") from None

  flag.__class__ = ConfigFlag
  return holder


def parse_flags(argv):
  """absl's flag parsing (`app.run(..., flags_parser=parse_flags)`), except
  that a `--config.x` override without --config (which the CLIs may leave
  out to take a checkpoint's own config) is named, not absl's "Unknown
  command line flag 'config.x'"."""
  from absl import app  # pylint: disable=g-import-not-at-top
  args = argv[1:]
  given = any(re.fullmatch(r"--?config(=.*)?", a) for a in args)
  over = next((a for a in args if re.match(r"--?(?:no)?config\.", a)), None)
  if over and not given:
    print(f"FATAL Flags parsing error: {over.split('=')[0]} overrides a "
          "field of --config, which is not given: give it too, e.g. "
          "--config=configs/run.py:PATH (the config of the workdir or "
          "checkpoint at PATH)", file=sys.stderr)
    raise SystemExit(1)
  return app.parse_flags_with_usage(argv)


def _unknown_override(config, argv) -> str:
  """Names the first `--config.a.b` in argv that `config` has no field for,
  with the closest names (ml_collections' own error only says `'b'`)."""
  for arg in argv:
    m = re.match(r"--?(?:no)?config\.([^=]+)", arg)
    if not m:
      continue
    node, done = config, []
    for part in m.group(1).split("."):
      where = ".".join(done) or "the config"
      if not hasattr(node, "keys"):
        return f"--config.{m.group(1)}: {where} is a value, not a group"
      if part not in node.keys():
        close = difflib.get_close_matches(part, list(node.keys()), n=3)
        hint = (f"did you mean {' or '.join(close)}?" if close else
                f"it has {', '.join(sorted(node.keys()))}")
        return f"--config.{m.group(1)}: {where} has no field {part!r}; {hint}"
      node, done = node[part], done + [part]
  return "an override names a field the config does not have"
