r"""Any loss on a linear layer's logits, token chunk by token chunk, never holding ``[N, V]``.

For a loss :math:`L(x, y)` on logits :math:`x = \mathrm{cap}(h W^\top + b)`, the tokens are cut
into chunks of :math:`T` rows; each chunk's ``[T, V]`` logits are built, the loss (any dense loss:
a head of the row-statistics engine, the bi-tempered loss, a user's function) is evaluated on
them, and the chunk is rematerialised in the backward pass (``jax.checkpoint`` inside
``lax.scan``), so at most one ``[T, V]`` block of logits exists at a time and nothing of size
``[N, V]`` is kept between the passes. Four matmuls in all (the forward product, its recomputation,
and the two gradient products) against three for the unfused loss; this schedule
(:func:`chunked_linear_loss`) serves ``reduction='none'`` and the per-token statistics, and works
in forward mode. For 'sum' and 'mean', :func:`one_pass_linear_sum` computes the gradients in the
forward pass instead (three matmuls; its JVP is the inner product of those gradients with the
inputs' tangents, so it works in forward mode too) when its float32 ``[V, D]`` accumulator is
small (:func:`xent_jax.fused.schedule.one_pass_fits`).

:func:`xent_jax.linear_cross_entropy` has specialised kernels for cross-entropy (one pass with
gradients in the forward, or a vocabulary-major backward at large :math:`V \cdot D`), and
:mod:`xent_jax.fused.heads` runs the engine's heads with integer labels on the same blocked
kernels where the one-pass schedule does not fit; this module gives every loss its one-pass form,
and the rematerialising one to the rest (probability labels, the bi-tempered loss, losses named by
import path).

References:
  Chen, Xu, Zhang, Guestrin, "Training Deep Nets with Sublinear Memory Cost", 2016
  (rematerialisation); Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from xent_jax.fused import forward_grads, schedule
from xent_jax.fused.rows import LinearLayout


def chunked_linear_loss(
  fn: str,
  row_loss: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict]],
  hidden: jax.Array,
  weight: jax.Array,
  labels: jax.Array,
  valid: jax.Array,
  layout: LinearLayout,
  *,
  bias: jax.Array | None,
) -> tuple[jax.Array, dict]:
  """Per-row losses of ``row_loss`` on ``hidden @ weight.T + bias``, chunk by chunk.

  Args:
    fn: the public name, for error messages.
    row_loss: ``row_loss(logits [T, V], labels [T, ...], valid [T]) -> (loss [T], extras)``,
      ``extras`` a dict of ``[T]`` per-row arrays (e.g. the label's log-probability).
    hidden: ``[N, D]``.
    weight: ``[V, D]`` ('vd') or ``[D, V]`` ('dv').
    labels: ``[N, ...]`` (integer ids ``[N]``, or probabilities ``[N, V]``).
    valid: ``[N]`` bool.
    layout: the weight layout ('vd' or 'dv') and the rows per chunk (``token_chunk_size``, or
      None for :func:`xent_jax.fused.schedule.default_chunk`; ``vocab_chunk_size`` is not read).
    bias: ``[V]`` or None.

  Returns:
    ``(loss [N], extras)`` with each extra ``[N]``.
  """
  n = hidden.shape[0]
  weight_layout = layout.weight_layout
  num_classes = weight.shape[schedule.class_dim(weight_layout)]
  chunk = schedule.resolve_chunk(
    fn, "token_chunk_size", layout.token_chunk_size, n, schedule.default_chunk(num_classes, n)
  )
  num_chunks = -(-n // chunk)
  pad = num_chunks * chunk - n
  padded = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(
    (num_chunks, chunk) + a.shape[1:]
  )
  spec = "td,vd->tv" if weight_layout == "vd" else "td,dv->tv"
  # Autodiff sums the weight's and the bias's gradients over the chunks in the dtype of the arrays
  # the chunks read. The chunks read float32 copies (cast back per chunk for the product) of the
  # bias always, and of a low-precision weight where a float32 [V, D] buffer is small
  # (one_pass_fits): a bfloat16 sum loses precision with every chunk it adds. At language-model
  # heads the weight's gradient still sums in its own dtype (README: bfloat16 caveat).
  acc = jnp.promote_types(weight.dtype, jnp.float32)
  wide = acc != weight.dtype and schedule.one_pass_fits(n, hidden.shape[-1], num_classes)
  weight_read = weight.astype(acc) if wide else weight
  bias_read = None if bias is None else bias.astype(jnp.promote_types(bias.dtype, jnp.float32))

  @jax.checkpoint
  def chunk_loss(hidden_TxD, labels_T, valid_T):
    logits_TxV = jnp.einsum(
      spec,
      hidden_TxD,
      weight_read.astype(weight.dtype),
      preferred_element_type=jnp.result_type(hidden.dtype, weight.dtype),
    )
    if bias_read is not None:
      logits_TxV = logits_TxV + bias_read.reshape(1, -1).astype(logits_TxV.dtype)
    return row_loss(logits_TxV, labels_T, valid_T)

  _, (loss, extras) = lax.scan(
    lambda carry, xs: (carry, chunk_loss(*xs)),
    None,
    (padded(hidden), padded(labels), padded(valid)),
  )
  unpad = lambda a: a.reshape((num_chunks * chunk,) + a.shape[2:])[:n]
  return unpad(loss), jax.tree.map(unpad, extras)


def one_pass_linear_sum(
  row_loss: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict]],
  hidden: jax.Array,
  weight: jax.Array,
  bias: jax.Array | None,
  labels: jax.Array,
  valid: jax.Array,
  scale: jax.Array,
  *,
  weight_layout: str,
  chunk: int,
) -> jax.Array:
  r""":math:`\sum_i s_i \ell_i` with its gradients computed in the forward pass: three matmuls.

  For a reduction that is linear in the per-row losses ('sum', 'mean') the scales
  :math:`s_i = \partial L/\partial \ell_i` are known before the loss is, so each chunk's logits
  are built once and differentiated right away (Liger-Kernel's schedule): the chunk's
  :math:`\partial L/\partial x` gives ``d_hidden`` for its rows and adds to ``d_weight`` and
  ``d_bias`` (float32 accumulators). The backward pass only scales the stored gradients
  (:func:`xent_jax.fused.forward_grads.sum_with_gradients`; labels, mask and scales held constant),
  and forward mode works.

  Args:
    row_loss: as in :func:`chunked_linear_loss`.
    hidden: ``[N, D]``; weight: ``[V, D]`` or ``[D, V]``; bias: ``[V]`` or None.
    labels: ``[N, ...]``; valid: ``[N]`` bool; scale: ``[N]`` the :math:`s_i`.
    weight_layout: 'vd' or 'dv'.
    chunk: rows per chunk.

  Returns:
    The scalar :math:`\sum_i s_i \ell_i`.
  """
  n = hidden.shape[0]
  num_chunks = -(-n // chunk)
  pad = num_chunks * chunk - n
  padded = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(
    (num_chunks, chunk) + a.shape[1:]
  )
  acc = jnp.promote_types(jnp.result_type(hidden.dtype, weight.dtype), jnp.float32)
  spec = "td,vd->tv" if weight_layout == "vd" else "td,dv->tv"
  bias_V = (
    jnp.zeros((weight.shape[schedule.class_dim(weight_layout)],), acc) if bias is None else bias
  )

  def forward(hidden, weight, bias_V, labels, valid, scale):
    def step(carry, xs):
      d_weight, d_bias = carry
      hidden_TxD, labels_T, valid_T, scale_T = xs
      logits_TxV = jnp.einsum(
        spec, hidden_TxD, weight, preferred_element_type=jnp.result_type(hidden.dtype, weight.dtype)
      )
      logits_TxV = logits_TxV + bias_V.reshape(1, -1).astype(logits_TxV.dtype)
      total_T, pullback = jax.vjp(
        lambda x: jnp.sum(scale_T * row_loss(x, labels_T, valid_T)[0]), logits_TxV
      )
      (g_TxV,) = pullback(jnp.ones_like(total_T))
      g = g_TxV.astype(jnp.result_type(hidden.dtype, weight.dtype))
      d_hidden_TxD = jnp.einsum(
        "tv,vd->td" if weight_layout == "vd" else "tv,dv->td", g, weight, preferred_element_type=acc
      )
      grad_weight = jnp.einsum(
        "tv,td->vd" if weight_layout == "vd" else "tv,td->dv",
        g,
        hidden_TxD,
        preferred_element_type=acc,
      )
      return (d_weight + grad_weight, d_bias + jnp.sum(g_TxV, axis=0).astype(acc)), (
        total_T,
        d_hidden_TxD,
      )

    init = (jnp.zeros(weight.shape, acc), jnp.zeros(bias_V.shape, acc))
    (d_weight, d_bias), (totals, d_hidden) = lax.scan(
      step, init, (padded(hidden), padded(labels), padded(valid), padded(scale))
    )
    d_hidden = d_hidden.reshape((num_chunks * chunk,) + d_hidden.shape[2:])[:n]
    return jnp.sum(totals), (
      d_hidden.astype(hidden.dtype),
      d_weight.astype(weight.dtype),
      d_bias.astype(bias_V.dtype),
    )

  return forward_grads.sum_with_gradients(
    forward, hidden, weight, bias_V, labels, valid, scale, num_differentiable=3
  )
