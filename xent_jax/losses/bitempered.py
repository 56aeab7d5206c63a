r"""The bi-tempered logistic loss's kernel (Amid et al. 2019), a bounded heavy-tailed loss.

With the tempered logarithm and exponential

.. math::
   \log_t u = \frac{u^{1-t} - 1}{1 - t}, \qquad
   \exp_t u = [1 + (1-t)\,u]_+^{1/(1-t)} \qquad (\log_1 = \log,\ \exp_1 = \exp),

the tempered softmax is :math:`p_c = \exp_{t_2}(x_c - \lambda(x))` with the normalization
:math:`\lambda` chosen so that :math:`\sum_c p_c = 1`. It has no closed form for :math:`t_2 \ne 1`:
a fixed-point iteration finds it for :math:`t_2 > 1` and a bisection for :math:`t_2 < 1` (where
:math:`p` has finite support).

How it is computed, row by row, so that nothing of size ``[..., V]`` is kept between the passes
(``V`` the number of classes):

* :math:`\lambda` is found by ``lax.fori_loop`` iterations whose carry is per row: the fixed point
  :math:`a \leftarrow a_0 Z(a)^{1-t}` of the paper keeps :math:`a = s\,a_0` with
  :math:`a_0 = x - \max_c x_c`, so it carries the scalar :math:`s`; the bisection carries its two
  bounds. Each iteration is one pass over the logits.
* A few more passes (one per row sum, typically two) give the loss and the per-row numbers its
  gradient needs, :math:`A = \sum_c (p_c - q_c)\,p_c^{t_2-t_1}` and
  :math:`B = \sum_c p_c^{t_2}`.
* The gradient is the paper's closed form (not autodiff through the iterations, which is slow
  and, with a few iterations, inexact)

  .. math::
     \frac{\partial\ell}{\partial x_c} = (p_c - q_c)\,p_c^{t_2-t_1} - \frac{p_c^{t_2}}{B}\,A,

  written as a ``jax.custom_jvp`` whose tangent :math:`\sum_c \partial_c\ell\,\dot x_c` is
  computed under ``jax.checkpoint``: reverse mode transposes it and recomputes :math:`p` from the
  logits and the per-row :math:`(\max, \lambda, A, B)`, and forward mode (``jax.jvp``,
  ``jax.jacfwd``, ``jax.linearize``) works too.
* Integer labels stay integer: the (smoothed) target is :math:`q_c = \text{on}` at the label and
  :math:`\text{off}` elsewhere; sums against it are :math:`\text{off}\sum_c f_c +
  (\text{on}-\text{off}) f_y` with :math:`f_y` from the label's logit, and the backward pass
  selects it per class.
* With the classes split over a mesh axis
  (:func:`xent_jax.parallel.bitempered.vocab_parallel_bi_tempered_loss`, which
  ``get_loss("bi_tempered").vocab_parallel`` runs) each shard makes the same passes over its
  ``[..., V_s]`` logits: the max is completed by a ``pmax`` and every class sum (the iterations',
  the loss's, :math:`A`, :math:`B`, the tangent's) by a ``psum`` over the vocabulary axis, and
  the label's logit comes from the shard that holds it. Every per-row value is then the same on
  all shards, and the gradient of each shard's logits is the closed form on its classes.
* Traced hyper-parameters (:math:`t_1`, :math:`t_2` or the smoothing a tracer under ``jit``,
  ``vmap``, ``grad``, ``jvp``): the config :class:`_Config` is a pytree whose leaves are the
  traced values, primal arguments of the custom JVP. Every choice a Python number makes (the
  exact softmax at :math:`t = 1`, the KL terms at :math:`t_1 = t_2 = 1`, fixed point or
  bisection, integer powers, leaving out a zero smoothing) becomes a formula valid for any value
  in range: per row a ``jnp.where`` whose unselected side holds no inf or NaN (a double
  ``where``, :func:`_one_minus`), and inside the passes over the logits a blend of finite values
  instead of a select, which XLA:CPU would store as a ``[..., V]`` array (:func:`_blend`; so the
  traced kernel keeps per-row temporaries only, too). For a traced :math:`t_2` all three
  normalizations are computed and one selected (under ``vmap`` a ``cond`` would compute all
  three too). With no traced value the program is exactly the specialised one. The custom JVP
  also gives the exact derivative wrt the smoothing (see :func:`_forward`) and refuses one wrt
  :math:`t_1` or :math:`t_2` (``NotImplementedError`` naming it).
* XLA:CPU specifics (why the row sums are laid out as they are, and the integer powers) are in
  :func:`_row_sums` and :class:`_TemperedExp`. At the defaults, fwd+bwd costs about 3x
  ``cross_entropy`` on CPU (``experiments/bench_bitempered.py``).

References:
  Amid, Warmuth, Anil, Koren, "Robust Bi-Tempered Logistic Loss Based on Bregman Divergences",
  NeurIPS 2019; reference code github.com/google/bi-tempered-loss.
"""

import dataclasses
import math
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple, TypeGuard

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from xent_jax.core import checks, engine, heads
from xent_jax.core import inputs as loss_inputs

# A temperature or a smoothed target's value: a Python float (static: the program is specialised to
# it) or a 0-d array (traced: the generic formulas below, valid for any value in range).
Scalar = float | jax.Array


def _static(value: Any) -> TypeGuard[float]:
  """Whether a hyper-parameter is a Python float (else a traced 0-d array)."""
  return isinstance(value, float)


def _static_zero(value: Scalar) -> bool:
  """Whether a hyper-parameter is a static 0 (its pass or term can be left out)."""
  return _static(value) and value == 0.0


def _one_minus(t: Scalar) -> Scalar:
  """:math:`1 - t`, the divisor of the tempered log and exp; for a traced ``t`` 1 where
  :math:`t = 1` (the inner select of a double ``where``: the branch for :math:`t \\ne 1`, computed
  and discarded at :math:`t = 1`, then holds no inf or NaN, nor does its derivative)."""
  return 1.0 - t if _static(t) else jnp.where(t == 1.0, 1.0, 1.0 - t)


