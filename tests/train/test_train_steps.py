"""Models and objectives (shapes, fused LM loss = logits path, bf16), and the calibration row."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from xent_jax.train.config import LossConfig, ModelConfig
from xent_jax.train.models import build_model
from xent_jax.train.steps import calibration_row, make_objective


def _build(config, **kwargs):
  """build_model under one jit (eager initialisation dispatches one compile per parameter)."""
  return nnx.jit(lambda: build_model(config, **kwargs))()


def _lm(dtype="float32"):
  config = ModelConfig(
    name="transformer", model_dim=32, num_layers=1, num_heads=4, mlp_ratio=2, dtype=dtype
  )
  return _build(config, input_shape=(12,), num_classes=40, seed=0)


@nnx.jit
def _apply(model, x):
  return model(x)


@pytest.mark.parametrize("name,input_shape", [("mlp", (64,)), ("cnn", (8, 8, 1))])
def test_classifier_shapes(name, input_shape):
  model = _build(
    ModelConfig(name=name, hidden_dims=[16], channels=[4, 8]),
    input_shape=input_shape,
    num_classes=10,
    seed=0,
  )
  assert _apply(model, jnp.zeros((5,) + input_shape)).shape == (5, 10)


def test_lm_is_causal():
  model = _lm()
  ids_BxL = jax.random.randint(jax.random.key(1), (2, 12), 0, 40)
  changed_BxL = ids_BxL.at[:, 7].set((ids_BxL[:, 7] + 1) % 40)
  logits, changed = _apply(model, ids_BxL), _apply(model, changed_BxL)
  assert logits.shape == (2, 12, 40)
  np.testing.assert_array_equal(logits[:, :7], changed[:, :7])
  assert not np.allclose(logits[:, 7:], changed[:, 7:])


def test_fused_objective_equals_logits_objective():
  """linear_cross_entropy on hidden states = cross_entropy on the logits: value and gradients."""
  hparams = {"label_smoothing": 0.1, "z_loss": 1e-3}
  model = _lm()
  ids_BxL = jax.random.randint(jax.random.key(2), (3, 12), 0, 40)
  labels_BxL = jnp.roll(ids_BxL, -1, axis=1)
  results = []
  for fused in (False, True):
    objective = make_objective(LossConfig(name="cross_entropy", hparams=hparams, fused=fused))
    loss, grads = nnx.jit(nnx.value_and_grad(objective))(model, ids_BxL, labels_BxL)
    results.append((loss, nnx.to_pure_dict(grads)))
  (loss_plain, grads_plain), (loss_fused, grads_fused) = results
  np.testing.assert_allclose(loss_fused, loss_plain, rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads_fused, grads_plain
  )


def test_registry_objective_matches_its_loss_on_logits():
  """The objective is the registry loss, mean-reduced over all positions."""
  model = _build(ModelConfig(name="mlp", hidden_dims=[8]), input_shape=(6,), num_classes=5, seed=0)
  x_BxF = jax.random.normal(jax.random.key(0), (7, 6))
  y_B = jnp.arange(7) % 5
  objective = make_objective(LossConfig(name="focal", hparams={"gamma": 2.0}))
  # Independent float64 reference of the focal loss (Lin et al., 2017) on the model's logits.
  logits = np.asarray(_apply(model, x_BxF), np.float64)
  log_p = (
    logits
    - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
    - logits.max(1, keepdims=True)
  )
  log_p_y = log_p[np.arange(7), np.asarray(y_B)]
  expected = np.mean(-((1 - np.exp(log_p_y)) ** 2) * log_p_y)
  np.testing.assert_allclose(nnx.jit(objective)(model, x_BxF, y_B), expected, rtol=1e-5)


def test_bf16_compute_keeps_float32_parameters():
  model = _lm("bfloat16")
  ids_BxL = jnp.zeros((2, 12), jnp.int32)
  assert _apply(model, ids_BxL).dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  for fused in (False, True):
    loss = nnx.jit(make_objective(LossConfig(fused=fused)))(model, ids_BxL, ids_BxL)
    assert loss.dtype == jnp.float32 and np.isfinite(loss)


def _softmax64(logits):
  z = np.asarray(logits, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _binned_gaps(conf, hit, bins):
  """(weights |B|/n, |acc - conf|) of the non-empty bins given each example's bin index."""
  used = np.unique(bins)
  weights = np.array([np.mean(bins == b) for b in used])
  gaps = np.array([abs(hit[bins == b].mean() - conf[bins == b].mean()) for b in used])
  return weights, gaps


