r"""Vocabulary-parallel cross-entropy of a linear layer: the fused kernels on each weight shard.

``weight`` (``[V, D]`` or ``[D, V]``) is split over the classes on ``vocab_axis``, ``hidden`` over
its rows on ``data_axis``. Each shard runs the blocked kernels of :mod:`xent_jax.fused.linear` on
its classes, so no device holds more than ``[token_chunk, vocab_chunk]`` logits, and the per-row
statistics are completed over the shards (:func:`complete_row_stats`) before the per-row loss.
The backward passes are shard-local and keep only per-row residuals; only gradients of replicated
inputs need a collective: ``psum`` over the vocabulary axis for ``hidden``, over the data axes for
the weight shard.

Every use of :mod:`xent_jax.fused.linear` by the vocabulary-parallel losses is in this module.
"""

import functools
from collections.abc import Hashable
from typing import NamedTuple, Unpack

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from xent_jax.core import checks, engine, inputs
from xent_jax.core.options import CrossEntropyOptionKwargs, LossOptions, takes_options
from xent_jax.core.reduction import data_axes, reduce_loss
from xent_jax.fused import ops as fused_ops
from xent_jax.fused.rows import (
  LinearArrays,
  LinearLayout,
  check_linear_layer,
  prepare_rows,
  unfused_logits,
)
from xent_jax.parallel.logits import cross_entropy_head_of, shard_head_loss
from xent_jax.parallel.mesh import loss_specs, row_specs, run_on_mesh


def complete_row_stats(stats, vocab_axis: Hashable):
  r"""Combines one shard's block statistics (:class:`xent_jax.fused.blocks.BlockStats`) into the
  statistics over all shards of ``vocab_axis``.

  .. math::
     m = \operatorname{pmax}_s m_s, \qquad
     \textstyle S = \operatorname{psum}_s S_s e^{m_s - m}, \qquad
     t = \operatorname{psum}_s t_s, \qquad \sigma = \operatorname{psum}_s \sigma_s
  """
  row_max, sumexp = engine.complete_max_sum(stats.max, stats.sumexp, vocab_axis)
  target, weighted_sum = jax.lax.psum((stats.target, stats.weighted_sum), vocab_axis)
  return stats._replace(max=row_max, sumexp=sumexp, target=target, weighted_sum=weighted_sum)


# The kernels run under ``shard_map(check_vma=True)``: they type their loop accumulators as
# varying over the mesh axes of ``hidden`` and ``weight`` (the block configuration's varying and
# row axes), cotangents of values replicated over an axis arrive whole, and each backward pass
# returns cotangents with its primal's type: ``d hidden`` summed over the vocabulary axis,
# ``d weight``/``d bias`` over the data axes. The one-pass op sums its forward pass's gradients
# itself (:func:`_sum_partial_grads`); in the two-pass op's transposed tangent, JAX does: a
# tangent that meets an operand varying over more axes is cast to vary over them (``pvary``), and
# the transpose of that cast is the ``psum``.


def _psum_each(parts, axis):
  """``psum`` of each array in ``parts`` over ``axis``."""
  return tuple(jax.lax.psum(p, axis) for p in parts)


def _sum_partial_grads(grads, vocab_axis, data_axis):
  """Per-shard gradients to their inputs' types: ``d hidden`` over ``vocab_axis``, the weight
  shard's over the data axes."""
  d_hidden, d_weight, d_bias = grads
  d_hidden = jax.lax.psum(d_hidden, vocab_axis)
  rows = data_axes(data_axis)
  if rows:
    d_weight = jax.lax.psum(d_weight, rows)
    d_bias = None if d_bias is None else jax.lax.psum(d_bias, rows)
  return d_hidden, d_weight, d_bias


class _ShardPlan(NamedTuple):
  """The static settings of one shard's run: mesh axes, the layer's layout and chunk sizes, and
  whether the lse is returned."""

  vocab_axis: Hashable
  data_axis: Hashable | tuple[Hashable, ...] | None
  layout: LinearLayout
  return_lse: bool