def _pick(flag: bool | jax.Array, if_true: Callable[[], Any], if_false: Callable[[], Any]) -> Any:
  """``if_true()`` where ``flag`` holds, else ``if_false()``: for a Python bool only the one
  chosen is computed; for a traced one both are, and selected elementwise."""
  if isinstance(flag, bool):
    return if_true() if flag else if_false()
  return jnp.where(flag, if_true(), if_false())


def _blend(flag: bool | jax.Array, if_true: Callable[[], Any], if_false: Callable[[], Any]) -> Any:
  """:func:`_pick` without an elementwise select, for a traced ``flag`` whose two values are
  finite: :math:`a\\,x + (1-a)\\,y` with :math:`a \\in \\{0, 1\\}` (XLA:CPU stores a select that
  feeds a row sum as a ``[..., V]`` array; these products and sums fuse into the reduction)."""
  if isinstance(flag, bool):
    return if_true() if flag else if_false()
  a = flag.astype(jnp.result_type(float))
  return a * if_true() + (1.0 - a) * if_false()


def _log_t_of_log(log_x, t: Scalar):
  """:math:`\\log_t x` from :math:`\\log x` (``-inf`` at :math:`x = 0`) for :math:`t \\in [0, 1]`.

  For a traced :math:`t`, without an elementwise select (see :func:`_blend`): for :math:`t < 1`,
  :math:`\\log_t x = \\mathrm{expm1}((1-t)\\log x)/(1-t) \\ge \\log x`, so it is the larger of the
  two; at :math:`t = 1` the former gets :math:`-\\infty` added (it is finite there, with the
  exponent and divisor of :func:`_one_minus`), which leaves :math:`\\log x`."""
  if _static(t):
    return log_x if t == 1.0 else jnp.expm1((1.0 - t) * log_x) / (1.0 - t)
  k = _one_minus(t)
  return jnp.maximum(log_x, jnp.expm1(k * log_x) / k + jnp.where(t == 1.0, -jnp.inf, 0.0))


def _log_t(u, t: Scalar):
  """:math:`\\log_t u` of a per-row array (or a Python float)."""
  at_one = lambda: math.log(u) if isinstance(u, float) else jnp.log(u)
  return _pick(t == 1.0, at_one, lambda: (u ** (1.0 - t) - 1.0) / _one_minus(t))


class _TemperedExp:
  """:math:`e = \\exp_t(u)` of a ``[..., V]`` array and the powers of it the loss needs.

  With the base :math:`b = [1 + (1-t)u]_+`, :math:`e^k = b^{k/(1-t)}`, taken as
  :math:`\\exp(k \\log e)` (XLA:CPU's ``pow`` is about five times slower than an ``exp`` and a
  ``log``). On CPU, when :math:`k/(1-t)` is a small integer (the defaults :math:`t_1 = 0.8`,
  :math:`t_2 = 1.2` make every power used here one: :math:`e = b^{-5}`, :math:`e^{t_2} = b^{-6}`,
  ...) it is a few multiplications instead (of :math:`1/b`, one division, for negative powers),
  about 1.5x faster there; other backends keep ``exp``/``log``, which compile faster for TPU.

  A traced :math:`t` (or :math:`k`) takes :math:`\\exp(k \\log e)`, where :math:`\\log e` is
  :math:`u` at :math:`t = 1` (unless ``not_one`` says that :math:`t \\ne 1`), blended in without a
  select (see :func:`log`).
  """

  _MAX_INTEGER_POWER = 12

  def __init__(self, u: jax.Array, t: Scalar, not_one: bool = False):
    self.u, self.t, self.not_one = u, t, not_one
    self.exact = _static(t) and t == 1.0
    self.blended = not (self.exact or _static(t) or not_one)
    if self.blended:  # u finite: at t = 1, (1 - t) u is then 0, not NaN (see `log`)
      self.finite_u = jnp.maximum(u, -jnp.finfo(u.dtype).max)
      self.base = jnp.maximum(1.0 + (1.0 - t) * self.finite_u, 0.0)
    elif not self.exact:
      self.base = jnp.maximum(1.0 + (1.0 - t) * u, 0.0)
      if _static(t):  # unused (and removed by XLA) unless a power is negative
        self.reciprocal = 1.0 / self.base

  def _integer_exponent(self, k: Scalar) -> int | None:
    """:math:`k/(1-t)` when it is a small nonzero integer, else None (also for a traced value)."""
    if not (_static(self.t) and _static(k)):
      return None
    n = k / (1.0 - self.t)
    whole = round(n)
    return whole if abs(n - whole) < 1e-9 and 0 < abs(whole) <= self._MAX_INTEGER_POWER else None

  def log(self) -> jax.Array:
    """:math:`\\log e`, ``-inf`` outside the support (:math:`t < 1`).

    For a traced :math:`t` that may be 1, :math:`a u' + (1-a) \\log(b')/(1-t) + (u - u')` with
    :math:`a = [t = 1]`, :math:`u' = \\max(u, -\\text{float max})` and :math:`b'` the base of
    :math:`u'`: both parts are finite where they are not taken, and :math:`u - u'` is 0 but for
    :math:`u = -\\infty`, which it passes on (:func:`_blend`)."""
    if self.exact:
      return self.u
    if not self.blended:
      return jnp.log(self.base) / (1.0 - self.t)
    tempered = lambda: jnp.log(self.base) / _one_minus(self.t)
    return _blend(self.t == 1.0, lambda: self.finite_u, tempered) + (self.u - self.finite_u)

  def power(self, k: Scalar) -> jax.Array:
    """:math:`e^k` for :math:`k \\ne 0` (0 where :math:`e = 0` and :math:`k > 0`)."""
    if self.exact:
      return jnp.exp(k * self.u)
    whole = self._integer_exponent(k)
    generic = lambda: jnp.exp(k * self.log())
    if whole is None:
      return generic()
    factor = self.base if whole > 0 else self.reciprocal
    return lax.platform_dependent(cpu=lambda: lax.integer_pow(factor, abs(whole)), default=generic)

  def power_minus_one(self, k: Scalar) -> jax.Array:
    """:math:`e^k - 1`, with ``expm1`` unless the power is a few multiplications."""
    if self.exact:
      return jnp.expm1(k * self.u)
    generic = lambda: jnp.expm1(k * self.log())
    if self._integer_exponent(k) is None:
      return generic()
    return lax.platform_dependent(cpu=lambda: self.power(k) - 1.0, default=generic)


