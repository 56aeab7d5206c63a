"""Benchmark: the bi-tempered loss against xent_jax.cross_entropy, forward + backward under jit.

Usage:
  python experiments/bench_bitempered.py [--tokens 8192] [--vocab 32768] [--repeats 5]
      [--tpu v5e:2x2] [--out experiments/results/bench_bitempered]

For each case (fp32 and bf16 logits, integer labels, default ``t1=0.8, t2=1.2, num_iters=5``)
it compiles ``jax.jit(jax.value_and_grad(mean loss))`` of both losses, reads the compiled temporary
memory from ``memory_analysis()``, times the compile (lower + compile, seconds) and the calls
(median of ``--repeats``; the two losses take turns, each turn an untimed call then a timed one,
so that load changes on a shared machine hit both alike). With ``--tpu`` it also compiles both
for one chip of that TPU slice through `xent_jax.tools.aot` (needs libtpu; no TPU is used) and
reports the compile seconds and temp memory there. Prints a markdown table and writes
``<out>.md`` and ``<out>.json``.

Targets (issue 8): time <= 4x cross_entropy, temp <= 1/8 of one [N, V] float32 array, compile
<= 5 s.
"""

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp

import xent_jax
from xent_jax.tools import aot, libtpu

LOSSES = {
  "cross_entropy": lambda x, y: xent_jax.cross_entropy(x, y),
  "bi_tempered": lambda x, y: xent_jax.bi_tempered_logistic_loss(x, y),
}
CASES = {"fp32": jnp.float32, "bf16": jnp.bfloat16}


def _compile(loss_fn, logits, labels):
  """Compiled fwd+bwd step, its temp bytes and its lower+compile seconds."""
  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(logits, labels).compile()
  seconds = time.perf_counter() - start
  return compiled, compiled.memory_analysis().temp_size_in_bytes, seconds


def _time_round_robin(compiled_fns, logits, labels, repeats):
  """Per-call seconds of each function, taking turns (untimed call, then a timed one)."""
  times = [[] for _ in compiled_fns]
  for _ in range(repeats):
    for fn, out in zip(compiled_fns, times):
      jax.block_until_ready(fn(logits, labels))
      start = time.perf_counter()
      jax.block_until_ready(fn(logits, labels))
      out.append(time.perf_counter() - start)
  return times


def _tpu_compile(topology, shape, dtype):
  """``{loss: (compile seconds, temp bytes)}`` compiled for one chip of ``topology``."""
  chip = aot.topology(topology).devices[0]
  logits = aot.spec(shape, dtype, chip)
  labels = aot.spec(shape[:1], jnp.int32, chip)
  out = {}
  for name, loss_fn in LOSSES.items():
    start = time.perf_counter()
    compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(logits, labels).compile()
    out[name] = (time.perf_counter() - start, compiled.memory_analysis().temp_size_in_bytes)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=8192)
  parser.add_argument("--vocab", type=int, default=32768)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--tpu", default=None, help="also compile for this TPU slice, e.g. v5e:2x2")
  parser.add_argument("--out", default="experiments/results/bench_bitempered")
  args = parser.parse_args()
  if args.tpu:
    libtpu.quiet_libtpu()  # before JAX starts its backends

  load_at_start = os.getloadavg()
  shape = (args.tokens, args.vocab)
  nxv_f32_mib = args.tokens * args.vocab * 4 / 2**20
  key_x, key_y = jax.random.split(jax.random.PRNGKey(0))
  labels = jax.random.randint(key_y, shape[:1], 0, args.vocab)
  results = []
  for case, dtype in CASES.items():
    logits = jax.random.normal(key_x, shape, dtype)
    compiled = {name: _compile(fn, logits, labels) for name, fn in LOSSES.items()}
    values = {name: float(c(logits, labels)[0]) for name, (c, _, _) in compiled.items()}
    times = _time_round_robin([c for c, _, _ in compiled.values()], logits, labels, args.repeats)
    medians = dict(zip(LOSSES, (statistics.median(t) for t in times)))
    row = {
      "case": case,
      "shape": list(shape),
      "seconds": medians,
      "per_call_seconds": dict(zip(LOSSES, times)),
      "time_ratio": medians["bi_tempered"] / medians["cross_entropy"],
      "temp_mib": {name: temp / 2**20 for name, (_, temp, _) in compiled.items()},
      "temp_fraction_of_nxv_f32": compiled["bi_tempered"][1] / 2**20 / nxv_f32_mib,
      "compile_seconds_cpu": {name: s for name, (_, _, s) in compiled.items()},
      "loss": values,
    }
    if args.tpu:
      tpu = _tpu_compile(args.tpu, shape, dtype)
      row["tpu"] = {
        "topology": args.tpu,
        "compile_seconds": {name: s for name, (s, _) in tpu.items()},
        "temp_mib": {name: b / 2**20 for name, (_, b) in tpu.items()},
      }
    results.append(row)
    del logits, compiled

  load = os.getloadavg()
  command = shlex.join(["python", *sys.argv])
  header = (
    f"Command: `{command}`\n\n"
    f"fwd+bwd under jit, N={args.tokens}, V={args.vocab}, integer labels, bi_tempered defaults "
    f"(t1=0.8, t2=1.2, num_iters=5); median of {args.repeats} round-robin calls; "
    f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
    f"{platform.processor() or platform.machine()}; 1/5/15-minute load averages at the start "
    f"{load_at_start[0]:.1f} / {load_at_start[1]:.1f} / {load_at_start[2]:.1f}, at the end "
    f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (a machine shared with other jobs).\n"
    f"One [N, V] float32 array = {nxv_f32_mib:.0f} MiB; targets: time <= 4x, temp <= 1/8 of it "
    f"({nxv_f32_mib / 8:.0f} MiB), compile <= 5 s.\n"
  )
  lines = [
    "| logits | cross_entropy s | bi_tempered s | time ratio | bi_tempered temp MiB "
    "(cross_entropy) | compile s CPU: bi_tempered (cross_entropy) |"
    + (f" compile s {args.tpu}: bi_tempered (cross_entropy), temp MiB |" if args.tpu else ""),
    "|---|---|---|---|---|---|" + ("---|" if args.tpu else ""),
  ]
  for r in results:
    line = (
      f"| {r['case']} | {r['seconds']['cross_entropy']:.3f} | {r['seconds']['bi_tempered']:.3f} "
      f"| {r['time_ratio']:.2f}x | {r['temp_mib']['bi_tempered']:.2f} "
      f"({r['temp_mib']['cross_entropy']:.2f}) | {r['compile_seconds_cpu']['bi_tempered']:.2f} "
      f"({r['compile_seconds_cpu']['cross_entropy']:.2f}) |"
    )
    if args.tpu:
      t = r["tpu"]
      seconds = t["compile_seconds"]
      line += (
        f" {seconds['bi_tempered']:.2f} ({seconds['cross_entropy']:.2f}),"
        f" {t['temp_mib']['bi_tempered']:.2f} |"
      )
    lines.append(line)
  table = header + "\n" + "\n".join(lines) + "\n"
  print(table)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ".md", "w") as f:
    f.write(table)
  with open(args.out + ".json", "w") as f:
    json.dump(
      {
        "command": command,
        "args": vars(args),
        "load_average_start": load_at_start,
        "load_average_end": load,
        "results": results,
      },
      f,
      indent=1,
    )


if __name__ == "__main__":
  main()
