r"""How the fused kernels cut ``[N, V]`` into blocks: default sizes, the one-pass rule, loop order.

:func:`plan_schedule` chooses, from the shapes ``[N, D] x [V, D]`` and the dtypes, between the
one-pass schedule (gradients in the forward pass, a float32 ``[V, D]`` accumulator) and the
two-pass one (statistics, then recomputed blocks) and, for the latter, the backward pass's loop
order; :func:`one_pass_fits` is the one rule for when that accumulator is small, shared with the
rematerialising schedule of every other loss (:mod:`xent_jax.fused.chunked`). Every default block
size comes from :mod:`xent_jax.fused.tuning` (a table per device, an optional autotuner).
:class:`BlockConfig` is the static description of a block that the kernels take.
"""

import dataclasses
from collections.abc import Hashable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from xent_jax.core import engine
from xent_jax.fused import tuning
from xent_jax.fused.tuning import BLOCK_ELEMENTS, DefaultBlocks, default_blocks

# The weight layouts the kernels take ('vd': [V, D], 'dv': [D, V]).
WEIGHT_LAYOUTS = ("vd", "dv")
# The one-pass schedule's float32 [V, D] weight-gradient accumulator may be at most 1/8 of the
# [N, V] float32 logits (8 * D <= N) or one block (V * D <= BLOCK_ELEMENTS), see one_pass_fits.
_ONE_PASS_RATIO = 8


def class_dim(weight_layout: str) -> int:
  """The dimension of ``weight`` that holds the classes: 0 for 'vd' (``[V, D]``), 1 for 'dv'."""
  return 0 if weight_layout == "vd" else 1


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
    vocab_major: loop order of the tangent pass and so of the backward pass (vocabulary chunks
      outermost).
    varying_axes: inside ``shard_map(check_vma=True)``, the mesh axes ``hidden`` or ``weight``
      vary over: the type of every accumulator of blocks (partial statistics, gradients).
    row_axes: the mesh axes ``hidden`` varies over: the type of the complete per-row values
      (after ``complete_stats``) that the one-pass kernel accumulates.
    class_fns: per-class functions :math:`f_k(\\log p)` of an engine head's class sums
      :math:`\\sum_c \\beta_c f_k(\\log p_c)`.
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
  def class_dim(self) -> int:
    """The dimension of ``weight`` that holds the classes (:func:`class_dim`)."""
    return class_dim(self.weight_layout)

  @property
  def num_tangents(self) -> int:
    """Per-row tangents of the tangent pass: ``(d_lse, d_target, d_weighted_sum)``, then one per
    class sum, then the entropy's."""
    return 3 + len(self.class_fns) + self.entropy


def one_pass_fits(rows: int, features: int, num_classes: int) -> bool:
  """Whether a one-pass schedule's float32 ``[V, D]`` weight-gradient accumulator is small: at
  most 1/8 of the ``[N, V]`` float32 logits it replaces (:math:`4VD \\le 4NV/8`, i.e.
  :math:`8D \\le N`) or no larger than one default block (:math:`VD \\le 2^{24}`). At language-model
  heads (Llama-3-8B: :math:`D = N/2` at ``N = 8192``) the accumulator alone would be a large part
  of the naive path's memory."""
  return _ONE_PASS_RATIO * features <= rows or num_classes * features <= BLOCK_ELEMENTS


