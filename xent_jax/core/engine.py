r"""The row-statistics engine: every softmax loss as a per-row function of a few statistics.

Cross-entropy and its variants depend on a logits row :math:`x \in \mathbb{R}^V` (after the
optional soft cap :math:`x \leftarrow c\tanh(x/c)`) only through a few per-row numbers. With the
row maximum :math:`m` as a numerical reference point, :math:`p = \mathrm{softmax}(x)` and
:math:`\log p_c = x_c - \mathrm{lse}`:

.. math::
   \underbrace{\log\sum_c e^{x_c - m}}_{\texttt{log\_sum}}, \qquad
   \underbrace{x_y - m}_{\texttt{target}}, \qquad
   \underbrace{\sum_c \beta^{(k)}_c f_k(\log p_c)}_{\texttt{class\_sums[k]}}, \qquad
   \underbrace{\sum_c p_c (x_c - m)}_{\texttt{mean\_logit}}

for an integer label :math:`y`, per-class functions :math:`f_k` with weights :math:`\beta^{(k)}`
(``[V]`` class weights, or a ``[..., V]`` target such as probability labels) and, for the entropy
:math:`H(p) = \texttt{log\_sum} - \texttt{mean\_logit}`, the mean logit. A loss (a *head*) is any
JAX function of these statistics, differentiated by ordinary autodiff; :func:`row_stats` is the
one ``[..., V]`` kernel, with a custom JVP whose tangent is linear in the logits' tangent
:math:`\dot x`:

.. math::
   \dot{\texttt{log\_sum}} = \textstyle\sum_c p_c \dot x_c, \quad
   \dot{\texttt{target}} = \dot x_y, \quad
   \dot{\texttt{class\_sums}}[k]
     = \textstyle\sum_c \big(\beta_c f_k'(\log p_c) - p_c B_k\big)\dot x_c
   + \sum_c f_k(\log p_c)\,\dot\beta_c, \quad
   \dot{\texttt{mean\_logit}} = \textstyle\sum_c p_c (x_c - m - E + 1)\,\dot x_c

with :math:`B_k = \sum_c \beta_c f_k'(\log p_c)`, :math:`E = \texttt{mean\_logit}` and
:math:`\dot m = 0` (the reference point moves with no statistic that a head can observe: every
head depends on the row only through :math:`\mathrm{lse} = m + \texttt{log\_sum}`,
:math:`x_y = m + \texttt{target}` and shift-free sums). The tangent is computed under
``jax.checkpoint``, so reverse mode (which transposes it) recomputes :math:`p` from the logits and
the per-row statistics and keeps no ``[..., V]`` residual; forward mode (``jax.jvp``,
``jax.jacfwd``, ``jax.linearize``) works as well. The recomputed :math:`p` is written as
:math:`e^{x - m} / e^{\texttt{log\_sum}}`, the forward pass's own exponential, so that under one
``jit`` of value and gradient XLA computes it once per element for float32 logits
(:func:`shares_forward_exp`).

References:
  Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018 (statistics relative
  to the maximum); Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024
  (losses from per-row statistics, gradients recomputed from the logits).
"""

import dataclasses
import functools
from collections.abc import Callable, Hashable
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from xent_jax.core.inputs import compute_dtype

ClassFn = Callable[[jax.Array], jax.Array]


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
  """Gemma 2's logit soft cap :math:`c\\tanh(x/c)`; the identity when ``cap`` is None."""
  return x if cap is None else cap * jnp.tanh(x / cap)


def softcap_grad(capped: jax.Array, cap: float | None) -> jax.Array | float:
  """:math:`d(c\\tanh(x/c))/dx = 1 - (\\text{capped}/c)^2`, from the capped value."""
  return 1.0 if cap is None else 1.0 - jnp.square(capped / cap)


