"""The documentation builds with warnings as errors, its examples run, and its reference names
every public name.

The site (docs/) is built twice, as ``sphinx-build`` builds it: the HTML builder (whose
objects.inv lists every documented object) and the doctest builder, which runs the guides'
``testcode`` blocks against their ``testoutput`` and every ``>>>`` example of the docstrings the
reference renders. Both builds run one after the other in one Python process (Sphinx's
``build_main``, what ``python -m sphinx`` calls), so the second reuses the first's imports of
Sphinx, JAX and the library (about 3 s of a pair on the AMD EPYC CI host); that process takes
the test processes' settings (``tests/_process_settings.py``).
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


# Runs ``sphinx-build -W --keep-going -q -b BUILDER -d DOCTREES SOURCE OUT`` for each builder
# named in argv, in order, and exits with the first non-zero status. With the test processes'
# settings (tests/_process_settings.py): the doctest build runs ~100 examples, eagerly, and the
# pair took 29.7-31.8 s without them, 21.1-23.8 s with them (AMD EPYC, interleaved).
_BUILD_ALL = """
import sys
from sphinx.cmd.build import build_main
from tests import _process_settings
_process_settings.apply()
doctrees, source, *builds = sys.argv[1:]
for builder, out in zip(builds[::2], builds[1::2]):
  status = build_main(["-W", "--keep-going", "-q", "-b", builder, "-d", doctrees, source, out])
  if status:
    sys.exit(f"sphinx-build -b {builder} exited with {status}")
"""


def _build(doctrees: pathlib.Path, **outputs: pathlib.Path) -> None:
  """Builds the site with each builder (keyword) into its directory (value), with warnings as
  errors; fails with Sphinx's output on any warning."""
  command = [sys.executable, "-c", _BUILD_ALL, str(doctrees), str(DOCS)]
  for builder, out in outputs.items():
    command += [builder, str(out)]
  done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, f"the docs build failed:\n{done.stdout}\n{done.stderr}"


def test_the_guides_have_examples_with_outputs():
  """The guides' examples that the doctest builder checks: code blocks, most with their output."""
  kinds = [m.group(1) for p in DOCS.glob("guides/*.md") for m in _DIRECTIVE.finditer(p.read_text())]
  assert kinds.count("testcode") >= 6
  assert kinds.count("testoutput") >= 5


@pytest.mark.slow
def test_docs_build_run_their_examples_and_document_every_public_name(tmp_path):
  from sphinx.util.inventory import InventoryFile  # pylint: disable=import-outside-toplevel

  # The doctrees are shared: the doctest build reuses the parsed sources.
  _build(tmp_path / "doctrees", html=tmp_path / "html", doctest=tmp_path / "doctest")

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
