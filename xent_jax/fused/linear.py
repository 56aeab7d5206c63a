r"""Fused linear cross-entropy: the loss of ``hidden @ weight.T + bias`` without ``[N, V]`` logits.

The per-row loss of :func:`xent_jax.cross_entropy` for integer labels needs only three statistics
of the (capped) logits row :math:`x_i = \mathrm{cap}(h_i W^\top + b)`:

.. math::
   \mathrm{lse}_i = \log\sum_c e^{x_{ic}}, \qquad t_i = x_{i y_i}, \qquad
   s_i = \sum_c w_c\, x_{ic},

and its gradient with respect to the logits is, with the chain rule through those statistics,

.. math::
   \frac{\partial L}{\partial x_{ic}} = \bar{\mathrm{lse}}_i\, e^{x_{ic} - \mathrm{lse}_i}
   + \bar t_i\, [c = y_i] + \bar s_i\, w_c,

where :math:`(\bar{\mathrm{lse}}, \bar t, \bar s)` are the cotangents of the statistics (found by
differentiating the core's per-row formula, so the smoothing, z-loss and reduction rules are the
core's own). Both are computed block by block (:mod:`xent_jax.fused.kernels`): the tokens are cut
into chunks of ``token_chunk_size`` rows and the vocabulary into chunks of ``vocab_chunk_size``
classes; only one ``[token_chunk, vocab_chunk]`` block of logits exists at a time.

Two schedules, chosen from the shapes by :func:`xent_jax.fused.schedule.plan_schedule`:

* **one pass** (``reduction`` 'sum' or 'mean', whole vocabulary per block, and a float32
  ``[V, D]`` weight-gradient accumulator no larger than 1/8 of the ``[N, V]`` float32 logits,
  :math:`8D \le N`, or than one block, :math:`VD \le 2^{24}`): each token chunk's logits are
  computed once, and its loss and the gradients for ``hidden``, ``weight`` and ``bias`` are
  computed from them right away, during the forward pass (as Liger-Kernel does). The backward
  pass only scales the stored gradients by the incoming scalar cotangent: three matmuls in all,
  as many as the unfused loss and its gradient (:func:`xent_jax.fused.ops.fused_op`).
* **two passes** (otherwise: reduction 'none', ``return_lse``, vocabulary chunks, or a large
  ``D/N`` as at LLM heads): the forward pass keeps only the per-row statistics; the backward pass
  recomputes each block from ``hidden`` and ``weight`` once the per-row cotangents are known: four
  matmuls, the least memory (:func:`xent_jax.fused.ops.stats_op`). That backward pass is JAX's
  transpose of the statistics' tangent (a second blocked pass), so forward mode works here too.
  Its loop order keeps the fewer float32 elements besides the gradients: **vocabulary-major**
  (vocabulary chunks outermost, each seeing every token, so each ``d_weight`` block is finished
  in float32 and written once in the weight's dtype; ``d_hidden`` accumulates ``[N, D]`` in
  float32) for bfloat16 heads with :math:`V > N + 4096`, token-major otherwise (``d_weight``
  accumulates ``[V, D]`` in float32: for a float32 weight, the gradient itself).

The compiled temporary memory of both at language-model heads, against the matmul plus optax's
loss, is in ``experiments/results/aot_memory.md``.

References:
  Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024 (blockwise CE);
  Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024 (gradients in the
  forward pass); Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018.
"""

from typing import Unpack

import jax
import jax.numpy as jnp

from xent_jax.core import checks
from xent_jax.core.frontend import head_loss
from xent_jax.core.options import CrossEntropyOptionKwargs, LossOptions, takes_options
from xent_jax.core.reduction import reduce_loss
from xent_jax.fused import ops
from xent_jax.fused import rows as rows_lib
from xent_jax.fused.rows import LinearArrays, LinearLayout
from xent_jax.losses.cross_entropy import cross_entropy_head


