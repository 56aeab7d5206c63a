"""Engine heads at a language-model-like head: blocked statistics against rematerialised chunks.

Where a head's float32 ``[V, D]`` buffer is not small
(:func:`xent_jax.fused.schedule.one_pass_fits`), ``get_loss(name).linear`` of a variant with
integer labels and a bfloat16 weight computes its per-row statistics in blocks
(:mod:`xent_jax.fused.heads`): the log-sum-exp and the label's logit, the smoothing class sum and
the entropy when the loss needs them, and a blocked tangent pass whose transpose is the
backward pass, vocabulary-major for bfloat16 heads. Before, it rematerialised token chunks of
logits (:func:`xent_jax.fused.chunked.chunked_linear_loss`, still the schedule of probability labels
and the bi-tempered loss), whose weight gradient sums over the chunks in the weight's dtype.

Both schedules run in one process on the same inputs (value and gradients of hidden and weight,
'mean'), round-robin, median of --reps calls; temp memory is
``jax.jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes``. The weight gradient is
compared with the float64 gradient of the same (rounded) inputs: the largest error over the
largest entry, and the fraction of entries off by more than two roundings of the weight's dtype
(relative ``2**-8`` for bfloat16, ``2**-23`` for float32); the hidden gradient's largest error
too.

Usage:
  python experiments/bench_fused_heads.py [--n 1024] [--d 1024] [--v 32000] [--reps 3] \
      [--out experiments/results/bench_fused_heads]

It runs on the CPU unless ``JAX_PLATFORMS`` is set.
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import host  # experiments/host.py: where this ran
import jax
import jax.numpy as jnp
import numpy as np

import xent_jax
from xent_jax.fused import (
  chunked,
  schedule,
)
from xent_jax.fused import heads as fused_heads
from xent_jax.fused.rows import LinearLayout

jax.config.update("jax_enable_x64", True)
# `.linear` takes the blocked statistics for weights narrower than float32 only (takes_blocks, from
# the float32 rows of this table); here every row measures them.
fused_heads.takes_blocks = lambda *dtypes: True


def _remat(loss, hidden, weight, labels):
  """The rematerialising schedule of ``loss`` (the previous ``.linear`` of the variants)."""
  row_loss = lambda x, y, valid: (loss(x, y, where=valid, reduction="none"), {})
  valid = jnp.ones(labels.shape, bool)
  per_row, _ = chunked.chunked_linear_loss(
    "bench",
    row_loss,
    hidden,
    weight,
    labels,
    valid,
    LinearLayout("vd"),
    bias=None,
  )
  return jnp.mean(per_row)


def _compiled(fn, *args):
  compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
  return compiled, compiled.memory_analysis().temp_size_in_bytes / 2**20


def _seconds(compiled, *args):
  tic = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  return time.perf_counter() - tic


def _grad_error(got, want, dtype):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  error = np.abs(got - want)
  ulp = 2.0 ** -(jnp.finfo(dtype).nmant + 1)
  beyond = error > 2 * ulp * np.abs(want) + 1e-6 * np.max(np.abs(want))
  return float(np.max(error) / np.max(np.abs(want))), float(np.mean(beyond))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=1024)
  parser.add_argument("--d", type=int, default=1024)
  parser.add_argument("--v", type=int, default=32000)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--losses", default="focal,confidence_penalty")
  parser.add_argument("--dtypes", default="bfloat16,float32")
  parser.add_argument("--smoothing", default="0.0,0.1")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  n, d, v = args.n, args.d, args.v
  assert not schedule.one_pass_fits(n, d, v), "pick a head whose float32 [V, D] is not small"
  rng = np.random.default_rng(0)
  hidden64 = rng.normal(size=(n, d)) / np.sqrt(d) * 4
  weight64 = rng.normal(size=(v, d)) / 2
  labels = jnp.asarray(rng.integers(0, v, size=n))
  rows = []
  for dtype in args.dtypes.split(","):
    hidden, weight = jnp.asarray(hidden64, dtype), jnp.asarray(weight64, dtype)
    h64, w64 = (jnp.asarray(a, jnp.float64) for a in (hidden, weight))
    for name in args.losses.split(","):
      for smoothing in (float(s) for s in args.smoothing.split(",")):
        loss = xent_jax.get_loss(name, **({"label_smoothing": smoothing} if smoothing else {}))
        schedules = {
          "blocked": lambda h, w, loss=loss: loss.linear(h, w, labels),
          "remat": lambda h, w, loss=loss: _remat(loss, h, w, labels),
        }
        reference = lambda h, w, loss=loss: jnp.mean(loss(h @ w.T, labels, reduction="none"))
        want = jax.jit(jax.grad(reference, argnums=(0, 1)))(h64, w64)
        compiled, temps, times, errors = {}, {}, {k: [] for k in schedules}, {}
        for key, fn in schedules.items():
          compiled[key], temps[key] = _compiled(fn, hidden, weight)
          _, (d_hidden, d_weight) = compiled[key](hidden, weight)
          errors[key] = (
            *_grad_error(d_weight, want[1], dtype),
            _grad_error(d_hidden, want[0], dtype)[0],
          )
        for _ in range(args.reps):
          for key in schedules:
            times[key].append(_seconds(compiled[key], hidden, weight))
        med = {k: statistics.median(t) for k, t in times.items()}
        row = dict(
          loss=name,
          dtype=dtype,
          smoothing=smoothing,
          blocked_s=med["blocked"],
          remat_s=med["remat"],
          time_ratio=med["blocked"] / med["remat"],
          blocked_temp_mib=temps["blocked"],
          remat_temp_mib=temps["remat"],
          blocked_dw_max_error=errors["blocked"][0],
          remat_dw_max_error=errors["remat"][0],
          blocked_dw_beyond_rounding=errors["blocked"][1],
          remat_dw_beyond_rounding=errors["remat"][1],
          blocked_dh_max_error=errors["blocked"][2],
          remat_dh_max_error=errors["remat"][2],
        )
        rows.append(row)
        print(row, flush=True)
  machine = host.describe()
  lines = [
    f"# Engine heads, blocked vs rematerialised, fwd+bwd, N={n}, D={d}, V={v}, 'mean'",
    "",
    f"Machine: {machine}. Command: `python experiments/bench_fused_heads.py --n {n} --d {d} "
    f"--v {v} --reps {args.reps}`. Medians of {args.reps} round-robin calls.",
    "",
    "dW error: largest |error| / largest |entry| against float64 on the same inputs; 'beyond' is "
    "the fraction of entries off by more than twice the dtype's rounding (relative).",
    "",
    "| loss | dtype | smoothing | blocked s | remat s | time blocked/remat | blocked temp MiB "
    "| remat temp MiB | dW max error blocked | remat | dW beyond rounding blocked | remat "
    "| dh max error blocked | remat |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
      f"| {r['loss']} | {r['dtype']} | {r['smoothing']} | {r['blocked_s']:.2f} | "
      f"{r['remat_s']:.2f} | {r['time_ratio']:.2f} | {r['blocked_temp_mib']:.1f} | "
      f"{r['remat_temp_mib']:.1f} | {r['blocked_dw_max_error']:.1e} | "
      f"{r['remat_dw_max_error']:.1e} | {r['blocked_dw_beyond_rounding']:.4f} | "
      f"{r['remat_dw_beyond_rounding']:.4f} | {r['blocked_dh_max_error']:.1e} | "
      f"{r['remat_dh_max_error']:.1e} |"
    )
  text = "\n".join(lines)
  print(text)
  if args.out:
    with open(args.out + ".md", "w") as f:
      f.write(text + "\n")
    with open(args.out + ".json", "w") as f:
      json.dump({"machine": machine, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
