"""End-to-end training runs: resume after SIGKILL, corrupt checkpoints, NaN stop, 8 devices, LM.

Each test trains a tiny model for a few dozen steps through `train_and_evaluate` (or the real
``xent-jax`` entry point in a subprocess) and checks what the run left on disk.
"""

import gc
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
import weakref

import jax
import numpy as np
import pytest

from xent_jax.train import NonFiniteLossError, load_config, logs, train_and_evaluate, trainer
from xent_jax.train.checkpoint import Checkpointer
from xent_jax.train.data import load_dataset
from xent_jax.train.trainer import RunDirectoryError

ROOT = pathlib.Path(__file__).parents[2]
QUICK = str(ROOT / "configs" / "digits_quick.yaml")
TINY = (
  "model.hidden_dims=[32]",
  "train.batch_size=32",
  "train.eval_batch_size=128",
  "train.num_steps=40",
  "train.eval_every=10",
  "train.checkpoint_every=20",
)
TIMING_KEYS = ("train/examples_per_s", "train/step_time_s")

pytestmark = pytest.mark.slow


def _without_timing(rows):
  return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def _config(*overrides):
  return load_config(QUICK, TINY + overrides)


def _same_results(dir_a: pathlib.Path, dir_b: pathlib.Path) -> None:
  assert logs.read_summary(dir_a)["final"] == logs.read_summary(dir_b)["final"]
  assert _without_timing(logs.read_metrics(dir_a)) == _without_timing(logs.read_metrics(dir_b))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted tiny run; other tests compare against it."""
  workdir = tmp_path_factory.mktemp("reference")
  train_and_evaluate(_config(), workdir, progress=False)
  return workdir


def test_run_writes_config_metrics_summary(reference_run):
  rows = logs.read_metrics(reference_run)
  assert [row["step"] for row in rows] == [10, 20, 30, 40]
  for row in rows:
    assert set(row) == {
      "step",
      "train/loss",
      "eval/accuracy",
      "eval/nll",
      "eval/ece",
      "eval/brier",
      *TIMING_KEYS,
    }
    assert all(np.isfinite(v) for v in row.values())
  assert rows[-1]["eval/accuracy"] > 0.5  # 10 classes: well above chance after 40 steps
  summary = logs.read_summary(reference_run)
  final_eval = {k: v for k, v in rows[-1].items() if k.startswith("eval/")}
  assert {k: summary["final"][k] for k in final_eval} == final_eval  # plus the calibration extras
  assert sum(summary["calibration_counts"]["count"]) == 359  # the digits test split
  assert load_config(str(reference_run / "config.yaml")) == _config()
  # A finished run is not redone: same summary, no new rows.
  again = train_and_evaluate(_config(), reference_run, progress=False)
  assert again == summary and logs.read_metrics(reference_run) == rows


def test_other_config_in_a_used_directory_is_refused(reference_run):
  with pytest.raises(RunDirectoryError, match="different config"):
    train_and_evaluate(_config("train.seed=1"), reference_run, progress=False)


def test_weight_decay_recorded_before_it_was_optional_still_matches(tmp_path):
  """adamw runs recorded ``weight_decay: 0.0001`` before the key could be unset; same decay now."""
  recorded = tmp_path / "config.yaml"
  recorded.write_text("optim:\n  name: adamw\n  weight_decay: 0.0001\n")
  assert trainer.config_differences(recorded, load_config(None)) == []
  recorded.write_text("optim:\n  name: adamw\n  weight_decay: 0.001\n")
  assert trainer.config_differences(recorded, load_config(None)) == [
    "optim.weight_decay (recorded 0.001, now 0.0001)"
  ]


@pytest.mark.processes
def test_resume_after_sigkill_equals_uninterrupted(tmp_path, reference_run):
  """Kills the real CLI mid-run with SIGKILL, reruns the same command, compares to the reference."""
  workdir = tmp_path / "killed"
  overrides = list(TINY) + [
    "train.num_steps=240",
    "train.eval_every=20",
    "train.checkpoint_every=40",
  ]
  command = [
    sys.executable,
    "-m",
    "xent_jax.cli",
    "run",
    QUICK,
    *overrides,
    "--workdir",
    str(workdir),
    "--no-progress",
  ]
  env = dict(
    os.environ,
    PYTHONPATH=os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)])),
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),  # the rerun skips recompiling
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )
  process = subprocess.Popen(
    command, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  deadline = time.time() + 240
  while not (workdir / "checkpoints" / "40").is_dir():
    assert process.poll() is None, process.stderr.read().decode()
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert logs.read_summary(workdir) is None, "the run finished before it could be killed"
  killed_at = max(row["step"] for row in logs.read_metrics(workdir))
  assert killed_at < 240

  finished = subprocess.run(
    command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
  )
  assert finished.returncode == 0, finished.stderr

  uninterrupted = tmp_path / "uninterrupted"
  config = load_config(QUICK, tuple(overrides))
  train_and_evaluate(config, uninterrupted, progress=False)
  _same_results(workdir, uninterrupted)


def test_corrupt_latest_checkpoint_falls_back(tmp_path, reference_run):
  workdir = tmp_path / "corrupt"
  train_and_evaluate(_config(), workdir, progress=False)
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [20, 40]
  (workdir / logs.SUMMARY_FILE).unlink()  # pretend the run died after its last checkpoint
  damaged = [
    p for p in (workdir / "checkpoints" / "40").rglob("*") if p.is_file() and p.stat().st_size > 64
  ]
  assert damaged
  for path in damaged:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
    path.write_bytes(bytes(data))
  train_and_evaluate(_config(), workdir, progress=False)
  _same_results(workdir, reference_run)


def test_fingerprint_mismatch_is_detected(tmp_path):
  """A checkpoint whose arrays no longer match their recorded fingerprint is skipped."""
  checkpointer = Checkpointer(tmp_path, max_to_keep=3)
  good = {"w": np.arange(4.0, dtype=np.float32)}
  checkpointer.save(1, good, {})
  checkpointer.save(2, {"w": np.ones(4, np.float32)}, {})
  # Overwrite step 2's record so its fingerprint describes other values.
  record = tmp_path / "2" / "record" / "metadata"
  record.write_text(record.read_text().replace("4.0", "5.0"))
  state, record = checkpointer.restore_latest(good)
  assert record["step"] == 1
  np.testing.assert_array_equal(state["w"], good["w"])


def test_nan_loss_stops_naming_the_step(tmp_path):
  workdir = tmp_path / "nan"
  config = _config(
    "optim.name=sgd",
    "optim.learning_rate=1e30",
    "optim.schedule=constant",
    "train.eval_every=1",
    "train.checkpoint_every=1",
  )
  with pytest.raises(NonFiniteLossError, match=r"at step \d+") as info:
    train_and_evaluate(config, workdir, progress=False)
  bad_step = int(re.search(r"at step (\d+)", str(info.value)).group(1))
  kept = [int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
  assert kept and max(kept) == bad_step - 1
  assert f"up to step {bad_step - 1}" in str(info.value)
  assert logs.read_summary(workdir) is None
  assert max(row["step"] for row in logs.read_metrics(workdir)) == bad_step - 1


def test_runs_that_differ_in_seed_or_labels_share_their_programs(tmp_path, monkeypatch):
  """A sequential sweep's runs of one model, optimizer and loss trace and compile their programs
  once: the seed is an argument of the initialisation (two seeds train two models), the labels
  are data, and a run on the shared programs equals one on programs made afresh. Another loss or
  learning rate gets its own programs."""
  monkeypatch.setattr(trainer, "_RUN_PROGRAMS", {})
  short = ("train.num_steps=10", "train.eval_every=5", "train.checkpoint_every=0")
  configs = [
    _config(*short, f"train.seed={seed}", f"data.label_noise={noise}")
    for seed, noise in ((0, 0.0), (1, 0.0), (1, 0.3))
  ]
  runs = [tmp_path / f"run{i}" for i in range(len(configs))]
  summaries = [train_and_evaluate(c, run, progress=False) for c, run in zip(configs, runs)]
  assert len(trainer._RUN_PROGRAMS) == 1
  assert summaries[0]["final"] != summaries[1]["final"]
  assert summaries[1]["final"] != summaries[2]["final"]
  monkeypatch.setattr(trainer, "_RUN_PROGRAMS", {})
  train_and_evaluate(configs[2], tmp_path / "afresh", progress=False)
  _same_results(tmp_path / "afresh", runs[2])
  data = load_dataset(configs[0].data, image=False)
  shared = trainer.run_programs(configs[0], data, jax.device_count())
  for other in ("loss.name=focal", "optim.learning_rate=0.5"):
    assert trainer.run_programs(_config(*short, other), data, jax.device_count()) is not shared
  # The kept programs hold the data's shapes, not its arrays.
  kept = weakref.ref(data.x_train_NxF)
  trainer.run_programs(_config(*short, "model.hidden_dims=[8]"), data, jax.device_count())
  del data
  gc.collect()
  assert kept() is None


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py fakes them)")
def test_eight_devices_equal_one(tmp_path, reference_run):
  assert logs.read_summary(reference_run)["num_devices"] == jax.device_count()
  single = tmp_path / "one_device"
  train_and_evaluate(_config(), single, progress=False, devices=jax.devices()[:1])
  assert logs.read_summary(single)["num_devices"] == 1
  rows_1 = _without_timing(logs.read_metrics(single))
  rows_8 = _without_timing(logs.read_metrics(reference_run))
  assert [r["step"] for r in rows_1] == [r["step"] for r in rows_8]
  for row_1, row_8 in zip(rows_1, rows_8):
    for key in row_1:
      np.testing.assert_allclose(row_1[key], row_8[key], rtol=2e-4, atol=2e-5, err_msg=key)


def test_char_lm_trains_with_the_fused_loss(tmp_path):
  """The LM path end to end (the logits path equals it: test_train_steps.py)."""
  config = load_config(
    str(ROOT / "configs" / "charlm_zloss.yaml"),
    (
      "model.model_dim=32",
      "model.num_layers=1",
      "model.num_heads=2",
      "data.seq_len=16",
      "data.max_eval_tokens=512",
      "train.batch_size=16",
      "train.eval_batch_size=16",
      "train.num_steps=20",
      "train.eval_every=10",
      "train.checkpoint_every=0",
      "optim.warmup_steps=5",
      "loss.fused=true",
      "loss.hparams={z_loss: 0.0001}",
    ),
  )
  train_and_evaluate(config, tmp_path, progress=False)
  rows = logs.read_metrics(tmp_path)
  assert rows[-1]["train/loss"] < rows[0]["train/loss"] < 5.0
  assert not (tmp_path / "checkpoints").exists()


def test_throughput_times_training_steps_only(tmp_path, monkeypatch):
  """Evaluations and checkpoint saves, made 1 s slower here, stay outside the logged step time."""
  real_evaluate, real_save = trainer.evaluate, Checkpointer.save

  def slow_evaluate(*args, **kwargs):
    time.sleep(1)
    return real_evaluate(*args, **kwargs)

  def slow_save(self, *args, **kwargs):
    time.sleep(1)
    return real_save(self, *args, **kwargs)

  monkeypatch.setattr(trainer, "evaluate", slow_evaluate)
  monkeypatch.setattr(Checkpointer, "save", slow_save)
  train_and_evaluate(
    _config("train.num_steps=10", "train.eval_every=5", "train.checkpoint_every=5"),
    tmp_path,
    progress=False,
  )
  rows = logs.read_metrics(tmp_path)
  assert [row["step"] for row in rows] == [5, 10]
  # A window has 5 steps (4 in the first, after the warm-up step): a 1 s pause counted in it
  # would make its step time at least 0.2 s.
  for row in rows:
    assert row["train/step_time_s"] < 0.1, row
    assert row["train/examples_per_s"] == pytest.approx(32 / row["train/step_time_s"])
