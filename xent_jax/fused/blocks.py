r"""One block of ``cap(hidden @ weight.T + bias)``: its logits, statistics, gradients and tangents.

A block is ``[C, T]``, classes major: ``C`` classes of a vocabulary slice (from ``class_start``)
for ``T`` tokens. A chunk size that does not divide its axis is handled without padding copies:
the last chunk is shifted back to end at the axis end (:func:`chunk_start`) and the rows or
classes it shares with the previous chunk are masked out (:func:`fresh_mask`). The loops over
blocks are :mod:`xent_jax.fused.kernels`'s.
"""

import functools
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from xent_jax.core import engine, inputs
from xent_jax.fused.schedule import BlockConfig


class BlockStats(NamedTuple):
  """Per-row partial statistics of the (capped) logits over one vocabulary slice or block.

  Attributes:
    max: ``[N]`` row maximum :math:`m_i`.
    sumexp: ``[N]`` :math:`\\sum_c e^{x_{ic} - m_i}`.
    target: ``[N]`` :math:`x_{iy_i}` where the label lies in the slice, else 0.
    weighted_sum: ``[N]`` :math:`\\sum_c w_c x_{ic}` (zeros unless requested).

  Part of the interface for :mod:`xent_jax.parallel.logits`, which combines the shards' statistics.
  """

  max: jax.Array
  sumexp: jax.Array
  target: jax.Array
  weighted_sum: jax.Array


class StatCotangents(NamedTuple):
  """Per-row cotangents :math:`(\\bar{\\mathrm{lse}}, \\bar t, \\bar s)` of the statistics
  (in the one-pass kernel)."""

  lse: jax.Array
  target: jax.Array
  weighted_sum: jax.Array


# --------------------------------------------------------------------------- indexing


def varying_zeros(shape, dtype, axes: tuple[Hashable, ...], fill=0.0):
  """A loop accumulator filled with ``fill``, typed as varying over the mesh ``axes``.

  Inside ``shard_map(check_vma=True)`` a loop carry must keep the varying-axes type of what is
  added to it; a fresh constant varies over none (``jax.lax.pcast(..., to='varying')`` fixes it).
  """
  x = jnp.full(shape, fill, dtype)
  return lax.pcast(x, axes, to="varying") if axes else x


def vary(x, axes: tuple[Hashable, ...]):
  """``x`` typed as varying over the mesh ``axes`` (``jax.lax.pcast``); None stays None."""
  return x if x is None or not axes else lax.pcast(x, axes, to="varying")


def chunk_start(index, size: int, total: int):
  """First index of chunk ``index``; the last chunk is shifted back so it ends at ``total``."""
  return jnp.minimum(index * size, total - size)


def num_chunks(total: int, size: int) -> int:
  return -(-total // size)


def fresh_mask(start, index, size):
  """``[size]`` bool: positions of a shifted chunk not already covered by the previous chunk."""
  return lax.iota(jnp.int32, size) + start >= index * size


def slice_or_none(a, start, size, axis=0):
  """``a[start:start + size]`` along ``axis``; None stays None."""
  return None if a is None else lax.dynamic_slice_in_dim(a, start, size, axis=axis)


def token_rows(tree, start, size):
  """Rows ``start:start + size`` of every array of ``tree``."""
  return jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, start, size, axis=0), tree)


def add_at(total, start, update, axis):
  """``total[start:start + len(update)] += update`` along ``axis``."""
  current = lax.dynamic_slice_in_dim(total, start, update.shape[axis], axis=axis)
  return lax.dynamic_update_slice_in_dim(total, current + update, start, axis=axis)


def write_rows(totals, parts, start):
  """Each of ``parts`` written into its total at row ``start``: rows a shifted last chunk shares
  with the previous one get identical values, so they are overwritten rather than added."""
  return jax.tree.map(lambda a, b: lax.dynamic_update_slice_in_dim(a, b, start, 0), totals, parts)


