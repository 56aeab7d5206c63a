"""Benchmark: fused linear cross-entropy vs the naive path and the PyPI peers (CPU or GPU).

For each method and shape, one ``jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))`` (gradients
for ``hidden`` and ``weight``) is compiled; the table reports its compiled temporary memory
(``compiled.memory_analysis().temp_size_in_bytes``: every buffer XLA allocates besides the inputs
and the outputs) and the median wall-clock and process-CPU time of ``--reps`` calls after one
warm-up, the methods called in turn (round-robin) so that load changes hit them alike. Methods:

* ``naive``: ``optax.softmax_cross_entropy_with_integer_labels(hidden @ weight.T, labels).mean()``;
* ``xent_jax``: :func:`xent_jax.linear_cross_entropy` with its default schedule, chosen from the
  shapes and dtypes (``xent_jax.fused.schedule.plan_schedule``): one pass at every shape measured
  here;
* ``xent_jax low-mem``: ``token_chunk_size=1024, vocab_chunk_size=4096`` (two passes: token-major
  in float32, vocabulary-major in bfloat16);
* ``xent_jax T=... C=...``: with ``--blocks T:C ...``, the default schedule with these
  ``token_chunk_size`` and ``vocab_chunk_size`` (``-`` keeps a default; a given ``C`` means two
  passes). The default block, about ``2**24`` elements, was sized on a CPU: on a GPU larger
  blocks may fill the device better;
* ``jax-cce``: ``jax_cce.linear_cross_entropy`` (default ``chunk_size=4096``);
* ``tokamax``: ``tokamax.linear_softmax_cross_entropy_loss(..., implementation="xla")``, given its
  native ``[D, V]`` weight.

A peer that fails to import or run is recorded with its error instead of numbers. Each method's
loss is checked against the naive one (``|diff|`` column). Run::

    python experiments/bench_linear.py --out experiments/results/bench_linear

which writes ``<out>.json`` and ``<out>.md`` and prints the markdown. ``--quick`` shrinks
everything for a smoke test. Timings on a shared machine are noisy: the JSON records the load
average before and after, and process-CPU time next to wall time.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import host  # experiments/host.py: where this ran
import jax
import jax.numpy as jnp
import numpy as np
import optax

import xent_jax

MiB = 2**20


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _methods(blocks=()) -> dict[str, tuple[str, Callable | str]]:
  """name -> (weight layout the method takes, loss(hidden, weight, labels)) or an error string;
  ``blocks`` adds ``xent_jax`` at each ``(token_chunk_size, vocab_chunk_size)`` (``None``: the
  default)."""
  methods: dict[str, tuple[str, Callable | str]] = {
    "naive": (
      "vd",
      lambda h, w, y: optax.softmax_cross_entropy_with_integer_labels(h @ w.T, y).mean(),
    ),
    "xent_jax": ("vd", lambda h, w, y: xent_jax.linear_cross_entropy(h, w, y)),
    "xent_jax low-mem": (
      "vd",
      lambda h, w, y: xent_jax.linear_cross_entropy(
        h, w, y, token_chunk_size=1024, vocab_chunk_size=4096
      ),
    ),
  }
  for t, c in blocks:
    methods[f"xent_jax T={t or '-'} C={c or '-'}"] = (
      "vd",
      lambda h, w, y, t=t, c=c: xent_jax.linear_cross_entropy(
        h, w, y, token_chunk_size=t, vocab_chunk_size=c
      ),
    )
  try:
    import jax_cce

    methods["jax-cce"] = ("vd", lambda h, w, y: jax_cce.linear_cross_entropy(h, w, y))
  except Exception as e:
    methods["jax-cce"] = ("vd", f"import failed: {type(e).__name__}: {e}")
  try:
    import tokamax
    from absl import flags

    # tokamax reads absl flags at call time and would parse this script's argv as its own.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    methods["tokamax"] = (
      "dv",
      lambda h, w, y: tokamax.linear_softmax_cross_entropy_loss(
        h, y, w, reduction="mean", implementation="xla"
      ),
    )
  except Exception as e:
    methods["tokamax"] = ("dv", f"import failed: {type(e).__name__}: {e}")
  return methods


def _inputs(n: int, d: int, v: int, dtype) -> dict[str, jax.Array]:
  k_h, k_w, k_y = jax.random.split(jax.random.key(0), 3)
  hidden = (jax.random.normal(k_h, (n, d), jnp.float32) / np.sqrt(d) * 2.0).astype(dtype)
  weight = (jax.random.normal(k_w, (v, d), jnp.float32)).astype(dtype)
  labels = jax.random.randint(k_y, (n,), 0, v)
  # Both layouts exist up front, so no method pays for a transpose inside its timed function.
  return {"hidden": hidden, "vd": weight, "dv": weight.T.copy(), "labels": labels}


def _compile(
  name, layout, loss, n, d, v, dtype, *, run: bool
) -> tuple[dict, Callable | None, tuple]:
  """Compiles one method's value-and-grad (and with ``run`` calls it once, the warm-up); returns
  its row (temp memory, loss, or the error), the compiled function and its arguments."""
  row = {"method": name, "N": n, "D": d, "V": v, "dtype": jnp.dtype(dtype).name}
  if isinstance(loss, str):
    return {**row, "error": loss}, None, ()
  data = _inputs(n, d, v, dtype)
  args = (data["hidden"], data[layout], data["labels"])
  try:
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    row["temp_MiB"] = compiled.memory_analysis().temp_size_in_bytes / MiB
    if run:
      row["loss"] = float(compiled(*args)[0])
  except Exception as e:
    return {**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}, None, ()
  return row, compiled, args


def measure_shape(methods, n, d, v, dtype, *, reps: int, timed: bool, table: str) -> list[dict]:
  """Rows for every method at one shape.

  Timed calls go round-robin over the methods (one call of each per round, ``reps`` rounds), so
  a change in the machine's load during the run hits every method alike.
  """
  compiled = [
    _compile(name, layout, loss, n, d, v, dtype, run=timed)
    for name, (layout, loss) in methods.items()
  ]
  rows = [row for row, _, _ in compiled]
  if timed:
    walls = [[] for _ in compiled]
    cpus = [[] for _ in compiled]
    for _ in range(reps):
      for k, (_, fn, args) in enumerate(compiled):
        if fn is None:
          continue
        w0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        walls[k].append(time.perf_counter() - w0)
        cpus[k].append(time.process_time() - c0)
    naive_loss = rows[0].get("loss")
    for row, wall, cpu in zip(rows, walls, cpus):
      if wall:
        row["wall_s"], row["cpu_s"] = statistics.median(wall), statistics.median(cpu)
        row["wall_each_s"] = [round(w, 4) for w in wall]
      if row is not rows[0] and "loss" in row and naive_loss is not None:
        row["abs_diff_vs_naive"] = abs(row["loss"] - naive_loss)
  for row in rows:
    row["table"] = table
    print(json.dumps(row), flush=True)
  return rows


def run(args) -> dict:
  methods = _methods(args.blocks)  # "naive" first: the reference of every ratio
  rows = []
  for dtype in (jnp.float32, jnp.bfloat16):
    rows += measure_shape(
      methods, args.n, args.d, args.v, dtype, reps=args.reps, timed=True, table="headline"
    )
  for v in args.vocab_series:
    rows += measure_shape(
      methods, args.n, args.d, v, jnp.float32, reps=args.reps, timed=False, table="vocab_series"
    )
  for n in args.token_series:
    rows += measure_shape(
      methods, n, args.d, args.v, jnp.float32, reps=args.reps, timed=False, table="token_series"
    )
  return {"rows": rows}


def _ratio(a, b):
  return None if a is None or b is None else a / b


def targets(rows: list[dict], n: int, d: int, v: int) -> list[dict]:
  """The issue's CPU targets, checked on the fp32 headline rows of this run."""
  get = {
    r["method"]: r
    for r in rows
    if r["table"] == "headline" and r["dtype"] == "float32" and "error" not in r
  }
  xj, naive, cce, low = (get.get(k) for k in ("xent_jax", "naive", "jax-cce", "xent_jax low-mem"))
  out = []

  def add(what, value, limit, better="<="):
    met = None if value is None else (value <= limit if better == "<=" else value >= limit)
    out.append({"target": what, "value": value, "limit": limit, "met": met})

  if xj and naive:
    add("time / naive time", _ratio(xj["wall_s"], naive["wall_s"]), 0.9)
    add("time / naive time (process CPU)", _ratio(xj["cpu_s"], naive["cpu_s"]), 0.9)
    add("temp memory / naive temp memory", _ratio(xj["temp_MiB"], naive["temp_MiB"]), 0.1)
  if xj and cce:
    add("jax-cce time / time", _ratio(cce["wall_s"], xj["wall_s"]), 1.2, ">=")
    add("jax-cce time / time (process CPU)", _ratio(cce["cpu_s"], xj["cpu_s"]), 1.2, ">=")
    add("temp memory / jax-cce temp memory", _ratio(xj["temp_MiB"], cce["temp_MiB"]), 2.0)
  if low and cce:
    add("low-mem temp memory / jax-cce temp memory", _ratio(low["temp_MiB"], cce["temp_MiB"]), 1.0)
  series = sorted(
    (r["V"], r["temp_MiB"])
    for r in rows
    if r["table"] == "vocab_series" and r["method"] == "xent_jax" and "temp_MiB" in r
  )
  if len(series) >= 2:
    (v0, m0), (v1, m1) = series[0], series[-1]
    add(f"temp memory growth V={v0}->{v1} / V growth", (m1 / m0) / (v1 / v0), 1.0)
  tokens = sorted(
    (r["N"], r["temp_MiB"])
    for r in rows
    if r["table"] == "token_series" and r["method"] == "xent_jax" and "temp_MiB" in r
  )
  if len(tokens) >= 2:
    (n0, m0), (n1, m1) = tokens[0], tokens[-1]
    # What may grow with N: the [N, D] hidden-gradient accumulator (the size of an output).
    add(
      f"temp memory growth N={n0}->{n1} beyond the [N, D] gradient (MiB)",
      (m1 - m0) - (n1 - n0) * d * 4 / MiB,
      1.0,
    )
  return out


