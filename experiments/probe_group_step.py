"""Table: one group step of the MNIST-1D CNN, per conv form and group mode, against one run alone.

A group of ``compare`` runs its members either side by side (``vmap``) or one after another in
one program (``lax.map``). The convolution's form decides which is fast on XLA:CPU: ``lax.conv``
(``model.conv: lax``) or patches @ kernel (``im2col``). This times, for each form, the train step
of one run alone (the sequential run's program) and of ``--members`` members under ``map`` and
``vmap`` (the paper config's Adam step at batch 100; milliseconds, median of ``--reps`` calls
after a warm-up call). The last columns time the ``map`` group cut into lanes
(`xent_jax.train.lanes`: one part per CPU core, each part's steps chained in its own thread, as
``compare`` runs them): milliseconds per step of all members (wall time of ``--reps`` chained
steps over ``--reps``), and the process's CPU time over its wall time while they ran.

Usage:
  python experiments/probe_group_step.py [--members 8] [--reps 30]
"""

import argparse
import itertools
import os
import statistics
import threading
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import host
import jax
import jax.numpy as jnp

from xent_jax.train import (
  load_config,
  steps,
)
from xent_jax.train import members as group_members
from xent_jax.train.data import load_dataset
from xent_jax.train.lanes import choose_lanes


def _median_ms(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    tic = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - tic)
  return 1e3 * statistics.median(times)


def _chained_median_ms(step, state, *args, reps: int) -> float:
  """Median milliseconds of ``state = step(state, *args)[0]`` (a run's donating train step)."""
  state = jax.block_until_ready(step(state, *args)[0])
  times = []
  for _ in range(reps):
    tic = time.perf_counter()
    state = jax.block_until_ready(step(state, *args)[0])
    times.append(time.perf_counter() - tic)
  return 1e3 * statistics.median(times)


def _lanes_ms(fn, parts, *, reps: int) -> tuple[float, float]:
  """``(ms per step of every part, process CPU s / wall s)``: each part's ``reps`` chained
  steps in its own thread, all threads at once."""

  def chain(args):
    state = args[0]
    for _ in range(reps):
      state, _, _ = fn(state, *args[1:])
    jax.block_until_ready(state)

  for args in parts:
    jax.block_until_ready(fn(*args))  # compile every part's shape first
  threads = [threading.Thread(target=chain, args=(args,)) for args in parts]
  wall, cpu = time.perf_counter(), time.process_time()
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  wall = time.perf_counter() - wall
  return 1e3 * wall / reps, (time.process_time() - cpu) / wall


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--members", type=int, default=8)
  parser.add_argument("--reps", type=int, default=30)
  args = parser.parse_args()
  m = args.members
  lanes = min(m, choose_lanes(0, "map", "cpu"))
  print(host.describe())
  print(
    f"| conv | one run ms | map {m} ms | vmap {m} ms | map per member / one run "
    f"| map {m} in {lanes} lanes ms | lanes CPU / wall |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|")
  for conv in ("lax", "im2col"):
    config = load_config("configs/mnist1d_paper.yaml", (f"model.conv={conv}",))
    data = load_dataset(config.data, image=False)
    graphdef = group_members.graph_of(config, data)
    state = group_members.initial_states(config, data, list(range(m)), None)
    x_BxF, y_B = jnp.asarray(data.x_train_NxF[:100]), jnp.asarray(data.y_train_N[:100])
    stacked = (jnp.stack([x_BxF] * m), jnp.stack([y_B] * m), jnp.ones((m,), bool))
    step = steps.make_member_step(graphdef, config, ())
    alone = _chained_median_ms(
      steps.make_train_step(graphdef, steps.make_objective(config.loss)),
      jax.tree.map(lambda a: jnp.array(a[0]), state),
      x_BxF,
      y_B,
      reps=args.reps,
    )
    programs = {
      mode: jax.jit(steps.over_members(step, mode, (0, None, 0, 0, 0))) for mode in ("map", "vmap")
    }
    grouped = {
      mode: _median_ms(program, state, {}, *stacked, reps=args.reps)
      for mode, program in programs.items()
    }
    ratio = grouped["map"] / m / alone
    bounds = [round(i * m / lanes) for i in range(lanes + 1)]
    parts = [
      jax.tree.map(lambda a, lo=lo, hi=hi: a[lo:hi], (state, {}, *stacked))
      for lo, hi in itertools.pairwise(bounds)
    ]
    in_lanes, cores = _lanes_ms(programs["map"], parts, reps=args.reps)
    print(
      f"| {conv} | {alone:.2f} | {grouped['map']:.2f} | {grouped['vmap']:.2f} | {ratio:.2f} "
      f"| {in_lanes:.2f} | {cores:.2f} |"
    )


if __name__ == "__main__":
  main()
