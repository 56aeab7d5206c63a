"""Every numeric hyper-parameter of every registered loss as a traced scalar (jit, vmap, grad, jvp).

Each case builds its loss the way the training harness does, ``get_loss(name, **{hparam: t})``
inside the transformed function, and checks: a jit argument equals the concrete call; a vmap over
three values equals three concrete calls and the float64 NumPy reference of the formula; the
gradient wrt the logits equals the concrete one; ``check_grads`` wrt the hyper-parameter (the
bi-tempered loss instead refuses a derivative wrt its temperatures by name); forward mode
equals the concrete forward mode; a traced value out of range gives NaN (value and gradient) for
its member only. Concrete values still raise with the old messages, and a concrete zero keeps its
cheaper program. Shapes are tiny and each case compiles one program per check.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.test_util import check_grads

import xent_jax
from tests import _reference as ref
from tests import _variant_reference as vref
from xent_jax import registry

N, V, D = 4, 8, 3
SMOOTHING = 0.1  # fixed smoothing of the other cases, so the class-sum pass is in every program


def _inputs():
  k1, k2, k3, k4 = jax.random.split(jax.random.key(7), 4)
  logits = 2.0 * jax.random.normal(k1, (N, V))
  labels = jax.random.randint(k2, (N,), 0, V)
  hidden = jax.random.normal(k3, (N, D))
  weight = jax.random.normal(k4, (V, D))
  return logits, labels, hidden, weight


def _smoothed_one_hot(labels, eps):
  q = np.eye(V)[np.asarray(labels)]
  return (1.0 - eps) * q + eps / V


def _variant_ref(row_fn, **fixed):
  """float64 reference of a variant at smoothing ``SMOOTHING`` (its expected loss under the
  smoothed target); ``name`` maps the hyper-parameter to the reference's keyword."""

  def reference(logits, labels, value, name):
    q = _smoothed_one_hot(labels, SMOOTHING)
    # With unit weights the 'mean' of the smoothed target's rows equals the integer labels'.
    return vref.variant_loss(row_fn, np.asarray(logits), q, **fixed, **{name: value})

  return reference


def _bi_tempered_ref(**fixed):
  """float64 reference of the bi-tempered loss (exact normalization; the cases run 20 iterations,
  converged to float32 here), smoothing by the paper's convention."""

  def reference(logits, labels, value, name):
    options = {"label_smoothing": SMOOTHING} | fixed | {name: value}
    x = np.asarray(logits, np.float64)
    return vref.variant_loss(vref.bi_tempered, x, np.asarray(labels), on_logits=True, **options)

  return reference


def _ce_ref(**fixed):
  def reference(logits, labels, value, name):
    options = {"label_smoothing": SMOOTHING} | fixed | {name: value}
    return ref.cross_entropy(np.asarray(logits, np.float64), np.asarray(labels), **options)

  return reference


class Case:
  """One hyper-parameter of one registered loss: three in-range values, one out of range."""

  def __init__(
    self,
    loss,
    hparam,
    values,
    invalid,
    fixed=None,
    reference=None,
    ref_name=None,
    differentiable=True,
  ):
    self.loss, self.hparam, self.values, self.invalid = loss, hparam, values, invalid
    self.fixed = {"label_smoothing": SMOOTHING} | (fixed or {})
    self.fixed.pop(hparam, None)
    self.reference, self.ref_name = reference, ref_name or hparam
    # Whether the loss has a derivative wrt the hyper-parameter (else it refuses one by name).
    self.differentiable = differentiable

  def __repr__(self):
    return f"{self.loss}-{self.hparam}"

  def fn(self, logits, labels, value):
    """The harness's way: the loss built inside the transformed function."""
    return registry.get_loss(self.loss, **self.fixed, **{self.hparam: value})(logits, labels)