def carried(tree):
  """``tree`` itself, as a loop carry that the loop does not take for a constant.

  ``lax.scan`` and ``fori_loop`` turn a carry that the body returns unchanged into a loop constant
  (jax 0.10); a constant's cotangent is then summed in a fresh whole-size buffer per run of the
  loop and added to the enclosing loop's afterwards (for ``d_hidden``, more float32 ``[N, D]``
  buffers). Adding zero keeps it a carry, whose cotangent accumulates in one buffer; XLA removes
  the addition.
  """
  return jax.tree.map(lambda a: a + jnp.zeros((), a.dtype), tree)


# --------------------------------------------------------------------------- logits, statistics


def weight_block(weight, start, cfg: BlockConfig):
  return lax.dynamic_slice_in_dim(weight, start, cfg.vocab_chunk, axis=cfg.class_dim)


def block_logits(hidden_TxD, weight_block, bias_C, cfg: BlockConfig):
  """Capped logits of one block, classes major: ``[C, T]``, accumulated in float32 (float64 for
  float64 inputs).

  Classes-major blocks make the weight-gradient product ``g @ hidden`` a plain (non-transposed)
  matmul, the layout XLA's CPU backend runs fastest.
  """
  dtype = inputs.compute_dtype(jnp.result_type(hidden_TxD.dtype, weight_block.dtype))
  features = 1 - cfg.class_dim
  x_CxT = lax.dot_general(
    weight_block, hidden_TxD, (((features,), (1,)), ((), ())), preferred_element_type=dtype
  )
  if bias_C is not None:
    x_CxT = x_CxT + bias_C.astype(dtype)[:, None]
  return engine.softcap(x_CxT, cfg.logit_softcap)


def target_mask(target_index_T, shape):
  """Boolean ``[C, T]``: each row's label entry (none where the index is -1)."""
  return lax.broadcasted_iota(target_index_T.dtype, shape, 0) == target_index_T[None, :]


def target_index(labels_T, class_start, new_C):
  """Each row's label as an index into the block, or -1 where the label is not a new class of it."""
  index_T = labels_T - class_start
  inside = (index_T >= 0) & (index_T < new_C.shape[0])
  inside = inside & new_C[jnp.clip(index_T, 0, new_C.shape[0] - 1)]
  return jnp.where(inside, index_T, -1)


def _gather_targets(x_CxT, target_index_T):
  """:math:`x_{y_t, t}` where ``target_index_T`` is not -1, else 0 (a gather, not a masked sum)."""
  safe = jnp.clip(target_index_T, 0, x_CxT.shape[0] - 1)
  picked_T = jnp.take_along_axis(x_CxT, safe[None, :], axis=0)[0]
  return jnp.where(target_index_T >= 0, picked_T, jnp.zeros_like(picked_T))


def block_stats(x_CxT, target_index_T, new_C, class_weight_C, cfg: BlockConfig) -> BlockStats:
  """Partial statistics of one block over its new classes."""
  zeros = jnp.zeros_like(x_CxT)
  x_new = jnp.where(new_C[:, None], x_CxT, jnp.full_like(x_CxT, -jnp.inf))
  m_T = jnp.max(x_new, axis=0)
  sumexp_T = jnp.sum(jnp.exp(x_new - m_T[None, :]), axis=0)
  target_T = _gather_targets(x_CxT, target_index_T)
  if cfg.weighted_sum:
    weighted = x_CxT if class_weight_C is None else x_CxT * class_weight_C[:, None]
    weighted_sum_T = jnp.sum(jnp.where(new_C[:, None], weighted, zeros), axis=0)
  else:
    weighted_sum_T = jnp.zeros_like(m_T)
  return BlockStats(m_T, sumexp_T, target_T, weighted_sum_T)


def merge_stats(a: BlockStats, b: BlockStats) -> BlockStats:
  """The statistics of the union of two disjoint class sets (the online-softmax merge)."""
  m, sumexp = engine.merge_max_sums(a.max, a.sumexp, b.max, b.sumexp)
  return BlockStats(m, sumexp, a.target + b.target, a.weighted_sum + b.weighted_sum)


def logsumexp_from_stats(stats: BlockStats) -> jax.Array:
  """:math:`\\mathrm{lse}_i = m_i + \\log\\sum_c e^{x_{ic} - m_i}` from complete statistics
  (also those :mod:`xent_jax.parallel.logits` completes over the shards)."""
  return stats.max + jnp.log(stats.sumexp)


