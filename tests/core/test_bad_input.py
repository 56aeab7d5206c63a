"""Bad shapes, dtypes and options fail at trace time with a message naming the argument."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xent_jax

# Shape/dtype problems may surface as chex AssertionError, TypeError or ValueError; options as
# ValueError. Either way the message must name the argument.
SHAPE_ERRORS = (ValueError, TypeError, AssertionError)

LOGITS = jnp.zeros((4, 5), jnp.float32)
INT_LABELS = jnp.zeros((4,), jnp.int32)


def _both(fn):
  """Runs ``fn`` eagerly and under jit (errors must come at trace time, not from data)."""
  return [fn, jax.jit(fn)]


BAD_SHAPES = {
  "int labels with the wrong batch size": ("labels", LOGITS, jnp.zeros((11,), jnp.int32), {}),
  "int labels with the wrong rank": ("labels", LOGITS, jnp.zeros((4, 1, 1), jnp.int32), {}),
  "int labels shaped like the logits": ("labels", LOGITS, jnp.zeros((4, 5), jnp.int32), {}),
  "dense labels with the wrong class count": ("labels", LOGITS, jnp.zeros((4, 11)), {}),
  "dense labels with the wrong rank": ("labels", LOGITS, jnp.zeros((4, 5, 1)), {}),
  "weight of the wrong length": ("weight", LOGITS, INT_LABELS, {"weight": jnp.ones(11)}),
  "weight of the wrong rank": ("weight", LOGITS, INT_LABELS, {"weight": jnp.ones((5, 1))}),
  "where with the wrong shape": ("where", LOGITS, INT_LABELS, {"where": jnp.ones((11,), bool)}),
  "where per logit for cross_entropy of wrong shape": (
    "where",
    LOGITS,
    INT_LABELS,
    {"where": jnp.ones((4, 11), bool)},
  ),
  "torch layout with labels in the wrong layout": (
    "labels",
    jnp.zeros((2, 5, 3)),
    jnp.zeros((2, 5), jnp.int32),
    {"axis": 1},
  ),
}


@pytest.mark.parametrize("case", list(BAD_SHAPES))
def test_cross_entropy_bad_shapes_name_the_argument(case):
  name, logits, labels, kwargs = BAD_SHAPES[case]
  for fn in _both(lambda x, y: xent_jax.cross_entropy(x, y, **kwargs)):
    with pytest.raises(SHAPE_ERRORS, match=name):
      fn(logits, labels)


def test_shape_error_message_shows_the_actual_shape():
  with pytest.raises(SHAPE_ERRORS, match="labels") as info:
    xent_jax.cross_entropy(LOGITS, jnp.zeros((11,), jnp.int32))
  assert "11" in str(info.value), str(info.value)
  with pytest.raises(SHAPE_ERRORS, match="weight") as info:
    xent_jax.cross_entropy(LOGITS, INT_LABELS, class_weight=jnp.ones(11))
  assert "11" in str(info.value) and "5" in str(info.value), str(info.value)


@pytest.mark.parametrize("dtype", [jnp.bool_, jnp.complex64])
def test_labels_neither_integer_nor_float(dtype):
  for fn in _both(xent_jax.cross_entropy):
    with pytest.raises(SHAPE_ERRORS, match="labels"):
      fn(LOGITS, jnp.zeros((4,), dtype))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_non_float_logits(dtype):
  for fn in _both(xent_jax.cross_entropy):
    with pytest.raises(SHAPE_ERRORS, match="logits"):
      fn(jnp.zeros((4, 5), dtype), INT_LABELS)
  with pytest.raises(SHAPE_ERRORS, match="logits"):
    xent_jax.softmax_cross_entropy_with_integer_labels(jnp.zeros((4, 5), dtype), INT_LABELS)
  with pytest.raises(SHAPE_ERRORS, match="logits"):
    xent_jax.softmax_cross_entropy(jnp.zeros((4, 5), dtype), jnp.zeros((4, 5)))


BAD_OPTIONS = [
  ("label_smoothing", {"label_smoothing": -0.1}),
  ("label_smoothing", {"label_smoothing": 1.5}),
  ("reduction", {"reduction": "avg"}),
  ("reduction", {"reduction": "batchmean"}),
  ("smoothing", {"label_smoothing": 0.1, "smoothing": "gaussian"}),
  ("logit_softcap", {"logit_softcap": 0.0}),
  ("logit_softcap", {"logit_softcap": -3.0}),
]


@pytest.mark.parametrize(
  "name,kwargs", BAD_OPTIONS, ids=[f"{n}={list(k.values())[-1]}" for n, k in BAD_OPTIONS]
)
def test_cross_entropy_bad_options_raise_value_error(name, kwargs):
  with pytest.raises(ValueError, match=name):
    xent_jax.cross_entropy(LOGITS, INT_LABELS, **kwargs)
  with pytest.raises(ValueError, match=name):
    jax.jit(lambda x, y: xent_jax.cross_entropy(x, y, **kwargs))(LOGITS, INT_LABELS)


def test_label_smoothing_bounds_are_inclusive():
  for eps in (0.0, 1.0):
    out = xent_jax.cross_entropy(LOGITS, INT_LABELS, label_smoothing=eps)
    assert np.isfinite(float(out))


def test_axis_out_of_range_names_axis():
  with pytest.raises((ValueError, IndexError), match="axis"):
    xent_jax.cross_entropy(LOGITS, INT_LABELS, axis=2)


@pytest.mark.parametrize("eps", [-0.5, 2.0])
def test_drop_in_label_smoothing_out_of_range(eps):
  with pytest.raises(ValueError, match="label_smoothing"):
    xent_jax.softmax_cross_entropy_with_integer_labels(LOGITS, INT_LABELS, label_smoothing=eps)
  with pytest.raises(ValueError, match="label_smoothing"):
    xent_jax.softmax_cross_entropy(LOGITS, jnp.zeros((4, 5)), label_smoothing=eps)


def test_drop_in_bad_labels():
  with pytest.raises(SHAPE_ERRORS, match="labels"):
    xent_jax.softmax_cross_entropy_with_integer_labels(LOGITS, jnp.zeros((4,), jnp.float32))
  with pytest.raises(SHAPE_ERRORS, match="labels"):
    xent_jax.softmax_cross_entropy_with_integer_labels(LOGITS, jnp.zeros((11,), jnp.int32))
  with pytest.raises(SHAPE_ERRORS, match="labels"):
    xent_jax.softmax_cross_entropy(LOGITS, jnp.zeros((4, 11)))
  with pytest.raises(SHAPE_ERRORS, match="labels"):
    xent_jax.softmax_cross_entropy(LOGITS, jnp.zeros((4,), jnp.bool_))


def test_smooth_labels_and_poly_loss_reject_integer_labels():
  with pytest.raises(SHAPE_ERRORS, match="labels"):
    xent_jax.smooth_labels(jnp.zeros((4, 5), jnp.int32), 0.1)
  with pytest.raises(SHAPE_ERRORS, match="labels"):
    xent_jax.poly_loss_cross_entropy(LOGITS, jnp.zeros((4, 5), jnp.int32))


def test_check_labels_rejects_float_labels_and_bad_shape():
  with pytest.raises(SHAPE_ERRORS, match="labels"):
    xent_jax.check_labels(LOGITS, jnp.zeros((4,), jnp.float32))
  with pytest.raises(SHAPE_ERRORS, match="labels"):
    xent_jax.check_labels(LOGITS, jnp.zeros((11,), jnp.int32))
