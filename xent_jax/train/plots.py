"""The comparison's plots: learning curves, reliability diagrams, accuracy against ECE.

Each figure is a grid of panels, one column per grid setting (``label_noise=0.4``), one colour
per loss (the same in every figure), with the legend and a caption in a footer row. Drawn with
matplotlib's Agg backend from the runs :func:`xent_jax.train.report.load_runs` reads and the table
:func:`xent_jax.train.report.summarize` makes.
"""

import itertools
import pathlib

import matplotlib
import matplotlib.lines
import matplotlib.patches
import matplotlib.ticker
import numpy as np

from xent_jax import metrics

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position


def draw_all(plots: pathlib.Path, groups: dict[str, list[dict]], table: list[dict], title: str):
  """Writes ``learning_curves.png``, ``reliability.png`` and ``accuracy_vs_ece.png`` into
  ``plots``, each titled with ``title`` (the comparison's directory name)."""
  _plot_learning_curves(plots / "learning_curves.png", groups, title)
  _plot_reliability(plots / "reliability.png", groups, title)
  _plot_accuracy_vs_ece(plots / "accuracy_vs_ece.png", groups, table, title)


def _setting(summary: dict) -> str:
  """The grid values a run was made with (``"label_noise=0.4"``), "" when there is no grid."""
  group, loss = summary["group"], summary["loss"]
  if group == loss:
    return ""
  return group[: -len(loss)].rstrip("_") if group.endswith("__" + loss) else group


def _facets(groups: dict[str, list[dict]]):
  """Settings and losses in order of first appearance, and ``{(setting, loss): runs}``."""
  cells = {}
  for runs in groups.values():
    summary = runs[0]["summary"]
    cells[(_setting(summary), summary["loss"])] = runs
  settings = list(dict.fromkeys(setting for setting, _ in cells))
  losses = list(dict.fromkeys(loss for _, loss in cells))
  return settings, losses, cells


def loss_colours(losses: list[str]) -> dict[str, tuple]:
  """One colour per loss, the same in every panel: tab10, tab20 beyond 10, evenly spaced beyond
  20."""
  if len(losses) <= 10:
    colours = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]  # a ListedColormap
  elif len(losses) <= 20:
    colours = plt.get_cmap("tab20").colors  # type: ignore[attr-defined]  # a ListedColormap
  else:
    colours = plt.get_cmap("turbo")(np.linspace(0.05, 0.95, len(losses)))
  return {loss: tuple(colours[i]) for i, loss in enumerate(losses)}


LEGEND_COLUMNS = 5


