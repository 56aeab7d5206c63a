"""Multi-host training through the real entry point: ``xent-jax run --distributed`` as 2 processes
of 2 CPU devices each, joined by `jax.distributed` on 127.0.0.1 (gloo collectives).

The global batch is split over the 4 devices of both processes, so the run must equal one process
with 4 devices. Faults must cost one restart at most: a run whose process 1 dies by SIGKILL stops
process 0 too, with its one-line error, and rerun resumes to that same result; so does a rerun
after process 1's part of the newest checkpoint was truncated (every process agrees to move it
aside); an unreadable checkpoint file seen by one process stops both, touching nothing.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from xent_jax.train import logs

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

ROOT = pathlib.Path(__file__).parents[2]
QUICK = str(ROOT / "configs" / "digits_quick.yaml")
# Tiny digits MLP; 240 steps leave time to kill a run after its first checkpoint.
OVERRIDES = (
  "model.hidden_dims=[32]",
  "train.batch_size=32",
  "train.eval_batch_size=128",
  "train.num_steps=240",
  "train.eval_every=20",
  "train.checkpoint_every=40",
)
TIMING_KEYS = ("train/examples_per_s", "train/step_time_s")
# Two device layouts of one computation: float32 sums may be reduced in another order.
TOLERANCE = 1e-6
TIMEOUT_S = 300
# How long a process whose peer died is given to stop on its own (it does within seconds when its
# next collective fails; see `killed_pair`).
PEER_STOP_S = 15
# The CLI with opening one checkpoint file (named by $XENT_DENY) refused with EACCES, as for a
# process whose user may not read it (the tests run as root, which no file mode stops).
DENY_DRIVER = r"""
import builtins, errno, os, sys
from xent_jax.train import checkpoint
def open_(path, *args, **kwargs):
  if os.path.basename(str(path)) == os.environ["XENT_DENY"]:
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
  return builtins.open(path, *args, **kwargs)
checkpoint.open = open_
from xent_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(cache: pathlib.Path, devices_per_process: int) -> dict:
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  flags = f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
  path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
  return dict(
    os.environ,
    XLA_FLAGS=flags,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=path,
    JAX_COMPILATION_CACHE_DIR=str(cache),  # reruns skip compiling
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  )


def _command(workdir: pathlib.Path, *distributed: str, driver: str | None = None) -> list[str]:
  entry = ["-c", driver] if driver else ["-m", "xent_jax.cli"]
  return [
    sys.executable,
    *entry,
    "run",
    QUICK,
    *OVERRIDES,
    "--workdir",
    str(workdir),
    "--no-progress",
    *distributed,
  ]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _log(tmp_path: pathlib.Path, rank: int) -> pathlib.Path:
  return tmp_path / f"process_{rank}.log"


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory) -> pathlib.Path:
  """One compilation cache for every run of the module: each 2-process start after the first
  skips compiling."""
  return tmp_path_factory.mktemp("jax_cache")


def _pair_starter(tmp_path: pathlib.Path, cache: pathlib.Path):
  """``(start, stop)``: ``start(workdir, deny=None)`` starts both processes of a 2 x 2-device run,
  coordinated on a free local port, stderr appended to ``tmp_path/process_<rank>.log`` (``deny``:
  a file name that process 1 may not open); ``stop()`` kills those still running."""
  started = []

  def start(workdir: pathlib.Path, deny: str | None = None) -> list[subprocess.Popen]:
    coordinator = f"127.0.0.1:{_free_port()}"
    pair = []
    for rank in range(2):
      env = _env(cache, 2)
      driver = None
      if deny and rank == 1:
        env, driver = dict(env, XENT_DENY=deny), DENY_DRIVER
      with _log(tmp_path, rank).open("a") as log:  # the child keeps its own descriptor
        pair.append(
          subprocess.Popen(
            _command(
              workdir,
              "--distributed",
              "--coordinator",
              coordinator,
              "--num-processes",
              "2",
              "--process-id",
              str(rank),
              driver=driver,
            ),
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=log,
          )
        )
    started.extend(pair)
    return pair

  def stop() -> None:
    for process in started:
      if process.poll() is None:
        process.kill()
        process.wait()

  return start, stop


@pytest.fixture
def start_pair(tmp_path, jax_cache):
  """`_pair_starter`'s ``start`` for one test, its processes killed at the end of the test."""
  start, stop = _pair_starter(tmp_path, jax_cache)
  yield start
  stop()


def _finish(processes: list[subprocess.Popen], tmp_path: pathlib.Path) -> None:
  for rank, process in enumerate(processes):
    process.wait(timeout=TIMEOUT_S)
    assert process.returncode == 0, (
      f"process {rank} exited with {process.returncode}:\n{_log(tmp_path, rank).read_text()}"
    )


def _results(workdir: pathlib.Path) -> tuple[dict, list[dict]]:
  summary = logs.read_summary(workdir)
  assert summary is not None, f"no {logs.SUMMARY_FILE} in {workdir}"
  rows = [
    {k: v for k, v in row.items() if k not in TIMING_KEYS} for row in logs.read_metrics(workdir)
  ]
  return summary["final"], rows


def _assert_close(got: dict, want: dict, where: str) -> None:
  assert set(got) == set(want), where
  for key, value in want.items():
    assert got[key] == pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE), f"{where}: {key}"


def _assert_same_run(workdir: pathlib.Path, reference: pathlib.Path) -> None:
  final, rows = _results(workdir)
  want_final, want_rows = _results(reference)
  _assert_close(final, want_final, "summary")
  assert [row["step"] for row in rows] == [row["step"] for row in want_rows]
  for row, want in zip(rows, want_rows):
    _assert_close(row, want, f"metrics.jsonl step {want['step']}")


