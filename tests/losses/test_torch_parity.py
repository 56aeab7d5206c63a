"""``xent_jax.cross_entropy(axis=1)`` equals ``torch.nn.functional.cross_entropy`` (values, grads).

Runs only when torch is installed (the ``test`` extra pins a CPU build).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xent_jax

torch = pytest.importorskip("torch")

NUM_CLASSES = 5
SHAPES = {"NxC": (6, NUM_CLASSES), "NxCxd1xd2": (2, NUM_CLASSES, 3, 2)}
IGNORE_INDEX = -100

INT_CASES = list(
  itertools.product(SHAPES, [False, True], [False, True], ["none", "sum", "mean"], [0.0, 0.1])
)
PROB_CASES = list(itertools.product(SHAPES, [False, True], ["none", "sum", "mean"], [0.0, 0.1]))


def _inputs(shape_name, target_kind, ignore, seed):
  rng = np.random.default_rng(seed)
  shape = SHAPES[shape_name]
  logits = (2.0 * rng.standard_normal(shape)).astype(np.float32)
  batch = (shape[0],) + shape[2:]
  if target_kind == "int":
    target = rng.integers(0, NUM_CLASSES, size=batch).astype(np.int64)
    if ignore:
      flat = target.reshape(-1)
      flat[1::3] = IGNORE_INDEX
  else:
    raw = rng.gamma(0.7, size=shape)
    target = (raw / raw.sum(axis=1, keepdims=True)).astype(np.float32)
  weight = rng.uniform(0.2, 2.0, size=NUM_CLASSES).astype(np.float32)
  cotangent = rng.standard_normal(batch).astype(np.float32)
  return logits, target, weight, cotangent


def _torch_value_and_grad(logits, target, weight, reduction, label_smoothing, cotangent):
  x = torch.tensor(logits, requires_grad=True)
  t = torch.tensor(target)
  w = None if weight is None else torch.tensor(weight)
  out = torch.nn.functional.cross_entropy(
    x, t, weight=w, ignore_index=IGNORE_INDEX, reduction=reduction, label_smoothing=label_smoothing
  )
  if reduction == "none":
    (out * torch.tensor(cotangent)).sum().backward()
  else:
    out.backward()
  return out.detach().numpy(), x.grad.numpy()


def _jax_value_and_grad(logits, target, weight, reduction, label_smoothing, cotangent):
  labels = jnp.asarray(target.astype(np.int32)) if target.dtype.kind == "i" else jnp.asarray(target)
  w = None if weight is None else jnp.asarray(weight)

  def f(x):
    return xent_jax.cross_entropy(
      x,
      labels,
      axis=1,
      class_weight=w,
      ignore_index=IGNORE_INDEX,
      reduction=reduction,
      label_smoothing=label_smoothing,
    )

  value, vjp_fn = jax.vjp(f, jnp.asarray(logits))
  cot = jnp.asarray(cotangent) if reduction == "none" else jnp.ones((), jnp.float32)
  (grad,) = vjp_fn(cot)
  return np.asarray(value), np.asarray(grad)


def _compare(logits, target, weight, reduction, label_smoothing, cotangent):
  t_value, t_grad = _torch_value_and_grad(
    logits, target, weight, reduction, label_smoothing, cotangent
  )
  j_value, j_grad = _jax_value_and_grad(
    logits, target, weight, reduction, label_smoothing, cotangent
  )
  assert j_value.shape == t_value.shape
  np.testing.assert_allclose(j_value, t_value, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(j_grad, t_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape_name,weighted,ignore,reduction,label_smoothing", INT_CASES)
def test_integer_targets_match_torch(shape_name, weighted, ignore, reduction, label_smoothing):
  logits, target, weight, cotangent = _inputs(shape_name, "int", ignore, seed=len(shape_name))
  _compare(logits, target, weight if weighted else None, reduction, label_smoothing, cotangent)


@pytest.mark.parametrize("shape_name,weighted,reduction,label_smoothing", PROB_CASES)
def test_probability_targets_match_torch(shape_name, weighted, reduction, label_smoothing):
  logits, target, weight, cotangent = _inputs(shape_name, "prob", False, seed=7)
  _compare(logits, target, weight if weighted else None, reduction, label_smoothing, cotangent)


@pytest.mark.parametrize("weighted", [False, True])
def test_mean_over_only_ignored_targets_is_zero_where_torch_is_nan(weighted):
  logits, target, weight, cotangent = _inputs("NxCxd1xd2", "int", False, seed=3)
  target = np.full_like(target, IGNORE_INDEX)
  w = weight if weighted else None
  t_value, _ = _torch_value_and_grad(logits, target, w, "mean", 0.1, cotangent)
  assert np.isnan(t_value)  # PyTorch's documented behaviour that we deliberately differ from
  j_value, j_grad = _jax_value_and_grad(logits, target, w, "mean", 0.1, cotangent)
  assert j_value == 0.0
  assert np.all(np.isfinite(j_grad)) and np.all(j_grad == 0.0)
  # 'sum' and 'none' agree with torch (zeros).
  for reduction in ("sum", "none"):
    _compare(logits, target, w, reduction, 0.1, cotangent)


def test_jitted_matches_torch():
  logits, target, weight, _ = _inputs("NxCxd1xd2", "int", True, seed=5)
  t_value, t_grad = _torch_value_and_grad(logits, target, weight, "mean", 0.1, None)
  f = jax.jit(
    jax.value_and_grad(
      lambda x, y, w: xent_jax.cross_entropy(x, y, axis=1, class_weight=w, label_smoothing=0.1)
    )
  )
  j_value, j_grad = f(
    jnp.asarray(logits), jnp.asarray(target.astype(np.int32)), jnp.asarray(weight)
  )
  np.testing.assert_allclose(j_value, t_value, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(j_grad, t_grad, rtol=1e-5, atol=1e-6)
