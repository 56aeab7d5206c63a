r"""Block sizes of the fused kernels per device, from one place: table, optional autotuner, cache.

Every default block size of :mod:`xent_jax.fused` (the fused head's schedule, the blocked
statistics, the rematerialising chunks of other losses) comes from here:

* :data:`BLOCK_ELEMENTS` and :func:`default_blocks`, a table of measured block shapes per backend
  and device kind (:func:`device_kind`: the CPU's model name from ``/proc/cpuinfo`` or
  ``platform.processor()``, the accelerator's ``jax.devices()[0].device_kind`` such as
  'NVIDIA H100 80GB HBM3' or 'TPU v5 lite'). The first row whose backend matches and whose kind
  pattern is in the device kind wins; a device without a row of its own gets its backend's
  general row, a backend without one (TPU, unmeasured) the CPU's.
* :func:`tuned_chunks`, the autotuner, **off by default** so that results are bitwise
  reproducible unless asked otherwise: with the environment variable ``XENT_JAX_AUTOTUNE=1`` the
  first time a shape bucket (each of ``N, D, V`` rounded up to a power of two) is planned on a
  device, a few candidate ``(token_chunk, vocab_chunk)`` pairs around the table's choice are
  compiled and timed on dummy data of that shape, and the fastest is kept. Planning happens at
  trace time with static shapes; timing compiles and runs separate programs on concrete zeros,
  outside the caller's trace. Chunk sizes the caller passes always win (no tuning then).
* The choices persist in ``$XDG_CACHE_HOME/xent_jax/blocks.json`` (``~/.cache/xent_jax`` without
  it), keyed by backend, device kind, dtypes, schedule and bucket, and versioned
  (:data:`CACHE_VERSION`). Writes merge with the file's current entries under a lock file and
  replace it atomically (temporary file + ``os.replace``), so concurrent processes lose no entry
  and readers never see half a file. A cache that cannot be parsed or has another version is
  ignored with a warning (and replaced on the next write); it never stops a loss.
"""

import contextlib
import functools
import json
import os
import pathlib
import platform as platform_lib
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import numpy as np

# One default block: 2**24 float32 elements (64 MiB).
BLOCK_ELEMENTS = 2**24
# Classes per vocabulary chunk of the vocabulary-major backward (at most).
VOCAB_MAJOR_CHUNK = 4096
# Never fewer rows per token chunk, where re-reading the [V, D] weight gradient dominates.
MIN_TOKEN_CHUNK = 128
# The environment variable that turns the autotuner on ("1").
AUTOTUNE_ENV = "XENT_JAX_AUTOTUNE"
# Bumped whenever the meaning of a cached entry changes; other versions are ignored.
CACHE_VERSION = 1


class DefaultBlocks(NamedTuple):
  """A device's default block shape (see :func:`xent_jax.fused.schedule.plan_schedule`).

  Attributes:
    one_pass_elements: elements of a default ``[token_chunk, V]`` block of the one-pass schedule
      (its temporary memory is about two such float32 blocks).
    two_pass_elements: elements of a default ``[token_chunk, vocab_chunk]`` block of two passes.
    max_token_chunk: the most rows per default token chunk.
    token_major_blocks: whether the two-pass token-major loop takes vocabulary chunks of
      :func:`xent_jax.fused.schedule.vocab_major_chunk` classes (else all classes at once).
  """

  one_pass_elements: int
  two_pass_elements: int
  max_token_chunk: int
  token_major_blocks: bool


_CPU_BLOCKS = DefaultBlocks(BLOCK_ELEMENTS, BLOCK_ELEMENTS, 1024, False)
_GPU_BLOCKS = DefaultBlocks(BLOCK_ELEMENTS, 2 * BLOCK_ELEMENTS, 8192, True)

# (backend, pattern in the device kind, blocks): the first match wins; "" matches every kind.
TABLE: tuple[tuple[str, str, DefaultBlocks], ...] = (
  # [T, V] row blocks of 2**24 elements, T in [128, 1024] (AMD EPYC; no other CPU measured).
  ("cpu", "", _CPU_BLOCKS),
  # Two passes take [8192, C] blocks of about 2**25 elements, one pass the CPU's blocks, measured
  # on one H100 (experiments/results/gpu_h100/); other GPUs take them until measured.
  ("gpu", "H100", _GPU_BLOCKS),
  ("gpu", "", _GPU_BLOCKS),
)


