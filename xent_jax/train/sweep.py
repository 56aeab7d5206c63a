"""`train_group`: a group's members trained as one compiled program, each logged as its own run.

The members of a `grouping.Group` share their data set (each with its own label noise), their
compiled train, evaluation and logits programs, and one loop over the steps. Every member still
has its own run directory, written exactly as `trainer.train_and_evaluate` writes it
(``config.yaml``, ``metrics.jsonl``, checkpoints, ``summary.json``, ``run.lock`` held for the
whole group), so reports, resumption, the config guard and the lock see no difference.

How the members run (``mode``; `choose_mode` picks it for ``auto``):

- ``vmap``: one vmapped step over the stacked states, members sharded over the mesh's ``members``
  axis. Fills an accelerator that one small model leaves idle.
- ``map``: `jax.lax.map` over the members inside the same compiled step, one member after
  another. On CPU, vmapping a convolution turns it into a grouped convolution that XLA:CPU runs
  several times slower than the members one by one; the group still pays data, compilation and
  metric programs once.

Each member keeps the data order, label noise and initial weights of its sequential run (the same
seed gives the same batches and `jax.random.key`), so its results equal that run's: bit for bit
under ``map``, where the member's step compiles as the sequential one (`steps.make_member_step`),
and up to float rounding under ``vmap``. Members resume from their own checkpoints: a member that
saved a later step than the others waits (its updates are masked) until the group reaches it. A
member whose loss or weights become non-finite is reported as in a sequential run and frozen; the
others go on.

A member's logged throughput (``train/examples_per_s``, ``train/step_time_s``) is the group's
clock: its examples per second while it shared each step with the other members.
"""

import dataclasses
import pathlib
import threading

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from xent_jax.train import logs
from xent_jax.train.checkpoint import Checkpointer
from xent_jax.train.clock import StepClock, logs_after, saves_after
from xent_jax.train.config import Config, to_yaml
from xent_jax.train.data import Dataset, eval_batches, load_dataset, train_batch
from xent_jax.train.grouping import Group
from xent_jax.train.lanes import Stopped
from xent_jax.train.members import (
  graph_of,
  initial_states,
  member_pure,
  model_graph_of,
  model_key,
  restore_members,
)
from xent_jax.train.parallel import member_mesh
from xent_jax.train.steps import (
  calibration_row,
  eval_sums_fn,
  finish_eval,
  logits_fn,
  make_member_step,
  over_members,
)
from xent_jax.train.trainer import (
  CHECKPOINT_DIR,
  check_batch_sizes,
  check_data_sizes,
  make_summary,
  nonfinite_error,
)

GROUP_MODES = ("auto", "vmap", "map")


def choose_mode(mode: str, backend: str | None = None) -> str:
  """The group mode for ``auto``: ``map`` on CPU, ``vmap`` on GPU and TPU (see the module
  docstring); ``vmap`` and ``map`` are returned as given."""
  if mode not in GROUP_MODES:
    raise ValueError(f"group mode must be one of {list(GROUP_MODES)}, got {mode!r}")
  if mode != "auto":
    return mode
  return "map" if (backend or jax.default_backend()) == "cpu" else "vmap"


@dataclasses.dataclass
class Outcome:
  """What became of one member: its summary, or the error that stopped it."""

  run: Config
  summary: dict | None = None
  error: Exception | None = None


