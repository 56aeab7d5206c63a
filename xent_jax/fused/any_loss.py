r"""Any registered loss on a linear layer's logits: picks the fused schedule that serves it.

:func:`loss_on_linear` is the body of :meth:`xent_jax.registry.ConfiguredLoss.linear`:

* cross-entropy (without per-token statistics) runs :func:`xent_jax.linear_cross_entropy`'s
  kernels (:mod:`xent_jax.fused.linear`);
* every other loss, for 'sum' and 'mean' while a float32 ``[V, D]`` accumulator is small
  (:func:`xent_jax.fused.schedule.one_pass_fits`), computes each token chunk's gradients in the
  forward pass (:func:`xent_jax.fused.chunked.one_pass_linear_sum`);
* otherwise the engine's heads with integer labels take blocked statistics
  (:mod:`xent_jax.fused.heads`) where the weight is narrower than float32 or a
  ``vocab_chunk_size`` is given, and the rest rematerialise each token chunk's logits
  (:func:`xent_jax.fused.chunked.chunked_linear_loss`).

Traced hyper-parameters (under ``jit``, ``vmap``, ``grad``, ``jvp``): the one-pass schedule and
the blocked statistics hold the loss's functions as constants of their custom derivatives, so a
loss with a traced hyper-parameter rematerialises token chunks (plain autodiff, the same values
and gradients); cross-entropy keeps its kernels (two-pass, see
:func:`xent_jax.fused.rows.prepare_rows`) unless its ``logit_softcap`` is traced.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from xent_jax.core import checks, engine, heads, inputs
from xent_jax.core.options import LossOptions
from xent_jax.core.reduction import reduce_loss
from xent_jax.fused import chunked, linear, schedule
from xent_jax.fused import heads as fused_heads
from xent_jax.fused import rows as rows_lib
from xent_jax.fused.rows import LinearArrays, LinearLayout
from xent_jax.losses import cross_entropy

# ``engine_head(num_classes) -> (head, label_smoothing)`` of a loss of the row-statistics engine,
# or None for any other loss.
EngineHead = Callable[[int], tuple[heads.Head, float] | None]
RowLoss = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict]]


class _LinearRows(NamedTuple):
  """A linear loss's checked inputs, one row per token.

  Attributes:
    hidden_NxD: ``[N, D]``; weight: in its layout; bias: ``[V]`` or None.
    labels_N: ``[N]`` integer ids or ``[N, V]`` probabilities.
    class_weight: ``[V]`` or None.
    mask_N: ``[N]`` bool, rows that count (``where``, and not ``ignore_index``).
    example_weight_N: ``[N]`` the 'mean' denominator's terms.
    read: the integer labels as read by :func:`xent_jax.core.inputs.integer_labels`, or None
      for probability labels.
    batch_shape: ``hidden``'s shape without ``D``.
    num_classes: ``V``.
  """

  hidden_NxD: jax.Array
  weight: jax.Array
  bias: jax.Array | None
  labels_N: jax.Array
  class_weight: jax.Array | None
  mask_N: jax.Array
  example_weight_N: jax.Array
  read: inputs.IntegerLabels | None
  batch_shape: tuple[int, ...]
  num_classes: int


def _read_rows(fn, arrays: LinearArrays, options, layout: LinearLayout) -> _LinearRows:
  """Checks the arrays of a linear loss and reads them row by row (:class:`_LinearRows`)."""
  hidden, weight, labels, bias, class_weight, where = arrays
  num_classes, _ = rows_lib.check_linear_layer(fn, hidden, weight, layout.weight_layout, bias)
  checks.check_reduction(fn, options.reduction)
  hidden, weight = jnp.asarray(hidden), jnp.asarray(weight)
  labels = inputs.as_label_array(fn, labels)
  batch_shape = hidden.shape[:-1]
  n = math.prod(batch_shape)
  integer = jnp.issubdtype(labels.dtype, jnp.integer)
  checks.check_shape(fn, "labels", labels, batch_shape if integer else batch_shape + (num_classes,))
  if class_weight is not None:
    inputs.check_class_weight(fn, "class_weight", class_weight, num_classes)
    class_weight = jnp.asarray(class_weight)
  valid_N = inputs.row_mask(fn, where, batch_shape).reshape(n)
  dtype = inputs.compute_dtype(jnp.result_type(hidden.dtype, weight.dtype))
  labels_N = labels.reshape((n,) + labels.shape[len(batch_shape) :])
  read = None
  if integer:
    read = inputs.integer_labels(
      fn, labels_N, num_classes=num_classes, ignore_index=options.ignore_index, where=valid_N
    )
    target_weight = 1.0 if class_weight is None else class_weight.astype(dtype)[read.safe_labels]
    example_weight_N = jnp.where(read.valid, target_weight, 0.0).astype(dtype)
    valid_N = read.valid
  else:
    example_weight_N = valid_N.astype(dtype)
  if layout.vocab_chunk_size is not None:
    schedule.check_chunk_size(fn, "vocab_chunk_size", layout.vocab_chunk_size)
  bias = None if bias is None else jnp.asarray(bias)
  return _LinearRows(
    hidden.reshape(n, hidden.shape[-1]),
    weight,
    bias,
    labels_N,
    class_weight,
    valid_N,
    example_weight_N,
    read,
    batch_shape,
    num_classes,
  )


def _token_loss(loss_fn, hparams, options: LossOptions, rows: _LinearRows, return_stats) -> RowLoss:
  """``row_loss(logits [T, V], labels [T, ...], valid [T]) -> (loss [T], extras)``: the loss on a
  token chunk, with the per-token statistics as ``extras`` when ``return_stats``."""
  cap = hparams.get("logit_softcap")
  integer = rows.read is not None

  def row_loss(logits_TxV, labels_T, valid_T):
    loss = loss_fn(
      logits_TxV,
      labels_T,
      **hparams,
      class_weight=rows.class_weight,
      ignore_index=options.ignore_index,
      where=valid_T,
      reduction="none",
    )
    if not return_stats:
      return loss, {}
    safe = None
    if integer:
      safe = jnp.clip(labels_T, 0, rows.num_classes - 1).astype(jnp.int32)
    stats = engine.row_stats(logits_TxV, safe, logit_softcap=cap, entropy=True)
    counts = loss * 0 == 0  # rows whose loss is defined (NaN for an out-of-range label)
    keep = lambda a: jnp.where(valid_T & counts, a, jnp.zeros_like(a))
    extras = {"entropy": keep(stats.entropy), "lse": keep(stats.lse)}
    if integer:
      extras["log_prob"] = keep(stats.log_p_target)
    return loss, extras

  return row_loss


def _one_pass(fn, row_loss: RowLoss, rows: _LinearRows, options, layout: LinearLayout):
  """The reduced loss of 'sum' or 'mean', gradients computed in the forward pass."""
  n = rows.hidden_NxD.shape[0]
  # 'sum' and 'mean' are linear in the per-row losses: d(reduced)/d(loss_i) is known up front.
  scale_N = jax.grad(
    lambda loss: reduce_loss(loss, rows.example_weight_N, options.reduction, fn=fn)
  )(jnp.zeros((n,), rows.example_weight_N.dtype))
  chunk = schedule.resolve_chunk(
    fn, "token_chunk_size", layout.token_chunk_size, n, schedule.default_chunk(rows.num_classes, n)
  )
  return chunked.one_pass_linear_sum(
    row_loss,
    rows.hidden_NxD,
    rows.weight,
    rows.bias,
    rows.labels_N,
    rows.mask_N,
    scale_N,
    weight_layout=layout.weight_layout,
    chunk=chunk,
  )


def _blocked_head(fn, engine_head, rows: _LinearRows, layout: LinearLayout, return_stats):
  """Per-row losses and statistics of an engine head from blocked statistics; a bfloat16 head's
  weight gradient sums in float32."""
  head, label_smoothing = engine_head
  read = rows.read
  assert read is not None  # integer labels (the caller's condition)
  loss_N, stats = fused_heads.integer_head_linear(
    fn,
    head,
    rows.hidden_NxD,
    rows.weight,
    read.safe_labels,
    layout,
    bias=rows.bias,
    class_weight=rows.class_weight,
    label_smoothing=label_smoothing,
    entropy=return_stats,
  )
  loss_N = heads.mask_rows(loss_N, read.valid, read.bad)
  keep = lambda a: jnp.where(read.valid & read.in_range, a, jnp.zeros_like(a))
  extras = {
    "entropy": keep(stats.entropy),
    "lse": keep(stats.lse),
    "log_prob": keep(stats.log_p_target),
  }
  return loss_N, extras


def _per_row(name, fn, engine_head, hparams, row_loss, rows: _LinearRows, layout, return_stats):
  """``(loss [N], extras)`` from the blocked statistics of an engine head with integer labels
  (a weight narrower than float32, or a ``vocab_chunk_size``), else from rematerialised token
  chunks."""
  head = engine_head(rows.num_classes)
  blocks = layout.vocab_chunk_size is not None or fused_heads.takes_blocks(
    rows.hidden_NxD.dtype, rows.weight.dtype
  )
  traced = checks.any_traced(dict(hparams))
  if rows.read is not None and head is not None and blocks and not traced:
    return _blocked_head(fn, head, rows, layout, return_stats)
  if layout.vocab_chunk_size is not None and traced:
    raise ValueError(
      f"{fn}: `vocab_chunk_size` selects blocked statistics, which hold the hyper-parameters as "
      "constants; with traced hyper-parameters the loss takes whole-vocabulary token chunks. "
      "Leave it None."
    )
  if layout.vocab_chunk_size is not None:
    raise ValueError(
      f"{fn}: `vocab_chunk_size` needs integer labels and a loss of the row-statistics engine "
      f"(its blocked statistics); got {'integer' if rows.read is not None else 'probability'} "
      f"labels for loss {name!r}, whose fused form takes whole-vocabulary token chunks. Leave "
      "it None."
    )
  return chunked.chunked_linear_loss(
    fn, row_loss, rows.hidden_NxD, rows.weight, rows.labels_N, rows.mask_N, layout, bias=rows.bias
  )


def _empty_batch(loss_fn, hparams, arrays: LinearArrays, options, layout, rows: _LinearRows):
  """The loss of the empty ``[..., 0, V]`` logits and its (empty) per-token statistics."""
  hidden, weight, labels, bias, _, where = arrays
  loss = loss_fn(
    rows_lib.unfused_logits(hidden, weight, bias, layout.weight_layout),
    labels,
    **hparams,
    class_weight=rows.class_weight,
    ignore_index=options.ignore_index,
    reduction=options.reduction,
    where=where,
  )
  empty = jnp.zeros(rows.batch_shape, rows.example_weight_N.dtype)
  stats = {"entropy": empty, "lse": empty}
  return loss, stats | ({"log_prob": empty} if rows.read is not None else {})


def loss_on_linear(
  name: str,
  loss_fn: Callable[..., jax.Array],
  hparams: Mapping[str, Any],
  engine_head: EngineHead,
  arrays: LinearArrays,
  options: LossOptions,
  layout: LinearLayout,
  *,
  return_stats: bool,
) -> jax.Array | tuple[jax.Array, dict[str, jax.Array]]:
  """``loss_fn`` with ``hparams`` on ``hidden @ weight.T + bias``, without the ``[N, V]`` logits:
  :meth:`xent_jax.registry.ConfiguredLoss.linear` (see there for the arguments and returns).

  Args:
    name: the registry name of the loss (errors name ``get_loss(name).linear``).
    loss_fn: the loss on logits, ``loss_fn(logits, labels, **hparams, class_weight, ignore_index,
      reduction, where)``.
    hparams: its bound hyper-parameters.
    engine_head: its head of the row-statistics engine (:data:`EngineHead`).
    arrays: ``hidden``, ``weight``, ``labels``, ``bias``, ``class_weight`` (the loss's
      ``weight``) and ``where``.
    options: ``reduction`` and ``ignore_index`` (checked here; for cross-entropy the
      hyper-parameters join them).
    layout: the weight layout and the chunk sizes.
    return_stats: also return the per-token statistics.
  """
  fn = f"get_loss({name!r}).linear"
  traced = checks.any_traced(dict(hparams))
  kernels_take = not checks.is_traced(hparams.get("logit_softcap"))
  if loss_fn is cross_entropy.cross_entropy and not return_stats and kernels_take:
    public = "linear_cross_entropy"
    options = dataclasses.replace(options, **hparams)
    options = LossOptions.checked(public, **dataclasses.asdict(options))
    return linear.cross_entropy_on_linear(public, arrays, options, layout)
  rows = _read_rows(fn, arrays, options, layout)
  n, features = rows.hidden_NxD.shape
  if n == 0:  # Nothing to chunk: the loss of the empty [..., 0, V] logits.
    loss, stats = _empty_batch(loss_fn, hparams, arrays, options, layout, rows)
    return (loss, stats) if return_stats else loss
  row_loss = _token_loss(loss_fn, hparams, options, rows, return_stats)
  if (
    options.reduction != "none"
    and not traced
    and not return_stats
    and layout.vocab_chunk_size is None
    and schedule.one_pass_fits(n, features, rows.num_classes)
  ):
    return _one_pass(fn, row_loss, rows, options, layout)
  loss_N, extras = _per_row(name, fn, engine_head, hparams, row_loss, rows, layout, return_stats)
  batch_shape = rows.batch_shape
  example_weight = rows.example_weight_N.reshape(batch_shape)
  loss = reduce_loss(loss_N.reshape(batch_shape), example_weight, options.reduction, fn=fn)
  if not return_stats:
    return loss
  return loss, {k: v.reshape(batch_shape) for k, v in extras.items()}
