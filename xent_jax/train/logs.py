"""The files a run leaves behind, the only thing reports read, and the lock on the directory.

``config.yaml`` (resolved config), ``metrics.jsonl`` (one JSON object per logged step),
``summary.json`` (written last; its presence with ``"completed": true`` marks a finished run) and
``run.lock`` (held with ``fcntl.flock`` by the one process training in the directory; the kernel
releases it when that process dies, even by SIGKILL).

Whole files are replaced atomically (written to ``<name>.tmp``, then renamed; the ``.tmp`` is
removed if the write fails, e.g. on a full disk). Reading is forgiving where nothing is lost: a
line of ``metrics.jsonl`` that is not a JSON row (a write torn by a crash or a full disk) is
skipped with a warning naming the file and line, and the rows after it are kept.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import pathlib

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOCK_FILE = "run.lock"


class RunDirectoryError(ValueError):
  """The run directory cannot be used by this run: another config's run, or another process."""


class LogFileError(ValueError):
  """A run's log file exists but cannot be read as what it should be (the message names it)."""


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
  """All logged rows of a run, in file order.

  A line that is not a JSON object with a ``"step"`` (torn by a crash) is skipped with a warning
  naming the file and the line number; the rows after it are kept.
  """
  path = run_dir / METRICS_FILE
  if not path.exists():
    return []
  rows = []
  with path.open("rb") as f:
    for number, line in enumerate(f, 1):
      try:
        row = json.loads(line)
      except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        row = None
      if isinstance(row, dict) and isinstance(row.get("step"), int):
        rows.append(row)
      elif line.strip():
        logging.warning(
          "%s line %d is not a metric row (torn write?); skipped it, kept the rest", path, number
        )
  return rows


def truncate_metrics(run_dir: pathlib.Path, *, last_step: int) -> None:
  """Keeps only rows with ``step <= last_step`` (what the restored checkpoint has seen).

  Torn lines are dropped (with the warning of `read_metrics`); good rows after them are kept.
  """
  rows = [row for row in read_metrics(run_dir) if row["step"] <= last_step]
  write_atomic(run_dir / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in rows))


def append_metrics(run_dir: pathlib.Path, row: dict) -> None:
  """Appends one row and flushes it to disk."""
  with (run_dir / METRICS_FILE).open("a") as f:
    f.write(json.dumps(row) + "\n")
    f.flush()


def read_summary(run_dir: pathlib.Path) -> dict | None:
  """The summary of a finished run, or None when the run has not finished.

  Raises:
    LogFileError: ``summary.json`` exists but is not a JSON object (truncated or damaged).
  """
  path = run_dir / SUMMARY_FILE
  if not path.exists():
    return None
  try:
    summary = json.loads(path.read_bytes())
  except ValueError as err:
    raise LogFileError(
      f"{path} is not valid JSON ({err}); it was written atomically, so it was damaged "
      "afterwards: restore it, or delete it to redo the run's end from its last checkpoint"
    ) from None
  if not isinstance(summary, dict):
    raise LogFileError(f"{path} holds a JSON {type(summary).__name__}, expected an object")
  return summary if summary.get("completed") else None


def write_summary(run_dir: pathlib.Path, summary: dict) -> None:
  write_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")


def write_atomic(path: pathlib.Path, text: str) -> None:
  """Replaces ``path`` by ``text`` at once; on failure ``path`` is unchanged, no ``.tmp`` stays."""
  tmp = path.with_suffix(path.suffix + ".tmp")
  try:
    with tmp.open("w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    tmp.replace(path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


@contextlib.contextmanager
def locked(run_dir: pathlib.Path):
  """Holds an exclusive ``flock`` on ``run_dir/run.lock`` for the ``with`` block.

  The file keeps the holder's pid for the message of a refused process; it is never deleted (a
  process waiting on the old file could otherwise lock a file nobody else sees).

  Raises:
    RunDirectoryError: another process holds the lock (refused at once, no waiting).
  """
  path = run_dir / LOCK_FILE
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
      if err.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
      raise RunDirectoryError(
        f"{run_dir} is in use by another process (pid {holder} holds {path}); two processes "
        "would interleave their metrics and checkpoints: wait for it, or stop it first"
      ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock
