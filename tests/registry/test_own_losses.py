"""A researcher's own loss, named by import path in a config: validated, optimized, reported."""

import csv
import itertools
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xent_jax.cli import main
from xent_jax.train.config import ConfigError, LossConfig, ModelConfig, load_config
from xent_jax.train.models import build_model
from xent_jax.train.steps import make_objective

ROOT = pathlib.Path(__file__).parents[2]
QUICK = str(ROOT / "configs" / "digits_quick.yaml")
LOSS_MODULE = '''
import xent_jax


def my_loss(logits, labels, *, scale=1.0, axis=-1, weight=None, ignore_index=-100,
            reduction="mean", where=None):
  """Cross-entropy times ``scale``."""
  return scale * xent_jax.cross_entropy(logits, labels, axis=axis, weight=weight,
                                        ignore_index=ignore_index, reduction=reduction, where=where)
'''
_COUNTER = itertools.count()


@pytest.fixture(name="module")
def _module(tmp_path, monkeypatch):
  """A fresh module holding ``my_loss``, importable from a temporary directory on sys.path."""
  name = f"own_losses_{next(_COUNTER)}"
  (tmp_path / f"{name}.py").write_text(LOSS_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  return name


def test_config_takes_a_loss_by_import_path(module):
  config = load_config(QUICK, (f"loss.name={module}:my_loss", "loss.hparams.scale=2.0"))
  assert config.loss.name == f"{module}:my_loss" and config.loss.hparams == {"scale": 2.0}


@pytest.mark.parametrize(
  "name,hparams,words",
  [
    ("{module}:not_there", "", ["not_there"]),
    ("no_such_package_h5.losses:my_loss", "", ["no_such_package_h5"]),
    ("{module}:my_loss", "loss.hparams.sacle=2.0", ["sacle"]),
  ],
)
def test_bad_import_paths_fail_at_load_naming_the_problem(module, name, hparams, words):
  overrides = (f"loss.name={name.format(module=module)}",) + ((hparams,) if hparams else ())
  with pytest.raises(ConfigError, match="config key 'loss'") as err:
    load_config(QUICK, overrides)
  for word in words:
    assert word in str(err.value)


def test_objective_is_the_users_loss(module):
  """The training objective is the user's function: 2 x mean cross-entropy (float64 NumPy)."""
  model = nnx.jit(
    lambda: build_model(
      ModelConfig(name="mlp", hidden_dims=[8]), input_shape=(5,), num_classes=4, seed=0
    )
  )()
  x_BxF = jnp.asarray(np.random.default_rng(0).normal(size=(6, 5)), jnp.float32)
  y_B = jnp.arange(6) % 4
  objective = make_objective(LossConfig(name=f"{module}:my_loss", hparams={"scale": 2.0}))
  logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, x_BxF), np.float64)
  shifted = logits - logits.max(1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
  expected = 2.0 * -np.mean(log_p[np.arange(6), np.asarray(y_B)])
  np.testing.assert_allclose(nnx.jit(objective)(model, x_BxF, y_B), expected, rtol=1e-5)


@pytest.mark.slow
def test_own_loss_compares_against_a_registered_one(module, tmp_path):
  variants = (
    f"compare.variants=[{{name: cross_entropy}}, "
    f"{{name: '{module}:my_loss', hparams: {{scale: 0.5}}, label: mine}}]"
  )
  args = [
    "compare",
    QUICK,
    "model.hidden_dims=[16]",
    "train.batch_size=32",
    "train.num_steps=20",
    "train.eval_every=10",
    "train.eval_batch_size=128",
    "train.checkpoint_every=0",
    "compare.seeds=[0]",
    variants,
    "--workdir",
    str(tmp_path / "cmp"),
    "--no-progress",
  ]
  assert main(args) == 0
  with (tmp_path / "cmp" / "table.csv").open() as f:
    assert {row["variant"] for row in csv.DictReader(f)} == {"cross_entropy", "mine"}
