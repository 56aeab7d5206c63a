"""Test session set-up: 8 fake CPU devices for the multi-device tests, XLA:CPU's fast-compiling
settings, strict rank promotion, the process settings of `tests/_process_settings.py`, the `tpu`
tests skipped where libtpu is absent."""

import gc
import importlib.util
import os
import subprocess
import sys
import warnings

# Must happen before JAX initializes its backends; only adds host devices, so single-device code
# is unaffected.
_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# The suite compiles thousands of small programs and runs each a few times, so XLA:CPU's compile
# time is most of its time. These settings leave the HLO (every compiled-program guard reads it)
# and IEEE float semantics as they are, and change only how XLA:CPU turns fusions into machine
# code: no LLVM optimization passes, the classic elemental emitter instead of the newer fusion
# emitters, and one LLVM module per program instead of parts compiled on a thread pool (two
# workers already fill the two cores). A small program then compiles ~10x faster (0.28 -> 0.03 s
# on the AMD EPYC CI host) and the suite takes under half the time; the last setting alone took
# 14-17% off the compile time of 80 small loss programs (10.6 -> 9.1 s, 10.1 -> 8.3 s). Users and
# the benchmarks keep XLA's defaults (the processes the tests start inherit these flags through
# the environment); `XENT_JAX_TEST_XLA_DEFAULTS=1` runs the tests with the defaults too. A JAX
# whose XLA no longer knows a flag would abort at start-up, so a subprocess tries them first.
_FAST_COMPILE = (
  "--xla_backend_optimization_level=0",
  "--xla_cpu_use_fusion_emitters=false",
  "--xla_cpu_parallel_codegen_split_count=1",
)
_DECIDED = "XENT_JAX_TEST_FAST_COMPILE"  # set by the first process (xdist workers inherit it)
if os.environ.get("XENT_JAX_TEST_XLA_DEFAULTS") != "1" and _DECIDED not in os.environ:
  _flags = " ".join((os.environ["XLA_FLAGS"], *_FAST_COMPILE))
  _probe = subprocess.run(
    [sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1.0).block_until_ready()"],
    env={**os.environ, "XLA_FLAGS": _flags, "JAX_PLATFORMS": "cpu"},
    capture_output=True,
    text=True,
  )
  if _probe.returncode == 0:
    os.environ["XLA_FLAGS"] = _flags
  else:
    warnings.warn(
      f"tests/conftest.py: this JAX refuses {' '.join(_FAST_COMPILE)}; the tests run with XLA's "
      f"default (slower) compilation. Its error: {_probe.stderr.strip()[-300:]}",
      stacklevel=1,
    )
  os.environ[_DECIDED] = str(_probe.returncode == 0)

_HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None

import jax  # noqa: E402
import pytest  # noqa: E402

from tests import _process_settings  # noqa: E402
from xent_jax.tools import libtpu  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Fewer cyclic-GC passes, no persistent-cache keys without a cache directory, one MLIR context
# for every program (each measured in tests/_process_settings.py).
_process_settings.apply()

if _HAS_LIBTPU:
  # In the `tpu-test` venv libtpu loads with JAX's backends in every test process and subprocess:
  # on a host without a TPU, keep it from printing warnings and let every xdist worker load it.
  libtpu.quiet_libtpu()


@pytest.fixture(autouse=True)
def _freeze_what_outlives_the_test():
  """After each test, moves every object still alive into the cyclic GC's permanent generation.

  A worker keeps JAX's caches of every program it has traced and compiled (workers peaked at 3.5
  and 4.4 GiB), and each full collection of the cyclic GC scanned all of it: 27-35 s of each
  worker's time in a run of the suite (gc callbacks), 0.34 s a collection in a run of
  ``tests/core/test_engine.py`` and ``tests/losses/test_variants.py``. Frozen objects are not
  scanned again. The price: a reference
  cycle that becomes garbage after its test ends is freed only when the worker exits (peak memory
  of test_engine.py and test_variants.py together: 1887 MiB against 1860 MiB).
  """
  yield
  gc.freeze()


def pytest_collection_modifyitems(config, items):
  """Runs the tests marked `slow` first, and skips those marked `tpu` where libtpu is not
  installed (the main test venv).

  Slow first: pytest-xdist hands tests out in collection order (``--dist worksteal``, set in
  pyproject.toml, then moves queued tests to a worker that runs out), so a 20-80 s end-to-end test
  collected last (tests/train/ and the docs build sort late) would run alone while the other
  worker idles; started first, the many short tests fill in around them. The sort is stable and
  the same in every worker, as xdist requires.
  """
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
  if _HAS_LIBTPU:
    return
  skip = pytest.mark.skip(
    reason="needs libtpu: runs in the TPU step of .ci/run (a venv with the `tpu-test` extra, "
    "`python -m pytest -m tpu`)"
  )
  for item in items:
    if item.get_closest_marker("tpu"):
      item.add_marker(skip)
