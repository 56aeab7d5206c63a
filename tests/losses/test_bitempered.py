r"""Tests of the lean bi-tempered loss (`xent_jax.losses.bitempered`): values and closed-form
gradients in both autodiff modes against a float64 NumPy replica of the paper's algorithm (its
``num_iters`` iterations included) and the converged reference in ``_variant_reference.py``;
gradient checks; per-row residuals only; no ``[N, V]`` temporaries; bf16; the block function;
traced hyper-parameters.

The replica here follows Amid et al. (2019) and their reference code step by step in float64:
the normalization :math:`\lambda` by ``num_iters`` fixed-point steps (:math:`t_2 > 1`) or
bisection steps (:math:`t_2 < 1`), :math:`p = \exp_{t_2}(x - \lambda)`, the Bregman loss and the
gradient :math:`(p - q) p^{t_2-t_1} - e \sum_c (p_c - q_c) p_c^{t_2-t_1}`,
:math:`e = p^{t_2} / \sum_c p_c^{t_2}`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import xent_jax
from tests import _variant_reference as variant_ref
from tests._compiled import cpu_temp_bytes, large_non_input_residuals
from xent_jax.losses import bitempered

K = 7
RNG = np.random.default_rng(8)
LOGITS = (2.0 * RNG.normal(size=(6, K))).astype(np.float32)
INT_LABELS = np.array([0, 3, -100, 6, 1, 2], np.int32)
PROBS = RNG.dirichlet(np.ones(K), size=6).astype(np.float32)
PROBS[1] = np.eye(K)[2]  # a one-hot row: classes with q = 0 beside it
WEIGHT = RNG.uniform(0.25, 2.0, size=K).astype(np.float32)
WHERE = np.array([True, True, True, False, True, True])

# (t1, t2, label_smoothing, num_iters): t2 on both sides of 1 (and 1), t1 below and at 1,
# t2 - t1 positive, zero and negative, few iterations (unconverged) and many.
SETTINGS = [
  (0.8, 1.2, 0.0, 5),
  (0.5, 2.0, 0.1, 5),
  (1.0, 1.5, 0.2, 3),
  (0.7, 1.0, 0.1, 5),
  (1.0, 1.0, 0.1, 5),
  (0.5, 0.8, 0.1, 20),
  (0.6, 0.6, 0.0, 25),
  (0.9, 0.5, 0.1, 25),
]
SETTING_IDS = [f"t1={a}-t2={b}-ls={c}-it={d}" for a, b, c, d in SETTINGS]
# t2 < t1 with smoothing: the factor p^(t2-t1) has a negative exponent and a target q > 0 on
# classes with p near 0 (the edge of the finite support), where it multiplies float32 rounding
# of p: an ill-conditioned gradient (the previous implementation was off by 1.3e-4 here).
GRAD_RTOL = {(0.9, 0.5, 0.1, 25): 1e-4}


# ------------------------------------------------------------------ float64 replica of the paper


def _log_t(u, t):
  return np.log(u) if t == 1.0 else (u ** (1.0 - t) - 1.0) / (1.0 - t)


def _exp_t(u, t):
  if t == 1.0:
    return np.exp(u)
  with np.errstate(divide="ignore"):
    return np.maximum(1.0 + (1.0 - t) * u, 0.0) ** (1.0 / (1.0 - t))


def _normalization(x, t, num_iters):
  """The paper's :math:`\\lambda` of one row after ``num_iters`` steps, in float64."""
  mu = np.max(x)
  a0 = x - mu
  if t == 1.0:
    return mu + np.log(np.sum(np.exp(a0)))
  if t > 1.0:
    a = a0
    for _ in range(num_iters):
      a = a0 * np.sum(_exp_t(a, t)) ** (1.0 - t)
    return mu - _log_t(1.0 / np.sum(_exp_t(a, t)), t)
  lower, upper = 0.0, -_log_t(1.0 / np.sum(a0 > -1.0 / (1.0 - t)), t)
  for _ in range(num_iters):
    middle = (lower + upper) / 2.0
    if np.sum(_exp_t(a0 - middle, t)) < 1.0:
      upper = middle
    else:
      lower = middle
  return mu + (lower + upper) / 2.0