@pytest.fixture(scope="module")
def one_process_of_four_devices(tmp_path_factory, jax_cache) -> pathlib.Path:
  tmp_path = tmp_path_factory.mktemp("one_process")
  workdir = tmp_path / "run"
  done = subprocess.run(
    _command(workdir),
    env=_env(jax_cache, 4),
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=TIMEOUT_S,
  )
  assert done.returncode == 0, done.stderr
  assert json.loads((workdir / logs.SUMMARY_FILE).read_text())["final"]
  return workdir


def test_two_processes_equal_one_process(tmp_path, start_pair, one_process_of_four_devices):
  workdir = tmp_path / "run"
  _finish(start_pair(workdir), tmp_path)
  _assert_same_run(workdir, one_process_of_four_devices)


@pytest.fixture(scope="module")
def killed_pair(tmp_path_factory, jax_cache) -> tuple[pathlib.Path, int | None, str]:
  """A 2-process run whose process 1 was killed by SIGKILL once checkpoint 80 existed:
  ``(workdir, process 0's exit status, its stderr)``. Process 0 stops on its own within seconds
  when its next collective fails; one stuck inside a compiled step is only stopped by the
  coordination service, after its heartbeat timeout (100 s): the test stops it first, as a job
  scheduler would (status None). Tests restart copies of ``workdir``."""
  tmp_path = tmp_path_factory.mktemp("killed_pair")
  workdir = tmp_path / "run"
  start, stop = _pair_starter(tmp_path, jax_cache)
  try:
    processes = start(workdir)
    deadline = time.time() + TIMEOUT_S
    while not (workdir / "checkpoints" / "80").is_dir():
      for rank, process in enumerate(processes):
        assert process.poll() is None, (
          f"process {rank} ended early:\n{_log(tmp_path, rank).read_text()}"
        )
      assert time.time() < deadline, "no checkpoint appeared"
      time.sleep(0.01)
    processes[1].send_signal(signal.SIGKILL)
    processes[1].wait()
    try:
      status = processes[0].wait(timeout=PEER_STOP_S)
    except subprocess.TimeoutExpired:
      status = None
  finally:
    stop()
  return workdir, status, _log(tmp_path, 0).read_text()


def _copy(run: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  return pathlib.Path(shutil.copytree(run, tmp_path / "run"))


def _errors(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.startswith("xent-jax: error:")]


def test_killed_process_stops_the_other_then_resumes_to_the_same_result(
  tmp_path, start_pair, killed_pair, one_process_of_four_devices
):
  """SIGKILL of process 1 after a checkpoint: process 0 stops by itself, naming the lost peer
  (unless stuck inside a step, see `killed_pair`); both rerun once."""
  run, status, log = killed_pair
  if status is not None:
    assert status == 1, log
    (error,) = _errors(log)
    assert "another process of this 2-process run died or stopped" in error, error
    assert re.search(r"so process 0 stops too: .*Connection (reset|closed) by peer", error), error
    assert "Traceback" not in log, log
  workdir = _copy(run, tmp_path)
  assert logs.read_summary(workdir) is None, "the run finished before it could be killed"
  assert max(row["step"] for row in logs.read_metrics(workdir)) < 240

  _finish(start_pair(workdir), tmp_path)
  _assert_same_run(workdir, one_process_of_four_devices)


def test_truncated_part_of_one_process_is_moved_aside_in_one_restart(
  tmp_path, start_pair, killed_pair, one_process_of_four_devices
):
  """Half of an array file that process 1 wrote into the newest checkpoint is cut off: both
  processes agree it is corrupt, it is moved aside (byte for byte), and one rerun resumes from
  the checkpoint before it to the uninterrupted result."""
  workdir = _copy(killed_pair[0], tmp_path)
  newest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  part = workdir / "checkpoints" / str(newest) / "state" / "ocdbt.process_1" / "d"
  victim = max(part.iterdir(), key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
  damaged = victim.read_bytes()

  _finish(start_pair(workdir), tmp_path)
  _assert_same_run(workdir, one_process_of_four_devices)
  for rank in range(2):
    text = _log(tmp_path, rank).read_text()
    assert re.search(rf"checkpoint .*/{newest} is corrupt .* moved to .*corrupt-{newest}\b", text)
  aside = workdir / "checkpoints" / f"corrupt-{newest}" / victim.relative_to(part.parents[2])
  assert aside.read_bytes() == damaged


def test_unreadable_file_on_one_process_stops_both_and_touches_nothing(
  tmp_path, start_pair, killed_pair
):
  """Process 1 may not open a file of the newest checkpoint: not corruption, so both processes
  stop with one line each (process 1 names the file, process 0 quotes process 1), nothing moved."""
  workdir = _copy(killed_pair[0], tmp_path)
  newest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
  processes = start_pair(workdir, deny="_METADATA")
  for process in processes:
    process.wait(timeout=TIMEOUT_S)
  texts = [_log(tmp_path, rank).read_text() for rank in range(2)]
  assert [p.returncode for p in processes] == [1, 1], texts
  errors = [_errors(text) for text in texts]
  assert all(len(lines) == 1 for lines in errors), texts
  where = f"checkpoints/{newest}/"
  assert "cannot read checkpoint file" in errors[1][0] and where in errors[1][0], errors
  assert "Permission denied" in errors[1][0], errors
  assert errors[0][0].startswith("xent-jax: error: process 1 of 2 stopped the run: cannot read"), (
    errors
  )
  assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before
