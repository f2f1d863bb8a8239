"""Errors whose message is the whole report for a user: the CLIs print them
as one line (`prog: error: ...`, status 2; `convert` keeps absl's
`convert: ...`, status 1). Anything else is a bug and keeps its traceback.
`Preempted` is no error: main.py prints it and exits with SIGTERM's 143.
"""


class ReportedError(Exception):
  """The message names what went wrong and what to do; no traceback needed."""


class InputError(ReportedError, ValueError):
  """Bad input (a file, a directory, a setting), named in the message. A
  ValueError, so callers that catch ValueError still do."""


class Preempted(Exception):
  """Not an error: training stopped on a preemption notice (SIGTERM) after
  saving the checkpoint of `step`; the same command resumes from it."""

  def __init__(self, step: int, workdir: str):
    super().__init__(
        f"stopped at step {step} on SIGTERM (preemption) after saving its "
        f"checkpoint in {workdir}; run the same command to resume")
    self.step = step


# The exit status of a process ended by SIGTERM (128 + 15), which schedulers
# and shells read as "terminated", not "finished".
PREEMPTED_STATUS = 143


def exit_with(prog: str, err: BaseException, code: int = 2):
  """Print `prog: error: message` to stderr and exit (argparse's form)."""
  import sys  # pylint: disable=g-import-not-at-top
  print(f"{prog}: error: {err}", file=sys.stderr)
  raise SystemExit(code)




def define_config_flag(help_text: str, lock_config: bool = True):
  """`--config` as ml_collections defines it, except that a config file it
  cannot read is a flag error naming the file (ml_collections defers that
  error to the config's first use: a traceback from inside the library)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  holder = config_flags.DEFINE_config_file("config", None, help_text,
                                           lock_config=lock_config)
  parser = flags.FLAGS["config"].parser

  class Parser(type(parser)):          # its parser, with the error made eager

    def parse(self, path):
      config = super().parse(path)
      try:
        getattr(config, "get")         # the deferred error raises on access
      except OSError as e:
        cause = str(e.__cause__ or e).strip().splitlines()[-1].strip()
        raise ValueError(f"cannot load this config file ({cause}); give one "
                         "such as configs/s4.py:pvt2") from None
      return config

  parser.__class__ = Parser
  return holder
