r"""The loops over blocks of one vocabulary slice: statistics, class sums, tangents, one pass.

Each kernel works on a *slice* of the vocabulary whose first class has the global index
``cfg.class_offset``, so that a vocabulary-sharded caller (:mod:`xent_jax.parallel.logits`) can
combine their per-row partial statistics across devices. The tokens are cut into chunks of
``cfg.token_chunk`` rows and the slice into chunks of ``cfg.vocab_chunk`` classes; only one
``[vocab_chunk, token_chunk]`` block of logits (:mod:`xent_jax.fused.blocks`) exists at a time.

* :func:`vocab_slice_stats`: the per-row partial statistics (the two-pass schedule's first pass);
* :func:`vocab_slice_class_sums`: an engine head's class sums and entropy given the ``lse``;
* :func:`vocab_slice_tangents`: the statistics' tangents given the ``lse`` (the second pass; its
  transpose is the backward pass), token-major or vocabulary-major;
* :func:`fused_vocab_slice`: one pass computing the summed loss and its gradients.

References:
  Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024 (blockwise CE);
  Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from xent_jax.core import engine, inputs
from xent_jax.fused import blocks
from xent_jax.fused.blocks import BlockStats
from xent_jax.fused.schedule import BlockConfig

# Classes per slice of the one-pass weight-gradient product: a [rows, D] float32 temporary of
# about 2**21 elements (8 MiB).
WEIGHT_GRAD_ELEMENTS = 2**21

RowLoss = Callable[[jax.Array, jax.Array, jax.Array, Any], jax.Array]


def _row_zeros(count: int, rows: int, dtype, cfg: BlockConfig, fill=0.0) -> tuple:
  """``count`` per-row accumulators ``[rows]``, typed as varying over ``cfg.varying_axes``."""
  return tuple(blocks.varying_zeros((rows,), dtype, cfg.varying_axes, fill) for _ in range(count))


def vocab_slice_stats(hidden_NxD, weight, bias_V, labels_N, class_weight_V, cfg: BlockConfig):
  """Per-row partial statistics of ``cap(hidden @ weight_slice.T + bias_slice)`` over one slice.

  Loops over token chunks, and inside each over vocabulary chunks with the online-softmax merge.
  The first pass of the two-pass schedule, here and on each shard in
  :mod:`xent_jax.parallel.logits`.

  Args:
    hidden_NxD: ``[N, D]``.
    weight: the slice's weight, ``[V, D]`` ('vd') or ``[D, V]`` ('dv').
    bias_V: ``[V]`` or None.
    labels_N: ``[N]`` global integer class ids.
    class_weight_V: ``[V]`` float class weights of the slice, or None (ones).
    cfg: block configuration (chunks, offset, cap).

  Returns:
    :class:`~xent_jax.fused.blocks.BlockStats` of ``[N]`` arrays; combine slices with
    :func:`~xent_jax.fused.blocks.merge_stats` semantics (max, rescaled sum, sums) and take
    :func:`~xent_jax.fused.blocks.logsumexp_from_stats`.
  """
  n = hidden_NxD.shape[0]
  v = weight.shape[cfg.class_dim]
  t, c = cfg.token_chunk, cfg.vocab_chunk
  dtype = inputs.compute_dtype(jnp.result_type(hidden_NxD.dtype, weight.dtype))

  def token_step(i, stats_N):
    t0 = blocks.chunk_start(i, t, n)
    hidden_TxD, labels_T = blocks.token_rows((hidden_NxD, labels_N), t0, t)

    def vocab_step(j, acc: BlockStats):
      c0 = blocks.chunk_start(j, c, v)
      new_C = blocks.fresh_mask(c0, j, c)
      bias_C = blocks.slice_or_none(bias_V, c0, c)
      weight_C = blocks.slice_or_none(class_weight_V, c0, c)
      x_CxT = blocks.block_logits(hidden_TxD, blocks.weight_block(weight, c0, cfg), bias_C, cfg)
      index_T = blocks.target_index(labels_T, c0 + cfg.class_offset, new_C)
      return blocks.merge_stats(acc, blocks.block_stats(x_CxT, index_T, new_C, weight_C, cfg))

    empty = BlockStats(*_row_zeros(1, t, dtype, cfg, -jnp.inf), *_row_zeros(3, t, dtype, cfg))
    chunk = lax.fori_loop(0, blocks.num_chunks(v, c), vocab_step, empty)
    return blocks.write_rows(stats_N, chunk, t0)

  init = BlockStats(*_row_zeros(4, n, dtype, cfg))
  return lax.fori_loop(0, blocks.num_chunks(n, t), token_step, init)


def _class_sum_parts(x_CxT, lse_T, betas, c0, new_C, cfg: BlockConfig, slopes: bool) -> list:
  """One block's terms of :func:`vocab_slice_class_sums`, each ``[T]``."""
  c = cfg.vocab_chunk
  log_p_CxT = x_CxT - lse_T[None, :]
  parts = []
  for f, beta_V in zip(cfg.class_fns, betas):
    beta_C = None if beta_V is None else blocks.slice_or_none(beta_V, c0, c)[:, None]
    if new_C is not None:  # classes a shifted last chunk shares with the previous one
      beta_C = new_C if beta_C is None else beta_C * new_C
    value_CxT, slope_CxT = engine.class_terms(f, beta_C, log_p_CxT)
    parts += [jnp.sum(value_CxT, axis=0)] + [jnp.sum(slope_CxT, axis=0)] * slopes
  if cfg.entropy:
    p_CxT = jnp.exp(log_p_CxT) * (1.0 if new_C is None else new_C)
    parts.append(jnp.sum(engine.p_times(p_CxT, log_p_CxT), axis=0))
  return parts