def _shard_loss(
  fn, options: LossOptions, plan: _ShardPlan, hidden, weight, labels, bias, class_weight, where
):
  r"""The loss on one vocabulary shard inside ``shard_map``: the single-device front end
  (:func:`xent_jax.fused.rows.prepare_rows`) reads the arguments against the global
  :math:`K = V_s\,|\text{vocab}|` classes, then the one-pass or the two-pass schedule runs."""
  rows = prepare_rows(
    fn,
    LinearArrays(hidden, weight, labels, bias, class_weight, where),
    options,
    plan.layout,
    return_lse=plan.return_lse,
    vocab_axis=plan.vocab_axis,
    row_axes=data_axes(plan.data_axis),
  )
  if rows.schedule is None:  # An empty batch: the loss of its empty [..., 0, V_s] logits.
    return shard_head_loss(
      fn,
      cross_entropy_head_of(options),
      options,
      unfused_logits(hidden, weight, bias, plan.layout.weight_layout),
      labels,
      vocab_axis=plan.vocab_axis,
      data_axis=plan.data_axis,
      class_weight=class_weight,
      where=where,
      return_lse=plan.return_lse,
    )
  if rows.schedule.one_pass:
    return _one_pass_loss(fn, options.reduction, plan, rows)
  loss = _two_pass_loss(fn, options.reduction, plan, rows)
  # A traced option out of range makes the loss NaN (the one-pass schedule takes none).
  in_range = options.in_range(fn)
  if plan.return_lse:
    return checks.nan_unless(loss[0], *in_range), loss[1]
  return checks.nan_unless(loss, *in_range)


def _kernel_args(
  rows,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array, jax.Array | None]:
  """The arrays the kernels take, from :func:`xent_jax.fused.rows.prepare_rows`'s rows."""
  return (rows.hidden_NxD, rows.weight, rows.bias, rows.labels_N, rows.class_weight)


def _one_pass_loss(fn, reduction, plan: _ShardPlan, rows):
  """'sum' or 'mean' by the one-pass op, its gradients computed in the forward pass."""
  rows_axes = data_axes(plan.data_axis)
  # Sum and mean are linear in the per-row losses: d(reduced)/d(loss_i) is known up front.
  total_weight_1 = jnp.sum(rows.example_weight_N, keepdims=True)
  if rows_axes:
    total_weight_1 = jax.lax.psum(total_weight_1, rows_axes)
  row_scale = jax.grad(lambda loss_1: reduce_loss(loss_1, total_weight_1, reduction, fn=fn))(
    jnp.zeros((1,), rows.total_weight.dtype)
  )
  row_scale_N = jnp.broadcast_to(row_scale, rows.valid_N.shape)
  return fused_ops.fused_op(
    rows.block,
    rows.loss,
    *_kernel_args(rows),
    rows.kernel_rows(row_scale_N),
    rows.total_weight,
    complete_stats=functools.partial(complete_row_stats, vocab_axis=plan.vocab_axis),
    sum_loss=lambda loss: jax.lax.psum(loss, rows_axes) if rows_axes else loss,
    sum_grads=functools.partial(
      _sum_partial_grads, vocab_axis=plan.vocab_axis, data_axis=plan.data_axis
    ),
    # <d_hidden, hidden'> sums this shard's rows, <d_weight, weight'> its classes.
    tangent_axes=(rows_axes, (plan.vocab_axis,), (plan.vocab_axis,)),
  )


def _two_pass_loss(fn, reduction, plan: _ShardPlan, rows):
  """The per-row statistics by the two-pass op (its tangents summed over the vocabulary axis),
  the per-row loss, then the reduction over the global batch."""
  complete_stats = functools.partial(complete_row_stats, vocab_axis=plan.vocab_axis)
  sum_slices = functools.partial(_psum_each, axis=plan.vocab_axis)
  lse_N, target_N, weighted_sum_N = fused_ops.stats_op(
    rows.block, complete_stats, sum_slices, *_kernel_args(rows)
  )
  loss_N = fused_ops.row_loss(
    rows.loss, rows.total_weight, lse_N, target_N, weighted_sum_N, rows.kernel_rows()
  )
  batch_shape = rows.batch_shape
  loss = reduce_loss(
    loss_N.reshape(batch_shape),
    rows.example_weight_N.reshape(batch_shape),
    reduction,
    fn=fn,
    data_axis=plan.data_axis,
  )
  return (loss, lse_N.reshape(batch_shape)) if plan.return_lse else loss


