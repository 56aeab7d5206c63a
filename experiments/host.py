"""Where a benchmark ran: CPU model, cores, backend and device, jax version and commit, for the
header of every results file (timings are only comparable on the same host)."""

import os
import pathlib
import platform
import subprocess

import jax


def cpu_model() -> str:
  """The CPU's model name as the kernel reports it (``lscpu``'s 'Model name', with its family and
  model numbers), else the architecture."""
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor() or platform.machine()
  fields = {}
  for line in lines:
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())
  name = fields.get("model name", platform.machine())
  return f"{name} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def commit() -> str:
  """The repository's commit (with ``+dirty`` for uncommitted changes), or 'unknown'."""
  root = pathlib.Path(__file__).parents[1]
  try:
    head = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--untracked-files=no"],
      cwd=root,
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return head + ("+dirty" if dirty else "")


def describe() -> str:
  """One line: CPU model, cores, JAX backend and device kind, jax version, commit."""
  device = jax.devices()[0]
  return (
    f"{cpu_model()}, {os.cpu_count()} cores, {platform.machine()}; jax {jax.__version__} "
    f"({jax.default_backend()}: {device.device_kind}); commit {commit()}"
  )


if __name__ == "__main__":
  print(describe())