def check_chunk_size(fn: str, name: str, size) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``size`` is a positive int."""
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
    raise ValueError(f"{fn}: `{name}` must be a positive int or None, got {size!r}.")


def resolve_chunk(fn: str, name: str, size, total: int, default: int) -> int:
  """The chunk size ``size`` (checked; ``default`` when None), clipped to ``[1, total]``."""
  if size is None:
    size = default
  else:
    check_chunk_size(fn, name, size)
  return max(1, min(int(size), total))


def _rows_per_block(elements: int, num_classes: int) -> int:
  """The power of two giving a ``[rows, num_classes]`` block of at most about ``elements``."""
  return 2 ** int(np.floor(np.log2(max(elements // max(num_classes, 1), 1))))


def default_chunk(num_classes: int, rows: int) -> int:
  """Rows per whole-vocabulary token chunk when none is given: a ``[chunk, V]`` block of about
  :data:`BLOCK_ELEMENTS` elements, at most ``rows``."""
  return max(1, min(_rows_per_block(BLOCK_ELEMENTS, num_classes), rows))


def default_token_chunk(num_classes: int, blocks: DefaultBlocks, *, one_pass: bool) -> int:
  """Rows per token chunk of the blocked kernels when none is given: a power of two with a
  ``[chunk, num_classes]`` block of about ``blocks``' elements for the schedule, between 128 and
  ``blocks.max_token_chunk``."""
  elements = blocks.one_pass_elements if one_pass else blocks.two_pass_elements
  rows = _rows_per_block(elements, num_classes)
  return int(np.clip(rows, tuning.MIN_TOKEN_CHUNK, blocks.max_token_chunk))


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
  for size in range(tuning.VOCAB_MAJOR_CHUNK, tuning.VOCAB_MAJOR_CHUNK // 2 - 1, -1):
    if num_classes % size == 0:
      return size
  return tuning.VOCAB_MAJOR_CHUNK


def _vocab_major(n: int, d: int, v: int, block: int, hidden_dtype, weight_dtype) -> bool:
  """Whether the vocabulary-major backward keeps fewer float32 elements besides the gradients
  than the token-major one (see :func:`plan_schedule`)."""
  acc = jnp.promote_types(jnp.promote_types(hidden_dtype, weight_dtype), jnp.float32)
  narrower = lambda dtype: jnp.dtype(dtype).itemsize < jnp.dtype(acc).itemsize
  token_extra = v * d if narrower(weight_dtype) else 0
  vocab_extra = block * d + (n * d if narrower(hidden_dtype) else 0)
  return token_extra > vocab_extra


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
    ``return_lse``), no ``vocab_chunk_size`` is given, and the accumulator is small
    (:func:`one_pass_fits`).
  * Otherwise **two passes** (four matmuls: statistics, then recomputed blocks), whose backward
    keeps the fewer float32 elements besides the gradients themselves. Token-major keeps a
    ``[V, D]`` accumulator, extra when the weight is narrower than float32; vocabulary-major keeps
    a ``[C, D]`` block and an ``[N, D]`` accumulator, extra when ``hidden`` is narrower. So
    bfloat16 heads with :math:`V > N + C` go vocabulary-major (each ``d_weight`` block finished in
    float32 and written once in the weight's dtype), float32 ones token-major (the accumulator is
    the gradient). Vocabulary-major blocks default to about :math:`C = 4096` classes
    (:func:`vocab_major_chunk`).

  Explicit chunk sizes are kept (clipped to the axis). Default blocks depend on ``platform``
  and the device kind (:func:`xent_jax.fused.tuning.default_blocks`; None: JAX's default
  backend); with ``XENT_JAX_AUTOTUNE=1`` and no explicit size, the pair is the autotuner's
  (:func:`xent_jax.fused.tuning.tuned_chunks`, cached per device and shape bucket). The table:
  on CPU about ``2**24`` elements, the token-major loop taking all classes at once; on GPU two
  passes take ``[8192, C]`` blocks (about ``2**25``, :math:`C` from :func:`vocab_major_chunk`) in
  both loop orders, one pass the CPU's (:func:`default_token_chunk`).
  """
  blocks = default_blocks(platform)
  one_pass = linear_reduction and vocab_chunk_size is None and one_pass_fits(n, d, v)
  if one_pass:
    vocab_chunk, vocab_major = v, False
  else:
    block = resolve_chunk(fn, "vocab_chunk_size", vocab_chunk_size, v, vocab_major_chunk(v))
    vocab_major = _vocab_major(n, d, v, block, hidden_dtype, weight_dtype)
    token_major_chunk = vocab_major_chunk(v) if blocks.token_major_blocks else v
    vocab_chunk = (
      block
      if vocab_major
      else resolve_chunk(fn, "vocab_chunk_size", vocab_chunk_size, v, token_major_chunk)
    )
  token_chunk = resolve_chunk(
    fn,
    "token_chunk_size",
    token_chunk_size,
    n,
    default_token_chunk(vocab_chunk, blocks, one_pass=one_pass),
  )
  if token_chunk_size is None and vocab_chunk_size is None:
    problem = tuning.Problem(
      n, d, v, str(jnp.dtype(hidden_dtype)), str(jnp.dtype(weight_dtype)), one_pass, vocab_major
    )
    token_chunk, vocab_chunk = tuning.tuned_chunks(
      problem, token_chunk, vocab_chunk, backend=platform
    )
  return Schedule(one_pass, token_chunk, vocab_chunk, vocab_major)