def logsumexp_parts(
  logits: jax.Array, cap: float | None = None, vocab_axis: Hashable | None = None
) -> tuple[jax.Array, jax.Array]:
  """The row maximum :math:`m` and :math:`\\log\\sum_c e^{x_c - m}` of
  :math:`x = c\\tanh(\\text{logits}/c)` over the last axis.

  Keeping the two apart (rather than their sum, the logsumexp) keeps :math:`x_c - m` exact for
  logits of large magnitude (at 1e4 a float32 logsumexp is only good to ~1e-3). Accumulates in
  :func:`compute_dtype`; the maximum is taken on the raw logits (exact in any dtype, and the cap
  is monotonic), so half-precision logits are never copied to float32 whole. ``-inf`` entries are
  fine; a row of all ``-inf`` gives :math:`m = 0` and ``-inf``. With ``vocab_axis`` (inside
  ``shard_map``) the last axis is one shard of the classes and both are over all shards
  (``pmax`` and ``psum``).
  """
  dtype = compute_dtype(logits.dtype)
  m = softcap(jnp.max(logits, axis=-1).astype(dtype), cap)
  if vocab_axis is not None:
    # No value depends on the reference point m (pmax has no derivative rule): held constant.
    m = lax.pmax(lax.stop_gradient(m), vocab_axis)
  m = finite_or_zero(m)
  x = softcap(logits.astype(dtype), cap)
  return m, jnp.log(class_sum(jnp.exp(x - m[..., None]), vocab_axis))


def logsumexp(logits: jax.Array, cap: float | None = None) -> jax.Array:
  """:math:`\\log\\sum_c e^{x_c}` over the last axis of :math:`x = c\\tanh(\\text{logits}/c)`,
  from :func:`logsumexp_parts` (``-inf`` for a row of ``-inf``)."""
  m, log_sum = logsumexp_parts(logits, cap)
  return m + log_sum


def class_sum(values: jax.Array, vocab_axis: Hashable | None) -> jax.Array:
  """Sum over the classes: the last axis, and the vocabulary shards when ``vocab_axis`` is set."""
  total = jnp.sum(values, axis=-1)
  return total if vocab_axis is None else lax.psum(total, vocab_axis)


def finite_or_zero(x: jax.Array) -> jax.Array:
  """``x`` where finite, else 0: a safe reference point for :math:`e^{x - m}` when a row's
  maximum is :math:`-\\infty` (every class masked) or a sum is empty."""
  return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def shard_start(num_local: int, vocab_axis: Hashable | None):
  """The global id of this shard's first class: :math:`s V_s` on shard :math:`s` of
  ``vocab_axis`` (inside ``shard_map``), 0 without one."""
  if vocab_axis is None:
    return 0
  return lax.axis_index(vocab_axis) * num_local


def local_labels(labels: jax.Array, num_local: int, vocab_axis: Hashable | None) -> jax.Array:
  """Global class ids as indices into this shard's classes (outside ``[0, V_local)`` when
  another shard owns them)."""
  if vocab_axis is None:
    return labels
  return labels - jnp.asarray(shard_start(num_local, vocab_axis)).astype(labels.dtype)


def rescaled_sum(sum_exp: jax.Array, part_max: jax.Array, new_max: jax.Array) -> jax.Array:
  """:math:`S e^{m_p - m}`: a partial :math:`S = \\sum_c e^{x_c - m_p}` over some classes,
  taken relative to a new maximum :math:`m \\ge m_p` (the online-softmax rescaling; Milakov &
  Gimelshein 2018). :math:`m = -\\infty` (no class yet) is read as 0."""
  return sum_exp * jnp.exp(part_max - finite_or_zero(new_max))


def merge_max_sums(a_max, a_sum, b_max, b_sum) -> tuple[jax.Array, jax.Array]:
  """The maximum and :math:`\\sum e^{x - m}` of the union of two disjoint class sets, from each
  set's own (the online-softmax merge)."""
  m = jnp.maximum(a_max, b_max)
  return m, rescaled_sum(a_sum, a_max, m) + rescaled_sum(b_sum, b_max, m)


def complete_max_sum(part_max, part_sum, vocab_axis: Hashable) -> tuple[jax.Array, jax.Array]:
  """:func:`merge_max_sums` over every shard of ``vocab_axis`` (``pmax``, then ``psum`` of the
  rescaled sums), inside ``shard_map``."""
  m = lax.pmax(part_max, vocab_axis)
  return m, lax.psum(rescaled_sum(part_sum, part_max, m), vocab_axis)


