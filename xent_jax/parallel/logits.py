r"""Vocabulary-parallel cross-entropy over a device mesh (``data x vocab``).

The class (vocabulary) axis is split over one mesh axis, optionally with the batch split over
another. No device ever holds a whole row of logits: shard :math:`s` of the vocabulary axis holds
classes :math:`[s V_s, (s+1) V_s)` and each row's statistics are combined with collectives over
that axis,

.. math::
   m_i = \operatorname{pmax}_s \max_{c \in s} x_{ic}, \qquad
   \mathrm{lse}_i = m_i + \log \operatorname{psum}_s \sum_{c \in s} e^{x_{ic} - m_i}, \qquad
   x_{iy_i} = \operatorname{psum}_s [y_i \in s]\, x_{iy_i},

plus :math:`\operatorname{psum}_s \sum_{c \in s} w_c x_{ic}` when labels are smoothed, after
which the per-row loss is the core's own head
(:func:`xent_jax.losses.cross_entropy.cross_entropy_head`) over the **global** class count
:math:`K = V_s\,|\text{vocab}|`. Megatron-LM's ``_VocabParallelCrossEntropy`` scales its
smoothing by the vocabulary size of the local partition and averages the log-probabilities over
that partition only, so its smoothed loss changes with the tensor-parallel degree; here the loss
is the single-device one on any number of shards (tested on 1, 2, 4 and 8).

Backward passes are shard-local and keep only per-row residuals: the gradient on the shard that
owns class :math:`c` is :math:`s_i p_{ic} - \mathrm{off}\,w_c - (\mathrm{on}-\mathrm{off})\,w_{y_i}
[c = y_i]`, recomputed from the shard's logits (or, for the linear version, from ``hidden`` and
the weight shard, by the blocked kernels of :mod:`xent_jax.fused.kernels`). Only gradients of
replicated inputs need a collective: ``psum`` over the vocabulary axis for ``hidden``, over the
data axis for the weight shard.
"""

import functools
import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xent_jax.core import checks
from xent_jax.core import heads
from xent_jax.core import inputs
from xent_jax.losses import cross_entropy as _ce
from xent_jax.fused import ops as fused_ops
from xent_jax.fused import rows as fused_rows
from xent_jax.fused.blocks import BlockStats
from xent_jax.fused.rows import LinearArrays
from xent_jax.fused.rows import LinearLayout
from xent_jax.fused.schedule import WEIGHT_LAYOUTS
from xent_jax.core.options import LossOptions
from xent_jax.core.reduction import reduce_loss

# --------------------------------------------------------------------------- mesh and checks


def _axis_size(fn: str, mesh: Mesh, name: str, axis_name: Hashable) -> int:
  """The size of mesh axis ``axis_name``; the error names the argument ``name``."""
  if axis_name not in mesh.axis_names:
    raise ValueError(
      f"{fn}: `{name}`={axis_name!r} is not an axis of `mesh`, whose axes are {mesh.axis_names}."
    )
  return mesh.shape[axis_name]


def data_axes(data_axis) -> tuple[Hashable, ...]:
  """``data_axis`` as a tuple of mesh axis names: None gives ``()``, a tuple stays as it is (the
  rows split over several axes, major first, as in a ``PartitionSpec`` entry), a name
  ``(name,)``."""
  if data_axis is None:
    return ()
  return tuple(data_axis) if isinstance(data_axis, tuple) else (data_axis,)