@functools.cache
def _cpu_model() -> str:
  """The CPU's model name ('AMD EPYC 7B13', ...): ``/proc/cpuinfo``, else
  ``platform.processor()``, else 'cpu'."""
  with contextlib.suppress(OSError):
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  return platform_lib.processor() or "cpu"


def device_kind(backend: str) -> str:
  """What kind of device ``backend`` runs on: the CPU model for 'cpu', else the first device's
  ``device_kind``; '' when the backend is not present on this host."""
  if backend == "cpu":
    return _cpu_model()
  try:
    return jax.devices(backend)[0].device_kind
  except RuntimeError:
    return ""


def default_blocks(platform: str | None = None, kind: str | None = None) -> DefaultBlocks:
  """The table's block shape for ``platform`` ('cpu', 'gpu', 'tpu'; None: JAX's default backend)
  and device ``kind`` (None: :func:`device_kind` of that backend)."""
  backend = platform or jax.default_backend()
  kind = device_kind(backend) if kind is None else kind
  for row_backend, pattern, blocks in TABLE:
    if row_backend == backend and pattern in kind:
      return blocks
  return _CPU_BLOCKS


class Problem(NamedTuple):
  """What the tuner times: a fused head ``[N, D] x [V, D]`` under one schedule."""

  n: int
  d: int
  v: int
  hidden_dtype: str
  weight_dtype: str
  one_pass: bool
  vocab_major: bool


def autotune_enabled() -> bool:
  """Whether ``XENT_JAX_AUTOTUNE`` is '1' (off when unset)."""
  return os.environ.get(AUTOTUNE_ENV, "0") == "1"