@takes_options(CrossEntropyOptionKwargs)
def vocab_parallel_linear_cross_entropy_local(
  hidden: jax.typing.ArrayLike,
  weight: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  vocab_axis: Hashable = "vocab",
  data_axis: Hashable | None = None,
  bias: jax.typing.ArrayLike | None = None,
  weight_layout: str = "vd",
  class_weight: jax.typing.ArrayLike | None = None,
  where: jax.typing.ArrayLike | None = None,
  return_lse: bool = False,
  token_chunk_size: int | None = None,
  vocab_chunk_size: int | None = None,
  **options: Unpack[CrossEntropyOptionKwargs],
) -> jax.Array | tuple[jax.Array, jax.Array]:
  r"""Cross-entropy of a linear layer on one vocabulary shard of ``weight``, to call inside your
  own ``shard_map``.

  Shard :math:`s` of mesh axis ``vocab_axis`` holds the rows (or columns, for 'dv') of ``weight``
  of classes :math:`[s V_s, (s+1) V_s)`; with :math:`K = V_s\,|\text{vocab}|` the result is the
  single-device :func:`xent_jax.linear_cross_entropy` of the full layer,

  .. math::
     x_i = \mathrm{cap}(h_i W^\top + b), \qquad
     \ell_i = \sum_{c<K} w_c q_{ic}(\mathrm{lse}_i - x_{ic})
       \;[-\textstyle\sum_c w_c q_{ic}\log q_{ic}]_{\text{t5x}} + z\,\omega_i\,\mathrm{lse}_i^2,

  computed by the blocked kernels of :mod:`xent_jax.fused.linear` on this shard's classes (never
  more than ``[token_chunk, vocab_chunk]`` logits), the per-row statistics completed over the
  shards by :func:`complete_row_stats`. Identical on every shard of ``vocab_axis``. Call it under
  ``jax.shard_map`` with its default ``check_vma=True``: the kernels type their accumulators and
  cotangents by the mesh axes each input varies over, and ``d hidden`` comes back summed over
  ``vocab_axis``, ``d weight``/``d bias`` over ``data_axis``.

  Args:
    hidden: ``[..., D]`` this device's features (the same on every vocabulary shard).
    weight: ``[V_s, D]`` ('vd') or ``[D, V_s]`` ('dv'), this shard's classes.
    labels: ``[...]`` global integer class ids (the same on every vocabulary shard).
    vocab_axis: the mesh axis the classes are split over.
    data_axis: the mesh axis (or tuple of axes) the rows are split over, or None. 'sum' and
      'mean' then reduce over the global batch (a ``psum``); with None they reduce over this
      device's rows.
    bias: ``[V_s]`` this shard's slice of the bias, or None.
    weight_layout: 'vd' or 'dv'.
    class_weight: ``[V_s]`` this shard's slice of the class weights (constants), or None.
    ignore_index, reduction, label_smoothing, smoothing, z_loss, logit_softcap, where, return_lse:
      as in :func:`xent_jax.linear_cross_entropy` (the smoothing spread over the global
      :math:`K`).
    token_chunk_size, vocab_chunk_size: block sizes over this device's rows and classes, or None
      for the defaults.

  Returns:
    The reduced loss (float32; float64 for float64 inputs), and with ``return_lse`` the pair
    ``(loss, lse)``.

  Example:
    >>> # 8 devices; on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8
    >>> import functools, jax, jax.numpy as jnp, xent_jax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> hidden_NxD = jax.random.normal(jax.random.key(1), (4, 8))
    >>> weight_VxD = jax.random.normal(jax.random.key(2), (16, 8))
    >>> labels_N = jnp.array([0, 5, 9, 15])
    >>> mesh = jax.make_mesh((2, 4), ("data", "vocab"))
    >>> loss_fn = functools.partial(
    ...   xent_jax.vocab_parallel_linear_cross_entropy_local, vocab_axis="vocab", data_axis="data"
    ... )
    >>> specs = (P("data", None), P("vocab", None), P("data"))  # place the arrays as specified
    >>> arrays = (hidden_NxD, weight_VxD, labels_N)
    >>> placed = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(arrays, specs)]
    >>> sharded = jax.shard_map(loss_fn, mesh=mesh, in_specs=specs, out_specs=P())
    >>> loss = jax.jit(sharded)(*placed)  # one program (eagerly, each op would run per device)
    >>> one_device = xent_jax.linear_cross_entropy(hidden_NxD, weight_VxD, labels_N)
    >>> print(f"{float(loss):.4f} {float(one_device):.4f}")
    4.9421 4.9421

  References:
    Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024; Shoeybi et al.,
    "Megatron-LM", 2019.
  """
  fn = "vocab_parallel_linear_cross_entropy_local"
  options = LossOptions.checked(fn, **options)
  layout = LinearLayout(weight_layout, token_chunk_size, vocab_chunk_size)
  plan = _ShardPlan(vocab_axis, data_axis, layout, return_lse)
  return _shard_loss(fn, options, plan, hidden, weight, labels, bias, class_weight, where)


