"""Laying a loss's global arrays out on a ``data x vocab`` mesh and running it under ``shard_map``.

The vocabulary-parallel losses share these steps: check the mesh axes against the problem
(:func:`row_specs`), place each input as its ``PartitionSpec`` and run the per-shard loss under
``jax.shard_map`` with ``check_vma=True`` (:func:`run_on_mesh`). :func:`sharded_loss` does both for
a loss on logits (classes split over ``vocab_axis``, rows optionally over ``data_axis``).
"""

import math
from collections.abc import Callable, Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xent_jax.core import checks, inputs
from xent_jax.core.options import LossOptions, OptionKwargs
from xent_jax.core.reduction import data_axes


def _axis_size(fn: str, mesh: Mesh, name: str, axis_name: Hashable) -> int:
  """The size of mesh axis ``axis_name``; the error names the argument ``name``."""
  if axis_name not in mesh.axis_names:
    raise ValueError(
      f"{fn}: `{name}`={axis_name!r} is not an axis of `mesh`, whose axes are {mesh.axis_names}."
    )
  return mesh.shape[axis_name]


def row_specs(fn, mesh, vocab_axis, data_axis, num_classes, class_name, batch_shape, batch_name):
  """Checks ``mesh`` against the problem and returns the batch part of the partition specs.

  ``num_classes`` (of the argument ``class_name``) must be divisible by the size of
  ``vocab_axis``, and the first dimension of ``batch_shape`` (of ``batch_name``) by the total size
  of the ``data_axis`` axes, which must be axes of ``mesh`` other than ``vocab_axis``.

  Returns:
    One ``PartitionSpec`` entry per batch dimension: the data axes (a name, or a tuple of names)
    for the first, None for the others.

  Raises:
    TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
    ValueError: naming the axis argument that does not fit.
  """
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
  types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
  used = [
    a
    for entry in spec
    if entry is not None
    for a in (entry if isinstance(entry, tuple) else (entry,))
  ]
  if used and all(types[a] == jax.sharding.AxisType.Explicit for a in used):
    return jax.reshard(x, NamedSharding(mesh, spec))
  return x


def run_on_mesh(local: Callable, mesh: Mesh, args: dict, specs: dict, out_specs):
  """Runs ``local(args)`` under ``jax.shard_map`` (``check_vma=True``) with every input laid out
  as its spec.

  ``args`` maps names to global arrays (None for an input not given, which ``local`` then does not
  see), ``specs`` names to their ``PartitionSpec``. Within ``jax.set_mesh`` (or on a mesh with Auto
  axes) it runs on ``mesh`` as given; an Explicit mesh outside any mesh context runs on its Auto
  twin (:func:`_auto_twin`), so the loss also works eagerly, under ``jax.grad`` without ``jit``.

  The ``shard_map`` runs inside ``jax.jit``: under a caller's ``jit`` that is inlined, and an
  eager call runs one compiled program rather than sending each primitive of the body to every
  device one at a time (eager ``shard_map`` keeps nothing between calls: a small loss's forward
  and backward pass on 8 CPU devices took about 13 s per call that way, 1 s with the ``jit``).
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
  return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(in_specs,), out_specs=out_specs))(placed)


def loss_specs(reduction: str, row_spec: PartitionSpec, return_lse: bool):
  """The ``out_specs`` of a loss: split like the rows for 'none', else replicated; with
  ``return_lse`` paired with the rows' ``lse``."""
  loss_spec = row_spec if reduction == "none" else PartitionSpec()
  return (loss_spec, row_spec) if return_lse else loss_spec


class MeshLayout(NamedTuple):
  """Where a loss on logits runs: the mesh, the axis its classes are split over, the axis (or
  axes, major first) its rows are split over (None: replicated), and the class axis of the
  logits."""

  mesh: Mesh
  vocab_axis: Hashable = "vocab"
  data_axis: Hashable | tuple[Hashable, ...] | None = None
  axis: int = -1