_SYM = {"alpha": 0.1, "beta": 1.0, "log_clip": -4.0}
CASES = [
  Case("cross_entropy", "label_smoothing", [0.0, 0.1, 0.3], 1.5, reference=_ce_ref()),
  Case(
    "cross_entropy",
    "label_smoothing",
    [0.0, 0.2, 0.5],
    -0.1,
    {"smoothing": "t5x"},
    _ce_ref(smoothing="t5x"),
  ),
  Case("z_loss", "z_loss", [0.0, 1e-2, 0.5], -1.0, reference=_ce_ref()),
  Case("cross_entropy", "logit_softcap", [1.5, 3.0, 30.0], 0.0, reference=_ce_ref()),
  Case("focal", "gamma", [0.0, 1.5, 2.0], -1.0, reference=_variant_ref(vref.focal)),
  Case(
    "focal", "alpha", [0.25, 0.5, 1.0], -0.5, {"gamma": 2.0}, _variant_ref(vref.focal, gamma=2.0)
  ),
  Case("focal", "label_smoothing", [0.0, 0.1, 0.4], 1.1),
  Case("poly1", "epsilon", [-0.5, 0.0, 2.0], -2.0, reference=_variant_ref(vref.poly1)),
  Case(
    "symmetric_ce",
    "alpha",
    [0.0, 0.1, 1.0],
    -1.0,
    reference=_variant_ref(vref.symmetric, beta=1.0, log_clip=-4.0, weighted=False),
  ),
  Case(
    "symmetric_ce",
    "beta",
    [0.0, 0.5, 1.0],
    -1.0,
    reference=_variant_ref(vref.symmetric, alpha=0.1, log_clip=-4.0, weighted=False),
  ),
  Case(
    "symmetric_ce",
    "log_clip",
    [-6.0, -4.0, -2.0],
    0.5,
    reference=_variant_ref(vref.symmetric, alpha=0.1, beta=1.0, weighted=False),
  ),
  Case(
    "generalized_ce",
    "q",
    [0.3, 0.7, 1.0],
    0.0,
    reference=_variant_ref(vref.generalized),
    ref_name="q_exp",
  ),
  Case(
    "truncated_gce",
    "q",
    [0.3, 0.7, 1.0],
    1.5,
    reference=_variant_ref(vref.truncated, k=0.5),
    ref_name="q_exp",
  ),
  Case(
    "truncated_gce", "k", [0.0, 0.2, 0.6], 1.0, reference=_variant_ref(vref.truncated, q_exp=0.7)
  ),
  Case("taylor_ce", "label_smoothing", [0.0, 0.1, 0.4], 2.0),
  Case(
    "confidence_penalty",
    "beta",
    [0.0, 0.1, 0.5],
    -1.0,
    reference=_variant_ref(vref.confidence, weighted=False),
  ),
  *(
    Case(name, "label_smoothing", [0.0, 0.1, 0.4], invalid)
    for name, invalid in (
      ("poly1", 1.5),
      ("symmetric_ce", -0.5),
      ("generalized_ce", 1.01),
      ("truncated_gce", 3.0),
      ("confidence_penalty", -0.5),
    )
  ),
  # t2 on both sides of 1 and at 1 (fixed point, exact softmax, bisection); t1 up to 1.
  *(
    Case(
      "bi_tempered",
      hparam,
      values,
      invalid,
      {"num_iters": 20},
      _bi_tempered_ref(t1=0.8, t2=1.2, weighted=True),
      differentiable=hparam == "label_smoothing",
    )
    for hparam, values, invalid in (
      ("t1", [0.0, 0.5, 1.0], 1.5),
      ("t2", [0.5, 1.0, 2.0], 0.0),
      ("label_smoothing", [0.0, 0.1, 0.4], 1.0),
    )
  ),
]
DIFFERENTIABLE = [c for c in CASES if c.differentiable]


# Hyper-parameters that choose the program (a kernel, a loop length, a polynomial's degree): they
# stay Python numbers, and a traced one is refused by name (last test).
STATIC = {("taylor_cross_entropy", "order"), ("bi_tempered_logistic_loss", "num_iters")}


