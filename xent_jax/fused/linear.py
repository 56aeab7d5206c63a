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
core's own). Both are computed block by block: the tokens are cut into chunks of
``token_chunk_size`` rows and the vocabulary into chunks of ``vocab_chunk_size`` classes; only one
``[token_chunk, vocab_chunk]`` block of logits exists at a time.

Two schedules, chosen from the shapes by :func:`plan_schedule`:

* **one pass** (``reduction`` 'sum' or 'mean', whole vocabulary per block, and a float32
  ``[V, D]`` weight-gradient accumulator no larger than 1/8 of the ``[N, V]`` float32 logits,
  :math:`8D \le N`, or than one block, :math:`VD \le 2^{24}`): each token chunk's logits are
  computed once, and its loss and the gradients for ``hidden``, ``weight`` and ``bias`` are
  computed from them right away, during the forward pass (as Liger-Kernel does). The backward pass only scales the stored gradients by the
  incoming scalar cotangent: three matmuls in all, as many as the unfused loss and its gradient.
* **two passes** (otherwise: reduction 'none', ``return_lse``, vocabulary chunks, or a large
  ``D/N`` as at LLM heads): the forward pass keeps only the per-row statistics; the backward pass
  recomputes each block from ``hidden`` and ``weight`` once the per-row cotangents are known: four
  matmuls, the least memory. That backward pass is JAX's transpose of the statistics' tangent (a
  second blocked pass, :func:`vocab_slice_tangents`), so forward mode works here too. Its loop
  order keeps the fewer float32 elements besides the gradients: **vocabulary-major** (vocabulary
  chunks outermost, each seeing every token, so each ``d_weight`` block is finished in float32
  and written once in the weight's dtype; ``d_hidden`` accumulates ``[N, D]`` in float32) for
  bfloat16 heads with :math:`V > N + 4096`, token-major otherwise (``d_weight`` accumulates
  ``[V, D]`` in float32: for a float32 weight, the gradient itself).

Compiled for a TPU v5e or v6e in bfloat16 (value and gradients of ``hidden`` and ``weight``), the
Llama-3-8B head (N=8192, D=4096, V=128256) keeps 129/129 MiB of temporaries against 6012 MiB for
the matmul plus optax's loss, the Gemma-style head (N=8192, D=2304, V=256000) 73 MiB against 12000.

A chunk size that does not divide its axis is handled without padding copies: the last chunk is
shifted back to end at the axis end and the rows (classes) it shares with the previous chunk are
masked out. The vocabulary-major backward pass is the exception: its leftover classes form one
smaller block, whose weight gradient costs one copy to join (so :func:`vocab_major_chunk`
prefers a divisor of V). The kernels below work on a *slice* of the vocabulary whose first class has the global
index ``class_offset``, so a vocabulary-sharded caller can combine their per-row partial statistics
across devices.

The vocabulary-parallel form (:mod:`xent_jax.parallel.logits`) runs the same kernels on each shard of
the vocabulary. It uses only this internal interface, whose names carry no underscore: the front
end :func:`prepare_rows` (with :class:`PreparedRows`, :func:`linear_shapes`, ``WEIGHT_LAYOUTS``),
the slice kernels :func:`vocab_slice_stats`, :func:`vocab_slice_tangents` and
:func:`fused_vocab_slice` (with the two-pass and one-pass ops :func:`stats_op` and
:func:`fused_op`) with their per-row types :class:`RowStats` and :class:`StatCotangents`,
:func:`logsumexp_from_stats`, and the per-row formula :func:`row_loss` with its
:class:`LossConfig`. :mod:`xent_jax.fused.heads` runs the engine's heads (the variants) on the
same kernels through :func:`head_stats_op` (its second pass :func:`vocab_slice_class_sums`, and
:func:`vocab_slice_tangents` with the heads' terms), with :func:`plan_schedule`'s loop order.

References:
  Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024 (blockwise CE);
  Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024 (gradients in the
  forward pass); Milakov & Gimelshein, "Online normalizer calculation for softmax", 2018.
"""

import dataclasses
import functools
from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from xent_jax.core import checks
from xent_jax.core import engine
from xent_jax.fused import forward_grads
from xent_jax.core import heads
from xent_jax.core import inputs
from xent_jax.losses import cross_entropy as _ce
from xent_jax.core.options import LossOptions
from xent_jax.core.reduction import reduce_loss

# The weight layouts the kernels take ('vd': [V, D], 'dv': [D, V]); _parallel checks against it.
WEIGHT_LAYOUTS = ("vd", "dv")

# Classes per vocabulary chunk of the vocabulary-major backward (at most; vocab_major_chunk): a
# float32 [4096, D] block of the weight gradient, [4096, token_chunk] blocks of logits.
_VOCAB_MAJOR_CHUNK = 4096
# One default block: 2**24 float32 elements (64 MiB).
_BLOCK_ELEMENTS = 2**24
# Never fewer rows per token chunk, where re-reading the [V, D] weight gradient dominates.
_MIN_TOKEN_CHUNK = 128


class _DefaultBlocks(NamedTuple):
  """A backend's default block shape (see :func:`plan_schedule`).

  Attributes:
    one_pass_elements: elements of a default ``[token_chunk, V]`` block of the one-pass schedule
      (its temporary memory is about two such float32 blocks).
    two_pass_elements: elements of a default ``[token_chunk, vocab_chunk]`` block of two passes.
    max_token_chunk: the most rows per default token chunk.
    token_major_blocks: whether the two-pass token-major loop takes vocabulary chunks of
      :func:`vocab_major_chunk` classes (else all classes at once).
  """

  one_pass_elements: int
  two_pass_elements: int
  max_token_chunk: int
  token_major_blocks: bool


_DEFAULT_BLOCKS = {
  # 2 CPU cores: [T, V] row blocks of 2**24 elements, T in [128, 1024].
  "cpu": _DefaultBlocks(_BLOCK_ELEMENTS, _BLOCK_ELEMENTS, 1024, False),
  # One H100 (experiments/results/gpu_h100/, measured with the hand-written backward that the
  # transposed tangent pass replaced). Two passes at Llama-3-8B's head (8192 x 4096 x 128256):
  # [8192, 4008] blocks of about 2**25 elements ran fwd+bwd in 1.39x (fp32) / 1.56x (bf16) of the
  # naive head's time at 3.9 % / 7.1 % of its memory ([8192, 4096]: 1.36x / 1.63x); the CPU's
  # [128, 128256] / [1024, 4096] blocks in 2.9x / 2.1x. One pass at 4096 x 512 x 32768 keeps the CPU's 2**24-element blocks
  # (1.85x naive, 0.13 of its memory): 2**25 would be 1.51x at 0.25 of it (bf16: 0.52).
  "gpu": _DefaultBlocks(_BLOCK_ELEMENTS, 2 * _BLOCK_ELEMENTS, 8192, True),
}
# The one-pass schedule's float32 [V, D] weight-gradient accumulator may be at most 1/8 of the
# [N, V] float32 logits (8 * D <= N) or one block (V * D <= _BLOCK_ELEMENTS), see plan_schedule.
_ONE_PASS_RATIO = 8
# Classes per slice of the one-pass weight-gradient product: a [rows, D] float32 temporary of
# about 2**21 elements (8 MiB).
_WEIGHT_GRAD_ELEMENTS = 2**21


class RowStats(NamedTuple):
  """Per-row partial statistics of the (capped) logits over one vocabulary slice.

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


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Static description of the blocked product :math:`\\mathrm{cap}(h W^\\top + b)`.

  Attributes:
    weight_layout: 'vd' for ``weight`` ``[V, D]``, 'dv' for ``[D, V]``.
    logit_softcap: soft cap :math:`c` or None.
    token_chunk: rows per block (at most N).
    vocab_chunk: classes per block (at most V).
    class_offset: global class index of the slice's first class.
    weighted_sum: whether :math:`\\sum_c w_c x_{ic}` is needed (label smoothing).
    vocab_major: loop order of :func:`vocab_slice_tangents` and so of the backward pass
      (vocabulary chunks outermost).
    varying_axes: inside ``shard_map(check_vma=True)``, the mesh axes ``hidden`` or ``weight``
      vary over: the type of every accumulator of blocks (partial statistics, gradients).
    row_axes: the mesh axes ``hidden`` varies over: the type of the complete per-row values
      (after ``complete_stats``) that :func:`fused_vocab_slice` accumulates.
    class_fns: per-class functions :math:`f_k(\\log p)` of an engine head's class sums
      :math:`\\sum_c \\beta_c f_k(\\log p_c)` (:func:`vocab_slice_class_sums`, :func:`head_stats_op`).
    entropy: whether the head needs :math:`\\sum_c p_c \\log p_c` (its entropy).
  """

  weight_layout: str
  logit_softcap: float | None
  token_chunk: int
  vocab_chunk: int
  class_offset: int = 0
  weighted_sum: bool = False
  vocab_major: bool = False
  varying_axes: tuple[Hashable, ...] = ()
  row_axes: tuple[Hashable, ...] = ()
  class_fns: tuple[engine.ClassFn, ...] = ()
  entropy: bool = False

  @property
  def vocab_axis(self) -> int:
    return 0 if self.weight_layout == "vd" else 1

  @property
  def num_tangents(self) -> int:
    """Per-row tangents of :func:`vocab_slice_tangents`: ``(d_lse, d_target, d_weighted_sum)``,
    then one per class sum, then the entropy's."""
    return 3 + len(self.class_fns) + self.entropy


# --------------------------------------------------------------------------- blocks


def _zeros(shape, dtype, axes: tuple[Hashable, ...], fill=0.0):
  """A loop accumulator filled with ``fill``, typed as varying over the mesh ``axes``.

  Inside ``shard_map(check_vma=True)`` a loop carry must keep the varying-axes type of what is
  added to it; a fresh constant varies over none (``jax.lax.pcast(..., to='varying')`` fixes it).
  """
  x = jnp.full(shape, fill, dtype)
  return lax.pcast(x, axes, to="varying") if axes else x


def _chunk_start(index, size: int, total: int):
  """First index of chunk ``index``; the last chunk is shifted back so it ends at ``total``."""
  return jnp.minimum(index * size, total - size)


def _num_chunks(total: int, size: int) -> int:
  return -(-total // size)


def _weight_block(weight, start, cfg: BlockConfig):
  return lax.dynamic_slice_in_dim(weight, start, cfg.vocab_chunk, axis=cfg.vocab_axis)


def _block_logits(hidden_TxD, weight_block, bias_C, cfg: BlockConfig):
  """Capped logits of one block, classes major: ``[C, T]``, accumulated in float32 (float64 for
  float64 inputs).

  Classes-major blocks make the weight-gradient product ``g @ hidden`` a plain (non-transposed)
  matmul, the layout XLA's CPU backend runs fastest.
  """
  dtype = inputs.compute_dtype(jnp.result_type(hidden_TxD.dtype, weight_block.dtype))
  features = 1 - cfg.vocab_axis
  x_CxT = lax.dot_general(
    weight_block, hidden_TxD, (((features,), (1,)), ((), ())), preferred_element_type=dtype
  )
  if bias_C is not None:
    x_CxT = x_CxT + bias_C.astype(dtype)[:, None]
  return engine.softcap(x_CxT, cfg.logit_softcap)


def _block_targets(target_index_T, shape):
  """Boolean ``[C, T]``: each row's label entry (none where the index is -1)."""
  return lax.broadcasted_iota(target_index_T.dtype, shape, 0) == target_index_T[None, :]


def _target_index(labels_T, class_start, new_C):
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


def _block_stats(x_CxT, target_index_T, new_C, class_weight_C, cfg: BlockConfig) -> RowStats:
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
  return RowStats(m_T, sumexp_T, target_T, weighted_sum_T)


def _merge_stats(a: RowStats, b: RowStats) -> RowStats:
  """Online-softmax merge of the statistics of two disjoint class sets."""
  m = jnp.maximum(a.max, b.max)
  safe_m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
  sumexp = a.sumexp * jnp.exp(a.max - safe_m) + b.sumexp * jnp.exp(b.max - safe_m)
  return RowStats(m, sumexp, a.target + b.target, a.weighted_sum + b.weighted_sum)


def logsumexp_from_stats(stats: RowStats) -> jax.Array:
  """:math:`\\mathrm{lse}_i = m_i + \\log\\sum_c e^{x_{ic} - m_i}` from complete statistics
  (also those :mod:`xent_jax.parallel.logits` completes over the shards)."""
  return stats.max + jnp.log(stats.sumexp)


class StatCotangents(NamedTuple):
  """Per-row cotangents :math:`(\\bar{\\mathrm{lse}}, \\bar t, \\bar s)` of the statistics
  (in the one-pass :func:`fused_vocab_slice`)."""

  lse: jax.Array
  target: jax.Array
  weighted_sum: jax.Array


def _block_dlogits(x_CxT, is_target_CxT, new_C, lse_T, cot: StatCotangents, class_weight_C, cfg):
  """:math:`\\partial L/\\partial (hW^\\top + b)` on one block ``[C, T]``, zero on classes it
  does not own."""
  safe_lse = jnp.where(jnp.isfinite(lse_T), lse_T, jnp.zeros_like(lse_T))
  g_CxT = cot.lse[None, :] * jnp.exp(x_CxT - safe_lse[None, :])
  g_CxT = g_CxT + jnp.where(is_target_CxT, cot.target[None, :], jnp.zeros_like(g_CxT))
  if cfg.weighted_sum:
    w_C = jnp.ones_like(new_C, x_CxT.dtype) if class_weight_C is None else class_weight_C
    g_CxT = g_CxT + w_C[:, None] * cot.weighted_sum[None, :]
  g_CxT = g_CxT * engine.softcap_grad(x_CxT, cfg.logit_softcap)
  return jnp.where(new_C[:, None], g_CxT, jnp.zeros_like(g_CxT))


def _matmul_dtype(hidden, weight):
  """The dtype of the backward matmuls' operands: the inputs' own (bfloat16 inputs run bfloat16
  matmuls with float32 accumulation, as their unfused gradient does)."""
  return jnp.result_type(hidden.dtype, weight.dtype)


def _block_hidden_grad(g_CxT, weight_block, cfg: BlockConfig):
  """``d_hidden [T, D]`` of one block (float32 accumulation)."""
  return lax.dot_general(
    g_CxT,
    weight_block,
    (((0,), (cfg.vocab_axis,)), ((), ())),
    preferred_element_type=inputs.compute_dtype(g_CxT.dtype),
  )


def _block_weight_grad(g_CxT, hidden_TxD, cfg: BlockConfig):
  """``d_weight`` of one block, ``[C, D]`` or ``[D, C]`` by layout (float32 accumulation)."""
  acc = inputs.compute_dtype(g_CxT.dtype)
  if cfg.weight_layout == "vd":
    return lax.dot_general(g_CxT, hidden_TxD, (((1,), (0,)), ((), ())), preferred_element_type=acc)
  return lax.dot_general(hidden_TxD, g_CxT, (((0,), (1,)), ((), ())), preferred_element_type=acc)


def _accumulate_weight_grad(d_weight, g_CxT, hidden_TxD, cfg: BlockConfig, rows: int):
  """``d_weight += g^T hidden`` in slices of ``rows`` classes.

  XLA does not fuse the accumulation into the matmul: one ``[V, D]`` product would be a full-size
  temporary (and a second pass over it); slices keep that temporary ``[rows, D]``.
  """
  v = g_CxT.shape[0]
  rows = min(rows, v)

  def step(j, acc):
    c0 = _chunk_start(j, rows, v)
    g_sub = lax.dynamic_slice_in_dim(g_CxT, c0, rows, 0)
    if v % rows:
      g_sub = jnp.where(_new_mask(c0, j, rows)[:, None], g_sub, jnp.zeros_like(g_sub))
    return _add_at(acc, c0, _block_weight_grad(g_sub, hidden_TxD, cfg), cfg.vocab_axis)

  return lax.fori_loop(0, _num_chunks(v, rows), step, d_weight)


def _add_at(total, start, update, axis):
  """``total[start:start + len(update)] += update`` along ``axis``."""
  current = lax.dynamic_slice_in_dim(total, start, update.shape[axis], axis=axis)
  return lax.dynamic_update_slice_in_dim(total, current + update, start, axis=axis)


def _token_chunk(tree, start, size):
  return jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, start, size, axis=0), tree)


def _new_mask(start, index, size):
  """``[size]`` bool: positions of a shifted chunk not already covered by the previous chunk."""
  return lax.iota(jnp.int32, size) + start >= index * size


# --------------------------------------------------------------------------- slice kernels


def vocab_slice_stats(hidden_NxD, weight, bias_V, labels_N, class_weight_V, cfg: BlockConfig):
  """Per-row partial statistics of ``cap(hidden @ weight_slice.T + bias_slice)`` over one slice.

  Loops over token chunks, and inside each over vocabulary chunks with the online-softmax merge.
  The first pass of the two-pass schedule, here and on each shard in :mod:`xent_jax.parallel.logits`.

  Args:
    hidden_NxD: ``[N, D]``.
    weight: the slice's weight, ``[V, D]`` ('vd') or ``[D, V]`` ('dv').
    bias_V: ``[V]`` or None.
    labels_N: ``[N]`` global integer class ids.
    class_weight_V: ``[V]`` float class weights of the slice, or None (ones).
    cfg: block configuration (chunks, offset, cap).

  Returns:
    :class:`RowStats` of ``[N]`` arrays; combine slices with :func:`_merge_stats` semantics
    (max, rescaled sum, sums) and take :func:`logsumexp_from_stats`.
  """
  n = hidden_NxD.shape[0]
  v = weight.shape[cfg.vocab_axis]
  t, c = cfg.token_chunk, cfg.vocab_chunk
  dtype = inputs.compute_dtype(jnp.result_type(hidden_NxD.dtype, weight.dtype))

  def token_step(i, stats_N):
    t0 = _chunk_start(i, t, n)
    hidden_TxD, labels_T = _token_chunk((hidden_NxD, labels_N), t0, t)

    def vocab_step(j, acc: RowStats):
      c0 = _chunk_start(j, c, v)
      new_C = _new_mask(c0, j, c)
      bias_C = None if bias_V is None else lax.dynamic_slice_in_dim(bias_V, c0, c)
      weight_C = None if class_weight_V is None else lax.dynamic_slice_in_dim(class_weight_V, c0, c)
      x_CxT = _block_logits(hidden_TxD, _weight_block(weight, c0, cfg), bias_C, cfg)
      index_T = _target_index(labels_T, c0 + cfg.class_offset, new_C)
      return _merge_stats(acc, _block_stats(x_CxT, index_T, new_C, weight_C, cfg))

    axes = cfg.varying_axes
    empty = RowStats(
      _zeros((t,), dtype, axes, -jnp.inf), *(_zeros((t,), dtype, axes) for _ in range(3))
    )
    chunk = lax.fori_loop(0, _num_chunks(v, c), vocab_step, empty)
    # Rows a shifted last chunk shares with the previous one get identical values: overwrite.
    return jax.tree.map(lambda a, b: lax.dynamic_update_slice_in_dim(a, b, t0, 0), stats_N, chunk)

  init = RowStats(*(_zeros((n,), dtype, cfg.varying_axes) for _ in range(4)))
  return lax.fori_loop(0, _num_chunks(n, t), token_step, init)


def vocab_slice_class_sums(hidden_NxD, weight, bias_V, lse_N, betas, cfg: BlockConfig, *, slopes):
  r"""An engine head's per-row class sums over one slice, given the complete ``lse``: the second
  pass of :func:`head_stats_op`.

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
  v = weight.shape[cfg.vocab_axis]
  t, c = cfg.token_chunk, cfg.vocab_chunk
  dtype = lse_N.dtype
  shifted = v % c != 0
  count = len(cfg.class_fns) * (1 + slopes) + cfg.entropy

  def token_step(i, out_N):
    t0 = _chunk_start(i, t, n)
    hidden_TxD, lse_T = _token_chunk((hidden_NxD, lse_N), t0, t)

    def vocab_step(j, acc_T):
      c0 = _chunk_start(j, c, v)
      new_C = _new_mask(c0, j, c).astype(dtype)[:, None] if shifted else None
      x_CxT = _block_logits(hidden_TxD, _weight_block(weight, c0, cfg), _slice(bias_V, c0, c), cfg)
      log_p_CxT = x_CxT - lse_T[None, :]
      parts = []
      for f, beta_V in zip(cfg.class_fns, betas):
        beta_C = None if beta_V is None else _slice(beta_V, c0, c)[:, None]
        if new_C is not None:  # classes a shifted last chunk shares with the previous one
          beta_C = new_C if beta_C is None else beta_C * new_C
        value_CxT, slope_CxT = engine.class_terms(f, beta_C, log_p_CxT)
        parts += [jnp.sum(value_CxT, axis=0)] + [jnp.sum(slope_CxT, axis=0)] * slopes
      if cfg.entropy:
        p_CxT = jnp.exp(log_p_CxT) * (1.0 if new_C is None else new_C)
        parts.append(jnp.sum(engine.p_times(p_CxT, log_p_CxT), axis=0))
      return tuple(a + b for a, b in zip(acc_T, parts))

    init = tuple(_zeros((t,), dtype, cfg.varying_axes) for _ in range(count))
    chunk_T = lax.fori_loop(0, _num_chunks(v, c), vocab_step, init)
    # Rows a shifted last chunk shares with the previous one get identical values: overwrite.
    return tuple(lax.dynamic_update_slice_in_dim(a, b, t0, 0) for a, b in zip(out_N, chunk_T))

  init = tuple(_zeros((n,), dtype, cfg.varying_axes) for _ in range(count))
  out_N = lax.fori_loop(0, _num_chunks(n, t), token_step, init) if count else ()
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

  Returns:
    ``(d_lse, d_target, d_weighted_sum)``, each ``[N]`` in ``lse_N``'s dtype.
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
  d_hidden = _vary(d_hidden, vocab_axes)
  d_weight, d_bias = (_vary(a, cfg.row_axes) for a in (d_weight, d_bias))
  kernel = _tangents_vocab_major if cfg.vocab_major else _tangents_token_major
  primals = (hidden_NxD, weight, bias_V, labels_N, class_weight_V, lse_N, head)
  return kernel(primals, (d_hidden, d_weight, d_bias), cfg)


def _vary(x, axes: tuple[Hashable, ...]):
  """``x`` typed as varying over the mesh ``axes`` (``jax.lax.pcast``); None stays None."""
  return x if x is None or not axes else lax.pcast(x, axes, to="varying")


def _slice(a, start, size, axis=0):
  """``a[start:start + size]`` along ``axis``; None stays None."""
  return None if a is None else lax.dynamic_slice_in_dim(a, start, size, axis=axis)


def _block_tangents(primals, t0, c0, j, tangents, cfg: BlockConfig, shifted: bool):
  """``(d_lse, d_target, d_weighted_sum)`` ``[T]`` of the block at token ``t0``, classes ``c0``
  (chunk ``j``), over its new classes (all of them unless the chunk may be ``shifted``).

  Takes the whole primal arrays and slices them itself: under :func:`_remat_block` the block's
  residuals are then those loop-invariant arrays and the chunk starts.
  """
  hidden_NxD, weight, bias_V, labels_N, class_weight_V, lse_N, head = primals
  d_hidden_TxD, d_weight_block, d_bias_C = tangents
  t, c = cfg.token_chunk, cfg.vocab_chunk
  betas, totals_N, mean_N = head
  hidden_TxD, labels_T, lse_T, totals_T, mean_T = _token_chunk(
    (hidden_NxD, labels_N, lse_N, totals_N, mean_N), t0, t
  )
  weight_block = _weight_block(weight, c0, cfg)
  x_CxT = _block_logits(hidden_TxD, weight_block, _slice(bias_V, c0, c), cfg)
  dtype = x_CxT.dtype
  features = 1 - cfg.vocab_axis
  contract = (((features,), (1,)), ((), ()))
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
  dx_CxT = dz_CxT * engine.softcap_grad(x_CxT, cfg.logit_softcap)
  new_C = _new_mask(c0, j, c)
  if shifted:
    dx_CxT = jnp.where(new_C[:, None], dx_CxT, jnp.zeros_like(dx_CxT))
  zeros = jnp.zeros_like(dx_CxT)
  safe_lse = jnp.where(jnp.isfinite(lse_T), lse_T, jnp.zeros_like(lse_T))
  log_p_CxT = x_CxT - safe_lse[None, :]
  p_CxT = jnp.exp(log_p_CxT)
  d_lse_T = jnp.sum(p_CxT * dx_CxT, axis=0)
  # A masked sum rather than _gather_targets' gather: its transpose is a select that fuses into
  # the logits gradient, where a gather's is a scatter.
  is_target = _block_targets(_target_index(labels_T, c0 + cfg.class_offset, new_C), x_CxT.shape)
  d_target_T = jnp.sum(jnp.where(is_target, dx_CxT, zeros), axis=0)
  if cfg.weighted_sum:
    class_weight_C = _slice(class_weight_V, c0, c)
    weighted = dx_CxT if class_weight_C is None else dx_CxT * class_weight_C[:, None]
    d_weighted_sum_T = jnp.sum(weighted, axis=0)
  else:
    d_weighted_sum_T = jnp.zeros_like(d_lse_T)
  parts = [d_lse_T, d_target_T, d_weighted_sum_T]
  # An engine head's class sums and entropy (xent_jax.core.engine's tangent, on a block).
  for f, beta_V, total_T in zip(cfg.class_fns, betas, totals_T):
    beta_C = None if beta_V is None else _slice(beta_V, c0, c)[:, None]
    _, slope_CxT = engine.class_terms(f, beta_C, log_p_CxT)
    parts.append(jnp.sum((slope_CxT - total_T[None, :] * p_CxT) * dx_CxT, axis=0))
  if cfg.entropy:
    spread_CxT = engine.p_times(p_CxT, log_p_CxT - mean_T[None, :])
    parts.append(jnp.sum(spread_CxT * dx_CxT, axis=0))
  return tuple(parts)


def _remat_block(cfg: BlockConfig, shifted: bool):
  """:func:`_block_tangents` recomputing everything it needs in reverse mode (saves nothing):
  its logits block, probabilities and masks are rebuilt where it is transposed."""
  block = functools.partial(_block_tangents, cfg=cfg, shifted=shifted)
  return jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)


def _carried(tree):
  """``tree`` itself, as a loop carry that the loop does not take for a constant.

  ``lax.scan`` and ``fori_loop`` turn a carry that the body returns unchanged into a loop constant
  (jax 0.10); a constant's cotangent is then summed in a fresh whole-size buffer per run of the
  loop and added to the enclosing loop's afterwards (two more float32 ``[N, D]`` buffers at the
  Llama-3-8B head on a TPU v5e). Adding zero keeps it a carry, whose cotangent accumulates in one
  buffer; XLA removes the addition.
  """
  return jax.tree.map(lambda a: a + jnp.zeros((), a.dtype), tree)


def _tangents_token_major(primals, tangents, cfg: BlockConfig):
  n = primals[0].shape[0]
  v = primals[1].shape[cfg.vocab_axis]
  d_hidden, d_weight, d_bias = tangents
  t, c = cfg.token_chunk, cfg.vocab_chunk
  dtype = primals[5].dtype
  block = _remat_block(cfg, shifted=v % c != 0)

  def token_step(i, carry):
    out_N, class_tangents = carry
    t0 = _chunk_start(i, t, n)
    d_hidden_TxD = _slice(d_hidden, t0, t)

    def vocab_step(j, inner):
      acc_T, (d_weight, d_bias) = inner
      c0 = _chunk_start(j, c, v)
      block_tangents = (
        d_hidden_TxD,
        _slice(d_weight, c0, c, cfg.vocab_axis),
        _slice(d_bias, c0, c),
      )
      parts_T = block(primals, t0, c0, j, block_tangents)
      return tuple(a + b for a, b in zip(acc_T, parts_T)), _carried((d_weight, d_bias))

    init = tuple(_zeros((t,), dtype, cfg.varying_axes) for _ in range(cfg.num_tangents))
    chunk_T, class_tangents = lax.fori_loop(
      0, _num_chunks(v, c), vocab_step, (init, class_tangents)
    )
    # Rows a shifted last chunk shares with the previous one get identical values: overwrite.
    out_N = tuple(lax.dynamic_update_slice_in_dim(a, b, t0, 0) for a, b in zip(out_N, chunk_T))
    return out_N, _carried(class_tangents)

  # The tangents sliced in the inner loop are carried through both loops, unchanged: in the
  # transpose their cotangents then accumulate in one buffer (a loop constant's would be summed
  # in a fresh whole-size buffer per token chunk, then added to the outer one).
  init = tuple(_zeros((n,), dtype, cfg.varying_axes) for _ in range(cfg.num_tangents))
  out_N, _ = lax.fori_loop(0, _num_chunks(n, t), token_step, (init, (d_weight, d_bias)))
  return out_N


def _tangents_vocab_major(primals, tangents, cfg: BlockConfig):
  n = primals[0].shape[0]
  v = primals[1].shape[cfg.vocab_axis]
  d_hidden, d_weight, d_bias = tangents
  t, c = cfg.token_chunk, cfg.vocab_chunk
  dtype = primals[5].dtype
  full, rest = divmod(v, c)

  def vocab_chunk(c0, j, d_hidden, d_weight_block, d_bias_C, cfg: BlockConfig):
    """All tokens' tangents over the classes from ``c0``, and ``d_hidden``, carried through."""
    block = _remat_block(cfg, shifted=False)
    if d_weight_block is not None:  # its cotangent accumulates in float32 over the token chunks
      d_weight_block = d_weight_block.astype(dtype)

    def token_step(i, carry):
      out_N, d_hidden = carry
      t0 = _chunk_start(i, t, n)
      parts_T = block(primals, t0, c0, j, (_slice(d_hidden, t0, t), d_weight_block, d_bias_C))
      out_N = tuple(lax.dynamic_update_slice_in_dim(a, b, t0, 0) for a, b in zip(out_N, parts_T))
      return out_N, _carried(d_hidden)

    init = tuple(_zeros((n,), dtype, cfg.varying_axes) for _ in range(cfg.num_tangents))
    return lax.fori_loop(0, _num_chunks(n, t), token_step, (init, d_hidden))

  # Scanned over, not sliced from a loop constant: the transpose of a slice is a whole-size
  # cotangent added at every step, while a scanned block's comes back as its own output.
  def blocks(a, axis, start, count, size):
    if a is None:
      return None
    a = lax.slice_in_dim(a, start, start + count * size, axis=axis)
    return jnp.moveaxis(a.reshape(a.shape[:axis] + (count, size) + a.shape[axis + 1 :]), axis, 0)

  def scan_step(carry, xs):
    acc_N, d_hidden = carry
    j, d_weight_block, d_bias_C = xs
    parts_N, d_hidden = vocab_chunk(j * c, j, d_hidden, d_weight_block, d_bias_C, cfg)
    return (tuple(a + b for a, b in zip(acc_N, parts_N)), _carried(d_hidden)), None

  # d_hidden is carried through both loops (see _tangents_token_major): one float32 [N, D]
  # cotangent buffer.
  init = tuple(_zeros((n,), dtype, cfg.varying_axes) for _ in range(cfg.num_tangents))
  xs = (
    jnp.arange(full),
    blocks(d_weight, cfg.vocab_axis, 0, full, c),
    blocks(d_bias, 0, 0, full, c),
  )
  (acc_N, d_hidden), _ = lax.scan(scan_step, (init, d_hidden), xs)
  if rest:  # the remaining classes, one smaller block
    start = full * c
    tail_cfg = dataclasses.replace(cfg, vocab_chunk=rest)
    tail = lambda a, axis: None if a is None else lax.slice_in_dim(a, start, v, axis=axis)
    parts_N, _ = vocab_chunk(
      start, full, d_hidden, tail(d_weight, cfg.vocab_axis), tail(d_bias, 0), tail_cfg
    )
    acc_N = tuple(a + b for a, b in zip(acc_N, parts_N))
  return acc_N


