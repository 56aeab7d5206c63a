"""Temperature scaling: the NLL-optimal temperature on held-out logits, and its application."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from xent_jax.core import checks
from xent_jax.metrics._rows import (
  Rows,
  as_array,
  check_positive_int,
  invalid,
  jit_metric,
  label_logit,
  masked_sum,
  read_rows,
)


def _nll_slope_and_curvature(rows: Rows, target_N: jax.Array, beta: jax.Array):
  r"""Mean over the included rows of :math:`\partial_\beta \mathrm{NLL}` and
  :math:`\partial^2_\beta \mathrm{NLL}` at inverse temperature :math:`\beta`:
  :math:`\mathrm{E}_{p}[x] - x_y` and :math:`\mathrm{Var}_{p}[x]` with
  :math:`p = \mathrm{softmax}(\beta x)`. Classes with :math:`p = 0` (``-inf`` logits) add 0."""
  probs_NC = jax.nn.softmax(beta * rows.logits, axis=-1)
  live_NC = probs_NC > 0
  x_NC = jnp.where(live_NC, rows.logits, 0.0)
  mean_N = jnp.sum(probs_NC * x_NC, axis=-1)
  var_N = jnp.sum(probs_NC * jnp.where(live_NC, jnp.square(x_NC - mean_N[:, None]), 0.0), axis=-1)
  count = jnp.maximum(jnp.sum(rows.mask, dtype=mean_N.dtype), 1)
  slope = masked_sum(mean_N - target_N, rows.mask) / count
  return slope, masked_sum(var_N, rows.mask) / count


class _Search(NamedTuple):
  """State of the safeguarded Newton search in ``u = log(beta)``, all scalars.

  Attributes:
    i: steps taken.
    u: the point to evaluate next.
    low: lower end of the bracket (the slope is <= 0 at it, or it is the bound).
    high: upper end of the bracket (the slope is >= 0 at it, or it is the bound).
    step_before_last: the step before ``last_step``, which a Newton step must halve.
    last_step: the step that led to ``u``.
    best_u: the evaluated point with the smallest ``|slope|`` so far.
    best_slope: that ``|slope|``.
  """

  i: jax.Array | int
  u: jax.Array
  low: jax.Array
  high: jax.Array
  step_before_last: jax.Array
  last_step: jax.Array
  best_u: jax.Array
  best_slope: jax.Array


def _rtsafe_step(slope_and_derivative, state: _Search) -> _Search:
  """One step of Numerical Recipes' ``rtsafe``: Newton unless it leaves the bracket or the step
  fails to halve the one before last; then bisection.

  The iterate with the smallest ``|slope|`` is kept: near the optimum rounding noise in the slope
  could otherwise send a last bisection across a bracket that Newton never had to narrow.
  """
  u = state.u
  slope, derivative = slope_and_derivative(u)
  better = jnp.abs(slope) < state.best_slope
  # The optimum lies above u where the slope is negative, below where it is positive.
  low = jnp.where(slope <= 0, u, state.low)
  high = jnp.where(slope >= 0, u, state.high)
  newton_step = slope / derivative
  newton = u - newton_step
  use_newton = (
    jnp.isfinite(newton)
    & (newton >= low)
    & (newton <= high)
    & (2 * jnp.abs(newton_step) <= jnp.abs(state.step_before_last))
  )
  new_u = jnp.where(use_newton, newton, 0.5 * (low + high))
  return _Search(
    i=state.i + 1,
    u=new_u,
    low=low,
    high=high,
    step_before_last=state.last_step,
    last_step=new_u - u,
    best_u=jnp.where(better, u, state.best_u),
    best_slope=jnp.where(better, jnp.abs(slope), state.best_slope),
  )


def _root_in_bracket(slope_and_derivative, low, high, num_iters: int) -> jax.Array:
  """The point of ``[low, high]`` where an increasing ``slope`` vanishes, by at most ``num_iters``
  :func:`_rtsafe_step` steps from ``0`` (clipped into the bracket); the loop stops once a step
  falls below a few ulps of the bracket's ends (or is NaN)."""
  dtype = low.dtype
  width = high - low
  tolerance = 4 * jnp.finfo(dtype).eps * jnp.maximum(1.0, jnp.maximum(-low, high))

  def running(state: _Search):
    return (state.i < num_iters) & ~(jnp.abs(state.last_step) <= tolerance)  # NaN steps stop too

  start = jnp.clip(jnp.zeros((), dtype), low, high)  # T = 1 when it is allowed
  state = _Search(0, start, low, high, width, width, start, jnp.asarray(jnp.inf, dtype))
  step = functools.partial(_rtsafe_step, slope_and_derivative)
  return jax.lax.while_loop(running, step, state).best_u