def vocab_slice_class_sums(hidden_NxD, weight, bias_V, lse_N, betas, cfg: BlockConfig, *, slopes):
  r"""An engine head's per-row class sums over one slice, given the complete ``lse``: the second
  pass of :func:`xent_jax.fused.ops.head_stats_op`.

  With :math:`\log p_{ic} = x_{ic} - \mathrm{lse}_i` on each block, for each :math:`f_k` of
  ``cfg.class_fns`` (weights :math:`\beta^{(k)}`, ``[V]`` or None for ones)

  .. math::
     S_{ik} = \sum_c \beta^{(k)}_c f_k(\log p_{ic}), \qquad
     B_{ik} = \sum_c \beta^{(k)}_c f_k'(\log p_{ic}), \qquad
     E_i = \sum_c p_{ic} \log p_{ic},

  the last with ``cfg.entropy`` (:math:`H = -E`). Loops as :func:`vocab_slice_stats`.

  Returns:
    ``(sums, slope_totals, mean)``: tuples of ``[N]`` arrays (the :math:`B` only with
    ``slopes``, else ``()``) and :math:`E` ``[N]`` or None.
  """
  n = hidden_NxD.shape[0]
  v = weight.shape[cfg.class_dim]
  t, c = cfg.token_chunk, cfg.vocab_chunk
  dtype = lse_N.dtype
  shifted = v % c != 0
  count = len(cfg.class_fns) * (1 + slopes) + cfg.entropy

  def token_step(i, out_N):
    t0 = blocks.chunk_start(i, t, n)
    hidden_TxD, lse_T = blocks.token_rows((hidden_NxD, lse_N), t0, t)

    def vocab_step(j, acc_T):
      c0 = blocks.chunk_start(j, c, v)
      new_C = blocks.fresh_mask(c0, j, c).astype(dtype)[:, None] if shifted else None
      bias_C = blocks.slice_or_none(bias_V, c0, c)
      x_CxT = blocks.block_logits(hidden_TxD, blocks.weight_block(weight, c0, cfg), bias_C, cfg)
      parts = _class_sum_parts(x_CxT, lse_T, betas, c0, new_C, cfg, slopes)
      return tuple(a + b for a, b in zip(acc_T, parts))

    chunk_T = lax.fori_loop(
      0, blocks.num_chunks(v, c), vocab_step, _row_zeros(count, t, dtype, cfg)
    )
    return blocks.write_rows(out_N, chunk_T, t0)

  init = _row_zeros(count, n, dtype, cfg)
  out_N: tuple = lax.fori_loop(0, blocks.num_chunks(n, t), token_step, init) if count else ()
  k = len(cfg.class_fns)
  step = 1 + slopes
  sums = out_N[0 : step * k : step]
  totals = out_N[1 : step * k : step] if slopes else ()
  return sums, totals, out_N[-1] if cfg.entropy else None


