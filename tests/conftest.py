"""Test session set-up: 8 fake CPU devices for the multi-device tests, strict rank promotion,
a quiet libtpu."""

import os

# Must happen before JAX initializes its backends; only adds host devices, so single-device code
# is unaffected.
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import jax  # noqa: E402

from xent_jax.tools import libtpu  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# libtpu (the `tpu` extra, for tests/tools/test_tpu_compile.py) loads with JAX's backends in every
# test process and subprocess: on a host without a TPU, keep it from printing warnings and let every
# xdist worker load it.
libtpu.quiet_libtpu()