def _row(x, q, t1, t2, num_iters):
  """Loss and closed-form gradient of one row in float64 (``q`` already smoothed)."""
  p = _exp_t(x - _normalization(x, t2, num_iters), t2)
  used = q > 0
  with np.errstate(divide="ignore"):
    cross = np.sum(q[used] * (_log_t(q[used], t1) - _log_t(p[used], t1)))
  power = 2.0 - t1
  loss = cross - np.sum(q**power - p**power) / power
  positive = p > 0
  at_zero = 1.0 if t1 == t2 == 1.0 else 0.0
  forget = np.where(positive, np.where(positive, p, 1.0) ** (t2 - t1), at_zero)
  delta = (p - q) * forget
  escort = p**t2 / np.sum(p**t2)
  return loss, delta - escort * np.sum(delta)


def _reference(
  logits, labels, *, t1, t2, label_smoothing, num_iters, weight=None, ignore_index=-100, where=None
):
  """Per-row loss :math:`\\ell_i` (weighted, 0 when not counted, NaN for an out-of-range label),
  the 'mean' denominator :math:`\\omega_i` and :math:`\\partial\\ell_i/\\partial x_i`, float64."""
  x = np.asarray(logits, np.float64)
  labels = np.asarray(labels)
  integer = np.issubdtype(labels.dtype, np.integer)
  n, k = x.shape
  w = np.ones(k) if weight is None else np.asarray(weight, np.float64)
  counted = np.ones(n, bool) if where is None else np.asarray(where, bool)
  loss, omega, grad = np.zeros(n), np.zeros(n), np.zeros((n, k))
  for i in range(n):
    if not counted[i] or (integer and labels[i] == ignore_index):
      continue
    if integer and not 0 <= labels[i] < k:
      loss[i], grad[i] = np.nan, np.nan
      continue
    q = np.eye(k)[labels[i]] if integer else np.asarray(labels[i], np.float64)
    mass = w @ q
    if label_smoothing:
      q = (1.0 - k / (k - 1) * label_smoothing) * q + label_smoothing / (k - 1)
    row_loss, row_grad = _row(x[i], q, t1, t2, num_iters)
    loss[i], grad[i] = mass * row_loss, mass * row_grad
    omega[i] = mass if integer else 1.0
  return loss, omega, grad


def _hparams(setting):
  t1, t2, label_smoothing, num_iters = setting
  return dict(t1=t1, t2=t2, label_smoothing=label_smoothing, num_iters=num_iters)


# ------------------------------------------------------------------------------------ values


def test_replica_matches_the_converged_reference():
  """The replica above is a faithful bi-tempered loss: converged, it equals the reference in
  `_variant_reference.py` (bisection to float64 precision)."""
  for t1, t2, smoothing in ((0.8, 1.2, 0.1), (0.5, 0.8, 0.0), (1.0, 1.0, 0.2)):
    loss, _, _ = _reference(
      LOGITS, PROBS, t1=t1, t2=t2, label_smoothing=smoothing, num_iters=200, weight=WEIGHT
    )
    want = variant_ref.variant_loss(
      variant_ref.bi_tempered,
      LOGITS,
      PROBS,
      on_logits=True,
      weight=WEIGHT,
      reduction="none",
      t1=t1,
      t2=t2,
      label_smoothing=smoothing,
      weighted=True,
    )
    np.testing.assert_allclose(loss, want, rtol=1e-9, atol=1e-12)


def _value_vjp_jvp(labels, **hparams):
  """``(x, cotangent, tangent) -> (loss per row, VJP, JVP)`` of the loss with `WEIGHT` and
  `WHERE` (unjitted; ``hparams`` may be traced)."""
  loss = functools.partial(
    xent_jax.bi_tempered_logistic_loss,
    labels=labels,
    class_weight=WEIGHT,
    where=WHERE,
    reduction="none",
    **hparams,
  )

  def run(x, cotangent, tangent):
    value, vjp = jax.vjp(loss, x)
    return value, vjp(cotangent)[0], jax.jvp(loss, (x,), (tangent,))[1]

  return run


