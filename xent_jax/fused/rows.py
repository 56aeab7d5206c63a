r"""The fused kernels' front end: checks a linear layer's arguments and reads them row by row.

:func:`check_linear_layer` is the one check of ``hidden``, ``weight`` (in its layout) and ``bias``
of every fused loss; :func:`prepare_rows` reads :func:`xent_jax.linear_cross_entropy`'s
arguments into the kernels' per-row inputs (:class:`PreparedRows`) and plans their schedule, on
whole arrays or, inside ``shard_map``, on one vocabulary shard (:mod:`xent_jax.parallel.logits`).
"""

import dataclasses
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from xent_jax.core import checks, engine, heads, inputs
from xent_jax.core.options import LossOptions
from xent_jax.fused import ops, schedule
from xent_jax.fused.schedule import BlockConfig, Schedule


@dataclasses.dataclass(frozen=True)
class LinearLayout:
  """How a linear layer's weight is laid out and how its logits are cut into blocks.

  Attributes:
    weight_layout: 'vd' for ``weight`` ``[V, D]``, 'dv' for ``[D, V]``.
    token_chunk_size: rows per block, or None for the default (:func:`plan_schedule`).
    vocab_chunk_size: classes per block, or None for the default; giving it selects the two-pass
      schedule.
  """

  weight_layout: str = "vd"
  token_chunk_size: int | None = None
  vocab_chunk_size: int | None = None


class LinearArrays(NamedTuple):
  """The arrays of a loss on a linear layer, as its caller gave them (any array-likes).

  Attributes:
    hidden: ``[..., D]`` features.
    weight: ``[V, D]`` ('vd') or ``[D, V]`` ('dv').
    labels: integer ids ``[...]`` (or, where the loss takes them, probabilities ``[..., V]``).
    bias: ``[V]`` or None.
    class_weight: ``[V]`` class weights or None.
    where: mask broadcastable to the batch shape, or None.
  """

  hidden: jax.typing.ArrayLike
  weight: jax.typing.ArrayLike
  labels: jax.typing.ArrayLike
  bias: jax.typing.ArrayLike | None = None
  class_weight: jax.typing.ArrayLike | None = None
  where: jax.typing.ArrayLike | None = None


def linear_shapes(fn: str, hidden, weight, weight_layout: str) -> tuple[int, int]:
  """``(classes, features)`` of ``weight`` in its layout, checked against ``hidden [..., D]``.

  Also :mod:`xent_jax.parallel.logits`'s check of the global arrays. Any array-likes.

  Raises:
    ValueError: a scalar ``hidden``, a ``weight`` that is not 2-D or has no classes, or a
      feature dimension that differs.
  """
  hidden_shape, weight_shape = np.shape(hidden), np.shape(weight)
  if not hidden_shape:
    raise ValueError(f"{fn}: `hidden` must have shape [..., D], got a scalar.")
  if len(weight_shape) != 2:
    raise ValueError(
      f"{fn}: `weight` must have shape [V, D] (weight_layout='vd') or [D, V] ('dv'), got "
      f"{weight_shape}."
    )
  dim = schedule.class_dim(weight_layout)
  checks.check_has_classes(fn, "weight", weight_shape, dim)
  num_classes, features = weight_shape[dim], weight_shape[1 - dim]
  if hidden_shape[-1] != features:
    raise ValueError(
      f"{fn}: `hidden`'s last dimension must equal `weight`'s feature dimension ({features} for "
      f"weight_layout={weight_layout!r}, `weight` {weight_shape}), got `hidden` {hidden_shape}."
    )
  return num_classes, features


def check_linear_layer(fn: str, hidden, weight, weight_layout: str, bias) -> tuple[int, int]:
  """Checks ``hidden [..., D]`` and ``weight`` (floating, in the layout ``weight_layout``, of
  matching features: :func:`linear_shapes`) and ``bias`` (floating ``[V]`` or None); returns
  ``(classes, features)``. The labels are the caller's to check.

  Raises:
    TypeError, ValueError: naming the bad argument of ``fn``.
  """
  checks.check_floating(fn, "hidden", hidden)
  checks.check_floating(fn, "weight", weight)
  checks.check_choice(fn, "weight_layout", weight_layout, schedule.WEIGHT_LAYOUTS)
  num_classes, features = linear_shapes(fn, hidden, weight, weight_layout)
  if bias is not None:
    checks.check_floating(fn, "bias", bias)
    checks.check_shape(fn, "bias", bias, (num_classes,))
  return num_classes, features