def _mesh_specs(fn, mesh, vocab_axis, data_axis, num_classes, class_name, batch_shape, batch_name):
  """Checks the mesh against the problem and returns the batch part of the partition specs."""
  if not isinstance(mesh, Mesh):
    raise TypeError(f"{fn}: `mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
  vocab_size = _axis_size(fn, mesh, "vocab_axis", vocab_axis)
  if num_classes % vocab_size:
    raise ValueError(
      f"{fn}: the class count of `{class_name}` ({num_classes}) must be divisible by the size "
      f"of `vocab_axis`={vocab_axis!r} ({vocab_size})."
    )
  axes = data_axes(data_axis)
  if not axes:
    return (None,) * len(batch_shape)
  data_size = math.prod(_axis_size(fn, mesh, "data_axis", a) for a in axes)
  if vocab_axis in axes:
    raise ValueError(f"{fn}: `data_axis` and `vocab_axis` must differ, both are {vocab_axis!r}.")
  if len(set(axes)) != len(axes):
    raise ValueError(f"{fn}: `data_axis` names a mesh axis twice: {data_axis!r}.")
  if not batch_shape or batch_shape[0] % data_size:
    raise ValueError(
      f"{fn}: the first batch dimension of `{batch_name}` (batch shape {tuple(batch_shape)}) "
      f"must be divisible by the size of `data_axis`={data_axis!r} ({data_size})."
    )
  return (axes if len(axes) > 1 else axes[0],) + (None,) * (len(batch_shape) - 1)


def _auto_twin(mesh: Mesh) -> Mesh | None:
  """The mesh with Auto axes, when ``mesh`` has Explicit axes and no mesh context is set.

  Outside ``jax.set_mesh`` an Explicit mesh's sharding in the loss's type makes a later eager
  ``jax.grad`` fail to build its seed cotangent ("Please enter your `jit` into a mesh context via
  `jax.set_mesh`"); the same devices with Auto axes carry no sharding in the types.
  """
  explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
  if not explicit or not jax.sharding.get_abstract_mesh().empty:
    return None
  return Mesh(
    mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
  )


def _place(x: jax.Array, mesh: Mesh, spec: PartitionSpec) -> jax.Array:
  """Lays ``x`` out as ``spec`` before ``shard_map``.

  ``shard_map`` reshards inputs itself on Auto mesh axes, but on Explicit axes (what
  ``jax.make_mesh`` builds) it requires them to carry ``spec`` already.
  """
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  used = [
    a
    for entry in spec
    if entry is not None
    for a in (entry if isinstance(entry, tuple) else (entry,))
  ]
  if used and all(types[a] == jax.sharding.AxisType.Explicit for a in used):
    return jax.reshard(x, NamedSharding(mesh, spec))
  return x


def _shard_map(local, mesh, args, specs, out_specs):
  """Runs ``local(args)`` under ``jax.shard_map`` (``check_vma=True``) with every input laid out
  as its spec.

  Within ``jax.set_mesh`` (or on a mesh with Auto axes) it runs on ``mesh`` as given; an Explicit
  mesh outside any mesh context runs on its Auto twin (:func:`_auto_twin`), so the loss also works
  eagerly, under ``jax.grad`` without ``jit``.
  """
  twin = _auto_twin(mesh)
  if twin is not None:
    placed = {
      k: jax.device_put(v, NamedSharding(twin, specs[k])) for k, v in args.items() if v is not None
    }
    mesh = twin
  else:
    placed = {k: _place(v, mesh, specs[k]) for k, v in args.items() if v is not None}
  in_specs = {k: specs[k] for k in placed}
  return jax.shard_map(local, mesh=mesh, in_specs=(in_specs,), out_specs=out_specs)(placed)


# --------------------------------------------------------------------------- shared shard pieces


def reduce_rows(loss, example_weight, reduction: str, data_axis, fn: str):
  """:func:`xent_jax.core.reduction.reduce_loss` over the global batch (rows split on ``data_axis``)."""
  if reduction == "none" or not data_axes(data_axis):
    return reduce_loss(loss, example_weight, reduction, fn=fn)
  total = jax.lax.psum(jnp.sum(loss), data_axis)[None]
  weight = jax.lax.psum(jnp.sum(example_weight.astype(loss.dtype)), data_axis)[None]
  return reduce_loss(total, weight, reduction, fn=fn)


# --------------------------------------------------------------------------- linear kernel glue


def complete_row_stats(stats: BlockStats, vocab_axis: Hashable) -> BlockStats:
  r"""Combines per-shard :class:`xent_jax.fused.blocks.BlockStats` into global ones
  (``pmax``/``psum``).

  .. math::
     m = \operatorname{pmax}_s m_s, \qquad
     \textstyle S = \operatorname{psum}_s S_s e^{m_s - m}, \qquad
     t = \operatorname{psum}_s t_s, \qquad \sigma = \operatorname{psum}_s \sigma_s
  """
  m = jax.lax.pmax(stats.max, vocab_axis)
  safe_m = jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))
  sumexp = jax.lax.psum(stats.sumexp * jnp.exp(stats.max - safe_m), vocab_axis)
  return BlockStats(
    m,
    sumexp,
    jax.lax.psum(stats.target, vocab_axis),
    jax.lax.psum(stats.weighted_sum, vocab_axis),
  )