def _exp_t(u: jax.Array, t: Scalar) -> jax.Array:
  """:math:`\\exp_t u` for :math:`t \\ne 1` (the normalization's iterations)."""
  return _TemperedExp(u, t, not_one=True).power(1.0)


class _Normalization(NamedTuple):
  """:math:`\\lambda = m + d` per row: the row maximum :math:`m` and the shift :math:`d`, kept apart
  so that :math:`x_c - \\lambda = (x_c - m) - d` is exact for logits of large magnitude."""

  max: jax.Array
  shift: jax.Array


def _row_max(logits: jax.Array, vocab_axis: Hashable | None) -> jax.Array:
  """``[...]`` :math:`\\max_c x_c` in the compute dtype (``pmax`` over ``vocab_axis``); 0 for a
  row of ``-inf``."""
  m = jnp.max(logits, axis=-1).astype(loss_inputs.compute_dtype(logits.dtype))
  if vocab_axis is not None:
    m = lax.pmax(m, vocab_axis)
  return engine.finite_or_zero(m)


def _centred(logits: jax.Array, m: jax.Array, *tie: jax.Array) -> jax.Array:
  """``[..., V]`` :math:`x - m` in the compute dtype.

  Every pass reads the logits through its own optimization barrier, tied to a per-row value
  that only this pass uses (``tie``: the loop carry inside an iteration): without it XLA shares
  (and stores) one ``[..., V]`` float32 copy of the logits between the passes, or hoists it out
  of the iteration loop; identical barriers would be merged.
  """
  logits, m, _ = lax.optimization_barrier((logits, m, tie))
  return logits.astype(m.dtype) - m[..., None]


def _fixed_point_shift(logits, m, t: Scalar, num_iters: int, vocab_axis) -> jax.Array:
  """:math:`d = -\\log_t(1/Z)` for :math:`t > 1` by the paper's iteration
  :math:`a \\leftarrow a_0 Z(a)^{1-t}`, :math:`Z(a) = \\sum_c \\exp_t(a_c)`, carried as
  :math:`a = s\\,a_0`; ``[...]``. The loop runs once more than ``num_iters`` to give the final
  :math:`Z` (every pass over the logits inside the loop)."""

  def step(_, carry):
    s, _ = carry
    partition = engine.class_sum(_exp_t(_centred(logits, m, s) * s[..., None], t), vocab_axis)
    return partition ** (1.0 - t), partition

  ones = jnp.ones_like(m)
  _, partition = lax.fori_loop(0, num_iters + 1, step, (ones, ones))
  return -_log_t(1.0 / partition, t)


def _bisection_shift(logits, m, t: Scalar, num_iters: int, vocab_axis) -> jax.Array:
  """:math:`d` for :math:`t < 1` by bisection on :math:`\\sum_c \\exp_t(x_c - m - d) = 1`, in
  :math:`[0, -\\log_t(1/K)]` with :math:`K` the classes within the largest possible support."""
  # The count of c = x - (m - 1/(1-t)) > 0 as sum_c (sign c + |sign c|) / 2, free of constants,
  # compares and selects: XLA:CPU then fuses the whole count into one reduction (any of those
  # feeding its YNNPACK reductions is stored as a [..., V] array first).
  sign = jnp.sign(_centred(logits, m - 1.0 / (1.0 - t)))
  support = engine.class_sum(sign + jnp.abs(sign), vocab_axis) / 2.0

  def step(_, bounds):
    lower, upper = bounds
    middle = (lower + upper) / 2.0
    total = engine.class_sum(_exp_t(_centred(logits, m, middle) - middle[..., None], t), vocab_axis)
    too_small = total < 1.0
    return jnp.where(too_small, lower, middle), jnp.where(too_small, middle, upper)

  bounds = (jnp.zeros_like(m), -_log_t(1.0 / support, t))
  lower, upper = lax.fori_loop(0, num_iters, step, bounds)
  return (lower + upper) / 2.0


def _softmax_shift(logits, m, vocab_axis) -> jax.Array:
  """:math:`d = \\log \\sum_c e^{x_c - m}` for :math:`t = 1`; ``[...]``."""
  return jnp.log(engine.class_sum(jnp.exp(_centred(logits, m)), vocab_axis))


def _any_temperature_shift(logits, m, t: Scalar, num_iters: int, vocab_axis) -> jax.Array:
  """:math:`d` for a traced :math:`t`: the exact, fixed-point and bisection shifts all computed
  (under ``vmap`` a ``cond`` would compute them all too) and the one for :math:`t` selected; the
  iterations not selected run at a stand-in temperature (2 or 1/2), so that none makes an inf
  or NaN."""
  exact = _softmax_shift(logits, m, vocab_axis)
  heavy = _fixed_point_shift(logits, m, jnp.where(t > 1.0, t, 2.0), num_iters, vocab_axis)
  light = _bisection_shift(logits, m, jnp.where(t < 1.0, t, 0.5), num_iters, vocab_axis)
  return jnp.where(t == 1.0, exact, jnp.where(t > 1.0, heavy, light))