def unfused_logits(hidden, weight, bias, weight_layout: str) -> jax.Array:
  """``hidden @ weight.T + bias`` ``[..., V]`` written plainly (for the empty batches the blocked
  schedules have nothing to chunk in)."""
  spec = "...d,vd->...v" if weight_layout == "vd" else "...d,dv->...v"
  logits = jnp.einsum(spec, jnp.asarray(hidden), jnp.asarray(weight))
  return logits if bias is None else logits + heads.along_classes(jnp.asarray(bias), logits.ndim)


class PreparedRows(NamedTuple):
  """The checked inputs of the kernels, one row per token (made by :func:`prepare_rows`).

  Attributes:
    hidden_NxD: ``[N, D]`` features.
    weight: ``[V, D]`` or ``[D, V]`` (this shard's classes under ``vocab_axis``).
    bias: ``[V]`` or None.
    class_weight: ``[V]`` in the compute dtype, or None.
    labels_N: ``[N]`` int32 labels as class indices into ``weight`` (shifted by the shard's first
      class under ``vocab_axis``); they match no class of it where the label lies outside
      ``[0, K)``, is ignored, or (sharded) belongs to another shard.
    valid_N: ``[N]`` bool, rows that count (``where`` and not ``ignore_index``).
    nan_or_one_N: ``[N]`` NaN on valid rows whose label is outside ``[0, K)``, else 1.
    target_weight_N: ``[N]`` :math:`w_{y_i}`, over all shards.
    total_weight: :math:`W = \\sum_c w_c` over all ``K`` classes.
    example_weight_N: ``[N]`` :math:`\\omega_i`, the 'mean' denominator's terms.
    batch_shape: ``hidden``'s shape without ``D``.
    schedule: the :class:`~xent_jax.fused.schedule.Schedule`; None for an empty batch (no kernel
      runs).
    block: the :class:`~xent_jax.fused.schedule.BlockConfig` of ``schedule``, or None.
    loss: the :class:`~xent_jax.fused.ops.RowLossConfig` for :func:`xent_jax.fused.ops.row_loss`.
  """

  hidden_NxD: jax.Array
  weight: jax.Array
  bias: jax.Array | None
  class_weight: jax.Array | None
  labels_N: jax.Array
  valid_N: jax.Array
  nan_or_one_N: jax.Array
  target_weight_N: jax.Array
  total_weight: jax.Array
  example_weight_N: jax.Array
  batch_shape: tuple[int, ...]
  schedule: Schedule | None
  block: BlockConfig | None
  loss: ops.RowLossConfig

  def kernel_rows(self, row_scale_N: jax.Array | None = None):
    """The ``rows`` argument of :func:`xent_jax.fused.ops.row_loss`: each row's scale (times NaN
    on rows with an out-of-range label), target weight and validity."""
    scale_N = self.nan_or_one_N if row_scale_N is None else row_scale_N * self.nan_or_one_N
    return (scale_N, self.target_weight_N, self.valid_N)


def _plan(fn, hidden, weight, num_local, options, layout, return_lse) -> Schedule | None:
  """The schedule of the kernels for these shapes (None for an empty batch)."""
  n, features = int(np.prod(hidden.shape[:-1])), hidden.shape[-1]
  if not n:
    return None
  return schedule.plan_schedule(
    fn,
    n,
    features,
    num_local,
    # A traced option takes the two-pass schedule: its per-row formula, outside the kernels'
    # custom derivatives, is differentiated by autodiff (the one-pass schedule computes the
    # gradients inside a custom rule that holds the options as constants).
    linear_reduction=options.reduction != "none" and not return_lse and not options.traced(),
    token_chunk_size=layout.token_chunk_size,
    vocab_chunk_size=layout.vocab_chunk_size,
    hidden_dtype=hidden.dtype,
    weight_dtype=weight.dtype,
  )


