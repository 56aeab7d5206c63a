"""The files a run leaves behind, and the only thing reports read.

``config.yaml`` (resolved config), ``metrics.jsonl`` (one JSON object per logged step) and
``summary.json`` (written last; its presence with ``"completed": true`` marks a finished run).
"""

import json
import pathlib

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def read_metrics(run_dir: pathlib.Path) -> list[dict]:
  """All logged rows of a run, in order; a torn last line (killed mid-write) is dropped."""
  path = run_dir / METRICS_FILE
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      break
  return rows


def truncate_metrics(run_dir: pathlib.Path, *, last_step: int) -> None:
  """Keeps only rows with ``step <= last_step`` (what the restored checkpoint has seen)."""
  rows = [row for row in read_metrics(run_dir) if row["step"] <= last_step]
  _write_atomic(run_dir / METRICS_FILE, "".join(json.dumps(row) + "\n" for row in rows))


def append_metrics(run_dir: pathlib.Path, row: dict) -> None:
  """Appends one row and flushes it to disk."""
  with (run_dir / METRICS_FILE).open("a") as f:
    f.write(json.dumps(row) + "\n")
    f.flush()


def read_summary(run_dir: pathlib.Path) -> dict | None:
  """The summary of a finished run, or None when the run has not finished."""
  path = run_dir / SUMMARY_FILE
  if not path.exists():
    return None
  summary = json.loads(path.read_text())
  return summary if summary.get("completed") else None


def write_summary(run_dir: pathlib.Path, summary: dict) -> None:
  _write_atomic(run_dir / SUMMARY_FILE, json.dumps(summary, indent=1) + "\n")


def _write_atomic(path: pathlib.Path, text: str) -> None:
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)