def _width_bins(conf, num_bins):
  return np.clip(np.ceil(conf * num_bins).astype(int) - 1, 0, num_bins - 1)  # right-closed


def _reference_calibration(logits, labels, num_bins):
  """Float64 NumPy ECE, adaptive ECE (numpy.array_split bins), classwise ECE and MCE."""
  p = _softmax64(logits)
  conf, hit = p.max(-1), (p.argmax(-1) == labels).astype(np.float64)
  weights, gaps = _binned_gaps(conf, hit, _width_bins(conf, num_bins))
  order = np.argsort(conf, kind="stable")
  mass_bins = np.empty(len(conf), int)
  for b, idx in enumerate(np.array_split(order, num_bins)):
    mass_bins[idx] = b
  adaptive = np.sum(np.prod(_binned_gaps(conf, hit, mass_bins), axis=0))
  classwise = np.mean(
    [
      np.sum(
        np.prod(
          _binned_gaps(p[:, j], (labels == j).astype(float), _width_bins(p[:, j], num_bins)), axis=0
        )
      )
      for j in range(p.shape[1])
    ]
  )
  return {
    "ece": np.sum(weights * gaps),
    "adaptive_ece": adaptive,
    "classwise_ece": classwise,
    "mce": gaps.max(),
  }


def test_calibration_row_fits_the_temperature_on_the_holdout_only():
  """T from the held-out logits (float64 grid search of the NLL); test metrics before and after."""
  rng = np.random.default_rng(0)

  def sample(n):  # logits 3x too sharp for the labels they generate
    logits = 3.0 * rng.normal(size=(n, 4)).astype(np.float32)
    labels = np.array([rng.choice(4, p=q) for q in _softmax64(logits / 3.0)])
    return logits, labels

  holdout, test = sample(3000), sample(500)
  row, counts_ts = calibration_row(*holdout, *test, num_bins=10)

  grid_T = np.exp(np.linspace(np.log(0.5), np.log(10.0), 4001))
  nll_T = [
    -np.mean(np.log(_softmax64(holdout[0] / t)[np.arange(3000), holdout[1]])) for t in grid_T
  ]
  expected_T = grid_T[np.argmin(nll_T)]
  assert 2.5 < expected_T < 3.5
  np.testing.assert_allclose(row["eval/temperature"], expected_T, rtol=2e-3)

  before = _reference_calibration(*test, 10)
  after = _reference_calibration(test[0] / row["eval/temperature"], test[1], 10)
  for name in ("adaptive_ece", "classwise_ece", "mce"):
    np.testing.assert_allclose(row[f"eval/{name}"], before[name], rtol=1e-4, atol=1e-6)
  for name in ("ece", "adaptive_ece", "classwise_ece", "mce"):
    np.testing.assert_allclose(row[f"eval/{name}_ts"], after[name], rtol=1e-4, atol=1e-6)
  p_ts = _softmax64(test[0] / row["eval/temperature"])
  np.testing.assert_allclose(
    row["eval/nll_ts"], -np.mean(np.log(p_ts[np.arange(500), test[1]])), rtol=1e-5
  )
  assert after["ece"] < before["ece"]  # scaling by the true temperature helps
  conf_ts = p_ts.max(-1)
  np.testing.assert_array_equal(
    counts_ts["count"], np.bincount(_width_bins(conf_ts, 10), minlength=10)
  )


def test_calibration_row_without_holdout_has_no_temperature():
  logits = np.random.default_rng(1).normal(size=(50, 3)).astype(np.float32)
  labels = np.arange(50) % 3
  row, counts_ts = calibration_row(
    np.zeros((0, 3), np.float32), np.zeros(0, int), logits, labels, num_bins=5
  )
  assert row["eval/temperature"] is None and counts_ts is None
  assert not any(key.endswith("_ts") for key in row)
  np.testing.assert_allclose(
    row["eval/mce"], _reference_calibration(logits, labels, 5)["mce"], rtol=1e-5
  )
