"""The ``xent-jax`` entry point: run, compare (skipping finished runs), report, bad configs."""

import csv
import io
import json
import pathlib

import numpy as np
import pytest

from xent_jax.cli import main

ROOT = pathlib.Path(__file__).parents[2]
QUICK = str(ROOT / "configs" / "digits_quick.yaml")
SMALL = [
  "model.hidden_dims=[16]",
  "train.batch_size=32",
  "train.eval_batch_size=128",
  "train.num_steps=20",
  "train.eval_every=10",
  "train.checkpoint_every=0",
  "--no-progress",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A finished `xent-jax run` and what it printed."""
  workdir = tmp_path_factory.mktemp("run")
  args = ["run", QUICK, *SMALL, "--workdir", str(workdir)]
  with pytest.MonkeyPatch.context() as patch:
    out = io.StringIO()
    patch.setattr("sys.stdout", out)
    assert main(args) == 0
  return workdir, args, out.getvalue()


@pytest.mark.slow
def test_run_prints_status_and_writes_files(finished_run):
  tmp_path, _, out = finished_run
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert f"accuracy={summary['final']['eval/accuracy']:.4f}" in out
  assert (tmp_path / "config.yaml").exists()
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.slow
def test_rerun_of_a_finished_run_says_it_reuses_it(finished_run, capsys):
  workdir, args, _ = finished_run

  def written():  # every file but the lock, which each run takes
    return {p: p.stat().st_mtime_ns for p in workdir.iterdir() if p.name != "run.lock"}

  before = written()
  assert main(args) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == (
    f"reusing the finished run in {workdir} (same config; nothing was trained): "
    "for a fresh run, pass a new --workdir"
  )
  summary = json.loads((workdir / "summary.json").read_text())
  assert f"accuracy={summary['final']['eval/accuracy']:.4f}" in lines[1]
  assert written() == before


@pytest.mark.slow
def test_first_run_says_nothing_of_reuse(finished_run):
  assert "reusing" not in finished_run[2]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("compare")
  variants = (
    "compare.variants=[{name: cross_entropy}, {name: focal, hparams: {gamma: 2.0}, label: focal2}]"
  )
  args = ["compare", QUICK, *SMALL, "compare.seeds=[0,1]", variants, "--workdir", str(workdir)]
  assert main(args) == 0
  return workdir, args


@pytest.mark.slow
def test_compare_writes_one_run_per_variant_and_seed(comparison):
  workdir, _ = comparison
  runs = sorted(
    p.parent.relative_to(workdir).as_posix() for p in workdir.glob("*/seed_*/summary.json")
  )
  assert runs == [
    f"{group}/seed_{seed}" for group in ("cross_entropy", "focal2") for seed in (0, 1)
  ]


@pytest.mark.slow
def test_finished_runs_are_not_redone(comparison, capsys):
  workdir, args = comparison
  before = {p: p.stat().st_mtime_ns for p in workdir.glob("*/seed_*/*")}
  assert main(args) == 0
  assert capsys.readouterr().out.count("already finished, skipped") == 4
  assert {p: p.stat().st_mtime_ns for p in workdir.glob("*/seed_*/*")} == before


@pytest.mark.slow
def test_report_is_rebuilt_from_the_logged_files(comparison):
  workdir, _ = comparison
  for name in ("table.md", "table.csv"):
    (workdir / name).unlink()
  for png in (workdir / "plots").glob("*.png"):
    png.unlink()
  assert main(["report", str(workdir)]) == 0
  with (workdir / "table.csv").open() as f:
    table = {row["variant"]: row for row in csv.DictReader(f)}
  assert set(table) == {"cross_entropy", "focal2"}
  for group, row in table.items():
    finals, bests = [], []
    for seed in (0, 1):
      run = workdir / group / f"seed_{seed}"
      lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
      finals.append(lines[-1]["eval/accuracy"])
      bests.append(max(line["eval/accuracy"] for line in lines))
    assert int(row["seeds"]) == 2
    np.testing.assert_allclose(float(row["final_accuracy"]), np.mean(finals), rtol=1e-5)
    np.testing.assert_allclose(
      float(row["final_accuracy_std"]), np.std(finals, ddof=1), rtol=1e-4, atol=1e-7
    )
    np.testing.assert_allclose(float(row["best_accuracy"]), np.mean(bests), rtol=1e-5)
  assert "| cross_entropy | 2 |" in (workdir / "table.md").read_text()
  for name in ("learning_curves", "reliability", "accuracy_vs_ece"):
    assert (workdir / "plots" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
  "override,key",
  [
    ("train.batch_sise=3", "train.batch_sise"),
    ("model.name=resnet", "model.name"),
    ("loss.name=hinge", "loss"),
  ],
)
def test_bad_config_exits_2_naming_the_key(tmp_path, capsys, override, key):
  assert main(["run", QUICK, override, "--workdir", str(tmp_path / "never")]) == 2
  err = capsys.readouterr().err
  assert key in err and err.startswith("xent-jax: error:")
  assert not (tmp_path / "never").exists()  # failed before any work


def test_missing_config_file(tmp_path, capsys):
  assert main(["compare", str(tmp_path / "nope.yaml")]) == 2
  assert "nope.yaml" in capsys.readouterr().err


def test_report_of_empty_directory_fails(tmp_path, capsys):
  assert main(["report", str(tmp_path)]) == 1
  assert "no finished runs" in capsys.readouterr().err


def test_yaml_error_in_an_override_is_one_line(tmp_path, capsys):
  assert main(["run", QUICK, "loss.hparams={gamma: 2", "--workdir", str(tmp_path / "never")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "override 'loss.hparams={gamma: 2'" in err and "YAML" in err


def test_bad_user_arrays_exit_2_naming_the_file(tmp_path, capsys):
  bad = tmp_path / "bad.npz"
  np.savez(bad, x_train=np.ones((8, 3)), y_train=np.arange(8), x_test=np.ones((4, 3)))
  status = main(
    [
      "run",
      QUICK,
      "data.name=arrays",
      f"data.path={bad}",
      "data.num_classes=8",
      *SMALL,
      "--workdir",
      str(tmp_path / "run"),
    ]
  )
  err = capsys.readouterr().err
  assert status == 2
  assert err.count("\n") == 1 and "bad.npz" in err and "y_test" in err and "Traceback" not in err
