"""Table: TPU temp memory of every public loss, compiled ahead of time on a host without a TPU.

For each problem of `xent_jax.tools.aot` (loss x TPU topology x size) the script compiles value and
gradients for the TPU through libtpu's topology descriptions and reports
``memory_analysis().temp_size_in_bytes`` (scratch memory per chip besides arguments and outputs),
its ratio to a reference, and whether it meets issue 9's bound (``tests/tools/test_tpu_compile.py``
holds these, looser at the 32k-token head and for non-cross-entropy fused forms):

* logits path, ``[8192, 32768]`` bf16, one chip: reference one ``[N, V]`` float32 array, bound
  1/64 (O(N)); optax's own ``softmax_cross_entropy_with_integer_labels`` is listed for comparison;
* heads ``loss(h W^T)`` in bf16, one chip: fused (`xent_jax.linear_cross_entropy`) against naive
  (matmul + optax), bound 1/10; and ``get_loss(name).linear`` of every registered loss at the
  Llama-3-8B head;
* vocabulary-parallel losses on 2x2 and 1x4 ``data x vocab`` meshes: the same references per chip;
  and ``get_loss(name).vocab_parallel`` of every registered loss that has one, on the 2x2 mesh;
* the harness's Transformer train step over four chips: fused head against logits, bound 1.

Run (needs the ``tpu`` and ``experiments`` extras; about 10-30 minutes on 2 cores)::

    JAX_PLATFORMS=cpu python experiments/aot_memory.py --jobs 2 --out experiments/results/aot_memory

which writes ``<out>.json`` and ``<out>.md`` and prints the markdown. ``--section`` and
``--topology`` pick a subset.
"""

import argparse
import concurrent.futures
import datetime
import importlib.metadata
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import optax

import xent_jax
from xent_jax.tools import aot, libtpu

SECTIONS = (
  "logits",
  "heads",
  "fused_forms",
  "vocab_parallel",
  "vocab_parallel_forms",
  "train_step",
)


def _measure(fn, *args):
  """``(MiB, compile seconds, error)`` of ``fn(*args)`` (temp bytes); a failure is kept as text."""
  tic = time.perf_counter()
  try:
    return fn(*args) / aot.MIB, time.perf_counter() - tic, None
  except Exception as err:  # pylint: disable=broad-except
    message = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return None, time.perf_counter() - tic, message


def _row(section, problem, size, topology, measured, reference, reference_mib, bound):
  temp_mib, seconds, error = measured
  ratio = None if temp_mib is None or not reference_mib else temp_mib / reference_mib
  return {
    "section": section,
    "problem": problem,
    "size": size,
    "topology": topology,
    "temp_MiB": temp_mib,
    "reference": reference,
    "reference_MiB": reference_mib,
    "ratio": ratio,
    "bound": bound,
    "met": None if ratio is None else ratio <= bound,
    "compile_s": round(seconds, 1),
    "error": error,
  }


def _logits_rows(topology):
  n, v = aot.LOGITS_SHAPE
  size, reference_mib = f"N={n} V={v} bf16", aot.logits_nxv_f32_bytes() / aot.MIB
  for loss in aot.logits_losses():
    yield _row(
      "logits",
      loss,
      size,
      topology,
      _measure(aot.logits_temp_bytes, loss, topology),
      "[N,V] f32",
      reference_mib,
      aot.LOGITS_TEMP_FRACTION,
    )


