"""`train_and_evaluate(config, workdir)`: one training run, resumable, logged to files."""

import contextlib
import logging
import pathlib
from typing import NamedTuple

import jax
import numpy as np
import omegaconf
import yaml
from flax import nnx
from jax.experimental import multihost_utils
from omegaconf import OmegaConf
from tqdm import tqdm

from xent_jax.train import logs
from xent_jax.train.checkpoint import Checkpointer
from xent_jax.train.clock import StepClock, logs_after, saves_after
from xent_jax.train.config import Config, ConfigError, loss_label, to_yaml
from xent_jax.train.data import Dataset, eval_batches, load_dataset, train_batch
from xent_jax.train.logs import RunDirectoryError
from xent_jax.train.members import graph_of, model_key, state_from_seed
from xent_jax.train.optim import DEFAULT_WEIGHT_DECAY
from xent_jax.train.parallel import check_batch_size, make_mesh, replicate, shard_batch
from xent_jax.train.steps import (
  calibration_row,
  finish_eval,
  make_eval_step,
  make_logits_step,
  make_objective,
  make_train_step,
)

CHECKPOINT_DIR = "checkpoints"


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf; the run stopped without checkpointing it."""


def _local(array: np.ndarray) -> np.ndarray:
  """This process's rows of a global batch."""
  rows = len(array) // jax.process_count()
  return array[jax.process_index() * rows : (jax.process_index() + 1) * rows]


def _flat(tree, prefix: str = "") -> dict:
  """``{"optim.learning_rate": 0.001, ...}`` of nested dicts (lists stay values)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _effective_weight_decay(flat: dict) -> dict:
  """Fills an unset ``optim.weight_decay`` with the decay the optimizer applies (`build_optimizer`).

  Runs recorded before the key became optional wrote adamw's 1e-4 explicitly; they stay resumable.
  """
  if flat.get("optim.weight_decay") is None:
    flat["optim.weight_decay"] = DEFAULT_WEIGHT_DECAY.get(str(flat.get("optim.name")))
  return flat


def config_differences(recorded: pathlib.Path, config: Config) -> list[str]:
  """The keys whose values differ between a recorded ``config.yaml`` and ``config``.

  The recorded file is read onto the current schema, so keys added to the schema since it was
  written compare at their defaults; ``workdir`` (where the run lives) is ignored.

  Raises:
    RunDirectoryError: the recorded file is not a config this schema can read.
  """
  try:
    merged = OmegaConf.merge(
      OmegaConf.structured(Config), yaml.safe_load(recorded.read_text()) or {}
    )
    old = _flat(OmegaConf.to_container(merged, resolve=True))
  except (yaml.YAMLError, omegaconf.errors.OmegaConfBaseException, ValueError) as err:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    raise RunDirectoryError(
      f"{recorded} cannot be read as a config ({reason}), so it is unknown which experiment "
      "the directory holds: fix it or pass another workdir"
    ) from None
  new = _flat(OmegaConf.to_container(OmegaConf.structured(config), resolve=True))
  old, new = _effective_weight_decay(old), _effective_weight_decay(new)
  return [
    f"{key} (recorded {old.get(key)!r}, now {new.get(key)!r})"
    for key in sorted(set(old) | set(new))
    if key != "workdir" and old.get(key) != new.get(key)
  ]


def check_run_directory(config: Config, workdir: pathlib.Path) -> None:
  """Refuses a directory that holds a run of another config, or run files without a config.

  Raises:
    RunDirectoryError: naming the directory and the keys that differ (or the files found).
  """
  recorded = workdir / logs.CONFIG_FILE
  if recorded.exists():
    differences = config_differences(recorded, config)
    if differences:
      raise RunDirectoryError(
        f"{workdir} holds a run of a different config ({recorded}: {'; '.join(differences[:3])}"
        f"{'; ...' if len(differences) > 3 else ''}); resuming or reusing it would mix two "
        "experiments: pass another workdir or delete that directory"
      )
    return
  checkpoints = workdir / CHECKPOINT_DIR
  found = [name for name in (logs.METRICS_FILE, logs.SUMMARY_FILE) if (workdir / name).exists()]
  if checkpoints.is_dir() and any(checkpoints.iterdir()):
    found.append(CHECKPOINT_DIR + "/")
  if found:
    raise RunDirectoryError(
      f"{workdir} holds {', '.join(found)} but no {logs.CONFIG_FILE}, so the config that made them "
      f"is unknown and resuming could mix two experiments: put that run's {logs.CONFIG_FILE} back "
      "or pass another workdir"
    )


@contextlib.contextmanager
def exclusive(workdir: pathlib.Path):
  """Holds the directory's lock (process 0) for the run; all processes stop if it is taken."""
  with contextlib.ExitStack() as stack:
    error = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(logs.locked(workdir))
      except RunDirectoryError as err:
        error = err
    if jax.process_count() > 1 and multihost_utils.broadcast_one_to_all(
      np.int32(error is not None)
    ):
      error = error or RunDirectoryError(f"{workdir} is in use by another process")
    if error:
      raise error
    yield


