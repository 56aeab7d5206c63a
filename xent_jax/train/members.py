"""The stacked state of a group's members: initialisation, one member's slice, per-member
checkpoints.

A group holds its members' model and optimizer states as one `nnx.State` whose every leaf has a
leading ``[M]`` member axis. Member ``m``'s slice has exactly the layout of a sequential run's
state, so it is saved to, and restored from, that run's own checkpoint directory in the same
format: a member's checkpoints resume with ``--sequential`` and the reverse.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from xent_jax.train.checkpoint import Checkpointer
from xent_jax.train.config import Config, to_yaml
from xent_jax.train.data import Dataset, without_rows
from xent_jax.train.models import build_model
from xent_jax.train.optim import build_optimizer


def model_and_optimizer(config: Config, data: Dataset, key):
  """``(model, optimizer)`` of ``config``, initialised from the PRNG ``key``."""
  input_shape = (data.seq_len,) if data.is_lm else data.x_train_NxF.shape[1:]
  model = build_model(config.model, input_shape=input_shape, num_classes=data.num_classes, seed=key)
  optimizer = nnx.Optimizer(
    model, build_optimizer(config.optim, config.train.num_steps), wrt=nnx.Param
  )
  return model, optimizer


def graph_of(config: Config, data: Dataset):
  """The `nnx.GraphDef` of ``config``'s model and optimizer (no arrays are made)."""
  return nnx.split(nnx.eval_shape(lambda: model_and_optimizer(config, data, jax.random.key(0))))[0]


def model_graph_of(config: Config, data: Dataset):
  """The `nnx.GraphDef` of ``config``'s model alone (without its optimizer)."""
  model, _ = nnx.eval_shape(lambda: model_and_optimizer(config, data, jax.random.key(0)))
  return nnx.split(model)[0]


def model_key(config: Config, data: Dataset) -> tuple:
  """What a model's programs depend on, as a hashable key: its config and the data's example
  shape and number of classes (not the loss, the optimizer or the labels)."""
  example = data.seq_len if data.is_lm else data.x_train_NxF.shape[1:]
  return (to_yaml(config.model), example, data.num_classes)


def state_from_seed(config: Config, data: Dataset):
  """``seed -> state``: the fresh `nnx.State` of ``config``'s (model, optimizer) pair from
  ``jax.random.key(seed)`` (what ``nnx.Rngs(seed)`` makes), for a program that is kept: it
  closes over the data's shapes (`without_rows`), not its arrays."""
  shapes = without_rows(data)

  def initialize(seed):
    return nnx.split(model_and_optimizer(config, shapes, jax.random.key(seed)))[1]

  return initialize


# The compiled initialisation of each (model, optimizer, steps, data shapes, sharding): the groups
# of a comparison that differ only in their loss initialise the same state, and compile it once.
_INIT_PROGRAMS: dict = {}


def initial_states(config: Config, data: Dataset, seeds: list[int], sharding):
  """Every member's fresh state stacked over a leading member axis, placed with ``sharding``.

  ``jax.random.key(seed)`` of each member is what ``nnx.Rngs(seed)`` makes in a sequential run,
  and vmapping the initialisation keeps each member's random numbers, so member ``m`` starts
  from the weights of its sequential run.
  """
  key = (*model_key(config, data), to_yaml(config.optim), config.train.num_steps, sharding)
  if key not in _INIT_PROGRAMS:
    _INIT_PROGRAMS[key] = jax.jit(jax.vmap(state_from_seed(config, data)), out_shardings=sharding)
  return _INIT_PROGRAMS[key](jnp.asarray(seeds, jnp.int32))


def member_pure(state, member: int, device):
  """Member ``member``'s slice of a stacked state as a pure dict, on one ``device``."""
  return jax.device_put(jax.tree.map(lambda a: a[member], nnx.to_pure_dict(state)), device)


def restore_members(state, checkpointers: list[Checkpointer | None], sharding, device):
  """Restores each member's newest good checkpoint into ``state`` (in place).

  Returns:
    ``(state, steps)``: the state placed with ``sharding``, and each member's restored step (0
    where it starts afresh or has no checkpointer).
  """
  slices = [member_pure(state, m, device) for m in range(len(checkpointers))]
  steps = []
  for m, checkpointer in enumerate(checkpointers):
    restored = checkpointer.restore_latest(slices[m]) if checkpointer else None
    if restored is None:
      steps.append(0)
      continue
    slices[m], record = restored
    steps.append(record["step"])
  if any(steps):
    pure = jax.tree.map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *slices)
    nnx.replace_by_pure_dict(state, pure)
  return jax.device_put(state, sharding), steps


def member_bytes(config: Config, data: Dataset) -> int:
  """A member's device memory in a group step, estimated from its sizes (nothing is compiled).

  Four copies of the state (the state, its gradients, the updated state and optimizer
  temporaries) plus eight of the batch's inputs and logits (activations and their gradients):
  an upper bound for the MLPs and CNNs of the harness, which keep few activations per layer.
  """
  shapes = nnx.state(nnx.eval_shape(lambda: model_and_optimizer(config, data, jax.random.key(0))))
  state = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))
  batch = config.train.batch_size
  example = data.seq_len if data.is_lm else int(np.prod(data.x_train_NxF.shape[1:]))
  outputs = max(1, data.seq_len) * data.num_classes
  return 4 * state + 8 * 4 * batch * (example + outputs)