class RowStats(NamedTuple):
  """Per-row statistics of a logits row, relative to the row maximum (see the module docstring).

  Attributes:
    max: ``[...]`` the reference point :math:`m` (the row maximum; zero tangent).
    log_sum: ``[...]`` :math:`\\log\\sum_c e^{x_c - m}`.
    target: ``[...]`` :math:`x_y - m` (0 without integer labels).
    class_sums: one ``[...]`` array per requested :math:`\\sum_c \\beta_c f(\\log p_c)`.
    mean_logit: ``[...]`` :math:`\\sum_c p_c (x_c - m)` (0 unless requested).
  """

  max: jax.Array
  log_sum: jax.Array
  target: jax.Array
  class_sums: tuple[jax.Array, ...]
  mean_logit: jax.Array

  @property
  def lse(self) -> jax.Array:
    """:math:`\\mathrm{lse} = \\log\\sum_c e^{x_c}`."""
    return self.max + self.log_sum

  @property
  def log_p_target(self) -> jax.Array:
    """:math:`\\log p_y = (x_y - m) - \\texttt{log\\_sum}`, without cancellation at large logits."""
    return self.target - self.log_sum

  @property
  def entropy(self) -> jax.Array:
    """:math:`H(p) = -\\sum_c p_c \\log p_c = \\texttt{log\\_sum} - \\texttt{mean\\_logit}`."""
    return self.log_sum - self.mean_logit


class PowerSeries(NamedTuple):
  """A per-class function of the form :math:`f(\\log p) = a\\log p + c + \\sum_j b_j p^j`.

  Then :math:`\\sum_c \\beta_c f = a\\sum_c\\beta_c\\log p_c + c\\sum_c\\beta_c + \\sum_j b_j S_j`
  and :math:`\\sum_c \\beta_c f' = a\\sum_c\\beta_c + \\sum_j j\\,b_j S_j` with the power sums
  :math:`S_j = \\sum_c \\beta_c p_c^j`: one pass over the logits per power (none for
  :math:`S_1 = 1` with unit weights) and one for :math:`\\sum_c \\beta_c \\log p_c` when
  :math:`a \\ne 0`, where a general :math:`f` needs a value and a slope pass. Cross-entropy's
  :math:`-\\log p` is ``PowerSeries(-1.0)``; poly-1, :math:`L_q` and Taylor cross-entropy have
  powers of :math:`p`.

  A single term is exact under any weights. With several, the sum is formed from terms larger
  than it where the weight sits on classes with :math:`p \\to 1`, so :mod:`xent_jax.core.heads` uses
  them with unit weights only, where every class with :math:`p \\approx 0` adds :math:`c`.

  Attributes:
    log_coef: :math:`a`.
    constant: :math:`c`.
    powers: ``((j, b_j), ...)``, :math:`j > 0`.
  """

  log_coef: float
  constant: float = 0.0
  powers: tuple[tuple[float, float], ...] = ()

  @property
  def single_term(self) -> bool:
    return (self.log_coef != 0) + (self.constant != 0) + len(self.powers) <= 1


class ClassSum(NamedTuple):
  """One requested statistic :math:`\\sum_c \\beta_c f(\\log p_c)`.

  Attributes:
    fn: elementwise :math:`f` of :math:`\\log p` (a static Python callable).
    operands: arrays that ``beta_fn`` makes :math:`\\beta` of (differentiable); none for
      :math:`\\beta = 1`.
    beta_fn: static callable, ``beta_fn(*operands)`` is :math:`\\beta`, ``[V]`` or ``[..., V]``
      (without operands: every weight is 1). The kernel recomputes it in the backward pass, so
      a :math:`\\beta` made of a smoothed target or a product of class weights is never kept
      between the passes.
    series: ``fn`` as a :class:`PowerSeries` (the same function), or None. The kernel then
      forms the sum and its slope total :math:`B` from power sums instead of a value and a slope
      pass.
  """

  fn: ClassFn
  operands: tuple[jax.Array, ...] = ()
  beta_fn: Callable[..., jax.Array] = lambda beta: beta
  series: PowerSeries | None = None