def check_data_sizes(data: Dataset, config: Config) -> None:
  """Sizes only known once the data is loaded: a batch must fit the training split, tests exist."""
  if data.is_lm:
    if len(data.x_train_NxF) <= data.seq_len + 1:
      raise ConfigError(
        f"config key 'data.seq_len' ({data.seq_len}) leaves no training window in "
        f"the {len(data.x_train_NxF)} training tokens of data set {config.data.name!r}"
      )
  elif len(data.y_train_N) < config.train.batch_size:
    raise ConfigError(
      f"config key 'train.batch_size' ({config.train.batch_size}) exceeds the "
      f"{len(data.y_train_N)} "
      f"training examples of data set {config.data.name!r} (data.test_fraction="
      f"{config.data.test_fraction})"
    )
  if len(data.x_test_MxF) == 0:
    raise ConfigError(
      f"the test split of data set {config.data.name!r} is empty: raise config key "
      "'data.test_fraction' (or 'data.max_eval_tokens' for language modelling)"
    )


def evaluate(eval_step, state, data: Dataset, config: Config, mesh) -> tuple[dict, dict]:
  """Scores the whole test split; returns the metric row and the calibration counts."""
  total = None
  for batch in eval_batches(data, batch_size=config.train.eval_batch_size):
    sums = eval_step(state, *shard_batch(tuple(_local(a) for a in batch), mesh))
    sums = multihost_utils.process_allgather(sums, tiled=True)  # device_get on one process
    sums = jax.tree.map(lambda a: np.sum(a, axis=0, dtype=np.float64), sums)
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  assert total is not None  # the test split is not empty (checked on loading)
  return finish_eval(total)


def split_logits(
  logits_step, state, data: Dataset, config: Config, mesh, split: str
) -> tuple[np.ndarray, np.ndarray]:
  """All logits ``[M, C]`` (LM: tokens x vocabulary) and labels ``[M]`` of one split, on the
  host."""
  logits, labels = [], []
  for x, y, valid_B in eval_batches(data, batch_size=config.train.eval_batch_size, split=split):
    out = logits_step(state, shard_batch(_local(x), mesh))
    out = np.asarray(multihost_utils.process_allgather(out, tiled=True))[valid_B]
    logits.append(out.reshape(-1, out.shape[-1]))
    labels.append(y[valid_B].reshape(-1))
  if not logits:
    return np.zeros((0, data.num_classes), np.float32), np.zeros(0, np.int32)
  return np.concatenate(logits), np.concatenate(labels)