# The linear version runs under ``shard_map(check_vma=True)``: the kernels type their loop
# accumulators as varying over the mesh axes of ``hidden`` and ``weight`` (BlockConfig's
# varying_axes and row_axes), cotangents of values replicated over an axis arrive whole, and each
# backward pass returns cotangents with its primal's type: ``d hidden`` summed over the
# vocabulary axis, ``d weight``/``d bias`` over the data axes. The one-pass op sums its forward
# pass's gradients itself (``_sum_partial_grads``); in the two-pass op's transposed tangent, JAX
# does: a tangent that meets an operand varying over more axes is cast to vary over them
# (``pvary``), and the transpose of that cast is the ``psum``.


def _psum_each(parts, axis):
  """``psum`` of each array in ``parts`` over ``axis``."""
  return tuple(jax.lax.psum(p, axis) for p in parts)


def _sum_partial_grads(grads, vocab_axis, data_axis):
  """Per-shard gradients to their inputs' types: ``d hidden`` over ``vocab_axis``, the weight
  shard's over the data axes."""
  d_hidden, d_weight, d_bias = grads
  d_hidden = jax.lax.psum(d_hidden, vocab_axis)
  rows = data_axes(data_axis)
  if rows:
    d_weight = jax.lax.psum(d_weight, rows)
    d_bias = None if d_bias is None else jax.lax.psum(d_bias, rows)
  return d_hidden, d_weight, d_bias


# --------------------------------------------------------------------------- public API