def _normalization(
  logits: jax.Array, t: Scalar, num_iters: int, vocab_axis: Hashable | None = None
) -> _Normalization:
  """:math:`\\lambda` of the tempered softmax over the last axis, as ``(max, shift)``; with
  ``vocab_axis`` (inside ``shard_map``) the last axis is one shard of the classes, and the max and
  every class sum are completed over the shards (``pmax``/``psum``)."""
  m = _row_max(logits, vocab_axis)
  if not _static(t):
    shift = _any_temperature_shift(logits, m, t, num_iters, vocab_axis)
  elif t == 1.0:
    shift = _softmax_shift(logits, m, vocab_axis)
  elif t > 1.0:
    shift = _fixed_point_shift(logits, m, t, num_iters, vocab_axis)
  else:
    shift = _bisection_shift(logits, m, t, num_iters, vocab_axis)
  return _Normalization(m, shift)


def _probs(logits: jax.Array, norm: _Normalization, t: Scalar, *tie: jax.Array) -> _TemperedExp:
  """``[..., V]`` :math:`p_c = \\exp_t((x_c - m) - d)` (``tie``: see :func:`_centred`)."""
  return _TemperedExp(_centred(logits, norm.max, norm.shift, *tie) - norm.shift[..., None], t)


def tempered_softmax(
  logits: jax.typing.ArrayLike, t: float, *, axis: int = -1, num_iters: int = 5
) -> jax.Array:
  r"""Tempered softmax :math:`p_c = \exp_t(x_c - \lambda(x))`, :math:`\sum_c p_c = 1`.

  ``t = 1`` is the softmax; ``t > 1`` has a heavier tail, ``t < 1`` a finite support.

  Args:
    logits: ``[..., C, ...]`` float logits, classes on ``axis``.
    t: temperature :math:`t > 0`, a Python float.
    axis: the class axis.
    num_iters: iterations of the normalization (fixed point for ``t > 1``, bisection for
      ``t < 1``), a Python int.

  Returns:
    Probabilities of ``logits.shape`` (float32, float64 for float64 logits).

  Example:
    >>> import jax.numpy as jnp, xent_jax
    >>> p = xent_jax.tempered_softmax(jnp.array([2.0, 0.5, -1.0]), 1.5, num_iters=30)
    >>> round(float(p.sum()), 4)
    1.0

  References:
    Amid, Warmuth, Anil, Koren, "Robust Bi-Tempered Logistic Loss Based on Bregman Divergences",
    NeurIPS 2019.
  """
  fn = "tempered_softmax"
  checks.check_floating(fn, "logits", logits)
  checks.check_static_number(fn, "t", t)
  checks.check_in_range(fn, "t", t, 0.0, math.inf, low_open=True, high_open=True)
  _check_num_iters(fn, num_iters)
  logits = jnp.asarray(logits)
  axis = checks.canonical_axis(fn, axis, logits.ndim)
  x = jnp.moveaxis(logits, axis, -1)
  t = float(t)
  p = _probs(x, _normalization(x, t, num_iters), t).power(1.0)
  return jnp.moveaxis(p, -1, axis)


def _check_num_iters(fn: str, num_iters) -> None:
  if not isinstance(num_iters, int) or isinstance(num_iters, bool):
    raise TypeError(f"{fn}: `num_iters` must be a Python int, got {num_iters!r}.")
  checks.check_in_range(fn, "num_iters", num_iters, 1, math.inf)


@dataclasses.dataclass(frozen=True)
class _Config:
  """The loss's settings; ``on``/``off`` are the smoothed target's two values for integer
  labels, and for probability labels
  :math:`q \\leftarrow (1 - V\\,\\text{off})\\,q + \\text{off}`. ``num_classes`` is the
  global :math:`V`; with ``vocab_axis`` (inside ``shard_map``) each shard holds ``[..., V_s]``
  logits of classes :math:`[sV_s, (s+1)V_s)` and every sum over the classes is a ``psum``.

  A pytree whose leaves are the traced ones of ``t1``, ``t2``, ``on``, ``off`` (0-d arrays); the
  Python floats and the rest are static (its treedef), so with no traced value it is all static
  and the kernel is specialised to the values as before."""

  t1: Scalar
  t2: Scalar
  num_iters: int
  on: Scalar
  off: Scalar
  num_classes: int
  vocab_axis: Hashable | None = None

  @property
  def power(self) -> Scalar:
    return 2.0 - self.t1

  @property
  def kl(self) -> bool | jax.Array:
    """:math:`t_1 = t_2 = 1`: the KL divergence, whose power terms cancel exactly (a traced bool
    if a temperature is traced)."""
    if _static(self.t1) and _static(self.t2):
      return self.t1 == self.t2 == 1.0
    return (self.t1 == 1.0) & (self.t2 == 1.0)

  def hyperparameters(self) -> dict[str, Scalar]:
    """The values a traced hyper-parameter may be (the pytree's possible leaves), by field."""
    return {"t1": self.t1, "t2": self.t2, "on": self.on, "off": self.off}


def _flatten_config(cfg: _Config):
  """Leaves: the traced values; treedef: the static ones (None where traced) and the rest."""
  values = cfg.hyperparameters()
  children = [v for v in values.values() if not _static(v)]
  statics = tuple(v if _static(v) else None for v in values.values())
  return children, (statics, cfg.num_iters, cfg.num_classes, cfg.vocab_axis)


def _unflatten_config(aux, children) -> _Config:
  statics, num_iters, num_classes, vocab_axis = aux
  traced = iter(children)
  t1, t2, on, off = (next(traced) if v is None else v for v in statics)
  return _Config(t1, t2, num_iters, on, off, num_classes, vocab_axis)


jax.tree_util.register_pytree_node(_Config, _flatten_config, _unflatten_config)