@takes_options(CrossEntropyOptionKwargs)
def linear_cross_entropy(
  hidden: jax.typing.ArrayLike,
  weight: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  bias: jax.typing.ArrayLike | None = None,
  weight_layout: str = "vd",
  class_weight: jax.typing.ArrayLike | None = None,
  where: jax.typing.ArrayLike | None = None,
  return_lse: bool = False,
  token_chunk_size: int | None = None,
  vocab_chunk_size: int | None = None,
  **options: Unpack[CrossEntropyOptionKwargs],
) -> jax.Array | tuple[jax.Array, jax.Array]:
  r"""Cross-entropy of a linear layer's logits, computed in blocks, never holding ``[N, V]``.

  Equals ``cross_entropy(hidden @ weight.T + bias, labels, weight=class_weight, ...)`` in value and
  in its gradients for ``hidden``, ``weight`` and ``bias``:

  .. math::
     x_i = \mathrm{cap}(h_i W^\top + b), \qquad
     \ell_i = \sum_c w_c\, q_{ic}\,(\mathrm{lse}_i - x_{ic})
       \;[-\; \textstyle\sum_c w_c q_{ic}\log q_{ic}]_{\text{t5x}}
       \;+\; z\,\omega_i\,\mathrm{lse}_i^2,

  computed from the per-row statistics :math:`\mathrm{lse}_i`, :math:`x_{iy_i}` and
  :math:`\sum_c w_c x_{ic}` gathered chunk by chunk (see the module docstring). With 'sum' or
  'mean', no ``vocab_chunk_size`` and :math:`8D \le N` (or :math:`VD \le 2^{24}`) the gradients
  are computed in the forward pass (three matmuls, as the unfused loss) and kept until the
  backward pass, which scales them (residuals: the size of ``hidden`` and ``weight``); otherwise
  the backward pass recomputes the logits (four matmuls, blocks of
  ``[token_chunk_size, vocab_chunk_size]``, residuals: the per-row ``lse``), vocabulary chunks
  outermost for bfloat16 heads with :math:`V > N + 4096`, so that no float32 ``[V, D]`` buffer
  exists besides a float32 gradient (:func:`xent_jax.fused.schedule.plan_schedule`). Called
  without differentiation, it only computes the loss (one matmul).

  Gradients come back in the inputs' dtypes, accumulated in float32 (float64 for float64 inputs).
  With bfloat16 inputs the loss equals the float64 loss of the (rounded) inputs to 1e-5 relative,
  and each gradient lies within 1e-2 of its largest entry of the float64 gradient (bfloat16
  matmul operands and outputs; tested in every schedule). Compiled for CPU, which has no
  bfloat16 products, the one-pass schedule casts bfloat16 inputs to float32 once instead, and
  rounds the gradients once, at the end (``xent_jax.fused.ops.UPCAST_PLATFORMS``).

  Args:
    hidden: ``[..., D]`` float features (bfloat16 is accumulated in float32).
    weight: ``[V, D]`` projection (``weight_layout='vd'``, the ``nn.Linear`` / embedding layout)
      or ``[D, V]`` (``'dv'``, the ``hidden @ kernel`` layout of Flax's ``Dense``).
    labels: ``[...]`` integer class ids (``hidden``'s shape without ``D``).
    bias: ``[V]`` or None.
    weight_layout: 'vd' or 'dv', see ``weight``.
    class_weight: ``[V]`` class weights (``cross_entropy``'s ``weight``), treated as constants.
    ignore_index: labels equal to it count for nothing; None: none ignored. Other labels outside
      ``[0, V)`` give a NaN loss.
    reduction: 'none' (``[...]``), 'sum' or 'mean' (by the summed weights of counted rows; 0 when
      there are none).
    label_smoothing: :math:`\epsilon \in [0, 1]`.
    smoothing: 'uniform' (:math:`\epsilon/V` everywhere) or 't5x' (:math:`\epsilon/(V-1)` off the
      label, minus the target's entropy).
    z_loss: :math:`z \ge 0`, adds :math:`z\,\omega_i\,\mathrm{lse}_i^2` (PaLM).
    logit_softcap: :math:`c > 0` applies :math:`c\tanh(x/c)` to the logits (Gemma 2).
      ``label_smoothing`` and ``z_loss`` may be traced scalars (``jit``, ``vmap``, ``grad``,
      ``jvp``; the two-pass schedule then runs, with the concrete call's values); a traced value
      out of range makes the loss NaN instead of raising. ``logit_softcap`` is a constant of the
      kernels' blocks: a traced one is a ``TypeError`` (``get_loss("cross_entropy",
      logit_softcap=c).linear`` takes it).
    where: bool mask broadcastable to ``labels``' shape; False rows count for nothing.
    return_lse: also return the per-row ``lse`` ``[...]`` (uses the two-pass schedule).
    token_chunk_size: rows per block; default: a power of two giving a ``[rows, vocab_chunk]``
      block of about ``2**24`` elements, within [128, 1024], on CPU and TPU; on GPU the two-pass
      blocks are about ``2**25`` elements, within [128, 8192]
      (:func:`xent_jax.fused.schedule.plan_schedule`). Larger than the row count means all rows.
    vocab_chunk_size: classes per block; default: the whole vocabulary, or about 4096 classes
      (:func:`xent_jax.fused.schedule.vocab_major_chunk`) for the vocabulary-major backward and,
      on GPU, for every two-pass block. Giving it selects the two-pass schedule and bounds the
      block to ``[token_chunk_size, vocab_chunk_size]``.

  Returns:
    The reduced loss (float32; float64 for float64 inputs), and with ``return_lse`` the pair
    ``(loss, lse)``.

  Example:
    >>> import jax, jax.numpy as jnp, xent_jax
    >>> hidden = jnp.ones((4, 8)); weight = jnp.zeros((100, 8))
    >>> float(xent_jax.linear_cross_entropy(hidden, weight, jnp.array([1, 2, 3, 4])))  # log(100)
    4.605...

  References:
    Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024;
    Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024.
  """
  fn = "linear_cross_entropy"
  options = LossOptions.checked(fn, **options)
  layout = LinearLayout(weight_layout, token_chunk_size, vocab_chunk_size)
  arrays = LinearArrays(hidden, weight, labels, bias, class_weight, where)
  return cross_entropy_on_linear(fn, arrays, options, layout, return_lse=return_lse)