def vocab_slice_tangents(
  hidden_NxD,
  weight,
  bias_V,
  labels_N,
  class_weight_V,
  lse_N,
  tangents,
  cfg: BlockConfig,
  head=((), (), None),
):
  r"""Tangents of one slice's partial statistics, given the complete ``lse`` (the second pass).

  For tangents :math:`(\dot h, \dot W, \dot b)` of the inputs, each block of logits gets
  :math:`\dot x = \mathrm{cap}'(z) \odot (\dot h W^\top + h \dot W^\top + \dot b)` and the
  slice's classes contribute

  .. math::
     \dot{\mathrm{lse}}_i = \sum_c p_{ic}\, \dot x_{ic}, \qquad
     \dot t_i = \dot x_{i y_i}, \qquad \dot s_i = \sum_c w_c\, \dot x_{ic},

  with :math:`p_{ic} = e^{x_{ic} - \mathrm{lse}_i}`; sum them over slices (as
  :mod:`xent_jax.parallel.logits` does over the vocabulary shards). Linear in the tangents: reverse
  mode is JAX's transpose of this function, in which each recomputed block's logits gradient is
  multiplied back into ``d_hidden``, ``d_weight`` and ``d_bias`` (four matmuls with the
  statistics). Each block is a ``jax.checkpoint`` saving nothing, so that linearising keeps only
  the loop-invariant inputs, never the blocks' :math:`x` or :math:`p`. The loop order is
  ``cfg.vocab_major``'s, and fixes where the cotangents accumulate:

  * token-major (token chunks outermost): the tangents are read in float32, so ``d_weight``
    accumulates in a float32 ``[V, D]`` buffer that every token chunk adds to, each token
    chunk's ``d_hidden`` over its vocabulary chunks;
  * vocabulary-major (vocabulary chunks outermost, each seeing every token): the tangents of
    ``weight`` and ``bias`` are scanned over in blocks (remaining classes in one smaller block),
    so that each ``d_weight`` block accumulates in float32 over the token chunks and is written
    once in the weight's dtype; ``d_hidden`` accumulates ``[N, D]`` in float32.

  Args:
    hidden_NxD, weight, bias_V, labels_N, class_weight_V, cfg: as :func:`vocab_slice_stats`.
    lse_N: ``[N]`` complete (all-slice) logsumexp.
    tangents: ``(d_hidden, d_weight, d_bias)`` shaped like ``hidden_NxD``, ``weight``, ``bias_V``;
      None for a zero tangent.
    head: an engine head's ``(betas, slope totals, E)`` for the tangents of its class sums and
      entropy (``cfg.class_fns``, ``cfg.entropy``).

  Returns:
    ``(d_lse, d_target, d_weighted_sum, *head terms)``, each ``[N]`` in ``lse_N``'s dtype.
  """
  d_hidden, d_weight, d_bias = tangents
  dtype = lse_N.dtype
  # Read in the accumulation dtype, so that reverse mode sums the cotangents in it; the weight's
  # tangent in vocabulary-major order one block at a time.
  d_hidden, d_bias = (None if a is None else a.astype(dtype) for a in (d_hidden, d_bias))
  if d_weight is not None and not cfg.vocab_major:
    d_weight = d_weight.astype(dtype)
  # Inside shard_map (hidden varying over the row axes, weight and bias over the vocabulary's),
  # typed as varying over every axis of the blocks up front: in reverse mode each cotangent is
  # then summed over the axes its input lacks (the transpose of this cast) once, at the end,
  # rather than block by block.
  vocab_axes = tuple(a for a in cfg.varying_axes if a not in cfg.row_axes)
  d_hidden = blocks.vary(d_hidden, vocab_axes)
  d_weight, d_bias = (blocks.vary(a, cfg.row_axes) for a in (d_weight, d_bias))
  kernel = _tangents_vocab_major if cfg.vocab_major else _tangents_token_major
  primals = (hidden_NxD, weight, bias_V, labels_N, class_weight_V, lse_N, head)
  return kernel(primals, (d_hidden, d_weight, d_bias), cfg)


def _loop_sizes(primals, cfg: BlockConfig) -> tuple[int, int, int, int, jnp.dtype]:
  """``(N, V, token chunk, vocab chunk, dtype of the tangents)`` of the tangent pass."""
  hidden_NxD, weight, lse_N = primals[0], primals[1], primals[5]
  n, v = hidden_NxD.shape[0], weight.shape[cfg.class_dim]
  return n, v, cfg.token_chunk, cfg.vocab_chunk, lse_N.dtype


