"""`train_and_evaluate(config, workdir)`: one training run, resumable, logged to files."""

import logging
import pathlib
import time

import jax
import numpy as np
import yaml
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from xent_jax.train import logs
from xent_jax.train.checkpoint import Checkpointer
from xent_jax.train.config import Config, loss_label, to_yaml
from xent_jax.train.data import Dataset, eval_batches, load_dataset, train_batch
from xent_jax.train.models import build_model
from xent_jax.train.optim import build_optimizer
from xent_jax.train.parallel import check_batch_size, make_mesh, replicate, shard_batch
from xent_jax.train.steps import (calibration_row, finish_eval, make_eval_step, make_logits_step,
                                   make_objective, make_train_step)


class NonFiniteLossError(FloatingPointError):
  """The training loss became NaN or Inf; the run stopped without checkpointing it."""


class RunDirectoryError(ValueError):
  """The run directory already holds a run of another config."""


def _local(array: np.ndarray) -> np.ndarray:
  """This process's rows of a global batch."""
  rows = len(array) // jax.process_count()
  return array[jax.process_index() * rows:(jax.process_index() + 1) * rows]


def _same_experiment(yaml_a: str, yaml_b: str) -> bool:
  """Whether two resolved configs describe the same run (the output directory may differ)."""
  a, b = yaml.safe_load(yaml_a), yaml.safe_load(yaml_b)
  a.pop("workdir", None)
  b.pop("workdir", None)
  return a == b


def evaluate(eval_step, state, data: Dataset, config: Config, mesh) -> tuple[dict, dict]:
  """Scores the whole test split; returns the metric row and the calibration counts."""
  total = None
  for batch in eval_batches(data, batch_size=config.train.eval_batch_size):
    sums = eval_step(state, *shard_batch(tuple(_local(a) for a in batch), mesh))
    sums = multihost_utils.process_allgather(sums, tiled=True)  # device_get on one process
    sums = jax.tree.map(lambda a: np.sum(a, axis=0, dtype=np.float64), sums)
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  return finish_eval(total)


