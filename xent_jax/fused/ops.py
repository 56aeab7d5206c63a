r"""The differentiable operations on the kernels: two-pass statistics, head statistics, one pass.

* :func:`stats_op`: per-row ``(lse, target logit, weighted sum)`` of the two-pass schedule, a
  ``jax.custom_jvp`` whose tangent is a second blocked pass and whose reverse mode is that pass's
  transpose (it recomputes the blocks);
* :func:`head_stats_op`: an engine head's per-row statistics (class sums, entropy) the same way;
* :func:`fused_op`: the one-pass schedule, the summed loss with its gradients computed in the
  forward pass (:func:`xent_jax.fused.forward_grads.sum_with_gradients`);
* :func:`row_loss`: cross-entropy's per-row formula on the kernels' statistics.

Each takes the static :class:`~xent_jax.fused.schedule.BlockConfig`; a vocabulary-sharded caller
(:mod:`xent_jax.parallel.logits`) passes hooks that complete the statistics and sum the partial
tangents and gradients over the shards.
"""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from xent_jax.core import checks, engine, heads, inputs
from xent_jax.fused import forward_grads, kernels
from xent_jax.fused.blocks import BlockStats, logsumexp_from_stats
from xent_jax.losses import cross_entropy as _ce


@dataclasses.dataclass(frozen=True)
class RowLossConfig:
  """The per-row loss options of the kernels: the smoothed target, its convention and the z-loss
  coefficient (the numbers may be traced: :func:`row_loss` is outside the custom derivatives).

  Part of the interface for :mod:`xent_jax.parallel.logits` (made by
  :func:`xent_jax.fused.rows.prepare_rows`).
  """

  target: heads.SmoothedTarget
  smoothing: str
  z_loss: float


def row_loss(lcfg: RowLossConfig, total_weight, lse, target_logit, weighted_sum, rows):
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
  smoothed = not checks.is_static_zero(target.off)
  class_sums = (total_weight * lse - weighted_sum,) if smoothed else ()
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


def unchanged(x):
  """The identity: the one-device hook of :func:`stats_op` and :func:`fused_op`."""
  return x


def _given_tangents(tangents) -> tuple:
  """The tangents of ``(hidden, weight, bias)``, None for symbolic zeros (undifferentiated
  inputs), which stay out of the tangent pass."""
  return tuple(
    None if isinstance(t, jax.custom_derivatives.SymbolicZero) else t for t in tangents[:3]
  )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2))
def stats_op(cfg, complete_stats, sum_slices, hidden, weight, bias, labels, class_weight):
  """Per-row ``(lse, target logit, weighted sum)`` of the two-pass schedule
  (:func:`~xent_jax.fused.kernels.vocab_slice_stats`), differentiable in both modes: its tangent
  is a second blocked pass (:func:`~xent_jax.fused.kernels.vocab_slice_tangents`, from the ``lse``
  of the first), and reverse mode is JAX's transpose of that pass, which recomputes the blocks.
  ``labels`` and ``class_weight`` are constants (their tangents are ignored).

  On one device ``complete_stats`` and ``sum_slices`` are :func:`unchanged`; on a vocabulary
  shard ``complete_stats`` is :func:`fused_op`'s hook of the same name and ``sum_slices`` sums
  the shards' partial tangents ``(d_lse, d_target, d_weighted_sum)``."""
  stats = kernels.vocab_slice_stats(hidden, weight, bias, labels, class_weight, cfg)
  stats = complete_stats(stats)
  return logsumexp_from_stats(stats), stats.target, stats.weighted_sum


def _stats_jvp(cfg, complete_stats, sum_slices, primals, tangents):
  hidden, weight, bias, labels, class_weight = primals
  out = stats_op(cfg, complete_stats, sum_slices, *primals)
  tangents = _given_tangents(tangents)
  if all(t is None for t in tangents):
    return out, tuple(jnp.zeros_like(o) for o in out)
  parts = kernels.vocab_slice_tangents(
    hidden, weight, bias, labels, class_weight, out[0], tangents, cfg
  )
  return out, tuple(sum_slices(parts))


