"""Settings of the processes that run the tests: the pytest workers (`tests/conftest.py`) and the
documentation build that `tests/test_docs.py` starts. They make tracing, lowering and compiling
thousands of small programs cheaper and change no result.

The CLI processes the tests start, the benchmarks and users keep JAX's and Python's behaviour
here (the CLI processes inherit the tests' XLA flags through the environment, see
`tests/conftest.py`). ``XENT_JAX_TEST_XLA_DEFAULTS=1`` also keeps the MLIR contexts as JAX
makes them.
"""

import gc
import os
import warnings

import jax


def fewer_gc_passes() -> None:
  """Collects the cyclic GC's youngest generation every 100000 net allocations instead of 700.

  While a test traces and lowers programs (millions of short-lived objects) the default collects
  thousands of times a minute; at 100000 it runs a few times a test.
  `tests/losses/test_variants.py`, `tests/fused/test_tuning.py` and
  `tests/metrics/test_calibration.py` in one process (AMD EPYC, 2 cores, four interleaved pairs):
  109.8 -> 103.8, 106.4 -> 98.2, 105.1 -> 95.7 s (and `test_cross_entropy.py` with
  `test_bitempered.py` 128.2 -> 114.5, 116.1 -> 107.1 s), 2988 collections -> 5, peak memory
  894 -> 900 MB.
  """
  gc.set_threshold(100_000, 50, 1000)


def no_keyless_compilation_cache() -> None:
  """Turns JAX's persistent compilation cache off where it has no directory.

  With no directory JAX still serializes and hashes every program into a cache key (the cache is
  enabled by default, and on CPU a key is made before it looks for the missing directory): 5-7%
  of the compile time of small programs on the AMD EPYC CI host (a 0.10.2 microbenchmark of 60
  tiny and 30 loss-gradient programs: 24.2 -> 22.4 and 57.2 -> 53.5 ms per program; 21.7 -> 20.2
  and 52.1 -> 50.8 in a second pair). A process given a cache directory (through the environment,
  as the tests give the CLI processes they start) keeps it.
  """
  if jax.config.jax_compilation_cache_dir is None:
    jax.config.update("jax_enable_compilation_cache", False)


def share_one_mlir_context() -> None:
  """Lowers every program of the process into one MLIR context instead of a fresh one each.

  JAX makes a new MLIR context for each program it lowers and loads its dialects into it (about
  6 ms a program here; the suite lowers thousands), and each cached lowering keeps its context
  alive. The programs are the same (same dialects, same IR); MLIR contexts are made to be shared
  by many modules, and the only price of one long-lived context is that the types and attributes
  it has seen stay in it. `tests/core/test_engine.py` with `tests/losses/test_variants.py` in one
  process (AMD EPYC, 2 cores, interleaved): 269 -> 247 s, peak memory 1.66 -> 0.67 GB. A JAX
  without the private function ``jax._src.interpreters.mlir.make_ir_context`` (renamed or
  removed) is left as it is, with a warning.
  """
  from jax._src.interpreters import mlir  # pylint: disable=import-outside-toplevel

  make = getattr(mlir, "make_ir_context", None)
  if make is None:
    warnings.warn(
      "tests/_process_settings.py: this JAX has no jax._src.interpreters.mlir.make_ir_context; "
      "each program is lowered in its own MLIR context (slower)",
      stacklevel=1,
    )
    return
  shared = make()

  def make_ir_context():
    # A program lowered while another is being lowered (the fused head's tuner compiles its
    # candidates at trace time) gets a context of its own: MLIR hands an inner use of the same
    # context the outer one's insertion point, where JAX's copy of the inner module would land.
    return shared if mlir.ir.Context.current is None else make()

  mlir.make_ir_context = make_ir_context


def apply() -> None:
  """All three; the shared MLIR context unless ``XENT_JAX_TEST_XLA_DEFAULTS=1``."""
  fewer_gc_passes()
  no_keyless_compilation_cache()
  if os.environ.get("XENT_JAX_TEST_XLA_DEFAULTS") != "1":
    share_one_mlir_context()
