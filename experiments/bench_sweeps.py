"""Vectorized sweeps against ``--sequential``: the same comparison run both ways, back to back.

For each config, ``xent-jax compare`` runs twice in fresh processes on the same machine: once
vectorized (``--group-mode``, default ``auto``: ``map`` on CPU, ``vmap`` on GPU/TPU) and once with
``--sequential`` (one run after another, each its own program). The table gives the wall time of
each (the whole command: start-up, data, compilation, training, evaluation, checkpoints, report),
their ratio, and whether every member equals its sequential run: final test accuracy within one
test example and NLL within 1e-5 relative (issue 18's equality target).

Targets (issue 18): >= 3x on 2 CPU cores for ``configs/digits_label_noise.yaml``; >= 1.8x for the
MNIST-1D paper protocol; >= 30x for the MNIST-1D comparison on a GPU.

  python experiments/bench_sweeps.py                      # digits label noise, auto mode
  python experiments/bench_sweeps.py --config configs/mnist1d_label_noise.yaml --group-mode map

Results: ``experiments/results/sweeps/bench_sweeps.{md,json}`` (or ``--out``; appended per
config, with the host line of experiments/host.py). ``--keep DIR`` also keeps the vectorized
comparison's results in DIR/<config name>/: every run's ``config.yaml``, ``metrics.jsonl`` and
``summary.json`` and the report's tables and plots (not the checkpoints), so the timed run is the
one committed.
"""

import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import host  # experiments/host.py: where this ran

ROOT = pathlib.Path(__file__).parents[1]
RESULTS = ROOT / "experiments" / "results" / "sweeps"


def _compare(config: str, workdir: pathlib.Path, flags: list[str], overrides: list[str]) -> float:
  """Wall seconds of one ``xent-jax compare`` in a fresh process."""
  command = [sys.executable, "-m", "xent_jax.cli", "compare", config, *overrides]
  command += ["--workdir", str(workdir), "--no-progress", *flags]
  tic = time.perf_counter()
  subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
  return time.perf_counter() - tic


def _equality(vectorized: pathlib.Path, sequential: pathlib.Path) -> dict:
  """Worst per-member difference of the final accuracy (in test examples) and NLL (relative)."""
  worst_examples, worst_nll, members = 0.0, 0.0, 0
  for path in sorted(sequential.glob("*/seed_*/summary.json")):
    want = json.loads(path.read_text())
    got = json.loads((vectorized / path.relative_to(sequential)).read_text())
    count = sum(want["calibration_counts"]["count"])  # test examples
    worst_examples = max(
      worst_examples, abs(got["final"]["eval/accuracy"] - want["final"]["eval/accuracy"]) * count
    )
    worst_nll = max(
      worst_nll,
      abs(got["final"]["eval/nll"] - want["final"]["eval/nll"]) / abs(want["final"]["eval/nll"]),
    )
    members += 1
  return {
    "members": members,
    "max_accuracy_diff_examples": round(worst_examples, 3),
    "max_nll_rel_diff": worst_nll,
    "equal": members > 0 and worst_examples <= 1 + 1e-9 and worst_nll <= 1e-5,
  }


def _keep(workdir: pathlib.Path, destination: pathlib.Path) -> None:
  """Copies a finished comparison's results, without checkpoints or run locks, to destination."""
  shutil.copytree(workdir, destination, ignore=shutil.ignore_patterns("checkpoints", "run.lock"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", action="append", help="configs to run (default: digits noise)")
  parser.add_argument("--group-mode", default="auto", choices=("auto", "vmap", "map"))
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="results directory")
  parser.add_argument(
    "--keep", type=pathlib.Path, help="also keep the vectorized results in KEEP/<config stem>/"
  )
  parser.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
  args = parser.parse_args()
  configs = args.config or ["configs/digits_label_noise.yaml"]
  for config in configs if args.keep else ():
    if (args.keep / pathlib.Path(config).stem).exists():
      parser.error(f"--keep: {args.keep / pathlib.Path(config).stem} exists; move it away first")
  args.out.mkdir(parents=True, exist_ok=True)
  machine = host.describe()
  lines = []
  for config in configs:
    with tempfile.TemporaryDirectory(prefix="bench_sweeps_") as scratch:
      vec_dir, seq_dir = pathlib.Path(scratch, "vectorized"), pathlib.Path(scratch, "sequential")
      vectorized = _compare(config, vec_dir, ["--group-mode", args.group_mode], args.overrides)
      if args.keep:
        _keep(vec_dir, args.keep / pathlib.Path(config).stem)
      sequential = _compare(config, seq_dir, ["--sequential"], args.overrides)
      equality = _equality(vec_dir, seq_dir)
    result = {
      "config": config,
      "overrides": args.overrides,
      "group_mode": args.group_mode,
      "vectorized_s": round(vectorized, 1),
      "sequential_s": round(sequential, 1),
      "speedup": round(sequential / vectorized, 2),
      **equality,
      "host": machine,
    }
    with (args.out / "bench_sweeps.json").open("a") as f:
      f.write(json.dumps(result) + "\n")
    lines.append(
      f"| {config} {' '.join(args.overrides)} | {args.group_mode} | {equality['members']} | "
      f"{vectorized:.1f} | {sequential:.1f} | {sequential / vectorized:.2f}x | "
      f"{equality['max_accuracy_diff_examples']} | {equality['max_nll_rel_diff']:.1e} | "
      f"{'yes' if equality['equal'] else 'NO'} |"
    )
    print(lines[-1], flush=True)
  table = [
    f"Machine: {machine}. Command: `python experiments/bench_sweeps.py "
    f"{' '.join(f'--config {c}' for c in configs)} --group-mode {args.group_mode} "
    f"{' '.join(repr(o) for o in args.overrides)}`",
    "",
    "| config | mode | runs | vectorized s | sequential s | speed-up | max acc diff (examples) "
    "| max NLL rel diff | equal |",
    "|---|---|---|---|---|---|---|---|---|",
    *lines,
    "",
  ]
  with (args.out / "bench_sweeps.md").open("a") as f:
    f.write("\n".join(table) + "\n")
  print("\n".join(table))


if __name__ == "__main__":
  main()