def _legend_columns(labels: list[str], width: float) -> int:
  """Legend columns that fit ``width`` inches at 8 pt (about 0.07 in a character, 0.6 in for the
  handle and gaps), at most `LEGEND_COLUMNS`."""
  longest = max((len(line) for label in labels for line in label.split("\n")), default=1)
  fits = int(width // (0.07 * longest + 0.6))
  return max(1, min(len(labels), LEGEND_COLUMNS, fits))


def _figure(
  title: str,
  num_rows: int,
  num_cols: int,
  panel_size: tuple[float, float],
  legend_labels: list[str],
):
  """A titled figure: a grid of panels and, under them, a footer row for the legend and caption."""
  width = max(panel_size[0] * num_cols + 0.8, 7.5)
  legend_rows = -(-len(legend_labels) // _legend_columns(legend_labels, width))
  footer_height = 0.25 * legend_rows + 0.6
  fig = plt.figure(
    layout="constrained", figsize=(width, panel_size[1] * num_rows + footer_height + 0.5)
  )
  grid = fig.add_gridspec(
    num_rows + 1, num_cols, height_ratios=[panel_size[1]] * num_rows + [footer_height]
  )
  axes = np.array([[fig.add_subplot(grid[r, c]) for c in range(num_cols)] for r in range(num_rows)])
  footer = fig.add_subplot(grid[num_rows, :], label="caption")
  footer.axis("off")
  fig.suptitle(title, fontsize=12)
  return fig, axes


def _finish(fig, path: pathlib.Path, handles, caption: str) -> None:
  """Legend and caption in the footer row under the panels; saved at 110 dpi."""
  footer = next(ax for ax in fig.axes if ax.get_label() == "caption")
  footer.legend(
    handles=handles,
    loc="upper center",
    ncols=_legend_columns([h.get_label() for h in handles], fig.get_figwidth()),
    fontsize=8,
    frameon=False,
    borderaxespad=0,
  )
  footer.text(
    0.5, 0.0, caption, transform=footer.transAxes, ha="center", va="bottom", fontsize=8, wrap=True
  )
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _loss_handles(colours: dict[str, tuple]) -> list:
  return [
    matplotlib.lines.Line2D([], [], color=c, linewidth=2.5, label=loss)
    for loss, c in colours.items()
  ]


def _setting_title(setting: str) -> str:
  return setting.replace("__", ", ") or "all runs"


class _DecimalLogFormatter(matplotlib.ticker.LogFormatter):
  """Log-axis tick labels as plain decimals (0.4, 2, 30) where matplotlib's default writes
  4x10^-1; the same ticks are labelled."""

  def __call__(self, x, pos=None):
    return f"{x:g}" if super().__call__(x, pos) else ""


def _plot_learning_curves(path: pathlib.Path, groups: dict[str, list[dict]], title: str) -> None:
  """Rows: training loss, test accuracy, test NLL; columns: grid settings; colour: loss."""
  panels = (
    ("train/loss", "training loss\n(each loss's own)", "log"),
    ("eval/accuracy", "test accuracy", "linear"),
    ("eval/nll", "test NLL", "log"),
  )
  settings, losses, cells = _facets(groups)
  colours = loss_colours(losses)
  fig, axes = _figure(f"{title}: learning curves", len(panels), len(settings), (4.2, 2.6), losses)
  num_seeds = set()
  for col, setting in enumerate(settings):
    for loss in losses:
      runs = cells.get((setting, loss))
      if not runs:
        continue
      steps = [row["step"] for row in runs[0]["rows"]]
      complete = [run for run in runs if [row["step"] for row in run["rows"]] == steps]
      num_seeds.add(len(complete))
      for row_index, (key, _, _) in enumerate(panels):
        ax = axes[row_index, col]
        curves = np.array([[row[key] for row in run["rows"]] for run in complete])
        ax.plot(steps, curves.mean(0), color=colours[loss], linewidth=1.4, label=loss)
        if len(curves) > 1:
          ax.fill_between(
            steps, curves.min(0), curves.max(0), color=colours[loss], alpha=0.15, linewidth=0
          )
    axes[0, col].set_title(_setting_title(setting), fontsize=10)
    axes[-1, col].set_xlabel("training step")
  for row_index, (_, label, scale) in enumerate(panels):
    axes[row_index, 0].set_ylabel(label)
    for ax in axes[row_index]:
      ax.set_yscale(scale)
      if scale == "log":
        ax.yaxis.set_major_formatter(_DecimalLogFormatter())
        ax.yaxis.set_minor_formatter(_DecimalLogFormatter(labelOnlyBase=False))
      ax.grid(alpha=0.3)
  seeds = "/".join(str(n) for n in sorted(num_seeds))
  columns = " in every panel; columns: grid settings" if len(settings) > 1 else ""
  _finish(
    fig,
    path,
    _loss_handles(colours),
    f"Line: mean over {seeds} seeds; band: min to max over the seeds. One colour per loss"
    f"{columns}; curves that coincide hide one another. Test metrics on the clean test split.",
  )


def _summed_counts(runs: list[dict], key: str):
  counts = [run["summary"].get(key) for run in runs]
  if any(c is None for c in counts):
    return None
  return metrics.CalibrationCounts(
    *(np.sum([c[field] for c in counts], axis=0) for field in metrics.CalibrationCounts._fields)
  )


def _plot_reliability(path: pathlib.Path, groups: dict[str, list[dict]], title: str) -> None:
  """Rows: grid settings; columns: losses. Bars before temperature scaling, outline after."""
  settings, losses, cells = _facets(groups)
  colours = loss_colours(losses)
  fig, axes = _figure(
    f"{title}: reliability diagrams (test split, all seeds pooled)",
    len(settings),
    len(losses),
    (2.3, 2.3),
    ["model's own confidence", "after temperature", "perfect calibration"],
  )
  num_bins, any_after = 0, False
  for (row, setting), (col, loss) in itertools.product(enumerate(settings), enumerate(losses)):
    ax = axes[row, col]
    runs = cells.get((setting, loss))
    ax.set(xlim=(0, 1), ylim=(0, 1), aspect="equal")
    ax.plot([0, 1], [0, 1], color="0.4", linestyle="--", linewidth=0.8)
    if row == 0:  # the loss names the column, above the top row's ECE titles (set below)
      ax.annotate(
        loss,
        xy=(0.5, 1),
        xycoords=ax.title,
        xytext=(0, 2),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=9,
        color=colours[loss],
      )
    if col == 0:
      ax.set_ylabel(f"{_setting_title(setting)}\naccuracy" if setting else "accuracy", fontsize=9)
    if row == len(settings) - 1:
      ax.set_xlabel("confidence", fontsize=9)
    ax.tick_params(labelsize=7)
    if not runs:
      continue
    before = _summed_counts(runs, "calibration_counts")
    accuracy_K = np.asarray(metrics.reliability_from_counts(before).accuracy)  # NaN: empty bin
    num_bins = len(accuracy_K)
    edges = np.linspace(0, 1, num_bins + 1)
    ax.bar(
      edges[:-1],
      accuracy_K,
      width=1 / num_bins,
      align="edge",
      color=colours[loss],
      alpha=0.55,
      edgecolor="white",
      linewidth=0.3,
    )
    text = f"ECE {float(metrics.ece_from_counts(before)):.3f}"
    after = _summed_counts(runs, "calibration_counts_ts")
    if after is not None:
      any_after = True
      after_K = np.asarray(metrics.reliability_from_counts(after).accuracy)
      ax.stairs(after_K, edges, baseline=None, color="k", linewidth=1.0)
      text += f"\nafter TS {float(metrics.ece_from_counts(after)):.3f}"
    ax.set_title(text, fontsize=7, pad=3)  # above the axes, where no bar reaches it
  handles = [
    matplotlib.patches.Patch(
      color="0.5", alpha=0.55, label="model's own confidence\n(colour: loss)"
    ),
    matplotlib.lines.Line2D(
      [], [], color="0.4", linestyle="--", linewidth=0.8, label="perfect calibration"
    ),
  ]
  ts_note = ""
  if any_after:
    handles.insert(
      1,
      matplotlib.lines.Line2D(
        [], [], color="k", linewidth=1.0, label="after temperature\nscaling (TS)"
      ),
    )
    ts_note = " TS: temperature fitted on held-out training data, never the test split."
  _finish(
    fig,
    path,
    handles,
    f"Height: accuracy of the test examples whose top-label confidence falls in the bin "
    f"({num_bins} equal-width bins; empty bins not drawn), all seeds pooled, as is the ECE "
    f"printed above each panel. Dashed diagonal: accuracy = confidence; bars below it are "
    f"over-confident.{ts_note}",
  )


def _plot_accuracy_vs_ece(
  path: pathlib.Path, groups: dict[str, list[dict]], table: list[dict], title: str
) -> None:
  """One panel per grid setting: (ECE, accuracy) per loss, and where temperature scaling moves
  it."""
  settings, losses, _ = _facets(groups)
  colours = loss_colours(losses)
  records = {
    (_setting(groups[rec["group"]][0]["summary"]), groups[rec["group"]][0]["summary"]["loss"]): rec
    for rec in table
  }
  fig, axes = _figure(
    f"{title}: test accuracy against calibration error",
    1,
    len(settings),
    (4.4, 4.0),
    [*losses, "before TS", "after TS"],
  )
  for ax, setting in zip(axes[0], settings):
    for loss in losses:
      rec = records.get((setting, loss))
      if rec is None:
        continue
      colour = colours[loss]
      ax.errorbar(
        rec["final_ece"],
        rec["final_accuracy"],
        xerr=rec["final_ece_std"],
        yerr=rec["final_accuracy_std"],
        fmt="o",
        color=colour,
        capsize=3,
        markersize=6,
      )
      if not np.isnan(rec["final_ece_ts"]):
        ax.errorbar(
          rec["final_ece_ts"],
          rec["final_accuracy"],
          xerr=rec["final_ece_ts_std"],
          fmt="o",
          color=colour,
          markerfacecolor="white",
          capsize=2,
          markersize=6,
        )
        ax.annotate(
          "",
          (rec["final_ece_ts"], rec["final_accuracy"]),
          (rec["final_ece"], rec["final_accuracy"]),
          arrowprops={
            "arrowstyle": "->",
            "color": colour,
            "linewidth": 0.8,
            "shrinkA": 4,
            "shrinkB": 4,
          },
        )
    ax.set_title(_setting_title(setting), fontsize=10)
    ax.set_xlabel("ECE (top-label, final)")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
  axes[0, 0].set_ylabel("test accuracy (final)")
  handles = _loss_handles(colours)
  ts_note = ""
  if any(not np.isnan(rec["final_ece_ts"]) for rec in table):
    handles += [
      matplotlib.lines.Line2D([], [], marker="o", color="0.3", linestyle="", label="before TS"),
      matplotlib.lines.Line2D(
        [], [], marker="o", color="0.3", markerfacecolor="white", linestyle="", label="after TS"
      ),
    ]
    ts_note = (
      " Arrow: the same models after temperature scaling (TS, T fitted on held-out "
      "training data), which keeps accuracy."
    )
  _finish(
    fig,
    path,
    handles,
    f"Error bars: ± 1 sample standard deviation over seeds; points that coincide hide one "
    f"another.{ts_note} Up and to the left is better.",
  )
