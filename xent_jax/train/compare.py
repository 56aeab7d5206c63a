"""`run_comparison`: every run of a config's grid, skipping finished ones, then the report."""

import pathlib
import time

from tqdm import tqdm

from xent_jax.train import logs
from xent_jax.train.config import Config, expand_grid
from xent_jax.train.report import build_report
from xent_jax.train.trainer import NonFiniteLossError, check_run_directory, train_and_evaluate


def run_dir(workdir: pathlib.Path, run: Config) -> pathlib.Path:
  """``workdir/<group>/seed_<seed>``: where one run of a comparison lives."""
  return workdir / run.name / f"seed_{run.train.seed}"


def run_comparison(config: Config, *, progress: bool = True) -> list[str]:
  """Runs loss variants x seeds x grid values of ``config`` under ``config.workdir``.

  Finished runs (``summary.json`` marked completed) are not redone, and no run starts before
  every existing run directory passed `train_and_evaluate`'s check (`check_run_directory`): a
  finished run of a different config is refused, never reused.
  Interrupted ones resume from their checkpoints. A run stopped by a NaN/Inf loss is reported and
  the others go on; any other error stops the comparison. Builds
  ``table.md``, ``table.csv`` and ``plots/`` from the logged files at the end.

  Returns:
    The error messages of failed runs (empty when all finished).

  Raises:
    RunDirectoryError: a run's directory holds another config's run (naming the directory and
      the keys), or another process is using it.
  """
  workdir = pathlib.Path(config.workdir)
  runs = expand_grid(config)
  for run in runs:  # before any training: a clash found late would waste the runs before it
    if run_dir(workdir, run).is_dir():
      check_run_directory(run, run_dir(workdir, run))
  failures = []
  bar = tqdm(runs, disable=not progress, desc="runs", unit="run")
  for index, run in enumerate(bar, 1):
    directory = run_dir(workdir, run)
    head = f"[{index}/{len(runs)}] {run.name} seed={run.train.seed}"
    if logs.read_summary(directory):
      tqdm.write(f"{head}: already finished, skipped")
      continue
    tic = time.perf_counter()
    try:
      summary = train_and_evaluate(run, directory, progress=progress)
    except NonFiniteLossError as err:
      failures.append(str(err))
      tqdm.write(f"{head}: FAILED: {err}")
      continue
    final = summary["final"]
    tqdm.write(
      f"{head}: accuracy={final['eval/accuracy']:.4f} nll={final['eval/nll']:.4f} "
      f"ece={final['eval/ece']:.4f} brier={final['eval/brier']:.4f} "
      f"({time.perf_counter() - tic:.1f}s)"
    )
  build_report(workdir)
  return failures
