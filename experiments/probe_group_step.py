"""Table: one group step of the MNIST-1D CNN, per conv form and group mode, against one run alone.

A group of ``compare`` runs its members either side by side (``vmap``) or one after another in
one program (``lax.map``). The convolution's form decides which is fast on XLA:CPU: ``lax.conv``
(``model.conv: lax``) or patches @ kernel (``im2col``). This times, for each form, the jitted step
of one member alone and of ``--members`` members under ``map`` and ``vmap`` (the paper config's
Adam step at batch 100; milliseconds, median of ``--reps`` calls after a warm-up call).

Usage:
  python experiments/probe_group_step.py [--members 5] [--reps 30]
"""

import argparse
import os
import statistics
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


def _median_ms(fn, *args, reps: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    tic = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - tic)
  return 1e3 * statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--members", type=int, default=5)
  parser.add_argument("--reps", type=int, default=30)
  args = parser.parse_args()
  m = args.members
  print(host.describe())
  print(f"| conv | one run ms | map {m} ms | vmap {m} ms | map per member / one run |")
  print("|---|---:|---:|---:|---:|")
  for conv in ("lax", "im2col"):
    config = load_config("configs/mnist1d_paper.yaml", (f"model.conv={conv}",))
    data = load_dataset(config.data, image=False)
    graphdef = group_members.graph_of(config, data)
    state = group_members.initial_states(config, data, list(range(m)), None)
    x_BxF, y_B = jnp.asarray(data.x_train_NxF[:100]), jnp.asarray(data.y_train_N[:100])
    stacked = (jnp.stack([x_BxF] * m), jnp.stack([y_B] * m), jnp.ones((m,), bool))
    step = steps.make_member_step(graphdef, config, ())
    alone = _median_ms(
      jax.jit(step), jax.tree.map(lambda a: a[0], state), {}, x_BxF, y_B, True, reps=args.reps
    )
    grouped = {
      mode: _median_ms(
        jax.jit(steps.over_members(step, mode, (0, None, 0, 0, 0))),
        state,
        {},
        *stacked,
        reps=args.reps,
      )
      for mode in ("map", "vmap")
    }
    ratio = grouped["map"] / m / alone
    print(f"| {conv} | {alone:.2f} | {grouped['map']:.2f} | {grouped['vmap']:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
  main()