def _tangents_token_major(primals, tangents, cfg: BlockConfig):
  n, v, t, c, dtype = _loop_sizes(primals, cfg)
  d_hidden, d_weight, d_bias = tangents
  block = blocks.remat_block(cfg, shifted=v % c != 0)

  def token_step(i, carry):
    out_N, class_tangents = carry
    t0 = blocks.chunk_start(i, t, n)
    d_hidden_TxD = blocks.slice_or_none(d_hidden, t0, t)

    def vocab_step(j, inner):
      acc_T, (d_weight, d_bias) = inner
      c0 = blocks.chunk_start(j, c, v)
      block_tangents = (
        d_hidden_TxD,
        blocks.slice_or_none(d_weight, c0, c, cfg.class_dim),
        blocks.slice_or_none(d_bias, c0, c),
      )
      parts_T = block(primals, t0, c0, j, block_tangents)
      return tuple(a + b for a, b in zip(acc_T, parts_T)), blocks.carried((d_weight, d_bias))

    init = _row_zeros(cfg.num_tangents, t, dtype, cfg)
    chunk_T, class_tangents = lax.fori_loop(
      0, blocks.num_chunks(v, c), vocab_step, (init, class_tangents)
    )
    return blocks.write_rows(out_N, chunk_T, t0), blocks.carried(class_tangents)

  # The tangents sliced in the inner loop are carried through both loops, unchanged: in the
  # transpose their cotangents then accumulate in one buffer (a loop constant's would be summed
  # in a fresh whole-size buffer per token chunk, then added to the outer one).
  init = _row_zeros(cfg.num_tangents, n, dtype, cfg)
  out_N, _ = lax.fori_loop(0, blocks.num_chunks(n, t), token_step, (init, (d_weight, d_bias)))
  return out_N


def _class_blocks(a, axis: int, start: int, count: int, size: int):
  """``count`` blocks of ``size`` classes of ``a`` from ``start``, stacked on a new first axis
  (None stays None)."""
  if a is None:
    return None
  a = lax.slice_in_dim(a, start, start + count * size, axis=axis)
  return jnp.moveaxis(a.reshape(a.shape[:axis] + (count, size) + a.shape[axis + 1 :]), axis, 0)


def _tangents_vocab_major(primals, tangents, cfg: BlockConfig):
  n, v, t, c, dtype = _loop_sizes(primals, cfg)
  d_hidden, d_weight, d_bias = tangents
  full, rest = divmod(v, c)

  def vocab_chunk(c0, j, d_hidden, d_weight_block, d_bias_C, cfg: BlockConfig):
    """All tokens' tangents over the classes from ``c0``, and ``d_hidden``, carried through."""
    block = blocks.remat_block(cfg, shifted=False)
    if d_weight_block is not None:  # its cotangent accumulates in float32 over the token chunks
      d_weight_block = d_weight_block.astype(dtype)

    def token_step(i, carry):
      out_N, d_hidden = carry
      t0 = blocks.chunk_start(i, t, n)
      block_tangents = (blocks.slice_or_none(d_hidden, t0, t), d_weight_block, d_bias_C)
      parts_T = block(primals, t0, c0, j, block_tangents)
      return blocks.write_rows(out_N, parts_T, t0), blocks.carried(d_hidden)

    init = _row_zeros(cfg.num_tangents, n, dtype, cfg)
    return lax.fori_loop(0, blocks.num_chunks(n, t), token_step, (init, d_hidden))

  def scan_step(carry, xs):
    acc_N, d_hidden = carry
    j, d_weight_block, d_bias_C = xs
    parts_N, d_hidden = vocab_chunk(j * c, j, d_hidden, d_weight_block, d_bias_C, cfg)
    return (tuple(a + b for a, b in zip(acc_N, parts_N)), blocks.carried(d_hidden)), None

  # The class tangents are scanned over, not sliced from a loop constant: the transpose of a
  # slice is a whole-size cotangent added at every step, while a scanned block's comes back as
  # its own output. d_hidden is carried through both loops (see _tangents_token_major): one
  # float32 [N, D] cotangent buffer.
  init = _row_zeros(cfg.num_tangents, n, dtype, cfg)
  xs = (
    jnp.arange(full),
    _class_blocks(d_weight, cfg.class_dim, 0, full, c),
    _class_blocks(d_bias, 0, 0, full, c),
  )
  (acc_N, d_hidden), _ = lax.scan(scan_step, (init, d_hidden), xs)
  if rest:  # the remaining classes, one smaller block
    start = full * c
    tail_cfg = dataclasses.replace(cfg, vocab_chunk=rest)
    tail = lambda a, axis: None if a is None else lax.slice_in_dim(a, start, v, axis=axis)
    parts_N, _ = vocab_chunk(
      start, full, d_hidden, tail(d_weight, cfg.class_dim), tail(d_bias, 0), tail_cfg
    )
    acc_N = tuple(a + b for a, b in zip(acc_N, parts_N))
  return acc_N