@jit_metric("axis", "num_iters", "min_temperature", "max_temperature")
def fit_temperature(
  logits,
  labels,
  *,
  axis: int = -1,
  where=None,
  num_iters: int = 50,
  min_temperature: float = 0.01,
  max_temperature: float = 100.0,
) -> jax.Array:
  r"""Fits the temperature :math:`T > 0` that minimises the mean NLL of ``softmax(logits / T)``.

  .. math::
    T^\star = \arg\min_{T \in [T_{\min}, T_{\max}]} \frac{1}{n} \sum_{i:\ \mathrm{where}_i}
      \Big(\log \sum_c e^{x_{ic}/T} - x_{iy_i}/T\Big)

  The NLL is convex in :math:`\beta = 1/T`, so its slope
  :math:`g(\beta) = \frac{1}{n}\sum_i (\mathrm{E}_{\mathrm{softmax}(\beta x_i)}[x_i] - x_{iy_i})`
  increases with :math:`\beta` and vanishes at the optimum. The fit runs ``num_iters`` steps of
  safeguarded Newton on :math:`g` in :math:`u = \log\beta` (Numerical Recipes' ``rtsafe``:
  Newton while its step stays inside the bracket that the signs of :math:`g` have narrowed and
  shrinks fast enough, bisection otherwise): deterministic, jittable, quadratic near the
  optimum, and at worst halving the bracket :math:`[\log(1/T_{\max}), \log(1/T_{\min})]`
  every second step. When :math:`g` has one sign on the whole bracket the optimum lies outside
  :math:`[T_{\min}, T_{\max}]` and the nearer bound comes back exactly (a model no better than
  uniform wants :math:`T \to \infty`; one right by a margin on every example wants
  :math:`T \to 0`).

  Fit it on held-out data (a validation split), never on the test split; apply it with
  :func:`apply_temperature`. Dividing by ``T`` keeps every arg-max, so accuracy is unchanged.

  Args:
    logits: ``[..., C]`` float scores of held-out examples.
    labels: ``[...]`` integer class ids.
    axis: the class axis of ``logits``.
    where: optional ``[...]`` boolean mask; ``False`` excludes an example.
    num_iters: at most this many Newton/bisection steps, each one pass over the logits; the
      loop stops earlier once a step falls below float precision.
    min_temperature: :math:`T_{\min} > 0`.
    max_temperature: :math:`T_{\max} > T_{\min}`.

  Returns:
    A float32 scalar :math:`T`; ``NaN`` if ``where`` excludes every example or an included
    example is invalid.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from xent_jax.metrics import fit_temperature
    >>> # Logits ten times too sharp for labels drawn from softmax(logits / 10):
    >>> key_x, key_y = jax.random.split(jax.random.key(0))
    >>> x = 10.0 * jax.random.normal(key_x, (512, 10))
    >>> y = jax.random.categorical(key_y, x / 10.0)
    >>> 8.0 < float(fit_temperature(x, y)) < 12.0
    True

  References:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017 (temperature scaling);
    Press et al., "Numerical Recipes", 3rd ed., 2007, section 9.4 (``rtsafe``).
  """
  fn = "fit_temperature"
  num_iters = check_positive_int(fn, "num_iters", num_iters)
  checks.check_in_range(
    fn, "min_temperature", min_temperature, 0.0, np.inf, low_open=True, high_open=True
  )
  checks.check_in_range(
    fn, "max_temperature", max_temperature, min_temperature, np.inf, low_open=True, high_open=True
  )
  rows = read_rows(fn, logits, labels, axis, where)
  # Excluded rows are zeroed, so that their NaN or inf logits cannot reach the sums.
  rows = rows._replace(logits=jnp.where(rows.mask[:, None], rows.logits, 0.0))
  target_N = label_logit(rows)
  dtype = rows.logits.dtype
  low = jnp.asarray(-np.log(max_temperature), dtype)
  high = jnp.asarray(-np.log(min_temperature), dtype)

  def slope_and_derivative(u):
    """The NLL slope in beta and its derivative in u = log beta."""
    beta = jnp.exp(u)
    slope, curvature = _nll_slope_and_curvature(rows, target_N, beta)
    return slope, curvature * beta

  u = _root_in_bracket(slope_and_derivative, low, high, num_iters)
  # An optimum outside the bounds: the slope keeps its sign on the whole bracket.
  u = jnp.where(slope_and_derivative(low)[0] >= 0, low, u)
  u = jnp.where(slope_and_derivative(high)[0] <= 0, high, u)
  broken = jnp.any(rows.mask & invalid(rows)) | ~jnp.any(rows.mask)
  return jnp.where(broken, jnp.nan, jnp.exp(-u))


def apply_temperature(logits, temperature) -> jax.Array:
  r"""Temperature-scaled logits :math:`x / T`, whose softmax is the calibrated prediction.

  .. math::
    \tilde p_i = \mathrm{softmax}(x_i / T)

  Args:
    logits: ``[..., C]`` float scores (any layout: every entry is divided).
    temperature: scalar :math:`T > 0`, e.g. from :func:`fit_temperature`. A NaN temperature
      (what :func:`fit_temperature` returns for an empty or invalid split) passes through, so
      every metric of the scaled logits is NaN as well.

  Returns:
    ``logits / temperature`` in the dtype of ``logits`` (float32 for lists), same shape.

  Raises:
    TypeError: a ``temperature`` that is not a number.
    ValueError: a concrete ``temperature`` that is zero, negative or infinite, or not a scalar.

  References:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017.
  """
  fn = "apply_temperature"
  logits = as_array(logits)
  checks.check_floating(fn, "logits", logits)
  logits = jnp.asarray(logits)
  if jnp.ndim(temperature) != 0:
    raise ValueError(f"{fn}: `temperature` must be a scalar, got shape {jnp.shape(temperature)}.")
  checks.check_real_scalar(fn, "temperature", temperature)
  if isinstance(temperature, jax.core.Tracer) or not np.isnan(np.asarray(temperature)):
    checks.check_in_range(
      fn, "temperature", temperature, 0.0, np.inf, low_open=True, high_open=True
    )
  return logits / jnp.asarray(temperature, logits.dtype)