def _over_rows(beta: jax.Array, shape) -> jax.Array:
  """``beta`` (``[V]`` or ``[..., V]``) broadcast to ``shape`` along its trailing axes."""
  return lax.broadcast_in_dim(beta, shape, tuple(range(len(shape) - beta.ndim, len(shape))))


def _times_beta(values: jax.Array, beta: jax.Array | None) -> jax.Array:
  """``values * β`` with ``β`` broadcast over the rows; ``β`` None (all ones) multiplies nothing:
  on XLA:CPU a ``[V]`` weight broadcast over the rows makes the fused pass several times
  slower."""
  return values if beta is None else values * _over_rows(beta, values.shape)


def _beta(beta_fn, operands, dtype) -> jax.Array | None:
  """:math:`\\beta` of a :class:`ClassSum` in ``dtype``; None (all ones) without operands."""
  return beta_fn(*operands).astype(dtype) if operands else None


@dataclasses.dataclass(frozen=True)
class _Config:
  logit_softcap: float | None
  class_fns: tuple[ClassFn, ...]
  beta_fns: tuple[Callable[..., jax.Array], ...]
  series: tuple[PowerSeries | None, ...]
  entropy: bool
  vocab_axis: Hashable | None = None


def floor_log_p(log_p: jax.Array) -> jax.Array:
  """:math:`\\max(\\log p, \\text{finfo.min}/4)`: keeps :math:`f(\\log p)` finite where
  :math:`p = 0`, so that a zero weight gives an exact 0 without a ``select`` (XLA's CPU backend
  does not fuse a data-dependent ``select`` into a reduction and would materialise a ``[..., V]``
  temporary for it). Never differentiated: the kernel's own JVP defines the derivatives.
  """
  return jnp.maximum(log_p, jnp.finfo(log_p.dtype).min / 4)


def class_terms(f: ClassFn, beta: jax.Array | None, log_p) -> tuple[jax.Array, jax.Array]:
  """``(β f(log p), β f'(log p))`` elementwise: exactly 0 where ``β == 0``, also where
  :math:`\\log p = -\\infty` (``f`` is evaluated at :func:`floor_log_p` there, and must be finite
  at that value). ``β`` None means all ones (:func:`_times_beta`)."""
  safe = floor_log_p(log_p)
  value, slope = jax.jvp(f, (safe,), (jnp.ones_like(safe),))
  return _times_beta(value, beta), _times_beta(slope, beta)


def _power_of_p(j: float, p: jax.Array, log_p: jax.Array) -> jax.Array:
  """:math:`p^j` elementwise: an integer power by multiplication, another as
  :math:`e^{j\\log p}` (at :func:`floor_log_p`)."""
  if j == 1:
    return p
  if float(j).is_integer():
    return lax.integer_pow(p, int(j))
  return jnp.exp(j * floor_log_p(log_p))


def _series_slope(series: PowerSeries, p, log_p) -> jax.Array:
  """:math:`f'(\\log p) = a + \\sum_j j\\,b_j p^j` elementwise, from :math:`p`."""
  slope = jnp.full_like(p, series.log_coef)
  for j, b in series.powers:
    slope = slope + (j * b) * _power_of_p(j, p, log_p)
  return slope


def _centred(logits, m, cfg: _Config):
  """The capped logits :math:`x` and :math:`x - m` in the compute dtype."""
  x = softcap(logits.astype(compute_dtype(logits.dtype)), cfg.logit_softcap)
  return x, x - m[..., None]


def p_times(p, values):
  """:math:`p \\cdot v` with :math:`0 \\cdot (-\\infty) = 0` (no ``select``, see
  :func:`floor_log_p`)."""
  return p * jnp.maximum(values, jnp.finfo(values.dtype).min)


