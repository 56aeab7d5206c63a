"""Block sizes from one place (xent_jax.fused.tuning): the device table, the autotuner's candidates
and choice (with a fake timer), its cache (key, contents, version, corruption, concurrent
writers) and the environment switch."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xent_jax
from xent_jax.fused import schedule, tuning

TWO_PASS = tuning.Problem(8192, 4096, 128256, "float32", "float32", False, False)
ONE_PASS = tuning.Problem(4096, 512, 32768, "float32", "float32", True, False)


@pytest.fixture
def cache(monkeypatch, tmp_path):
  """A private cache directory, the autotuner on, and no choices remembered in this process."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  monkeypatch.setenv(tuning.AUTOTUNE_ENV, "1")
  monkeypatch.setattr(tuning, "_MEMO", {})
  return tmp_path / "xent_jax" / "blocks.json"


class FakeTimer:
  """Seconds per candidate from a table (1.0 for others); records the calls."""

  def __init__(self, seconds=None):
    self.seconds, self.calls = seconds or {}, []

  def __call__(self, problem, token_chunk, vocab_chunk):
    self.calls.append((token_chunk, vocab_chunk))
    return self.seconds.get((token_chunk, vocab_chunk), 1.0)


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text)


@pytest.mark.parametrize(
  "platform, kind, expected",
  [
    ("gpu", "NVIDIA H100 80GB HBM3", tuning.TABLE[1][2]),
    ("gpu", "NVIDIA H200", tuning.TABLE[2][2]),
    ("cpu", "AMD EPYC 7B13", tuning.TABLE[0][2]),
    ("cpu", "Intel(R) Xeon(R) Platinum 8481C", tuning.TABLE[0][2]),
    ("tpu", "TPU v5 lite", tuning.TABLE[0][2]),
  ],
)
def test_table_by_backend_and_kind(platform, kind, expected):
  assert tuning.default_blocks(platform, kind) == expected
  assert tuning.default_blocks("gpu", "").two_pass_elements == 2 * tuning.BLOCK_ELEMENTS


def test_device_kind_of_this_host():
  kind = tuning.device_kind("cpu")
  assert isinstance(kind, str) and kind


def test_candidates():
  assert tuning.candidates(ONE_PASS, 512, 32768) == [(512, 32768), (256, 32768), (1024, 32768)]
  # Two passes token-major: also the vocabulary in 4096-class chunks.
  assert tuning.candidates(TWO_PASS, 128, 128256) == [
    (128, 128256),
    (64, 128256),
    (256, 128256),
    (128, 4096),
  ]
  # Clipped to the rows, duplicates dropped.
  small = tuning.Problem(100, 8, 50, "float32", "float32", False, False)
  assert tuning.candidates(small, 100, 50) == [(100, 50), (50, 50)]


def test_off_by_default(monkeypatch, cache):
  monkeypatch.delenv(tuning.AUTOTUNE_ENV)
  timer = FakeTimer()
  assert tuning.tuned_chunks(ONE_PASS, 512, 32768, backend="cpu", timer=timer) == (512, 32768)
  assert not timer.calls and not cache.exists()
  monkeypatch.setenv(tuning.AUTOTUNE_ENV, "0")
  assert tuning.tuned_chunks(ONE_PASS, 512, 32768, backend="cpu", timer=timer) == (512, 32768)
  assert not timer.calls and not cache.exists()


def test_choice_and_cache_contents(monkeypatch, cache):
  timer = FakeTimer({(64, 128256): 0.5, (128, 4096): 0.7})
  assert tuning.tuned_chunks(TWO_PASS, 128, 128256, backend="cpu", timer=timer) == (64, 128256)
  assert timer.calls == tuning.candidates(TWO_PASS, 128, 128256)
  data = json.loads(cache.read_text())
  key = f"cpu|{tuning.device_kind('cpu')}|float32xfloat32|token_major|n8192|d4096|v131072"
  assert data == {"version": tuning.CACHE_VERSION, "entries": {key: [64, 0]}}
  # A new process (nothing remembered) reads the file and times nothing; a shape of the same
  # bucket gets the choice clipped to its size.
  monkeypatch.setattr(tuning, "_MEMO", {})
  again = FakeTimer()
  same_bucket = TWO_PASS._replace(n=5000, v=100000)
  assert tuning.tuned_chunks(same_bucket, 128, 100000, backend="cpu", timer=again) == (64, 100000)
  assert not again.calls