def _optax_loss(logits, labels):
  """optax's own integer-label cross-entropy: what XLA alone makes of the same problem."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _optax_row(topology):
  chip = aot.topology(topology).devices[0]
  args = (
    aot.spec(aot.LOGITS_SHAPE, jnp.bfloat16, chip),
    aot.spec(aot.LOGITS_SHAPE[:1], jnp.int32, chip),
  )
  n, v = aot.LOGITS_SHAPE
  return _row(
    "logits",
    "optax.softmax_cross_entropy_with_integer_labels (not xent_jax)",
    f"N={n} V={v} bf16",
    topology,
    _measure(aot.temp_bytes, jax.value_and_grad(_optax_loss), *args),
    "[N,V] f32",
    aot.logits_nxv_f32_bytes() / aot.MIB,
    aot.LOGITS_TEMP_FRACTION,
  )


def _head_rows(topology):
  for head, (n, d, v) in aot.HEADS.items():
    size = f"{head}: N={n} D={d} V={v} bf16"
    naive = _measure(aot.head_temp_bytes, "naive", head, topology)
    yield _row("heads", "naive (matmul + optax)", size, topology, naive, "naive", naive[0], 1.0)
    yield _row(
      "heads",
      "linear_cross_entropy",
      size,
      topology,
      _measure(aot.head_temp_bytes, "fused", head, topology),
      "naive",
      naive[0],
      aot.FUSED_TEMP_FRACTION,
    )


def _fused_form_rows(topology):
  n, d, v = aot.HEADS[aot.FUSED_FORMS_HEAD]
  size = f"{aot.FUSED_FORMS_HEAD}: N={n} D={d} V={v} bf16"
  naive = _measure(aot.head_temp_bytes, "naive", aot.FUSED_FORMS_HEAD, topology)[0]
  for loss in xent_jax.list_losses():
    yield _row(
      "fused_forms",
      f"get_loss({loss!r}).linear",
      size,
      topology,
      _measure(aot.fused_form_temp_bytes, loss, topology),
      "naive",
      naive,
      aot.FUSED_TEMP_FRACTION,
    )


def _parallel_rows(topology):
  n, v = aot.LOGITS_SHAPE
  hn, hd, hv = aot.HEADS[aot.PARALLEL_HEAD]
  for mesh_name, (rows, cols) in aot.MESHES.items():
    chips = rows * cols
    for kind in aot.PARALLEL_KINDS:
      measured = _measure(aot.parallel_temp_bytes, kind, mesh_name, topology)
      if kind == "vocab_parallel_linear_cross_entropy":
        naive = _measure(aot.head_temp_bytes, "naive", aot.PARALLEL_HEAD, topology)[0]
        yield _row(
          "vocab_parallel",
          kind,
          f"{aot.PARALLEL_HEAD}: N={hn} D={hd} V={hv} bf16, mesh {mesh_name}",
          topology,
          measured,
          "naive / chips",
          None if naive is None else naive / chips,
          aot.FUSED_TEMP_FRACTION,
        )
      else:
        yield _row(
          "vocab_parallel",
          kind,
          f"N={n} V={v} bf16, mesh {mesh_name}",
          topology,
          measured,
          "[N,V] f32 / chips",
          aot.logits_nxv_f32_bytes() / aot.MIB / chips,
          aot.LOGITS_TEMP_FRACTION,
        )


def _parallel_form_rows(topology):
  n, v = aot.LOGITS_SHAPE
  rows, cols = aot.MESHES[aot.FORMS_MESH]
  for loss in xent_jax.list_losses():
    yield _row(
      "vocab_parallel_forms",
      f"get_loss({loss!r}).vocab_parallel",
      f"N={n} V={v} bf16, mesh {aot.FORMS_MESH}",
      topology,
      _measure(aot.parallel_form_temp_bytes, loss, topology),
      "[N,V] f32 / chips",
      aot.logits_nxv_f32_bytes() / aot.MIB / (rows * cols),
      aot.LOGITS_TEMP_FRACTION,
    )


def _train_step_rows(topology):
  s = aot.TRAIN_STEP
  size = f"B={s['batch']} L={s['seq_len']} V={s['vocab']} D={s['dim']} bf16, 4 chips"
  logits = _measure(aot.train_step_temp_bytes, False, topology)
  yield _row(
    "train_step", "logits + cross_entropy", size, topology, logits, "logits step", logits[0], 1.0
  )
  yield _row(
    "train_step",
    "fused (linear_cross_entropy)",
    size,
    topology,
    _measure(aot.train_step_temp_bytes, True, topology),
    "logits step",
    logits[0],
    1.0,
  )


def _topology_rows(topology, sections) -> list[dict]:
  """Every row of ``sections`` on one topology (one process: the naive baselines are shared)."""
  libtpu.quiet_libtpu()
  rows_of = {
    "logits": lambda t: [*_logits_rows(t), _optax_row(t)],
    "heads": _head_rows,
    "fused_forms": _fused_form_rows,
    "vocab_parallel": _parallel_rows,
    "vocab_parallel_forms": _parallel_form_rows,
    "train_step": _train_step_rows,
  }
  rows = []
  for section in sections:
    for row in rows_of[section](topology):
      print(
        f"{row['section']} {row['problem']} {row['topology']} {row['size']}: "
        f"{row['temp_MiB'] if row['error'] is None else row['error']} ({row['compile_s']} s)",
        file=sys.stderr,
        flush=True,
      )
      rows.append(row)
  return rows


def run(sections, topologies, jobs: int) -> list[dict]:
  """The rows of every section and topology; ``jobs`` topologies are compiled in parallel."""
  if jobs <= 1:
    per_topology = [_topology_rows(t, sections) for t in topologies]
  else:
    context = multiprocessing.get_context("spawn")  # no JAX state forked into the workers
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
      per_topology = list(pool.map(_topology_rows, topologies, [sections] * len(topologies)))
  return [
    row
    for section in sections
    for rows in per_topology
    for row in rows
    if row["section"] == section
  ]


def _fmt(x, spec="{:.1f}"):
  return "" if x is None else spec.format(x)


def markdown(result: dict) -> str:
  meta = result["meta"]
  lines = [
    f"# TPU temp memory, compiled ahead of time ({meta['date']})",
    "",
    f"Command: `{meta['command']}`  ",
    f"Machine: {meta['platform']}, {meta['cpu_count']} CPUs, no TPU (topologies from libtpu "
    f"{meta['versions']['libtpu']}); jax {meta['versions']['jax']}; xent_jax at commit "
    f"{meta['commit']}; load average before/after {meta['load_before']} / {meta['load_after']}.",
    "",
    "temp = `memory_analysis().temp_size_in_bytes` per chip (scratch besides arguments and "
    "outputs) of value and gradients; ratio = temp / reference; met = ratio <= bound "
    "(issue 9's target; `tests/tools/test_tpu_compile.py` holds the 32k-token head and "
    "vocab_parallel_linear_cross_entropy to 1/3 until they get a leaner schedule).",
  ]
  titles = {
    "logits": "Logits path (one chip)",
    "heads": "Heads loss(h W^T), one chip",
    "fused_forms": "Fused form of every registered loss, one chip",
    "vocab_parallel": "Vocabulary-parallel (per chip)",
    "vocab_parallel_forms": "Vocabulary-parallel form of every registered loss (per chip)",
    "train_step": "Transformer train step (data-parallel)",
  }
  for section in SECTIONS:
    rows = [r for r in result["rows"] if r["section"] == section]
    if not rows:
      continue
    lines += [
      "",
      f"## {titles[section]}",
      "",
      "| problem | size | topology | temp MiB | reference | ref MiB | ratio | bound | met "
      "| compile s |",
      "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
      if r["error"]:
        lines.append(
          f"| {r['problem']} | {r['size']} | {r['topology']} | failed: {r['error']} "
          f"| | | | | | {r['compile_s']} |"
        )
        continue
      lines.append(
        f"| {r['problem']} | {r['size']} | {r['topology']} | {_fmt(r['temp_MiB'])} | "
        f"{r['reference']} | {_fmt(r['reference_MiB'])} | {_fmt(r['ratio'], '{:.4f}')} | "
        f"{_fmt(r['bound'], '{:.4g}')} | {'yes' if r['met'] else 'no'} | {r['compile_s']} |"
      )
  return "\n".join(lines) + "\n"


def _command(argv) -> str:
  platforms = os.environ.get("JAX_PLATFORMS")
  words = ["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
  return " ".join(([f"JAX_PLATFORMS={platforms}"] if platforms else []) + words)


def _commit() -> str:
  """The checkout's commit, marked when the library has uncommitted changes."""

  def git(*words):
    return subprocess.run(
      ["git", *words],
      capture_output=True,
      text=True,
      check=True,
      cwd=os.path.dirname(os.path.abspath(__file__)),
    ).stdout.strip()

  try:
    dirty = git("status", "--porcelain", "--", "../xent_jax")
    commit = git("rev-parse", "--short", "HEAD")
    return commit + (" with uncommitted changes in xent_jax/" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--out",
    default="experiments/results/aot_memory",
    help="output path prefix: writes <out>.json and <out>.md",
  )
  parser.add_argument(
    "--section",
    choices=SECTIONS,
    action="append",
    help="a section to run (repeatable; default: all)",
  )
  parser.add_argument(
    "--topology",
    choices=aot.TOPOLOGIES,
    action="append",
    help="a TPU topology (repeatable; default: all)",
  )
  parser.add_argument(
    "--jobs", type=int, default=1, help="topologies compiled at once, in separate processes"
  )
  args = parser.parse_args(argv)
  load_before = os.getloadavg()
  commit = _commit()  # the code the compiles read: git's state when they start
  rows = run(args.section or SECTIONS, args.topology or aot.TOPOLOGIES, args.jobs)
  result = {
    "meta": {
      "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
      "command": _command(argv),
      "platform": platform.platform(),
      "cpu_count": os.cpu_count(),
      "commit": commit,
      "load_before": [round(x, 2) for x in load_before],
      "load_after": [round(x, 2) for x in os.getloadavg()],
      "versions": {p: importlib.metadata.version(p) for p in ("jax", "jaxlib", "libtpu")},
      "logits_shape": list(aot.LOGITS_SHAPE),
      "heads": {k: list(v) for k, v in aot.HEADS.items()},
      "train_step": aot.TRAIN_STEP,
    },
    "rows": rows,
  }
  text = markdown(result)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(result, f, indent=1)
  with open(args.out + ".md", "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