def separate_sums(summands: list[Callable[[], jax.Array]], like: jax.Array) -> list[jax.Array]:
  """Evaluates ``summands`` (closures, each giving one ``[...]`` per-row sum over a ``[..., V]``
  array, of the type of ``like``: shape, dtype and, inside ``shard_map``, varying axes) as
  separate passes over the data.

  Except on TPU, each one runs as a branch of a ``lax.switch`` in a loop over the sums. XLA:CPU
  fuses one elementwise computation into one reduction, but between sibling reductions it merges
  every common intermediate, down to the broadcasts of shared constants, and stores it as a
  ``[..., V]`` array for both to read; optimisation barriers do not stop this (they are removed
  before the merge), and a variadic reduction (all sums in one pass) is far slower than separate
  ones. A loop branch is a computation of its own, which nothing is merged across (a lone sum gets
  an empty second branch: XLA inlines a loop of one iteration). XLA:GPU merges the same way, so it
  takes the branches too. TPU gets the sums written together, which keep no ``[..., V]`` array
  there. The measurements behind this choice are in ``experiments/results/`` (``probe_pair_sums``,
  ``gpu_h100/``, ``aot_memory``).
  """
  if not summands:
    return []

  def one_pass_each():
    zeros = jnp.zeros_like(like)
    branches = summands + [lambda: zeros] * (len(summands) == 1)
    body = lambda i, sums: sums.at[i].set(lax.switch(i, branches))
    sums = lax.fori_loop(
      0, len(branches), body, jnp.broadcast_to(zeros, (len(branches),) + zeros.shape)
    )
    return [sums[i] for i in range(len(summands))]

  return lax.platform_dependent(tpu=lambda: [s() for s in summands], default=one_pass_each)


def _target_logit(logits, labels, m, cfg: _Config) -> jax.Array:
  """:math:`x_y - m` per row (0 without labels), over the vocabulary shards of ``cfg``."""
  if labels is None:
    return jnp.zeros_like(m)
  # The gather reads the logits through an optimization barrier: without it XLA's CPU backend
  # shares one float32 copy of half-precision logits with the log-sum-exp pass, a [..., V] float32
  # temporary.
  axis, num_local = cfg.vocab_axis, logits.shape[-1]
  local = local_labels(labels, num_local, axis)
  raw = jnp.take_along_axis(
    lax.optimization_barrier(logits), jnp.clip(local, 0, num_local - 1)[..., None], axis=-1
  )[..., 0]
  target = softcap(raw.astype(m.dtype), cfg.logit_softcap) - m
  if axis is None:
    return target
  owned = (local >= 0) & (local < num_local)
  return lax.psum(jnp.where(owned, target, jnp.zeros_like(target)), axis)