class GroupPrograms:
  """A group's data, mesh and compiled programs, built once and shared by all its members."""

  def __init__(self, group: Group, mode: str, devices=None):
    self.runs = list(group.runs)
    self.config = config = group.runs[0]
    self.mode = mode
    self.mesh = member_mesh(devices, len(self.runs), mode)
    self.data_size = self.mesh.shape["data"]
    check_batch_sizes(config.train, self.mesh)
    cache: dict[str, Dataset] = {}
    for run in self.runs:  # members that share a label-noise rate share the arrays too
      key = to_yaml(run.data)
      if key not in cache:
        cache[key] = load_dataset(run.data, image=config.model.name == "cnn")
    self.datasets = [cache[to_yaml(run.data)] for run in self.runs]
    for run, data in zip(self.runs, self.datasets):
      check_data_sizes(data, run)
    self.members = NamedSharding(self.mesh, P("members"))
    self.batch_sharding = NamedSharding(self.mesh, P("members", "data"))
    self.shared_batch = NamedSharding(self.mesh, P("data"))
    self.values = jax.device_put(
      {k: np.asarray(v, np.float32) for k, v in group.values().items()}, self.members
    )
    self.graphdef = graph_of(config, self.datasets[0])
    step = make_member_step(self.graphdef, config, group.traced)
    self.train_step = jax.jit(
      over_members(step, mode, (0, 0, 0, 0, 0)),
      donate_argnums=0,
      out_shardings=(self.members, self.members, self.members),
    )
    self.eval_step, self.logits_step = _model_programs(
      config, self.datasets[0], self.data_size, mode
    )

  def batch(self, step: int):
    """Every member's batch of ``step`` (its own seed and labels), stacked ``[M, B, ...]``."""
    parts = [
      train_batch(data, seed=run.train.seed, step=step, batch_size=run.train.batch_size)
      for run, data in zip(self.runs, self.datasets)
    ]
    x, y = (np.stack(column) for column in zip(*parts))
    return jax.device_put((x, y), self.batch_sharding)

  def evaluate(self, state) -> list[tuple[dict, dict]]:
    """Each member's metric row and calibration counts on the (shared, clean) test split."""
    total = None
    for batch in eval_batches(self.datasets[0], batch_size=self.config.train.eval_batch_size):
      batch = jax.device_put(batch, self.shared_batch)
      sums = jax.device_get(self.eval_step(_models(state), *batch))
      sums = jax.tree.map(lambda a: np.sum(a, axis=1, dtype=np.float64), sums)  # over shards
      total = sums if total is None else jax.tree.map(np.add, total, sums)
    return [finish_eval(jax.tree.map(lambda a, m=m: a[m], total)) for m in range(len(self.runs))]

  def logits(self, state, split: str):
    """``[M, n, C]`` logits of a split and each member's labels ``[n]`` (held-out labels carry
    each member's own noise)."""
    batch_size = self.config.train.eval_batch_size
    logits = []
    for x, _, valid_B in eval_batches(self.datasets[0], batch_size=batch_size, split=split):
      out = np.asarray(self.logits_step(_models(state), jax.device_put(x, self.shared_batch)))
      logits.append(out[:, valid_B].reshape(len(self.runs), -1, out.shape[-1]))
    labels = []
    for data in self.datasets:
      y = data.y_test_M if split == "test" else data.y_holdout_H
      assert y is not None, f"no {split} split"  # holdout is evaluated only where it exists
      labels.append(y.reshape(-1))
    if not logits:
      return np.zeros((len(self.runs), 0, self.datasets[0].num_classes), np.float32), labels
    return np.concatenate(logits, axis=1), labels

  def summaries(self, state, alive) -> list[dict | None]:
    """The ``summary.json`` of every living member (None for a stopped one)."""
    rows = self.evaluate(state)
    holdout, holdout_labels = self.logits(state, "holdout")
    test, test_labels = self.logits(state, "test")
    out: list[dict | None] = []
    for m, run in enumerate(self.runs):
      if not alive[m]:
        out.append(None)
        continue
      row, bins = rows[m]
      calibration, bins_ts = calibration_row(
        holdout[m], holdout_labels[m], test[m], test_labels[m], num_bins=run.train.num_ece_bins
      )
      row.update(calibration)
      out.append(make_summary(run, row, bins, bins_ts, num_devices=self.data_size))
    return out


# ``(eval_step, logits_step)`` of each model, evaluation setting and mode (see `_model_programs`).
_MODEL_PROGRAMS: dict = {}


def _model_programs(config: Config, data: Dataset, num_shards: int, mode: str):
  """``(eval_step, logits_step)`` over the members' models, jitted once per model, evaluation
  setting and mode: the groups of a comparison that differ only in their loss or optimizer share
  these programs, and so compile them once."""
  key = (*model_key(config, data), config.train.num_ece_bins, num_shards, mode)
  if key not in _MODEL_PROGRAMS:
    graphdef = model_graph_of(config, data)
    eval_step = eval_sums_fn(graphdef, num_bins=config.train.num_ece_bins, num_shards=num_shards)
    _MODEL_PROGRAMS[key] = (
      jax.jit(over_members(eval_step, mode, (0, None, None, None))),
      jax.jit(over_members(logits_fn(graphdef), mode, (0, None))),
    )
  return _MODEL_PROGRAMS[key]


def _models(state):
  """The members' models of a stacked ``(model, optimizer)`` state."""
  return state[0]


