"""Benchmark: xent_jax cross-entropy vs optax, forward + backward, time and compiled memory.

Usage:
  python experiments/bench_cross_entropy.py [--tokens 8192] [--vocab 32768] [--repeats 7]
      [--out experiments/results/bench_cross_entropy]

Each case times ``jax.jit(jax.value_and_grad(mean loss))`` on the same inputs for both libraries
(median of ``--repeats`` timed calls; the libraries take turns, each turn an untimed call then
a timed one) and reads the compiled temporary
memory from ``jax.jit(f).lower(...).compile().memory_analysis()`` and the transcendental operations
per logit from its ``cost_analysis()`` (1: one exponential per element, 2: the backward pass
recomputes it; tests/core/test_compiled_guards.py holds ours at small shapes). Prints a markdown
table and writes ``<out>.md`` and ``<out>.json``.
"""

import argparse
import json
import os
import statistics
import time

import host  # experiments/host.py: where this ran
import jax
import jax.numpy as jnp
import optax

import xent_jax


def _mean(loss_fn):
  return lambda logits, labels: jnp.mean(loss_fn(logits, labels))


CASES = {
  "fp32, integer labels": dict(
    dtype=jnp.float32,
    xent=lambda x, y: xent_jax.cross_entropy(x, y),
    optax=_mean(optax.softmax_cross_entropy_with_integer_labels),
  ),
  "fp32, label smoothing 0.1": dict(
    dtype=jnp.float32,
    xent=lambda x, y: xent_jax.cross_entropy(x, y, label_smoothing=0.1),
    optax=_mean(
      lambda x, y: optax.softmax_cross_entropy(
        x, optax.smooth_labels(jax.nn.one_hot(y, x.shape[-1], dtype=x.dtype), 0.1)
      )
    ),
  ),
  "bf16 logits, integer labels": dict(
    dtype=jnp.bfloat16,
    xent=lambda x, y: xent_jax.cross_entropy(x, y),
    optax=_mean(optax.softmax_cross_entropy_with_integer_labels),
  ),
}


def _transcendentals_per_logit(compiled, logits) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost.get("transcendentals", float("nan")) / logits.size


def _compile(loss_fn, logits, labels):
  step = jax.jit(jax.value_and_grad(loss_fn))
  compiled = step.lower(logits, labels).compile()
  loss, _ = jax.block_until_ready(compiled(logits, labels))  # warm-up
  memory = compiled.memory_analysis().temp_size_in_bytes
  return compiled, memory, float(loss), _transcendentals_per_logit(compiled, logits)


def _time_round_robin(compiled_fns, logits, labels, repeats):
  """Median seconds of each function, taking turns so that load changes hit all alike.

  In each turn a function runs once untimed, then once timed: the untimed call lets the
  allocator settle after the other function's differently sized buffers.
  """
  times = [[] for _ in compiled_fns]
  for _ in range(repeats):
    for fn, out in zip(compiled_fns, times):
      jax.block_until_ready(fn(logits, labels))
      start = time.perf_counter()
      jax.block_until_ready(fn(logits, labels))
      out.append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--vocab", type=int, default=32768)
  parser.add_argument("--repeats", type=int, default=9)
  parser.add_argument("--out", default="experiments/results/bench_cross_entropy")
  args = parser.parse_args()

  key_x, key_y = jax.random.split(jax.random.key(0))
  logits32 = 3.0 * jax.random.normal(key_x, (args.tokens, args.vocab), jnp.float32)
  labels = jax.random.randint(key_y, (args.tokens,), 0, args.vocab)
  # bf16 case: the fp32 reference loss is computed on the same (bf16-rounded) values.
  reference_fp32 = float(
    xent_jax.cross_entropy(logits32.astype(jnp.bfloat16).astype(jnp.float32), labels)
  )

  machine = host.describe()
  rows = []
  for name, case in CASES.items():
    logits = logits32.astype(case["dtype"])
    f_x, m_x, loss_x, exp_x = _compile(case["xent"], logits, labels)
    f_o, m_o, loss_o, exp_o = _compile(case["optax"], logits, labels)
    t_x, t_o = _time_round_robin((f_x, f_o), logits, labels, args.repeats)
    row = dict(
      case=name,
      xent_ms=1e3 * t_x,
      optax_ms=1e3 * t_o,
      speedup=t_o / t_x,
      xent_temp_mib=m_x / 2**20,
      optax_temp_mib=m_o / 2**20,
      memory_ratio=m_x / m_o if m_o else float("nan"),
      xent_transcendentals_per_logit=exp_x,
      optax_transcendentals_per_logit=exp_o,
      xent_loss=loss_x,
      optax_loss=loss_o,
    )
    if case["dtype"] == jnp.bfloat16:
      row["xent_rel_err_vs_fp32"] = abs(loss_x - reference_fp32) / reference_fp32
      row["optax_rel_err_vs_fp32"] = abs(loss_o - reference_fp32) / reference_fp32
    rows.append(row)
    print(f"done: {name}", flush=True)

  header = (
    f"logits {args.tokens}x{args.vocab}, forward+backward of the mean loss, median of "
    f"{args.repeats}; {machine}; jax {jax.__version__}, optax {optax.__version__}"
  )
  lines = [
    header,
    "",
    "| case | xent_jax ms | optax ms | speed-up | xent_jax temp MiB | optax temp MiB "
    "| memory ratio | transcendentals / logit (xent_jax / optax) "
    "| loss rel. err vs fp32 (xent_jax / optax) |",
    "|---|---:|---:|---:|---:|---:|---:|---|---|",
  ]
  for r in rows:
    err = (
      f"{r['xent_rel_err_vs_fp32']:.1e} / {r['optax_rel_err_vs_fp32']:.1e}"
      if "xent_rel_err_vs_fp32" in r
      else "-"
    )
    lines.append(
      f"| {r['case']} | {r['xent_ms']:.0f} | {r['optax_ms']:.0f} | {r['speedup']:.2f}x | "
      f"{r['xent_temp_mib']:.1f} | {r['optax_temp_mib']:.1f} | {r['memory_ratio']:.4f} | "
      f"{r['xent_transcendentals_per_logit']:.2f} / {r['optax_transcendentals_per_logit']:.2f} | "
      f"{err} |"
    )
  table = "\n".join(lines)
  print(table)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ".md", "w") as f:
    f.write(table + "\n")
  with open(args.out + ".json", "w") as f:
    json.dump(dict(header=header, args=vars(args), rows=rows), f, indent=2)


if __name__ == "__main__":
  main()
