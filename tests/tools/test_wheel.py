"""The release artefacts: one version, and a wheel that installs and runs outside the checkout.

The wheel test builds the sdist and, from it, the wheel (``python -m build --no-isolation``: the
test extra provides ``build`` and ``setuptools>=77``, so nothing is downloaded), checks that the
wheel holds the package and its metadata only, installs it with ``--no-deps`` into a fresh virtual
environment that sees this environment's packages (jax, flax, ...) through a ``.pth`` line placed
after its own site-packages, and runs it from a directory outside the repository with no
``PYTHONPATH``: ``cross_entropy`` against a float64 NumPy value, and ``xent-jax --help``.
"""

import importlib.metadata
import os
import pathlib
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile

import pytest

import xent_jax

REPO = pathlib.Path(__file__).resolve().parents[2]

# Run inside the fresh environment: the installed package, its version and one loss value.
SMOKE = """
import importlib.metadata, pathlib, sys
import numpy as np
import xent_jax

logits = np.array([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]])
labels = np.array([2, 0])
top = logits.max(axis=1)
lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
want = float(np.mean(lse - logits[np.arange(2), labels]))
got = float(xent_jax.cross_entropy(logits.astype(np.float32), labels))
assert abs(got - want) <= 1e-6 * want, (got, want)
assert pathlib.Path(xent_jax.__file__).is_relative_to(sys.prefix), xent_jax.__file__
assert importlib.metadata.version("xent_jax") == xent_jax.__version__
print(xent_jax.__version__)
"""


def test_version_is_the_installed_distributions():
  assert xent_jax.__version__ == importlib.metadata.version("xent_jax")


def _run(args, cwd, env):
  result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
  return result.stdout


@pytest.mark.processes
@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  dist = tmp_path / "dist"
  _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, REPO], REPO, env)
  (wheel,) = dist.glob("*.whl")
  (sdist,) = dist.glob("*.tar.gz")
  assert wheel.name == f"xent_jax-{xent_jax.__version__}-py3-none-any.whl"

  names = zipfile.ZipFile(wheel).namelist()
  info = f"xent_jax-{xent_jax.__version__}.dist-info/"
  assert [n for n in names if not n.startswith(("xent_jax/", info))] == []
  assert {"xent_jax/py.typed", "xent_jax/cli.py", f"{info}licenses/LICENSE"} <= set(names)
  metadata = zipfile.ZipFile(wheel).read(f"{info}METADATA").decode()
  assert "License-Expression: Apache-2.0" in metadata.splitlines()
  with tarfile.open(sdist) as archive:
    root = f"xent_jax-{xent_jax.__version__}/"
    assert {root + "LICENSE", root + "xent_jax/py.typed"} <= set(archive.getnames())

  # A bare environment (no pip: the running pip installs into it), this one's packages after its
  # own, so the wheel's xent_jax is the one imported.
  env_dir = tmp_path / "env"
  venv.create(env_dir, with_pip=False)
  python = env_dir / "bin" / "python"
  purelib = _run(
    [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env
  )
  outer = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
  (pathlib.Path(purelib.strip()) / "outer_env.pth").write_text("\n".join(sorted(outer)) + "\n")
  pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps"]
  _run([*pip, "--no-index", wheel], tmp_path, env)

  assert _run([python, "-c", SMOKE], tmp_path, env).strip() == xent_jax.__version__
  help_text = _run([env_dir / "bin" / "xent-jax", "--help"], tmp_path, env)
  assert "usage: xent-jax" in help_text
