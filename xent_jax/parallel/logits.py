r"""Vocabulary-parallel cross-entropy (and any engine head) of logits split over a device mesh.

The class (vocabulary) axis is split over one mesh axis, optionally with the batch split over
another. No device ever holds a whole row of logits: shard :math:`s` of the vocabulary axis holds
classes :math:`[s V_s, (s+1) V_s)` and each row's statistics are combined with collectives over
that axis,

.. math::
   m_i = \operatorname{pmax}_s \max_{c \in s} x_{ic}, \qquad
   \mathrm{lse}_i = m_i + \log \operatorname{psum}_s \sum_{c \in s} e^{x_{ic} - m_i}, \qquad
   x_{iy_i} = \operatorname{psum}_s [y_i \in s]\, x_{iy_i},

plus :math:`\operatorname{psum}_s \sum_{c \in s} w_c x_{ic}` when labels are smoothed, after
which the per-row loss is the head (for cross-entropy
:func:`xent_jax.losses.cross_entropy.cross_entropy_head`) over the **global** class count
:math:`K = V_s\,|\text{vocab}|`. Each shard runs the one front end,
:func:`xent_jax.core.frontend.head_loss`, with ``vocab_axis`` and ``data_axis``. Megatron-LM's
``_VocabParallelCrossEntropy`` scales its smoothing by the vocabulary size of the local partition
and averages the log-probabilities over that partition only, so its smoothed loss changes with the
tensor-parallel degree; here the loss is the single-device one on any number of shards.

Backward passes are shard-local and keep only per-row residuals: the gradient on the shard that
owns class :math:`c` is :math:`s_i p_{ic} - \mathrm{off}\,w_c - (\mathrm{on}-\mathrm{off})\,w_{y_i}
[c = y_i]`, recomputed from the shard's logits.
"""

import functools
from collections.abc import Hashable
from typing import Unpack

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from xent_jax.core import checks, heads
from xent_jax.core.deprecation import renamed_keyword
from xent_jax.core.frontend import head_loss
from xent_jax.core.options import CrossEntropyOptionKwargs, LossOptions, takes_options
from xent_jax.losses.cross_entropy import cross_entropy_head
from xent_jax.parallel.mesh import LossArrays, MeshLayout, layout_arrays_options, sharded_loss