def _function_name(loss):
  return registry.list_losses()[registry.ALIASES.get(loss, loss)].fn.__name__


def test_every_numeric_hyperparameter_has_a_case():
  """The cases cover each numeric hyper-parameter of every built-in registered loss (the
  entries on cross_entropy share its cases), except the static ones."""
  covered = {(_function_name(c.loss), c.hparam) for c in CASES}
  missing = [
    (name, hparam)
    for name, info in registry.list_losses().items()
    if info.fn.__module__.startswith("xent_jax.losses")
    for hparam, default in info.hparams.items()
    if (default is None or isinstance(default, (int, float)))
    and (info.fn.__name__, hparam) not in covered | STATIC
  ]
  assert not missing


@pytest.fixture(scope="module")
def inputs():
  return _inputs()


def _value_grad_jvp(case, logits, labels, tangent, value):
  """The loss, its gradient wrt the logits and its forward-mode derivative along ``tangent``."""
  loss, grad = jax.value_and_grad(case.fn)(logits, labels, value)
  _, jvp = jax.jvp(lambda x: case.fn(x, labels, value), (logits,), (tangent,))
  return loss, grad, jvp


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_traced_equals_concrete(case, inputs):
  """One jitted program, the hyper-parameter its (vmapped) argument, over three values and one
  out of range: value, logit gradient and jvp of each valid member equal the concrete call (and
  the value the float64 reference); the out-of-range member is NaN in value and gradient."""
  logits, labels, _, _ = inputs
  tangent = jax.random.normal(jax.random.key(3), logits.shape)
  run = functools.partial(_value_grad_jvp, case, logits, labels, tangent)
  values = jnp.asarray([*case.values, case.invalid], jnp.float32)
  losses, grads, jvps = jax.jit(jax.vmap(run))(values)
  # The concrete calls: each value a Python float inside the program, as a user writes it; all
  # in one jitted program rather than eager (one compiled program instead of one per primitive).
  concrete = jax.jit(lambda: [run(value) for value in case.values])()
  for i, value in enumerate(case.values):
    want_loss, want_grad, want_jvp = concrete[i]
    np.testing.assert_allclose(losses[i], want_loss, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(grads[i], want_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jvps[i], want_jvp, rtol=1e-5, atol=1e-6)
    if case.reference is not None:
      expected = case.reference(logits, labels, value, case.ref_name)
      np.testing.assert_allclose(losses[i], expected, rtol=1e-5, atol=1e-6)
  assert np.isnan(losses[-1]) and np.all(np.isnan(grads[-1]))


@pytest.mark.parametrize("case", DIFFERENTIABLE, ids=repr)
def test_check_grads_wrt_hyperparameter(case, inputs):
  """Forward and reverse derivatives wrt the hyper-parameter match finite differences (float64)."""
  logits, labels, _, _ = inputs
  value = case.values[1]
  with jax.enable_x64(True):
    x64 = jnp.asarray(logits, jnp.float64)
    fn = jax.jit(case.fn)
    check_grads(
      lambda v: fn(x64, labels, v),
      (jnp.float64(value),),
      order=1,
      modes=("fwd", "rev"),
      eps=1e-5,
    )


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_concrete_value_out_of_range_still_raises(case, inputs):
  logits, labels, _, _ = inputs
  with pytest.raises(ValueError, match=f"`{case.hparam}`"):
    case.fn(logits, labels, case.invalid)


@pytest.mark.parametrize(
  ("name", "hparam", "values"),
  [("label_smoothing", "label_smoothing", [0.0, 0.2]), ("focal", "gamma", [0.5, 2.0])],
)
def test_probability_labels_and_reduction_none(name, hparam, values, inputs):
  """Probability labels (the smoothing then sits inside the engine's passes), per-example
  losses: a vmap equals the concrete calls, and check_grads wrt the hyper-parameter."""
  logits = inputs[0]
  q = jax.nn.softmax(0.5 * jax.random.normal(jax.random.key(5), (N, V)))

  def per_example(x, v):
    return registry.get_loss(name, **{hparam: v})(x, q, reduction="none")

  total = lambda x, v: jnp.sum(per_example(x, v))
  run = lambda v: (per_example(logits, v), jax.grad(total)(logits, v))
  losses, grads = jax.jit(jax.vmap(run))(jnp.asarray(values))
  # The concrete calls (Python floats) in one jitted program, as in test_traced_equals_concrete.
  concrete = jax.jit(lambda: [run(v) for v in values])()
  for i, (want_loss, want_grad) in enumerate(concrete):
    np.testing.assert_allclose(losses[i], want_loss, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(grads[i], want_grad, rtol=1e-5, atol=1e-6)
  with jax.enable_x64(True):
    x64 = jnp.asarray(logits, jnp.float64)
    check_grads(
      jax.jit(lambda v: total(x64, v)), (jnp.float64(values[1]),), order=1, modes=("fwd", "rev")
    )


# The fused linear layer: get_loss(...).linear (every loss) and linear_cross_entropy.
LINEAR_CASES = [CASES[0], CASES[3], CASES[4]]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=repr)
def test_linear_form_equals_loss_on_logits(case, inputs):
  """get_loss(...).linear with a traced hyper-parameter: vmap values and the gradients wrt the
  weight and the hyper-parameter equal the loss on the full logits."""
  _, labels, hidden, weight = inputs

  def linear(w, v):
    return registry.get_loss(case.loss, **case.fixed, **{case.hparam: v}).linear(hidden, w, labels)

  def dense(w, v):
    return case.fn(hidden @ w.T, labels, v)

  values = jnp.asarray(case.values, jnp.float32)
  got = jax.jit(jax.vmap(jax.value_and_grad(linear, argnums=(0, 1)), in_axes=(None, 0)))(
    weight, values
  )
  want = jax.jit(jax.vmap(jax.value_and_grad(dense, argnums=(0, 1)), in_axes=(None, 0)))(
    weight, values
  )
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6)


