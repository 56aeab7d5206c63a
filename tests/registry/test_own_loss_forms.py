"""Losses named by import path in the forms researchers write: ``**kwargs``, or plain per-example
functions whose masking, class weights and reduction the registry applies; and the refusals."""

import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import xent_jax
from xent_jax.train.config import ConfigError, ModelConfig, load_config
from xent_jax.train.models import build_model
from xent_jax.train.steps import make_objective

QUICK = str(pathlib.Path(__file__).parents[2] / "configs" / "digits_quick.yaml")
LOSS_MODULE = '''
import jax
import jax.numpy as jnp
import xent_jax


def powered_nll(logits, labels, margin=1.0, *, power):
  """(margin * -log p_y) ** power per example."""
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return (margin * -jnp.take_along_axis(log_p, labels[..., None], axis=-1)[..., 0]) ** power


def scaled_ce(logits, labels, scale=2.0, **kwargs):
  """scale times cross-entropy, the conventions through **kwargs."""
  return scale * xent_jax.cross_entropy(logits, labels, **kwargs)


def some_conventions(logits, labels, *, scale=1.0, reduction="mean"):
  return scale * xent_jax.cross_entropy(logits, labels, reduction=reduction)


def no_labels(logits, *, scale=1.0):
  return scale * logits.sum(-1)


def positional_only_hparam(logits, labels, scale, /):
  return scale * logits.sum(-1)


def returns_a_scalar(logits, labels):
  return logits.sum()
'''
_COUNTER = itertools.count()
RNG = np.random.default_rng(0)
LOGITS = RNG.normal(size=(7, 5)).astype(np.float32)
LABELS = np.array([0, 4, -100, 2, 1, 3, 2], np.int32)
WHERE = np.array([1, 1, 1, 0, 1, 1, 1], bool)
CLASS_WEIGHT = np.array([0.5, 1.0, 2.0, 1.5, 0.25], np.float32)