def loss_config(t1, t2, label_smoothing, num_iters, num_classes: int, vocab_axis=None) -> _Config:
  """The :class:`_Config` of checked hyper-parameters over ``num_classes`` (global) classes; with
  ``vocab_axis`` each row's sums run over the shards of that mesh axis. A traced value stays a
  0-d array (a traced smoothing over one class: ``off`` = 0, the caller's NaN rule applies)."""
  if not checks.any_traced(t1, t2, label_smoothing):
    off = label_smoothing / (num_classes - 1) if label_smoothing else 0.0
    return _Config(
      float(t1), float(t2), int(num_iters), 1.0 - label_smoothing, off, num_classes, vocab_axis
    )
  scalar = lambda v: v if checks.is_traced(v) else float(v)
  label_smoothing = scalar(label_smoothing)
  static_zero = checks.is_static_zero(label_smoothing)
  off = 0.0 if static_zero else label_smoothing / max(num_classes - 1, 1)
  on = 1.0 - label_smoothing
  return _Config(scalar(t1), scalar(t2), int(num_iters), on, off, num_classes, vocab_axis)


def _cast(cfg: _Config, dtype) -> _Config:
  """``cfg`` with its traced values in ``dtype`` (the logits' compute dtype)."""
  return jax.tree.map(lambda v: jnp.asarray(v, dtype), cfg)


def _target_term(q, cfg: _Config):
  """:math:`q\\log_{t_1} q - q^{2-t_1}/(2-t_1)` elementwise (the power part dropped for the KL
  divergence), exactly 0 where :math:`q = 0`; of a Python float or a ``[..., V]`` array (written
  without a select, see :func:`_row_sums`)."""
  if isinstance(q, float):
    if q == 0.0:
      return 0.0
    return q * _log_t(q, cfg.t1) - _pick(cfg.kl, lambda: 0.0, lambda: q**cfg.power / cfg.power)
  log_q = jnp.log(jnp.maximum(q, jnp.finfo(q.dtype).tiny))
  q_to_1_minus_t1 = jnp.exp((1.0 - cfg.t1) * log_q)  # q^(2 - t1) = q * q^(1 - t1) is 0 at q = 0
  if _static(cfg.t1):
    log_t1_q = log_q if cfg.t1 == 1.0 else (q_to_1_minus_t1 - 1.0) / (1.0 - cfg.t1)
  else:
    log_t1_q = _log_t_of_log(log_q, cfg.t1)
  term = q * log_t1_q
  power_part = lambda: q * q_to_1_minus_t1 / cfg.power
  if isinstance(cfg.kl, bool):
    return term if cfg.kl else term - power_part()
  return term - _blend(cfg.kl, lambda: 0.0, power_part)


def _target_slope(q: jax.Array, cfg: _Config) -> jax.Array:
  """:math:`\\partial/\\partial q` of :func:`_target_term`: :math:`\\log_{t_1} q` (plus 1 for the
  KL divergence, whose power part is dropped), elementwise; at :math:`q = 0` it is
  :math:`-1/(1-t_1)`, or :math:`-\\infty` for :math:`t_1 = 1`."""
  return _log_t_of_log(jnp.log(q), cfg.t1) + _blend(cfg.kl, lambda: 1.0, lambda: 0.0)


def _log_t1(p: _TemperedExp, t1: Scalar) -> jax.Array:
  """:math:`\\log_{t_1} p` (finite for :math:`t_1 < 1`, also at ``p = 0``)."""
  if not _static(t1):
    return _log_t_of_log(p.log(), t1)
  return p.log() if t1 == 1.0 else p.power_minus_one(1.0 - t1) / (1.0 - t1)


def _forget(p: _TemperedExp, cfg: _Config) -> jax.Array:
  """The forget factor :math:`p^{t_2-t_1}`; where :math:`p = 0` its limit: 1 for
  :math:`t_1 = t_2 = 1` (softmax underflow), else 0 (outside the support). Without a select:
  for :math:`t_2 < t_1` it is :math:`\\mathrm{sign}(p) \\min(p^{t_2-t_1}, \\text{float max})`."""
  exponent = cfg.t2 - cfg.t1
  if not _static(exponent):
    return _any_forget(p, cfg.kl, exponent)
  if cfg.kl:
    return jnp.ones_like(p.u)
  if exponent > 0:
    return p.power(exponent)
  positive = jnp.sign(p.power(1.0))
  if exponent == 0:
    return positive
  return positive * jnp.minimum(p.power(exponent), jnp.finfo(p.u.dtype).max)


def _any_forget(p: _TemperedExp, kl: bool | jax.Array, exponent: Scalar) -> jax.Array:
  """:func:`_forget` for traced temperatures, without an elementwise select (see :func:`_blend`):
  :math:`\\min(p^{t_2-t_1}, \\text{float max})`, times :math:`\\mathrm{sign}(p)` unless
  :math:`t_2 > t_1` (where the power is 0 at :math:`p = 0`); 1 where :math:`t_1 = t_2 = 1`. The
  log is made finite so that a zero exponent gives 1, not NaN, at :math:`p = 0`."""
  big = jnp.finfo(p.u.dtype).max
  power = jnp.minimum(jnp.exp(exponent * jnp.maximum(p.log(), -big)), big)
  forget = lambda: power * _blend(exponent > 0.0, lambda: 1.0, lambda: jnp.sign(p.power(1.0)))
  return _blend(kl, lambda: 1.0, forget)


def _integer_target(logits: jax.Array, labels: jax.Array, cfg: _Config) -> jax.Array:
  """``[..., V_s]`` the smoothed one-hot target of global ``labels`` on this shard's classes,
  selected per class (never stored)."""
  local = engine.local_labels(labels, logits.shape[-1], cfg.vocab_axis)
  classes = lax.broadcasted_iota(local.dtype, logits.shape, logits.ndim - 1)
  on = jnp.asarray(cfg.on, loss_inputs.compute_dtype(logits.dtype))
  return jnp.where(classes == local[..., None], on, cfg.off)


