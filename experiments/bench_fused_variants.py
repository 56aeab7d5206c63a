"""Every registry loss through its fused form vs the naive head: time and compiled temp memory.

Naive = ``hidden @ weight.T`` and the loss written plainly (``jax.nn.log_softmax`` and the
published formula) differentiated by autodiff; fused = ``xent_jax.get_loss(name).linear`` (value
and gradients of hidden and weight, integer labels, mean). Times are medians of --reps
round-robin calls (naive, fused, naive, ...), so load changes on a shared machine hit both alike.

Usage:
  python experiments/bench_fused_variants.py [--n 4096] [--d 512] [--v 32768] [--reps 3] \
      [--out experiments/results/bench_fused_variants]

It runs on the CPU unless ``JAX_PLATFORMS`` is set (``JAX_PLATFORMS=cuda`` for a GPU).
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _platform_prefix() -> str:
  """``JAX_PLATFORMS=...`` for the recorded command, unless the default CPU."""
  platforms = os.environ["JAX_PLATFORMS"]
  return "" if platforms == "cpu" else f"JAX_PLATFORMS={platforms} "


import host  # noqa: E402  experiments/host.py (where this ran) imports jax
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import xent_jax  # noqa: E402


def _picked(log_p, labels):
  return jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]


def _naive_losses():
  """The published per-example formulas on full logits, for autodiff (integer labels)."""

  def on_log_p(f):
    return lambda logits, labels: jnp.mean(f(jax.nn.log_softmax(logits), labels))

  p_y = lambda lp, y: jnp.exp(_picked(lp, y))
  return {
    "cross_entropy": on_log_p(lambda lp, y: -_picked(lp, y)),
    "focal": on_log_p(lambda lp, y: -((1 - p_y(lp, y)) ** 2.0) * _picked(lp, y)),
    "poly1": on_log_p(lambda lp, y: -_picked(lp, y) + 2.0 * (1 - p_y(lp, y))),
    "generalized_ce": on_log_p(lambda lp, y: (1 - p_y(lp, y) ** 0.7) / 0.7),
    "truncated_gce": on_log_p(lambda lp, y: (1 - jnp.maximum(p_y(lp, y), 0.5) ** 0.7) / 0.7),
    "taylor_ce": on_log_p(lambda lp, y: (1 - p_y(lp, y)) + (1 - p_y(lp, y)) ** 2 / 2),
    "symmetric_ce": on_log_p(lambda lp, y: -0.1 * _picked(lp, y) + 1.0 * 4.0 * (1 - p_y(lp, y))),
    "confidence_penalty": on_log_p(
      lambda lp, y: -_picked(lp, y) - 0.1 * -jnp.sum(jnp.exp(lp) * lp, axis=-1)
    ),
  }


def _compile(fn, *args):
  compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
  return compiled, compiled.memory_analysis().temp_size_in_bytes / 2**20


def _time(compiled, *args):
  tic = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  return time.perf_counter() - tic


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=4096)
  parser.add_argument("--d", type=int, default=512)
  parser.add_argument("--v", type=int, default=32768)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  keys = jax.random.split(jax.random.key(0), 3)
  hidden = jax.random.normal(keys[0], (args.n, args.d), jnp.float32)
  weight = jax.random.normal(keys[1], (args.v, args.d), jnp.float32) / args.d**0.5
  labels = jax.random.randint(keys[2], (args.n,), 0, args.v)
  rows = []
  for name, naive_loss in _naive_losses().items():
    naive, naive_mib = _compile(lambda h, w, head=naive_loss: head(h @ w.T, labels), hidden, weight)
    loss = xent_jax.get_loss(name)
    fused, fused_mib = _compile(lambda h, w, loss=loss: loss.linear(h, w, labels), hidden, weight)
    _time(naive, hidden, weight), _time(fused, hidden, weight)
    naive_s, fused_s = [], []
    for _ in range(args.reps):
      naive_s.append(_time(naive, hidden, weight))
      fused_s.append(_time(fused, hidden, weight))
    row = {
      "loss": name,
      "naive_s": statistics.median(naive_s),
      "fused_s": statistics.median(fused_s),
      "naive_mib": naive_mib,
      "fused_mib": fused_mib,
    }
    row["time_ratio"] = row["fused_s"] / row["naive_s"]
    row["temp_ratio"] = fused_mib / naive_mib
    rows.append(row)
    print(
      f"{name:20s} naive {row['naive_s']:6.2f} s {naive_mib:8.1f} MiB | fused "
      f"{row['fused_s']:6.2f} s {fused_mib:8.1f} MiB | time x{row['time_ratio']:.2f} "
      f"temp x{row['temp_ratio']:.3f}",
      flush=True,
    )
  header = (
    f"# Fused forms vs naive heads, fwd+bwd, N={args.n}, D={args.d}, V={args.v}, fp32\n\n"
    f"Machine: {host.describe()}. Command: `{_platform_prefix()}python "
    f"experiments/bench_fused_variants.py --n {args.n} --d {args.d} --v {args.v} "
    f"--reps {args.reps}`. Medians of {args.reps} round-robin calls.\n\n"
  )
  table = [
    "| loss | naive s | fused s | time fused/naive | naive temp MiB | fused temp MiB | "
    "temp fused/naive |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    table.append(
      f"| {r['loss']} | {r['naive_s']:.2f} | {r['fused_s']:.2f} | "
      f"{r['time_ratio']:.2f} | {r['naive_mib']:.0f} | {r['fused_mib']:.1f} | "
      f"{r['temp_ratio']:.3f} |"
    )
  text = header + "\n".join(table) + "\n"
  print(text)
  if args.out:
    with open(args.out + ".md", "w") as f:
      f.write(text)
    with open(args.out + ".json", "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