@pytest.fixture(name="module")
def _module(tmp_path, monkeypatch):
  name = f"own_loss_forms_{next(_COUNTER)}"
  (tmp_path / f"{name}.py").write_text(LOSS_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  return name


def _nll64(logits, labels):
  x = np.asarray(logits, np.float64)
  log_p = x - x.max(1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
  return -log_p[np.arange(len(labels)), np.where(labels < 0, 0, labels)]


def _reference(margin, power, *, class_weight=None, where=None, reduction="mean"):
  """The plain loss masked, weighted and reduced by hand in float64 (PyTorch's weighted mean)."""
  per_example = (margin * _nll64(LOGITS, LABELS)) ** power
  weight = (LABELS != -100).astype(np.float64)
  if where is not None:
    weight *= where
  if class_weight is not None:
    weight *= np.asarray(class_weight, np.float64)[np.where(LABELS < 0, 0, LABELS)]
  if reduction == "none":
    return per_example * weight
  total = np.sum(per_example * weight)
  return total if reduction == "sum" else total / weight.sum()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_plain_loss_is_masked_weighted_and_reduced(module, reduction):
  loss_fn = xent_jax.get_loss(f"{module}:powered_nll", margin=1.5, power=2.0)
  assert loss_fn.hparams == {"margin": 1.5, "power": 2.0}
  got = loss_fn(LOGITS, LABELS, class_weight=CLASS_WEIGHT, where=WHERE, reduction=reduction)
  want = _reference(1.5, 2.0, class_weight=CLASS_WEIGHT, where=WHERE, reduction=reduction)
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
  np.testing.assert_allclose(loss_fn(LOGITS, LABELS), _reference(1.5, 2.0), rtol=2e-6)


def test_plain_loss_takes_the_class_axis_anywhere(module):
  loss_fn = xent_jax.get_loss(f"{module}:powered_nll", power=1.0)
  got = loss_fn(LOGITS.T, LABELS, axis=0)
  np.testing.assert_allclose(got, _reference(1.0, 1.0), rtol=2e-6)


def test_plain_loss_gradient(module):
  loss_fn = xent_jax.get_loss(f"{module}:powered_nll", margin=0.5, power=2.0)
  f = jax.jit(lambda x: loss_fn(x, LABELS, class_weight=CLASS_WEIGHT, where=WHERE))
  check_grads(f, (jnp.asarray(LOGITS),), order=1, modes=("rev", "fwd"), eps=1e-2, atol=2e-2)
  # The masked row (label -100) and the row outside `where` get no gradient.
  grad = jax.grad(f)(jnp.asarray(LOGITS))
  np.testing.assert_array_equal(grad[2], 0.0)
  np.testing.assert_array_equal(grad[3], 0.0)


def test_kwargs_loss_gets_the_conventions(module):
  loss_fn = xent_jax.get_loss(f"{module}:scaled_ce", scale=3.0)
  got = loss_fn(LOGITS, LABELS, class_weight=CLASS_WEIGHT, where=WHERE, reduction="sum")
  want = 3.0 * _reference(1.0, 1.0, class_weight=CLASS_WEIGHT, where=WHERE, reduction="sum")
  np.testing.assert_allclose(got, want, rtol=2e-6)
  check_grads(
    jax.jit(lambda x: loss_fn(x, LABELS)),
    (jnp.asarray(LOGITS),),
    order=1,
    modes=("rev",),
    eps=1e-2,
    atol=2e-2,
  )


@pytest.mark.parametrize(
  "fn,hparams,want",
  [("powered_nll", {"margin": 2.0, "power": 1.0}, 2.0), ("scaled_ce", {"scale": 0.5}, 0.5)],
)
def test_config_trains_on_each_form(module, fn, hparams, want):
  """Via the config path: the objective is the mean over the batch, by hand in float64."""
  overrides = [f"loss.name={module}:{fn}"] + [f"loss.hparams.{k}={v}" for k, v in hparams.items()]
  config = load_config(QUICK, tuple(overrides))
  model = nnx.jit(
    lambda: build_model(ModelConfig(name="linear"), input_shape=(5,), num_classes=4, seed=0)
  )()
  x_BxF = jnp.asarray(RNG.normal(size=(6, 5)), jnp.float32)
  y_B = jnp.arange(6) % 4
  logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, x_BxF))
  expected = want * np.mean(_nll64(logits, np.asarray(y_B)))
  got = nnx.jit(make_objective(config.loss))(model, x_BxF, y_B)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize(
  "fn,words",
  [
    ("some_conventions", ["lacks", "axis", "class_weight"]),
    ("no_labels", ["lacks"]),
    ("positional_only_hparam", ["lacks"]),
  ],
)
def test_other_signatures_are_refused_in_one_line(module, fn, words):
  with pytest.raises(ValueError) as err:
    xent_jax.get_loss(f"{module}:{fn}")
  assert "\n" not in str(err.value)
  for word in words:
    assert word in str(err.value)
  with pytest.raises(ConfigError, match=r"config key 'loss'.*lacks"):
    load_config(QUICK, (f"loss.name={module}:{fn}",))


def test_plain_loss_refusals_name_the_problem(module):
  with pytest.raises(ValueError, match=r"needs a value for hyper-parameter\(s\) \['power'\]"):
    xent_jax.get_loss(f"{module}:powered_nll")
  with pytest.raises(ValueError, match="has no hyper-parameter"):
    xent_jax.get_loss(f"{module}:powered_nll", power=1.0, gamma=2.0)
  with pytest.raises(ValueError, match=r"per-example values of shape \(1,\).*got shape \(\)"):
    xent_jax.get_loss(f"{module}:returns_a_scalar")
  loss_fn = xent_jax.get_loss(f"{module}:powered_nll", power=1.0)
  probs = jax.nn.one_hot(np.maximum(LABELS, 0), 5)
  with pytest.raises(ValueError, match="`class_weight` needs integer labels"):
    loss_fn(LOGITS, probs, class_weight=CLASS_WEIGHT)