def test_linear_cross_entropy_traced_smoothing_and_z_loss(inputs):
  """linear_cross_entropy's kernels (two-pass for traced options): values, gradients wrt the
  weight and both options, and NaN for an out-of-range member; a traced soft cap is refused by
  name (its blocks hold it as a constant)."""
  _, labels, hidden, weight = inputs

  def fused(w, eps, z):
    return xent_jax.linear_cross_entropy(hidden, w, labels, label_smoothing=eps, z_loss=z)

  def dense(w, eps, z):
    return xent_jax.cross_entropy(hidden @ w.T, labels, label_smoothing=eps, z_loss=z)

  eps, z = jnp.asarray([0.0, 0.1, 2.0]), jnp.asarray([1e-2, 0.0, 0.1])
  grad = lambda f: jax.vmap(jax.value_and_grad(f, argnums=(0, 1, 2)))
  got = jax.jit(grad(fused), static_argnums=())(jnp.broadcast_to(weight, (3, V, D)), eps, z)
  want = jax.jit(grad(dense))(jnp.broadcast_to(weight, (3, V, D)), eps, z)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g[:2], w[:2], rtol=2e-5, atol=1e-6)
    assert np.all(np.isnan(g[2]))
  with pytest.raises(TypeError, match="`logit_softcap`"):
    jax.jit(lambda c: xent_jax.linear_cross_entropy(hidden, weight, labels, logit_softcap=c))(3.0)


# Vocabulary-parallel forms: get_loss(...).vocab_parallel and vocab_parallel_cross_entropy.
needs_devices = pytest.mark.skipif(
  jax.device_count() < 4, reason=f"needs 4 devices (tests/conftest.py), found {jax.device_count()}"
)


