"""Lanes: groups trained side by side in threads, the first error stopping the others."""

import pathlib
import threading
import time

import jax
import pytest

from xent_jax import cli
from xent_jax.train import compare, load_config, logs
from xent_jax.train.compare import run_comparison, run_dir
from xent_jax.train.config import expand_grid
from xent_jax.train.lanes import (
  MIN_SPLIT_WORK,
  Stopped,
  choose_lanes,
  parts_per_group,
  run_in_lanes,
)
from xent_jax.train.trainer import CHECKPOINT_DIR

QUICK = str(pathlib.Path(__file__).parents[2] / "configs" / "digits_quick.yaml")


def test_lane_rule():
  assert choose_lanes(3, "vmap", "gpu") == 3  # set: as given
  assert choose_lanes(0, "vmap", "cpu") == choose_lanes(0, "map", "gpu") == 1
  assert choose_lanes(0, "map", "cpu") >= 1
  # A group is cut into lanes only where its work pays for each part's compilation, or by hand.
  assert parts_per_group(63, 8000, 2, forced=False) == 2
  assert parts_per_group(8, MIN_SPLIT_WORK // 8 - 1, 2, forced=False) == 1
  assert parts_per_group(8, 20, 2, forced=True) == 2
  assert parts_per_group(3, 20, 8, forced=True) == 3  # at least one member a part
  assert parts_per_group(63, 8000, 1, forced=True) == 1


@pytest.mark.parametrize("flags", [["--lanes", "-1"], ["compare.lanes=-2"]])
def test_a_negative_lane_count_is_refused_naming_the_key(tmp_path, capsys, flags):
  status = cli.main(["compare", QUICK, *flags, "--workdir", str(tmp_path)])
  err = capsys.readouterr().err
  assert status == 2 and err.count("\n") == 1, err
  assert "config key 'compare.lanes'" in err and ">= 0" in err, err
  assert not any(tmp_path.iterdir())  # nothing started


def test_tasks_run_at_most_lanes_at_once_and_return_in_order():
  lock, running, most, lanes_seen = threading.Lock(), [0], [0], set()

  def task(value):
    def run(lane):
      with lock:
        running[0] += 1
        most[0] = max(most[0], running[0])
        lanes_seen.add(lane)
      time.sleep(0.05)
      with lock:
        running[0] -= 1
      return value * value

    return run

  assert run_in_lanes([task(v) for v in range(7)], 2, threading.Event()) == [
    v * v for v in range(7)
  ]
  assert most[0] == 2 and lanes_seen == {0, 1}
  assert run_in_lanes([task(v) for v in range(3)], 1, threading.Event()) == [0, 1, 4]


def test_the_first_error_stops_the_other_lanes_and_is_raised():
  """A failing task sets ``stop``; the running task sees it and ends with `Stopped`; tasks not
  yet started never start; the failing task's own error is what the caller gets."""
  stop, started = threading.Event(), []

  def failing(lane):
    started.append("failing")
    time.sleep(0.05)
    raise OSError(28, "No space left on device")

  def patient(lane):
    started.append("patient")
    while not stop.wait(0.01):
      pass
    raise Stopped("saw stop")

  def later(lane):
    started.append("later")
    return "ran"

  with pytest.raises(OSError, match="No space left"):
    run_in_lanes([patient, failing, later], 2, stop)
  assert stop.is_set() and sorted(started) == ["failing", "patient"]


@pytest.mark.slow
@pytest.mark.usefixtures("figures_not_drawn")
def test_a_stopped_lane_keeps_its_rows_and_checkpoints_and_resumes(tmp_path, monkeypatch):
  """A comparison (two losses x two seeds: two groups, cut into four parts for two lanes)
  whose lanes are stopped at their first evaluation (as when another lane fails) raises
  `Stopped`, leaves each member's rows and checkpoints of that step, and a rerun finishes every
  member from them."""
  config = load_config(
    QUICK,
    (
      f"workdir={tmp_path}",
      "model.hidden_dims=[8]",
      "train.batch_size=32",
      "train.eval_batch_size=128",
      "train.num_steps=20",
      "train.eval_every=10",
      "train.checkpoint_every=10",
      "compare.seeds=[0,1]",
      "compare.variants=[{name: cross_entropy}, {name: focal}]",
      "compare.group_mode=map",
      "compare.lanes=2",
    ),
  )
  stops = []
  original = compare.train_group

  def stop_at_once(*args, stop, **kwargs):
    stop.set()  # another lane failed
    stops.append(stop)
    return original(*args, stop=stop, **kwargs)

  monkeypatch.setattr(compare, "train_group", stop_at_once)
  with pytest.raises(Stopped, match="stopped at step 10"):
    run_comparison(config, progress=False, devices=jax.devices()[:1])
  runs = expand_grid(config)
  started = [run for run in runs if run_dir(tmp_path, run).is_dir()]
  assert started  # the lanes that began wrote step 10 and stopped there
  for run in started:
    directory = run_dir(tmp_path, run)
    assert [row["step"] for row in logs.read_metrics(directory)] == [10]
    assert sorted(p.name for p in (directory / CHECKPOINT_DIR).iterdir()) == ["10"]
    assert logs.read_summary(directory) is None
  monkeypatch.setattr(compare, "train_group", original)
  assert run_comparison(config, progress=False, devices=jax.devices()[:1]) == []
  for run in runs:
    assert logs.read_summary(run_dir(tmp_path, run))["completed"]
    assert [row["step"] for row in logs.read_metrics(run_dir(tmp_path, run))] == [10, 20]