class LossArrays(NamedTuple):
  """The arrays of a loss on logits, as its caller gave them: ``logits``, ``labels`` and the
  optional ``class_weight`` and ``where``."""

  logits: jax.typing.ArrayLike
  labels: jax.typing.ArrayLike
  class_weight: jax.typing.ArrayLike | None = None
  where: jax.typing.ArrayLike | None = None


def layout_arrays_options(
  fn: str, mesh: Mesh, logits, labels, kwargs: dict
) -> tuple[MeshLayout, LossArrays, LossOptions]:
  """Reads the keywords of a vocabulary-parallel loss: the layout's (``vocab_axis``,
  ``data_axis``, ``axis``), the optional arrays (``class_weight``, ``where``) and the options of
  :class:`~xent_jax.core.options.OptionKwargs` (checked); any other keyword is a ``TypeError``
  naming it."""
  layout_keys, array_keys = MeshLayout._fields[1:], LossArrays._fields[2:]
  unknown = sorted(set(kwargs) - {*layout_keys, *array_keys, *OptionKwargs.__annotations__})
  if unknown:
    raise TypeError(f"{fn}: unexpected keyword argument {unknown[0]!r}")
  rest = dict(kwargs)
  take = lambda keys: {k: rest.pop(k) for k in keys if k in rest}
  layout = MeshLayout(mesh, **take(layout_keys))
  arrays = LossArrays(logits, labels, **take(array_keys))
  return layout, arrays, LossOptions.checked(fn, **rest)


def sharded_loss(
  fn: str,
  shard_loss: Callable,
  layout: MeshLayout,
  arrays: LossArrays,
  reduction: str,
  return_lse: bool = False,
):
  """Checks the global ``arrays`` against ``layout``'s mesh, lays them out and runs
  ``shard_loss`` in ``shard_map``.

  ``logits`` go as ``P(data_axis, ..., vocab_axis)`` (classes moved last), integer ``labels`` and
  ``where`` as ``P(data_axis, ...)``, probability ``labels`` like the logits, ``class_weight`` as
  ``P(vocab_axis)``. ``shard_loss(logits, labels, class_weight=..., where=...)`` gets one device's
  arrays (``class_weight``/``where`` None when not given) and returns the loss reduced over the
  global batch (``[...]`` rows for 'none'), with ``return_lse`` the pair ``(loss, lse [...])``.
  """
  mesh, vocab_axis, data_axis, axis = layout
  logits, labels, class_weight, where = arrays
  checks.check_floating(fn, "logits", logits)
  logits, labels = jnp.asarray(logits), inputs.as_label_array(fn, labels)
  class_axis = checks.canonical_axis(fn, axis, logits.ndim)
  integer = inputs.is_integer_labels(fn, labels, logits.shape, class_axis)
  if not integer:  # probabilities: classes on `axis` too
    labels = jnp.moveaxis(labels, class_axis, -1)
  logits = jnp.moveaxis(logits, class_axis, -1)
  batch_shape = logits.shape[:-1]
  if class_weight is not None:
    inputs.check_class_weight(fn, "class_weight", class_weight, logits.shape[-1])
  rows = row_specs(
    fn, mesh, vocab_axis, data_axis, logits.shape[-1], "logits", batch_shape, "logits"
  )
  if where is not None:
    where = inputs.row_mask(fn, where, batch_shape)
  row_spec = PartitionSpec(*rows)
  args = {"logits": logits, "labels": labels, "class_weight": class_weight, "where": where}
  specs = {
    "logits": PartitionSpec(*rows, vocab_axis),
    "labels": row_spec if integer else PartitionSpec(*rows, vocab_axis),
    "class_weight": PartitionSpec(vocab_axis),
    "where": row_spec,
  }

  def local(a):
    return shard_loss(
      a["logits"], a["labels"], class_weight=a.get("class_weight"), where=a.get("where")
    )

  return run_on_mesh(local, mesh, args, specs, loss_specs(reduction, row_spec, return_lse))