@renamed_keyword("weight", "class_weight")
@takes_options(CrossEntropyOptionKwargs)
def vocab_parallel_cross_entropy_local(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  vocab_axis: Hashable = "vocab",
  data_axis: Hashable | None = None,
  class_weight: jax.typing.ArrayLike | None = None,
  where: jax.typing.ArrayLike | None = None,
  return_lse: bool = False,
  **options: Unpack[CrossEntropyOptionKwargs],
) -> jax.Array | tuple[jax.Array, jax.Array]:
  r"""Cross-entropy of one vocabulary shard of the logits, to call inside your own ``shard_map``.

  Shard :math:`s` of mesh axis ``vocab_axis`` holds the logits of classes
  :math:`[s V_s, (s+1) V_s)`; with :math:`K = V_s\,|\text{vocab}|` the result is the
  single-device :func:`xent_jax.cross_entropy` of the full rows,

  .. math::
     \ell_i = \sum_{c<K} w_c q_{ic}(\mathrm{lse}_i - x_{ic})
       \;[-\textstyle\sum_c w_c q_{ic}\log q_{ic}]_{\text{t5x}} + z\,\omega_i\,\mathrm{lse}_i^2,

  with :math:`\mathrm{lse}_i`, :math:`x_{iy_i}` and :math:`\sum_c w_c x_{ic}` combined over shards
  by ``pmax``/``psum`` (module docstring) and the smoothing spread over the global :math:`K`.
  Identical on every shard of ``vocab_axis``. The backward pass is shard-local. Call it under
  ``jax.shard_map`` with its default ``check_vma=True`` (the backward pass relies on JAX's
  varying-axes types to hand it the per-row cotangent unsplit).

  Args:
    logits: ``[..., V_s]`` this shard's logits, classes last.
    labels: ``[...]`` global integer class ids (the same on every vocabulary shard), or
      ``[..., V_s]`` this shard's slice of float target probabilities (smoothed over the global
      :math:`K`; their rows count with weight 1, and they get gradients).
    vocab_axis: the mesh axis the classes are split over.
    data_axis: the mesh axis (or tuple of axes) the rows are split over, or None. 'sum' and
      'mean' then reduce over the global batch (a ``psum``); with None they reduce over this
      shard's rows.
    class_weight: ``[V_s]`` this shard's slice of the class weights (constants), or None.
    ignore_index: labels equal to it count for nothing; None: none ignored. Other labels outside
      ``[0, K)`` give a NaN loss.
    reduction: 'none' (``[...]``), 'sum' or 'mean' (over the summed example weights).
    label_smoothing: :math:`\epsilon \in [0, 1]`, spread over the global :math:`K` classes.
    smoothing: 'uniform' or 't5x', as in :func:`xent_jax.cross_entropy`.
    z_loss: :math:`z \ge 0`.
    logit_softcap: :math:`c > 0` for :math:`c\tanh(x/c)`, or None.
    where: bool mask broadcastable to ``labels``' shape; False rows count for nothing.
    return_lse: also return the per-row ``lse`` ``[...]``.

  Returns:
    The reduced loss (float32; float64 for float64 logits), and with ``return_lse`` the pair
    ``(loss, lse)``.

  Example:
    >>> # 8 devices; on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count=8
    >>> import functools, jax, jax.numpy as jnp, xent_jax
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> logits_NxV = jax.random.normal(jax.random.key(0), (4, 16))
    >>> labels_N = jnp.array([0, 5, 9, 15])
    >>> mesh = jax.make_mesh((8,), ("vocab",))
    >>> loss_fn = functools.partial(xent_jax.vocab_parallel_cross_entropy_local, vocab_axis="vocab")
    >>> specs = (P(None, "vocab"), P())  # place the arrays as the specs say (Explicit mesh axes)
    >>> arrays = (logits_NxV, labels_N)
    >>> placed = [jax.device_put(x, NamedSharding(mesh, s)) for x, s in zip(arrays, specs)]
    >>> sharded = jax.shard_map(loss_fn, mesh=mesh, in_specs=specs, out_specs=P())
    >>> loss = jax.jit(sharded)(*placed)  # one program (eagerly, each op would run per device)
    >>> print(f"{float(loss):.4f} {float(xent_jax.cross_entropy(logits_NxV, labels_N)):.4f}")
    2.3663 2.3663

  References:
    Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
    Parallelism", 2019 (vocabulary-parallel cross-entropy).
  """
  fn = "vocab_parallel_cross_entropy_local"
  options = LossOptions.checked(fn, **options)
  checks.check_floating(fn, "logits", logits)
  if jnp.ndim(logits) < 1:
    raise ValueError(f"{fn}: `logits` must have shape [..., V_shard], got a scalar.")
  return shard_head_loss(
    fn,
    cross_entropy_head_of(options),
    options,
    logits,
    labels,
    vocab_axis=vocab_axis,
    data_axis=data_axis,
    class_weight=class_weight,
    where=where,
    return_lse=return_lse,
  )


def cross_entropy_head_of(options: LossOptions) -> heads.Head:
  """Cross-entropy's head for ``options`` (its smoothing convention and z-loss)."""
  return cross_entropy_head(options.smoothing, options.z_loss)


def shard_head_loss(
  fn, head, options, logits, labels, *, vocab_axis, data_axis, class_weight, where, return_lse
):
  """One vocabulary shard's loss of ``head``: :func:`xent_jax.core.frontend.head_loss` on the
  shard, with ``return_lse`` the pair ``(loss, lse)``."""
  loss, stats = head_loss(
    fn,
    head,
    logits,
    labels,
    options,
    class_weight=class_weight,
    where=where,
    vocab_axis=vocab_axis,
    data_axis=data_axis,
  )
  return (loss, stats.lse) if return_lse else loss