# --------------------------------------------------------------------------- gradients


def block_dlogits(x_CxT, is_target_CxT, new_C, lse_T, cot: StatCotangents, class_weight_C, cfg):
  """:math:`\\partial L/\\partial (hW^\\top + b)` on one block ``[C, T]``, zero on classes it
  does not own."""
  g_CxT = cot.lse[None, :] * jnp.exp(x_CxT - engine.finite_or_zero(lse_T)[None, :])
  g_CxT = g_CxT + jnp.where(is_target_CxT, cot.target[None, :], jnp.zeros_like(g_CxT))
  if cfg.weighted_sum:
    w_C = jnp.ones_like(new_C, x_CxT.dtype) if class_weight_C is None else class_weight_C
    g_CxT = g_CxT + w_C[:, None] * cot.weighted_sum[None, :]
  g_CxT = g_CxT * engine.softcap_grad(x_CxT, cfg.logit_softcap)
  return jnp.where(new_C[:, None], g_CxT, jnp.zeros_like(g_CxT))


def matmul_dtype(hidden, weight):
  """The dtype of the backward matmuls' operands: the inputs' own (bfloat16 inputs run bfloat16
  matmuls with float32 accumulation, as their unfused gradient does)."""
  return jnp.result_type(hidden.dtype, weight.dtype)


def block_hidden_grad(g_CxT, weight_block, cfg: BlockConfig):
  """``d_hidden [T, D]`` of one block (float32 accumulation)."""
  return lax.dot_general(
    g_CxT,
    weight_block,
    (((0,), (cfg.class_dim,)), ((), ())),
    preferred_element_type=inputs.compute_dtype(g_CxT.dtype),
  )


def _block_weight_grad(g_CxT, hidden_TxD, cfg: BlockConfig):
  """``d_weight`` of one block, ``[C, D]`` or ``[D, C]`` by layout (float32 accumulation)."""
  acc = inputs.compute_dtype(g_CxT.dtype)
  if cfg.weight_layout == "vd":
    return lax.dot_general(g_CxT, hidden_TxD, (((1,), (0,)), ((), ())), preferred_element_type=acc)
  return lax.dot_general(hidden_TxD, g_CxT, (((0,), (1,)), ((), ())), preferred_element_type=acc)


def accumulate_weight_grad(d_weight, g_CxT, hidden_TxD, cfg: BlockConfig, rows: int):
  """``d_weight += g^T hidden`` in slices of ``rows`` classes.

  XLA does not fuse the accumulation into the matmul: one ``[V, D]`` product would be a full-size
  temporary (and a second pass over it); slices keep that temporary ``[rows, D]``.
  """
  v = g_CxT.shape[0]
  rows = min(rows, v)

  def step(j, acc):
    c0 = chunk_start(j, rows, v)
    g_sub = lax.dynamic_slice_in_dim(g_CxT, c0, rows, 0)
    if v % rows:
      g_sub = jnp.where(fresh_mask(c0, j, rows)[:, None], g_sub, jnp.zeros_like(g_sub))
    return add_at(acc, c0, _block_weight_grad(g_sub, hidden_TxD, cfg), cfg.class_dim)

  return lax.fori_loop(0, num_chunks(v, rows), step, d_weight)


# --------------------------------------------------------------------------- tangents


def _logits_tangent(hidden_TxD, weight_block, x_CxT, tangents, cfg: BlockConfig):
  """:math:`\\dot x = \\mathrm{cap}'(z) \\odot (\\dot h W^\\top + h \\dot W^\\top + \\dot b)` on
  one block, from the block's tangents ``(d_hidden [T, D], d_weight block, d_bias [C])``."""
  d_hidden_TxD, d_weight_block, d_bias_C = tangents
  dtype = x_CxT.dtype
  contract = (((1 - cfg.class_dim,), (1,)), ((), ()))
  # Float32 products: their transposes take the float32 logits gradient (no rounding to the
  # inputs' dtype before the gradient matmuls).
  dz_CxT = jnp.zeros_like(x_CxT)
  if d_weight_block is not None:
    dz_CxT = dz_CxT + lax.dot_general(
      d_weight_block, hidden_TxD, contract, preferred_element_type=dtype
    )
  if d_hidden_TxD is not None:
    dz_CxT = dz_CxT + lax.dot_general(
      weight_block, d_hidden_TxD, contract, preferred_element_type=dtype
    )
  if d_bias_C is not None:
    dz_CxT = dz_CxT + d_bias_C[:, None]
  return dz_CxT * engine.softcap_grad(x_CxT, cfg.logit_softcap)