class _Passes:
  """The per-row sums over the logits that the statistics need, each registered as one pass and
  run together by :func:`separate_sums`; registering returns how to read the completed sum."""

  def __init__(self, logits, m, log_sum, cfg: _Config):
    self.logits, self.m, self.cfg = logits, m, cfg
    # Made finite outside the passes: a select inside a reduction's input is not fused on XLA:CPU.
    self.finite_log_sum = finite_or_zero(log_sum)
    self.summands: list[Callable[[], jax.Array]] = []

  def log_probs(self):
    """``(x - m, log p)`` of the logits, ``[..., V]`` each."""
    c = _centred(self.logits, self.m, self.cfg)[1]
    return c, c - self.finite_log_sum[..., None]

  def add(self, fn: Callable[[], jax.Array]) -> Callable[[list], jax.Array]:
    """Registers a pass; returns how to read its (completed) sum."""
    self.summands.append(fn)
    k = len(self.summands) - 1
    return lambda sums: sums[k]

  def weighted(self, term, beta_fn, operands) -> Callable[[list], jax.Array]:
    """The pass :math:`\\sum_c \\beta_c\\,\\mathrm{term}(\\log p_c)`."""
    dtype = self.m.dtype
    return self.add(
      lambda: jnp.sum(_times_beta(term(self.log_probs()[1]), _beta(beta_fn, operands, dtype)), -1)
    )

  def complete(self, total):
    """A per-shard sum completed over the vocabulary shards."""
    return total if self.cfg.vocab_axis is None else lax.psum(total, self.cfg.vocab_axis)

  def weight_sum(self, beta_fn, operands):
    """:math:`\\sum_c \\beta_c` per row, over every shard."""
    m = self.m
    if not operands:
      return self.complete(jnp.full(m.shape, self.logits.shape[-1], m.dtype))
    beta = cast(jax.Array, _beta(beta_fn, operands, m.dtype))  # operands given: not None
    return self.complete(jnp.broadcast_to(jnp.sum(beta, axis=-1), m.shape))

  def weighted_log_p(self, beta_fn, operands) -> Callable[[list], jax.Array]:
    """Reader of :math:`\\sum_c \\beta_c \\log p_c` with :math:`0 \\log 0 = 0`, and
    :math:`-\\infty` where target mass :math:`\\beta_c > 0` sits on a class with
    :math:`p_c = 0` (a ``-inf`` logit: an infinite loss, as in PyTorch and optax's
    ``safe_softmax_cross_entropy``). With weights, two passes that each read :math:`\\beta`
    once: the floored sum (:func:`floor_log_p`), and the weight on classes with
    :math:`\\log p = -\\infty` (:math:`\\beta` read twice in one pass, or a compare, is kept
    as a ``[..., V]`` array on XLA:CPU)."""
    if not operands:  # unit weights: log p itself
      return self.weighted(lambda log_p: log_p, beta_fn, operands)
    floored = self.weighted(floor_log_p, beta_fn, operands)
    # 1 where log p = -inf, else 0, without a compare.
    at_zero = lambda log_p: 1.0 - jnp.exp(log_p - floor_log_p(log_p))
    mass_at_zero = self.weighted(at_zero, beta_fn, operands)
    minus_inf = jnp.full_like(self.m, -jnp.inf)
    return lambda sums: jnp.where(mass_at_zero(sums) > 0, minus_inf, floored(sums))

  def series(self, series: PowerSeries, beta_fn, operands):
    """Readers of :math:`\\sum_c\\beta_c f` and :math:`B` from the power sums' passes."""
    total_weight = self.weight_sum(beta_fn, operands)
    a = series.log_coef
    log_sum_beta = self.weighted_log_p(beta_fn, operands) if a else None
    powers = []
    for j, b in series.powers:
      if j == 1 and not operands:  # unit weights: sum_c p_c = 1
        powers.append((j, b, lambda sums: jnp.ones_like(self.m)))
      else:
        power = lambda log_p, j=j: _power_of_p(j, jnp.exp(log_p), log_p)
        powers.append((j, b, self.weighted(power, beta_fn, operands)))

    def value(sums):
      total = series.constant * total_weight + sum(b * read(sums) for _, b, read in powers)
      return total + a * log_sum_beta(sums) if log_sum_beta is not None else total

    def slope(sums):
      return a * total_weight + sum(j * b * read(sums) for j, b, read in powers)

    return value, slope

  def run(self) -> list[jax.Array]:
    """Every registered sum, completed over the shards."""
    like = jnp.zeros_like(self.logits[..., 0], self.m.dtype)
    return [self.complete(s) for s in separate_sums(self.summands, like=like)]