stats_op.defjvp(_stats_jvp, symbolic_zeros=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def head_stats_op(cfg, hidden, weight, bias, labels, betas):
  """An engine head's per-row statistics of ``cap(hidden @ weight.T + bias)``:
  ``(lse, target logit, class sums, E)`` with the class sums of ``cfg.class_fns`` weighted by
  ``betas`` (``[V]`` or None each) and :math:`E = \\sum_c p_c \\log p_c` (zeros unless
  ``cfg.entropy``), each ``[N]``.

  Two passes over the blocks (:func:`~xent_jax.fused.kernels.vocab_slice_stats`, then
  :func:`~xent_jax.fused.kernels.vocab_slice_class_sums`, skipped without class sums or entropy);
  its tangent is a third (:func:`~xent_jax.fused.kernels.vocab_slice_tangents` with the head's
  terms, :math:`\\sum_c (\\beta_c f'(\\log p_c) - p_c B)\\dot x_c` per class sum and
  :math:`\\sum_c p_c(\\log p_c - E)\\dot x_c` for :math:`E`), and reverse mode is its transpose,
  in the loop order of ``cfg.vocab_major``: as :func:`stats_op`, each ``d_weight`` block of a
  bfloat16 head is summed in float32 over all tokens and written once. ``labels`` (valid ids) and
  ``betas`` are constants.
  """
  return _head_stats(cfg, hidden, weight, bias, labels, betas, slopes=False)[0]


def _head_stats(cfg, hidden, weight, bias, labels, betas, *, slopes):
  """``(outputs of head_stats_op, (slope totals, E or None))``."""
  stats = kernels.vocab_slice_stats(hidden, weight, bias, labels, None, cfg)
  lse = logsumexp_from_stats(stats)
  sums, totals, mean = kernels.vocab_slice_class_sums(
    hidden, weight, bias, lse, betas, cfg, slopes=slopes
  )
  mean_out = jnp.zeros_like(lse) if mean is None else mean
  return (lse, stats.target, sums, mean_out), (totals, mean)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _head_stats_with_slopes(cfg, hidden, weight, bias, labels, betas):
  """:func:`_head_stats` with the slope totals, as one call of its own (as :func:`_stats_jvp`
  calls :func:`stats_op`): written inline in :func:`_head_stats_jvp`, the compiled backward pass
  would keep the tangent pass's per-block label masks and float32 weight blocks for every block,
  ``[V, N]`` and ``[V, D]`` arrays. Its own derivatives (second order) are plain autodiff of the
  passes."""
  return _head_stats(cfg, hidden, weight, bias, labels, betas, slopes=True)


@_head_stats_with_slopes.defjvp
def _head_stats_with_slopes_jvp(cfg, primals, tangents):
  return jax.jvp(functools.partial(_head_stats, cfg, slopes=True), primals, tangents)


def _head_stats_jvp(cfg, primals, tangents):
  hidden, weight, bias, labels, betas = primals
  out, (totals, mean) = _head_stats_with_slopes(cfg, *primals)
  tangents = _given_tangents(tangents)
  if all(t is None for t in tangents):
    return out, jax.tree.map(jnp.zeros_like, out)
  d_lse, d_target, _, *d_head = kernels.vocab_slice_tangents(
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
  complete_stats: Callable[[BlockStats], BlockStats] = unchanged,
  sum_loss: Callable[[jax.Array], jax.Array] = unchanged,
  sum_grads: Callable[[tuple], tuple] = unchanged,
  tangent_axes=None,
):
  """The summed row losses, with gradients for ``hidden``, ``weight`` and ``bias`` computed in
  the forward pass (:func:`xent_jax.fused.forward_grads.sum_with_gradients`); undifferentiated, only
  the statistics (one matmul).

  On one device the defaults apply. On a vocabulary shard (:mod:`xent_jax.parallel.logits`)
  ``complete_stats`` completes each row's statistics over the shards, ``sum_loss`` and
  ``sum_grads`` sum the shards' parts of the loss and of ``(d_hidden, d_weight, d_bias)`` to
  their inputs' types, and ``tangent_axes`` is
  :func:`~xent_jax.fused.forward_grads.sum_with_gradients`'s.
  """

  def value(hidden, weight, bias, labels, class_weight, rows, total_weight):
    stats = kernels.vocab_slice_stats(hidden, weight, bias, labels, class_weight, cfg)
    stats = complete_stats(stats)
    lse = logsumexp_from_stats(stats)
    loss = row_loss(lcfg, total_weight, lse, stats.target, stats.weighted_sum, rows)
    return sum_loss(jnp.sum(loss))

  def in_dtypes(hidden, weight, bias, labels, class_weight, rows, total_weight):
    per_row = functools.partial(row_loss, lcfg, total_weight)
    loss, _, *grads = kernels.fused_vocab_slice(
      hidden, weight, bias, labels, class_weight, per_row, rows, cfg, complete_stats
    )
    d_hidden, d_weight, d_bias = sum_grads(tuple(grads))
    # Stored in the inputs' dtypes: the backward pass only scales them.
    return sum_loss(loss), (
      d_hidden.astype(hidden.dtype),
      d_weight.astype(weight.dtype),
      None if bias is None else d_bias.astype(bias.dtype),
    )

  args = (hidden, weight, bias, labels, class_weight, rows, total_weight)
  return forward_grads.sum_with_gradients(
    upcast_on(UPCAST_PLATFORMS, in_dtypes),
    *args,
    num_differentiable=3,
    value=value,
    tangent_axes=tangent_axes,
  )


# Where the one-pass schedule casts half-precision operands to float32 before its blocks.
# XLA:CPU has no bfloat16 matrix product: it converts both operands inside every product, and a
# block makes three (logits, d_hidden, d_weight), each converting the whole [V, D] weight again.
# One cast up front makes the head 0.90x the naive head's time instead of 1.20x (bfloat16,
# 4096 x 512 x 32768, AMD EPYC; experiments/results/amd_epyc_f25m1/probe_bf16_upcast.md). GPUs
# and TPUs multiply bfloat16 natively and keep the inputs' dtypes.
UPCAST_PLATFORMS: tuple[str, ...] = ("cpu",)


def upcast_on(platforms: tuple[str, ...], forward: Callable) -> Callable:
  """``forward(hidden, weight, bias, *rest) -> (total, (d_hidden, d_weight, d_bias))``, run on
  float32 copies of half-precision ``hidden``, ``weight`` and ``bias`` when the program is lowered
  for one of ``platforms`` and on the inputs as they come elsewhere.

  The choice follows the platform the program is compiled for (``jax.lax.platform_dependent``),
  not the host's default backend, so an ahead-of-time TPU compile on a CPU host keeps bfloat16
  blocks. The gradients come back in the inputs' dtypes either way; the float32 branch rounds
  them once at the end instead of rounding each block's logit gradients to the operands' dtype
  before its products, so it is the more accurate of the two (both within 1e-2 of the float64
  gradient's largest entry). The copies cost ``[N, D]`` and ``[V, D]`` float32, no more than the
  one-pass schedule's float32 ``d_hidden`` and ``d_weight`` accumulators.
  """

  def upcast(hidden, weight, bias, *rest):
    f32 = lambda x: None if x is None else x.astype(inputs.compute_dtype(x.dtype))
    total, grads = forward(f32(hidden), f32(weight), f32(bias), *rest)
    dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    return total, tuple(None if g is None else g.astype(t) for g, t in zip(grads, dtypes))

  def chosen(hidden, weight, bias, *rest):
    operands = [x for x in (hidden, weight, bias) if x is not None]
    half = any(inputs.compute_dtype(x.dtype) != x.dtype for x in operands)
    if not platforms or not half:
      return forward(hidden, weight, bias, *rest)
    branches = dict.fromkeys(platforms, upcast)
    return jax.lax.platform_dependent(hidden, weight, bias, *rest, default=forward, **branches)

  return chosen
