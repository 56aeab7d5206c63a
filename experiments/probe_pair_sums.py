"""Table: what two per-row sums over the same logits cost on XLA:CPU, by how they are written.

A smoothed focal loss (or truncated L_q) needs two sums over every class of a row, its value
:math:`\\sum_c f(\\log p_c)` and its slope total :math:`\\sum_c f'(\\log p_c)`, where
cross-entropy's smoothing needs only :math:`\\sum_c x_c`, linear in the logits. This script times
the ways JAX can write the pair (jit, median of --reps calls, temp memory from
``memory_analysis()``), with focal's :math:`f = -(1-p)^2\\log p` on ``[N, V]`` float32 logits:

* ``sum x`` and ``sum exp``: one cheap pass and one pass with an exponential (the floor);
* ``one sum``: :math:`\\sum_c f` alone, one fused pass;
* ``two sums``: both, written side by side (XLA:CPU stores their shared intermediates as
  ``[N, V]`` arrays);
* ``complex sum``: :math:`\\sum_c (f + i f')` in complex64, one reduction of one operand;
* ``stacked sum``: :math:`\\sum_c` of ``stack([f, f'])``, ``[N, 2, V]`` summed over V;
* ``blended sum``: an ``[N, 2, V]`` sum of :math:`(1-k) f + k f'`, which XLA:CPU fuses into one
  reduction without temporaries, but which evaluates both functions for both ``k``.

Usage:
  python experiments/probe_pair_sums.py [--n 8192] [--v 32768] [--reps 5]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
from jax import lax


def _focal_terms(x, m, log_sum):
  """Focal's :math:`f` and :math:`f'` (gamma 2) at :math:`\\log p = x - m - \\texttt{log\\_sum}`."""
  log_p = x - m[..., None] - log_sum[..., None]
  u = 1.0 - jnp.exp(log_p)
  return -(u * u) * log_p, -(u * u) + 2.0 * u * (1.0 - u) * log_p


def _cases():
  def two_sums(x, m, s):
    f, g = _focal_terms(x, m, s)
    return jnp.sum(f, -1), jnp.sum(g, -1)

  def complex_sum(x, m, s):
    f, g = _focal_terms(x, m, s)
    z = jnp.sum(lax.complex(f, g), -1)
    return z.real, z.imag

  def stacked_sum(x, m, s):
    f, g = _focal_terms(x, m, s)
    return jnp.sum(jnp.stack([f, g], -2), -1)

  def blended_sum(x, m, s):
    f, g = _focal_terms(x[:, None, :], m[:, None], s[:, None])
    k = lax.broadcasted_iota(x.dtype, (1, 2, 1), 1)
    return jnp.sum(f * (1 - k) + g * k, -1)

  return {
    "sum x": lambda x, m, s: jnp.sum(x, -1),
    "sum exp": lambda x, m, s: jnp.sum(jnp.exp(x - m[:, None]), -1),
    "one sum": lambda x, m, s: jnp.sum(_focal_terms(x, m, s)[0], -1),
    "two sums": two_sums,
    "complex sum": complex_sum,
    "stacked sum": stacked_sum,
    "blended sum": blended_sum,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=8192)
  parser.add_argument("--v", type=int, default=32768)
  parser.add_argument("--reps", type=int, default=5)
  args = parser.parse_args()
  x = jax.random.normal(jax.random.key(0), (args.n, args.v), jnp.float32) * 3
  m = jnp.max(x, -1)
  log_sum = jnp.log(jnp.sum(jnp.exp(x - m[:, None]), -1))
  print(
    f"N={args.n} V={args.v} float32, jax {jax.__version__} ({jax.default_backend()}), "
    f"{os.cpu_count()} cores, median of {args.reps}\n"
  )
  print("| sums | ms | temp MiB |\n|---|---|---|")
  for name, fn in _cases().items():
    compiled = jax.jit(fn).lower(x, m, log_sum).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
    jax.block_until_ready(compiled(x, m, log_sum))
    times = []
    for _ in range(args.reps):
      tic = time.perf_counter()
      jax.block_until_ready(compiled(x, m, log_sum))
      times.append(time.perf_counter() - tic)
    print(f"| {name} | {1e3 * statistics.median(times):.1f} | {temp:.1f} |", flush=True)


if __name__ == "__main__":
  main()