def _forward(logits, labels, betas, cfg: _Config, *, slopes: bool = False):
  """The statistics; with ``slopes``, also :math:`B_k = \\sum_c \\beta_c f_k'(\\log p_c)` per
  class sum (per-row residuals of the tangent, so that it needs no reduction of its own). The
  class sums are kept apart by :func:`separate_sums`."""
  m, log_sum = logsumexp_parts(logits, cfg.logit_softcap, cfg.vocab_axis)
  target = _target_logit(logits, labels, m, cfg)
  passes = _Passes(logits, m, log_sum, cfg)
  # How to read each class sum and (with slopes) its B from the passes.
  values, totals = [], []
  for f, beta_fn, operands, series in zip(cfg.class_fns, cfg.beta_fns, betas, cfg.series):
    if series is not None:
      value, slope = passes.series(series, beta_fn, operands)
      values.append(value)
      totals.append(slope)
      continue
    values.append(passes.weighted(lambda lp, f=f: f(floor_log_p(lp)), beta_fn, operands))
    if slopes:
      slope_of = lambda lp, f=f: class_terms(f, None, lp)[1]
      totals.append(passes.weighted(slope_of, beta_fn, operands))
  if cfg.entropy:
    mean_at = passes.add(
      lambda: jnp.sum(p_times(jnp.exp(passes.log_probs()[1]), passes.log_probs()[0]), -1)
    )
  sums = passes.run()
  mean_logit = mean_at(sums) if cfg.entropy else jnp.zeros_like(m)
  totals = [read(sums) for read in totals] if slopes else []
  stats = RowStats(m, log_sum, target, tuple(read(sums) for read in values), mean_logit)
  return (stats, tuple(totals)) if slopes else stats


def shares_forward_exp(dtype) -> bool:
  """Whether the tangent may share :math:`e^{x - m}` with the forward's log-sum-exp pass.

  Reverse mode recomputes :math:`p = e^{x - m} / \\sum_c e^{x_c - m}` from the logits (no
  ``[..., V]`` residual between the passes). Under one ``jit`` of value and gradient, XLA can
  then merge the recomputed :math:`e^{x - m}` with the forward's (common-subexpression
  elimination), which is allowed here for logits already in the compute dtype (float32,
  float64): XLA stores :math:`e^{x - m}` once, in the buffer of the logits' gradient (same shape
  and dtype), and the program computes one exponential per element instead of two, with no
  ``[..., V]`` temporary. For half-precision logits that store would be a float32 ``[..., V]``
  temporary (twice the gradient's size, which cannot hold it), so the tangent recomputes the
  exponential behind an optimisation barrier instead: two exponentials, no temporary. When the
  forward and backward passes are compiled apart (``jax.vjp``, ``jax.linearize``), there is
  nothing to share and the tangent recomputes in both cases. The choice depends on the dtype
  only, never on the host; ``tests/core/test_compiled_guards.py`` holds both branches.
  """
  return compute_dtype(dtype) == jnp.dtype(dtype)


def _tangent(cfg: _Config, logits, labels, betas, stats: RowStats, totals, t_logits, t_betas):
  """The statistics' tangent, linear in ``(t_logits, t_betas)`` (None: a zero tangent)."""
  m, log_sum = stats.max, finite_or_zero(stats.log_sum)
  if not shares_forward_exp(logits.dtype):
    logits, m, log_sum = lax.optimization_barrier((logits, m, log_sum))
  dtype = m.dtype
  x, c = _centred(logits, m, cfg)
  log_p = c - log_sum[..., None]
  # p as exp(x - m) / sum: the forward's log-sum-exp pass computes the same exp(x - m).
  p = jnp.exp(c) * jnp.exp(-log_sum)[..., None]
  zero = jnp.zeros_like(stats.max)
  d_log_sum, d_target, d_mean = zero, zero, zero
  d_sums = [zero for _ in cfg.class_fns]
  axis = cfg.vocab_axis
  if t_logits is not None:
    dx = t_logits.astype(dtype) * softcap_grad(x, cfg.logit_softcap)
    d_log_sum = class_sum(p * dx, axis)
    if labels is not None:
      local = local_labels(labels, logits.shape[-1], axis)
      classes = lax.broadcasted_iota(local.dtype, logits.shape, logits.ndim - 1)
      d_target = class_sum(jnp.where(classes == local[..., None], dx, jnp.zeros_like(dx)), axis)
    for k, (f, beta_fn, operands, series) in enumerate(
      zip(cfg.class_fns, cfg.beta_fns, betas, cfg.series)
    ):
      beta = _beta(beta_fn, operands, dtype)
      if series is None:
        _, slope = class_terms(f, beta, log_p)
      else:  # f' from p, already at hand: no transcendental of its own for integer powers
        slope = _times_beta(_series_slope(series, p, log_p), beta)
      d_sums[k] = class_sum((slope - totals[k][..., None] * p) * dx, axis)
    if cfg.entropy:
      spread = c - stats.mean_logit[..., None] + 1.0
      d_mean = class_sum(p_times(p, spread) * dx, axis)
  for k, (f, beta_fn, operands, t_operands) in enumerate(
    zip(cfg.class_fns, cfg.beta_fns, betas, t_betas)
  ):
    if all(t is None for t in t_operands):
      continue
    t_operands = tuple(jnp.zeros_like(o) if t is None else t for o, t in zip(operands, t_operands))
    beta, t_beta = jax.jvp(beta_fn, operands, t_operands)
    value, _ = class_terms(f, None, log_p)
    d_sums[k] = d_sums[k] + class_sum(value * _over_rows(t_beta.astype(dtype), value.shape), axis)
  return RowStats(zero, d_log_sum, d_target, tuple(d_sums), d_mean)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _row_stats(logits, labels, betas, cfg):
  return _forward(logits, labels, betas, cfg)


