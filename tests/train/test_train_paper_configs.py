"""The MNIST-1D paper-protocol configs through the real entry point, shrunk to 10 steps."""

import csv
import pathlib

import pytest

from xent_jax.cli import main
from xent_jax.train import logs

CONFIGS = pathlib.Path(__file__).parents[2] / "configs"
# Batches that the tests' 8 fake devices divide (the configs' 100 and 500 need 1, 2, 4 or 5).
SHRINK = (
  "train.batch_size=80",
  "train.eval_batch_size=200",
  "train.num_steps=10",
  "train.eval_every=5",
  "train.checkpoint_every=0",
  "compare.seeds=[0]",
  "--no-progress",
)

pytestmark = pytest.mark.slow


def _variants(workdir: pathlib.Path) -> set[str]:
  with (workdir / "table.csv").open() as f:
    return {row["variant"] for row in csv.DictReader(f)}


def test_paper_protocol_compares_the_four_models(tmp_path):
  """Every model of the grid trains, the CNN in its im2col form."""
  workdir = tmp_path / "paper"
  args = ["compare", str(CONFIGS / "mnist1d_paper.yaml"), "model.conv=im2col", "--workdir"]
  assert main([*args, str(workdir), *SHRINK]) == 0
  models = ("linear", "mnist1d_mlp", "mnist1d_cnn", "mnist1d_gru")
  for model in models:
    rows = logs.read_metrics(workdir / f"name={model}__cross_entropy" / "seed_0")
    assert [row["step"] for row in rows] == [5, 10]
  assert len(_variants(workdir)) == len(models)


def test_paper_protocol_runs_one_model(tmp_path):
  workdir = tmp_path / "run"
  args = ["run", str(CONFIGS / "mnist1d_paper.yaml"), "model.name=linear", "--workdir"]
  assert main([*args, str(workdir), *SHRINK]) == 0
  assert logs.read_summary(workdir)["final"]["eval/accuracy"] > 0.0


def test_label_noise_paper_protocol_compares_losses(tmp_path):
  workdir = tmp_path / "noise"
  args = [
    "compare",
    str(CONFIGS / "mnist1d_label_noise_paper.yaml"),
    "compare.grid={data.label_noise: [0.4]}",
    "compare.variants=[{name: generalized_ce, hparams: {q: 0.7}, label: gce}]",
    "--workdir",
    str(workdir),
  ]
  assert main([*args, *SHRINK]) == 0
  assert _variants(workdir) == {"label_noise=0.4__gce"}