@functools.cache
def _per_row_and_derivatives(setting, integer):
  """Jitted `_value_vjp_jvp` of a concrete setting."""
  return jax.jit(_value_vjp_jvp(INT_LABELS if integer else PROBS, **_hparams(setting)))


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("label_kind", ["integer", "probabilities"])
def test_values_and_both_autodiff_modes_match_float64_replica(setting, label_kind):
  """weight, where, ignore_index, per-row values; VJP (reverse) and JVP (forward) against the
  closed-form gradient, rtol 1e-5 in float32."""
  labels = INT_LABELS if label_kind == "integer" else PROBS
  want, _, want_grad = _reference(LOGITS, labels, weight=WEIGHT, where=WHERE, **_hparams(setting))
  cotangent = RNG.normal(size=6).astype(np.float32)
  tangent = RNG.normal(size=LOGITS.shape).astype(np.float32)
  value, vjp, jvp = _per_row_and_derivatives(setting, label_kind == "integer")(
    jnp.asarray(LOGITS), cotangent, tangent
  )
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(value, want, rtol=1e-5, atol=1e-6)
  rtol = GRAD_RTOL.get(setting, 1e-5)
  np.testing.assert_allclose(vjp, cotangent[:, None] * want_grad, rtol=rtol, atol=1e-6)
  want_jvp = np.sum(want_grad * tangent, axis=-1)
  np.testing.assert_allclose(jvp, want_jvp, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("label_kind", ["integer", "probabilities"])
def test_reductions_and_class_axis(reduction, label_kind):
  """'sum' and 'mean' (PyTorch's denominator) with classes on axis 1 of a 3-D batch."""
  labels = INT_LABELS if label_kind == "integer" else PROBS
  setting = dict(t1=0.7, t2=1.3, label_smoothing=0.1, num_iters=5)
  loss, omega, grad = _reference(LOGITS, labels, weight=WEIGHT, where=WHERE, **setting)
  scale = 1.0 if reduction == "sum" else 1.0 / np.sum(omega)
  # [6, K] rows -> [2, K, 3]: classes on axis 1.
  to_axis1 = lambda a: (
    np.moveaxis(a.reshape(2, 3, *a.shape[1:]), 2, 1) if a.ndim == 2 else (a.reshape(2, 3))
  )
  labels_3d = to_axis1(labels)
  fn = lambda x: xent_jax.bi_tempered_logistic_loss(
    x, labels_3d, axis=1, class_weight=WEIGHT, where=to_axis1(WHERE), reduction=reduction, **setting
  )
  value, got_grad = jax.jit(jax.value_and_grad(fn))(jnp.asarray(to_axis1(LOGITS)))
  np.testing.assert_allclose(value, scale * np.sum(loss), rtol=1e-5)
  np.testing.assert_allclose(got_grad, to_axis1(scale * grad), rtol=1e-5, atol=1e-6)


def test_converged_values_match_the_variant_reference():
  """The float64 reference of `_variant_reference.py` (exact normalization) with enough
  iterations: both sides of t2 = 1, both label kinds, weights, mask."""
  for t1, t2, num_iters in ((0.8, 1.2, 40), (0.5, 0.8, 40)):
    for labels in (INT_LABELS, PROBS):
      got = jax.jit(
        functools.partial(
          xent_jax.bi_tempered_logistic_loss,
          t1=t1,
          t2=t2,
          label_smoothing=0.1,
          num_iters=num_iters,
          class_weight=WEIGHT,
          where=WHERE,
          reduction="none",
        )
      )(LOGITS, labels)
      want = variant_ref.variant_loss(
        variant_ref.bi_tempered,
        LOGITS,
        labels,
        on_logits=True,
        weight=WEIGHT,
        where=WHERE,
        reduction="none",
        t1=t1,
        t2=t2,
        label_smoothing=0.1,
        weighted=True,
      )
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------- gradient checks


@pytest.mark.parametrize(
  "hparams",
  [dict(t1=0.7, t2=1.5), dict(t1=0.5, t2=0.8, label_smoothing=0.1), dict(t1=0.6, t2=1.0)],
  ids=["t2>1", "t2<1-smoothing", "t2=1"],
)
@pytest.mark.parametrize("label_kind", ["integer", "probabilities"])
def test_check_grads_both_modes_float64(hparams, label_kind):
  """The closed form is the derivative of the exactly normalized loss: converge (60 iterations)
  and check it against finite differences, forward and reverse."""
  with jax.enable_x64(True):
    labels = INT_LABELS[:4] if label_kind == "integer" else PROBS[:4].astype(np.float64)
    loss = lambda x: xent_jax.bi_tempered_logistic_loss(
      x, labels, num_iters=60, class_weight=WEIGHT.astype(np.float64), **hparams
    )
    check_grads(
      jax.jit(loss), (jnp.asarray(LOGITS[:4], jnp.float64),), order=1, modes=("fwd", "rev")
    )


def test_linearize_and_jacfwd_agree_with_grad():
  loss = functools.partial(
    xent_jax.bi_tempered_logistic_loss, labels=INT_LABELS, label_smoothing=0.1
  )

  @jax.jit
  def run(x, tangent):
    value, linear = jax.linearize(loss, x)
    return value, linear(tangent), jax.jacfwd(loss)(x), jax.value_and_grad(loss)(x)

  tangent = jnp.asarray(RNG.normal(size=LOGITS.shape), jnp.float32)
  value, linearized, jacobian, (want_value, grad) = run(jnp.asarray(LOGITS), tangent)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  np.testing.assert_allclose(linearized, jnp.vdot(grad, tangent), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jacobian, grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------ rows that don't count


@pytest.mark.parametrize(
  "hparams", [dict(), dict(t1=0.5, t2=0.7, num_iters=20)], ids=["t2>1", "t2<1"]
)
def test_out_of_range_label_gives_nan_row_and_ignored_row_zero(hparams):
  """cross_entropy's rule: NaN loss and gradient for a kept label outside [0, K) (that row only);
  an ignored or masked row (even of -inf logits) gives 0 with a zero gradient, in both modes."""
  labels = np.array([0, K, -100, 2], np.int32)
  logits = LOGITS[:4].copy()
  logits[2] = -np.inf
  where = np.array([True, True, True, True])
  fn = lambda x: xent_jax.bi_tempered_logistic_loss(
    x, labels, where=where, reduction="none", **hparams
  )
  value, grad, jacobian = map(
    np.asarray,
    jax.jit(lambda x: (fn(x), jax.grad(lambda x: jnp.sum(fn(x)))(x), jax.jacfwd(fn)(x)))(logits),
  )
  assert np.isnan(value[1]) and np.all(np.isnan(grad[1])) and np.all(np.isnan(jacobian[1, 1]))
  assert value[2] == 0.0
  np.testing.assert_array_equal(grad[2], np.zeros(K))
  np.testing.assert_array_equal(jacobian[2], np.zeros((4, K)))
  assert np.all(np.isfinite(value[[0, 3]])) and np.all(np.isfinite(grad[[0, 3]]))
  all_ignored = functools.partial(
    xent_jax.bi_tempered_logistic_loss, labels=np.full(4, -100, np.int32)
  )
  value, grad = jax.jit(jax.value_and_grad(all_ignored))(logits)
  assert float(value) == 0.0
  np.testing.assert_array_equal(grad, np.zeros((4, K)))


# ------------------------------------------------------------------- residuals and memory


@pytest.mark.parametrize(
  "label_kind,hparams,dtype",
  [
    ("integer", dict(), jnp.float32),
    ("integer", dict(), jnp.bfloat16),
    ("integer", dict(label_smoothing=0.1), jnp.float32),
    ("integer", dict(t1=0.5, t2=0.7, num_iters=20, label_smoothing=0.1), jnp.bfloat16),
    ("integer", dict(t1=1.0, t2=1.0), jnp.float32),
    ("probabilities", dict(), jnp.float32),
    ("probabilities", dict(label_smoothing=0.1, t1=0.5, t2=0.7), jnp.bfloat16),
  ],
)
def test_vjp_keeps_no_vocab_sized_residual(label_kind, hparams, dtype):
  """Between the passes only per-row values (and the inputs) are kept: no p, no q, no float32
  copy of bf16 logits."""
  rng = np.random.default_rng(15)
  logits = jnp.asarray(rng.standard_normal((8, 64)), dtype)
  if label_kind == "integer":
    labels = jnp.asarray(rng.integers(0, 64, size=8))
  else:
    labels = jnp.asarray(rng.dirichlet(np.ones(64), size=8), jnp.float32)
  fn = jax.jit(lambda x: xent_jax.bi_tempered_logistic_loss(x, labels, **hparams))
  extra = large_non_input_residuals(fn, logits, [logits, labels])
  assert not extra, [(leaf.shape, leaf.dtype) for leaf in extra]


@pytest.mark.parametrize(
  "hparams",
  [dict(), dict(label_smoothing=0.1), dict(t1=0.5, t2=0.8, num_iters=20), dict(t1=1.0, t2=1.0)],
  ids=["default", "smoothing", "t2<1", "t1=t2=1"],
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_temp_memory_is_per_row(hparams, dtype):
  """fwd+bwd under jit with integer labels keeps at most 1/8 of one [N, V] float32 array of
  scratch memory on XLA:CPU (the issue's bound; in practice a few per-row vectors)."""
  n, v = 64, 4096
  x = jax.ShapeDtypeStruct((n, v), dtype)
  y = jax.ShapeDtypeStruct((n,), jnp.int32)
  step = jax.value_and_grad(lambda x, y: xent_jax.bi_tempered_logistic_loss(x, y, **hparams))
  temp = cpu_temp_bytes(step, x, y)
  assert temp <= n * v * 4 / 8, f"{temp} bytes of temp memory, bound {n * v * 4 // 8}"


@pytest.mark.parametrize("label_kind", ["integer", "probabilities"])
def test_compiled_temp_memory_is_per_row_with_traced_hyperparameters(label_kind):
  """The same bound (for both members together) with t1, t2 and the smoothing traced over a vmap
  of two members, and the gradient wrt the smoothing too: the traced kernel has no elementwise
  select in its passes, which XLA:CPU would store as an [N, V] array."""
  n, v = 64, 4096
  x = jax.ShapeDtypeStruct((n, v), jnp.float32)
  y = jax.ShapeDtypeStruct((n,) if label_kind == "integer" else (n, v), jnp.int32)
  if label_kind == "probabilities":
    y = x
  hparams = jax.ShapeDtypeStruct((2,), jnp.float32)

  def step(x, y, t1, t2, eps):
    loss = lambda x, eps: xent_jax.bi_tempered_logistic_loss(
      x, y, t1=t1, t2=t2, label_smoothing=eps
    )
    return jax.value_and_grad(loss, argnums=(0, 1))(x, eps)

  temp = cpu_temp_bytes(jax.vmap(step, in_axes=(None, None, 0, 0, 0)), x, y, *[hparams] * 3)
  assert temp <= n * v * 4 / 8, f"{temp} bytes of temp memory, bound {n * v * 4 // 8}"


def test_iterations_are_a_loop_not_unrolled():
  """The traced program does not grow with num_iters (compile time stays flat)."""
  sizes = []
  for num_iters in (5, 50):
    for t2 in (1.2, 0.8):
      fn = lambda x, t2=t2, num_iters=num_iters: xent_jax.bi_tempered_logistic_loss(
        x, INT_LABELS, t2=t2, num_iters=num_iters
      )
      sizes.append(len(str(jax.make_jaxpr(jax.value_and_grad(fn))(LOGITS))))
  assert sizes[0] == pytest.approx(sizes[2], rel=0.01)
  assert sizes[1] == pytest.approx(sizes[3], rel=0.01)


# --------------------------------------------------------------------------------- bf16, blocks


@pytest.mark.parametrize("label_kind", ["integer", "probabilities"])
def test_bf16_logits_are_computed_in_float32(label_kind):
  """Values and gradients of bf16 logits equal those of the same values in float32; the gradient
  comes back in bf16."""
  labels = INT_LABELS if label_kind == "integer" else PROBS
  logits_bf16 = jnp.asarray(LOGITS, jnp.bfloat16)
  fn = lambda x: xent_jax.bi_tempered_logistic_loss(
    x, labels, label_smoothing=0.1, class_weight=WEIGHT, reduction="sum"
  )
  value, grad = jax.jit(jax.value_and_grad(fn))(logits_bf16)
  want, want_grad = jax.jit(jax.value_and_grad(fn))(logits_bf16.astype(jnp.float32))
  assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(value, want, rtol=1e-6)
  np.testing.assert_allclose(
    np.asarray(grad, np.float32),
    np.asarray(want_grad.astype(jnp.bfloat16), np.float32),
    rtol=1e-2,
    atol=1e-6,
  )


def test_block_function_on_blocks_equals_the_whole():
  """`bi_tempered_rows` on two blocks of rows (the fused head's use) gives the per-row loss and
  gradient of the whole array, unweighted, 0 on invalid rows and NaN on out-of-range labels."""
  labels = np.array([0, 3, -100, 6, 1, K], np.int32)
  valid = labels != -100
  hparams = dict(t1=0.6, t2=1.4, label_smoothing=0.1, num_iters=6)
  rows = lambda x, y, v: bitempered.bi_tempered_rows(x, y, v, **hparams)
  scale = np.arange(6.0, dtype=np.float32)
  weighted_sum = jax.jit(
    jax.value_and_grad(lambda x, y, v, s: jnp.sum(jnp.where(v & (y < K), rows(x, y, v) * s, 0)))
  )
  loss, grad = weighted_sum(LOGITS, labels, valid, scale)
  blocks = [
    weighted_sum(LOGITS[s], labels[s], valid[s], scale[s]) for s in (slice(0, 4), slice(4, 6))
  ]
  np.testing.assert_allclose(loss, sum(value for value, _ in blocks), rtol=1e-6)
  np.testing.assert_allclose(grad, np.concatenate([g for _, g in blocks]), rtol=1e-6)
  got = jax.jit(rows)(LOGITS, labels, valid)
  want, _, _ = _reference(LOGITS, labels, **hparams)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # NaN in the last row of both


# (t1, t2, label_smoothing) swept by one vmapped program: t2 below, at and above 1, t1 at 0 and
# 1, t2 - t1 of each sign, the KL point (t1 = t2 = 1); then one member out of range per value.
TRACED_GRID = [
  (0.5, 0.8, 0.1),
  (0.6, 0.6, 0.0),
  (0.9, 0.5, 0.1),
  (0.7, 1.0, 0.1),
  (1.0, 1.0, 0.1),
  (0.0, 1.2, 0.0),
  (1.0, 1.5, 0.2),
  (0.5, 2.0, 0.1),
]
OUT_OF_RANGE = [(1.5, 1.2, 0.1), (0.8, 0.0, 0.1), (0.8, 1.2, 1.0)]
TRACED_ITERS = 25


@pytest.mark.parametrize("label_kind", ["integer", "probabilities"])
def test_traced_hyperparameters_match_concrete_and_float64_replica(label_kind):
  """t1, t2 and the smoothing traced (one jitted program vmapped over the grid): per-row values,
  VJP and JVP of each member equal the concrete program's and the float64 replica's (weights, a
  mask, an ignored row); a member out of range is NaN in every value and gradient."""
  integer = label_kind == "integer"
  labels = INT_LABELS if integer else PROBS
  cotangent = RNG.normal(size=6).astype(np.float32)
  tangent = RNG.normal(size=LOGITS.shape).astype(np.float32)

  def run(t1, t2, label_smoothing):
    hparams = dict(t1=t1, t2=t2, label_smoothing=label_smoothing, num_iters=TRACED_ITERS)
    return _value_vjp_jvp(labels, **hparams)(LOGITS, cotangent, tangent)

  grid = np.asarray(TRACED_GRID + OUT_OF_RANGE, np.float32).T
  values, vjps, jvps = jax.jit(jax.vmap(run))(*grid)
  for i, setting in enumerate(TRACED_GRID):
    concrete = _per_row_and_derivatives((*setting, TRACED_ITERS), integer)
    for got, want in zip((values[i], vjps[i], jvps[i]), concrete(LOGITS, cotangent, tangent)):
      np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    hparams = dict(zip(("t1", "t2", "label_smoothing"), setting), num_iters=TRACED_ITERS)
    want, _, want_grad = _reference(LOGITS, labels, weight=WEIGHT, where=WHERE, **hparams)
    np.testing.assert_allclose(values[i], want, rtol=1e-5, atol=1e-6)
    rtol = GRAD_RTOL.get((*setting, TRACED_ITERS), 1e-5)
    np.testing.assert_allclose(vjps[i], cotangent[:, None] * want_grad, rtol=rtol, atol=1e-6)
    np.testing.assert_allclose(jvps[i], np.sum(want_grad * tangent, -1), rtol=rtol, atol=1e-5)
  bad = slice(len(TRACED_GRID), None)
  assert np.all(np.isnan(values[bad])) and np.all(np.isnan(vjps[bad]))


@pytest.mark.parametrize("label_kind", ["integer", "probabilities"])
def test_traced_hyperparameters_with_minus_inf_logits_match_concrete(label_kind):
  """Classes with -inf logits (p = 0 at any temperature): the traced kernel's select-free
  formulas give the concrete values and gradients, also where those are inf (smoothing at
  t1 = 1 puts mass on a class of p = 0) and for a traced smoothing of 0 there."""
  logits = LOGITS[:4].copy()
  logits[0, 2] = logits[1, [0, 5]] = logits[3, 1] = -np.inf
  labels = INT_LABELS[[0, 1, 3, 4]] if label_kind == "integer" else PROBS[[0, 2, 3, 4]]

  def value_and_grad(t1, t2, label_smoothing):
    loss = lambda x: xent_jax.bi_tempered_logistic_loss(
      x, labels, t1=t1, t2=t2, label_smoothing=label_smoothing, num_iters=25, reduction="none"
    )
    return loss(logits), jax.grad(lambda x: jnp.sum(loss(x)))(logits)

  traced = jax.jit(value_and_grad)
  for setting in ((1.0, 1.0, 0.0), (1.0, 1.5, 0.1), (0.5, 0.7, 0.1), (0.7, 1.0, 0.0)):
    for got, want in zip(
      traced(*setting), jax.jit(value_and_grad, static_argnums=(0, 1, 2))(*setting)
    ):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)  # equal where inf or NaN


def test_block_function_takes_traced_hyperparameters():
  """`bi_tempered_rows` with traced t1, t2 and smoothing equals the float64 replica."""
  labels = np.array([0, 3, 2, 6, 1, 5], np.int32)
  rows = jax.jit(
    lambda t1, t2, eps: bitempered.bi_tempered_rows(
      LOGITS, labels, np.ones(6, bool), t1=t1, t2=t2, label_smoothing=eps, num_iters=6
    )
  )
  for t1, t2, eps in ((0.6, 1.4, 0.1), (0.5, 0.8, 0.0)):
    want, _, _ = _reference(LOGITS, labels, t1=t1, t2=t2, label_smoothing=eps, num_iters=6)
    np.testing.assert_allclose(rows(t1, t2, eps), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
  "setting",
  [SETTINGS[0], SETTINGS[1], SETTINGS[5]],
  ids=[SETTING_IDS[0], SETTING_IDS[1], SETTING_IDS[5]],
)
def test_branch_for_other_backends_matches_float64_replica(setting, monkeypatch):
  """The code lowered for TPU/GPU (one shared p for the row sums, exp/log powers) gives the same
  values and gradients; forced here on CPU by taking every platform_dependent's default."""
  monkeypatch.setattr(jax.lax, "platform_dependent", lambda *, default, **_: default())
  for labels in (INT_LABELS, PROBS):
    fn = functools.partial(
      xent_jax.bi_tempered_logistic_loss,
      labels=labels,
      class_weight=WEIGHT,
      where=WHERE,
      reduction="sum",
      **_hparams(setting),
    )
    value, grad = jax.jit(jax.value_and_grad(fn))(LOGITS)
    want, _, want_grad = _reference(LOGITS, labels, weight=WEIGHT, where=WHERE, **_hparams(setting))
    np.testing.assert_allclose(value, np.sum(want), rtol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
