"""Lanes: vectorized groups trained side by side, one thread each.

On CPU one small model's step leaves cores idle, and XLA:CPU runs the programs of two threads at
once but one thread's programs one after another. Two threads stepping two parts of 4 MNIST-1D CNN
members kept 1.7 of 2 cores busy and took 5.5 ms per step of all 8, against 8.7 ms for one program
mapping over the 8 (AMD EPYC, 2 cores; `experiments/results/sweeps/probe_group_step.md`). So on CPU
``compare`` cuts each group into one part per lane (where the group has work enough to pay for a
part's compilation, `parts_per_group`) and trains the groups and parts at once (`run_in_lanes`); on
GPU and TPU one vmapped group already fills the device, and a lane is all there is.

A lane that fails stops the others: they end at their next evaluation (`Stopped`), keeping
every checkpoint they wrote, and the first error is raised once all have ended. Ctrl-C does the
same. Nothing a member computes depends on its lane or its neighbours.
"""

import concurrent.futures
import os
import queue
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import jax

T = TypeVar("T")


# A group of fewer member-steps (members x steps) is not cut into lanes by default: a part pays its
# own compilation and data (2-3.5 s on the 2-core host), and a lane saves at most 0.4 ms of each
# member-step (the CNN's 1.04 ms in one program against 0.64 ms in two lanes).
MIN_SPLIT_WORK = 10_000


class Stopped(Exception):
  """A lane ended early because another lane failed or the comparison was interrupted."""


def choose_lanes(lanes: int, mode: str, backend: str | None = None) -> int:
  """How many groups train at once: ``lanes`` when set (> 0); otherwise one per CPU core this
  process may use where members run one after another (``mode`` ``map``) on the CPU backend, and
  1 elsewhere (``vmap`` fills an accelerator with one group)."""
  if lanes > 0:
    return lanes
  if mode != "map" or (backend or jax.default_backend()) != "cpu":
    return 1
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parts_per_group(members: int, num_steps: int, lanes: int, *, forced: bool) -> int:
  """Into how many parts a group of ``members`` runs of ``num_steps`` steps is cut for ``lanes``
  lanes: ``lanes`` (at most one member each) when the lanes were set by hand (``forced``) or the
  group has at least `MIN_SPLIT_WORK` member-steps, else 1 (small groups still train beside
  each other, whole)."""
  if lanes <= 1 or (not forced and members * num_steps < MIN_SPLIT_WORK):
    return 1
  return min(lanes, members)


def run_in_lanes(tasks: Sequence[Callable[[int], T]], lanes: int, stop: threading.Event) -> list[T]:
  """Runs every ``task(lane)``, at most ``lanes`` at once, and returns their results in order.

  ``lane`` is the index (``0 .. lanes - 1``) of the lane the task holds while it runs (a
  progress-bar row). A task must check ``stop`` where it can end safely and raise `Stopped`
  then. The first error of any task sets ``stop``; tasks not yet started do not start; the
  error is raised once every running task has ended. An interrupt (``KeyboardInterrupt``) in
  the calling thread does the same.
  """
  if lanes <= 1:
    return [task(0) for task in tasks]
  free: queue.SimpleQueue[int] = queue.SimpleQueue()
  for lane in range(lanes):
    free.put(lane)

  def hold_lane(task: Callable[[int], T]) -> T:
    if stop.is_set():
      raise Stopped("not started: another lane stopped the comparison")
    lane = free.get()
    try:
      return task(lane)
    except Stopped:
      raise
    except BaseException:
      stop.set()  # before the lane is free, so that no queued task starts after a failure
      raise
    finally:
      free.put(lane)

  pool = concurrent.futures.ThreadPoolExecutor(lanes, thread_name_prefix="xent-jax-lane")
  futures = [pool.submit(hold_lane, task) for task in tasks]
  first: BaseException | None = None
  try:
    for future in concurrent.futures.as_completed(futures):
      error = future.exception()
      if error is not None and not isinstance(error, Stopped) and first is None:
        first = error
        stop.set()
  except BaseException:
    stop.set()
    raise
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  if first is not None:
    raise first
  return [future.result() for future in futures]
