"""Multi-host training through the real entry point: ``xent-jax run --distributed`` as 2 processes
of 2 CPU devices each, joined by `jax.distributed` on 127.0.0.1 (gloo collectives).

The global batch is split over the 4 devices of both processes, so the run must equal one process
with 4 devices; and a run whose process dies by SIGKILL must, rerun, resume to that same result.
"""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from xent_jax.train import logs

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).parents[1]
QUICK = str(ROOT / "configs" / "digits_quick.yaml")
# Tiny digits MLP; 240 steps leave time to kill a run after its first checkpoint.
OVERRIDES = ("model.hidden_dims=[32]", "train.batch_size=32", "train.eval_batch_size=128",
             "train.num_steps=240", "train.eval_every=20", "train.checkpoint_every=40")
TIMING_KEYS = ("train/examples_per_s", "train/step_time_s")
# Two device layouts of one computation: float32 sums may be reduced in another order.
TOLERANCE = 1e-6
TIMEOUT_S = 300


def _env(tmp_path: pathlib.Path, devices_per_process: int) -> dict:
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  flags = f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
  path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=path,
              JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),  # reruns skip compiling
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def _command(workdir: pathlib.Path, *distributed: str) -> list[str]:
  return [sys.executable, "-m", "xent_jax.cli", "run", QUICK, *OVERRIDES, "--workdir", str(workdir),
          "--no-progress", *distributed]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _log(tmp_path: pathlib.Path, rank: int) -> pathlib.Path:
  return tmp_path / f"process_{rank}.log"


@pytest.fixture
def start_pair(tmp_path):
  """``start_pair(workdir)`` starts both processes of a 2 x 2-device run, coordinated on a free
  local port, stderr to files; processes still running at the end of the test are killed."""
  started = []

  def start(workdir: pathlib.Path) -> list[subprocess.Popen]:
    coordinator = f"127.0.0.1:{_free_port()}"
    env = _env(tmp_path, 2)
    pair = []
    for rank in range(2):
      with _log(tmp_path, rank).open("a") as log:  # the child keeps its own descriptor
        pair.append(subprocess.Popen(
            _command(workdir, "--distributed", "--coordinator", coordinator, "--num-processes",
                     "2", "--process-id", str(rank)),
            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log))
    started.extend(pair)
    return pair

  yield start
  for process in started:
    if process.poll() is None:
      process.kill()
      process.wait()


def _finish(processes: list[subprocess.Popen], tmp_path: pathlib.Path) -> None:
  for rank, process in enumerate(processes):
    process.wait(timeout=TIMEOUT_S)
    assert process.returncode == 0, (f"process {rank} exited with {process.returncode}:\n"
                                     f"{_log(tmp_path, rank).read_text()}")


def _results(workdir: pathlib.Path) -> tuple[dict, list[dict]]:
  summary = logs.read_summary(workdir)
  assert summary is not None, f"no {logs.SUMMARY_FILE} in {workdir}"
  rows = [{k: v for k, v in row.items() if k not in TIMING_KEYS}
          for row in logs.read_metrics(workdir)]
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
def one_process_of_four_devices(tmp_path_factory) -> pathlib.Path:
  tmp_path = tmp_path_factory.mktemp("one_process")
  workdir = tmp_path / "run"
  done = subprocess.run(_command(workdir), env=_env(tmp_path, 4), cwd=tmp_path, capture_output=True,
                        text=True, timeout=TIMEOUT_S)
  assert done.returncode == 0, done.stderr
  assert json.loads((workdir / logs.SUMMARY_FILE).read_text())["final"]
  return workdir


def test_two_processes_equal_one_process(tmp_path, start_pair, one_process_of_four_devices):
  workdir = tmp_path / "run"
  _finish(start_pair(workdir), tmp_path)
  _assert_same_run(workdir, one_process_of_four_devices)


def test_killed_process_resumes_to_the_same_result(tmp_path, start_pair,
                                                   one_process_of_four_devices):
  """SIGKILL of process 1 after the first checkpoint; the other is stopped; both rerun."""
  workdir = tmp_path / "run"
  processes = start_pair(workdir)
  deadline = time.time() + TIMEOUT_S
  while not (workdir / "checkpoints" / "40").is_dir():
    for rank, process in enumerate(processes):
      assert process.poll() is None, (f"process {rank} ended early:\n"
                                      f"{_log(tmp_path, rank).read_text()}")
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.01)
  processes[1].send_signal(signal.SIGKILL)
  processes[1].wait()
  # Process 0 is left with a dead peer: a job scheduler would stop it, and so does the test.
  processes[0].send_signal(signal.SIGKILL)
  processes[0].wait()
  assert logs.read_summary(workdir) is None, "the run finished before it could be killed"
  assert max(row["step"] for row in logs.read_metrics(workdir)) < 240

  _finish(start_pair(workdir), tmp_path)
  _assert_same_run(workdir, one_process_of_four_devices)
