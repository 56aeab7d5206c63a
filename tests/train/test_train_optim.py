"""Optimizers from the config: weight decay is applied by every optimizer, never ignored."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xent_jax.train.config import OptimConfig
from xent_jax.train.optim import build_optimizer

RNG = np.random.default_rng(0)
PARAMS = {
  "w": RNG.normal(size=(3, 4)).astype(np.float32),
  "b": RNG.normal(size=4).astype(np.float32),
}
GRADS = {
  "w": RNG.normal(size=(3, 4)).astype(np.float32),
  "b": RNG.normal(size=4).astype(np.float32),
}


def _one_step(**optim):
  config = OptimConfig(schedule="constant", learning_rate=0.1, **optim)
  tx = build_optimizer(config, num_steps=10)
  params = jax.tree.map(jnp.asarray, PARAMS)
  updates, _ = tx.update(jax.tree.map(jnp.asarray, GRADS), tx.init(params), params)
  return jax.tree.map(lambda p, u: np.asarray(p + u, np.float64), params, updates)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_weight_decay_is_coupled_l2(momentum):
  """p - lr (g + wd p): PyTorch's SGD(weight_decay=); the first momentum step is the same."""
  got = _one_step(name="sgd", momentum=momentum, weight_decay=0.05)
  without = _one_step(name="sgd", momentum=momentum, weight_decay=0.0)
  for key in PARAMS:
    p, g = PARAMS[key].astype(np.float64), GRADS[key].astype(np.float64)
    np.testing.assert_allclose(got[key], p - 0.1 * (g + 0.05 * p), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(without[key], p - 0.1 * g, rtol=1e-6, atol=1e-7)
    assert np.all(got[key] != without[key])


def test_adam_weight_decay_is_coupled_l2():
  """Adam on g + wd p (first step: m_hat = g', v_hat = g'^2), unlike adamw's decoupled decay."""
  got = _one_step(name="adam", weight_decay=0.5)
  decoupled = _one_step(name="adamw", weight_decay=0.5)
  for key in PARAMS:
    p, g = PARAMS[key].astype(np.float64), GRADS[key].astype(np.float64)
    coupled = g + 0.5 * p
    np.testing.assert_allclose(
      got[key], p - 0.1 * coupled / (np.abs(coupled) + 1e-8), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
      decoupled[key], p - 0.1 * (g / (np.abs(g) + 1e-8) + 0.5 * p), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("name,decay", [("adam", 0.0), ("sgd", 0.0), ("adamw", 1e-4)])
def test_unset_weight_decay_is_the_optimizers_default(name, decay):
  unset = _one_step(name=name)
  explicit = _one_step(name=name, weight_decay=decay)
  for key in PARAMS:
    np.testing.assert_array_equal(unset[key], explicit[key])