def cache_path() -> pathlib.Path:
  """``$XDG_CACHE_HOME/xent_jax/blocks.json``, ``~/.cache/xent_jax/blocks.json`` without it."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(root) / "xent_jax" / "blocks.json"


def _bucket(size: int) -> int:
  """``size`` rounded up to a power of two."""
  return 1 << max(int(size) - 1, 0).bit_length()


def cache_key(backend: str, kind: str, problem: Problem) -> str:
  """The cache key of ``problem`` on a device: backend, kind, dtypes, schedule, shape bucket."""
  p = problem
  schedule = "one_pass" if p.one_pass else ("vocab_major" if p.vocab_major else "token_major")
  return (
    f"{backend}|{kind}|{p.hidden_dtype}x{p.weight_dtype}|{schedule}"
    f"|n{_bucket(p.n)}|d{_bucket(p.d)}|v{_bucket(p.v)}"
  )


def read_cache(path: pathlib.Path) -> dict[str, list[int]]:
  """The cached entries of ``path``; ``{}`` (with a warning) for a corrupt or stale file."""
  try:
    text = path.read_text()
  except FileNotFoundError:
    return {}
  except OSError as err:
    warnings.warn(
      f"xent_jax block-size cache {path} unreadable ({err}); using defaults.", stacklevel=3
    )
    return {}
  try:
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
      got = data.get("version") if isinstance(data, dict) else type(data).__name__
      warnings.warn(
        f"xent_jax block-size cache {path} has version {got!r}, expected {CACHE_VERSION}; "
        "ignoring it.",
        stacklevel=3,
      )
      return {}
    entries = data["entries"]
    return {str(k): [int(v[0]), int(v[1])] for k, v in entries.items() if isinstance(v, list)}
  except (ValueError, KeyError, TypeError, AttributeError, IndexError) as err:
    warnings.warn(
      f"xent_jax block-size cache {path} is corrupt ({err}); ignoring it.", stacklevel=3
    )
    return {}


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  """An exclusive lock on ``path`` + '.lock' (``fcntl``; no lock where it is missing)."""
  try:
    import fcntl
  except ImportError:  # not POSIX: the atomic replace alone
    yield
    return
  with open(f"{path}.lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def write_entry(path: pathlib.Path, key: str, chunks: Sequence[int]) -> None:
  """Adds ``key: chunks`` to the cache at ``path``: under the lock, merges with the entries on
  disk and replaces the file atomically. A failure to write only warns."""
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
      with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a bad file was reported on reading; it is replaced
        entries = read_cache(path)
      entries[key] = [int(c) for c in chunks]
      fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".blocks.", suffix=".tmp")
      try:
        with os.fdopen(fd, "w") as f:
          json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
      except BaseException:
        os.unlink(tmp)
        raise
  except OSError as err:
    warnings.warn(f"xent_jax block-size cache {path} not written ({err}).", stacklevel=3)


def candidates(problem: Problem, token_chunk: int, vocab_chunk: int) -> list[tuple[int, int]]:
  """The pairs the tuner times: the table's ``(token_chunk, vocab_chunk)`` first, then half and
  twice the token chunk (within ``[1, N]``) and, for the two-pass token-major loop, the table's
  token chunk with vocabulary chunks of :data:`VOCAB_MAJOR_CHUNK` classes (or all classes when
  the table took chunks)."""
  tokens = [token_chunk, token_chunk // 2, token_chunk * 2]
  pairs = [(int(np.clip(t, 1, problem.n)), vocab_chunk) for t in tokens]
  if not problem.one_pass and not problem.vocab_major:
    other = problem.v if vocab_chunk < problem.v else min(VOCAB_MAJOR_CHUNK, problem.v)
    pairs.append((token_chunk, other))
  return list(dict.fromkeys(pairs))


def time_fused_head(problem: Problem, token_chunk: int, vocab_chunk: int) -> float:
  """Seconds of one call of the compiled value and gradients of
  :func:`xent_jax.linear_cross_entropy` with these chunks on zeros of ``problem``'s shape (best
  of three, after a warm-up). Runs outside any trace: concrete NumPy inputs, its own program."""
  from xent_jax.fused.linear import linear_cross_entropy  # the tuner's one client imports it

  p = problem
  hidden = np.zeros((p.n, p.d), p.hidden_dtype)
  weight = np.zeros((p.v, p.d), p.weight_dtype)
  labels = np.zeros((p.n,), np.int32)
  chunks = dict(token_chunk_size=token_chunk, vocab_chunk_size=None if p.one_pass else vocab_chunk)

  def loss(h, w, y):
    if p.one_pass:
      return linear_cross_entropy(h, w, y, **chunks)
    return linear_cross_entropy(h, w, y, reduction="none", **chunks).sum()

  with jax.ensure_compile_time_eval():
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, weight, labels)
    compiled = step.compile()
    jax.block_until_ready(compiled(hidden, weight, labels))
    best = float("inf")
    for _ in range(3):
      start = time.perf_counter()
      jax.block_until_ready(compiled(hidden, weight, labels))
      best = min(best, time.perf_counter() - start)
  return best


Timer = Callable[[Problem, int, int], float]
# Choices read or made in this process, by (cache file, key).
_MEMO: dict[tuple[str, str], tuple[int, int]] = {}


def tuned_chunks(
  problem: Problem,
  token_chunk: int,
  vocab_chunk: int,
  *,
  backend: str | None = None,
  timer: Timer | None = None,
) -> tuple[int, int]:
  """The ``(token_chunk, vocab_chunk)`` to use for ``problem``: the table's pair unless
  ``XENT_JAX_AUTOTUNE=1``; then the cached choice of its bucket on this device or, the first
  time, the fastest :func:`candidates` by ``timer`` (None: :func:`time_fused_head`), written to
  the cache as ``[token_chunk, vocab_chunk]`` (0: all classes) and clipped to the shape."""
  if not autotune_enabled():
    return token_chunk, vocab_chunk
  backend = backend or jax.default_backend()
  path = cache_path()
  memo_key = (str(path), cache_key(backend, device_kind(backend), problem))
  if memo_key not in _MEMO:
    cached = read_cache(path).get(memo_key[1])
    if cached is None:
      pairs = candidates(problem, token_chunk, vocab_chunk)
      timer = timer or time_fused_head
      times = [timer(problem, t, v) for t, v in pairs]
      best_t, best_v = pairs[int(np.argmin(times))]
      cached = [best_t, 0 if best_v >= problem.v else best_v]
      write_entry(path, memo_key[1], cached)
    _MEMO[memo_key] = (cached[0], cached[1])
  tokens, classes = _MEMO[memo_key]
  all_classes = problem.one_pass or not classes
  return max(1, min(tokens, problem.n)), problem.v if all_classes else min(classes, problem.v)