def _label_logit(logits: jax.Array, labels: jax.Array, vocab_axis: Hashable | None) -> jax.Array:
  """``[...]`` :math:`x_y` of global ``labels`` in ``[0, V)``, in the compute dtype: gathered on
  the shard that holds class :math:`y`, 0 on the others, summed over ``vocab_axis``."""
  num_local = logits.shape[-1]
  local = engine.local_labels(labels, num_local, vocab_axis)
  index = jnp.clip(local, 0, num_local - 1)[..., None]
  raw = jnp.take_along_axis(lax.optimization_barrier(logits), index, axis=-1)[..., 0]
  raw = raw.astype(loss_inputs.compute_dtype(logits.dtype))
  if vocab_axis is None:
    return raw
  owned = (local >= 0) & (local < num_local)
  return lax.psum(jnp.where(owned, raw, jnp.zeros_like(raw)), vocab_axis)


def _smoothed(labels: jax.Array, cfg: _Config, dtype) -> jax.Array:
  """Probability labels smoothed: :math:`(1 - V\\,\\text{off})\\,q + \\text{off}`."""
  q = labels.astype(dtype)
  return q if _static_zero(cfg.off) else (1.0 - cfg.num_classes * cfg.off) * q + cfg.off


class _Residuals(NamedTuple):
  """Per-row values the gradient is computed from (besides the inputs): :math:`\\lambda`,
  :math:`A = \\sum_c (p_c - q_c) p_c^{t_2-t_1}` and :math:`B = \\sum_c p_c^{t_2}`."""

  norm: _Normalization
  delta_sum: jax.Array
  escort_sum: jax.Array


def _integer_rows(labels: jax.Array, valid: jax.Array, num_classes: int):
  """``(safe labels, bad)``: labels made safe to gather, and valid rows whose label lies outside
  ``[0, V)`` (their loss and gradient are NaN)."""
  in_range = (labels >= 0) & (labels < num_classes)
  return jnp.where(valid & in_range, labels, 0), valid & ~in_range


def _row_sums(logits, norm: _Normalization, t: Scalar, summands, vocab_axis) -> list[jax.Array]:
  """``[...]`` :math:`\\sum_c f(p_c)` for each ``summands`` function f of a `_TemperedExp` ``p``,
  each its own pass over the logits that recomputes :math:`p` (see
  :func:`xent_jax.core.engine.separate_sums`: on CPU this keeps every pass one fused reduction),
  then one ``psum`` of them all over ``vocab_axis``."""
  sum_of = lambda f: lambda: jnp.sum(f(_probs(logits, norm, t)), axis=-1)
  # `like` is typed like a shard's partial sums (varying over the vocabulary axis), not like the
  # completed per-row values such as norm.max.
  like = jnp.zeros_like(logits[..., 0], norm.max.dtype)
  sums = engine.separate_sums([sum_of(f) for f in summands], like=like)
  return sums if vocab_axis is None else lax.psum(sums, vocab_axis)


class _Sums:
  """The per-row sums :func:`_forward` asks for, named and deduplicated, computed together."""

  def __init__(self):
    self.summands = {}

  def add(self, key, summand):
    self.summands.setdefault(key, summand)
    return key

  def power(self, name: str, exponent: Scalar):
    """:math:`\\sum_c p_c^k` for :math:`k > 0` (0 where :math:`p_c = 0`); one sum for equal
    static exponents, ``name`` tells traced ones apart."""
    key = ("power", exponent if _static(exponent) else name)
    return self.add(key, lambda p: p.power(exponent))

  def compute(self, logits, norm, cfg: _Config) -> dict:
    summands = list(self.summands.values())
    return dict(zip(self.summands, _row_sums(logits, norm, cfg.t2, summands, cfg.vocab_axis)))


