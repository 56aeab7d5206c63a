r"""The bi-tempered logistic loss with the classes split over a device mesh.

Each vocabulary shard runs the row kernel of :mod:`xent_jax.losses.bitempered` on its classes,
every per-row max and class sum completed over the shards (``pmax``/``psum``), under the mesh
glue of :func:`xent_jax.parallel.mesh.sharded_loss`.
"""

import jax
import jax.numpy as jnp
from jax import lax

from xent_jax.core import checks, inputs
from xent_jax.core.reduction import reduce_loss
from xent_jax.losses import bitempered
from xent_jax.parallel.mesh import layout_arrays_options, sharded_loss


def vocab_parallel_bi_tempered_loss(
  fn: str,
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  mesh: jax.sharding.Mesh,
  t1: float = 0.8,
  t2: float = 1.2,
  num_iters: int = 5,
  return_lse: bool = False,
  **kwargs,
) -> jax.Array:
  r""":func:`xent_jax.bi_tempered_logistic_loss` with the classes split over a mesh axis.

  Shard :math:`s` of ``vocab_axis`` holds the logits ``[..., V_s]`` of classes
  :math:`[s V_s, (s+1) V_s)`; the per-row numbers of the loss are completed over the shards,

  .. math::
     m = \operatorname{pmax}_s \max_{c \in s} x_c, \qquad
     \textstyle\sum_c f(p_c) = \operatorname{psum}_s \sum_{c \in s} f(p_c), \qquad
     x_y = \operatorname{psum}_s [y \in s]\, x_y,

  for every sum of the normalization's iterations (fixed point or bisection), of the loss and of
  :math:`A`, :math:`B` and the tangent (module docstring), so values and gradients (of the logits,
  and of probability labels through class weights) equal the one-device loss; the smoothing is
  spread over the global :math:`V = V_s\,|\text{vocab}|`. Only per-row values are kept between
  the passes; forward mode works. Runs :func:`xent_jax.parallel.mesh.sharded_loss`, which lays the
  global arrays out on ``mesh`` as :func:`xent_jax.vocab_parallel_cross_entropy` does.

  Args:
    fn: the caller's name, for error messages.
    logits: ``[..., V, ...]`` float logits, classes on ``axis``.
    labels: integer class ids (``logits.shape`` without ``axis``) or float probabilities
      (``logits.shape``, split over the classes like the logits).
    mesh: as in :func:`xent_jax.vocab_parallel_cross_entropy`.
    kwargs: ``vocab_axis``, ``data_axis``, ``axis``, ``class_weight`` (``[V]``, split like the
      classes), ``where``, ``reduction``, ``ignore_index``, ``label_smoothing``: as in
      :func:`xent_jax.vocab_parallel_cross_entropy`.
    return_lse: must be False: the loss normalizes by :math:`\lambda`, it has no logsumexp.
    t1, t2, label_smoothing, num_iters: as in :func:`xent_jax.bi_tempered_logistic_loss` (the
      first three may be traced scalars: a traced value out of range makes the loss NaN).

  Returns:
    The reduced loss (for 'none' of the batch shape, split over ``data_axis``).

  Example::

    mesh = jax.make_mesh((2, 4), ("data", "vocab"))
    loss = xent_jax.get_loss("bi_tempered", t1=0.8, t2=1.2).vocab_parallel(
        logits_BxV, labels_B, mesh=mesh, data_axis="data")

  References:
    Amid, Warmuth, Anil, Koren, "Robust Bi-Tempered Logistic Loss Based on Bregman Divergences",
    NeurIPS 2019; Shoeybi et al., "Megatron-LM", 2019 (vocabulary-parallel losses).
  """
  layout, arrays, options = layout_arrays_options(fn, mesh, logits, labels, kwargs)
  vocab_axis, data_axis = layout.vocab_axis, layout.data_axis
  label_smoothing, ignore_index = options.label_smoothing, options.ignore_index
  in_range = bitempered.check_hparams(fn, t1, t2, label_smoothing, num_iters)
  if return_lse:
    raise ValueError(
      f"{fn}: `return_lse` must be False: the bi-tempered loss normalizes its tempered softmax "
      "by lambda and has no logsumexp."
    )

  def shard_loss(logits, labels, *, class_weight, where):
    num_classes = logits.shape[-1] * lax.axis_size(vocab_axis)
    smoothable = bitempered.check_smoothable(fn, label_smoothing, num_classes)
    cfg = bitempered.loss_config(t1, t2, label_smoothing, num_iters, num_classes, vocab_axis)
    if jnp.issubdtype(labels.dtype, jnp.integer):
      read = inputs.integer_labels(
        fn, labels, num_classes=num_classes, ignore_index=ignore_index, where=where
      )
      labels, valid = read.labels, read.valid
    else:
      valid = inputs.row_mask(fn, where, logits.shape[:-1])
    loss, example_weight = bitempered.weighted_rows(logits, labels, valid, class_weight, cfg)
    loss = reduce_loss(loss, example_weight, options.reduction, fn=fn, data_axis=data_axis)
    return checks.nan_unless(loss, smoothable)

  loss = sharded_loss(fn, shard_loss, layout, arrays, options.reduction)
  return checks.nan_unless(loss, *in_range)
