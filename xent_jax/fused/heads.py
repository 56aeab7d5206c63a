r"""Any engine head on a linear layer, integer labels: the blocked kernels of the fused head.

A head of :mod:`xent_jax.core.heads` (the variants, losses from :func:`xent_jax.define_loss`)
depends on a logits row :math:`x_i = hW^\top + b` only through per-row statistics: the
log-sum-exp, the label's logit, with label smoothing one class sum
:math:`\sum_c \beta_c f(\log p_{ic})` (:math:`\beta` the class weights times the head's class
factor), and for some the entropy.
:func:`xent_jax.fused.ops.head_stats_op` computes them block by block, as
:func:`xent_jax.linear_cross_entropy`'s two-pass schedule does cross-entropy's: one pass for the
log-sum-exp and the label's logit, a second for the class sum and entropy (only when asked for),
and a blocked tangent pass whose transpose is the backward pass, in the loop order of
:func:`xent_jax.fused.schedule.plan_schedule`. For a bfloat16 head with a large vocabulary that is
vocabulary-major: each block of the weight's gradient is summed over every token in float32 and
written once, where rematerialising token chunks (:mod:`xent_jax.fused.chunked`) sums it over the
chunks in bfloat16. Four matmuls without smoothing or entropy, five with; heads with float32
weights keep rematerialising (:func:`takes_blocks`).

References:
  Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024 (losses from
  blockwise statistics).
"""

import dataclasses

import jax
import jax.numpy as jnp

from xent_jax.core import engine, heads, inputs
from xent_jax.fused import ops, schedule
from xent_jax.fused.rows import LinearLayout


def takes_blocks(hidden_dtype, weight_dtype) -> bool:
  """Whether a head takes the blocked statistics rather than rematerialised token chunks (where
  the one-pass schedule does not fit): when the weight is narrower than the accumulation dtype,
  whose gradient the rematerialising schedule would sum over the chunks in the weight's dtype.
  A float32 weight's gradient sums in float32 either way, and rematerialising takes one matmul
  fewer where the loss needs a class sum or the entropy (the timings that compare the two:
  ``experiments/results/bench_fused_heads.md``)."""
  acc = jnp.promote_types(jnp.promote_types(hidden_dtype, weight_dtype), jnp.float32)
  return jnp.dtype(weight_dtype).itemsize < jnp.dtype(acc).itemsize


def integer_head_linear(
  fn: str,
  head: heads.Head,
  hidden_NxD: jax.Array,
  weight: jax.Array,
  labels_N: jax.Array,
  layout: LinearLayout,
  *,
  bias: jax.Array | None,
  class_weight: jax.Array | None,
  label_smoothing: float,
  entropy: bool,
) -> tuple[jax.Array, engine.RowStats]:
  """Per-row losses of ``head`` on ``hidden @ weight.T + bias`` (no checks, no mask).

  Args:
    fn: the public name, for error messages.
    head: the loss.
    hidden_NxD: ``[N, D]``; weight: ``[V, D]`` ('vd') or ``[D, V]`` ('dv'); bias: ``[V]`` or None.
    labels_N: ``[N]`` valid class ids (make invalid ones safe before calling).
    layout: the weight layout and the chunk sizes (rows and classes per block, or None for the
      defaults of :func:`xent_jax.fused.schedule.plan_schedule`).
    class_weight: ``[V]`` or None.
    label_smoothing: :math:`\\epsilon` of the uniformly smoothed target.
    entropy: also compute the entropy (for the caller's statistics) when the head does not.

  Returns:
    ``(loss [N], stats)``, the statistics relative to the log-sum-exp (``max`` is the
    log-sum-exp, ``log_sum`` 0), in float32 (float64 for float64 inputs).
  """
  n, d = hidden_NxD.shape
  num_classes = weight.shape[schedule.class_dim(layout.weight_layout)]
  dtype = inputs.compute_dtype(jnp.result_type(hidden_NxD.dtype, weight.dtype))
  target = heads.smoothed_target(num_classes, label_smoothing)
  sums = heads.integer_class_sums(
    head, class_weight, head.class_factor, target.off, num_classes, dtype
  )
  plan = schedule.plan_schedule(
    fn,
    n,
    d,
    num_classes,
    linear_reduction=False,
    token_chunk_size=layout.token_chunk_size,
    vocab_chunk_size=layout.vocab_chunk_size,
    hidden_dtype=hidden_NxD.dtype,
    weight_dtype=weight.dtype,
  )
  cfg = dataclasses.replace(
    plan.block_config(layout.weight_layout, None, False),
    class_fns=tuple(s.fn for s in sums),
    entropy=head.entropy or entropy,
  )
  betas = tuple(s.beta_fn(*s.operands) if s.operands else None for s in sums)
  lse, target_logit, class_sums, mean = ops.head_stats_op(
    cfg, hidden_NxD, weight, bias, labels_N, betas
  )
  stats = engine.RowStats(lse, jnp.zeros_like(lse), target_logit - lse, class_sums, mean)
  loss = heads.integer_head_loss(
    head,
    stats,
    labels_N,
    class_weight=class_weight,
    on=target.on,
    off=target.off,
    num_local=num_classes,
  )
  return loss, stats