def _forward(
  logits, labels, valid, cfg: _Config, slopes: bool = False
) -> tuple[jax.Array, _Residuals, tuple[jax.Array, jax.Array] | None]:
  """``[...]`` loss (0 on invalid rows, NaN on bad ones), the per-row residuals and, with
  ``slopes``, the loss's per-row derivatives wrt ``on`` and ``off`` (else None).

  .. math::
     \\ell = \\sum_c \\big[q_c\\log_{t_1} q_c - \\tfrac{q_c^{2-t_1}}{2-t_1}\\big]
       - \\sum_c q_c \\log_{t_1} p_c + \\tfrac{1}{2-t_1}\\sum_c p_c^{2-t_1}, \\qquad
     A = \\sum_c p_c^{1+t_2-t_1} - \\sum_c q_c\\,p_c^{t_2-t_1}

  (for :math:`t_1 = t_2 = 1` the two power terms, which cancel for a normalized :math:`p`, are
  left out; a traced temperature selects them out where both are 1). Integer labels:
  :math:`\\sum_c q_c f_c = \\text{off}\\sum_c f_c + (\\text{on}-\\text{off})\\,f_y`, with
  :math:`f_y` from the label's logit. With static hyper-parameters the summands have no selects
  (see :func:`_row_sums`).

  The loss depends on the smoothing only through :math:`q`, with
  :math:`\\partial\\ell/\\partial q_c = \\log_{t_1} q_c - \\log_{t_1} p_c` (:func:`_target_slope`):
  for integer labels :math:`\\partial_{\\text{on}}\\ell = \\log_{t_1}\\text{on} - \\log_{t_1} p_y`
  and :math:`\\partial_{\\text{off}}\\ell = (V-1)\\log_{t_1}\\text{off} - \\sum_{c \\ne y}
  \\log_{t_1} p_c` from sums the loss takes anyway; for probability labels, through
  :math:`q' = (1 - V\\text{off})\\,q + \\text{off}`, one more row sum
  :math:`\\sum_c \\partial_{q'_c}\\ell\\,(1 - V q_c)`.
  """
  num_classes = cfg.num_classes
  dtype = loss_inputs.compute_dtype(logits.dtype)
  integer = jnp.issubdtype(labels.dtype, jnp.integer)
  norm = _normalization(logits, cfg.t2, cfg.num_iters, cfg.vocab_axis)
  sums = _Sums()
  escort_key = sums.power("escort", cfg.t2)
  p_forget_key = sums.power("p_forget", 1.0 + cfg.t2 - cfg.t1)
  # A traced kl (either value) takes the sums of both cases and selects.
  kl = cfg.kl
  power_key = None if kl is True else sums.power("power", cfg.power)
  smoothed = not _static_zero(cfg.off)
  if integer and smoothed:
    log_t1_key = sums.add("log_t1", lambda p: _log_t1(p, cfg.t1))
    forget_key = None if kl is True else sums.add("forget", lambda p: _forget(p, cfg))
  if not integer:
    # The smoothed labels are computed inside each pass (a [..., V] array if computed before).
    q = lambda: _smoothed(labels, cfg, dtype)
    # At t1 = 1, log p = -inf (p = 0) is clipped to the lowest float so that q = 0 gives 0.
    floor = jnp.finfo(dtype).min
    if _static(cfg.t1) and cfg.t1 != 1.0:
      log_t1_p = lambda p: _log_t1(p, cfg.t1)
    else:
      log_t1_p = lambda p: jnp.maximum(_log_t1(p, cfg.t1), floor)
    q_forget_key = sums.add("q_forget", lambda p: q() * _forget(p, cfg))
    target_key = sums.add("target", lambda p: _target_term(q(), cfg) - q() * log_t1_p(p))
    if slopes:
      slope = lambda p: (
        (_target_slope(q(), cfg) - log_t1_p(p)) * (1.0 - num_classes * labels.astype(dtype))
      )
      off_slope_key = sums.add("off_slope", slope)
  row = sums.compute(logits, norm, cfg)
  escort_sum, delta_sum = row[escort_key], row[p_forget_key]
  loss = _pick(kl, lambda: jnp.zeros_like(escort_sum), lambda: row[power_key] / cfg.power)
  if integer:
    labels, bad = _integer_rows(labels, valid, num_classes)
    raw = _label_logit(logits, labels, cfg.vocab_axis)
    target_p = _TemperedExp((raw - norm.max) - norm.shift, cfg.t2)
    log_t1_target = _log_t1(target_p, cfg.t1)
    cross = (cfg.on - cfg.off) * log_t1_target
    delta_sum = delta_sum - (cfg.on - cfg.off) * _forget(target_p, cfg)
    if smoothed:
      # sum_c log_t1 p_c is -inf where a class has p = 0 at t1 = 1: a traced off of 0 adds 0.
      log_t1_sum = row[log_t1_key]
      if _static(cfg.off):
        cross = cross + cfg.off * log_t1_sum
      else:
        cross = cross + jnp.where(cfg.off == 0.0, 0.0, cfg.off * log_t1_sum)
      delta_sum = delta_sum - cfg.off * _pick(kl, lambda: num_classes, lambda: row[forget_key])
    loss = loss + _target_term(cfg.on, cfg) + (num_classes - 1) * _target_term(cfg.off, cfg) - cross
    if slopes:
      on_slope = _target_slope(jnp.asarray(cfg.on), cfg) - log_t1_target
      off_slope = (num_classes - 1) * _target_slope(jnp.asarray(cfg.off), cfg)
      off_slope = off_slope + log_t1_target - log_t1_sum
  else:
    bad = jnp.zeros_like(valid)
    delta_sum = delta_sum - row[q_forget_key]
    loss = loss + row[target_key]
    if slopes:
      on_slope, off_slope = jnp.zeros_like(loss), row[off_slope_key]

  def rows_rule(x):  # 0 on rows that don't count, NaN on bad ones
    x = jnp.where(valid, x, jnp.zeros_like(x))
    return jnp.where(bad, jnp.full_like(x, jnp.nan), x)

  residuals = _Residuals(norm, delta_sum, escort_sum)
  return rows_rule(loss), residuals, (rows_rule(on_slope), rows_rule(off_slope)) if slopes else None


def _gradient(logits, labels, valid, res: _Residuals, cfg: _Config) -> jax.Array:
  """``[..., V]`` :math:`\\partial\\ell/\\partial x` from the inputs and the per-row residuals
  (zero on invalid rows, NaN on bad ones)."""
  p = _probs(logits, res.norm, cfg.t2)
  if jnp.issubdtype(labels.dtype, jnp.integer):
    labels, bad = _integer_rows(labels, valid, cfg.num_classes)
    q = _integer_target(logits, labels, cfg)
  else:
    bad = jnp.zeros_like(valid)
    q = _smoothed(labels, cfg, p.u.dtype)
  scale = res.delta_sum / res.escort_sum
  grad = (p.power(1.0) - q) * _forget(p, cfg) - p.power(cfg.t2) * scale[..., None]
  # Rows that don't count may hold anything (a row of -inf gives NaN above): select, not scale.
  grad = jnp.where(valid[..., None], grad, jnp.zeros_like(grad))
  return jnp.where(bad[..., None], jnp.full_like(grad, jnp.nan), grad)


def _tangent(logits, labels, valid, res: _Residuals, t_logits, cfg: _Config) -> jax.Array:
  """:math:`\\dot\\ell = \\sum_c \\partial_c\\ell\\,\\dot x_c`, linear in ``t_logits``."""
  grad = _gradient(logits, labels, valid, res, cfg)
  return engine.class_sum(grad * t_logits.astype(grad.dtype), cfg.vocab_axis)


@jax.custom_jvp
def _rows(logits, labels, valid, cfg):
  return _forward(logits, labels, valid, cfg)[0]


def _nonzero(tangent) -> bool:
  """Whether a hyper-parameter's tangent may be nonzero (traced, not a symbolic zero)."""
  return not _static(tangent) and not isinstance(tangent, SymbolicZero)


def _refuse_temperature_tangents(t_cfg: _Config) -> None:
  """Raises ``NotImplementedError`` naming a temperature that is differentiated: the closed form
  is the gradient wrt the logits (and the smoothing), not wrt :math:`t_1` or :math:`t_2`."""
  for name in ("t1", "t2"):
    if _nonzero(getattr(t_cfg, name)):
      raise NotImplementedError(
        f"bi_tempered_logistic_loss: the derivative wrt `{name}` is not implemented (the loss's "
        "closed-form gradient is wrt the logits and the label smoothing); differentiate wrt "
        f"those, or pass `{name}` through jax.lax.stop_gradient."
      )