@renamed_keyword("weight", "class_weight")
@takes_options(CrossEntropyOptionKwargs)
def vocab_parallel_cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  mesh: Mesh,
  vocab_axis: Hashable = "vocab",
  data_axis: Hashable | None = None,
  axis: int = -1,
  class_weight: jax.typing.ArrayLike | None = None,
  where: jax.typing.ArrayLike | None = None,
  return_lse: bool = False,
  **options: Unpack[CrossEntropyOptionKwargs],
) -> jax.Array | tuple[jax.Array, jax.Array]:
  r""":func:`xent_jax.cross_entropy` with the classes split over a mesh axis.

  Takes global arrays, placed anywhere; lays the logits out as ``P(data_axis, ..., vocab_axis)``
  on ``mesh`` (each device holds ``[B/|data|, ..., V/|vocab|]``) and runs
  :func:`vocab_parallel_cross_entropy_local` under ``jax.shard_map``:

  .. math::
     \mathrm{lse}_i = m_i + \log \operatorname{psum}_s \sum_{c \in s} e^{x_{ic} - m_i},\quad
     m_i = \operatorname{pmax}_s \max_{c \in s} x_{ic},\qquad
     \ell_i = \sum_{c<K} w_c q_{ic}(\mathrm{lse}_i - x_{ic})
       \;[-\textstyle\sum_c w_c q_{ic}\log q_{ic}]_{\text{t5x}} + z\,\omega_i\,\mathrm{lse}_i^2,

  the smoothing spread over the global class count :math:`K` (unlike Megatron-LM, whose smoothing
  uses the local partition's size). Values and gradients equal the single-device function.

  Args:
    logits: ``[..., V, ...]`` float logits, classes on ``axis``.
    labels: integer class ids, ``logits.shape`` without ``axis``; or float target
      probabilities of ``logits.shape``, split over the classes like the logits.
    mesh: a ``jax.sharding.Mesh`` (Explicit axes, as ``jax.make_mesh`` builds, or Auto). Inside
      ``jax.set_mesh(mesh)`` the inputs are resharded on it; outside any mesh context an Explicit
      mesh is used through its Auto twin, so the loss and ``jax.grad`` of it also run eagerly.
    vocab_axis: the mesh axis the classes are split over; ``V`` must be divisible by its size.
    data_axis: the mesh axis the first batch dimension is split over, or a tuple of axes (split
      over all of them, major first, as in a ``PartitionSpec`` entry); the dimension must be
      divisible by their total size. None replicates the rows.
    axis: the class axis of ``logits``.
    class_weight: ``[V]`` class weights (constants), split like the classes; or None.
    ignore_index, reduction, label_smoothing, smoothing, z_loss, logit_softcap, where, return_lse:
      as in :func:`xent_jax.cross_entropy`.

  Returns:
    The reduced loss (for 'none' of the batch shape, split over ``data_axis``), and with
    ``return_lse`` the pair ``(loss, lse)``.

  Example::

    mesh = jax.make_mesh((2, 4), ("data", "vocab"))
    loss = xent_jax.vocab_parallel_cross_entropy(
        logits_BxV, labels_B, mesh=mesh, data_axis="data", label_smoothing=0.1)

  References:
    Shoeybi et al., "Megatron-LM", 2019; Szegedy et al., "Rethinking the Inception
    Architecture", 2016 (label smoothing); Chowdhery et al., "PaLM", 2022 (z-loss).
  """
  fn = "vocab_parallel_cross_entropy"
  options = LossOptions.checked(fn, **options)
  layout = MeshLayout(mesh, vocab_axis, data_axis, axis)
  arrays = LossArrays(logits, labels, class_weight, where)
  return _mesh_loss(fn, cross_entropy_head_of(options), options, layout, arrays, return_lse)


def vocab_parallel_head_loss(
  fn: str, head: heads.Head, logits, labels, *, mesh: Mesh, return_lse: bool = False, **kwargs
):
  """Any engine head (see :mod:`xent_jax.core.heads`) with the classes split over a mesh axis:
  :func:`vocab_parallel_cross_entropy`'s arguments (``kwargs``: the layout's ``vocab_axis``,
  ``data_axis``, ``axis``, the arrays ``class_weight`` and ``where``, and the options of
  :class:`~xent_jax.core.options.OptionKwargs`) and rules, integer or probability labels,
  uniform smoothing, no soft cap. ``get_loss(name).vocab_parallel`` calls it."""
  layout, arrays, options = layout_arrays_options(fn, mesh, logits, labels, kwargs)
  return _mesh_loss(fn, head, options, layout, arrays, return_lse)


def _mesh_loss(fn, head, options: LossOptions, layout: MeshLayout, arrays: LossArrays, return_lse):
  """Runs :func:`shard_head_loss` of ``head`` on ``layout``'s mesh
  (:func:`xent_jax.parallel.mesh.sharded_loss`)."""
  local = functools.partial(
    shard_head_loss,
    fn,
    head,
    options,
    vocab_axis=layout.vocab_axis,
    data_axis=layout.data_axis,
    return_lse=return_lse,
  )
  return sharded_loss(fn, local, layout, arrays, options.reduction, return_lse)