def _block_tangents(primals, t0, c0, j, tangents, cfg: BlockConfig, shifted: bool):
  """``(d_lse, d_target, d_weighted_sum, *head terms)`` ``[T]`` of the block at token ``t0``,
  classes ``c0`` (chunk ``j``), over its new classes (all of them unless the chunk may be
  ``shifted``).

  Takes the whole primal arrays and slices them itself: under :func:`remat_block` the block's
  residuals are then those loop-invariant arrays and the chunk starts.
  """
  hidden_NxD, weight, bias_V, labels_N, class_weight_V, lse_N, head = primals
  t, c = cfg.token_chunk, cfg.vocab_chunk
  betas, totals_N, mean_N = head
  hidden_TxD, labels_T, lse_T, totals_T, mean_T = token_rows(
    (hidden_NxD, labels_N, lse_N, totals_N, mean_N), t0, t
  )
  block_weight = weight_block(weight, c0, cfg)
  x_CxT = block_logits(hidden_TxD, block_weight, slice_or_none(bias_V, c0, c), cfg)
  dx_CxT = _logits_tangent(hidden_TxD, block_weight, x_CxT, tangents, cfg)
  new_C = fresh_mask(c0, j, c)
  if shifted:
    dx_CxT = jnp.where(new_C[:, None], dx_CxT, jnp.zeros_like(dx_CxT))
  log_p_CxT = x_CxT - engine.finite_or_zero(lse_T)[None, :]
  p_CxT = jnp.exp(log_p_CxT)
  d_lse_T = jnp.sum(p_CxT * dx_CxT, axis=0)
  # A masked sum rather than _gather_targets' gather: its transpose is a select that fuses into
  # the logits gradient, where a gather's is a scatter.
  is_target = target_mask(target_index(labels_T, c0 + cfg.class_offset, new_C), x_CxT.shape)
  d_target_T = jnp.sum(jnp.where(is_target, dx_CxT, jnp.zeros_like(dx_CxT)), axis=0)
  if cfg.weighted_sum:
    class_weight_C = slice_or_none(class_weight_V, c0, c)
    weighted = dx_CxT if class_weight_C is None else dx_CxT * class_weight_C[:, None]
    d_weighted_sum_T = jnp.sum(weighted, axis=0)
  else:
    d_weighted_sum_T = jnp.zeros_like(d_lse_T)
  parts = [d_lse_T, d_target_T, d_weighted_sum_T]
  # An engine head's class sums and entropy (xent_jax.core.engine's tangent, on a block).
  for f, beta_V, total_T in zip(cfg.class_fns, betas, totals_T):
    beta_C = None if beta_V is None else slice_or_none(beta_V, c0, c)[:, None]
    _, slope_CxT = engine.class_terms(f, beta_C, log_p_CxT)
    parts.append(jnp.sum((slope_CxT - total_T[None, :] * p_CxT) * dx_CxT, axis=0))
  if cfg.entropy:
    spread_CxT = engine.p_times(p_CxT, log_p_CxT - mean_T[None, :])
    parts.append(jnp.sum(spread_CxT * dx_CxT, axis=0))
  return tuple(parts)


def remat_block(cfg: BlockConfig, shifted: bool):
  """The per-row tangents of one block, ``block(primals, t0, c0, j, tangents)``, recomputing
  everything it needs in reverse mode (saves nothing): its logits block, probabilities and masks
  are rebuilt where it is transposed.

  ``primals`` are ``(hidden [N, D], weight, bias [V] or None, labels [N], class_weight [V] or
  None, lse [N], (betas, slope totals, E))``, ``tangents`` the block's ``(d_hidden [T, D],
  d_weight block, d_bias [C])`` (None for zero).
  """
  block = functools.partial(_block_tangents, cfg=cfg, shifted=shifted)
  return jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)