def _rows_jvp(primals, tangents):
  logits, labels, valid, cfg = primals
  # The labels get no gradient (the closed form treats q as constant).
  t_logits, _, _, t_cfg = tangents
  _refuse_temperature_tangents(t_cfg)
  t_smoothing = (t_cfg.on, t_cfg.off)
  smoothed = any(_nonzero(t) for t in t_smoothing)
  loss, res, slopes = _forward(logits, labels, valid, cfg, slopes=smoothed)
  if isinstance(t_logits, SymbolicZero):
    tangent = jnp.zeros_like(loss)
  else:
    tangent_fn = jax.checkpoint(_tangent, policy=jax.checkpoint_policies.nothing_saveable)
    tangent = tangent_fn(logits, labels, valid, res, t_logits, cfg)
  if slopes is not None:
    for slope, t in zip(slopes, t_smoothing):
      if _nonzero(t):
        tangent = tangent + slope * t
  return loss, tangent


_rows.defjvp(_rows_jvp, symbolic_zeros=True)


def _loss_rows(logits, labels, valid, cfg: _Config) -> jax.Array:
  """``[...]`` per-row loss (:func:`_rows`); ``labels`` get no gradient, traced hyper-parameters
  are cast to the compute dtype."""
  cfg = _cast(cfg, loss_inputs.compute_dtype(logits.dtype))
  return _rows(logits, lax.stop_gradient(labels), valid, cfg)


def bi_tempered_rows(
  logits: jax.Array,
  labels: jax.Array,
  valid: jax.Array,
  *,
  t1: float,
  t2: float,
  label_smoothing: float = 0.0,
  num_iters: int = 5,
) -> jax.Array:
  r"""Per-row bi-tempered loss of a block of logits, unweighted and unreduced (no checks).

  The building block of :func:`xent_jax.bi_tempered_logistic_loss`, for callers that visit the
  logits in blocks (the fused linear head): differentiable in ``logits`` in both modes, with a
  per-row residual only.

  Args:
    logits: ``[T, V]`` (or ``[..., V]``) float logits, classes last; half precision is computed
      in float32.
    labels: ``[T]`` integer class ids (an id outside ``[0, V)`` on a valid row gives NaN for the
      loss and the gradient of that row), or ``[T, V]`` float target probabilities.
    valid: ``[T]`` bool, rows that count; the others give 0 with a zero gradient.
    t1, t2, label_smoothing, num_iters: as in :func:`xent_jax.bi_tempered_logistic_loss`
      (Python numbers or, but for ``num_iters``, traced scalars; checked by the caller, which
      also applies the NaN rule to traced values; ``label_smoothing`` needs ``V >= 2``).

  Returns:
    ``[T]`` loss (float32, float64 for float64 logits), to be multiplied by the row's target
    weight and reduced by the caller.
  """
  cfg = loss_config(t1, t2, label_smoothing, num_iters, logits.shape[-1])
  return _loss_rows(logits, labels, valid, cfg)


def weighted_rows(logits, labels, valid, weight, cfg: _Config) -> tuple[jax.Array, jax.Array]:
  """``([...] loss, [...] example weight)``: the per-row loss times the target's class weight
  (:math:`w_y`, or :math:`\\sum_c w_c q_c` for probability labels, through which alone they get
  gradients) and each row's weight in a 'mean' (:math:`w_y`, or 1, on valid rows).

  ``weight`` is ``[V_s]`` (this shard's slice with ``cfg.vocab_axis``) or None; integer
  ``labels`` are global class ids."""
  loss = _loss_rows(logits, labels, valid, cfg)
  dtype = loss.dtype
  if jnp.issubdtype(labels.dtype, jnp.integer):
    safe, _ = _integer_rows(labels, valid, cfg.num_classes)
    mass, _ = heads.target_weights(weight, safe, logits.shape[-1], dtype, cfg.vocab_axis)
    example_weight = jnp.where(valid, mass, jnp.zeros_like(mass))
  else:
    example_weight = valid.astype(dtype)
    if weight is None:
      return loss, example_weight
    q = jnp.where(valid[..., None], labels.astype(dtype), 0)
    w = heads.along_classes(jnp.asarray(weight).astype(dtype), q.ndim)
    mass = engine.class_sum(q * w, cfg.vocab_axis)
  return jnp.where(valid, loss * mass, loss), example_weight


def check_hparams(fn: str, t1, t2, label_smoothing, num_iters) -> tuple[Any, ...]:
  """Checks the loss's hyper-parameters (real numbers in range, ``num_iters`` a Python int); the
  error names ``fn``. ``t1``, ``t2`` and ``label_smoothing`` may be traced scalars: returns their
  flags for :func:`xent_jax.core.checks.nan_unless` (``True`` for a concrete value)."""
  _check_num_iters(fn, num_iters)
  return (
    checks.check_in_range(fn, "t1", t1, 0.0, 1.0),
    checks.check_in_range(fn, "t2", t2, 0.0, math.inf, low_open=True, high_open=True),
    checks.check_in_range(fn, "label_smoothing", label_smoothing, 0.0, 1.0, high_open=True),
  )


def check_smoothable(fn: str, label_smoothing, num_classes: int) -> Any:
  """Refuses label smoothing over fewer than 2 classes (its off value divides by ``K - 1``); for
  a traced ``label_smoothing`` returns the flag (for :func:`xent_jax.core.checks.nan_unless`)
  that it is 0 there, else ``True``."""
  if checks.is_traced(label_smoothing):
    return True if num_classes >= 2 else label_smoothing == 0.0
  if label_smoothing and num_classes < 2:
    raise ValueError(f"{fn}: `label_smoothing` needs at least 2 classes, got {num_classes}.")
  return True
