"""Tables and plots of a comparison, rebuilt from the logged files alone.

Reads every ``*/seed_*/summary.json`` and ``metrics.jsonl`` under a directory, groups runs by
their group name (all config values but the seed), and writes ``table.md``, ``table.csv`` and
``plots/{learning_curves,reliability,accuracy_vs_ece}.png`` (drawn by
:mod:`xent_jax.train.plots`, imported only here: ``xent-jax run`` never loads matplotlib).
"""

import csv
import logging
import pathlib

import numpy as np

from xent_jax.train import logs

COLUMNS = [
  ("final_accuracy", "final test acc"),
  ("best_accuracy", "best test acc"),
  ("final_nll", "NLL"),
  ("final_nll_ts", "NLL after TS"),
  ("final_ece", "ECE"),
  ("final_ece_ts", "ECE after TS"),
  ("temperature", "T"),
  ("final_adaptive_ece", "adaptive ECE"),
  ("final_classwise_ece", "classwise ECE"),
  ("final_mce", "MCE"),
  ("final_brier", "Brier"),
  ("examples_per_s", "train examples/s"),
  ("step_time_ms", "step time (ms)"),
]


def load_runs(directory: pathlib.Path) -> dict[str, list[dict]]:
  """Finished runs under ``directory`` grouped by group name: summary plus metric rows.

  A run without ``summary.json`` (unfinished) or without metric rows is left out with a warning
  naming it; torn metric lines are skipped by `logs.read_metrics`, keeping the rows after them.

  Raises:
    LogFileError: a ``summary.json`` is damaged (a table without that run would be wrong).
  """
  groups: dict[str, list[dict]] = {}
  for run_dir in sorted(path for path in directory.glob("*/seed_*") if path.is_dir()):
    summary = logs.read_summary(run_dir)
    rows = logs.read_metrics(run_dir)
    if summary is None or not rows:
      logging.warning(
        "%s: %s; left out of the report",
        run_dir,
        "not finished" if summary is None else f"no rows in {logs.METRICS_FILE}",
      )
      continue
    groups.setdefault(summary["group"], []).append({"summary": summary, "rows": rows})
  return groups


# In table.csv only: the other calibration errors after temperature scaling.
CSV_ONLY_COLUMNS = [
  ("final_adaptive_ece_ts", "adaptive ECE after TS"),
  ("final_classwise_ece_ts", "classwise ECE after TS"),
  ("final_mce_ts", "MCE after TS"),
  ("final_brier_ts", "Brier after TS"),
]
CALIBRATION_METRICS = ("nll", "ece", "adaptive_ece", "classwise_ece", "mce", "brier")


def run_stats(run: dict) -> dict[str, float]:
  """The table's numbers for one run, from its files; NaN for a metric the run did not log.

  Runs logged before temperature scaling existed have no ``_ts`` metrics, no temperature and no
  adaptive / classwise ECE or MCE: their cells read "—".
  """
  rows, final = run["rows"], run["summary"]["final"]
  calibration = {
    f"final_{name}{suffix}": final.get(f"eval/{name}{suffix}")
    for name in CALIBRATION_METRICS
    for suffix in ("", "_ts")
  }
  calibration["temperature"] = final.get("eval/temperature")
  return {
    "final_accuracy": final["eval/accuracy"],
    "best_accuracy": max(row["eval/accuracy"] for row in rows),
    **{key: np.nan if value is None else value for key, value in calibration.items()},
    "examples_per_s": float(np.median([row["train/examples_per_s"] for row in rows])),
    "step_time_ms": 1e3 * float(np.median([row["train/step_time_s"] for row in rows])),
  }


def summarize(groups: dict[str, list[dict]]) -> list[dict]:
  """One record per group: mean and sample std over seeds of every column."""
  table = []
  for group, runs in groups.items():
    stats = [run_stats(run) for run in runs]
    record = {"group": group, "seeds": len(runs)}
    for key, _ in COLUMNS + CSV_ONLY_COLUMNS:
      values = np.array([s[key] for s in stats])
      record[key] = float(values.mean())
      record[key + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    table.append(record)
  return table


TABLE_NOTE = (
  "Mean ± sample standard deviation over seeds, final step, test split. TS: temperature scaling, "
  "T fitted by NLL on the held-out part of the training split (never the test split); accuracy "
  "does not change under it. ECE and MCE: top-label, {bins} equal-width bins; adaptive ECE: "
  "{bins} equal-mass bins; classwise ECE: every class's probability, {bins} bins, averaged over "
  "classes. —: not logged by this run."
)


def _cell(rec: dict, key: str) -> str:
  if np.isnan(rec[key]):
    return "—"
  digits = 0 if key == "examples_per_s" else (2 if key in ("step_time_ms", "temperature") else 4)
  spread = f" ± {rec[key + '_std']:.{digits}f}" if rec["seeds"] > 1 else ""
  return f"{rec[key]:.{digits}f}{spread}"


def _write_tables(directory: pathlib.Path, table: list[dict], num_bins: int) -> None:
  header = ["variant", "seeds"] + [title for _, title in COLUMNS]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for rec in table:
    lines.append(
      "| "
      + " | ".join([rec["group"], str(rec["seeds"])] + [_cell(rec, key) for key, _ in COLUMNS])
      + " |"
    )
  lines += ["", TABLE_NOTE.format(bins=num_bins)]
  (directory / "table.md").write_text("\n".join(lines) + "\n")
  with (directory / "table.csv").open("w", newline="") as f:
    writer = csv.writer(f)
    keys = [k for key, _ in COLUMNS + CSV_ONLY_COLUMNS for k in (key, key + "_std")]
    writer.writerow(["variant", "seeds"] + keys)
    for rec in table:
      writer.writerow([rec["group"], rec["seeds"]] + [f"{rec[k]:.6g}" for k in keys])


def build_report(directory) -> list[dict]:
  """Writes ``table.md``, ``table.csv`` and ``plots/*.png`` for the runs under ``directory``.

  Returns:
    The table records (one per group), or an empty list when no run has finished.
  """
  directory = pathlib.Path(directory)
  groups = load_runs(directory)
  if not groups:
    return []
  table = summarize(groups)
  first = next(iter(groups.values()))[0]["summary"]
  _write_tables(directory, table, num_bins=len(first["calibration_counts"]["count"]))
  plots = directory / "plots"
  plots.mkdir(exist_ok=True)
  # Imported here: matplotlib takes half a second to load, and only the report draws.
  from xent_jax.train import plots as plots_lib  # pylint: disable=import-outside-toplevel

  plots_lib.draw_all(plots, groups, table, title=directory.resolve().name)
  return table
