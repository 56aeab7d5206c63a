"""Tests of ``xent_jax.cross_entropy`` against the float64 NumPy reference in ``_reference.py``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import xent_jax
from tests import _reference as ref
from tests._compiled import large_non_input_residuals

NUM_CLASSES = 7

# (name, logits shape, class axis)
LAYOUTS = [
  ("batch1d", (6, NUM_CLASSES), -1),
  ("batch2d", (3, 4, NUM_CLASSES), -1),
  ("torch_axis1", (2, NUM_CLASSES, 3, 2), 1),
]

# Option sets exercised on every layout and label kind. "weight" / "where" are filled in by
# `_materialize` because their shapes depend on the layout.
OPTION_SETS = {
  "plain": {},
  "weight_ignore_where": {"weight": True, "ignore": True, "where": True},
  "smooth_uniform": {"label_smoothing": 0.1},
  "smooth_t5x": {"label_smoothing": 0.2, "smoothing": "t5x"},
  "zloss_softcap": {"z_loss": 0.05, "logit_softcap": 2.5},
  "everything": {
    "weight": True,
    "ignore": True,
    "label_smoothing": 0.15,
    "z_loss": 0.01,
    "logit_softcap": 3.0,
    "where": True,
  },
  "everything_t5x": {
    "weight": True,
    "ignore": True,
    "label_smoothing": 0.15,
    "smoothing": "t5x",
    "z_loss": 0.01,
    "logit_softcap": 3.0,
  },
}


def _batch_shape(shape, axis):
  return tuple(d for i, d in enumerate(shape) if i != axis % len(shape))


def make_inputs(seed, shape, axis, label_kind, *, ignore=False, scale=3.0):
  """Random float32 logits and labels (integer ids, or dense probabilities on the class axis)."""
  rng = np.random.default_rng(seed)
  logits = (scale * rng.standard_normal(shape)).astype(np.float32)
  batch = _batch_shape(shape, axis)
  num_classes = shape[axis]
  if label_kind == "int":
    labels = rng.integers(0, num_classes, size=batch).astype(np.int32)
    if ignore:
      flat = labels.reshape(-1)
      flat[::3] = -100
      labels = flat.reshape(batch)
  else:
    raw = rng.gamma(0.5, size=shape)
    labels = (raw / raw.sum(axis=axis, keepdims=True)).astype(np.float32)
  return logits, labels


def _materialize(options, shape, axis, label_kind, seed=0):
  """Turns the boolean placeholders of an option set into arrays for this layout."""
  rng = np.random.default_rng(seed + 1000)
  out = dict(options)
  ignore = out.pop("ignore", False) and label_kind == "int"
  if out.get("weight"):
    out["weight"] = rng.uniform(0.2, 2.0, size=shape[axis]).astype(np.float32)
  else:
    out.pop("weight", None)
  if out.get("where"):
    where = rng.random(_batch_shape(shape, axis)) > 0.3
    where.reshape(-1)[0] = True
    out["where"] = where
  else:
    out.pop("where", None)
  return out, ignore


def _case(layout, label_kind, option_name, seed=0):
  _, shape, axis = layout
  options, ignore = _materialize(OPTION_SETS[option_name], shape, axis, label_kind, seed)
  logits, labels = make_inputs(seed, shape, axis, label_kind, ignore=ignore)
  return logits, labels, dict(options, axis=axis)


def _jnp_options(options):
  return {k: (jnp.asarray(v) if isinstance(v, np.ndarray) else v) for k, v in options.items()}


def _assert_close(actual, expected, rtol=2e-5, atol=2e-6):
  actual = np.asarray(actual, dtype=np.float64)
  expected = np.asarray(expected, dtype=np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("option_name", list(OPTION_SETS))
@pytest.mark.parametrize("label_kind", ["int", "dense"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_values_match_reference(layout, label_kind, option_name):
  logits, labels, options = _case(layout, label_kind, option_name)
  # One jitted program for the three reductions (eagerly, each primitive of each would compile
  # on its own for these shapes and options); eager calls are tested below and in test_properties.
  losses = jax.jit(
    lambda x, y: {
      r: xent_jax.cross_entropy(x, y, reduction=r, **_jnp_options(options)) for r in ref.REDUCTIONS
    }
  )(jnp.asarray(logits), jnp.asarray(labels))
  for reduction, got in losses.items():
    want = ref.cross_entropy(logits, labels, reduction=reduction, **options)
    assert got.dtype == jnp.float32, reduction
    _assert_close(got, want)


@pytest.mark.parametrize("option_name", ["plain", "everything", "everything_t5x"])
@pytest.mark.parametrize("label_kind", ["int", "dense"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_gradients_match_reference_fp32(layout, label_kind, option_name):
  logits, labels, options = _case(layout, label_kind, option_name, seed=3)
  for reduction in ("sum", "mean"):
    grad = jax.jit(
      jax.grad(
        lambda x, reduction=reduction: xent_jax.cross_entropy(
          x, jnp.asarray(labels), reduction=reduction, **_jnp_options(options)
        )
      )
    )(jnp.asarray(logits))
    want = ref.cross_entropy_grad(logits, labels, reduction=reduction, **options)
    assert grad.dtype == jnp.float32
    _assert_close(grad, want, rtol=1e-4, atol=1e-6)


def test_reference_gradient_matches_finite_differences():
  """Guards the reference itself: its analytic gradient equals central differences."""
  logits, labels, options = _case(LAYOUTS[0], "int", "everything", seed=5)
  options.pop("axis")
  logits = logits.astype(np.float64)
  grad = ref.cross_entropy_grad(logits, labels, **options)
  numeric = np.zeros_like(logits)
  h = 1e-6
  for idx in np.ndindex(logits.shape):
    up, down = logits.copy(), logits.copy()
    up[idx] += h
    down[idx] -= h
    numeric[idx] = (
      ref.cross_entropy(up, labels, **options) - ref.cross_entropy(down, labels, **options)
    ) / (2 * h)
  np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


GRAD_CHECK_OPTIONS = [
  ("int", "everything", "mean"),
  ("int", "everything_t5x", "sum"),
  ("int", "weight_ignore_where", "none"),
  ("dense", "everything", "mean"),
  ("dense", "everything_t5x", "none"),
]


@pytest.mark.parametrize("label_kind,option_name,reduction", GRAD_CHECK_OPTIONS)
def test_check_grads_float64(label_kind, option_name, reduction):
  logits, labels, options = _case(LAYOUTS[2], label_kind, option_name, seed=7)
  with jax.enable_x64(True):
    jopts = {
      k: (jnp.asarray(v, jnp.float64) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v)
      for k, v in _jnp_options(options).items()
    }
    jlabels = jnp.asarray(labels, jnp.float64) if label_kind == "dense" else jnp.asarray(labels)

    def loss(x):
      return xent_jax.cross_entropy(x, jlabels, reduction=reduction, **jopts)

    x64 = jnp.asarray(logits, jnp.float64)
    assert loss(x64).dtype == jnp.float64
    check_grads(jax.jit(loss), (x64,), order=1, modes=["rev"])
    # float64 values match the float64 reference tightly.
    want = ref.cross_entropy(logits, labels, reduction=reduction, **options)
    np.testing.assert_allclose(np.asarray(loss(x64)), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("label_kind", ["int", "dense"])
def test_jit_and_vmap_agree(label_kind):
  logits, labels, options = _case(LAYOUTS[1], label_kind, "everything")
  options = _jnp_options(options)
  x, y = jnp.asarray(logits), jnp.asarray(labels)

  def per_example(x, y, where):
    return xent_jax.cross_entropy(x, y, reduction="none", **dict(options, where=where))

  def mean(x, y, where):
    return xent_jax.cross_entropy(x, y, reduction="mean", **dict(options, where=where))

  where = options["where"]
  eager = per_example(x, y, where)
  np.testing.assert_allclose(jax.jit(per_example)(x, y, where), eager, rtol=1e-6, atol=1e-7)
  # vmap over the leading batch dim: each slice is an independent call.
  vmapped = jax.vmap(per_example)(x, y, where)
  np.testing.assert_allclose(vmapped, eager, rtol=1e-6, atol=1e-7)
  vmapped_mean = jax.jit(jax.vmap(mean))(x, y, where)
  looped = np.array([mean(x[i], y[i], where[i]) for i in range(x.shape[0])])
  np.testing.assert_allclose(vmapped_mean, looped, rtol=1e-6, atol=1e-7)
  # grad under jit and vmap equals eager grad.
  g_eager = jax.grad(lambda x: mean(x, y, where))(x)
  g_jit = jax.jit(jax.grad(lambda x: mean(x, y, where)))(x)
  np.testing.assert_allclose(g_jit, g_eager, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("label_kind", ["int", "dense"])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_return_lse_is_logsumexp(label_kind, softcap):
  logits, labels, _ = _case(LAYOUTS[2], label_kind, "plain")
  loss, lse = xent_jax.cross_entropy(
    jnp.asarray(logits),
    jnp.asarray(labels),
    axis=1,
    reduction="sum",
    logit_softcap=softcap,
    return_lse=True,
  )
  want_loss, want_lse = ref.cross_entropy(
    logits, labels, axis=1, reduction="sum", logit_softcap=softcap, return_lse=True
  )
  assert lse.shape == _batch_shape(logits.shape, 1)
  _assert_close(loss, want_loss)
  _assert_close(lse, want_lse)


def test_ignore_index_custom_value_and_all_ignored_mean_is_zero():
  logits, labels, _ = _case(LAYOUTS[0], "int", "plain")
  # A class id used as ignore_index: examples with that label are dropped.
  labels = labels.copy()
  labels[:3] = 3
  got = xent_jax.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), ignore_index=3)
  _assert_close(got, ref.cross_entropy(logits, labels, ignore_index=3))
  per_example = xent_jax.cross_entropy(
    jnp.asarray(logits), jnp.asarray(labels), ignore_index=3, reduction="none"
  )
  assert np.all(np.asarray(per_example)[:3] == 0.0)
  # Every target ignored: mean is 0 (PyTorch would give NaN) and the gradient is finite (zero).
  all_ignored = jnp.full(labels.shape, -1, jnp.int32)
  f = lambda x: xent_jax.cross_entropy(x, all_ignored, ignore_index=-1)
  value, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(logits))
  assert float(value) == 0.0
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_where_all_false_mean_is_zero_with_finite_gradient():
  logits, labels, _ = _case(LAYOUTS[0], "dense", "plain")
  where = jnp.zeros(labels.shape[:-1], bool)
  f = lambda x: xent_jax.cross_entropy(x, jnp.asarray(labels), where=where)
  value, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(logits))
  assert float(value) == 0.0
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"z_loss": 1e-3}])
def test_low_precision_logits_accumulate_in_float32(dtype, options):
  rng = np.random.default_rng(11)
  # Many classes so that low-precision accumulation would be visibly wrong.
  logits = (4.0 * rng.standard_normal((16, 1024))).astype(np.float32)
  labels = rng.integers(0, 1024, size=16).astype(np.int32)
  low = jnp.asarray(logits).astype(dtype)
  rounded = np.asarray(low.astype(jnp.float32))  # the same values, exactly, in float32
  loss_low = xent_jax.cross_entropy(low, jnp.asarray(labels), reduction="none", **options)
  loss_f32 = xent_jax.cross_entropy(
    jnp.asarray(rounded), jnp.asarray(labels), reduction="none", **options
  )
  assert loss_low.dtype == jnp.float32
  np.testing.assert_allclose(loss_low, loss_f32, rtol=1e-3)
  np.testing.assert_allclose(
    loss_low, ref.cross_entropy(rounded, labels, reduction="none", **options), rtol=1e-3
  )
  grad = jax.jit(jax.grad(lambda x: xent_jax.cross_entropy(x, jnp.asarray(labels), **options)))(low)
  assert grad.dtype == dtype
  assert np.all(np.isfinite(np.asarray(grad.astype(jnp.float32))))
  want_grad = ref.cross_entropy_grad(rounded, labels, **options)
  np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), want_grad, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("label_kind", ["int", "dense"])
@pytest.mark.parametrize(
  "options", [{}, {"label_smoothing": 0.1, "weight": True}, {"z_loss": 1e-4}]
)
def test_huge_logits_are_finite_and_exact(label_kind, options):
  rng = np.random.default_rng(12)
  logits = rng.choice(np.array([-1e4, 1e4, 0.0, 5e3], np.float32), size=(6, 5))
  if label_kind == "int":
    labels = rng.integers(0, 5, size=6).astype(np.int32)
  else:
    labels = rng.dirichlet(np.ones(5), size=6).astype(np.float32)
  options = dict(options)
  if options.pop("weight", False):
    options["weight"] = rng.uniform(0.5, 2.0, size=5).astype(np.float32)
  f = lambda x: xent_jax.cross_entropy(x, jnp.asarray(labels), **_jnp_options(options))
  value, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(logits))
  assert np.isfinite(float(value))
  assert np.all(np.isfinite(np.asarray(grad)))
  _assert_close(value, ref.cross_entropy(logits, labels, **options), rtol=1e-5)
  # The backward pass recomputes softmax from the stored float32 logsumexp, whose spacing near
  # 1e4 is ~1e-3: relative errors of that order in the probabilities are inherent, not a bug.
  _assert_close(grad, ref.cross_entropy_grad(logits, labels, **options), rtol=2e-3, atol=5e-5)


@pytest.mark.parametrize("label_kind", ["int", "dense"])
@pytest.mark.parametrize(
  "options", [{}, {"z_loss": 1e-2}, {"logit_softcap": 5.0}, {"weight": True}]
)
def test_negative_infinity_on_non_target_classes(label_kind, options):
  rng = np.random.default_rng(13)
  logits = rng.standard_normal((5, 6)).astype(np.float32)
  labels_int = rng.integers(0, 6, size=5).astype(np.int32)
  # -inf everywhere except the target and one more class per row.
  keep = (labels_int + 1) % 6
  mask = (np.arange(6) == labels_int[:, None]) | (np.arange(6) == keep[:, None])
  logits = np.where(mask, logits, -np.inf).astype(np.float32)
  # Probability labels put mass only on the finite classes.
  labels = labels_int if label_kind == "int" else np.where(mask, 0.5, 0.0).astype(np.float32)
  options = dict(options)
  if options.pop("weight", False):
    options["weight"] = rng.uniform(0.5, 2.0, size=6).astype(np.float32)
  f = lambda x: xent_jax.cross_entropy(x, jnp.asarray(labels), **_jnp_options(options))
  value, grad = jax.jit(jax.value_and_grad(f))(jnp.asarray(logits))
  assert np.isfinite(float(value))
  assert np.all(np.isfinite(np.asarray(grad)))
  _assert_close(value, ref.cross_entropy(logits, labels, **options))
  _assert_close(grad, ref.cross_entropy_grad(logits, labels, **options), rtol=1e-5, atol=1e-7)


def test_residual_check_detects_a_softmax_residual():
  """The residual check below can fail: plain autodiff of log-softmax keeps a [N, V] array."""
  rng = np.random.default_rng(14)
  logits = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 64, size=8))

  def naive(x):
    return -jnp.take_along_axis(jax.nn.log_softmax(x), labels[:, None], axis=-1).mean()

  assert large_non_input_residuals(naive, logits, [logits])


@pytest.mark.parametrize(
  "label_kind,options",
  [
    ("int", {}),
    ("int", {"label_smoothing": 0.1, "z_loss": 1e-3}),
    ("int", {"label_smoothing": 0.1, "smoothing": "t5x", "weight": True, "ignore_index": 0}),
    ("dense", {}),
    ("dense", {"label_smoothing": 0.1}),
  ],
)
def test_vjp_keeps_no_vocab_sized_residual(label_kind, options):
  rng = np.random.default_rng(15)
  logits = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
  if label_kind == "int":
    labels = jnp.asarray(rng.integers(0, 64, size=8))
  else:
    labels = jnp.asarray(rng.dirichlet(np.ones(64), size=8), jnp.float32)
  options = dict(options)
  if options.pop("weight", False):
    options["weight"] = jnp.asarray(rng.uniform(0.5, 2.0, size=64), jnp.float32)
  inputs = [logits, labels] + ([options["weight"]] if "weight" in options else [])
  fn = lambda x: xent_jax.cross_entropy(x, labels, **options)
  extra = large_non_input_residuals(fn, logits, inputs)
  assert not extra, [(leaf.shape, leaf.dtype) for leaf in extra]


def test_vjp_keeps_no_float32_copy_of_bf16_logits():
  rng = np.random.default_rng(16)
  logits = jnp.asarray(rng.standard_normal((8, 64)), jnp.bfloat16)
  labels = jnp.asarray(rng.integers(0, 64, size=8))
  fn = lambda x: xent_jax.cross_entropy(x, labels)
  extra = large_non_input_residuals(fn, logits, [logits])
  assert not extra, [(leaf.shape, leaf.dtype) for leaf in extra]


def test_vjp_with_softcap_keeps_at_most_one_vocab_sized_array():
  rng = np.random.default_rng(17)
  logits = jnp.asarray(rng.standard_normal((8, 64)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 64, size=8))
  fn = lambda x: xent_jax.cross_entropy(x, labels, logit_softcap=2.0)
  extra = large_non_input_residuals(fn, logits, [logits])
  assert len(extra) <= 1, [(leaf.shape, leaf.dtype) for leaf in extra]


# -------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("smoothing", ["uniform", "t5x"])
@pytest.mark.parametrize("reduction,weighted", [("none", True), ("sum", True), ("mean", False)])
def test_integer_labels_equal_one_hot_labels(smoothing, reduction, weighted):
  logits, labels, _ = _case(LAYOUTS[2], "int", "plain", seed=21)
  one_hot = jax.nn.one_hot(labels, NUM_CLASSES, axis=1)
  rng = np.random.default_rng(21)
  weight = jnp.asarray(rng.uniform(0.3, 2.0, NUM_CLASSES), jnp.float32) if weighted else None
  kwargs = dict(
    axis=1, label_smoothing=0.2, smoothing=smoothing, reduction=reduction, class_weight=weight
  )
  from_int = xent_jax.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), **kwargs)
  from_dense = xent_jax.cross_entropy(jnp.asarray(logits), one_hot, **kwargs)
  np.testing.assert_allclose(from_int, from_dense, rtol=1e-5, atol=1e-6)


def test_t5x_smoothing_minimum_loss_is_zero():
  eps, k = 0.1, NUM_CLASSES
  labels = np.array([0, 3, 6], np.int32)
  q = np.where(np.arange(k) == labels[:, None], 1 - eps, eps / (k - 1))
  optimum = jnp.asarray(np.log(q) + 1.7, jnp.float32)  # any per-row shift of log q is optimal
  loss = xent_jax.cross_entropy(
    optimum, jnp.asarray(labels), label_smoothing=eps, smoothing="t5x", reduction="none"
  )
  np.testing.assert_allclose(loss, 0.0, atol=2e-6)
  # It is the minimum: nearby logits give a larger loss, and the uniform convention (which keeps
  # the entropy of the target) gives a positive loss at its own optimum.
  rng = np.random.default_rng(22)
  for _ in range(3):
    moved = optimum + 0.1 * rng.standard_normal(optimum.shape).astype(np.float32)
    assert np.all(
      np.asarray(
        xent_jax.cross_entropy(
          moved, jnp.asarray(labels), label_smoothing=eps, smoothing="t5x", reduction="none"
        )
      )
      > 1e-5
    )
  q_uniform = np.where(np.arange(k) == labels[:, None], 1 - eps, 0.0) + eps / k
  uniform = xent_jax.cross_entropy(
    jnp.asarray(np.log(q_uniform), jnp.float32),
    jnp.asarray(labels),
    label_smoothing=eps,
    reduction="none",
  )
  entropy = -np.sum(q_uniform * np.log(q_uniform), axis=-1)
  np.testing.assert_allclose(uniform, entropy, rtol=1e-5)


def test_neutral_settings_equal_plain_cross_entropy():
  logits, labels, _ = _case(LAYOUTS[1], "int", "plain", seed=23)
  x, y = jnp.asarray(logits), jnp.asarray(labels)
  plain = xent_jax.cross_entropy(x, y, reduction="none")
  neutral = xent_jax.cross_entropy(
    x,
    y,
    reduction="none",
    z_loss=0.0,
    logit_softcap=None,
    label_smoothing=0.0,
    class_weight=jnp.ones(NUM_CLASSES),
    where=jnp.ones(labels.shape, bool),
  )
  np.testing.assert_allclose(neutral, plain, rtol=1e-6)
  # Plain cross-entropy is -log softmax at the label.
  want = -np.take_along_axis(ref.log_softmax(logits), labels[..., None], axis=-1)[..., 0]
  _assert_close(plain, want)
  # A huge softcap is (numerically) no softcap; smoothing convention is irrelevant at eps=0.
  _assert_close(xent_jax.cross_entropy(x, y, reduction="none", logit_softcap=1e6), want, rtol=1e-4)
  _assert_close(xent_jax.cross_entropy(x, y, reduction="none", smoothing="t5x"), want)


def test_z_loss_adds_weighted_squared_logsumexp():
  logits, labels, _ = _case(LAYOUTS[0], "int", "plain", seed=24)
  weight = np.linspace(0.5, 2.0, NUM_CLASSES).astype(np.float32)
  x, y = jnp.asarray(logits), jnp.asarray(labels)
  base = xent_jax.cross_entropy(x, y, reduction="none", class_weight=jnp.asarray(weight))
  with_z = xent_jax.cross_entropy(
    x, y, reduction="none", class_weight=jnp.asarray(weight), z_loss=0.3
  )
  lse = ref.logsumexp(logits)
  _assert_close(np.asarray(with_z) - np.asarray(base), 0.3 * weight[labels] * lse**2, rtol=1e-4)


# ----------------------------------------------------------------------- out of range


@pytest.mark.parametrize("bad_label", [NUM_CLASSES, NUM_CLASSES + 100, -1, -7])
def test_out_of_range_label_is_nan_for_that_example_only(bad_label):
  logits, labels, _ = _case(LAYOUTS[0], "int", "plain", seed=25)
  labels = labels.copy()
  labels[2] = bad_label
  labels[4] = -100  # ignored, not out of range
  loss = np.asarray(
    xent_jax.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), reduction="none")
  )
  assert np.isnan(loss[2])
  others = np.delete(np.arange(len(labels)), 2)
  assert np.all(np.isfinite(loss[others]))
  _assert_close(loss[others], ref.cross_entropy(logits, labels, reduction="none")[others])
  # A reduction over a batch holding it is NaN, never a silently wrong finite number.
  assert np.isnan(float(xent_jax.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))))
  assert np.isnan(float(jax.jit(xent_jax.cross_entropy)(jnp.asarray(logits), jnp.asarray(labels))))


def test_out_of_range_label_is_nan_with_smoothing():
  logits, labels, _ = _case(LAYOUTS[0], "int", "plain", seed=26)
  labels = labels.copy()
  labels[0] = NUM_CLASSES
  loss = np.asarray(
    xent_jax.cross_entropy(
      jnp.asarray(logits), jnp.asarray(labels), reduction="none", label_smoothing=0.1
    )
  )
  assert np.isnan(loss[0]) and np.all(np.isfinite(loss[1:]))


@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_check_labels_accepts_valid_labels(layout):
  _, shape, axis = layout
  logits, labels = make_inputs(0, shape, axis, "int", ignore=True)
  xent_jax.check_labels(jnp.asarray(logits), jnp.asarray(labels), axis=axis)


def test_check_labels_names_first_bad_position_and_value():
  logits = jnp.zeros((3, 4, NUM_CLASSES))
  labels = np.zeros((3, 4), np.int32)
  labels[2, 1] = 1234
  labels[2, 3] = 999  # a later bad value: not the one reported
  with pytest.raises(ValueError, match=r"1234") as info:
    xent_jax.check_labels(logits, jnp.asarray(labels))
  message = str(info.value)
  assert "999" not in message
  assert "(2, 1)" in message or "[2, 1]" in message or "2, 1" in message, message


def test_check_labels_negative_and_custom_ignore_index():
  logits = jnp.zeros((2, NUM_CLASSES, 5))
  labels = np.zeros((2, 5), np.int32)
  labels[0, 4] = -100  # default ignore_index: fine
  xent_jax.check_labels(logits, jnp.asarray(labels), axis=1)
  labels[1, 2] = -1
  with pytest.raises(ValueError, match=r"-1") as info:
    xent_jax.check_labels(logits, jnp.asarray(labels), axis=1)
  assert "1, 2" in str(info.value), str(info.value)
  # With ignore_index=-1 the -1 is fine but the -100 is now out of range.
  with pytest.raises(ValueError, match=r"-100"):
    xent_jax.check_labels(logits, jnp.asarray(labels), axis=1, ignore_index=-1)


def test_weight_is_the_deprecated_name_of_class_weight():
  """``weight=`` still works on the logits losses, configured losses and the vocabulary-parallel
  loss, with a DeprecationWarning; giving both names is an error naming them."""
  logits, labels, _ = _case(LAYOUTS[0], "int", "plain", seed=31)
  x, y = jnp.asarray(logits), jnp.asarray(labels)
  w = jnp.linspace(0.5, 2.0, NUM_CLASSES)
  for fn in (xent_jax.cross_entropy, xent_jax.softmax_focal_loss, xent_jax.get_loss("poly1")):
    want = fn(x, y, class_weight=w)
    with pytest.warns(DeprecationWarning, match="`weight` is renamed `class_weight`"):
      got = fn(x, y, weight=w)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(TypeError, match="give `class_weight` only"):
      fn(x, y, weight=w, class_weight=w)
  with pytest.raises(TypeError, match="unexpected keyword argument 'weights'"):
    xent_jax.cross_entropy(x, y, weights=w)
