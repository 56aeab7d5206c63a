"""Softmax cross-entropy on logits: integer or probability labels, every option, one engine.

Every loss here is the same per-example formula. With logits :math:`x` (after the optional soft
cap :math:`x \\leftarrow c\\tanh(x/c)`), :math:`\\mathrm{lse} = \\log\\sum_c e^{x_c}`, class weights
:math:`w` and a target distribution :math:`q`:

.. math::
   \\ell = \\sum_c w_c\\, q_c\\,(\\mathrm{lse} - x_c)
     \\;+\\; \\sum_c w_c\\, q_c \\log q_c\\,[\\text{t5x}]
   \\;+\\; z\\, \\omega\\, \\mathrm{lse}^2

For an integer label :math:`y` the target puts ``on`` on :math:`y` and ``off`` on every other
class, so the sum needs only :math:`\\mathrm{lse}`, :math:`x_y` and :math:`\\sum_c w_c x_c` per row:
no one-hot is ever built. Cross-entropy is the head :math:`f = -\\log p` of the row-statistics
engine (:mod:`xent_jax.core.engine`, :mod:`xent_jax.core.heads`): the backward pass recomputes the
softmax from the logits and per-row statistics, the only residuals it keeps, and forward-mode
differentiation works too. Under one ``jax.jit(jax.value_and_grad(...))`` of float32 logits the
recomputed :math:`e^{x - m}` is the forward's (one exponential per logit, stored in the gradient's
own buffer); half-precision logits recompute it (two, and no float32 ``[N, V]`` temporary), see
:func:`xent_jax.core.engine.shares_forward_exp`.
"""

from typing import Unpack

import jax
import jax.numpy as jnp

from xent_jax.core import checks, engine, heads
from xent_jax.core.deprecation import renamed_keyword
from xent_jax.core.frontend import head_loss
from xent_jax.core.options import CrossEntropyOptionKwargs, LossOptions, takes_options


def cross_entropy_head(smoothing: str, z_loss: float) -> heads.Head:
  """Cross-entropy as a head: :math:`f = -\\log p`, plus the T5X target entropy and the z-loss.

  The per-row term adds :math:`\\sum_c w_c q_c\\log q_c` for 't5x' smoothing (a constant for
  integer labels) and :math:`z\\,\\omega\\,\\mathrm{lse}^2` with :math:`\\omega = w_y` (1 for
  probability labels). ``z_loss`` may be traced (the term is then always added).
  """
  t5x = smoothing == "t5x"
  with_z = not checks.is_static_zero(z_loss)

  def row_term(stats: engine.RowStats, target: heads.Target) -> jax.Array:
    extra = jnp.zeros_like(stats.max)
    if t5x and target.integer and not checks.is_static_zero(target.off):
      others = target.total_weight - target.target_weight
      on_term, off_term = heads.xlogx(target.on), heads.xlogx(target.off)
      extra = extra + target.target_weight * on_term + others * off_term
    if t5x and not target.integer:
      assert target.probs is not None  # probability labels
      w = (
        1.0
        if target.class_weight is None
        else heads.along_classes(target.class_weight, target.probs.ndim)
      )
      extra = extra + target.sum_classes(jax.scipy.special.xlogy(target.probs, target.probs) * w)
    if with_z:
      extra = extra + z_loss * target.target_weight * jnp.square(stats.lse)
    return extra

  needs_term = t5x or with_z
  return heads.Head(
    heads.neg_log, row_term if needs_term else None, class_series=engine.PowerSeries(-1.0)
  )