def _fmt(x, spec="{:.2f}"):
  return "" if x is None else spec.format(x)


def markdown(result: dict) -> str:
  meta, rows = result["meta"], result["rows"]
  lines = [
    f"# Fused linear cross-entropy benchmark ({meta['backend']}, {meta['date']})",
    "",
    f"jax {meta['versions']['jax']}, optax {meta['versions']['optax']}, jax-cce "
    f"{meta['versions']['jax-cce']}, tokamax {meta['versions']['tokamax']}; "
    f"{meta['host']}; load average before/after: {meta['load_before']} / "
    f"{meta['load_after']}. Forward + backward (grads of hidden and weight), median of "
    f"{meta['reps']} calls; temp = compiled temporary memory.",
    "",
    "## Headline",
    "",
    "| dtype | method | wall s | CPU s | temp MiB | wall / naive | temp / naive "
    "| \\|loss - naive\\| |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for dtype in ("float32", "bfloat16"):
    head = [r for r in rows if r["table"] == "headline" and r["dtype"] == dtype]
    naive = next((r for r in head if r["method"] == "naive" and "error" not in r), None)
    for r in head:
      if "error" in r:
        lines.append(f"| {dtype} | {r['method']} | failed: {r['error']} | | | | | |")
        continue
      lines.append(
        f"| {dtype} | {r['method']} | {_fmt(r['wall_s'])} | {_fmt(r['cpu_s'])} | "
        f"{_fmt(r['temp_MiB'], '{:.1f}')} | "
        f"{_fmt(_ratio(r['wall_s'], naive and naive['wall_s']))} | "
        f"{_fmt(_ratio(r['temp_MiB'], naive and naive['temp_MiB']), '{:.3f}')} | "
        f"{_fmt(r.get('abs_diff_vs_naive'), '{:.1e}')} |"
      )
  for table, key in (("vocab_series", "V"), ("token_series", "N")):
    sub = [r for r in rows if r["table"] == table]
    if not sub:
      continue
    names = list(dict.fromkeys(r["method"] for r in sub))
    values = sorted({r[key] for r in sub})
    fixed = f"N={sub[0]['N']:d}" if key == "V" else f"V={sub[0]['V']:d}"
    lines += [
      "",
      f"## Temporary memory (MiB) vs {key} (fp32, D={sub[0]['D']}, {fixed})",
      "",
      f"| {key} | " + " | ".join(names) + " |",
      "|---" * (len(names) + 1) + "|",
    ]
    for x in values:
      cells = []
      for name in names:
        r = next(r for r in sub if r["method"] == name and r[key] == x)
        cells.append("failed" if "error" in r else _fmt(r["temp_MiB"], "{:.1f}"))
      lines.append(f"| {x} | " + " | ".join(cells) + " |")
  lines += [
    "",
    "## Targets (fp32 headline, this run)",
    "",
    "| target | value | limit | met |",
    "|---|---|---|---|",
  ]
  for t in result["targets"]:
    lines.append(f"| {t['target']} | {_fmt(t['value'], '{:.3f}')} | {t['limit']} | {t['met']} |")
  return "\n".join(lines) + "\n"


def _block(text: str) -> tuple[int | None, int | None]:
  """``"T:C"`` -> ``(T, C)``, ``-`` for a default (``None``)."""
  parts = text.split(":")
  if len(parts) != 2 or not all(p == "-" or (p.isdigit() and int(p) > 0) for p in parts):
    raise argparse.ArgumentTypeError(f"expected T:C, each a positive integer or '-'; got {text!r}")
  return tuple(None if p == "-" else int(p) for p in parts)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--out",
    default="experiments/results/bench_linear",
    help="output path prefix: writes <out>.json and <out>.md",
  )
  parser.add_argument("--n", type=int, default=4096)
  parser.add_argument("--d", type=int, default=512)
  parser.add_argument("--v", type=int, default=32768)
  parser.add_argument("--reps", type=int, default=7)
  parser.add_argument(
    "--vocab-series", type=int, nargs="*", default=[8192, 16384, 32768, 65536, 131072]
  )
  parser.add_argument("--token-series", type=int, nargs="*", default=[1024, 4096, 16384])
  parser.add_argument(
    "--blocks",
    type=_block,
    nargs="*",
    default=[],
    metavar="T:C",
    help="also time xent_jax at each token_chunk_size:vocab_chunk_size ('-': the default), "
    "e.g. 1024:- 4096:16384 (block-size sweep)",
  )
  parser.add_argument("--quick", action="store_true", help="tiny shapes, for a smoke test")
  args = parser.parse_args(argv)
  if args.quick:
    args.n, args.d, args.v, args.reps = 256, 64, 2048, 2
    args.vocab_series, args.token_series = [1024, 2048], [128, 512]
  load_before = os.getloadavg()
  result = run(args)
  result["meta"] = {
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "backend": f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
    "platform": platform.platform(),
    "host": host.describe(),
    "cpu_count": os.cpu_count(),
    "load_before": [round(x, 2) for x in load_before],
    "load_after": [round(x, 2) for x in os.getloadavg()],
    "reps": args.reps,
    "shape": {"N": args.n, "D": args.d, "V": args.v},
    "versions": {p: _version(p) for p in ("jax", "jaxlib", "optax", "jax-cce", "tokamax")},
  }
  result["targets"] = targets(result["rows"], args.n, args.d, args.v)
  text = markdown(result)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(result, f, indent=1)
  with open(args.out + ".md", "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
