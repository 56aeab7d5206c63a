"""Test session set-up: 8 fake CPU devices for the multi-device tests, strict rank promotion, the
`tpu` tests skipped where libtpu is absent."""

import importlib.util
import os

# Must happen before JAX initializes its backends; only adds host devices, so single-device code
# is unaffected.
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

_HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None

import jax  # noqa: E402
import pytest  # noqa: E402

from xent_jax.tools import libtpu  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

if _HAS_LIBTPU:
  # In the `tpu-test` venv libtpu loads with JAX's backends in every test process and subprocess:
  # on a host without a TPU, keep it from printing warnings and let every xdist worker load it.
  libtpu.quiet_libtpu()


def pytest_collection_modifyitems(config, items):
  """Skips the tests marked `tpu` where libtpu is not installed (the main test venv)."""
  del config
  if _HAS_LIBTPU:
    return
  skip = pytest.mark.skip(
    reason="needs libtpu: runs in the TPU step of .ci/run (a venv with the `tpu-test` extra, "
    "`python -m pytest -m tpu`)"
  )
  for item in items:
    if item.get_closest_marker("tpu"):
      item.add_marker(skip)
