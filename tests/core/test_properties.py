"""Property-based tests: random shapes and option combinations against the float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import xent_jax
from tests import _reference as ref

# Each example compiles afresh (new shapes and options), so keep the counts small.
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
FEW = settings(max_examples=8, deadline=None, derandomize=True)


@st.composite
def problems(draw):
  """A random (logits, labels, options) problem with any batch rank and class axis."""
  batch = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2))
  num_classes = draw(st.integers(2, 9))
  axis_pos = draw(st.integers(0, len(batch)))
  shape = tuple(batch[:axis_pos]) + (num_classes,) + tuple(batch[axis_pos:])
  axis = draw(st.sampled_from([axis_pos, axis_pos - len(shape)]))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  scale = draw(st.sampled_from([0.1, 3.0, 30.0]))
  logits = (scale * rng.standard_normal(shape)).astype(np.float32)
  batch_shape = tuple(batch)

  options = {"axis": axis}
  label_kind = draw(st.sampled_from(["int", "dense"]))
  if label_kind == "int":
    labels = rng.integers(0, num_classes, size=batch_shape).astype(np.int32)
    ignore_index = draw(st.sampled_from([-100, -1, 0]))
    options["ignore_index"] = ignore_index
    if draw(st.booleans()):
      labels = np.where(rng.random(batch_shape) < 0.3, ignore_index, labels).astype(np.int32)
  else:
    raw = rng.gamma(draw(st.sampled_from([0.2, 1.0])), size=shape) + 1e-12
    labels = (raw / raw.sum(axis=axis, keepdims=True)).astype(np.float32)
  if draw(st.booleans()):
    options["weight"] = rng.uniform(0.1, 3.0, size=num_classes).astype(np.float32)
  options["label_smoothing"] = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0]))
  options["smoothing"] = draw(st.sampled_from(["uniform", "t5x"]))
  options["z_loss"] = draw(st.sampled_from([0.0, 1e-4, 0.1]))
  options["logit_softcap"] = draw(st.sampled_from([None, 1.0, 30.0]))
  if draw(st.booleans()):
    options["where"] = rng.random(batch_shape) > 0.3
  reduction = draw(st.sampled_from(["none", "sum", "mean"]))
  return logits, labels, options, reduction


def _call(logits, labels, options, reduction, **extra):
  jopts = {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in options.items()}
  return xent_jax.cross_entropy(
    jnp.asarray(logits), jnp.asarray(labels), reduction=reduction, **jopts, **extra
  )


@SETTINGS
@given(problems())
def test_matches_reference(problem):
  logits, labels, options, reduction = problem
  # Jitted: each example has new shapes, and eagerly each primitive would compile on its own
  # (about 20 programs an example); the eager path at random shapes is the test below.
  loss = jax.jit(lambda x, y: _call(x, y, options, reduction))
  got = np.asarray(loss(jnp.asarray(logits), jnp.asarray(labels)), np.float64)
  want = ref.cross_entropy(logits, labels, reduction=reduction, **options)
  assert got.shape == np.shape(want)
  np.testing.assert_allclose(got, want, rtol=5e-5, atol=5e-5)


@FEW
@given(problems())
def test_gradient_matches_reference(problem):
  logits, labels, options, reduction = problem
  reduction = "sum" if reduction == "none" else reduction
  grad = jax.jit(jax.grad(lambda x: _call(x, labels, options, reduction)))(jnp.asarray(logits))
  want = ref.cross_entropy_grad(logits, labels, reduction=reduction, **options)
  np.testing.assert_allclose(np.asarray(grad, np.float64), want, rtol=1e-4, atol=2e-5)


@FEW
@given(problems())
def test_shift_invariance_and_nonnegativity(problem):
  logits, labels, options, _ = problem
  # Without z-loss or softcap, adding a constant to every logit of an example changes nothing.
  options = dict(options, z_loss=0.0, logit_softcap=None)
  base = np.asarray(_call(logits, labels, options, "none"))
  shifted = np.asarray(_call(logits + np.float32(7.0), labels, options, "none"))
  np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-4)
  # With non-negative weights: uniform CE >= 0, and T5X CE >= 0 when unweighted (a KL divergence).
  if options["smoothing"] == "uniform" or "weight" not in options:
    assert np.all(base >= -1e-5)