def train_and_evaluate(config: Config, workdir, *, progress: bool = True, devices=None) -> dict:
  """Trains ``config``'s model on its data with its loss; writes and returns the summary.

  Writes ``config.yaml``, ``metrics.jsonl`` (every ``train.eval_every`` steps), checkpoints every
  ``train.checkpoint_every`` steps and ``summary.json`` at the end. A finished run (summary with
  ``completed``) returns its summary at once; an interrupted one resumes from its newest intact
  checkpoint and truncates the metric rows logged after it, so the result equals an uninterrupted
  run. One process at a time: the run holds ``run.lock`` in ``workdir`` (see `logs.locked`).

  The logged throughput (``train/examples_per_s``, ``train/step_time_s``) times training steps
  only: the clock starts after the first step of the process (compilation and warm-up), stops
  once the last step's state is ready on the devices, and evaluations and checkpoint saves fall
  outside it.

  Args:
    config: the experiment config (see `xent_jax.train.config.Config`).
    workdir: the run directory.
    progress: show a tqdm progress bar.
    devices: devices of the data-parallel mesh (default: all visible devices).

  Raises:
    NonFiniteLossError: the training loss is NaN/Inf; the message names the first bad step.
    RunDirectoryError: ``workdir`` holds a run of a different config, run files without a
      ``config.yaml``, or another process is training in it.
    ConfigError: the batch does not fit the loaded data, or the test split is empty.
    CheckpointError: a checkpoint that may be valid cannot be restored, or a save failed.
    LogFileError: ``summary.json`` is damaged.
    OSError: the directory cannot be created or written (permission, full disk).
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with exclusive(workdir):
    check_run_directory(config, workdir)
    finished = logs.read_summary(workdir)
    if finished:
      return finished
    return _train(config, workdir, progress=progress, devices=devices)


def _train(config: Config, workdir: pathlib.Path, *, progress: bool, devices) -> dict:
  """The body of `train_and_evaluate`, once the directory is locked and checked."""
  is_main = jax.process_index() == 0
  train = config.train
  mesh = make_mesh(devices)
  check_batch_sizes(train, mesh)
  data = load_dataset(config.data, image=config.model.name == "cnn")
  check_data_sizes(data, config)
  recorded = workdir / logs.CONFIG_FILE
  if is_main and not recorded.exists():  # only now: a config refused above leaves no run behind
    logs.write_atomic(recorded, to_yaml(config))
  programs = run_programs(config, data, mesh.size)
  state = replicate(programs.initialize(np.int32(train.seed)), mesh)
  checkpointer, start_step = _resume(config, workdir, state)
  if is_main:
    logs.truncate_metrics(workdir, last_step=start_step)

  def batch(step):
    x, y = train_batch(
      data,
      seed=train.seed,
      step=step,
      batch_size=train.batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    return shard_batch((x, y), mesh)

  train_step, eval_step = programs.train_step, programs.eval_step
  if start_step < train.num_steps:
    train_step = train_step.lower(state, *batch(start_step)).compile()

  bar = tqdm(
    total=train.num_steps,
    initial=start_step,
    disable=not progress,
    leave=False,
    desc=config.name,
    unit="step",
  )
  pending = []
  clock = StepClock(start_step)
  for step in range(start_step, train.num_steps):
    state, loss, finite = train_step(state, *batch(step))
    pending.append((loss, finite))
    done = step + 1
    bar.update(1)
    clock.stepped(train, step, state)
    if not logs_after(train, done):
      continue
    rates = clock.rates(train, state)
    losses = _finite_losses(pending, done, workdir, bar)
    row = {"step": done, "train/loss": float(np.mean(losses, dtype=np.float64))}
    row.update(evaluate(eval_step, state, data, config, mesh)[0])
    row.update(rates)
    if is_main:
      logs.append_metrics(workdir, row)
    bar.set_postfix(loss=f"{row['train/loss']:.4f}", acc=f"{row['eval/accuracy']:.3f}")
    pending = []
    if checkpointer and saves_after(train, done):
      checkpointer.save(
        done, nnx.to_pure_dict(state), {"data_order": {"seed": train.seed, "next_step": done}}
      )
    clock.restart()
  bar.close()
  summary = _final_summary(config, programs, state, data, mesh)
  if checkpointer:
    checkpointer.close()
  if is_main:
    logs.write_summary(workdir, summary)
  return summary


def check_batch_sizes(train, mesh) -> None:
  """Each batch size splits evenly over the mesh's devices; else a ConfigError naming its key."""
  for key, size in (
    ("train.batch_size", train.batch_size),
    ("train.eval_batch_size", train.eval_batch_size),
  ):
    try:
      check_batch_size(size, key, mesh)
    except ValueError as err:
      raise ConfigError(f"config key '{key}': {err}") from None


class RunPrograms(NamedTuple):
  """A sequential run's jitted programs (see `run_programs`)."""

  initialize: jax.stages.Wrapped  # seed -> the fresh state of the pair
  train_step: jax.stages.Wrapped  # `make_train_step`
  eval_step: jax.stages.Wrapped  # `make_eval_step`
  logits_step: jax.stages.Wrapped  # `make_logits_step`


# Each config's programs, kept for the process's lifetime: runs that differ only in their seed or
# their labels (a sweep's seeds and label-noise rates) reuse them, so a sequential comparison
# traces and compiles them once instead of once per run.
_RUN_PROGRAMS: dict = {}