def vocab_parallel_cross_entropy_local(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  vocab_axis: Hashable = "vocab",
  data_axis: Hashable | None = None,
  weight: jax.typing.ArrayLike | None = None,
  ignore_index: int | None = -100,
  reduction: str = "mean",
  label_smoothing: float = 0.0,
  smoothing: str = "uniform",
  z_loss: float = 0.0,
  logit_softcap: float | None = None,
  where: jax.typing.ArrayLike | None = None,
  return_lse: bool = False,
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
    weight: ``[V_s]`` this shard's slice of the class weights (constants), or None.
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

  Example::

    mesh = jax.make_mesh((8,), ("vocab",))
    loss_fn = functools.partial(vocab_parallel_cross_entropy_local, vocab_axis="vocab")
    loss = jax.shard_map(loss_fn, mesh=mesh, in_specs=(P(None, "vocab"), P()),
                         out_specs=P())(logits_NxV, labels_N)

  References:
    Shoeybi et al., "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
    Parallelism", 2019 (vocabulary-parallel cross-entropy).
  """
  fn = "vocab_parallel_cross_entropy_local"
  LossOptions.checked(
    fn,
    label_smoothing=label_smoothing,
    smoothing=smoothing,
    z_loss=z_loss,
    logit_softcap=logit_softcap,
    reduction=reduction,
  )
  return _local_loss(
    fn,
    _ce.cross_entropy_head(smoothing, float(z_loss)),
    logits,
    labels,
    vocab_axis=vocab_axis,
    data_axis=data_axis,
    weight=weight,
    ignore_index=ignore_index,
    reduction=reduction,
    label_smoothing=label_smoothing,
    smoothing=smoothing,
    logit_softcap=logit_softcap,
    where=where,
    return_lse=return_lse,
  )


def _local_loss(
  fn,
  head,
  logits,
  labels,
  *,
  vocab_axis,
  data_axis,
  weight,
  ignore_index,
  reduction,
  label_smoothing,
  smoothing,
  logit_softcap,
  where,
  return_lse,
):
  """One vocabulary shard's loss of ``head`` on the row-statistics engine over ``vocab_axis``,
  integer or probability labels (every class sum, the target's mass and the entropy are
  completed over the shards; a head's row term sees only those)."""
  checks.check_floating(fn, "logits", logits)
  logits, labels = jnp.asarray(logits), inputs.as_label_array(fn, labels)
  if logits.ndim < 1:
    raise ValueError(f"{fn}: `logits` must have shape [..., V_shard], got a scalar.")
  integer = inputs.is_integer_labels(fn, labels, logits.shape, -1)
  dtype = inputs.compute_dtype(logits.dtype)
  if weight is not None:
    inputs.check_class_weight(fn, "weight", weight, logits.shape[-1])
    weight = jnp.asarray(weight).astype(dtype)
  num_local = logits.shape[-1]
  num_classes = num_local * jax.lax.axis_size(vocab_axis)
  if integer:
    read = inputs.integer_labels(
      fn, labels, num_classes=num_classes, ignore_index=ignore_index, where=where
    )
    target = heads.smoothed_target(num_classes, label_smoothing, smoothing)
    loss, stats = heads.integer_loss(
      head,
      logits,
      read.safe_labels,
      class_weight=weight,
      on=target.on,
      off=target.off,
      logit_softcap=logit_softcap,
      vocab_axis=vocab_axis,
    )
    loss, lse = heads.mask_rows(loss, read.valid, read.bad), stats.lse
    target_weight, _ = heads.target_weights(weight, read.safe_labels, num_local, dtype, vocab_axis)
    example_weight = jnp.where(read.valid, target_weight, jnp.zeros_like(target_weight))
  else:
    valid = inputs.row_mask(fn, where, logits.shape[:-1])
    eps = float(label_smoothing)
    loss, stats = heads.probability_loss(
      head,
      logits,
      labels,
      smooth=lambda q: heads.smooth_probabilities(q, eps, smoothing, num_classes),
      class_weight=weight,
      logit_softcap=logit_softcap,
      vocab_axis=vocab_axis,
    )
    loss, lse = jnp.where(valid, loss, jnp.zeros_like(loss)), stats.lse
    example_weight = valid.astype(loss.dtype)
  out = reduce_rows(loss, example_weight, reduction, data_axis, fn)
  return (out, lse) if return_lse else out


def vocab_parallel_cross_entropy(
  logits: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  mesh: Mesh,
  vocab_axis: Hashable = "vocab",
  data_axis: Hashable | None = None,
  axis: int = -1,
  weight: jax.typing.ArrayLike | None = None,
  ignore_index: int | None = -100,
  reduction: str = "mean",
  label_smoothing: float = 0.0,
  smoothing: str = "uniform",
  z_loss: float = 0.0,
  logit_softcap: float | None = None,
  where: jax.typing.ArrayLike | None = None,
  return_lse: bool = False,
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
    weight: ``[V]`` class weights (constants), split like the classes; or None.
    ignore_index, reduction, label_smoothing, smoothing, z_loss, logit_softcap, where,
      return_lse: as in :func:`xent_jax.cross_entropy`.

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
  LossOptions.checked(
    fn,
    label_smoothing=label_smoothing,
    smoothing=smoothing,
    z_loss=z_loss,
    logit_softcap=logit_softcap,
    reduction=reduction,
  )
  return _global_loss(
    fn,
    _ce.cross_entropy_head(smoothing, float(z_loss)),
    logits,
    labels,
    mesh=mesh,
    vocab_axis=vocab_axis,
    data_axis=data_axis,
    axis=axis,
    weight=weight,
    ignore_index=ignore_index,
    reduction=reduction,
    label_smoothing=label_smoothing,
    smoothing=smoothing,
    logit_softcap=logit_softcap,
    where=where,
    return_lse=return_lse,
  )


def vocab_parallel_head_loss(
  fn: str,
  head: heads.Head,
  logits,
  labels,
  *,
  mesh: Mesh,
  vocab_axis: Hashable = "vocab",
  data_axis: Hashable | None = None,
  axis: int = -1,
  weight=None,
  ignore_index=-100,
  reduction: str = "mean",
  label_smoothing: float = 0.0,
  where=None,
  return_lse: bool = False,
):
  """Any engine head (see :mod:`xent_jax.core.heads`) with the classes split over ``vocab_axis``:
  :func:`vocab_parallel_cross_entropy`'s arguments and rules, integer or probability labels,
  uniform smoothing.
  ``get_loss(name).vocab_parallel`` calls it."""
  checks.check_in_range(fn, "label_smoothing", label_smoothing, 0.0, 1.0)
  checks.check_reduction(fn, reduction)
  return _global_loss(
    fn,
    head,
    logits,
    labels,
    mesh=mesh,
    vocab_axis=vocab_axis,
    data_axis=data_axis,
    axis=axis,
    weight=weight,
    ignore_index=ignore_index,
    reduction=reduction,
    label_smoothing=label_smoothing,
    smoothing="uniform",
    logit_softcap=None,
    where=where,
    return_lse=return_lse,
  )


def _global_loss(
  fn,
  head,
  logits,
  labels,
  *,
  mesh,
  vocab_axis,
  data_axis,
  axis,
  weight,
  ignore_index,
  reduction,
  label_smoothing,
  smoothing,
  logit_softcap,
  where,
  return_lse,
):
  """Runs :func:`_local_loss` of ``head`` on ``mesh`` (:func:`sharded_loss`)."""
  local = functools.partial(
    _local_loss,
    fn,
    head,
    vocab_axis=vocab_axis,
    data_axis=data_axis,
    ignore_index=ignore_index,
    reduction=reduction,
    label_smoothing=label_smoothing,
    smoothing=smoothing,
    logit_softcap=logit_softcap,
    return_lse=return_lse,
  )
  return sharded_loss(
    fn,
    local,
    logits,
    labels,
    mesh=mesh,
    vocab_axis=vocab_axis,
    data_axis=data_axis,
    axis=axis,
    weight=weight,
    reduction=reduction,
    where=where,
    return_lse=return_lse,
  )


def sharded_loss(
  fn,
  shard_loss,
  logits,
  labels,
  *,
  mesh,
  vocab_axis,
  data_axis,
  axis,
  weight,
  reduction,
  where,
  return_lse=False,
):
  """Checks the global arrays against ``mesh``, lays them out and runs ``shard_loss`` in
  ``shard_map``.

  ``logits`` go as ``P(data_axis, ..., vocab_axis)`` (classes moved last), integer ``labels`` and
  ``where`` as ``P(data_axis, ...)``, probability ``labels`` like the logits, ``weight`` as
  ``P(vocab_axis)``. ``shard_loss(logits, labels, weight=..., where=...)`` gets one device's
  arrays (``weight``/``where`` None when not given) and returns the loss reduced over the global
  batch (``[...]`` rows for 'none'), with ``return_lse`` the pair ``(loss, lse [...])``.
  """
  checks.check_floating(fn, "logits", logits)
  logits, labels = jnp.asarray(logits), inputs.as_label_array(fn, labels)
  class_axis = checks.canonical_axis(fn, axis, logits.ndim)
  integer = inputs.is_integer_labels(fn, labels, logits.shape, class_axis)
  if not integer:  # probabilities: classes on `axis` too
    labels = jnp.moveaxis(labels, class_axis, -1)
  logits = jnp.moveaxis(logits, class_axis, -1)
  batch_shape = logits.shape[:-1]
  if weight is not None:
    inputs.check_class_weight(fn, "weight", weight, logits.shape[-1])
  rows = _mesh_specs(
    fn, mesh, vocab_axis, data_axis, logits.shape[-1], "logits", batch_shape, "logits"
  )
  if where is not None:
    where = inputs.row_mask(fn, where, batch_shape)
  row_spec = PartitionSpec(*rows)
  args = {"logits": logits, "labels": labels, "weight": weight, "where": where}
  specs = {
    "logits": PartitionSpec(*rows, vocab_axis),
    "labels": row_spec if integer else PartitionSpec(*rows, vocab_axis),
    "weight": PartitionSpec(vocab_axis),
    "where": row_spec,
  }

  def local(a):
    return shard_loss(a["logits"], a["labels"], weight=a.get("weight"), where=a.get("where"))

  loss_spec = row_spec if reduction == "none" else PartitionSpec()
  return _shard_map(local, mesh, args, specs, (loss_spec, row_spec) if return_lse else loss_spec)


def _linear_local(
  hidden: jax.typing.ArrayLike,
  weight: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  vocab_axis: Hashable = "vocab",
  data_axis: Hashable | None = None,
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
  r""":func:`xent_jax.linear_cross_entropy` on one vocabulary shard of ``weight``.

  Runs inside ``shard_map(check_vma=True)`` (see the note above :func:`_sum_partial_grads`): the
  single-device front end (:func:`xent_jax.fused.rows.prepare_rows`) reads the arguments against the
  global :math:`K = V_s\,|\text{vocab}|` classes, each shard runs the blocked kernels of
  :mod:`xent_jax.fused.kernels` on its classes, relabelled ``0..V_s-1``, and
  :func:`complete_row_stats` combines the per-row statistics before the core's per-row formula
  (:func:`xent_jax.fused.ops.row_loss`). Arguments are this device's shards
  (``hidden`` ``[..., D]``, ``weight`` ``[V_s, D]`` or ``[D, V_s]``, ``bias``/``class_weight``
  ``[V_s]``); options as in :func:`xent_jax.linear_cross_entropy`, chunk sizes per device.
  """
  fn = "vocab_parallel_linear_cross_entropy"
  rows_axes = data_axes(data_axis)
  options = LossOptions.checked(
    fn,
    reduction=reduction,
    ignore_index=ignore_index,
    label_smoothing=label_smoothing,
    smoothing=smoothing,
    z_loss=z_loss,
    logit_softcap=logit_softcap,
  )
  rows = fused_rows.prepare_rows(
    fn,
    LinearArrays(hidden, weight, labels, bias, class_weight, where),
    options,
    LinearLayout(weight_layout, token_chunk_size, vocab_chunk_size),
    return_lse=return_lse,
    vocab_axis=vocab_axis,
    row_axes=rows_axes,
  )
  args = (rows.hidden_NxD, rows.weight, rows.bias, rows.labels_N, rows.class_weight)
  complete_stats = functools.partial(complete_row_stats, vocab_axis=vocab_axis)
  sum_grads = functools.partial(_sum_partial_grads, vocab_axis=vocab_axis, data_axis=data_axis)
  if rows.schedule.one_pass:
    # Sum and mean are linear in the per-row losses: d(reduced)/d(loss_i) is known up front.
    total_weight_1 = jnp.sum(rows.example_weight_N, keepdims=True)
    if rows_axes:
      total_weight_1 = jax.lax.psum(total_weight_1, rows_axes)
    row_scale = jax.grad(lambda loss_1: reduce_loss(loss_1, total_weight_1, reduction, fn=fn))(
      jnp.zeros((1,), rows.total_weight.dtype)
    )
    row_scale_N = jnp.broadcast_to(row_scale, rows.valid_N.shape)
    rows_of = data_axes(data_axis)
    return fused_ops.fused_op(
      rows.block,
      rows.loss,
      *args,
      rows.kernel_rows(row_scale_N),
      rows.total_weight,
      complete_stats=complete_stats,
      sum_loss=lambda loss: jax.lax.psum(loss, rows_of) if rows_of else loss,
      sum_grads=sum_grads,
      # <d_hidden, hidden'> sums this shard's rows, <d_weight, weight'> its classes.
      tangent_axes=(rows_of, (vocab_axis,), (vocab_axis,)),
    )
  # The tangents of the shards' partial statistics sum over the vocabulary axis.
  sum_slices = functools.partial(_psum_each, axis=vocab_axis)
  lse_N, target_N, weighted_sum_N = fused_ops.stats_op(
    rows.block, complete_stats, sum_slices, *args
  )
  loss_N = fused_ops.row_loss(
    rows.loss, rows.total_weight, lse_N, target_N, weighted_sum_N, rows.kernel_rows()
  )
  batch_shape = rows.batch_shape
  loss = reduce_rows(
    loss_N.reshape(batch_shape),
    rows.example_weight_N.reshape(batch_shape),
    reduction,
    data_axis,
    fn,
  )
  return (loss, lse_N.reshape(batch_shape)) if return_lse else loss


def vocab_parallel_linear_cross_entropy(
  hidden: jax.typing.ArrayLike,
  weight: jax.typing.ArrayLike,
  labels: jax.typing.ArrayLike,
  *,
  mesh: Mesh,
  vocab_axis: Hashable = "vocab",
  data_axis: Hashable | None = None,
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
  r""":func:`xent_jax.linear_cross_entropy` with ``weight`` split over the classes on a mesh.

  Lays ``weight`` (and ``bias``, ``class_weight``) out split on the vocabulary over
  ``vocab_axis`` and ``hidden``/``labels`` split on their first batch dimension over
  ``data_axis`` (a 2-D ``data x vocab`` mesh), then runs the blocked kernels of
  :func:`xent_jax.linear_cross_entropy` on each shard under ``jax.shard_map``, the per-row
  statistics combined by ``pmax``/``psum`` over ``vocab_axis`` (:func:`complete_row_stats`).
  Each device computes ``[token_chunk, vocab_chunk]`` blocks of its own
  ``[N/|data|, V/|vocab|]`` logits, never the whole ``[N, V]``; ``d hidden`` is summed over
  ``vocab_axis`` and ``d weight``/``d bias`` over ``data_axis``:

  .. math::
     x_i = \mathrm{cap}(h_i W^\top + b), \qquad
     \ell_i = \sum_{c<K} w_c q_{ic}(\mathrm{lse}_i - x_{ic})
       \;[-\textstyle\sum_c w_c q_{ic}\log q_{ic}]_{\text{t5x}} + z\,\omega_i\,\mathrm{lse}_i^2.

  Values and gradients (``hidden``, ``weight``, ``bias``) equal the single-device function.

  Args:
    hidden: ``[..., D]`` features; the first batch dimension is split over ``data_axis``.
    weight: ``[V, D]`` ('vd') or ``[D, V]`` ('dv'); ``V`` must be divisible by the size of
      ``vocab_axis``.
    labels: ``[...]`` integer class ids.
    mesh, vocab_axis, data_axis: as in :func:`vocab_parallel_cross_entropy`.
    bias, weight_layout, class_weight, ignore_index, reduction, label_smoothing, smoothing,
      z_loss, logit_softcap, where, return_lse, token_chunk_size, vocab_chunk_size: as in
      :func:`xent_jax.linear_cross_entropy` (chunk sizes count one device's rows and classes).

  Returns:
    The reduced loss (for 'none' of the batch shape, split over ``data_axis``), and with
    ``return_lse`` the pair ``(loss, lse)``.

  Example::

    mesh = jax.make_mesh((2, 4), ("data", "vocab"))
    loss = xent_jax.vocab_parallel_linear_cross_entropy(
        hidden_NxD, weight_VxD, labels_N, mesh=mesh, data_axis="data")

  References:
    Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", 2024; Shoeybi et al.,
    "Megatron-LM", 2019.
  """
  fn = "vocab_parallel_linear_cross_entropy"
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
  num_classes, _ = fused_rows.linear_shapes(fn, hidden, weight, weight_layout)
  batch_shape = hidden.shape[:-1]
  inputs.check_integer_labels(fn, labels, batch_shape)
  rows = _mesh_specs(fn, mesh, vocab_axis, data_axis, num_classes, "weight", batch_shape, "hidden")
  if where is not None:
    where = inputs.row_mask(fn, where, batch_shape)
  row_spec = PartitionSpec(*rows)
  class_spec = PartitionSpec(vocab_axis)
  args = {
    "hidden": hidden,
    "weight": weight,
    "labels": labels,
    "bias": bias,
    "class_weight": class_weight,
    "where": where,
  }
  specs = {
    "hidden": PartitionSpec(*rows, None),
    "weight": PartitionSpec(vocab_axis, None)
    if weight_layout == "vd"
    else PartitionSpec(None, vocab_axis),
    "labels": row_spec,
    "bias": class_spec,
    "class_weight": class_spec,
    "where": row_spec,
  }
  for name in ("bias", "class_weight"):
    if args[name] is not None:
      checks.check_floating(fn, name, args[name])
      checks.check_shape(fn, name, args[name], (num_classes,))

  def local(a):
    return _linear_local(
      a["hidden"],
      a["weight"],
      a["labels"],
      vocab_axis=vocab_axis,
      data_axis=data_axis,
      bias=a.get("bias"),
      weight_layout=weight_layout,
      class_weight=a.get("class_weight"),
      ignore_index=ignore_index,
      reduction=reduction,
      label_smoothing=label_smoothing,
      smoothing=smoothing,
      z_loss=z_loss,
      logit_softcap=logit_softcap,
      where=a.get("where"),
      return_lse=return_lse,
      token_chunk_size=token_chunk_size,
      vocab_chunk_size=vocab_chunk_size,
    )

  loss_spec = row_spec if reduction == "none" else PartitionSpec()
  return _shard_map(local, mesh, args, specs, (loss_spec, row_spec) if return_lse else loss_spec)