def fused_vocab_slice(
  hidden_NxD,
  weight,
  bias_V,
  labels_N,
  class_weight_V,
  row_loss: RowLoss,
  rows: Any,
  cfg: BlockConfig,
  complete_stats: Callable[[BlockStats], BlockStats] = lambda s: s,
):
  """One pass: the summed loss and its gradients, each token chunk's logits computed once.

  Each token chunk sees its whole vocabulary slice in one block (``cfg.vocab_chunk`` is ignored).
  ``complete_stats`` turns the slice's statistics into complete ones (identity on one device; a
  vocabulary-sharded caller passes its collectives), and ``row_loss(lse_T, target_T,
  weighted_sum_T, rows_T)`` gives each row's contribution to the summed loss, ``rows`` being a
  pytree of ``[N, ...]`` per-row data sliced alongside. The one-pass schedule, here and on each
  shard in :mod:`xent_jax.parallel.logits`.

  Returns:
    ``(loss_sum, lse [N], d_hidden [N, D], d_weight, d_bias [V] or None)``: the gradients of
    ``loss_sum`` (float32; float64 for float64 inputs).
  """
  n, d = hidden_NxD.shape
  v = weight.shape[cfg.class_dim]
  t = cfg.token_chunk
  cfg = dataclasses.replace(cfg, vocab_chunk=v)
  dtype = inputs.compute_dtype(jnp.result_type(hidden_NxD.dtype, weight.dtype))
  all_C = jnp.ones((v,), bool)
  weight_rows = max(WEIGHT_GRAD_ELEMENTS // d, 1)
  row_zeros = lambda shape: blocks.varying_zeros(shape, dtype, cfg.row_axes)

  def token_step(i, carry):
    loss_sum, lse_N, d_hidden_NxD, d_weight, d_bias_V = carry
    t0 = blocks.chunk_start(i, t, n)
    new_T = blocks.fresh_mask(t0, i, t)
    hidden_TxD, labels_T, rows_T = blocks.token_rows((hidden_NxD, labels_N, rows), t0, t)
    x_CxT = blocks.block_logits(hidden_TxD, weight, bias_V, cfg)
    index_T = blocks.target_index(labels_T, cfg.class_offset, all_C)
    stats = complete_stats(blocks.block_stats(x_CxT, index_T, all_C, class_weight_V, cfg))
    lse_T = blocks.logsumexp_from_stats(stats)
    loss_T, pullback = jax.vjp(
      lambda lse, tg, s: row_loss(lse, tg, s, rows_T), lse_T, stats.target, stats.weighted_sum
    )
    # d(loss_sum)/d(loss_T): 1 on the chunk's new rows, typed like the per-row values.
    ones_T = blocks.varying_zeros((t,), loss_T.dtype, cfg.row_axes, 1.0)
    seed_T = jnp.where(new_T, ones_T, blocks.varying_zeros((t,), loss_T.dtype, cfg.row_axes))
    cot = blocks.StatCotangents(*pullback(seed_T))
    is_target = blocks.target_mask(index_T, x_CxT.shape)
    g_CxT = blocks.block_dlogits(x_CxT, is_target, all_C, lse_T, cot, class_weight_V, cfg)
    if d_bias_V is not None:
      d_bias_V = d_bias_V + jnp.sum(g_CxT, axis=1)
    g = g_CxT.astype(blocks.matmul_dtype(hidden_TxD, weight))
    return (
      loss_sum + jnp.sum(jnp.where(new_T, loss_T, jnp.zeros_like(loss_T))),
      lax.dynamic_update_slice_in_dim(lse_N, lse_T, t0, 0),
      blocks.add_at(d_hidden_NxD, t0, blocks.block_hidden_grad(g, weight, cfg), 0),
      blocks.accumulate_weight_grad(d_weight, g, hidden_TxD, cfg, weight_rows),
      d_bias_V,
    )

  axes = cfg.varying_axes
  init = (
    row_zeros(()),
    row_zeros((n,)),
    blocks.varying_zeros((n, d), dtype, axes),
    blocks.varying_zeros(weight.shape, dtype, axes),
    None if bias_V is None else blocks.varying_zeros((v,), dtype, axes),
  )
  return lax.fori_loop(0, blocks.num_chunks(n, t), token_step, init)
