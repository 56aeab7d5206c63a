r"""The one front end of every softmax loss: parse, evaluate the head, mask, reduce.

:func:`head_loss` is what a public loss calls on a logits array, on one device or, inside
``shard_map``, on one vocabulary shard (``vocab_axis``) of a batch split over ``data_axis``:

1. parse the shared arguments (:func:`xent_jax.core.inputs.parse_inputs`, naming the bad one);
2. evaluate the head on the row statistics of the logits
   (:func:`xent_jax.core.heads.integer_loss` for class ids smoothed to a one-hot target,
   :func:`xent_jax.core.heads.probability_loss` for a target distribution);
3. mask: invalid rows (``where`` False, ``ignore_index``) count 0; a valid row whose label lies
   outside ``[0, K)`` is NaN, value and gradient;
4. reduce by PyTorch's rule over the global batch (:func:`xent_jax.core.reduction.reduce_loss`).

The fused executor (:mod:`xent_jax.fused`) evaluates the same heads on statistics computed from
blocks of ``hidden @ weight.T``, with the same options object and label reading.
"""

from collections.abc import Hashable

import jax
import jax.numpy as jnp

from xent_jax.core import checks, heads
from xent_jax.core.engine import RowStats
from xent_jax.core.inputs import parse_inputs
from xent_jax.core.options import LossOptions
from xent_jax.core.reduction import reduce_loss


def head_loss(
  fn: str,
  head: heads.Head,
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  options: LossOptions,
  *,
  axis: int = -1,
  class_weight: jax.typing.ArrayLike | None = None,
  where: jax.typing.ArrayLike | None = None,
  vocab_axis: Hashable | None = None,
  data_axis: Hashable | tuple[Hashable, ...] | None = None,
) -> tuple[jax.Array, RowStats]:
  r"""A head on logits with every shared convention.

  .. math::
     \ell_i = \mathrm{valid}_i \cdot \mathrm{head}(\text{statistics}_i, q_i), \qquad
     L = \mathrm{reduce}(\ell, \omega)

  Args:
    fn: the public function's name, for error messages.
    head: the loss (:class:`xent_jax.core.heads.Head`).
    logits: ``[..., C, ...]`` float logits, classes on ``axis``; inside ``shard_map`` with
      ``vocab_axis``, this shard's ``[..., C_s]`` slice (``axis`` must be the last).
    labels: integer class ids (``logits.shape`` without ``axis``; global ids when sharded) or
      float probabilities (``logits.shape``; this shard's slice when sharded).
    options: the checked :class:`LossOptions` (``reduction``, ``ignore_index``, smoothing and the
      soft cap are read here; ``z_loss`` belongs to the head). A traced number among them out of
      range makes the loss NaN (:data:`xent_jax.core.checks.TRACED_OUT_OF_RANGE`).
    axis: the class axis.
    class_weight: ``[C]`` class weights (this shard's ``[C_s]`` when sharded), or None.
    where: mask over examples, broadcastable to the batch shape, or None.
    vocab_axis: the mesh axis the classes are split over (inside ``shard_map``), or None.
    data_axis: the mesh axis (or axes) the rows are split over, for 'sum' and 'mean' over the
      global batch; None: the rows are all here.

  Returns:
    ``(loss, stats)``: the reduced loss (float32, float64 for float64 logits) and the unmasked
    per-row :class:`~xent_jax.core.engine.RowStats` (``stats.lse`` is the logsumexp).
  """
  parsed = parse_inputs(
    fn,
    logits,
    labels,
    axis=axis,
    class_weight=class_weight,
    where=where,
    ignore_index=options.ignore_index,
    vocab_axis=vocab_axis,
  )
  if parsed.integer:
    target = options.smoothed_target(parsed.num_classes)
    loss, stats = heads.integer_loss(
      head,
      parsed.logits,
      parsed.safe_labels,
      class_weight=parsed.weight,
      on=target.on,
      off=target.off,
      logit_softcap=options.logit_softcap,
      vocab_axis=vocab_axis,
    )
    loss = heads.mask_rows(loss, parsed.valid, parsed.bad)
  else:
    num_classes = parsed.num_classes
    loss, stats = heads.probability_loss(
      head,
      parsed.logits,
      parsed.labels,
      smooth=lambda q: options.smooth(q, num_classes),
      class_weight=parsed.weight,
      logit_softcap=options.logit_softcap,
      vocab_axis=vocab_axis,
      autodiff=options.traced(),
    )
    loss = jnp.where(parsed.valid, loss, jnp.zeros_like(loss))
  if parsed.integer:
    num_local = parsed.logits.shape[-1]
    target_weight, _ = heads.target_weights(
      parsed.weight, parsed.safe_labels, num_local, loss.dtype, vocab_axis
    )
  else:
    target_weight = jnp.ones_like(loss)
  example_weight = jnp.where(parsed.valid, target_weight, jnp.zeros_like(target_weight))
  reduced = reduce_loss(loss, example_weight, options.reduction, fn=fn, data_axis=data_axis)
  # In the compute dtype also when a traced hyper-parameter is wider (float64 under x64).
  reduced = reduced.astype(stats.lse.dtype)
  return checks.nan_unless(reduced, *options.in_range(fn)), stats