def open_members(programs: GroupPrograms, directories: list[pathlib.Path]):
  """Writes each member's ``config.yaml`` and restores its checkpoint.

  Returns:
    ``(state, checkpointers, starts)``: the stacked state, each member's `Checkpointer` (None
    when checkpoints are off) and the step each member resumes from.
  """
  train = programs.config.train
  for run, directory in zip(programs.runs, directories):
    recorded = directory / logs.CONFIG_FILE
    if not recorded.exists():
      logs.write_atomic(recorded, to_yaml(run))
  checkpointers = [
    Checkpointer(d / CHECKPOINT_DIR, max_to_keep=train.max_checkpoints)
    if train.checkpoint_every
    else None
    for d in directories
  ]
  seeds = [run.train.seed for run in programs.runs]
  state = initial_states(programs.config, programs.datasets[0], seeds, programs.members)
  device = programs.mesh.devices.flat[0]
  state, starts = restore_members(state, checkpointers, programs.members, device)
  for directory, start in zip(directories, starts):
    logs.truncate_metrics(directory, last_step=start)
  return state, checkpointers, np.asarray(starts)


def train_group(
  programs: GroupPrograms,
  directories: list[pathlib.Path],
  *,
  progress: bool = True,
  label="",
  position: int | None = None,
  stop: threading.Event | None = None,
) -> list[Outcome]:
  """Trains every member of ``programs`` to the end; returns each member's outcome.

  The directories must be locked and checked by the caller (as `compare.run_comparison` does).
  ``position``: the progress bar's row. ``stop``: when set (another lane failed), the group
  ends at its next evaluation, after that evaluation's rows and checkpoints are written, with
  `lanes.Stopped`; its members resume from their checkpoints.
  """
  train = programs.config.train
  state, checkpointers, starts = open_members(programs, directories)
  size = len(programs.runs)
  alive = np.ones(size, bool)
  errors: list[Exception | None] = [None] * size
  bar = tqdm(
    total=train.num_steps,
    initial=int(starts.min()),
    disable=not progress,
    leave=False,
    desc=f"{label} ({size} members, {programs.mode})",
    unit="step",
    position=position,
  )
  pending, clock = [], StepClock(int(starts.min()))
  mask, active = np.zeros_like(alive), None
  for step in range(int(starts.min()), train.num_steps):
    if active is None or not np.array_equal(mask, alive & (step >= starts)):  # resume, failure
      mask = alive & (step >= starts)
      active = jax.device_put(mask, programs.members)
    state, loss, finite = programs.train_step(state, programs.values, *programs.batch(step), active)
    pending.append((loss, finite))
    done = step + 1
    bar.update(1)
    clock.stepped(train, step, state)
    if not logs_after(train, done):
      continue
    rates = clock.rates(train, state)
    losses, finite = (np.stack(a) for a in zip(*jax.device_get(pending)))  # [steps, M]
    pending = []
    rows = programs.evaluate(state)
    for m in np.flatnonzero(alive & (done > starts)):
      errors[m] = nonfinite_error(losses[:, m], finite[:, m], done, directories[m])
      if errors[m]:
        alive[m] = False
        run = programs.runs[m]
        tqdm.write(f"{label}: {run.name} seed={run.train.seed}: FAILED: {errors[m]}")
        continue
      row = {"step": done, "train/loss": float(np.mean(losses[:, m], dtype=np.float64))}
      row.update(rows[m][0])
      row.update(rates)
      logs.append_metrics(directories[m], row)
      if checkpointers[m] and saves_after(train, done):
        record = {"data_order": {"seed": programs.runs[m].train.seed, "next_step": done}}
        checkpointers[m].save(
          done, member_pure(state, int(m), programs.mesh.devices.flat[0]), record
        )
    bar.set_postfix(alive=f"{alive.sum()}/{size}")
    if stop is not None and stop.is_set():
      bar.close()
      for checkpointer in filter(None, checkpointers):
        checkpointer.close()
      raise Stopped(f"{label}: stopped at step {done} because another lane stopped")
    clock.restart()
  bar.close()
  summaries = programs.summaries(state, alive)
  for checkpointer in filter(None, checkpointers):
    checkpointer.close()
  outcomes = []
  for m, run in enumerate(programs.runs):
    summary = summaries[m]
    if summary is not None:
      logs.write_summary(directories[m], summary)
    outcomes.append(Outcome(run, summaries[m], errors[m]))
  return outcomes