RowLoss = Callable[[jax.Array, jax.Array, jax.Array, Any], jax.Array]


def fused_vocab_slice(
  hidden_NxD,
  weight,
  bias_V,
  labels_N,
  class_weight_V,
  row_loss: RowLoss,
  rows: Any,
  cfg: BlockConfig,
  complete_stats: Callable[[RowStats], RowStats] = lambda s: s,
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
  v = weight.shape[cfg.vocab_axis]
  t = cfg.token_chunk
  cfg = dataclasses.replace(cfg, vocab_chunk=v)
  dtype = inputs.compute_dtype(jnp.result_type(hidden_NxD.dtype, weight.dtype))
  all_C = jnp.ones((v,), bool)
  weight_rows = max(_WEIGHT_GRAD_ELEMENTS // d, 1)

  def token_step(i, carry):
    loss_sum, lse_N, d_hidden_NxD, d_weight, d_bias_V = carry
    t0 = _chunk_start(i, t, n)
    new_T = _new_mask(t0, i, t)
    hidden_TxD, labels_T, rows_T = _token_chunk((hidden_NxD, labels_N, rows), t0, t)
    x_CxT = _block_logits(hidden_TxD, weight, bias_V, cfg)
    index_T = _target_index(labels_T, cfg.class_offset, all_C)
    stats = complete_stats(_block_stats(x_CxT, index_T, all_C, class_weight_V, cfg))
    lse_T = logsumexp_from_stats(stats)
    loss_T, pullback = jax.vjp(
      lambda l, tg, s: row_loss(l, tg, s, rows_T), lse_T, stats.target, stats.weighted_sum
    )
    # d(loss_sum)/d(loss_T): 1 on the chunk's new rows, typed like the per-row values.
    seed_T = jnp.where(
      new_T, _zeros((t,), loss_T.dtype, cfg.row_axes, 1.0), _zeros((t,), loss_T.dtype, cfg.row_axes)
    )
    cot = StatCotangents(*pullback(seed_T))
    is_target = _block_targets(index_T, x_CxT.shape)
    g_CxT = _block_dlogits(x_CxT, is_target, all_C, lse_T, cot, class_weight_V, cfg)
    if d_bias_V is not None:
      d_bias_V = d_bias_V + jnp.sum(g_CxT, axis=1)
    g = g_CxT.astype(_matmul_dtype(hidden_TxD, weight))
    return (
      loss_sum + jnp.sum(jnp.where(new_T, loss_T, jnp.zeros_like(loss_T))),
      lax.dynamic_update_slice_in_dim(lse_N, lse_T, t0, 0),
      _add_at(d_hidden_NxD, t0, _block_hidden_grad(g, weight, cfg), 0),
      _accumulate_weight_grad(d_weight, g, hidden_TxD, cfg, weight_rows),
      d_bias_V,
    )

  axes = cfg.varying_axes
  init = (
    _zeros((), dtype, cfg.row_axes),
    _zeros((n,), dtype, cfg.row_axes),
    _zeros((n, d), dtype, axes),
    _zeros(weight.shape, dtype, axes),
    None if bias_V is None else _zeros((v,), dtype, axes),
  )
  return lax.fori_loop(0, _num_chunks(n, t), token_step, init)


# --------------------------------------------------------------------------- custom JVPs


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The static per-row loss options of the kernels: the smoothed target, its convention and the
  z-loss coefficient.

  Part of the interface for :mod:`xent_jax.parallel.logits` (made by :func:`prepare_rows`).
  """

  target: heads.SmoothedTarget
  smoothing: str
  z_loss: float


def row_loss(lcfg: LossConfig, total_weight, lse, target_logit, weighted_sum, rows):
  """Each row's loss times its scale, 0 on invalid rows: cross-entropy's head
  (:func:`xent_jax.losses.cross_entropy.cross_entropy_head`) on the kernels' statistics.

  The head reads :math:`\\log p_y = x_y - \\mathrm{lse}` and, when smoothing, the class sum
  :math:`\\sum_c w_c(\\mathrm{lse} - x_c) = W\\,\\mathrm{lse} - \\sum_c w_c x_c`. ``rows`` is
  ``(scale, target_weight, valid)``, each ``[N]``. For :mod:`xent_jax.parallel.logits` too, which
  evaluates it on statistics completed over the vocabulary shards.
  """
  scale, target_weight, valid = rows
  target = lcfg.target
  zeros = jnp.zeros_like(lse)
  class_sums = (total_weight * lse - weighted_sum,) if target.off else ()
  stats = engine.RowStats(lse, zeros, target_logit - lse, class_sums, zeros)
  loss = heads.integer_stats_loss(
    _ce.cross_entropy_head(lcfg.smoothing, lcfg.z_loss),
    stats,
    target_weight=target_weight,
    total_weight=total_weight,
    on=target.on,
    off=target.off,
  )
  return jnp.where(valid, scale * loss, jnp.zeros_like(loss))


def _unchanged(x):
  return x


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def stats_op(cfg, complete_stats, sum_slices, hidden, weight, bias, labels, class_weight):
  """Per-row ``(lse, target logit, weighted sum)`` of the two-pass schedule
  (:func:`vocab_slice_stats`), differentiable in both modes: its tangent is a second blocked pass
  (:func:`vocab_slice_tangents`, from the ``lse`` of the first), and reverse mode is JAX's
  transpose of that pass, which recomputes the blocks. ``labels`` and ``class_weight`` are
  constants (their tangents are ignored).

  On one device ``complete_stats`` and ``sum_slices`` are :func:`_unchanged`; on a vocabulary
  shard ``complete_stats`` is :func:`fused_op`'s hook of the same name and ``sum_slices`` sums
  the shards' partial tangents ``(d_lse, d_target, d_weighted_sum)``."""
  stats = complete_stats(vocab_slice_stats(hidden, weight, bias, labels, class_weight, cfg))
  return logsumexp_from_stats(stats), stats.target, stats.weighted_sum


def _stats_jvp(cfg, complete_stats, sum_slices, primals, tangents):
  hidden, weight, bias, labels, class_weight = primals
  out = stats_op(cfg, complete_stats, sum_slices, *primals)
  # Symbolic zeros (undifferentiated inputs) stay out of the tangent pass.
  tangents = tuple(
    None if isinstance(t, jax.custom_derivatives.SymbolicZero) else t for t in tangents[:3]
  )
  if all(t is None for t in tangents):
    return out, tuple(jnp.zeros_like(o) for o in out)
  parts = vocab_slice_tangents(hidden, weight, bias, labels, class_weight, out[0], tangents, cfg)
  return out, tuple(sum_slices(parts))


stats_op.defjvp(_stats_jvp, symbolic_zeros=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def head_stats_op(cfg, hidden, weight, bias, labels, betas):
  """An engine head's per-row statistics of ``cap(hidden @ weight.T + bias)``:
  ``(lse, target logit, class sums, E)`` with the class sums of ``cfg.class_fns`` weighted by
  ``betas`` (``[V]`` or None each) and :math:`E = \\sum_c p_c \\log p_c` (zeros unless
  ``cfg.entropy``), each ``[N]``.

  Two passes over the blocks (:func:`vocab_slice_stats`, then :func:`vocab_slice_class_sums`,
  skipped without class sums or entropy); its tangent is a third (:func:`vocab_slice_tangents`
  with the head's terms, :math:`\\sum_c (\\beta_c f'(\\log p_c) - p_c B)\\dot x_c` per class
  sum and :math:`\\sum_c p_c(\\log p_c - E)\\dot x_c` for :math:`E`), and reverse mode is its
  transpose, in the loop order of ``cfg.vocab_major``: as :func:`stats_op`, each ``d_weight``
  block of a bfloat16 head is summed in float32 over all tokens and written once. ``labels``
  (valid ids) and ``betas`` are constants.
  """
  return _head_stats(cfg, hidden, weight, bias, labels, betas, slopes=False)[0]


def _head_stats(cfg, hidden, weight, bias, labels, betas, *, slopes):
  """``(outputs of head_stats_op, (slope totals, E or None))``."""
  stats = vocab_slice_stats(hidden, weight, bias, labels, None, cfg)
  lse = logsumexp_from_stats(stats)
  sums, totals, mean = vocab_slice_class_sums(hidden, weight, bias, lse, betas, cfg, slopes=slopes)
  mean_out = jnp.zeros_like(lse) if mean is None else mean
  return (lse, stats.target, sums, mean_out), (totals, mean)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _head_stats_with_slopes(cfg, hidden, weight, bias, labels, betas):
  """:func:`_head_stats` with the slope totals, as one call of its own (as :func:`_stats_jvp`
  calls :func:`stats_op`): written inline in :func:`_head_stats_jvp`, the compiled backward pass
  kept the tangent pass's per-block label masks and float32 weight blocks for every block, ``[V,
  N]`` and ``[V, D]`` arrays (bfloat16, N=128, D=1024, V=32000 on XLA:CPU: 321 MiB of temporaries
  against 135 MiB). Its own derivatives (second order) are plain autodiff of the passes."""
  return _head_stats(cfg, hidden, weight, bias, labels, betas, slopes=True)


@_head_stats_with_slopes.defjvp
def _head_stats_with_slopes_jvp(cfg, primals, tangents):
  return jax.jvp(functools.partial(_head_stats, cfg, slopes=True), primals, tangents)


def _head_stats_jvp(cfg, primals, tangents):
  hidden, weight, bias, labels, betas = primals
  out, (totals, mean) = _head_stats_with_slopes(cfg, *primals)
  tangents = tuple(
    None if isinstance(t, jax.custom_derivatives.SymbolicZero) else t for t in tangents[:3]
  )
  if all(t is None for t in tangents):
    return out, jax.tree.map(jnp.zeros_like, out)
  d_lse, d_target, _, *d_head = vocab_slice_tangents(
    hidden, weight, bias, labels, None, out[0], tangents, cfg, head=(betas, totals, mean)
  )
  k = len(cfg.class_fns)
  d_mean = d_head[k] if cfg.entropy else jnp.zeros_like(d_lse)
  return out, (d_lse, d_target, tuple(d_head[:k]), d_mean)


head_stats_op.defjvp(_head_stats_jvp, symbolic_zeros=True)


def fused_op(
  cfg,
  lcfg,
  hidden,
  weight,
  bias,
  labels,
  class_weight,
  rows,
  total_weight,
  *,
  complete_stats: Callable[[RowStats], RowStats] = _unchanged,
  sum_loss: Callable[[jax.Array], jax.Array] = _unchanged,
  sum_grads: Callable[[tuple], tuple] = _unchanged,
  tangent_axes=None,
):
  """The summed row losses, with gradients for ``hidden``, ``weight`` and ``bias`` computed in
  the forward pass (:func:`xent_jax.fused.forward_grads.sum_with_gradients`); undifferentiated, only
  the statistics (one matmul).

  On one device the defaults apply. On a vocabulary shard (:mod:`xent_jax.parallel.logits`)
  ``complete_stats`` completes each row's statistics over the shards, ``sum_loss`` and
  ``sum_grads`` sum the shards' parts of the loss and of ``(d_hidden, d_weight, d_bias)`` to
  their inputs' types, and ``tangent_axes`` is :func:`~xent_jax.fused.forward_grads.sum_with_gradients`'s.
  """

  def value(hidden, weight, bias, labels, class_weight, rows, total_weight):
    stats = complete_stats(vocab_slice_stats(hidden, weight, bias, labels, class_weight, cfg))
    lse = logsumexp_from_stats(stats)
    loss = row_loss(lcfg, total_weight, lse, stats.target, stats.weighted_sum, rows)
    return sum_loss(jnp.sum(loss))

  def forward(hidden, weight, bias, labels, class_weight, rows, total_weight):
    loss, _, *grads = fused_vocab_slice(
      hidden,
      weight,
      bias,
      labels,
      class_weight,
      functools.partial(row_loss, lcfg, total_weight),
      rows,
      cfg,
      complete_stats,
    )
    d_hidden, d_weight, d_bias = sum_grads(tuple(grads))
    # Stored in the inputs' dtypes: the backward pass only scales them.
    return sum_loss(loss), (
      d_hidden.astype(hidden.dtype),
      d_weight.astype(weight.dtype),
      None if bias is None else d_bias.astype(bias.dtype),
    )

  return forward_grads.sum_with_gradients(
    forward,
    hidden,
    weight,
    bias,
    labels,
    class_weight,
    rows,
    total_weight,
    num_differentiable=3,
    value=value,
    tangent_axes=tangent_axes,
  )


# --------------------------------------------------------------------------- public function


def check_chunk_size(fn: str, name: str, size) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``size`` is a positive int."""
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"{fn}: `{name}` must be a positive int or None, got {size!r}.")


def _resolve_chunk(fn: str, name: str, size, total: int, default: int) -> int:
  if size is None:
    size = default
  else:
    check_chunk_size(fn, name, size)
  return max(1, min(int(size), total))


def default_blocks(platform: str | None = None) -> _DefaultBlocks:
  """The default block shape for ``platform`` ('cpu', 'gpu', 'tpu'; None: JAX's default backend,
  where a jitted function runs unless its inputs live elsewhere). Platforms without measurements
  (TPU) get the CPU's."""
  return _DEFAULT_BLOCKS.get(platform or jax.default_backend(), _DEFAULT_BLOCKS["cpu"])


def default_token_chunk(num_classes: int, blocks: _DefaultBlocks, *, one_pass: bool) -> int:
  """Rows per token chunk when none is given: a power of two with a ``[chunk, num_classes]``
  block of about ``blocks``' elements for the schedule, between 128 and
  ``blocks.max_token_chunk``."""
  elements = blocks.one_pass_elements if one_pass else blocks.two_pass_elements
  rows = 2 ** int(np.floor(np.log2(max(elements // max(num_classes, 1), 1))))
  return int(np.clip(rows, _MIN_TOKEN_CHUNK, blocks.max_token_chunk))


class Schedule(NamedTuple):
  """How the blocked kernels visit ``[N, V]`` (see :func:`plan_schedule`)."""

  one_pass: bool
  token_chunk: int
  vocab_chunk: int
  vocab_major: bool

  def block_config(
    self, weight_layout, logit_softcap, weighted_sum, *, varying_axes=(), row_axes=()
  ) -> BlockConfig:
    return BlockConfig(
      weight_layout,
      logit_softcap,
      self.token_chunk,
      self.vocab_chunk,
      weighted_sum=weighted_sum,
      vocab_major=self.vocab_major,
      varying_axes=tuple(varying_axes),
      row_axes=tuple(row_axes),
    )


def vocab_major_chunk(num_classes: int) -> int:
  """Classes per vocabulary-major chunk when none is given: the largest divisor of ``V`` from
  2048 to 4096 (4000 for 32000 or 256000 classes, 4008 for Llama 3's 128256), else 4096.

  The tangent pass scans the weight's tangent in such blocks, so that reverse mode writes each
  block of ``d_weight`` once; classes left over by a chunk that does not divide ``V`` form one
  more block, and joining its gradient to the others' copies ``d_weight`` (a full-size
  temporary in the weight's dtype on a TPU).
  """
  for size in range(_VOCAB_MAJOR_CHUNK, _VOCAB_MAJOR_CHUNK // 2 - 1, -1):
    if num_classes % size == 0:
      return size
  return _VOCAB_MAJOR_CHUNK


def plan_schedule(
  fn: str,
  n: int,
  d: int,
  v: int,
  *,
  linear_reduction: bool,
  token_chunk_size,
  vocab_chunk_size,
  hidden_dtype=jnp.float32,
  weight_dtype=jnp.float32,
  platform: str | None = None,
) -> Schedule:
  r"""Chooses the schedule and the loop order from the shapes ``[N, D] x [V, D]`` and dtypes.

  * **One pass** (three matmuls, token-major, a float32 ``[V, D]`` weight-gradient accumulator)
    when the loss is linear in the per-row losses (``linear_reduction``: 'sum' or 'mean' without
    ``return_lse``), no ``vocab_chunk_size`` is given, and the accumulator is at most
    :math:`1/8` of the ``[N, V]`` float32 logits it replaces (:math:`4VD \le 4NV/8`, i.e.
    :math:`8D \le N`) or no larger than one default block (:math:`VD \le 2^{24}`). Beyond that
    (Llama-3-8B's head: :math:`D = N/2` at ``N = 8192``) the accumulator alone would be a large
    part of the naive path's memory.
  * Otherwise **two passes** (four matmuls: statistics, then recomputed blocks), whose backward
    keeps the fewer float32 elements besides the gradients themselves. Token-major keeps a
    ``[V, D]`` accumulator, extra when the weight is narrower than float32; vocabulary-major keeps
    a ``[C, D]`` block and an ``[N, D]`` accumulator, extra when ``hidden`` is narrower. So
    bfloat16 heads with :math:`V > N + C` go vocabulary-major (each ``d_weight`` block finished in
    float32 and written once in the weight's dtype), float32 ones token-major (the accumulator is
    the gradient). Vocabulary-major blocks default to about :math:`C = 4096` classes
    (:func:`vocab_major_chunk`).

  Explicit chunk sizes are kept (clipped to the axis). Default blocks depend on ``platform``
  (:func:`default_blocks`; None: JAX's default backend): on CPU about ``2**24`` elements, the
  token-major loop taking all classes at once; on GPU two passes take ``[8192, C]`` blocks
  (about ``2**25``, :math:`C` from :func:`vocab_major_chunk`) in both loop orders, one pass the
  CPU's (:func:`default_token_chunk`).
  """
  blocks = default_blocks(platform)
  small = _ONE_PASS_RATIO * d <= n or v * d <= _BLOCK_ELEMENTS
  one_pass = linear_reduction and vocab_chunk_size is None and small
  if one_pass:
    vocab_chunk, vocab_major = v, False
  else:
    block = _resolve_chunk(fn, "vocab_chunk_size", vocab_chunk_size, v, vocab_major_chunk(v))
    acc = jnp.promote_types(jnp.promote_types(hidden_dtype, weight_dtype), jnp.float32)
    narrower = lambda dtype: jnp.dtype(dtype).itemsize < jnp.dtype(acc).itemsize
    token_extra = v * d if narrower(weight_dtype) else 0
    vocab_extra = block * d + (n * d if narrower(hidden_dtype) else 0)
    vocab_major = token_extra > vocab_extra
    token_major_chunk = vocab_major_chunk(v) if blocks.token_major_blocks else v
    vocab_chunk = (
      block
      if vocab_major
      else _resolve_chunk(fn, "vocab_chunk_size", vocab_chunk_size, v, token_major_chunk)
    )
  token_chunk = _resolve_chunk(
    fn,
    "token_chunk_size",
    token_chunk_size,
    n,
    default_token_chunk(vocab_chunk, blocks, one_pass=one_pass),
  )
  return Schedule(one_pass, token_chunk, vocab_chunk, vocab_major)


def unfused_logits(hidden, weight, bias, weight_layout: str) -> jax.Array:
  """``hidden @ weight.T + bias`` ``[..., V]`` written plainly (for the empty batches the blocked
  schedules have nothing to chunk in)."""
  spec = "...d,vd->...v" if weight_layout == "vd" else "...d,dv->...v"
  logits = jnp.einsum(spec, jnp.asarray(hidden), jnp.asarray(weight))
  return logits if bias is None else logits + heads.along_classes(jnp.asarray(bias), logits.ndim)


def linear_shapes(fn: str, hidden, weight, weight_layout: str) -> tuple[int, int]:
  """``(classes, features)`` of ``weight`` in its layout, checked against ``hidden [..., D]``.

  Shared with :mod:`xent_jax.parallel.logits` (which checks the global arrays with it) and
  :mod:`xent_jax.fused.chunked` (every other loss's fused form). Any array-likes.

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
  vocab_axis = 0 if weight_layout == "vd" else 1
  checks.check_has_classes(fn, "weight", weight_shape, vocab_axis)
  num_classes, features = weight_shape[vocab_axis], weight_shape[1 - vocab_axis]
  if hidden_shape[-1] != features:
    raise ValueError(
      f"{fn}: `hidden`'s last dimension must equal `weight`'s feature dimension ({features} for "
      f"weight_layout={weight_layout!r}, `weight` {weight_shape}), got `hidden` {hidden_shape}."
    )
  return num_classes, features


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
    schedule: the :class:`Schedule`; None for an empty batch (no kernel runs).
    block: the :class:`BlockConfig` of ``schedule``, or None.
    loss: the :class:`LossConfig` for :func:`row_loss`.
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
  loss: LossConfig

  def kernel_rows(self, row_scale_N: jax.Array | None = None):
    """The ``rows`` argument of :func:`row_loss`: each row's scale (times NaN on rows with an
    out-of-range label), target weight and validity."""
    scale_N = self.nan_or_one_N if row_scale_N is None else row_scale_N * self.nan_or_one_N
    return (scale_N, self.target_weight_N, self.valid_N)


def prepare_rows(
  fn: str,
  hidden: jax.typing.ArrayLike,
  weight: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  bias: jax.typing.ArrayLike | None,
  weight_layout: str,
  class_weight: jax.typing.ArrayLike | None,
  ignore_index: int | None,
  reduction: str,
  label_smoothing: float,
  smoothing: str,
  z_loss: float,
  logit_softcap: float | None,
  where: jax.typing.ArrayLike | None,
  return_lse: bool,
  token_chunk_size: int | None,
  vocab_chunk_size: int | None,
  vocab_axis: Hashable | None = None,
  row_axes: tuple[Hashable, ...] = (),
) -> PreparedRows:
  """Checks :func:`linear_cross_entropy`'s arguments and prepares the kernels' per-row inputs.

  The one front end of the kernels: :func:`linear_cross_entropy` calls it on whole arrays, and
  :mod:`xent_jax.parallel.logits` on one vocabulary shard inside ``shard_map`` (``vocab_axis``: the mesh
  axis the classes of ``weight``, ``bias`` and ``class_weight`` are split over, whose global class
  count :math:`K` the labels and the smoothing refer to; ``row_axes``: the mesh axes the rows are
  split over, for the kernels' varying-axes types). Labels are read by
  :func:`xent_jax.core.inputs.integer_labels`, ``where`` by :func:`xent_jax.core.inputs.row_mask`, the
  schedule planned by :func:`plan_schedule` (none for an empty batch).

  Raises:
    TypeError, ValueError, AssertionError: naming the bad argument of ``fn``.
  """
  checks.check_floating(fn, "hidden", hidden)
  checks.check_floating(fn, "weight", weight)
  checks.check_choice(fn, "weight_layout", weight_layout, WEIGHT_LAYOUTS)
  LossOptions.checked(
    fn,
    label_smoothing=label_smoothing,
    smoothing=smoothing,
    z_loss=z_loss,
    logit_softcap=logit_softcap,
    reduction=reduction,
  )
  hidden, weight = jnp.asarray(hidden), jnp.asarray(weight)
  labels = inputs.as_label_array(fn, labels)
  num_local, features = linear_shapes(fn, hidden, weight, weight_layout)
  batch_shape = hidden.shape[:-1]
  inputs.check_integer_labels(fn, labels, batch_shape)
  if bias is not None:
    checks.check_floating(fn, "bias", bias)
    checks.check_shape(fn, "bias", bias, (num_local,))
    bias = jnp.asarray(bias)
  dtype = inputs.compute_dtype(jnp.result_type(hidden.dtype, weight.dtype))
  if class_weight is not None:
    inputs.check_class_weight(fn, "class_weight", class_weight, num_local)
    class_weight = jnp.asarray(class_weight).astype(dtype)
  valid = inputs.row_mask(fn, where, batch_shape)
  n = int(np.prod(batch_shape))
  schedule = None
  if n:
    schedule = plan_schedule(
      fn,
      n,
      features,
      num_local,
      linear_reduction=reduction != "none" and not return_lse,
      token_chunk_size=token_chunk_size,
      vocab_chunk_size=vocab_chunk_size,
      hidden_dtype=hidden.dtype,
      weight_dtype=weight.dtype,
    )
  num_classes = num_local if vocab_axis is None else num_local * lax.axis_size(vocab_axis)
  read = inputs.integer_labels(
    fn, labels, num_classes=num_classes, ignore_index=ignore_index, where=valid
  )
  # int32 labels, -1 outside [0, K): such a row matches no class of any block or shard.
  labels_N, valid_N, in_range_N = (a.reshape(n) for a in read)
  target_weight_N, total_weight = heads.target_weights(
    class_weight, read.safe_labels.reshape(n), num_local, dtype, vocab_axis
  )
  example_weight_N = jnp.where(valid_N, target_weight_N, jnp.zeros_like(target_weight_N))
  # A valid label outside [0, K) makes its row's loss (and gradients) NaN, as in cross_entropy.
  nan_or_one_N = jnp.where(valid_N & ~in_range_N, jnp.nan, 1.0).astype(dtype)
  varying_axes = ()
  if vocab_axis is not None:
    # The kernels see this shard's classes as 0..V_s-1: shift the labels rather than pass the
    # (traced) shard offset through the static BlockConfig.class_offset.
    labels_N = labels_N - lax.axis_index(vocab_axis) * num_local
    varying_axes = (*row_axes, vocab_axis)
  target = heads.smoothed_target(num_classes, label_smoothing, smoothing)
  block = None
  if schedule is not None:
    block = schedule.block_config(
      weight_layout,
      logit_softcap,
      bool(target.off),
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
    schedule,
    block,
    LossConfig(target, smoothing, float(z_loss)),
  )


def linear_cross_entropy(
  hidden: jax.typing.ArrayLike,
  weight: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  bias: jax.typing.ArrayLike | None = None,
  weight_layout: str = "vd",
  class_weight: jax.typing.ArrayLike | None = None,
  ignore_index: int | None = -100,
  reduction: str = "mean",
  label_smoothing: float = 0.0,
  smoothing: str = "uniform",
  z_loss: float = 0.0,
  logit_softcap: float | None = None,
  where: jax.typing.ArrayLike | None = None,
  return_lse: bool = False,
  token_chunk_size: int | None = None,
  vocab_chunk_size: int | None = None,
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
  backward pass, which scales them (residuals: the size of ``hidden`` and ``weight``); otherwise the backward pass recomputes the
  logits (four matmuls, blocks of ``[token_chunk_size, vocab_chunk_size]``, residuals: the per-row
  ``lse``), vocabulary chunks outermost for bfloat16 heads with :math:`V > N + 4096`, so that no
  float32 ``[V, D]`` buffer exists besides a float32 gradient
  (:func:`xent_jax.fused.linear.plan_schedule`). Called
  without differentiation, it only computes the loss (one matmul).

  Gradients come back in the inputs' dtypes, accumulated in float32 (float64 for float64 inputs).
  With bfloat16 inputs the loss equals the float64 loss of the (rounded) inputs to 1e-5 relative,
  and each gradient lies within 1e-2 of its largest entry of the float64 gradient (bfloat16
  matmul operands and outputs; tested in every schedule).

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
    where: bool mask broadcastable to ``labels``' shape; False rows count for nothing.
    return_lse: also return the per-row ``lse`` ``[...]`` (uses the two-pass schedule).
    token_chunk_size: rows per block; default: a power of two giving a ``[rows, vocab_chunk]``
      block of about ``2**24`` elements, within [128, 1024]. Larger than the row count means all
      rows.
    vocab_chunk_size: classes per block; default: the whole vocabulary, or 4096 classes for the
      vocabulary-major backward. Giving it selects the two-pass schedule and bounds the block to
      ``[token_chunk_size, vocab_chunk_size]``.

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
  rows = prepare_rows(
    fn,
    hidden,
    weight,
    labels,
    bias=bias,
    weight_layout=weight_layout,
    class_weight=class_weight,
    ignore_index=ignore_index,
    reduction=reduction,
    label_smoothing=label_smoothing,
    smoothing=smoothing,
    z_loss=z_loss,
    logit_softcap=logit_softcap,
    where=where,
    return_lse=return_lse,
    token_chunk_size=token_chunk_size,
    vocab_chunk_size=vocab_chunk_size,
  )
  if rows.schedule is None:  # Nothing to chunk: the unfused loss of the empty [..., 0, V] logits.
    return _ce.cross_entropy(
      unfused_logits(hidden, weight, bias, weight_layout),
      labels,
      weight=class_weight,
      ignore_index=ignore_index,
      reduction=reduction,
      label_smoothing=label_smoothing,
      smoothing=smoothing,
      z_loss=z_loss,
      logit_softcap=logit_softcap,
      where=where,
      return_lse=return_lse,
    )
  args = (rows.hidden_NxD, rows.weight, rows.bias, rows.labels_N, rows.class_weight)
  if rows.schedule.one_pass:
    # Sum and mean are linear in the per-row losses: d(reduced)/d(loss_i) is known up front.
    row_scale_N = jax.grad(
      lambda loss: reduce_loss(loss, rows.example_weight_N, reduction, fn=fn)
    )(jnp.zeros_like(rows.example_weight_N))
    return fused_op(rows.block, rows.loss, *args, rows.kernel_rows(row_scale_N), rows.total_weight)
  lse_N, target_N, weighted_sum_N = stats_op(rows.block, _unchanged, _unchanged, *args)
  loss_N = row_loss(
    rows.loss, rows.total_weight, lse_N, target_N, weighted_sum_N, rows.kernel_rows()
  )
  loss = reduce_loss(
    loss_N.reshape(rows.batch_shape),
    rows.example_weight_N.reshape(rows.batch_shape),
    reduction,
    fn=fn,
  )
  return (loss, lse_N.reshape(rows.batch_shape)) if return_lse else loss
