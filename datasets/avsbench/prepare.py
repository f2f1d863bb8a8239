"""Prepares AVSBench (real or synthetic) as TFDS array_record, once.

  python -m datasets.avsbench.prepare --config s4 --manual_dir RAW --data_dir OUT

does what `tfds build datasets/avsbench --manual_dir=RAW --data_dir=OUT --config=s4`
does (the builder is found there by TFDS's folder convention too), but without
the `tfds` command, whose 4.9.10 entry point imports apache-beam at start-up
even for builders that never use it. TensorFlow is not needed (see the builder).
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

import tensorflow_datasets as tfds

from avsegformer_jax import errors, files, terminal

from . import raw
from .avsbench_dataset_builder import Builder


class _UnbuiltWarning(logging.Filter):
  """TFDS warns that a dataset not built yet "has no dataset_info.json" just
  before it builds it: the first line of a first run, read as a fault."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "has no dataset_info.json" not in record.getMessage()


@contextlib.contextmanager
def _no_unbuilt_warning():
  log, quiet = logging.getLogger("absl"), _UnbuiltWarning()
  log.addFilter(quiet)
  try:
    yield
  finally:
    log.removeFilter(quiet)


def prepare(config: str, manual_dir, data_dir, *, skip_bad_clips: bool | None = None,
            num_workers: int | None = None, overwrite: bool = False) -> Path:
  """Builds avsbench/<config> into data_dir (reused if already there); returns its folder."""
  if config not in raw.TASKS:
    raise ValueError(f"config must be one of {sorted(raw.TASKS)}, got {config!r}")
  builder = Builder(config=config, data_dir=str(data_dir), skip_bad_clips=skip_bad_clips,
                    num_workers=num_workers)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  manual = Path(manual_dir)
  with _no_unbuilt_warning():
    if (overwrite or not builder.is_prepared()) and not (
        manual.is_dir() and any(manual.iterdir())):
      # (TFDS would assert this deep inside download_and_prepare)
      raise raw.AVSBenchError(
          f"{manual}: manual dir does not exist or is empty. "
          + " ".join(Builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split()))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=str(manual_dir), download_mode=mode))
  return Path(builder.data_path)


def is_prepared(config: str, data_dir) -> bool:
  """Whether avsbench/<config> is built in data_dir already (then its raw
  files are not needed). TFDS builds in a temporary folder renamed when
  complete; asked through a builder, TFDS logs a warning for a dataset not
  built yet."""
  return files.exists(files.join(data_dir, Builder.name, config,
                                 str(Builder.VERSION), "dataset_info.json"))


def folder_size(path) -> int:
  return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", required=True, choices=sorted(raw.TASKS))
  p.add_argument("--manual_dir", required=True, help="AVSBench root (holds Single-source/ ...)")
  p.add_argument("--data_dir", required=True, help="TFDS data dir to write")
  p.add_argument("--skip_bad_clips", action="store_true",
                 help="skip and list bad clips instead of stopping (default: stop)")
  p.add_argument("--num_workers", type=int, default=None, help="decoding threads")
  p.add_argument("--overwrite", action="store_true", help="rebuild even if already prepared")
  a = p.parse_args(argv)
  # Into a batch job's log, the builder's line a minute, not TFDS's bars.
  tfds.display_progress_bar(sys.stderr.isatty())
  try:
    files.make_output_dir(a.data_dir, "the data dir")
    with terminal.survive_hangup():     # an hour's work for AVSS
      path = prepare(a.config, a.manual_dir, a.data_dir,
                     skip_bad_clips=a.skip_bad_clips or None,
                     num_workers=a.num_workers, overwrite=a.overwrite)
  except errors.InputError as e:
    errors.exit_with("prepare", e)
  except KeyboardInterrupt:
    errors.exit_interrupted("prepare", "run it again to prepare from the "
                            "start")
  except Exception as e:  # pylint: disable=broad-except
    errors.exit_if_disk_full("prepare", a.data_dir, e, "prepare again")
    raise
  print(f"prepared {path} ({folder_size(path) / 2**20:.1f} MiB)")


if __name__ == "__main__":
  main()