def prepare_rows(
  fn: str,
  arrays: LinearArrays,
  options: LossOptions,
  layout: LinearLayout,
  *,
  return_lse: bool,
  vocab_axis: Hashable | None = None,
  row_axes: tuple[Hashable, ...] = (),
) -> PreparedRows:
  """Checks :func:`xent_jax.linear_cross_entropy`'s ``arrays`` and prepares the kernels' per-row
  inputs, for the checked ``options`` (:meth:`~xent_jax.core.options.LossOptions.checked`) and
  the ``layout``.

  The one front end of the kernels: :func:`xent_jax.linear_cross_entropy` calls it on whole
  arrays, and :mod:`xent_jax.parallel.logits` on one vocabulary shard inside ``shard_map``
  (``vocab_axis``: the mesh axis the classes of ``weight``, ``bias`` and ``class_weight`` are
  split over, whose global class count :math:`K` the labels and the smoothing refer to;
  ``row_axes``: the mesh axes the rows are split over, for the kernels' varying-axes types).
  Labels are read by :func:`xent_jax.core.inputs.integer_labels`, ``where`` by
  :func:`xent_jax.core.inputs.row_mask`, the schedule planned by
  :func:`xent_jax.fused.schedule.plan_schedule` (none for an empty batch).

  Raises:
    TypeError, ValueError, AssertionError: naming the bad argument of ``fn``; a traced
      ``logit_softcap`` (a constant of the kernels' blocks) is a TypeError.
  """
  if checks.is_traced(options.logit_softcap):
    raise TypeError(
      f"{fn}: `logit_softcap` must be a Python number here (the fused kernels' blocks hold it as "
      "a constant), got a traced value; get_loss('cross_entropy', logit_softcap=c).linear takes "
      "a traced cap (token chunks, autodiff)."
    )
  hidden, weight, labels, bias, class_weight, where = arrays
  num_local, features = check_linear_layer(fn, hidden, weight, layout.weight_layout, bias)
  hidden, weight = jnp.asarray(hidden), jnp.asarray(weight)
  bias = None if bias is None else jnp.asarray(bias)
  labels = inputs.as_label_array(fn, labels)
  batch_shape = hidden.shape[:-1]
  inputs.check_integer_labels(fn, labels, batch_shape)
  dtype = inputs.compute_dtype(jnp.result_type(hidden.dtype, weight.dtype))
  if class_weight is not None:
    inputs.check_class_weight(fn, "class_weight", class_weight, num_local)
    class_weight = jnp.asarray(class_weight).astype(dtype)
  valid = inputs.row_mask(fn, where, batch_shape)
  plan = _plan(fn, hidden, weight, num_local, options, layout, return_lse)
  n = int(np.prod(batch_shape))
  num_classes = num_local if vocab_axis is None else num_local * lax.axis_size(vocab_axis)
  read = inputs.integer_labels(
    fn, labels, num_classes=num_classes, ignore_index=options.ignore_index, where=valid
  )
  # int32 labels, -1 outside [0, K): such a row matches no class of any block or shard.
  labels_N, valid_N, in_range_N = (a.reshape(n) for a in read)
  target_weight_N, total_weight = heads.target_weights(
    class_weight, read.safe_labels.reshape(n), num_local, dtype, vocab_axis
  )
  example_weight_N = jnp.where(valid_N, target_weight_N, jnp.zeros_like(target_weight_N))
  # A valid label outside [0, K) makes its row's loss (and gradients) NaN, as in cross_entropy.
  nan_or_one_N = jnp.where(valid_N & ~in_range_N, jnp.nan, 1.0).astype(dtype)
  # The kernels see this shard's classes as 0..V_s-1: the labels are shifted rather than the
  # (traced) shard offset passed through the static BlockConfig.class_offset.
  labels_N = engine.local_labels(labels_N, num_local, vocab_axis)
  varying_axes = () if vocab_axis is None else (*row_axes, vocab_axis)
  target = options.smoothed_target(num_classes)
  block = None
  if plan is not None:
    block = plan.block_config(
      layout.weight_layout,
      options.logit_softcap,
      not checks.is_static_zero(target.off),
      varying_axes=varying_axes,
      row_axes=row_axes,
    )
  return PreparedRows(
    hidden.reshape(n, features),
    weight,
    bias,
    class_weight,
    labels_N,
    valid_N,
    nan_or_one_N,
    target_weight_N,
    total_weight,
    example_weight_N,
    batch_shape,
    plan,
    block,
    ops.RowLossConfig(target, options.smoothing, options.z_loss),
  )
