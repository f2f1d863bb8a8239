"""Errors whose message is the whole report for a user: the CLIs print them
as one line (`prog: error: ...`, status 2; `convert` keeps absl's
`convert: ...`, status 1). Anything else is a bug and keeps its traceback.
"""


class ReportedError(Exception):
  """The message names what went wrong and what to do; no traceback needed."""


class InputError(ReportedError, ValueError):
  """Bad input (a file, a directory, a setting), named in the message. A
  ValueError, so callers that catch ValueError still do."""


def exit_with(prog: str, err: BaseException, code: int = 2):
  """Print `prog: error: message` to stderr and exit (argparse's form)."""
  import sys  # pylint: disable=g-import-not-at-top
  print(f"{prog}: error: {err}", file=sys.stderr)
  raise SystemExit(code)
