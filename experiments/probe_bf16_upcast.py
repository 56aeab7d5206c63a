"""Table: the fused head on bfloat16 inputs, with bfloat16 blocks and cast to float32 first (CPU).

On a CPU without native bfloat16 matrix products, XLA:CPU converts bfloat16 operands inside
every product, and the fused head's blocks make several products per pass. This probe times
``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))`` on bfloat16 ``hidden [N, D]`` and
``weight [V, D]`` (integer labels, mean loss) four ways, round-robin, median of --reps calls:

* ``naive``: ``optax.softmax_cross_entropy_with_integer_labels`` on ``hidden @ weight.T``;
* ``bf16``: :func:`xent_jax.linear_cross_entropy` with bfloat16 blocks (compiled with
  ``xent_jax.fused.ops.UPCAST_PLATFORMS`` empty: what GPUs and TPUs run, and CPU did before the
  cast);
* ``default``: the same with the library's defaults (on CPU, the one-pass schedule casts the
  inputs to float32 once, ``xent_jax.fused.ops.upcast_on``);
* ``upcast``: the defaults on ``hidden.astype(float32)`` and ``weight.astype(float32)`` (autodiff
  casts the gradients back to bfloat16), which ``default`` should match.

It prints compiled temporary memory (``memory_analysis()``), the losses, and how far the other
weight gradients are from ``upcast``'s, relative to its largest entry.

Usage:
  python experiments/probe_bf16_upcast.py [--n 4096] [--d 512] [--v 32768] [--reps 5]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import host  # experiments/host.py: where this ran
import jax
import jax.numpy as jnp
import optax

import xent_jax
from xent_jax.fused import ops as fused_ops


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=4096)
  parser.add_argument("--d", type=int, default=512)
  parser.add_argument("--v", type=int, default=32768)
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args()
  keys = jax.random.split(jax.random.key(0), 3)
  hidden = (jax.random.normal(keys[0], (args.n, args.d)) / 8).astype(jnp.bfloat16)
  weight = (jax.random.normal(keys[1], (args.v, args.d)) / 8).astype(jnp.bfloat16)
  labels = jax.random.randint(keys[2], (args.n,), 0, args.v)
  f32 = jnp.float32
  losses = {
    "naive": lambda h, w: optax.softmax_cross_entropy_with_integer_labels(
      (h @ w.T).astype(f32), labels
    ).mean(),
    "bf16": lambda h, w: xent_jax.linear_cross_entropy(h, w, labels),
    "default": lambda h, w: xent_jax.linear_cross_entropy(h, w, labels),
    "upcast": lambda h, w: xent_jax.linear_cross_entropy(h.astype(f32), w.astype(f32), labels),
  }
  # Compiled executables, so that each keeps the choice it was traced with.
  programs = {}
  for name, f in losses.items():
    fused_ops.UPCAST_PLATFORMS = () if name == "bf16" else ("cpu",)
    programs[name] = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(hidden, weight).compile()
  fused_ops.UPCAST_PLATFORMS = ("cpu",)
  temp = {name: p.memory_analysis().temp_size_in_bytes / 2**20 for name, p in programs.items()}
  results = {name: jax.block_until_ready(p(hidden, weight)) for name, p in programs.items()}
  times = {name: [] for name in programs}
  for _ in range(args.reps):
    for name, program in programs.items():
      start = time.perf_counter()
      jax.block_until_ready(program(hidden, weight))
      times[name].append(time.perf_counter() - start)
  naive = statistics.median(times["naive"])
  print(f"bfloat16 inputs, N={args.n}, D={args.d}, V={args.v}; {host.describe()}")
  print(
    f"median of {args.reps} round-robin calls of jit(value_and_grad), grads of hidden and weight"
  )
  print()
  print("| method | wall s | wall / naive | temp MiB | loss |")
  print("|---|---:|---:|---:|---:|")
  for name in programs:
    median = statistics.median(times[name])
    loss = float(results[name][0])
    print(f"| {name} | {median:.2f} | {median / naive:.2f} | {temp[name]:.1f} | {loss:.6f} |")
  d_weight = {name: results[name][1][1].astype(f32) for name in ("bf16", "default", "upcast")}
  largest = jnp.max(jnp.abs(d_weight["upcast"]))
  print()
  for name in ("bf16", "default"):
    gap = jnp.max(jnp.abs(d_weight[name] - d_weight["upcast"]))
    print(f"max |dW {name} - dW upcast| / max |dW upcast| = {float(gap / largest):.1e}")


if __name__ == "__main__":
  main()
