"""The CLI reads as plain text: help with examples, `losses`, did-you-mean, separate output dirs."""

import pathlib
import sys

import pytest

import xent_jax
from xent_jax import cli
from xent_jax.train import compare, trainer
from xent_jax.train.config import ConfigError, load_config

ROOT = pathlib.Path(__file__).parents[2]
QUICK = str(ROOT / "configs" / "digits_quick.yaml")


@pytest.mark.parametrize("command", [[], ["run"], ["compare"], ["report"], ["losses"]])
def test_help_is_plain_text_with_examples(command, capsys):
  with pytest.raises(SystemExit):
    cli.main([*command, "--help"])
  text = capsys.readouterr().out
  assert "``" not in text and "::" not in text and ":math:" not in text
  assert "example" in text.lower() and "xent-jax " + (command[0] if command else "") in text


def test_report_directory_argument_has_help(capsys):
  with pytest.raises(SystemExit):
    cli.main(["report", "--help"])
  assert "a comparison's output directory" in capsys.readouterr().out


def test_losses_lists_every_registered_loss_with_defaults(capsys):
  assert cli.main(["losses"]) == 0
  out = capsys.readouterr().out
  lines = out.splitlines()
  for name, info in xent_jax.list_losses().items():
    line = next(i for i, text in enumerate(lines) if text.split(" ")[0] == name)
    for key, default in info.hparams.items():
      assert f"{key}={default!r}" in lines[line + 1], (name, key)
  assert "`" not in out and "pkg.losses:my_loss" in out


def test_unknown_key_gets_a_suggestion(capsys):
  assert cli.main(["run", QUICK, "train.lerning_rate=0.1"]) == 2
  assert "did you mean 'optim.learning_rate'?" in capsys.readouterr().err


def test_run_and_compare_write_to_different_directories(monkeypatch):
  """Without --workdir, `run` goes next to, never into, the directory `compare` fills."""
  seen = {}
  monkeypatch.setattr(
    trainer,
    "train_and_evaluate",
    lambda config, workdir, **_: (
      seen.update(run=str(workdir))
      or {"final": {f"eval/{k}": 0.0 for k in ("accuracy", "nll", "ece", "brier")}}
    ),
  )
  monkeypatch.setattr(
    compare, "run_comparison", lambda config, **_: seen.update(compare=config.workdir) or []
  )
  assert cli.main(["run", QUICK, "loss.name=focal", "--no-progress"]) == 0
  assert cli.main(["compare", QUICK, "--no-progress"]) == 0
  assert seen["compare"] == "runs/digits_quick"
  assert seen["run"] == "runs/digits_quick-run/focal/seed_0"
  assert cli.main(["run", QUICK, "--workdir", "/tmp/elsewhere", "--no-progress"]) == 0
  assert seen["run"] == "/tmp/elsewhere"


@pytest.mark.parametrize(
  "override,expected",
  [
    ("model.hiden_dims=[8]", "did you mean 'model.hidden_dims'?"),
    ("lerning_rate=0.1", "did you mean 'optim.learning_rate'?"),
    (
      "compare.variants=[{nmae: focal}]",
      "unknown key 'nmae' in a LossConfig entry (such as compare.variants); did you mean 'name'?",
    ),
  ],
)
def test_suggestions_for_keys_at_every_level(override, expected):
  with pytest.raises(ConfigError) as err:
    load_config(QUICK, (override,))
  assert expected in str(err.value)


def test_a_loss_module_in_the_working_directory_is_found(tmp_path, monkeypatch):
  """`xent-jax run ... loss.name=my_losses:my_loss` works from the directory of my_losses.py."""
  (tmp_path / "h5_cwd_losses.py").write_text(
    "import xent_jax\n\n\ndef my_loss(logits, labels, *, axis=-1, weight=None, ignore_index=-100,\n"
    "            reduction='mean', where=None):\n"
    "  return xent_jax.cross_entropy(logits, labels, axis=axis, weight=weight,\n"
    "                                ignore_index=ignore_index, reduction=reduction, where=where)\n"
  )
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
  seen = {}
  monkeypatch.setattr(
    trainer,
    "train_and_evaluate",
    lambda config, workdir, **_: (
      seen.update(loss=config.loss.name)
      or {"final": {f"eval/{k}": 0.0 for k in ("accuracy", "nll", "ece", "brier")}}
    ),
  )
  assert cli.main(["run", QUICK, "loss.name=h5_cwd_losses:my_loss", "--no-progress"]) == 0
  assert seen["loss"] == "h5_cwd_losses:my_loss"


@pytest.mark.tpu
def test_cli_prints_nothing_but_its_own_lines_on_a_host_without_tpu(tmp_path):
  """With the `tpu` extra installed, a fresh `xent-jax` process starting JAX on a CPU host prints
  no libtpu warnings (they used to come before every command's output)."""
  import os  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel

  shutil.copytree(ROOT / "experiments" / "results" / "digits_quick", tmp_path / "quick")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "JAX_PLATFORMS"))}
  env.pop("ALLOW_MULTIPLE_LIBTPU_LOAD", None)
  done = subprocess.run(
    [sys.executable, "-m", "xent_jax.cli", "report", str(tmp_path / "quick")],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr
  assert done.stderr == ""
  assert done.stdout.startswith("wrote ")
