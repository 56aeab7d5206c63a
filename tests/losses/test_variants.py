"""Tests of the cross-entropy variants against float64 NumPy references and neutral settings."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import xent_jax
from tests import _reference as base_ref
from tests import _variant_reference as ref

K = 5
RNG = np.random.default_rng(0)
LOGITS = (2.0 * RNG.normal(size=(6, K))).astype(np.float32)
INT_LABELS = np.array([0, 3, -100, 4, 1, 2], np.int32)
PROBS = RNG.dirichlet(np.ones(K), size=6).astype(np.float32)
PROBS[1] = np.eye(K)[2]  # a one-hot row: classes with q = 0 beside it
WEIGHT = np.array([0.5, 2.0, 1.0, 1.5, 0.25], np.float32)
WHERE = np.array([True, True, True, False, True, True])
ALPHA = np.array([0.25, 1.0, 0.5, 2.0, 1.0], np.float32)


def _case(name, fn, row, hparams, ref_hparams, *, on_logits=False, weighted=False, rtol=1e-5):
  return pytest.param(
    dict(
      fn=fn,
      row=row,
      hparams=hparams,
      ref_hparams=ref_hparams,
      on_logits=on_logits,
      weighted=weighted,
      rtol=rtol,
    ),
    id=name,
  )


CASES = [
  _case("focal", xent_jax.softmax_focal_loss, ref.focal, dict(gamma=2.0), dict(gamma=2.0)),
  _case(
    "focal_alpha",
    xent_jax.softmax_focal_loss,
    ref.focal,
    dict(gamma=0.5, alpha=ALPHA),
    dict(gamma=0.5, alpha=ALPHA),
  ),
  _case("poly1", xent_jax.poly1_cross_entropy, ref.poly1, dict(epsilon=1.0), dict(epsilon=1.0)),
  _case(
    "symmetric",
    xent_jax.symmetric_cross_entropy,
    ref.symmetric,
    dict(alpha=0.3, beta=0.7, log_clip=-4.0),
    dict(alpha=0.3, beta=0.7, log_clip=-4.0),
    weighted=True,
  ),
  _case("gce", xent_jax.generalized_cross_entropy, ref.generalized, dict(q=0.7), dict(q_exp=0.7)),
  _case(
    "truncated_gce",
    xent_jax.truncated_generalized_cross_entropy,
    ref.truncated,
    dict(q=0.7, k=0.3),
    dict(q_exp=0.7, k=0.3),
  ),
  _case("taylor", xent_jax.taylor_cross_entropy, ref.taylor, dict(order=3), dict(order=3)),
  _case(
    "confidence",
    xent_jax.confidence_penalty_cross_entropy,
    ref.confidence,
    dict(beta=0.3),
    dict(beta=0.3),
    weighted=True,
  ),
  _case(
    "bi_tempered_heavy_tail",
    xent_jax.bi_tempered_logistic_loss,
    ref.bi_tempered,
    dict(t1=0.8, t2=1.2, label_smoothing=0.1, num_iters=30),
    dict(t1=0.8, t2=1.2, label_smoothing=0.1),
    on_logits=True,
    weighted=True,
    rtol=1e-4,
  ),
  _case(
    "bi_tempered_finite_support",
    xent_jax.bi_tempered_logistic_loss,
    ref.bi_tempered,
    dict(t1=0.5, t2=0.8, num_iters=40),
    dict(t1=0.5, t2=0.8, label_smoothing=0.0),
    on_logits=True,
    weighted=True,
    rtol=1e-4,
  ),
]


def _reference(case, labels, **conventions):
  ref_hparams = dict(case["ref_hparams"])
  if case["weighted"]:
    ref_hparams["weighted"] = conventions.get("weight") is not None
  return ref.variant_loss(
    case["row"], LOGITS, labels, on_logits=case["on_logits"], **conventions, **ref_hparams
  )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("label_kind", ["integer", "probabilities"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_matches_float64_reference(case, label_kind, reduction):
  labels = INT_LABELS if label_kind == "integer" else PROBS
  conventions = dict(weight=WEIGHT, where=WHERE, reduction=reduction)
  loss = jax.jit(functools.partial(case["fn"], **case["hparams"], **conventions))(LOGITS, labels)
  want = _reference(case, labels, **conventions)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(loss), want, rtol=case["rtol"], atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_unweighted_defaults_match_reference(case):
  loss = case["fn"](LOGITS, INT_LABELS, **case["hparams"], reduction="none")
  np.testing.assert_allclose(
    np.asarray(loss), _reference(case, INT_LABELS, reduction="none"), rtol=case["rtol"], atol=1e-6
  )


@pytest.mark.parametrize("case", CASES)
def test_one_hot_labels_equal_integer_labels(case):
  labels = np.array([0, 3, 2, 4, 1, 2], np.int32)
  one_hot = np.eye(K, dtype=np.float32)[labels]
  for weight in (None, WEIGHT):
    by_int = case["fn"](LOGITS, labels, **case["hparams"], weight=weight, reduction="none")
    by_prob = case["fn"](LOGITS, one_hot, **case["hparams"], weight=weight, reduction="none")
    np.testing.assert_allclose(np.asarray(by_int), np.asarray(by_prob), rtol=1e-5, atol=1e-6)


NEUTRAL = [
  pytest.param(xent_jax.softmax_focal_loss, dict(gamma=0.0), 1e-6, id="focal_gamma0"),
  pytest.param(xent_jax.poly1_cross_entropy, dict(epsilon=0.0), 1e-6, id="poly1_eps0"),
  pytest.param(
    xent_jax.bi_tempered_logistic_loss, dict(t1=1.0, t2=1.0), 1e-6, id="bi_tempered_t1_t2_1"
  ),
  pytest.param(xent_jax.generalized_cross_entropy, dict(q=1e-4), 1e-3, id="gce_q_to_0"),
  pytest.param(xent_jax.taylor_cross_entropy, dict(order=200), 1e-4, id="taylor_high_order"),
  pytest.param(
    xent_jax.confidence_penalty_cross_entropy, dict(beta=0.0), 1e-6, id="confidence_beta0"
  ),
  pytest.param(
    xent_jax.symmetric_cross_entropy, dict(alpha=1.0, beta=0.0), 1e-6, id="symmetric_alpha1_beta0"
  ),
]


@pytest.mark.parametrize("fn,hparams,rtol", NEUTRAL)
@pytest.mark.parametrize("label_kind", ["integer", "probabilities"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_neutral_setting_is_cross_entropy(fn, hparams, rtol, label_kind, reduction):
  # Moderate logits keep p_y away from 0, where the Taylor series converges slowly.
  logits = 0.5 * LOGITS
  labels = INT_LABELS if label_kind == "integer" else PROBS
  conventions = dict(weight=WEIGHT, where=WHERE, reduction=reduction)
  want = xent_jax.cross_entropy(logits, labels, **conventions)
  if fn is xent_jax.bi_tempered_logistic_loss and label_kind == "probabilities":
    # t1 = t2 = 1 is the KL divergence: cross-entropy minus the target's entropy.
    entropy = -np.sum(PROBS * np.log(np.where(PROBS > 0, PROBS, 1)), axis=-1)
    want = xent_jax.cross_entropy(logits, labels, reduction="none") - entropy
    want = base_ref.reduce_loss(
      np.where(WHERE, np.asarray(want) * np.sum(PROBS * WEIGHT[None, :], axis=-1), 0),
      np.asarray(WHERE, np.float64),
      reduction,
    )
  got = fn(logits, labels, **hparams, **conventions)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=1e-6)


def test_truncated_gce_with_k0_is_gce():
  a = xent_jax.truncated_generalized_cross_entropy(LOGITS, INT_LABELS, q=0.4, k=0.0)
  b = xent_jax.generalized_cross_entropy(LOGITS, INT_LABELS, q=0.4)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_truncated_gce_has_no_gradient_below_k():
  logits = jnp.array([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
  grad = jax.grad(
    lambda x: xent_jax.truncated_generalized_cross_entropy(
      x, jnp.array([0, 0]), k=0.5, reduction="sum"
    )
  )(logits)
  assert np.all(np.asarray(grad[1]) == 0) and np.any(np.asarray(grad[0]) != 0)


# Extreme inputs: +-100 logits (p_y rounds to exactly 1 or 0 in float32) and -inf on classes the
# target does not use.
EXTREME_LOGITS = np.array(
  [
    [100.0, -100.0, -100.0, 0.0],
    [-100.0, 100.0, -np.inf, -np.inf],
    [-np.inf, 3.0, -np.inf, -100.0],
    [100.0, -100.0, 50.0, -np.inf],
  ],
  np.float32,
)
EXTREME_LABELS = np.array([0, 0, 1, 2], np.int32)
EXTREME_PROBS = np.array(
  [[0.7, 0.2, 0.1, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.3, 0.3, 0.4, 0.0]],
  np.float32,
)

ALL_VARIANTS = [
  pytest.param(xent_jax.softmax_focal_loss, dict(gamma=2.0), id="focal"),
  pytest.param(xent_jax.softmax_focal_loss, dict(gamma=0.3, alpha=0.5), id="focal_gamma_below_1"),
  pytest.param(xent_jax.poly1_cross_entropy, dict(epsilon=2.0), id="poly1"),
  pytest.param(xent_jax.symmetric_cross_entropy, {}, id="symmetric"),
  pytest.param(xent_jax.generalized_cross_entropy, dict(q=0.5), id="gce"),
  pytest.param(xent_jax.truncated_generalized_cross_entropy, {}, id="truncated_gce"),
  pytest.param(xent_jax.taylor_cross_entropy, dict(order=4), id="taylor"),
  pytest.param(xent_jax.confidence_penalty_cross_entropy, dict(beta=0.2), id="confidence"),
  pytest.param(xent_jax.bi_tempered_logistic_loss, dict(t1=0.5, t2=2.0), id="bi_tempered_t2>1"),
  pytest.param(
    xent_jax.bi_tempered_logistic_loss, dict(t1=0.5, t2=0.7, num_iters=30), id="bi_tempered_t2<1"
  ),
  pytest.param(
    xent_jax.bi_tempered_logistic_loss,
    dict(t1=1.0, t2=1.0, label_smoothing=0.1),
    id="bi_tempered_ce",
  ),
]


@pytest.mark.parametrize("fn,hparams", ALL_VARIANTS)
@pytest.mark.parametrize("labels", [EXTREME_LABELS, EXTREME_PROBS], ids=["integer", "probs"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_finite_values_and_gradients_at_extremes(fn, hparams, labels, dtype):
  # Smoothing puts target mass on the -inf classes, where an infinite loss is correct: no -inf then.
  logits = np.maximum(EXTREME_LOGITS, -100.0) if hparams.get("label_smoothing") else EXTREME_LOGITS
  logits = jnp.asarray(logits, dtype)
  loss_fn = lambda x: fn(x, labels, **hparams, reduction="none")
  loss, grad = jax.jit(lambda x: (loss_fn(x), jax.grad(lambda x: jnp.sum(loss_fn(x)))(x)))(logits)
  assert loss.dtype == jnp.float32 and grad.dtype == dtype
  assert np.all(np.isfinite(np.asarray(loss))), loss
  assert np.all(np.isfinite(np.asarray(grad, np.float32))), grad


def test_bf16_logits_are_computed_in_float32():
  logits_bf16 = jnp.asarray(LOGITS, jnp.bfloat16)
  upcast = jnp.asarray(logits_bf16, jnp.float32)
  for fn in (xent_jax.softmax_focal_loss, xent_jax.bi_tempered_logistic_loss):
    got = fn(logits_bf16, INT_LABELS, reduction="none")
    want = fn(upcast, INT_LABELS, reduction="none")
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


def test_focal_gradient_at_certain_prediction_is_zero_for_gamma_below_one():
  # p_y == 1 exactly in float32: d/dx of (1-p)^gamma * (-log p) is 0, not NaN.
  logits = jnp.array([[100.0, -100.0, -100.0]])
  grad = jax.grad(lambda x: xent_jax.softmax_focal_loss(x, jnp.array([0]), gamma=0.5))(logits)
  np.testing.assert_array_equal(np.asarray(grad), np.zeros((1, 3)))


GRAD_CASES = [
  pytest.param(xent_jax.softmax_focal_loss, dict(gamma=2.0, alpha=ALPHA), id="focal"),
  pytest.param(xent_jax.softmax_focal_loss, dict(gamma=0.5), id="focal_gamma_below_1"),
  pytest.param(xent_jax.poly1_cross_entropy, dict(epsilon=1.0), id="poly1"),
  pytest.param(xent_jax.symmetric_cross_entropy, {}, id="symmetric"),
  pytest.param(xent_jax.generalized_cross_entropy, dict(q=0.7), id="gce"),
  pytest.param(xent_jax.truncated_generalized_cross_entropy, dict(k=0.05), id="truncated_gce"),
  pytest.param(xent_jax.taylor_cross_entropy, dict(order=3), id="taylor"),
  pytest.param(xent_jax.confidence_penalty_cross_entropy, dict(beta=0.3), id="confidence"),
  # The custom gradient is the derivative of the exactly normalized loss: converge the
  # normalization so the forward pass is that loss too.
  pytest.param(
    xent_jax.bi_tempered_logistic_loss, dict(t1=0.7, t2=1.5, num_iters=60), id="bi_tempered_t2>1"
  ),
  pytest.param(
    xent_jax.bi_tempered_logistic_loss,
    dict(t1=0.5, t2=0.8, label_smoothing=0.1, num_iters=60),
    id="bi_tempered_t2<1",
  ),
]


@pytest.mark.parametrize("fn,hparams", GRAD_CASES)
@pytest.mark.parametrize("label_kind", ["integer", "probabilities"])
def test_check_grads_float64(fn, hparams, label_kind):
  with jax.enable_x64(True):
    # Logits kept apart from truncation/support kinks by the fixed seed.
    logits = jnp.asarray(LOGITS[:4], jnp.float64)
    labels = INT_LABELS[:4] if label_kind == "integer" else PROBS[:4].astype(np.float64)
    loss = jax.jit(
      lambda x: fn(x, labels, **hparams, weight=WEIGHT.astype(np.float64), reduction="mean")
    )
    assert loss(logits).dtype == jnp.float64
    check_grads(loss, (logits,), order=1, modes=["rev"])


@pytest.mark.parametrize("fn,hparams", ALL_VARIANTS)
def test_vmap_matches_per_example(fn, hparams):
  single = lambda x, y: fn(x, y, **hparams, reduction="sum")
  # One jitted program (eagerly, each primitive would compile on its own).
  per_example, mapped = jax.jit(
    lambda x, y: (fn(x, y, **hparams, reduction="none"), jax.vmap(single)(x, y))
  )(LOGITS, INT_LABELS)
  np.testing.assert_allclose(np.asarray(mapped), np.asarray(per_example), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fn,hparams", ALL_VARIANTS)
def test_class_axis_one_matches_last_axis(fn, hparams):
  logits_nkl = RNG.normal(size=(2, K, 3)).astype(np.float32)
  labels_nl = np.array([[0, 4, 2], [1, -100, 3]], np.int32)
  probs_nkl = np.moveaxis(RNG.dirichlet(np.ones(K), size=(2, 3)), -1, 1).astype(np.float32)

  def both_layouts(x, y, q):
    """Per label kind, the loss with the classes on axis 1 and with them moved last."""
    last = jnp.moveaxis(x, 1, -1)
    return [
      (
        fn(x, y, **hparams, axis=1, weight=WEIGHT, reduction="none"),
        fn(last, y, **hparams, weight=WEIGHT, reduction="none"),
      ),
      (
        fn(x, q, **hparams, axis=1, reduction="none"),
        fn(last, jnp.moveaxis(q, 1, -1), **hparams, reduction="none"),
      ),
    ]

  # One jitted program (eagerly, each primitive would compile on its own).
  for got, want in jax.jit(both_layouts)(logits_nkl, labels_nl, probs_nkl):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)


@pytest.mark.parametrize("fn,hparams", ALL_VARIANTS)
def test_masked_rows_like_cross_entropy(fn, hparams):
  """Ignored and masked rows give 0 and leave the mean; all of them masked: mean 0, zero grad."""
  labels = np.array([0, -100, 2, 7, 1, 3], np.int32)  # 7 is out of range: NaN, like the core
  where = np.array([True, True, False, True, True, True])
  loss = fn(LOGITS, labels, **hparams, where=where, weight=WEIGHT, reduction="none")
  core = xent_jax.cross_entropy(LOGITS, labels, where=where, weight=WEIGHT, reduction="none")
  np.testing.assert_array_equal(np.isnan(np.asarray(loss)), np.isnan(np.asarray(core)))
  np.testing.assert_array_equal(np.asarray(loss)[1:3], [0.0, 0.0])
  kept = np.array([0, 4, 5])
  mean = fn(LOGITS[kept], labels[kept], **hparams, weight=WEIGHT)
  np.testing.assert_allclose(
    np.asarray(mean), np.sum(np.asarray(loss)[kept]) / np.sum(WEIGHT[labels[kept]]), rtol=1e-6
  )
  none_kept = lambda x: fn(x, np.full(6, -100, np.int32), **hparams)
  assert float(none_kept(LOGITS)) == 0.0
  np.testing.assert_array_equal(np.asarray(jax.grad(none_kept)(LOGITS)), np.zeros_like(LOGITS))


@pytest.mark.parametrize(
  "call,name",
  [
    (lambda x, y: xent_jax.softmax_focal_loss(x, y, gamma=-1.0), "gamma"),
    (lambda x, y: xent_jax.softmax_focal_loss(x, y, alpha=[1.0, -1.0, 1.0, 1.0, 1.0]), "alpha"),
    (lambda x, y: xent_jax.softmax_focal_loss(x, y, alpha=np.ones(3)), "alpha"),
    (lambda x, y: xent_jax.poly1_cross_entropy(x, y, epsilon=-2.0), "epsilon"),
    (lambda x, y: xent_jax.symmetric_cross_entropy(x, y, beta=-0.1), "beta"),
    (lambda x, y: xent_jax.symmetric_cross_entropy(x, y, log_clip=0.0), "log_clip"),
    (lambda x, y: xent_jax.generalized_cross_entropy(x, y, q=0.0), "q"),
    (lambda x, y: xent_jax.generalized_cross_entropy(x, y, q=1.5), "q"),
    (lambda x, y: xent_jax.truncated_generalized_cross_entropy(x, y, k=1.0), "k"),
    (lambda x, y: xent_jax.taylor_cross_entropy(x, y, order=0), "order"),
    (lambda x, y: xent_jax.confidence_penalty_cross_entropy(x, y, beta=-1.0), "beta"),
    (lambda x, y: xent_jax.bi_tempered_logistic_loss(x, y, t1=1.5), "t1"),
    (lambda x, y: xent_jax.bi_tempered_logistic_loss(x, y, t2=0.0), "t2"),
    (lambda x, y: xent_jax.bi_tempered_logistic_loss(x, y, label_smoothing=1.0), "label_smoothing"),
    (lambda x, y: xent_jax.bi_tempered_logistic_loss(x, y, num_iters=0), "num_iters"),
    (lambda x, y: xent_jax.softmax_focal_loss(x, y, reduction="avg"), "reduction"),
    (lambda x, y: xent_jax.poly1_cross_entropy(x, y, where=np.ones(4, bool)), "where"),
    (lambda x, y: xent_jax.taylor_cross_entropy(x, y, axis=2), "axis"),
  ],
)
def test_bad_options_raise_value_error_naming_them(call, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    call(LOGITS, INT_LABELS)


@pytest.mark.parametrize(
  "call,name",
  [
    (lambda: xent_jax.taylor_cross_entropy(LOGITS, INT_LABELS, order=2.0), "order"),
    (lambda: xent_jax.bi_tempered_logistic_loss(LOGITS, INT_LABELS, num_iters=5.0), "num_iters"),
    (lambda: xent_jax.bi_tempered_logistic_loss(LOGITS, INT_LABELS, t2="1.5"), "t2"),
    (lambda: xent_jax.bi_tempered_logistic_loss(LOGITS, INT_LABELS, t1=np.ones(2)), "t1"),
    (lambda: xent_jax.softmax_focal_loss(LOGITS.astype(np.int32), INT_LABELS), "logits"),
    (lambda: xent_jax.softmax_focal_loss(LOGITS, INT_LABELS.astype(bool)), "labels"),
  ],
)
def test_bad_types_raise_type_error_naming_them(call, name):
  with pytest.raises(TypeError, match=f"`{name}`"):
    call()


def test_bad_label_shape_names_labels():
  with pytest.raises(AssertionError, match="`labels`"):
    xent_jax.softmax_focal_loss(LOGITS, INT_LABELS[:3])
  with pytest.raises(AssertionError, match="`labels`"):
    xent_jax.softmax_focal_loss(LOGITS, PROBS[:, :3])


def test_hparams_may_be_traced_except_static_ones():
  grad_gamma = jax.grad(lambda g: xent_jax.softmax_focal_loss(LOGITS, INT_LABELS, gamma=g))(2.0)
  assert np.isfinite(float(grad_gamma))
  jitted = jax.jit(lambda x, q: xent_jax.generalized_cross_entropy(x, INT_LABELS, q=q))
  np.testing.assert_allclose(
    float(jitted(LOGITS, 0.3)),
    float(xent_jax.generalized_cross_entropy(LOGITS, INT_LABELS, q=0.3)),
    rtol=1e-6,
  )


class TestBiTemperedAgainstPublishedImplementation:
  """Known values: the paper authors' JAX code, ``jax-bitempered-loss`` on PyPI (optional)."""

  SETTINGS = (
    (0.8, 1.2, 0.0, 5),
    (0.5, 4.0, 0.1, 5),
    (1.0, 1.0, 0.0, 5),
    (0.2, 0.8, 0.0, 20),
    (1.0, 1.5, 0.2, 5),
    (0.7, 1.0, 0.0, 5),
  )

  @pytest.mark.parametrize("t1,t2,smoothing,num_iters", SETTINGS)
  @pytest.mark.parametrize("label_kind", ["integer", "probabilities"])
  def test_values_and_gradients(self, t1, t2, smoothing, num_iters, label_kind):
    published = pytest.importorskip("jax_bitempered_loss.loss")
    labels = np.array([0, 3, 2, 4, 1, 2], np.int32) if label_kind == "integer" else PROBS
    targets = np.eye(K, dtype=np.float32)[labels] if label_kind == "integer" else PROBS
    theirs = lambda x: published.bi_tempered_logistic_loss(x, targets, t1, t2, smoothing, num_iters)
    ours = lambda x: xent_jax.bi_tempered_logistic_loss(
      x, labels, t1=t1, t2=t2, label_smoothing=smoothing, num_iters=num_iters, reduction="none"
    )
    np.testing.assert_allclose(
      np.asarray(ours(LOGITS)), np.asarray(theirs(LOGITS)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
      np.asarray(jax.grad(lambda x: jnp.sum(ours(x)))(LOGITS)),
      np.asarray(jax.grad(lambda x: jnp.sum(theirs(x)))(LOGITS)),
      rtol=1e-5,
      atol=1e-6,
    )


def test_tempered_softmax_sums_to_one():
  for t, iters in ((1.5, 30), (3.0, 60), (0.6, 40)):
    p = xent_jax.tempered_softmax(jnp.asarray(LOGITS), t, num_iters=iters)
    np.testing.assert_allclose(np.asarray(jnp.sum(p, axis=-1)), np.ones(6), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(p[0]), ref.tempered_softmax(LOGITS[0], t), atol=1e-5)


def test_poly1_matches_optax_poly_loss():
  optax = pytest.importorskip("optax")
  for labels in (PROBS, np.eye(K, dtype=np.float32)[[0, 3, 2, 4, 1, 2]]):
    want = optax.losses.poly_loss_cross_entropy(LOGITS, labels, epsilon=1.5)
    got = xent_jax.poly1_cross_entropy(LOGITS, labels, epsilon=1.5, reduction="none")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
