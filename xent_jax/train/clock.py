"""The cadence of a training loop (which steps log and save) and the clock of its throughput.

One piece for the sequential loop (`trainer`) and a vectorized group's (`sweep`), so the two
log, save and time the same steps: a run's metrics do not depend on how it was trained.
"""

import time

import jax

from xent_jax.train.config import TrainConfig


def logs_after(train: TrainConfig, done: int) -> bool:
  """Whether ``done`` finished steps end with an evaluation and a logged row."""
  return done % train.eval_every == 0 or done == train.num_steps


def saves_after(train: TrainConfig, done: int) -> bool:
  """Whether ``done`` finished steps end with a checkpoint (where checkpoints are kept at all)."""
  return done % train.checkpoint_every == 0 or done == train.num_steps


class StepClock:
  """Seconds spent in training steps only, between two logged rows.

  The first step of a process (compilation, warm-up) is outside the clock unless it is itself
  logged; evaluations and checkpoint saves are outside it too, since the clock restarts after
  them. The clock stops once the state is ready on the devices.
  """

  def __init__(self, first_step: int):
    self.first_step = first_step
    self.steps = 0
    self.tic = time.perf_counter()

  def stepped(self, train: TrainConfig, step: int, state) -> None:
    """Counts ``step`` (just dispatched), or starts the clock after the first, unlogged one."""
    if step == self.first_step and not logs_after(train, step + 1):
      jax.block_until_ready(state)  # the first step compiles or warms up: start after it
      self.tic = time.perf_counter()
    else:
      self.steps += 1

  def rates(self, train: TrainConfig, state) -> dict:
    """``train/examples_per_s`` and ``train/step_time_s`` of the steps counted since the start."""
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - self.tic
    return {
      "train/examples_per_s": self.steps * train.batch_size / elapsed,
      "train/step_time_s": elapsed / self.steps,
    }

  def restart(self) -> None:
    """Starts a new interval (after an evaluation, a log row and a save)."""
    self.steps, self.tic = 0, time.perf_counter()
