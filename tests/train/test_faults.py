"""Fault injection with real processes: nothing lost, nothing silently wrong, one-line errors.

Every test damages a run in one way (SIGKILL at a random step or inside a checkpoint save, a
corrupt or unreadable checkpoint, a second process, a full disk, torn logs, a bad config value)
and asserts three things: the failure is one line naming the file or key with a non-zero exit
status and no traceback; no file that may hold valid data was deleted or changed; and once the
fault is gone, rerunning the same command gives exactly the results of an uninterrupted run.

Faults are injected into the real ``xent-jax`` entry point by a small driver (`DRIVER`, run as
``python -c``) that patches one function before calling `xent_jax.cli.main`:

- ``kill_at_step=N``: SIGKILL when the batch of step N is requested (mid-training);
- ``kill_in_save=N``: SIGKILL inside orbax's commit of checkpoint N (all files written to its
  temporary directory, not yet renamed): a kill during a save; ``N`` may name the run too
  (``seed_1/checkpoints/40``: the save of one member of a vectorized group);
- ``wait_at_step=N``: at step N, wait until the file ``$XENT_GO`` exists (holds a run mid-way);
- ``enospc=NAME``: writes to files named NAME write half their text, then fail with ENOSPC as
  on a full disk (orbax writes through tensorstore, in C++; a real full disk for it is the tmpfs
  test, run where ``mount`` is allowed).

Permission errors: the tests run as root, which no file mode stops, so the process under test
drops to the ``nobody`` user (``setuid`` in the driver, after its imports: the interpreter itself
may live under the 0700 ``/root``) and meets real EACCES errors; as a non-root user the file modes
act directly.
"""

import errno
import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest
import yaml

from xent_jax.cli import main
from xent_jax.train import checkpoint, load_config, logs, train_and_evaluate
from xent_jax.train.checkpoint import Checkpointer
from xent_jax.train.compare import run_comparison
from xent_jax.train.config import NUMERIC_RULES, Config
from xent_jax.train.report import load_runs

ROOT = pathlib.Path(__file__).parents[2]
QUICK = str(ROOT / "configs" / "digits_quick.yaml")
# The generated Gaussian mixture, not the digits: the faults don't depend on the data, and each
# process under test then skips scikit-learn's import (about 2.3 s of its 7 s start-up and run).
TINY = (
  "data.name=gaussian_mixture",
  "model.hidden_dims=[16]",
  "train.batch_size=32",
  "train.eval_batch_size=128",
  "train.num_steps=40",
  "train.eval_every=10",
  "train.checkpoint_every=20",
)
TIMING_KEYS = ("train/examples_per_s", "train/step_time_s")
NOBODY = 65534

DRIVER = r"""
import errno, os, signal, sys, time
fault, _, arg = os.environ.get("XENT_FAULT", "").partition("=")
if fault in ("kill_at_step", "wait_at_step"):
  from xent_jax.train import sweep, trainer
  real_batch = trainer.train_batch
  def train_batch(data, *, step, **kwargs):
    if step == int(arg) and fault == "kill_at_step":
      os.kill(os.getpid(), signal.SIGKILL)
    while step == int(arg) and not os.path.exists(os.environ["XENT_GO"]):
      time.sleep(0.05)
    return real_batch(data, step=step, **kwargs)
  trainer.train_batch = sweep.train_batch = train_batch
elif fault == "kill_in_save":
  from orbax.checkpoint._src.path import atomicity
  real_finalize = atomicity.AtomicRenameTemporaryPath.finalize
  async def finalize(self, *args, **kwargs):
    if str(self._final_path).endswith(os.sep + arg):
      os.kill(os.getpid(), signal.SIGKILL)
    return await real_finalize(self, *args, **kwargs)
  atomicity.AtomicRenameTemporaryPath.finalize = finalize
elif fault == "enospc":
  import pathlib
  real_open = pathlib.Path.open
  class Full:
    def __init__(self, file, path):
      self.file, self.path = file, path
    def write(self, text):
      self.file.write(text[:len(text) // 2])
      self.file.flush()
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
    def __getattr__(self, name):
      return getattr(self.file, name)
    def __enter__(self):
      return self
    def __exit__(self, *exc):
      self.file.close()
  def open_(self, mode="r", *args, **kwargs):
    file = real_open(self, mode, *args, **kwargs)
    return Full(file, str(self)) if self.name == arg and set(mode) & set("wa") else file
  pathlib.Path.open = open_
from xent_jax.cli import main
if os.environ.get("XENT_USER"):  # drop root only now: the interpreter lives under /root
  import jax, xent_jax.train.compare, xent_jax.train.report, xent_jax.train.plots
  jax.devices()
  os.setgid(int(os.environ["XENT_USER"]))
  os.setuid(int(os.environ["XENT_USER"]))
sys.exit(main(sys.argv[1:]))
"""

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("figures_not_drawn")]


