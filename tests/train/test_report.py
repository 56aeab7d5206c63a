"""Tables and figures of `build_report`, from synthetic run files: new calibration columns, and
figures a reader understands alone (title, legend, caption, one colour per loss everywhere)."""

import ast
import csv
import json
import pathlib

import matplotlib
import matplotlib.backends.backend_agg
import numpy as np
import pytest

from xent_jax.train import plots, report

NUM_BINS = 5
FINAL_KEYS = (
  "accuracy",
  "nll",
  "ece",
  "brier",
  "adaptive_ece",
  "classwise_ece",
  "mce",
  "nll_ts",
  "ece_ts",
  "brier_ts",
  "adaptive_ece_ts",
  "classwise_ece_ts",
  "mce_ts",
  "temperature",
)


def _counts(rng):
  count = rng.integers(0, 20, NUM_BINS).astype(float)
  return {
    "count": count.tolist(),
    "confidence_sum": (count * 0.5).tolist(),
    "correct_sum": np.floor(count * 0.4).tolist(),
  }


def _write_run(directory, setting, loss, seed, rng, *, with_ts=True):
  group = f"{setting}__{loss}" if setting else loss
  run_dir = directory / group / f"seed_{seed}"
  run_dir.mkdir(parents=True)
  final = {
    f"eval/{key}": float(rng.uniform(0.01, 0.9))
    for key in FINAL_KEYS
    if with_ts
    or not (key.endswith("_ts") or key in ("temperature", "adaptive_ece", "classwise_ece", "mce"))
  }
  summary = {
    "completed": True,
    "group": group,
    "loss": loss,
    "seed": seed,
    "num_steps": 20,
    "num_devices": 1,
    "final": final,
    "calibration_counts": _counts(rng),
    "calibration_counts_ts": _counts(rng) if with_ts else None,
  }
  (run_dir / "summary.json").write_text(json.dumps(summary))
  rows = [
    {
      "step": step,
      "train/loss": float(rng.uniform(0.1, 2)),
      "eval/accuracy": float(rng.uniform()),
      "eval/nll": float(rng.uniform(0.1, 2)),
      "eval/ece": 0.1,
      "eval/brier": 0.2,
      "train/examples_per_s": 1000.0,
      "train/step_time_s": 0.001,
    }
    for step in (10, 20)
  ]
  (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
  return final


@pytest.fixture(name="figures")
def _figures(monkeypatch):
  """Every figure `build_report` saves, kept for inspection."""
  saved = []
  original = matplotlib.figure.Figure.savefig

  def keep(fig, path, **kwargs):
    saved.append((str(path), fig))
    original(fig, path, **kwargs)

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
  return saved


def test_table_has_calibration_before_and_after_temperature_scaling(tmp_path):
  rng = np.random.default_rng(0)
  finals = [_write_run(tmp_path, "label_noise=0.2", "focal", seed, rng) for seed in range(3)]
  _write_run(tmp_path, "label_noise=0.2", "old_run", 0, rng, with_ts=False)
  report.build_report(tmp_path)
  with (tmp_path / "table.csv").open() as f:
    rows = {row["variant"]: row for row in csv.DictReader(f)}
  focal = rows["label_noise=0.2__focal"]
  for column, key in (
    ("final_ece_ts", "ece_ts"),
    ("temperature", "temperature"),
    ("final_adaptive_ece", "adaptive_ece"),
    ("final_classwise_ece", "classwise_ece"),
    ("final_mce", "mce"),
    ("final_mce_ts", "mce_ts"),
    ("final_nll_ts", "nll_ts"),
  ):
    values = np.array([final[f"eval/{key}"] for final in finals], np.float64)
    np.testing.assert_allclose(float(focal[column]), values.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(focal[column + "_std"]), values.std(ddof=1), rtol=1e-5)
  markdown = (tmp_path / "table.md").read_text()
  header = markdown.splitlines()[0]
  for title in ("ECE", "ECE after TS", "T", "adaptive ECE", "classwise ECE", "MCE"):
    assert f"| {title} |" in header
  old = next(
    line for line in markdown.splitlines() if line.startswith("| label_noise=0.2__old_run ")
  )
  assert old.count("—") == 6  # NLL/ECE after TS, T, adaptive, classwise, MCE: not logged
  assert "never the test split" in markdown and f"{NUM_BINS} equal-mass bins" in markdown


def test_loss_colours_are_distinct_beyond_ten_losses():
  for n in (3, 14, 25):
    colours = plots.loss_colours([f"loss{i}" for i in range(n)])
    assert len(set(colours.values())) == n


def test_figures_have_title_legend_caption_and_one_colour_per_loss(tmp_path, figures):
  rng = np.random.default_rng(1)
  directory = tmp_path / "my_comparison"
  losses = [f"loss_{i:02d}" for i in range(12)]
  for setting in ("label_noise=0.0", "label_noise=0.4"):
    for loss in losses:
      for seed in (0, 1):
        _write_run(directory, setting, loss, seed, rng)
  report.build_report(directory)
  assert sorted(path.rsplit("/", 1)[1] for path, _ in figures) == [
    "accuracy_vs_ece.png",
    "learning_curves.png",
    "reliability.png",
  ]
  footers = {}
  for path, fig in figures:
    assert "my_comparison" in fig._suptitle.get_text(), path  # pylint: disable=protected-access
    footer = next(ax for ax in fig.axes if ax.get_label() == "caption")
    caption = footer.texts[0].get_text()
    assert "seed" in caption or "diagonal" in caption.lower(), path
    legend_labels = [t.get_text() for t in footer.get_legend().get_texts()]
    if not path.endswith("reliability.png"):
      assert set(losses) <= set(legend_labels), path
    footers[path.rsplit("/", 1)[1]] = footer
  # Learning curves: every loss drawn in the same colour in every panel, losses all different.
  curves = dict(figures)[str(directory / "plots" / "learning_curves.png")]
  legend = footers["learning_curves.png"].get_legend()
  legend = {
    t.get_text(): tuple(h.get_color()) for t, h in zip(legend.get_texts(), legend.legend_handles)
  }
  assert len(set(legend.values())) == len(losses)
  for ax in curves.axes:
    if ax.get_label() == "caption":
      continue
    drawn = {
      line.get_label(): matplotlib.colors.to_rgba(line.get_color()) for line in ax.get_lines()
    }
    assert drawn == {loss: matplotlib.colors.to_rgba(colour) for loss, colour in legend.items()}
  # Noise levels are facets: one column per setting, titled with it.
  titles = {ax.get_title() for ax in curves.axes}
  assert {"label_noise=0.0", "label_noise=0.4"} <= titles


def test_reliability_ece_label_covers_no_bar(tmp_path, figures):
  """The ECE label sits clear of every bar, tall ones included (it used to cover them)."""
  rng = np.random.default_rng(2)
  for loss in ("tall", "short"):
    _write_run(tmp_path, "", loss, 0, rng)
  # Every example correct: every non-empty bar reaches the top of its panel.
  summary_path = tmp_path / "tall" / "seed_0" / "summary.json"
  summary = json.loads(summary_path.read_text())
  summary["calibration_counts"]["count"] = [10.0] * NUM_BINS
  summary["calibration_counts"]["correct_sum"] = [10.0] * NUM_BINS
  summary_path.write_text(json.dumps(summary))
  report.build_report(tmp_path)
  fig = dict(figures)[str(tmp_path / "plots" / "reliability.png")]
  canvas = matplotlib.backends.backend_agg.FigureCanvasAgg(fig)  # build_report closed it
  canvas.draw()
  renderer = canvas.get_renderer()
  panels = [ax for ax in fig.axes if ax.patches]
  assert len(panels) == 2
  tall_panels = 0
  for ax in panels:
    (label,) = [t for t in [ax.title, *ax.texts] if t.get_text().startswith("ECE ")]
    box = label.get_window_extent(renderer)
    bars = [bar.get_window_extent(renderer) for bar in ax.patches]
    reach = max(bar.y1 for bar in bars) - ax.get_window_extent(renderer).y1
    tall_panels += reach > -1
    assert not any(box.overlaps(bar) for bar in bars), label.get_text()
  assert tall_panels == 1  # the bars of "tall" reach the top of their panel


def test_log_axis_ticks_are_plain_decimals(tmp_path, figures):
  """NLL within one decade (0.3 to 0.6): its ticks read 0.3, 0.4, ..., not 4x10^-1."""
  rng = np.random.default_rng(3)
  _write_run(tmp_path, "", "focal", 0, rng)
  metrics_path = tmp_path / "focal" / "seed_0" / "metrics.jsonl"
  rows = [json.loads(line) for line in metrics_path.read_text().splitlines()]
  for row, nll in zip(rows, (0.6, 0.3)):
    row["eval/nll"] = row["train/loss"] = nll
  metrics_path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  report.build_report(tmp_path)
  fig = dict(figures)[str(tmp_path / "plots" / "learning_curves.png")]
  nll_axis = next(ax for ax in fig.axes if ax.get_ylabel() == "test NLL")
  labels = [
    t.get_text()
    for t in nll_axis.get_yticklabels() + nll_axis.get_yticklabels(minor=True)
    if t.get_text()
  ]
  assert "0.4" in labels and "0.3" in labels, labels
  for text in labels:
    assert float(text) == pytest.approx(float(f"{float(text):g}")), text
    assert "10" not in text and "$" not in text and "e" not in text, text


def _imported_modules(node) -> list[str]:
  """The modules an import statement names (``from a import b`` names ``a`` and ``a.b``)."""
  if isinstance(node, ast.Import):
    return [alias.name for alias in node.names]
  if isinstance(node, ast.ImportFrom) and node.module:
    return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
  return []


def test_only_the_plots_module_imports_matplotlib():
  """`xent-jax run` never loads matplotlib (half a second of every run's start-up): no module of
  the package but `xent_jax.train.plots` imports it, and only `report.build_report` imports
  `plots`, inside the function."""
  package = pathlib.Path(report.__file__).resolve().parents[1]
  matplotlib_users, plots_users = set(), set()
  for path in package.rglob("*.py"):
    tree = ast.parse(path.read_text())
    name = path.relative_to(package).as_posix()
    for node in ast.walk(tree):
      modules = _imported_modules(node)
      if any(module.split(".")[0] == "matplotlib" for module in modules):
        matplotlib_users.add(name)
      if "xent_jax.train.plots" in modules:
        plots_users.add((name, node in tree.body))
  assert matplotlib_users == {"train/plots.py"}
  assert plots_users == {("train/report.py", False)}