@renamed_keyword("weight", "class_weight")
@takes_options(CrossEntropyOptionKwargs)
def cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  axis: int = -1,
  class_weight: jax.typing.ArrayLike | None = None,
  where: jax.typing.ArrayLike | None = None,
  return_lse: bool = False,
  **options: Unpack[CrossEntropyOptionKwargs],
) -> jax.Array | tuple[jax.Array, jax.Array]:
  r"""Softmax cross-entropy with every option, following PyTorch's rules.

  .. math::
     \ell_i = \sum_c w_c\, q_{ic}\,\big(\mathrm{lse}_i - x_{ic}\big)
       \;[-\; \textstyle\sum_c w_c q_{ic}\log q_{ic}]_{\text{t5x}}
       \;+\; z\,\omega_i\,\mathrm{lse}_i^2,
     \qquad \mathrm{lse}_i = \log\sum_c e^{x_{ic}},\quad
     x = c\tanh(\text{logits}/c)\ \text{if capped}

  with the (smoothed) target :math:`q` and the example weight :math:`\omega_i = w_{y_i}` for integer
  labels (1 for probability labels), times 0 where ``where`` is False or the label is
  ``ignore_index``. 'mean' is :math:`\sum_i \ell_i / \sum_i \omega_i`, exactly PyTorch's
  ``F.cross_entropy`` (which for probability targets divides by the number of positions).

  Args:
    logits: ``[..., C, ...]`` float logits; classes on ``axis`` (``axis=1`` takes PyTorch's
      ``(N, C, d1, ...)``). Half precision is accumulated in float32.
    labels: integer class ids of shape ``logits.shape`` without ``axis``, or float probabilities
      of ``logits.shape``.
    axis: the class axis.
    class_weight: ``[C]`` class weights (PyTorch's ``weight``, the former name here, still
      accepted with a ``DeprecationWarning``), treated as constants.
    ignore_index: integer labels equal to it count for nothing (loss 0, weight 0); None: no
      label is ignored. Other labels outside ``[0, C)`` give a NaN loss for their example (see
      :func:`xent_jax.check_labels` to find them).
    reduction: 'none' (per-example, ``logits.shape`` without ``axis``), 'sum' or 'mean'. A mean
      over zero weight is 0 with a zero gradient (PyTorch returns NaN).
    label_smoothing: :math:`\epsilon \in [0, 1]`.
    smoothing: 'uniform' (PyTorch/optax: :math:`q = (1-\epsilon)\,\mathrm{onehot} + \epsilon/C`)
      or 't5x' (:math:`q_y = 1-\epsilon`, others :math:`\epsilon/(C-1)`, minus the target's
      entropy: a KL divergence whose minimum is 0).
    z_loss: :math:`z \ge 0`, adds :math:`z\,\omega_i\,\mathrm{lse}_i^2` (PaLM).
    logit_softcap: :math:`c > 0` applies :math:`c\tanh(x/c)` first (Gemma 2); None: off.
      ``label_smoothing``, ``z_loss`` and ``logit_softcap`` may be traced scalars (``jit``,
      ``vmap``, ``grad``, ``jvp``), with the values of concrete ones. A traced value cannot be
      checked at trace time: out of range, it makes the loss NaN (every element, with NaN
      gradients) instead of raising.
    where: bool mask over examples (broadcastable to ``logits.shape`` without ``axis``).
    return_lse: also return the per-example ``lse`` (of the capped logits), unmasked.

  Returns:
    The reduced loss (float32, or float64 for float64 logits), and with ``return_lse`` the pair
    ``(loss, lse)``.

  Example:
    >>> import jax.numpy as jnp, xent_jax
    >>> logits = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    >>> loss = xent_jax.cross_entropy(logits, jnp.array([0, 2]), label_smoothing=0.1)
    >>> print(f"{float(loss):.4f}")
    0.3455

  References:
    Szegedy et al., "Rethinking the Inception Architecture", 2016 (label smoothing);
    Chowdhery et al., "PaLM", 2022 (z-loss); Gemma Team, "Gemma 2", 2024 (soft-capping).
  """
  fn = "cross_entropy"
  checked = LossOptions.checked(fn, **options)
  head = cross_entropy_head(checked.smoothing, checked.z_loss)
  reduced, stats = head_loss(
    fn, head, logits, labels, checked, axis=axis, class_weight=class_weight, where=where
  )
  return (reduced, stats.lse) if return_lse else reduced
