"""Every registry loss against cross_entropy: fwd+bwd time under jit and compiled temp memory.

Integer labels, logits [N, V] (default 8192 x 32768), float32 and bfloat16, with and without
label smoothing 0.1. Each loss is timed round-robin with cross_entropy in the same run (median of
--reps calls each), so load changes on a shared machine hit both alike; the ratio is the loss's
median over cross_entropy's (with the same smoothing). Temp memory is
``jax.jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes``; compile seconds are
the wall time of that compile.

Usage:
  python experiments/bench_variants.py [--n 8192] [--v 32768] [--reps 5] \
      [--out experiments/results/bench_variants]

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

LOSSES = [
  "focal",
  "poly1",
  "generalized_ce",
  "truncated_gce",
  "taylor_ce",
  "symmetric_ce",
  "confidence_penalty",
  "bi_tempered",
]


def _compiled(name, smoothing, logits, labels):
  hparams = {"label_smoothing": smoothing} if smoothing else {}
  loss = xent_jax.get_loss(name, **hparams)
  fn = jax.jit(jax.value_and_grad(lambda x, y: loss(x, y)))
  tic = time.perf_counter()
  compiled = fn.lower(logits, labels).compile()
  seconds = time.perf_counter() - tic
  return compiled, compiled.memory_analysis().temp_size_in_bytes / 2**20, seconds


def _time(compiled, logits, labels):
  tic = time.perf_counter()
  jax.block_until_ready(compiled(logits, labels))
  return time.perf_counter() - tic


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=8192)
  parser.add_argument("--v", type=int, default=32768)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--losses", default=",".join(LOSSES))
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--smoothing", default="0.0,0.1")
  parser.add_argument("--out", default=None)
  parser.add_argument(
    "--cpu-branches",
    action="store_true",
    help="take the CPU branch of every jax.lax.platform_dependent (the engine's separate class-sum "
    "passes, also TPU's; bi-tempered's integer powers) on any backend: does XLA:CPU's structure "
    "also cure an accelerator's [N, V] temporaries, and at what cost?",
  )
  args = parser.parse_args()
  if args.cpu_branches:
    jax.lax.platform_dependent = lambda *a, cpu=None, default=None, **k: (cpu or default)(*a)
  rows = []
  for dtype in (jnp.dtype(d) for d in args.dtypes.split(",")):
    logits = (3 * jax.random.normal(jax.random.key(0), (args.n, args.v))).astype(dtype)
    labels = jax.random.randint(jax.random.key(1), (args.n,), 0, args.v)
    for smoothing in (float(e) for e in args.smoothing.split(",")):
      base, base_mib, _ = _compiled("cross_entropy", smoothing, logits, labels)
      _time(base, logits, labels)
      for name in args.losses.split(","):
        if name == "bi_tempered" and smoothing:
          continue  # its smoothing is the authors' convention, not comparable
        compiled, mib, compile_s = _compiled(name, smoothing, logits, labels)
        _time(compiled, logits, labels)
        ours, theirs = [], []
        for _ in range(args.reps):
          theirs.append(_time(base, logits, labels))
          ours.append(_time(compiled, logits, labels))
        row = {
          "loss": name,
          "dtype": jnp.dtype(dtype).name,
          "label_smoothing": smoothing,
          "ms": 1e3 * statistics.median(ours),
          "ce_ms": 1e3 * statistics.median(theirs),
          "temp_mib": mib,
          "ce_temp_mib": base_mib,
          "compile_s": compile_s,
        }
        row["ratio"] = row["ms"] / row["ce_ms"]
        rows.append(row)
        print(
          f"{name:20s} {row['dtype']:8s} ls={smoothing:<4} {row['ms']:8.1f} ms "
          f"(ce {row['ce_ms']:7.1f}) x{row['ratio']:.2f}  temp {mib:9.2f} MiB  "
          f"compile {compile_s:5.1f} s",
          flush=True,
        )
  header = (
    f"# Variants vs cross_entropy, fwd+bwd, N={args.n}, V={args.v}, integer labels\n\n"
    f"Machine: {host.describe()}. Command: `{_platform_prefix()}python "
    f"experiments/bench_variants.py --n {args.n} --v {args.v} --reps {args.reps} "
    f"--dtypes {args.dtypes} --smoothing {args.smoothing}"
    f"{' --cpu-branches' if args.cpu_branches else ''}`. Median of {args.reps} round-robin "
    "calls each.\n\n"
  )
  table = [
    "| loss | dtype | smoothing | ms | cross_entropy ms | ratio | temp MiB | compile s |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    table.append(
      f"| {r['loss']} | {r['dtype']} | {r['label_smoothing']} | {r['ms']:.1f} | "
      f"{r['ce_ms']:.1f} | {r['ratio']:.2f} | {r['temp_mib']:.2f} | "
      f"{r['compile_s']:.1f} |"
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