def split_logits(logits_step, state, data: Dataset, config: Config, mesh,
                 split: str) -> tuple[np.ndarray, np.ndarray]:
  """All logits ``[M, C]`` (LM: tokens x vocabulary) and labels ``[M]`` of one split, on the host."""
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
  ``completed``) returns its summary at once; an interrupted one resumes from its newest readable
  checkpoint and truncates the metric rows logged after it, so the result equals an uninterrupted
  run.

  Args:
    config: the experiment config (see `xent_jax.train.config.Config`).
    workdir: the run directory.
    progress: show a tqdm progress bar.
    devices: devices of the data-parallel mesh (default: all visible devices).

  Raises:
    NonFiniteLossError: the training loss is NaN/Inf; the message names the first bad step.
    RunDirectoryError: ``workdir`` holds a run of a different config.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  recorded = workdir / logs.CONFIG_FILE
  if recorded.exists() and not _same_experiment(recorded.read_text(), to_yaml(config)):
    raise RunDirectoryError(
        f"{workdir} holds a run of a different config ({recorded}); resuming it with this one would "
        "mix two experiments: pass another workdir or delete that directory")
  finished = logs.read_summary(workdir)
  if finished:
    return finished
  is_main = jax.process_index() == 0
  if is_main:
    recorded.write_text(to_yaml(config))
  train = config.train
  mesh = make_mesh(devices)
  check_batch_size(train.batch_size, "train.batch_size", mesh)
  check_batch_size(train.eval_batch_size, "train.eval_batch_size", mesh)

  data = load_dataset(config.data, image=config.model.name == "cnn")
  input_shape = (data.seq_len,) if data.is_lm else data.x_train_NxF.shape[1:]

  @nnx.jit  # one compiled initialisation instead of one eager dispatch per parameter
  def initialize():
    model = build_model(config.model, input_shape=input_shape, num_classes=data.num_classes,
                        seed=train.seed)
    return model, nnx.Optimizer(model, build_optimizer(config.optim, train.num_steps), wrt=nnx.Param)

  graphdef, state = nnx.split(initialize())
  state = replicate(state, mesh)

  checkpointer = None
  start_step = 0
  if train.checkpoint_every:
    checkpointer = Checkpointer(workdir / "checkpoints", max_to_keep=train.max_checkpoints)
    restored = checkpointer.restore_latest(nnx.to_pure_dict(state))
    if restored is not None:
      pure_state, record = restored
      nnx.replace_by_pure_dict(state, pure_state)
      start_step = record["step"]
      logging.info("resuming %s from step %d", workdir, start_step)
  if is_main:
    logs.truncate_metrics(workdir, last_step=start_step)

  def batch(step):
    x, y = train_batch(data, seed=train.seed, step=step, batch_size=train.batch_size,
                       process_index=jax.process_index(), process_count=jax.process_count())
    return shard_batch((x, y), mesh)

  train_step = make_train_step(graphdef, make_objective(config.loss))
  eval_step = make_eval_step(graphdef, num_bins=train.num_ece_bins, num_shards=mesh.size)
  if start_step < train.num_steps:
    train_step = train_step.lower(state, *batch(start_step)).compile()

  bar = tqdm(total=train.num_steps, initial=start_step, disable=not progress, leave=False,
             desc=config.name, unit="step")
  pending = []
  tic = time.perf_counter()
  for step in range(start_step, train.num_steps):
    state, loss, finite = train_step(state, *batch(step))
    pending.append((loss, finite))
    done = step + 1
    bar.update(1)
    if done % train.eval_every and done != train.num_steps:
      continue
    losses, finite = (np.asarray(a) for a in zip(*jax.device_get(pending)))
    elapsed = time.perf_counter() - tic
    bad = np.flatnonzero(~finite)
    if bad.size:
      bar.close()
      kept = done - len(pending)
      what = "training loss" if not np.isfinite(losses[bad[0]]) else "parameters after the update"
      raise NonFiniteLossError(
          f"{what} became non-finite at step {kept + bad[0] + 1} (loss {losses[bad[0]]}) of run "
          f"{workdir}; stopped. Checkpoints up to step {kept} are kept.")
    row = {"step": done, "train/loss": float(np.mean(losses, dtype=np.float64))}
    row.update(evaluate(eval_step, state, data, config, mesh)[0])
    row["train/examples_per_s"] = len(pending) * train.batch_size / elapsed
    row["train/step_time_s"] = elapsed / len(pending)
    if is_main:
      logs.append_metrics(workdir, row)
    bar.set_postfix(loss=f"{row['train/loss']:.4f}", acc=f"{row['eval/accuracy']:.3f}")
    pending = []
    if checkpointer and (done % train.checkpoint_every == 0 or done == train.num_steps):
      checkpointer.save(done, nnx.to_pure_dict(state),
                        {"data_order": {"seed": train.seed, "next_step": done}})
    tic = time.perf_counter()
  bar.close()

  final_row, bins = evaluate(eval_step, state, data, config, mesh)
  logits_step = make_logits_step(graphdef)
  calibration, bins_ts = calibration_row(
      *split_logits(logits_step, state, data, config, mesh, "holdout"),
      *split_logits(logits_step, state, data, config, mesh, "test"), num_bins=train.num_ece_bins)
  final_row.update(calibration)
  summary = {
      "completed": True,
      "group": config.name,
      "loss": loss_label(config.loss),
      "seed": train.seed,
      "num_steps": train.num_steps,
      "num_devices": mesh.size,
      "final": final_row,
      "calibration_counts": bins,
      "calibration_counts_ts": bins_ts,  # after temperature scaling; None without held-out data
  }
  if checkpointer:
    checkpointer.close()
  if is_main:
    logs.write_summary(workdir, summary)
  return summary
