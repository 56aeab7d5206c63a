"""The documentation builds with warnings as errors, its examples run, and its reference names
every public name.

The site (docs/) is built twice, as a user would build it: the HTML builder (whose objects.inv
lists every documented object) and the doctest builder, which runs the guides' ``testcode`` blocks
against their ``testoutput`` and every ``>>>`` example of the docstrings the reference renders.
"""

import pathlib
import posixpath
import re
import subprocess
import sys

import pytest

import xent_jax

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
_DIRECTIVE = re.compile(r"^```\{(testcode|testoutput)\}\n", re.MULTILINE)


def _build(builder: str, out: pathlib.Path, doctrees: pathlib.Path) -> None:
  """Runs ``sphinx-build -W --keep-going -b builder``; fails with its output on any warning."""
  command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", builder]
  command += ["-d", str(doctrees), str(DOCS), str(out)]
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, f"sphinx-build -b {builder} failed:\n{done.stdout}\n{done.stderr}"


def test_the_guides_have_examples_with_outputs():
  """The guides' examples that the doctest builder checks: code blocks, most with their output."""
  kinds = [m.group(1) for p in DOCS.glob("guides/*.md") for m in _DIRECTIVE.finditer(p.read_text())]
  assert kinds.count("testcode") >= 6
  assert kinds.count("testoutput") >= 5


@pytest.mark.slow
def test_docs_build_run_their_examples_and_document_every_public_name(tmp_path):
  from sphinx.util.inventory import InventoryFile  # pylint: disable=import-outside-toplevel

  doctrees = tmp_path / "doctrees"  # shared: the doctest build reuses the parsed sources
  _build("html", tmp_path / "html", doctrees)
  _build("doctest", tmp_path / "doctest", doctrees)

  report = (tmp_path / "doctest" / "output.txt").read_text()
  tests = int(re.search(r"^\s+(\d+) tests$", report, re.MULTILINE).group(1))
  assert tests >= 90, f"only {tests} doctest examples ran:\n{report}"

  with open(tmp_path / "html" / "objects.inv", "rb") as stream:
    inventory = InventoryFile.load(stream, "", posixpath.join)
  documented = {name for objects in inventory.values() for name in objects}
  modules = set(inventory.get("py:module", {}))
  public = {f"xent_jax.{name}" for name in xent_jax.__all__}
  public |= {f"xent_jax.metrics.{name}" for name in xent_jax.metrics.__all__}
  public |= {f"xent_jax.optax_compat.{name}" for name in xent_jax.optax_compat.__all__}
  public |= {"xent_jax.registry.ConfiguredLoss", "xent_jax.registry.LossInfo"}
  missing = sorted(public - documented)
  assert not missing, f"public names missing from the API reference: {missing}"
  assert {"xent_jax", "xent_jax.metrics", "xent_jax.optax_compat", "xent_jax.registry"} <= modules