def _env(cache: pathlib.Path | None, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
  if cache:  # reruns skip recompiling
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return env


def _command(workdir: pathlib.Path, *overrides) -> list[str]:
  return [
    sys.executable,
    "-c",
    DRIVER,
    "run",
    QUICK,
    *TINY,
    *overrides,
    "--workdir",
    str(workdir),
    "--no-progress",
  ]


def _run(workdir, *overrides, fault="", cache=None, user=None, timeout=300, command=None, **env):
  """Runs the CLI (through the fault driver) to the end; returns the CompletedProcess.

  ``user``: a uid to run as (from root), taken after the imports (see `DRIVER`). ``command``:
  the argument list (default: `_command` of ``workdir`` and ``overrides``).
  """
  env = _env(cache, XENT_FAULT=fault, XENT_USER="" if user is None else str(user), **env)
  return subprocess.run(
    command or _command(workdir, *overrides),
    env=env,
    cwd=workdir.parent,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _assert_one_line_error(result, *words, status=1):
  """Non-zero exit with exactly one ``xent-jax: error:`` line naming ``words``, no traceback."""
  assert result.returncode == status, result.stderr
  assert "Traceback" not in result.stderr, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith("xent-jax: error:")]
  assert len(errors) == 1, result.stderr
  for word in words:
    assert word in errors[0], errors[0]


def _without_timing(rows):
  return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def _fitted(key: str) -> bool:
  """Summary entries after temperature scaling, whose fit is not bitwise reproducible."""
  return key.endswith("_ts") or key == "eval/temperature"


def _assert_same_results(run: pathlib.Path, reference: pathlib.Path) -> None:
  """Same summary, same metric rows (timing aside), each step logged once, in order.

  The temperature fitted after training (and the metrics after scaling) agree to 1e-5 only:
  the fit differs in the 8th digit between processes even from identical final states.
  """
  summary, expected = logs.read_summary(run), logs.read_summary(reference)
  for a, b in ((summary, expected), (summary["final"], expected["final"])):
    assert {k: v for k, v in a.items() if not _fitted(k) and k != "final"} == {
      k: v for k, v in b.items() if not _fitted(k) and k != "final"
    }
    for key in filter(_fitted, b):
      np.testing.assert_allclose(
        _numbers(a[key]), _numbers(b[key]), rtol=1e-5, atol=1e-6, err_msg=key
      )
  rows = logs.read_metrics(run)
  assert [row["step"] for row in rows] == [10, 20, 30, 40]
  assert _without_timing(rows) == _without_timing(logs.read_metrics(reference))


def _numbers(value) -> list[float]:
  """The numbers of a JSON value, flattened (None as NaN)."""
  if isinstance(value, dict):
    return [x for k in sorted(value) for x in _numbers(value[k])]
  if isinstance(value, list):
    return [x for item in value for x in _numbers(item)]
  return [float("nan") if value is None else float(value)]


def _snapshot(directory: pathlib.Path) -> dict[str, bytes]:
  """Every file's bytes (the lock file aside: its content is the holder's pid)."""
  return {
    str(p.relative_to(directory)): p.read_bytes()
    for p in sorted(directory.rglob("*"))
    if p.is_file() and p.name != logs.LOCK_FILE
  }


def _checkpoint_steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture
def public_dir():
  """A fresh directory under /tmp that the ``nobody`` user may enter (pytest's are 0700)."""
  base = pathlib.Path(tempfile.mkdtemp(prefix="xent_faults_"))
  base.chmod(0o755)
  yield base
  shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run of the tiny config; every recovered run must equal it."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  train_and_evaluate(load_config(QUICK, TINY), workdir, progress=False)
  assert _checkpoint_steps(workdir) == [20, 40]
  return workdir


def _resume(workdir: pathlib.Path) -> None:
  """Reruns the run in this process (the fault under test was in the first, killed process)."""
  train_and_evaluate(load_config(QUICK, TINY), workdir, progress=False)


def _interrupted_copy(reference: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
  """The reference as if it died after its last checkpoint: no summary.json."""
  shutil.copytree(reference, target)
  (target / logs.SUMMARY_FILE).unlink()
  return target


# --- SIGKILL -------------------------------------------------------------------------------------


@pytest.mark.processes
def test_sigkill_at_a_random_step_then_resume(tmp_path, reference, cache):
  step = random.SystemRandom().randrange(1, 40)
  workdir = tmp_path / "run"
  killed = _run(workdir, fault=f"kill_at_step={step}", cache=cache)
  assert killed.returncode == -signal.SIGKILL, (step, killed.stderr)
  assert logs.read_summary(workdir) is None
  assert [r["step"] for r in logs.read_metrics(workdir)] == list(range(10, step + 1, 10)), step
  assert _checkpoint_steps(workdir) == ([20] if step >= 20 else []), step
  # The dead process's lock file is still there; the kernel released its lock.
  assert (workdir / logs.LOCK_FILE).read_text().strip().isdigit()
  _resume(workdir)
  _assert_same_results(workdir, reference)


@pytest.mark.processes
def test_sigkill_during_a_checkpoint_save_then_resume(tmp_path, reference, cache):
  workdir = tmp_path / "run"
  killed = _run(workdir, fault="kill_in_save=40", cache=cache)
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  assert _checkpoint_steps(workdir) == [20]
  assert [p.name for p in (workdir / "checkpoints").glob("40.orbax-checkpoint-tmp*")], (
    "the kill did not land inside the save"
  )
  _resume(workdir)
  _assert_same_results(workdir, reference)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["20", "40"]  # tmp cleaned


# --- checkpoints that cannot be restored --------------------------------------------------------


@pytest.mark.processes
def test_corrupt_latest_checkpoint_is_moved_aside_not_deleted(tmp_path, reference, cache):
  workdir = _interrupted_copy(reference, tmp_path / "run")
  damaged = {}
  for path in sorted((workdir / "checkpoints" / "40").rglob("*")):
    if path.is_file() and path.stat().st_size > 64:
      data = bytearray(path.read_bytes())
      data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
      path.write_bytes(bytes(data))
      damaged[path.relative_to(workdir / "checkpoints" / "40")] = bytes(data)
  resumed = _run(workdir, cache=cache)
  assert resumed.returncode == 0, resumed.stderr
  assert "Traceback" not in resumed.stderr, resumed.stderr
  assert re.search(r"checkpoint .*/40 is corrupt .* moved to .*corrupt-40", resumed.stderr)
  _assert_same_results(workdir, reference)
  aside = workdir / "checkpoints" / "corrupt-40"
  assert {p: (aside / p).read_bytes() for p in damaged} == damaged  # kept byte for byte


def test_changed_state_shape_stops_and_touches_nothing(tmp_path, reference, capsys):
  """A config.yaml edited to another model: orbax would load the old shapes; the run stops."""
  workdir = _interrupted_copy(reference, tmp_path / "run")
  recorded = workdir / logs.CONFIG_FILE
  edited = yaml.safe_load(recorded.read_text())
  edited["model"]["hidden_dims"] = [8]
  recorded.write_text(yaml.safe_dump(edited))
  before = _snapshot(workdir)
  status = main(["run", QUICK, *TINY, "model.hidden_dims=[8]", "--workdir", str(workdir)])
  assert status == 1
  err = capsys.readouterr().err
  assert "checkpoints/40 holds state of another shape" in err, err
  assert "saved float32[16, 10], expected float32[8, 10]" in err, err
  assert _snapshot(workdir) == before


@pytest.mark.processes
def test_unreadable_checkpoint_stops_and_touches_nothing(public_dir, reference, cache):
  """A permission error is not corruption: stop, name the file, move and delete nothing."""
  base = public_dir
  workdir = _interrupted_copy(reference, base / "run")
  as_root = os.geteuid() == 0
  if as_root:
    for path in [workdir, *workdir.rglob("*")]:
      os.chown(path, NOBODY, NOBODY)
  data_files = (workdir / "checkpoints" / "40" / "state").rglob("d/*")
  locked_file = max(data_files, key=lambda p: p.stat().st_size)
  if as_root:
    os.chown(locked_file, 0, 0)
  locked_file.chmod(0)
  if not as_root and os.access(locked_file, os.R_OK):
    pytest.skip("this user reads files whatever their mode")
  before = _snapshot_metadata(workdir)
  result = _run(workdir, user=NOBODY if as_root else None, HOME=str(base))
  _assert_one_line_error(result, str(locked_file), "Permission denied", "left as is")
  assert _snapshot_metadata(workdir) == before
  locked_file.chmod(0o644)
  _resume(workdir)
  _assert_same_results(workdir, reference)


def _snapshot_metadata(directory: pathlib.Path) -> dict[str, tuple]:
  """Names, sizes and modification times (a snapshot that needs no read permission)."""
  return {
    str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
    for p in sorted(directory.rglob("*"))
    if p.name != logs.LOCK_FILE
  }


def test_checkpoints_without_config_yaml_are_refused(tmp_path, reference, capsys):
  workdir = _interrupted_copy(reference, tmp_path / "run")
  (workdir / logs.CONFIG_FILE).unlink()
  before = _snapshot(workdir)
  assert main(["run", QUICK, *TINY, "optim.learning_rate=0.05", "--workdir", str(workdir)]) == 2
  err = capsys.readouterr().err
  assert str(workdir) in err and "no config.yaml" in err and "checkpoints/" in err
  assert _snapshot(workdir) == before


# --- two processes -------------------------------------------------------------------------------


@pytest.mark.processes
def test_second_process_is_refused_while_the_first_runs(tmp_path, reference, cache):
  workdir, go = tmp_path / "run", tmp_path / "go"
  env = _env(cache, XENT_FAULT="wait_at_step=15", XENT_GO=str(go))
  first = subprocess.Popen(
    _command(workdir),
    env=env,
    cwd=tmp_path,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.time() + 240
    while not (workdir / "metrics.jsonl").exists():  # the first run holds the lock and trains
      assert first.poll() is None and time.time() < deadline, first.stderr and first.stderr.read()
      time.sleep(0.05)
    second = _run(workdir, cache=cache)
    _assert_one_line_error(
      second, str(workdir), "in use by another process", f"pid {first.pid}", status=2
    )
  finally:
    go.touch()
    _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err
  _assert_same_results(workdir, reference)


# --- full disk -----------------------------------------------------------------------------------


@pytest.mark.processes
@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json.tmp"])
def test_full_disk_while_logging_then_resume(tmp_path, reference, cache, name):
  workdir = tmp_path / "run"
  full = _run(workdir, fault=f"enospc={name}", cache=cache)
  _assert_one_line_error(full, str(workdir / name), "No space left on device")
  assert not list(workdir.rglob("*.tmp")) and not list(workdir.rglob("*orbax-checkpoint-tmp*"))
  assert logs.read_summary(workdir) is None
  _resume(workdir)
  _assert_same_results(workdir, reference)


@pytest.mark.processes
def test_full_disk_during_a_checkpoint_save_then_resume(tmp_path, reference, cache):
  """A real full disk (a 1 MiB tmpfs), met by orbax's own writer; needs permission to mount."""
  mount = tmp_path / "small"
  mount.mkdir()
  if subprocess.run(
    ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, check=False
  ).returncode:
    pytest.skip(
      "cannot mount a small tmpfs here (needs root); simulated ENOSPC tests cover the rest"
    )
  try:
    workdir = mount / "run"
    filler = mount / "filler"
    with filler.open("wb") as f:  # leave four pages: config.yaml, metrics.jsonl, run.lock, one more
      f.write(bytes(shutil.disk_usage(mount).free - 4 * 4096))
    full = _run(workdir, cache=cache)
    _assert_one_line_error(
      full,
      "could not save checkpoint",
      str(workdir / "checkpoints" / "20"),
      "No space left on device",
    )
    assert [r["step"] for r in logs.read_metrics(workdir)] == [10, 20]
    assert not list(workdir.rglob("*orbax-checkpoint-tmp*")) and not list(workdir.rglob("*.tmp"))
    filler.unlink()
    _resume(workdir)
    _assert_same_results(workdir, reference)
  finally:
    subprocess.run(["umount", str(mount)], check=False)


# --- the run directory itself -------------------------------------------------------------------


def test_run_directory_under_a_file(tmp_path, capsys):
  (tmp_path / "a_file").write_text("")
  assert main(["run", QUICK, *TINY, "--workdir", str(tmp_path / "a_file" / "run")]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "a_file" in err and "Not a directory" in err


@pytest.mark.processes
def test_run_directory_without_write_permission(public_dir):
  base = public_dir  # owned by this user: others may not write in it
  if os.geteuid() != 0:
    base.chmod(0o555)
    if os.access(base, os.W_OK):
      pytest.skip("this user writes anywhere")
  result = _run(base / "run", user=NOBODY if os.geteuid() == 0 else None, HOME=str(base))
  _assert_one_line_error(result, str(base / "run"), "Permission denied")
  assert not (base / "run").exists()


# --- logs ---------------------------------------------------------------------------------------


def test_report_keeps_rows_after_a_torn_line_and_names_it(tmp_path, reference, caplog):
  workdir = tmp_path / "cmp"
  run = workdir / "cross_entropy" / "seed_0"
  shutil.copytree(reference, run)
  lines = (run / logs.METRICS_FILE).read_text().splitlines(keepends=True)
  (run / logs.METRICS_FILE).write_text(
    "".join(lines[:2]) + lines[2][:25] + "\n" + "".join(lines[2:])
  )
  assert main(["report", str(workdir)]) == 0
  assert f"{run / logs.METRICS_FILE} line 3 is not a metric row" in caplog.text
  ((loaded,),) = load_runs(workdir).values()
  assert loaded["rows"] == [json.loads(line) for line in lines]  # every good row, the last ones too


@pytest.mark.processes
def test_resume_keeps_rows_after_a_torn_line(tmp_path, reference, cache):
  """The resume rewrites metrics.jsonl: a torn line in the middle must not cut the rows after it."""
  workdir = _interrupted_copy(reference, tmp_path / "run")
  lines = (workdir / logs.METRICS_FILE).read_text().splitlines(keepends=True)
  (workdir / logs.METRICS_FILE).write_text(
    lines[0] + '{"step": 20, "train/lo\n' + "".join(lines[1:])
  )
  resumed = _run(workdir, cache=cache)
  assert resumed.returncode == 0, resumed.stderr
  assert f"{workdir / logs.METRICS_FILE} line 2 is not a metric row" in resumed.stderr
  _assert_same_results(workdir, reference)


def test_truncated_summary_is_one_line_error(tmp_path, reference, capsys):
  workdir = tmp_path / "cmp"
  run = workdir / "cross_entropy" / "seed_0"
  shutil.copytree(reference, run)
  summary = run / logs.SUMMARY_FILE
  summary.write_text(summary.read_text()[:100])
  before = _snapshot(run)
  assert main(["report", str(workdir)]) == 1
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and str(summary) in err and "not valid JSON" in err
  assert _snapshot(run) == before


# --- configs -------------------------------------------------------------------------------------

LIST_KEYS = ("model.hidden_dims", "model.channels", "compare.seeds")
BAD_VALUES = {  # one out-of-range value per rule; NaN is refused by every rule
  "> 0": "0",
  ">= 0": "-1",
  "in (0, 1)": "1.0",
  "in [0, 1)": "-0.1",
  ">= 2": "1",
  ">= 0 (0 disables clipping)": "-0.5",
  ">= 0 (0 disables checkpoints)": "-10",
  ">= 0 (0: one per CPU core in map mode on CPU, else 1)": "-2",
}


def _bad_override(key: str, rule: str) -> str:
  value = BAD_VALUES[rule]
  return f"{key}=[{value}]" if key in LIST_KEYS else f"{key}={value}"


@pytest.mark.parametrize("key", sorted(NUMERIC_RULES))
def test_every_numeric_key_is_checked_at_load(tmp_path, capsys, key):
  section, field = key.split(".")
  is_float = isinstance(getattr(getattr(Config(), section), field), float)
  for override in [_bad_override(key, NUMERIC_RULES[key][0])] + (
    [f"{key}=nan"] if is_float else []
  ):
    assert main(["run", QUICK, *TINY, override, "--workdir", str(tmp_path / "never")]) == 2, (
      override
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"config key '{key}'" in err, (override, err)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
  "override,words",
  [
    ("loss.hparams={label_smoothing: 0.1", ["loss.hparams={label_smoothing: 0.1", "YAML"]),
    ("model.hidden_dims=[16,", ["model.hidden_dims=[16,", "YAML"]),
    ("optim.warmup_steps=40", ["optim.warmup_steps"]),
    ("train.batch_size=5000", ["train.batch_size", "training examples"]),
  ],
)
def test_other_bad_values_are_one_line_errors(tmp_path, capsys, override, words):
  assert main(["run", QUICK, *TINY, override, "--workdir", str(tmp_path / "run")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and all(word in err for word in words), err


@pytest.mark.processes
def test_bad_config_in_a_real_process_exits_2_without_traceback(tmp_path):
  result = _run(tmp_path / "run", "optim.learning_rate=-0.1")
  _assert_one_line_error(result, "optim.learning_rate", status=2)
  assert not (tmp_path / "run").exists()
  debug = _run(tmp_path / "run", "optim.learning_rate=-0.1", "--debug")
  assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_compare_refuses_a_finished_run_of_another_config(tmp_path, capsys):
  workdir = tmp_path / "cmp"
  args = [
    "compare",
    QUICK,
    *TINY,
    "compare.seeds=[0]",
    "compare.variants=[{name: cross_entropy}]",
    "--workdir",
    str(workdir),
    "--no-progress",
  ]
  assert main(args) == 0
  run = workdir / "cross_entropy" / "seed_0"
  before = _snapshot(run)
  capsys.readouterr()
  assert main(args + ["optim.learning_rate=0.05"]) == 2
  err = capsys.readouterr().err
  assert str(run) in err and "optim.learning_rate (recorded 0.003, now 0.05)" in err, err
  assert _snapshot(run) == before
  assert main(args) == 0  # the same config still reuses it
  assert "already finished, skipped" in capsys.readouterr().out


# --- the restore rule, case by case (in-process, small arrays) -----------------------------------


def _two_checkpoints(directory: pathlib.Path):
  state = {"w": np.arange(12.0, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float32)}
  checkpointer = Checkpointer(directory, max_to_keep=3)
  checkpointer.save(1, state, {})
  checkpointer.save(2, jax.tree.map(lambda a: a + 1, state), {})
  checkpointer.close()
  return state


def _tear_json(path: pathlib.Path) -> None:
  path.write_text(path.read_text()[:20])


def _truncate_data(path: pathlib.Path) -> None:
  for data in (path / "state").rglob("d/*"):
    data.write_bytes(data.read_bytes()[: len(data.read_bytes()) // 2])


@pytest.mark.parametrize(
  "damage",
  [
    lambda step: _tear_json(step / "record" / "metadata"),
    lambda step: _tear_json(step / "state" / "_METADATA"),
    _truncate_data,
  ],
  ids=["torn record", "torn array metadata", "truncated array data"],
)
def test_verified_corruption_is_moved_aside_and_an_older_one_restored(tmp_path, damage):
  state = _two_checkpoints(tmp_path)
  damage(tmp_path / "2")
  damaged = _snapshot(tmp_path / "2")
  restored, record = Checkpointer(tmp_path, max_to_keep=3).restore_latest(state)
  assert record["step"] == 1
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "corrupt-2"]
  assert _snapshot(tmp_path / "corrupt-2") == damaged


@pytest.mark.parametrize(
  "fault,words",
  [
    ("shape", ["holds state of another shape", "w: saved float32[3, 4], expected float32[3, 5]"]),
    ("missing file", ["lacks record/metadata", "move it aside"]),
    ("permission", ["cannot read checkpoint file", "Permission denied"]),
    (
      "other error",
      ["could not restore checkpoint", "disk controller on fire", "does not prove it"],
    ),
  ],
)
def test_other_restore_errors_stop_and_touch_nothing(tmp_path, monkeypatch, fault, words):
  state = _two_checkpoints(tmp_path)
  like = state
  if fault == "shape":
    like = dict(state, w=np.zeros((3, 5), np.float32))
  elif fault == "missing file":
    (tmp_path / "2" / "record" / "metadata").unlink()
  elif fault == "permission":  # what root cannot get from a file mode: the error of open()

    def denied(path, *args, **kwargs):
      raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(checkpoint, "open", denied, raising=False)
  checkpointer = Checkpointer(tmp_path, max_to_keep=3)
  if fault == "other error":

    def broken(*args, **kwargs):
      raise RuntimeError("disk controller on fire")

    monkeypatch.setattr(checkpointer._reader, "restore", broken)
  before = _snapshot(tmp_path)
  with pytest.raises(checkpoint.CheckpointError) as info:
    checkpointer.restore_latest(like)
  for word in words:
    assert word in str(info.value)
  assert str(tmp_path / "2") in str(info.value)
  assert _snapshot(tmp_path) == before


# --- a vectorized group of runs (`compare`): the same faults, nothing lost ------------------------

# Two members (seeds 0 and 1) of one loss, trained as one group: the tiny run's shapes.
GROUP = (*TINY, "compare.seeds=[0,1]", "compare.variants=[{name: cross_entropy, label: ce}]")


def _group_command(workdir: pathlib.Path, *overrides) -> list[str]:
  return [
    sys.executable,
    "-c",
    DRIVER,
    "compare",
    QUICK,
    *GROUP,
    *overrides,
    "--workdir",
    str(workdir),
    "--no-progress",
  ]


def _members(workdir: pathlib.Path) -> list[pathlib.Path]:
  return [workdir / "ce" / f"seed_{seed}" for seed in (0, 1)]


def _resume_group(workdir: pathlib.Path) -> None:
  """Reruns the comparison in this process (vectorized: ``compare.group_mode`` is ``auto``)."""
  assert run_comparison(load_config(QUICK, (*GROUP, f"workdir={workdir}")), progress=False) == []


def _assert_same_group(workdir: pathlib.Path, reference: pathlib.Path) -> None:
  for member, expected in zip(_members(workdir), _members(reference)):
    _assert_same_results(member, expected)


@pytest.fixture(scope="module")
def group_reference(tmp_path_factory):
  """An uninterrupted vectorized group; every recovered group must equal it, member by member."""
  workdir = tmp_path_factory.mktemp("group_reference") / "compare"
  _resume_group(workdir)
  assert [_checkpoint_steps(m) for m in _members(workdir)] == [[20, 40], [20, 40]]
  return workdir


def _interrupted_group(reference: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
  """The reference group as if it died after its last checkpoints: no summaries."""
  shutil.copytree(reference, target)
  for member in _members(target):
    (member / logs.SUMMARY_FILE).unlink()
  return target


@pytest.mark.processes
def test_group_sigkill_at_a_random_step_then_resume(tmp_path, group_reference, cache):
  step = random.SystemRandom().randrange(1, 40)
  workdir = tmp_path / "compare"
  killed = _run(workdir, fault=f"kill_at_step={step}", cache=cache, command=_group_command(workdir))
  assert killed.returncode == -signal.SIGKILL, (step, killed.stderr)
  for member in _members(workdir):
    assert logs.read_summary(member) is None
    assert [r["step"] for r in logs.read_metrics(member)] == list(range(10, step + 1, 10)), step
    assert _checkpoint_steps(member) == ([20] if step >= 20 else []), step
  _resume_group(workdir)
  _assert_same_group(workdir, group_reference)


@pytest.mark.processes
def test_group_sigkill_in_one_members_save_then_resume(tmp_path, group_reference, cache):
  """Killed while saving member 1's checkpoint 40, after member 0 saved its own: member 0 resumes
  from 40 and waits while member 1 replays 20..40 from its checkpoint 20."""
  workdir = tmp_path / "compare"
  killed = _run(
    workdir,
    fault="kill_in_save=seed_1/checkpoints/40",
    cache=cache,
    command=_group_command(workdir),
  )
  assert killed.returncode == -signal.SIGKILL, killed.stderr
  first, second = _members(workdir)
  assert _checkpoint_steps(first) == [20, 40] and _checkpoint_steps(second) == [20]
  assert list((second / "checkpoints").glob("40.orbax-checkpoint-tmp*")), "kill missed the save"
  _resume_group(workdir)
  _assert_same_group(workdir, group_reference)
  assert sorted(p.name for p in (second / "checkpoints").iterdir()) == ["20", "40"]


def test_group_corrupt_checkpoint_of_one_member_is_moved_aside(tmp_path, group_reference):
  workdir = _interrupted_group(group_reference, tmp_path / "compare")
  step_dir = _members(workdir)[1] / "checkpoints" / "40"
  damaged = {}
  for path in sorted(step_dir.rglob("*")):
    if path.is_file() and path.stat().st_size > 64:
      data = bytearray(path.read_bytes())
      data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)
      path.write_bytes(bytes(data))
      damaged[path.relative_to(step_dir)] = bytes(data)
  _resume_group(workdir)
  _assert_same_group(workdir, group_reference)
  aside = step_dir.parent / "corrupt-40"
  assert {p: (aside / p).read_bytes() for p in damaged} == damaged  # kept byte for byte


@pytest.mark.processes
def test_group_full_disk_while_logging_then_resume(tmp_path, group_reference, cache):
  workdir = tmp_path / "compare"
  full = _run(workdir, fault="enospc=metrics.jsonl", cache=cache, command=_group_command(workdir))
  _assert_one_line_error(full, str(_members(workdir)[0] / "metrics.jsonl"), "No space left")
  assert not list(workdir.rglob("*.tmp")) and not list(workdir.rglob("*orbax-checkpoint-tmp*"))
  _resume_group(workdir)
  _assert_same_group(workdir, group_reference)


@pytest.mark.processes
def test_group_second_process_is_refused_while_the_first_runs(tmp_path, group_reference, cache):
  workdir, go = tmp_path / "compare", tmp_path / "go"
  env = _env(cache, XENT_FAULT="wait_at_step=15", XENT_GO=str(go))
  first = subprocess.Popen(
    _group_command(workdir),
    env=env,
    cwd=tmp_path,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    deadline = time.time() + 240
    while not (_members(workdir)[1] / "metrics.jsonl").exists():  # both members locked, training
      assert first.poll() is None and time.time() < deadline, first.stderr and first.stderr.read()
      time.sleep(0.05)
    second = _run(workdir, cache=cache, command=_group_command(workdir))
    _assert_one_line_error(second, "in use by another process", f"pid {first.pid}", status=2)
  finally:
    go.touch()
    _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err
  _assert_same_group(workdir, group_reference)


def test_group_with_a_changed_config_is_refused_untouched(tmp_path, group_reference, capsys):
  workdir = _interrupted_group(group_reference, tmp_path / "compare")
  before = _snapshot(workdir)
  argv = ["compare", QUICK, *GROUP, "optim.learning_rate=0.05", "--workdir", str(workdir)]
  assert main(argv) == 2
  err = capsys.readouterr().err
  assert "holds a run of a different config" in err and "optim.learning_rate" in err, err
  assert _snapshot(workdir) == before
