"""Tables and plots of a comparison, rebuilt from the logged files alone.

Reads every ``*/seed_*/summary.json`` and ``metrics.jsonl`` under a directory, groups runs by
their group name (all config values but the seed), and writes ``table.md``, ``table.csv`` and
``plots/{learning_curves,reliability,accuracy_vs_ece}.png``.
"""

import csv
import pathlib

import matplotlib
import numpy as np

from xent_jax import metrics
from xent_jax.train import logs

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position

COLUMNS = [
    ("final_accuracy", "final test acc"),
    ("best_accuracy", "best test acc"),
    ("final_nll", "NLL"),
    ("final_ece", "ECE"),
    ("final_brier", "Brier"),
    ("examples_per_s", "train examples/s"),
    ("step_time_ms", "step time (ms)"),
]


def load_runs(directory: pathlib.Path) -> dict[str, list[dict]]:
  """Finished runs under ``directory`` grouped by group name: summary plus metric rows."""
  groups: dict[str, list[dict]] = {}
  for summary_path in sorted(directory.glob(f"*/seed_*/{logs.SUMMARY_FILE}")):
    run_dir = summary_path.parent
    summary = logs.read_summary(run_dir)
    rows = logs.read_metrics(run_dir)
    if summary is None or not rows:
      continue
    groups.setdefault(summary["group"], []).append({"summary": summary, "rows": rows})
  return groups


def run_stats(run: dict) -> dict[str, float]:
  """The table's numbers for one run, from its files."""
  rows, final = run["rows"], run["summary"]["final"]
  return {
      "final_accuracy": final["eval/accuracy"],
      "best_accuracy": max(row["eval/accuracy"] for row in rows),
      "final_nll": final["eval/nll"],
      "final_ece": final["eval/ece"],
      "final_brier": final["eval/brier"],
      "examples_per_s": float(np.median([row["train/examples_per_s"] for row in rows])),
      "step_time_ms": 1e3 * float(np.median([row["train/step_time_s"] for row in rows])),
  }


def summarize(groups: dict[str, list[dict]]) -> list[dict]:
  """One record per group: mean and sample std over seeds of every column."""
  table = []
  for group, runs in groups.items():
    stats = [run_stats(run) for run in runs]
    record = {"group": group, "seeds": len(runs)}
    for key, _ in COLUMNS:
      values = np.array([s[key] for s in stats])
      record[key] = float(values.mean())
      record[key + "_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    table.append(record)
  return table


def _write_tables(directory: pathlib.Path, table: list[dict]) -> None:
  header = ["variant", "seeds"] + [title for _, title in COLUMNS]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for rec in table:
    cells = [rec["group"], str(rec["seeds"])]
    for key, _ in COLUMNS:
      digits = 0 if key == "examples_per_s" else (2 if key == "step_time_ms" else 4)
      spread = f" ± {rec[key + '_std']:.{digits}f}" if rec["seeds"] > 1 else ""
      cells.append(f"{rec[key]:.{digits}f}{spread}")
    lines.append("| " + " | ".join(cells) + " |")
  (directory / "table.md").write_text("\n".join(lines) + "\n")
  with (directory / "table.csv").open("w", newline="") as f:
    writer = csv.writer(f)
    keys = [k for key, _ in COLUMNS for k in (key, key + "_std")]
    writer.writerow(["variant", "seeds"] + keys)
    for rec in table:
      writer.writerow([rec["group"], rec["seeds"]] + [f"{rec[k]:.6g}" for k in keys])


def _plot_learning_curves(path: pathlib.Path, groups: dict[str, list[dict]]) -> None:
  panels = (("train/loss", "training loss (each variant's own)", "log"),
            ("eval/accuracy", "test accuracy", "linear"),
            ("eval/nll", "test NLL", "log"))
  fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.8))
  for group, runs in groups.items():
    steps = [row["step"] for row in runs[0]["rows"]]
    complete = [run for run in runs if [row["step"] for row in run["rows"]] == steps]
    for ax, (key, _, _) in zip(axes, panels):
      curves = np.array([[row[key] for row in run["rows"]] for run in complete])
      (line,) = ax.plot(steps, curves.mean(0), label=group)
      if len(curves) > 1:
        ax.fill_between(steps, curves.min(0), curves.max(0), alpha=0.15, color=line.get_color())
  for ax, (_, title, scale) in zip(axes, panels):
    ax.set(xlabel="step", ylabel=title, yscale=scale)
  axes[0].set_title("mean over seeds; band = min..max", fontsize=8)
  axes[-1].legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_reliability(path: pathlib.Path, groups: dict[str, list[dict]]) -> None:
  cols = min(4, len(groups))
  rows = -(-len(groups) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
  for ax, (group, runs) in zip(axes.flat, groups.items()):
    counts = [run["summary"]["calibration_counts"] for run in runs]
    summed = metrics.CalibrationCounts(
        *(np.sum([c[field] for c in counts], axis=0) for field in metrics.CalibrationCounts._fields)
    )
    accuracy_K = np.asarray(metrics.reliability_from_counts(summed).accuracy)  # NaN: empty bin
    num_bins = len(accuracy_K)
    centers_K = (np.arange(num_bins) + 0.5) / num_bins
    ax.bar(centers_K, accuracy_K, width=1 / num_bins, edgecolor="k", linewidth=0.4)
    ax.plot([0, 1], [0, 1], "r--", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
    ax.set_title(group, fontsize=7)
  for ax in list(axes.flat)[len(groups):]:
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_accuracy_vs_ece(path: pathlib.Path, table: list[dict]) -> None:
  fig, ax = plt.subplots(figsize=(6.5, 5))
  for rec in table:
    ax.errorbar(rec["final_ece"], rec["final_accuracy"], xerr=rec["final_ece_std"],
                yerr=rec["final_accuracy_std"], fmt="o", capsize=3)
    ax.annotate(rec["group"], (rec["final_ece"], rec["final_accuracy"]), fontsize=6,
                xytext=(3, 3), textcoords="offset points")
  ax.set(xlabel="expected calibration error (final)", ylabel="test accuracy (final)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


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
  _write_tables(directory, table)
  plots = directory / "plots"
  plots.mkdir(exist_ok=True)
  _plot_learning_curves(plots / "learning_curves.png", groups)
  _plot_reliability(plots / "reliability.png", groups)
  _plot_accuracy_vs_ece(plots / "accuracy_vs_ece.png", table)
  return table