@needs_devices
@pytest.mark.parametrize("case", [CASES[0], CASES[4]], ids=repr)
def test_vocab_parallel_equals_one_device(case, inputs):
  logits, labels, _, _ = inputs
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 4), ("data", "vocab"))

  def sharded(x, v):
    loss = registry.get_loss(case.loss, **case.fixed, **{case.hparam: v})
    return loss.vocab_parallel(x, labels, mesh=mesh, vocab_axis="vocab")

  values = jnp.asarray(case.values[:2], jnp.float32)
  # jit: one program each (un-jitted, a vmapped shard_map runs op by op, ~10x slower here).
  got = jax.jit(jax.vmap(jax.value_and_grad(sharded, argnums=(0, 1)), in_axes=(None, 0)))(
    logits, values
  )
  want = jax.jit(jax.vmap(jax.value_and_grad(case.fn, argnums=(0, 2)), in_axes=(None, None, 0)))(
    logits, labels, values
  )
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6)


@needs_devices
def test_vocab_parallel_linear_traced_smoothing(inputs):
  _, labels, hidden, weight = inputs
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(1, 4), ("data", "vocab"))

  def sharded(w, eps):
    return xent_jax.vocab_parallel_linear_cross_entropy(
      hidden, w, labels, mesh=mesh, vocab_axis="vocab", label_smoothing=eps
    )

  def dense(w, eps):
    return xent_jax.cross_entropy(hidden @ w.T, labels, label_smoothing=eps)

  eps = jnp.asarray([0.1, 0.3])
  got = jax.jit(jax.vmap(jax.value_and_grad(sharded, argnums=(0, 1)), in_axes=(None, 0)))(
    weight, eps
  )
  want = jax.jit(jax.vmap(jax.value_and_grad(dense, argnums=(0, 1)), in_axes=(None, 0)))(
    weight, eps
  )
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-6)


def test_concrete_zero_keeps_the_cheaper_program(inputs):
  """A concrete 0 skips the smoothing pass and the z-loss term; a traced one (equal in value)
  takes the general program."""
  logits, labels, _, _ = inputs
  count = lambda f, *a: str(jax.make_jaxpr(f)(*a)).count("reduce_sum")
  plain = count(
    lambda x: xent_jax.cross_entropy(x, labels, label_smoothing=0.0, z_loss=0.0), logits
  )
  traced = count(
    lambda x, e, z: xent_jax.cross_entropy(x, labels, label_smoothing=e, z_loss=z), logits, 0.0, 0.0
  )
  assert plain < traced
  np.testing.assert_allclose(
    jax.jit(lambda e, z: xent_jax.cross_entropy(logits, labels, label_smoothing=e, z_loss=z))(
      0.0, 0.0
    ),
    xent_jax.cross_entropy(logits, labels),
    rtol=2e-6,
  )


def test_bi_tempered_num_iters_stays_static(inputs):
  """``num_iters`` is the length of the normalization's loop: a traced one is refused by name."""
  logits, labels, _, _ = inputs
  fn = lambda n: registry.get_loss("bi_tempered", num_iters=n)(logits, labels)
  with pytest.raises(TypeError, match="`num_iters` must be a Python int"):
    jax.jit(fn)(5)


TEMPERATURES = [c for c in CASES if not c.differentiable]


@pytest.mark.parametrize("case", TEMPERATURES, ids=repr)
def test_bi_tempered_refuses_a_derivative_wrt_a_temperature(case, inputs):
  """Its closed-form gradient is wrt the logits and the smoothing: reverse and forward mode wrt a
  temperature fail at trace time naming it; through ``stop_gradient`` the value is the concrete
  one and the derivative 0."""
  logits, labels, _, _ = inputs
  value = case.values[1]
  fn = lambda v: case.fn(logits, labels, v)
  with pytest.raises(NotImplementedError, match=f"`{case.hparam}`"):
    jax.grad(fn)(value)
  with pytest.raises(NotImplementedError, match=f"`{case.hparam}`"):
    jax.jvp(fn, (value,), (1.0,))
  stopped, derivative = jax.jit(jax.value_and_grad(lambda v: fn(jax.lax.stop_gradient(v))))(value)
  np.testing.assert_allclose(stopped, fn(value), rtol=2e-6)
  assert derivative == 0.0