def test_buckets_dtypes_and_schedules_have_their_own_keys():
  keys = {
    tuning.cache_key("cpu", "k", p)
    for p in (
      TWO_PASS,
      TWO_PASS._replace(n=8193),
      TWO_PASS._replace(weight_dtype="bfloat16"),
      TWO_PASS._replace(vocab_major=True),
      ONE_PASS,
    )
  }
  assert len(keys) == 5
  assert tuning.cache_key("cpu", "k", TWO_PASS) == tuning.cache_key(
    "cpu", "k", TWO_PASS._replace(n=5000)
  )
  assert tuning.cache_key("gpu", "k", TWO_PASS) != tuning.cache_key("cpu", "k", TWO_PASS)


@pytest.mark.parametrize(
  "text, message",
  [
    ("{not json", "corrupt"),
    ('{"version": 1, "entries": [1, 2]}', "corrupt"),
    ('{"version": 0, "entries": {}}', "version 0"),
    ("[1, 2]", "version"),
  ],
)
def test_bad_cache_is_ignored_with_a_warning(cache, text, message):
  _write(cache, text)
  timer = FakeTimer({(256, 32768): 0.1})
  with pytest.warns(UserWarning, match=message):
    choice = tuning.tuned_chunks(ONE_PASS, 512, 32768, backend="cpu", timer=timer)
  assert choice == (256, 32768) and timer.calls  # tuned afresh
  data = json.loads(cache.read_text())  # replaced by a valid file of this version
  assert data["version"] == tuning.CACHE_VERSION and list(data["entries"].values()) == [[256, 0]]


def test_unwritable_cache_warns_and_still_chooses(cache):
  _write(cache.parent / "x", "")
  cache.mkdir()  # a directory where the file should be
  with pytest.warns(UserWarning):
    choice = tuning.tuned_chunks(ONE_PASS, 512, 32768, backend="cpu", timer=FakeTimer())
  assert choice == (512, 32768)


_WRITER = """
import sys
from xent_jax.fused import tuning
for i in range(40):
  tuning.write_entry(tuning.cache_path(), f"{sys.argv[1]}-{i}", [i, 0])
"""


def test_concurrent_writers_lose_nothing(cache):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", _WRITER, name], env=env) for name in ("a", "b")]
  assert [p.wait(timeout=300) for p in procs] == [0, 0]
  entries = tuning.read_cache(cache)
  assert entries == {f"{name}-{i}": [i, 0] for name in "ab" for i in range(40)}
  assert not list(cache.parent.glob(".blocks.*.tmp"))


def test_plan_schedule_explicit_sizes_win(monkeypatch, cache):
  calls = []
  monkeypatch.setattr(tuning, "tuned_chunks", lambda *a, **k: calls.append(a) or (7, 9))
  common = dict(linear_reduction=True, platform="cpu")
  n, d, v = TWO_PASS.n, TWO_PASS.d, TWO_PASS.v
  explicit = schedule.plan_schedule(
    "f", n, d, v, token_chunk_size=300, vocab_chunk_size=5000, **common
  )
  assert (explicit.token_chunk, explicit.vocab_chunk) == (300, 5000) and not calls
  tuned = schedule.plan_schedule(
    "f", n, d, v, token_chunk_size=None, vocab_chunk_size=None, **common
  )
  assert (tuned.token_chunk, tuned.vocab_chunk) == (7, 9) and len(calls) == 1


def test_real_timer_at_trace_time(cache):
  """Under jit the tuner compiles and times candidates on zeros outside the trace; the loss
  equals the untuned one."""
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(24, 8)), jnp.float32)
  weight = jnp.asarray(rng.normal(size=(40, 8)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 40, size=24))
  loss = jax.jit(xent_jax.linear_cross_entropy)(hidden, weight, labels)
  entries = tuning.read_cache(cache)
  assert len(entries) == 1
  reference = xent_jax.cross_entropy(hidden @ weight.T, labels)
  np.testing.assert_allclose(loss, reference, rtol=1e-5)
