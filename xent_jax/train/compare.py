"""`run_comparison`: every run of a config's grid, skipping finished ones, then the report.

Runs train in vectorized groups (`grouping.plan_groups`, `sweep.train_group`): runs that differ
only in seed, label noise, learning rate or loss hyper-parameter values share one compiled
program, and on CPU several groups train at once (`lanes.run_in_lanes`).
``compare.group_mode: sequential`` (``--sequential``) trains one run after another as
`trainer.train_and_evaluate` does, and so does a multi-process (``--distributed``) comparison.
"""

import contextlib
import math
import pathlib
import threading
import time

import jax
from tqdm import tqdm

from xent_jax.train import logs
from xent_jax.train.config import Config, expand_grid
from xent_jax.train.data import load_dataset
from xent_jax.train.grouping import Group, plan_groups, split_group
from xent_jax.train.lanes import choose_lanes, parts_per_group, run_in_lanes
from xent_jax.train.members import member_bytes
from xent_jax.train.report import build_report
from xent_jax.train.sweep import GroupPrograms, choose_mode, train_group
from xent_jax.train.trainer import (
  NonFiniteLossError,
  check_run_directory,
  exclusive,
  train_and_evaluate,
)


def run_dir(workdir: pathlib.Path, run: Config) -> pathlib.Path:
  """``workdir/<group>/seed_<seed>``: where one run of a comparison lives."""
  return workdir / run.name / f"seed_{run.train.seed}"


def run_comparison(config: Config, *, progress: bool = True, devices=None) -> list[str]:
  """Runs loss variants x seeds x grid values of ``config`` under ``config.workdir``.

  Finished runs (``summary.json`` marked completed) are not redone, and no run starts before
  every existing run directory passed `train_and_evaluate`'s check (`check_run_directory`): a
  finished run of a different config is refused, never reused.
  Interrupted ones resume from their checkpoints. A run stopped by a NaN/Inf loss is reported and
  the others go on; any other error stops the comparison. Builds
  ``table.md``, ``table.csv`` and ``plots/`` from the logged files at the end.

  Args:
    config: the comparison's config; ``compare.group_mode`` and ``compare.group_memory_mb``
      choose how its runs train.
    progress: show progress bars.
    devices: the devices to train on (default: all).

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
  if config.compare.group_mode == "sequential" or jax.process_count() > 1:
    failures = _run_sequential(runs, workdir, progress=progress, devices=devices)
  else:
    failures = _run_groups(runs, workdir, config, progress=progress, devices=devices)
  build_report(workdir)
  return failures


def _summary_line(summary: dict) -> str:
  final = summary["final"]
  return (
    f"accuracy={final['eval/accuracy']:.4f} nll={final['eval/nll']:.4f} "
    f"ece={final['eval/ece']:.4f} brier={final['eval/brier']:.4f}"
  )


def _run_sequential(runs, workdir: pathlib.Path, *, progress: bool, devices) -> list[str]:
  """One run after another (`train_and_evaluate`); runs that differ only in seed or labels share
  their compiled programs (`trainer.run_programs`)."""
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
      summary = train_and_evaluate(run, directory, progress=progress, devices=devices)
    except NonFiniteLossError as err:
      failures.append(str(err))
      tqdm.write(f"{head}: FAILED: {err}")
      continue
    tqdm.write(f"{head}: {_summary_line(summary)} ({time.perf_counter() - tic:.1f}s)")
  return failures


def _budgeted(group: Group, budget: int) -> list[Group]:
  """``group`` split so that each part's estimated memory (`members.member_bytes`) fits."""
  run = group.runs[0]
  per_member = member_bytes(run, load_dataset(run.data, image=run.model.name == "cnn"))
  return split_group(group, budget // per_member)


def _run_groups(runs, workdir, config: Config, *, progress: bool, devices) -> list[str]:
  """The unfinished runs in vectorized groups, each group one program, ``compare.lanes`` of
  them at once (`lanes.run_in_lanes`)."""
  mode = choose_mode(config.compare.group_mode)
  budget = config.compare.group_memory_mb * 2**20
  lanes = choose_lanes(config.compare.lanes, mode)
  todo = []
  for run in runs:
    if logs.read_summary(run_dir(workdir, run)):
      tqdm.write(f"{run.name} seed={run.train.seed}: already finished, skipped")
    else:
      todo.append(run)
  groups = [part for group in plan_groups(todo) for part in _budgeted(group, budget)]
  forced = config.compare.lanes > 0
  groups = [part for group in groups for part in _lane_parts(group, lanes, forced=forced)]
  bar = tqdm(total=len(groups), disable=not progress, desc="groups", unit="group")
  stop = threading.Event()

  def task(index: int, group: Group):
    def train(lane: int) -> list[str]:
      label = f"[group {index}/{len(groups)}] {group.runs[0].name}"
      failures = _train_group(group, workdir, mode, devices, progress, label, lane, stop)
      bar.update(1)
      return failures

    return train

  tasks = [task(index, group) for index, group in enumerate(groups, 1)]
  try:
    return [failure for failures in run_in_lanes(tasks, lanes, stop) for failure in failures]
  finally:
    bar.close()


def _lane_parts(group: Group, lanes: int, *, forced: bool) -> list[Group]:
  """``group`` cut into `lanes.parts_per_group` near-equal parts, so that a large group fills
  every lane."""
  runs = len(group.runs)
  parts = parts_per_group(runs, group.runs[0].train.num_steps, lanes, forced=forced)
  return split_group(group, math.ceil(runs / parts))


def _train_group(group, workdir, mode, devices, progress, label, lane, stop) -> list[str]:
  """Trains one group (its members locked for the whole time); its failed members' messages."""
  tic = time.perf_counter()
  with contextlib.ExitStack() as stack:
    directories = _lock_members(group, workdir, stack)
    if not directories:
      return []
    group = Group(
      tuple(run for run in group.runs if run_dir(workdir, run) in directories), group.traced
    )
    programs = GroupPrograms(group, mode, devices)
    outcomes = train_group(
      programs, directories, progress=progress, label=label, position=lane + 1, stop=stop
    )
  seconds = time.perf_counter() - tic
  failures = []
  for outcome in outcomes:
    head = f"{outcome.run.name} seed={outcome.run.train.seed}"
    if outcome.error or outcome.summary is None:
      failures.append(str(outcome.error))
    else:
      tqdm.write(
        f"{head}: {_summary_line(outcome.summary)} (group of {len(outcomes)}, {seconds:.1f}s)"
      )
  return failures


def _lock_members(group: Group, workdir: pathlib.Path, stack) -> list[pathlib.Path]:
  """Locks and checks each member's directory (held until ``stack`` closes); the directories of
  the members still to train (one finished meanwhile by another process is left out)."""
  directories = []
  for run in group.runs:
    directory = run_dir(workdir, run)
    directory.mkdir(parents=True, exist_ok=True)
    stack.enter_context(exclusive(directory))
    check_run_directory(run, directory)
    if logs.read_summary(directory):
      tqdm.write(f"{run.name} seed={run.train.seed}: already finished, skipped")
      continue
    directories.append(directory)
  return directories