def run_programs(config: Config, data: Dataset, num_shards: int) -> RunPrograms:
  """The jitted programs of a run of ``config`` on ``data`` with ``num_shards`` devices, made once
  per model, optimizer, loss, step count, evaluation setting and data shapes.

  The seed is an argument of ``initialize`` (`members.state_from_seed`, from which a vectorized
  group's members start too: `members.initial_states`), not a constant of its program.
  """
  key = (
    *model_key(config, data),
    to_yaml(config.optim),
    to_yaml(config.loss),
    config.train.num_steps,
    config.train.num_ece_bins,
    num_shards,
  )
  if key not in _RUN_PROGRAMS:
    graphdef = graph_of(config, data)
    _RUN_PROGRAMS[key] = RunPrograms(
      initialize=jax.jit(state_from_seed(config, data)),
      train_step=make_train_step(graphdef, make_objective(config.loss)),
      eval_step=make_eval_step(graphdef, num_bins=config.train.num_ece_bins, num_shards=num_shards),
      logits_step=make_logits_step(graphdef),
    )
  return _RUN_PROGRAMS[key]


def _resume(config: Config, workdir: pathlib.Path, state):
  """``(checkpointer, start_step)``: restores the newest good checkpoint into ``state`` (in
  place); no checkpointer when checkpoints are off."""
  train = config.train
  if not train.checkpoint_every:
    return None, 0
  checkpointer = Checkpointer(workdir / CHECKPOINT_DIR, max_to_keep=train.max_checkpoints)
  restored = checkpointer.restore_latest(nnx.to_pure_dict(state))
  if restored is None:
    return checkpointer, 0
  pure_state, record = restored
  nnx.replace_by_pure_dict(state, pure_state)
  logging.info("resuming %s from step %d", workdir, record["step"])
  return checkpointer, record["step"]


def _finite_losses(pending, done: int, workdir: pathlib.Path, bar) -> np.ndarray:
  """The losses of the steps since the last evaluation; raises `nonfinite_error`'s error."""
  losses, finite = (np.asarray(a) for a in zip(*jax.device_get(pending)))
  error = nonfinite_error(losses, finite, done, workdir)
  if error:
    bar.close()
    raise error
  return losses


def nonfinite_error(losses, finite, done: int, workdir: pathlib.Path) -> NonFiniteLossError | None:
  """The `NonFiniteLossError` naming the first step whose loss or updated parameters were not
  finite, among the ``len(losses)`` steps that end at step ``done``; None when all were."""
  bad = np.flatnonzero(~np.asarray(finite))
  if not bad.size:
    return None
  kept = done - len(losses)
  what = "training loss" if not np.isfinite(losses[bad[0]]) else "parameters after the update"
  return NonFiniteLossError(
    f"{what} became non-finite at step {kept + bad[0] + 1} (loss {losses[bad[0]]}) of run "
    f"{workdir}; stopped. Checkpoints up to step {kept} are kept."
  )


def _final_summary(config: Config, programs: RunPrograms, state, data: Dataset, mesh) -> dict:
  """The run's ``summary.json``: final evaluation and calibration, before and after temperature
  scaling."""
  train = config.train
  final_row, bins = evaluate(programs.eval_step, state, data, config, mesh)
  logits_step = programs.logits_step
  calibration, bins_ts = calibration_row(
    *split_logits(logits_step, state, data, config, mesh, "holdout"),
    *split_logits(logits_step, state, data, config, mesh, "test"),
    num_bins=train.num_ece_bins,
  )
  final_row.update(calibration)
  return make_summary(config, final_row, bins, bins_ts, num_devices=mesh.size)


def make_summary(config: Config, final_row: dict, bins, bins_ts, *, num_devices: int) -> dict:
  """A run's ``summary.json``: its final row (evaluation and calibration) and reliability counts
  before and after temperature scaling (``bins_ts`` None without held-out data)."""
  return {
    "completed": True,
    "group": config.name,
    "loss": loss_label(config.loss),
    "seed": config.train.seed,
    "num_steps": config.train.num_steps,
    "num_devices": num_devices,
    "final": final_row,
    "calibration_counts": bins,
    "calibration_counts_ts": bins_ts,  # after temperature scaling; None without held-out data
  }