@takes_options(CrossEntropyOptionKwargs)
def vocab_parallel_linear_cross_entropy(
  hidden: jax.typing.ArrayLike,
  weight: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  mesh: Mesh,
  vocab_axis: Hashable = "vocab",
  data_axis: Hashable | None = None,
  bias: jax.typing.ArrayLike | None = None,
  weight_layout: str = "vd",
  class_weight: jax.typing.ArrayLike | None = None,
  where: jax.typing.ArrayLike | None = None,
  return_lse: bool = False,
  token_chunk_size: int | None = None,
  vocab_chunk_size: int | None = None,
  **options: Unpack[CrossEntropyOptionKwargs],
) -> jax.Array | tuple[jax.Array, jax.Array]:
  r""":func:`xent_jax.linear_cross_entropy` with ``weight`` split over the classes on a mesh.

  Lays ``weight`` (and ``bias``, ``class_weight``) out split on the vocabulary over
  ``vocab_axis`` and ``hidden``/``labels`` split on their first batch dimension over
  ``data_axis`` (a 2-D ``data x vocab`` mesh), then runs the blocked kernels of
  :func:`xent_jax.linear_cross_entropy` on each shard under ``jax.shard_map``, the per-row
  statistics combined by ``pmax``/``psum`` over ``vocab_axis`` (:func:`complete_row_stats`).
  Each device computes ``[token_chunk, vocab_chunk]`` blocks of its own
  ``[N/|data|, V/|vocab|]`` logits, never the whole ``[N, V]``; ``d hidden`` is summed over
  ``vocab_axis`` and ``d weight``/``d bias`` over ``data_axis``:

  .. math::
     x_i = \mathrm{cap}(h_i W^\top + b), \qquad
     \ell_i = \sum_{c<K} w_c q_{ic}(\mathrm{lse}_i - x_{ic})
       \;[-\textstyle\sum_c w_c q_{ic}\log q_{ic}]_{\text{t5x}} + z\,\omega_i\,\mathrm{lse}_i^2.

  Values and gradients (``hidden``, ``weight``, ``bias``) equal the single-device function.

  Args:
    hidden: ``[..., D]`` features; the first batch dimension is split over ``data_axis``.
    weight: ``[V, D]`` ('vd') or ``[D, V]`` ('dv'); ``V`` must be divisible by the size of
      ``vocab_axis``.
    labels: ``[...]`` integer class ids.
    mesh, vocab_axis, data_axis: as in :func:`vocab_parallel_cross_entropy`.
    bias, weight_layout, class_weight, ignore_index, reduction, label_smoothing, smoothing:
      as in :func:`xent_jax.linear_cross_entropy`.
    z_loss, logit_softcap, where, return_lse, token_chunk_size, vocab_chunk_size: as in
      :func:`xent_jax.linear_cross_entropy` (chunk sizes count one device's rows and classes).

  Returns:
    As :func:`xent_jax.vocab_parallel_cross_entropy`.

  Example::

    mesh = jax.make_mesh((2, 4), ("data", "vocab"))
    loss = xent_jax.vocab_parallel_linear_cross_entropy(
        hidden_NxD, weight_VxD, labels_N, mesh=mesh, data_axis="data")

  References:
    Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024; Shoeybi et al.,
    "Megatron-LM", 2019.
  """
  fn = "vocab_parallel_linear_cross_entropy"
  num_classes, _ = check_linear_layer(fn, hidden, weight, weight_layout, bias)
  options = LossOptions.checked(fn, **options)
  hidden, weight = jnp.asarray(hidden), jnp.asarray(weight)
  labels = inputs.as_label_array(fn, labels)
  batch_shape = hidden.shape[:-1]
  inputs.check_integer_labels(fn, labels, batch_shape)
  rows = row_specs(fn, mesh, vocab_axis, data_axis, num_classes, "weight", batch_shape, "hidden")
  if where is not None:
    where = inputs.row_mask(fn, where, batch_shape)
  if class_weight is not None:
    checks.check_floating(fn, "class_weight", class_weight)
    checks.check_shape(fn, "class_weight", class_weight, (num_classes,))
  row_spec, class_spec = PartitionSpec(*rows), PartitionSpec(vocab_axis)
  args = {
    "hidden": hidden,
    "weight": weight,
    "labels": labels,
    "bias": bias,
    "class_weight": class_weight,
    "where": where,
  }
  specs = {
    "hidden": PartitionSpec(*rows, None),
    "weight": PartitionSpec(vocab_axis, None)
    if weight_layout == "vd"
    else PartitionSpec(None, vocab_axis),
    "labels": row_spec,
    "bias": class_spec,
    "class_weight": class_spec,
    "where": row_spec,
  }
  layout = LinearLayout(weight_layout, token_chunk_size, vocab_chunk_size)
  plan = _ShardPlan(vocab_axis, data_axis, layout, return_lse)

  def local(a):
    return _shard_loss(
      fn,
      options,
      plan,
      a["hidden"],
      a["weight"],
      a["labels"],
      a.get("bias"),
      a.get("class_weight"),
      a.get("where"),
    )

  return run_on_mesh(local, mesh, args, specs, loss_specs(options.reduction, row_spec, return_lse))
