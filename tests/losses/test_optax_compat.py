"""The optax drop-ins equal optax (values and gradients) and the float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import xent_jax
from tests import _reference as ref

RTOL, ATOL = 1e-5, 1e-6


def _logits(seed, shape, scale=2.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _int_labels(seed, shape, num_classes):
  return jnp.asarray(
    np.random.default_rng(seed + 1).integers(0, num_classes, size=shape), jnp.int32
  )


def _probs(seed, shape, axis=-1):
  raw = np.random.default_rng(seed + 2).gamma(0.6, size=shape)
  return jnp.asarray(raw / raw.sum(axis=axis, keepdims=True), jnp.float32)


def _close(a, b, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(
    np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol
  )


def _assert_same_value_and_grad(ours, theirs, *args):
  """Per-example values and the gradient of their sum agree; returns ours' values. Both
  functions, values and gradients, in one jitted program (each compiled program costs more here
  than its work, and eagerly each primitive would compile on its own)."""

  def values_and_grads(*a):
    return [(f(*a), jax.grad(lambda *b, f=f: f(*b).sum())(*a)) for f in (ours, theirs)]

  (value, grad), (want_value, want_grad) = jax.jit(values_and_grads)(*args)
  _close(value, want_value)
  _close(grad, want_grad)
  return value


# --------------------------------------------- softmax_cross_entropy_with_integer_labels


INT_AXIS_CASES = [
  ((6, 9), -1),
  ((2, 3, 9), -1),
  ((9, 4), 0),
  ((2, 3, 4, 5), (2, 3)),
  ((2, 3, 4, 5), (3, 1)),
]


def _class_count(shape, axis):
  axes = (axis,) if isinstance(axis, int) else axis
  return int(np.prod([shape[a] for a in axes]))


def _batch(shape, axis):
  axes = (axis,) if isinstance(axis, int) else axis
  axes = {a % len(shape) for a in axes}
  return tuple(d for i, d in enumerate(shape) if i not in axes)


@pytest.mark.parametrize("shape,axis", INT_AXIS_CASES)
def test_integer_labels_match_optax(shape, axis):
  logits = _logits(0, shape)
  labels = _int_labels(0, _batch(shape, axis), _class_count(shape, axis))
  ours = lambda x: xent_jax.softmax_cross_entropy_with_integer_labels(x, labels, axis)
  theirs = lambda x: optax.losses.softmax_cross_entropy_with_integer_labels(x, labels, axis)
  value = _assert_same_value_and_grad(ours, theirs, logits)
  _close(value, ref.optax_integer_cross_entropy(logits, labels, axis=axis))


def _per_logit_where(rng, shape, axis, labels, include_label):
  """Random per-logit mask in the logits' layout, forcing each label's class in or out."""
  axes = (axis,) if isinstance(axis, int) else axis
  axes = tuple(a % len(shape) for a in axes)
  batch_axes = tuple(a for a in range(len(shape)) if a not in axes)
  labels = np.asarray(labels)
  flat = rng.random(labels.shape + (_class_count(shape, axis),)) > 0.3
  np.put_along_axis(flat, labels[..., None], include_label, axis=-1)
  flat = flat.reshape(labels.shape + tuple(shape[a] for a in axes))
  return jnp.asarray(flat.transpose(np.argsort(batch_axes + axes)))


@pytest.mark.parametrize("shape,axis", INT_AXIS_CASES)
@pytest.mark.parametrize("per", ["example", "logit"])
def test_integer_labels_with_where_match_optax(shape, axis, per):
  rng = np.random.default_rng(5)
  logits = _logits(1, shape)
  labels = _int_labels(1, _batch(shape, axis), _class_count(shape, axis))
  if per == "example":
    where = jnp.asarray(rng.random(_batch(shape, axis)) > 0.3)
  else:
    where = _per_logit_where(rng, shape, axis, labels, include_label=True)
  ours = lambda x: xent_jax.softmax_cross_entropy_with_integer_labels(x, labels, axis, where)
  theirs = lambda x: optax.losses.softmax_cross_entropy_with_integer_labels(x, labels, axis, where)
  value = _assert_same_value_and_grad(ours, theirs, logits)
  _close(value, ref.optax_integer_cross_entropy(logits, labels, axis=axis, where=where))


@pytest.mark.parametrize("shape,axis", [((6, 9), -1), ((2, 3, 4, 5), (2, 3))])
def test_integer_labels_with_where_excluding_the_label_class_match_optax(shape, axis):
  """optax still subtracts the (masked) label logit from the masked normalizer: so must we."""
  rng = np.random.default_rng(6)
  logits = _logits(2, shape)
  labels = _int_labels(2, _batch(shape, axis), _class_count(shape, axis))
  where = _per_logit_where(rng, shape, axis, labels, include_label=False)
  ours = lambda x: xent_jax.softmax_cross_entropy_with_integer_labels(x, labels, axis, where)
  theirs = lambda x: optax.losses.softmax_cross_entropy_with_integer_labels(x, labels, axis, where)
  value = _assert_same_value_and_grad(ours, theirs, logits)
  _close(value, ref.optax_integer_cross_entropy(logits, labels, axis=axis, where=where))


def test_integer_labels_where_excluding_every_class_gives_zero():
  logits = _logits(2, (3, 5))
  labels = _int_labels(2, (3,), 5)
  where = jnp.asarray(np.array([[True] * 5, [False] * 5, [True, False, True, False, True]]))
  ours = xent_jax.softmax_cross_entropy_with_integer_labels(logits, labels, where=where)
  theirs = optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels, where=where)
  assert float(ours[1]) == 0.0
  _close(ours, theirs)
  grad = jax.grad(
    lambda x: xent_jax.softmax_cross_entropy_with_integer_labels(x, labels, where=where).sum()
  )(logits)
  assert np.all(np.isfinite(np.asarray(grad))) and np.all(np.asarray(grad)[1] == 0.0)


@pytest.mark.parametrize("shape,axis", [((6, 9), -1), ((9, 4), 0), ((2, 3, 4, 5), (2, 3))])
@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_integer_label_smoothing_equals_optax_one_hot_path(shape, axis, eps):
  logits = _logits(3, shape)
  num_classes = _class_count(shape, axis)
  labels = _int_labels(3, _batch(shape, axis), num_classes)
  ours = lambda x: xent_jax.softmax_cross_entropy_with_integer_labels(
    x, labels, axis, label_smoothing=eps
  )

  def theirs(x):
    # optax's recipe: smooth a one-hot over the (flattened) class axes.
    axes = (axis,) if isinstance(axis, int) else axis
    axes = tuple(a % x.ndim for a in axes)
    batch_axes = tuple(a for a in range(x.ndim) if a not in axes)
    flat = x.transpose(batch_axes + axes).reshape(labels.shape + (num_classes,))
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), eps)
    return optax.losses.softmax_cross_entropy(flat, targets)

  value = _assert_same_value_and_grad(ours, theirs, logits)
  _close(value, ref.optax_integer_cross_entropy(logits, labels, axis=axis, label_smoothing=eps))


def test_integer_label_smoothing_with_per_example_where():
  logits = _logits(4, (6, 8))
  labels = _int_labels(4, (6,), 8)
  where = jnp.asarray(np.array([True, False, True, True, False, True]))
  ours = xent_jax.softmax_cross_entropy_with_integer_labels(
    logits, labels, -1, where, label_smoothing=0.2
  )
  targets = optax.smooth_labels(jax.nn.one_hot(labels, 8), 0.2)
  theirs = optax.losses.softmax_cross_entropy(logits, targets, where=where)
  _close(ours, theirs)
  _close(ours, ref.optax_integer_cross_entropy(logits, labels, where=where, label_smoothing=0.2))


def test_integer_label_smoothing_zero_is_exactly_optax():
  logits = _logits(5, (4, 6))
  labels = _int_labels(5, (4,), 6)
  _close(
    xent_jax.softmax_cross_entropy_with_integer_labels(logits, labels, label_smoothing=0.0),
    optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels),
    rtol=1e-6,
  )


def test_integer_labels_jit_and_bf16():
  logits = _logits(6, (4, 6))
  labels = _int_labels(6, (4,), 6)
  f = jax.jit(xent_jax.softmax_cross_entropy_with_integer_labels, static_argnums=2)
  _close(
    f(logits, labels, -1), optax.losses.softmax_cross_entropy_with_integer_labels(logits, labels)
  )
  low = logits.astype(jnp.bfloat16)
  out = xent_jax.softmax_cross_entropy_with_integer_labels(low, labels)
  assert out.dtype == jnp.float32
  _close(out, ref.optax_integer_cross_entropy(low.astype(jnp.float32), labels), rtol=1e-5)


# ---------------------------------------------------------------------- softmax_cross_entropy


@pytest.mark.parametrize("shape,axis", [((5, 7), -1), ((2, 3, 7), -1), ((7, 4), 0), ((2, 7, 3), 1)])
def test_dense_labels_match_optax(shape, axis):
  logits = _logits(7, shape)
  labels = _probs(7, shape, axis)
  ours = lambda x, y: xent_jax.softmax_cross_entropy(x, y, axis)
  theirs = lambda x, y: optax.losses.softmax_cross_entropy(x, y, axis)
  _assert_same_value_and_grad(ours, theirs, logits, labels)
  # Gradients w.r.t. the targets too (distillation from a trained teacher).
  g_ours = jax.jit(jax.grad(lambda y: ours(logits, y).sum()))(labels)
  g_theirs = jax.jit(jax.grad(lambda y: theirs(logits, y).sum()))(labels)
  _close(g_ours, g_theirs)
  _close(ours(logits, labels), ref.dense_softmax_cross_entropy(logits, labels, axis=axis))


@pytest.mark.parametrize("per", ["example", "logit"])
def test_dense_labels_with_where_match_optax(per):
  rng = np.random.default_rng(8)
  logits = _logits(8, (5, 6))
  labels = _probs(8, (5, 6))
  where = jnp.asarray(rng.random((5,) if per == "example" else (5, 6)) > 0.3)
  ours = lambda x: xent_jax.softmax_cross_entropy(x, labels, -1, where)
  theirs = lambda x: optax.losses.softmax_cross_entropy(x, labels, -1, where)
  value = _assert_same_value_and_grad(ours, theirs, logits)
  _close(value, ref.dense_softmax_cross_entropy(logits, labels, where=where))


def test_dense_label_smoothing_equals_smoothing_the_targets():
  logits = _logits(9, (5, 6))
  labels = _probs(9, (5, 6))
  ours = lambda x: xent_jax.softmax_cross_entropy(x, labels, label_smoothing=0.3)
  theirs = lambda x: optax.losses.softmax_cross_entropy(x, optax.smooth_labels(labels, 0.3))
  _assert_same_value_and_grad(ours, theirs, logits)


@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_softmax_cross_entropy_integer_labels_equal_one_hot(eps):
  logits = _logits(10, (3, 4, 6))
  labels = _int_labels(10, (3, 4), 6)
  from_int = xent_jax.softmax_cross_entropy(logits, labels, label_smoothing=eps)
  from_dense = xent_jax.softmax_cross_entropy(
    logits, jax.nn.one_hot(labels, 6), label_smoothing=eps
  )
  _close(from_int, from_dense)
  _close(
    from_int,
    optax.losses.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(labels, 6), eps)),
  )


def test_dense_negative_infinity_with_zero_mass_is_finite():
  logits = np.array([[0.5, -np.inf, 1.0, -np.inf], [2.0, 0.0, -np.inf, -1.0]], np.float32)
  labels = np.array([[0.3, 0.0, 0.7, 0.0], [0.0, 1.0, 0.0, 0.0]], np.float32)
  ours = lambda x: xent_jax.softmax_cross_entropy(x, jnp.asarray(labels))
  value = ours(jnp.asarray(logits))
  grad = jax.grad(lambda x: ours(x).sum())(jnp.asarray(logits))
  assert np.all(np.isfinite(np.asarray(value)))
  assert np.all(np.isfinite(np.asarray(grad)))
  _close(value, ref.dense_softmax_cross_entropy(logits, labels))
  # Gradient: softmax(x) - q (a -inf class has probability 0 and no mass: gradient 0).
  p = np.exp(ref.log_softmax(logits))
  _close(grad, p - labels)
  # Integer labels with -inf on other classes are finite as well.
  int_labels = np.array([2, 1], np.int32)
  int_value = xent_jax.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(int_labels))
  assert np.all(np.isfinite(np.asarray(int_value)))
  _close(int_value, ref.cross_entropy(logits, int_labels, reduction="none"))


def test_dense_negative_infinity_with_target_mass_is_inf_as_optax_safe():
  """Mass on a ``-inf`` logit: an infinite loss, as optax's ``safe_softmax_cross_entropy`` (and
  its ``SafeSoftmaxCrossEntropyTest.test_batched`` row), never a large finite number; rows where the
  ``-inf`` logit has no mass stay finite and equal it."""
  logits = np.array(
    [[-np.inf, 0.0, 0.0], [-np.inf, 0.0, 0.0], [1.0, -np.inf, 3.0], [0.5, 1.5, -2.0]], np.float32
  )
  labels = np.array(
    [[0.4, 0.3, 0.3], [0.0, 0.5, 0.5], [0.2, 0.1, 0.7], [0.2, 0.3, 0.5]], np.float32
  )
  safe = np.asarray(optax.losses.safe_softmax_cross_entropy(logits, labels))
  np.testing.assert_array_equal(np.isinf(safe), [True, False, True, False])
  for value in (
    xent_jax.softmax_cross_entropy(jnp.asarray(logits), jnp.asarray(labels)),
    xent_jax.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), reduction="none"),
    xent_jax.cross_entropy(
      jnp.asarray(logits), jnp.asarray(labels), reduction="none", class_weight=jnp.ones(3)
    ),
  ):
    value = np.asarray(value)
    np.testing.assert_array_equal(value[[0, 2]], np.inf)
    _close(value[[1, 3]], safe[[1, 3]])


# ----------------------------------------------------------------------------- smooth_labels


@pytest.mark.parametrize("axis", [-1, 0])
@pytest.mark.parametrize("with_where", [False, True])
def test_smooth_labels_match_optax(axis, with_where):
  rng = np.random.default_rng(11)
  labels = jax.nn.one_hot(_int_labels(11, (4,), 6), 6, axis=axis)
  where = jnp.asarray(rng.random(labels.shape) > 0.3) if with_where else None
  ours = xent_jax.smooth_labels(labels, 0.2, axis=axis, where=where)
  theirs = optax.smooth_labels(labels, 0.2, axis=axis, where=where)
  _close(ours, theirs, rtol=1e-6)
  _close(ours, ref.smooth_labels(labels, 0.2, axis=axis, where=where), rtol=1e-6)


def test_smooth_labels_traced_alpha_and_grad():
  labels = jax.nn.one_hot(jnp.array([0, 2]), 3)
  f = jax.jit(lambda a: xent_jax.smooth_labels(labels, a))
  _close(f(0.3), optax.smooth_labels(labels, 0.3), rtol=1e-6)
  g = jax.grad(lambda a: xent_jax.smooth_labels(labels, a).sum())(0.3)
  _close(g, jax.grad(lambda a: optax.smooth_labels(labels, a).sum())(0.3))


# ------------------------------------------------------------------- poly_loss_cross_entropy


@pytest.mark.parametrize("epsilon", [2.0, -1.0])
@pytest.mark.parametrize("shape,axis", [((5, 6), -1), ((6, 3), 0)])
def test_poly_loss_matches_optax(epsilon, shape, axis):
  logits = _logits(12, shape)
  labels = _probs(12, shape, axis)
  ours = lambda x: xent_jax.poly_loss_cross_entropy(x, labels, epsilon=epsilon, axis=axis)
  theirs = lambda x: optax.losses.poly_loss_cross_entropy(x, labels, epsilon=epsilon, axis=axis)
  value = _assert_same_value_and_grad(ours, theirs, logits)
  _close(value, ref.poly_loss_cross_entropy(logits, labels, epsilon=epsilon, axis=axis))


def test_poly_loss_with_where_matches_optax():
  rng = np.random.default_rng(13)
  logits = _logits(13, (5, 6))
  labels = _probs(13, (5, 6))
  where = jnp.asarray(rng.random((5, 6)) > 0.3)
  ours = xent_jax.poly_loss_cross_entropy(logits, labels, where=where)
  theirs = optax.losses.poly_loss_cross_entropy(logits, labels, where=where)
  _close(ours, theirs)
  _close(ours, ref.poly_loss_cross_entropy(logits, labels, where=where))


def test_poly_loss_epsilon_zero_is_cross_entropy():
  logits = _logits(14, (5, 6))
  labels = _probs(14, (5, 6))
  _close(
    xent_jax.poly_loss_cross_entropy(logits, labels, epsilon=0.0),
    xent_jax.softmax_cross_entropy(logits, labels),
  )


def test_drop_ins_pass_optax_style_gradient_checks_in_both_modes():
  """optax's test_gradient runs check_grads(order=1) in forward and reverse mode."""
  rng = np.random.default_rng(21)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(4, 5)))
    y = jnp.asarray([0, 1, 4, 2])
    q = jax.nn.softmax(jnp.asarray(rng.normal(size=(4, 5))))
    calls = [
      lambda a: xent_jax.softmax_cross_entropy_with_integer_labels(a, y),
      lambda a: xent_jax.softmax_cross_entropy_with_integer_labels(a, y, label_smoothing=0.1),
      lambda a: xent_jax.softmax_cross_entropy(a, q),
      lambda a: xent_jax.poly_loss_cross_entropy(a, q, epsilon=2.0),
    ]
    for call in calls:  # jitted: eagerly, each primitive of each evaluation compiles on its own
      check_grads(jax.jit(call), (x,), order=1, modes=("fwd", "rev"))