def _row_stats_jvp(cfg, primals, tangents):
  logits, labels, betas = primals
  t_logits, _, t_betas = tangents
  stats, totals = _forward(logits, labels, betas, cfg, slopes=True)
  nonzero = lambda t: None if isinstance(t, SymbolicZero) else t
  tangent_fn = jax.checkpoint(
    functools.partial(_tangent, cfg),
    policy=jax.checkpoint_policies.nothing_saveable,
    prevent_cse=not shares_forward_exp(logits.dtype),
  )
  t_betas = tuple(tuple(nonzero(t) for t in ts) for ts in t_betas)
  tangent = tangent_fn(logits, labels, betas, stats, totals, nonzero(t_logits), t_betas)
  return stats, tangent


_row_stats.defjvp(_row_stats_jvp, symbolic_zeros=True)


def row_stats(
  logits: jax.Array,
  labels: jax.Array | None = None,
  class_sums: tuple[ClassSum, ...] = (),
  *,
  logit_softcap: float | None = None,
  entropy: bool = False,
  vocab_axis: Hashable | None = None,
  autodiff: bool = False,
) -> RowStats:
  """The per-row statistics of ``logits`` over its last axis (no argument checks).

  Args:
    logits: ``[..., V]`` float logits (half precision is accumulated in float32).
    labels: ``[...]`` integer class ids inside ``[0, V)`` for ``target``, or None.
    class_sums: the :class:`ClassSum` statistics to compute. Terms with :math:`\\beta_c = 0`
      are exactly 0, with a zero gradient, even where :math:`\\log p_c = -\\infty`.
    logit_softcap: soft cap :math:`c` applied to the logits first, or None.
    entropy: also compute ``mean_logit`` (for :attr:`RowStats.entropy`).
    vocab_axis: inside ``shard_map``, the mesh axis the classes are split over: ``logits`` is
      this shard's ``[..., V / shards]`` slice (shard :math:`s` holds classes
      :math:`[sV_s, (s+1)V_s)`), ``labels`` are global ids, a ``[V]`` weight is this shard's
      slice; every class sum is completed with ``psum`` (and the maximum with ``pmax``), forward
      and backward. None: one device.
    autodiff: differentiate the passes by JAX's autodiff instead of the custom JVP (whose
      functions are static): for class or weight functions that close over traced values, such as
      a hyper-parameter under ``jax.grad``. Same values; keeps ``[..., V]`` residuals.

  Returns:
    :class:`RowStats` of ``[...]`` arrays in float32 (float64 for float64 logits).
  """
  cfg = _Config(
    logit_softcap,
    tuple(c.fn for c in class_sums),
    tuple(c.beta_fn for c in class_sums),
    tuple(c.series for c in class_sums),
    bool(entropy),
    vocab_axis,
  )
  operands = tuple(tuple(jnp.asarray(o) for o in c.operands) for c in class_sums)
  if autodiff:
    return _forward(logits, labels, operands, cfg)
  return _row_stats(logits, labels, operands, cfg)