def cross_entropy_on_linear(
  fn: str,
  arrays: LinearArrays,
  options: LossOptions,
  layout: LinearLayout,
  *,
  return_lse: bool = False,
):
  """:func:`linear_cross_entropy` of the ``arrays`` with its options checked
  (:meth:`LossOptions.checked`) and its layout as one object each; ``fn`` names the public
  function in error messages."""
  rows = rows_lib.prepare_rows(fn, arrays, options, layout, return_lse=return_lse)
  if rows.schedule is None:  # Nothing to chunk: the unfused loss of the empty [..., 0, V] logits.
    hidden, weight, labels, bias, class_weight, where = arrays
    logits = rows_lib.unfused_logits(hidden, weight, bias, layout.weight_layout)
    head = cross_entropy_head(options.smoothing, options.z_loss)
    reduced, stats = head_loss(
      fn, head, logits, labels, options, class_weight=class_weight, where=where
    )
    return (reduced, stats.lse) if return_lse else reduced
  args = (rows.hidden_NxD, rows.weight, rows.bias, rows.labels_N, rows.class_weight)
  reduction = options.reduction
  if rows.schedule.one_pass:
    # Sum and mean are linear in the per-row losses: d(reduced)/d(loss_i) is known up front.
    row_scale_N = jax.grad(lambda loss: reduce_loss(loss, rows.example_weight_N, reduction, fn=fn))(
      jnp.zeros_like(rows.example_weight_N)
    )
    kernel_rows = rows.kernel_rows(row_scale_N)
    return ops.fused_op(rows.block, rows.loss, *args, kernel_rows, rows.total_weight)
  lse_N, target_N, weighted_sum_N = ops.stats_op(rows.block, ops.unchanged, ops.unchanged, *args)
  loss_N = ops.row_loss(
    rows.loss, rows.total_weight, lse_N, target_N, weighted_sum_N, rows.kernel_rows()
  )
  batch_shape = rows.batch_shape
  loss = reduce_loss(
    loss_N.reshape(batch_shape), rows.example_weight_N.reshape(batch_shape), reduction, fn=fn
  )
  loss = checks.nan_unless(loss, *options.in_range(fn))
  return (loss, lse_N.reshape(batch_shape)) if return_lse else loss