def test_bi_tempered_probability_labels_and_reduction_none(inputs):
  """Probability labels, per-example losses, all three hyper-parameters traced together: a vmap
  equals the concrete calls in value and logit gradient; check_grads wrt the smoothing."""
  logits = inputs[0]
  q = jax.nn.softmax(0.5 * jax.random.normal(jax.random.key(5), (N, V)))

  def per_example(x, t1, t2, eps):
    loss = registry.get_loss("bi_tempered", t1=t1, t2=t2, label_smoothing=eps, num_iters=20)
    return loss(x, q, reduction="none")

  total = lambda x, *hparams: jnp.sum(per_example(x, *hparams))
  run = lambda *hparams: (per_example(logits, *hparams), jax.grad(total)(logits, *hparams))
  grid = [(0.5, 0.7, 0.1), (1.0, 1.0, 0.0), (0.8, 1.5, 0.2)]
  losses, grads = jax.jit(jax.vmap(run))(*jnp.asarray(grid).T)
  # The concrete calls (Python floats) in one jitted program.
  concrete = jax.jit(lambda: [run(*hparams) for hparams in grid])()
  for i, (want_loss, want_grad) in enumerate(concrete):
    np.testing.assert_allclose(losses[i], want_loss, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(grads[i], want_grad, rtol=1e-5, atol=1e-6)
  with jax.enable_x64(True):
    x64 = jnp.asarray(logits, jnp.float64)
    for t1, t2 in ((0.5, 0.7), (1.0, 1.0)):
      fn = jax.jit(lambda eps, t1=t1, t2=t2: total(x64, t1, t2, eps))
      check_grads(fn, (jnp.float64(0.2),), order=1, modes=("fwd", "rev"))


def test_bi_tempered_linear_form_equals_loss_on_logits(inputs):
  """get_loss("bi_tempered", ...).linear with traced temperatures and smoothing (token chunks,
  plain autodiff through the kernel's custom JVP): vmap values and gradients wrt the weight and
  the smoothing equal the loss on the full logits; an out-of-range member is NaN."""
  _, labels, hidden, weight = inputs

  def loss(t1, t2, eps):
    return registry.get_loss("bi_tempered", t1=t1, t2=t2, label_smoothing=eps, num_iters=20)

  linear = lambda w, *hparams: loss(*hparams).linear(hidden, w, labels)
  dense = lambda w, *hparams: loss(*hparams)(hidden @ w.T, labels)
  grid = jnp.asarray([(0.5, 0.7, 0.1), (1.0, 1.0, 0.0), (0.8, 1.5, 0.2), (0.8, 1.2, 1.0)]).T
  sweep = lambda f: jax.jit(
    jax.vmap(jax.value_and_grad(f, argnums=(0, 3)), in_axes=(None, 0, 0, 0))
  )
  got, want = sweep(linear)(weight, *grid), sweep(dense)(weight, *grid)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g[:3], w[:3], rtol=2e-5, atol=1e-6)
    assert np.all(np.isnan(g[3]))


def test_bi_tempered_traced_smoothing_over_one_class():
  """Smoothing needs two classes: a concrete value is refused, a traced one is NaN unless 0."""
  logits, labels = jnp.asarray([[0.5], [-1.0]]), jnp.asarray([0, 0])
  fn = lambda eps: registry.get_loss("bi_tempered", label_smoothing=eps)(logits, labels)
  got = jax.jit(jax.vmap(fn))(jnp.asarray([0.0, 0.1]))
  np.testing.assert_allclose(got[0], fn(0.0), rtol=1e-6, atol=1e-7)
  assert np.isnan(got[1])
  with pytest.raises(ValueError, match="`label_smoothing` needs at least 2 classes"):
    fn(0.1)
