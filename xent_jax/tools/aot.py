"""Ahead-of-time TPU memory of the public losses, measured on a host without a TPU.

With libtpu installed (the ``tpu`` extra), JAX describes TPU chips by topology name
(`jax.experimental.topologies.get_topology_desc`), even under ``JAX_PLATFORMS=cpu``. A function
jitted for abstract inputs placed on those chips compiles with the TPU compiler, and
``Compiled.memory_analysis().temp_size_in_bytes`` is the scratch memory XLA allocates on each chip
beyond arguments and outputs: the number the memory claims of the library are about.

This module holds the problems the project measures, so that the bounds of
``tests/tools/test_tpu_compile.py`` and the table of ``experiments/aot_memory.py`` read the same
numbers:

* the logits path: every loss of `xent_jax.list_losses` and the optax drop-ins, value and gradient
  at ``[8192, 32768]`` bfloat16 logits on one chip;
* the head ``loss(h W^T)``, value and gradients for ``h`` and ``W`` in bfloat16, fused
  (`xent_jax.linear_cross_entropy`) and naive (matmul, then
  ``optax.softmax_cross_entropy_with_integer_labels``) at three LLM sizes (`HEADS`), and the fused
  form ``get_loss(name).linear`` of every registered loss at the Llama-3-8B head;
* the vocabulary-parallel losses on a ``data x vocab`` mesh of the slice's four chips, and the
  form ``get_loss(name).vocab_parallel`` of every registered loss that has one;
* the training harness's Transformer train step, logits and fused, data-parallel over four chips.

Every measurement is cached, so the naive baselines compile once per process.

Example:
  >>> from xent_jax.tools import aot
  >>> aot.head_temp_bytes("fused", "n32k_d2k_v32k", "v5e:2x2") / aot.MIB  # doctest: +SKIP
  506.0

Not imported by ``import xent_jax``; it needs optax and flax (the ``experiments`` extra) and
libtpu (the ``tpu`` extra).

References:
  JAX ahead-of-time lowering and compilation:
  https://docs.jax.dev/en/latest/aot.html
"""

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, Sharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

import xent_jax
from xent_jax.tools import libtpu

MIB = 2**20

# The bounds the tests hold (tests/tools/test_tpu_compile.py) and the table reports:
# O(N) for the logits path: lean kernels keep a few per-row float32 vectors ([N]: 32 KiB at
# `LOGITS_SHAPE`), far below 1/64 of one [N, V] float32 array (16 MiB); that leaves room for
# blocked schedules visiting the vocabulary in 64 or more chunks, and fails as soon as any [N, V]
# temporary is kept, even a bfloat16 one (1/2) or a float32 quarter ([N, V/4]).
LOGITS_TEMP_FRACTION = 1 / 64
# The fused head against the naive head compiled the same way: at most a tenth of its temporaries.
FUSED_TEMP_FRACTION = 1 / 10

# Two-by-two slices of the TPU generations the library targets. libtpu's default host holds 2x2
# chips, so these are the smallest valid names ("v5e:1x4" is refused: not a multiple of 2x2); a
# 1x4 mesh is laid over the same four chips instead (`MESHES`).
TOPOLOGIES = ("v5e:2x2", "v6e:2x2")

# The logits path: [N, V] bfloat16 logits.
LOGITS_SHAPE = (8192, 32768)

# Heads (N tokens, D hidden, V vocabulary): Llama-3-8B, a Gemma-2-style vocabulary,
# and many tokens over a small vocabulary.
HEADS = {
  "llama3_8b": (8192, 4096, 128256),
  "gemma": (8192, 2304, 256000),
  "n32k_d2k_v32k": (32768, 2048, 32000),
}

# ``data x vocab`` meshes over the four chips of a slice.
MESHES = {"2x2": (2, 2), "1x4": (1, 4)}

# The vocabulary-parallel linear loss, and the fused forms of the registered losses, are measured on
# this head.
PARALLEL_HEAD = "llama3_8b"
FUSED_FORMS_HEAD = "llama3_8b"

# The Transformer of the train-step check: a global batch of B sequences of L tokens, vocabulary V,
# width D (2 layers, 4 heads, bfloat16 compute), data-parallel over the four chips. 2048 tokens
# per chip make the [tokens, V] logits (128 MiB in bf16) outweigh the [V, D] unembedding (8 MiB),
# as in language-model training. With 512 tokens per chip (B=8, D=256) the logits step compiled
# to 10 MiB temp on v5e, less than its own 32 MiB of bf16 logits, and the fused step to 62 MiB.
TRAIN_STEP = {"batch": 32, "seq_len": 256, "vocab": 32768, "dim": 128}


@functools.cache
def topology(name: str):
  """The TPU slice called ``name`` (e.g. ``"v5e:2x2"``); its ``.devices`` are its chips."""
  libtpu.quiet_libtpu()
  return topologies.get_topology_desc(platform="tpu", topology_name=name)


def mesh(topology_name: str, shape: tuple[int, int]) -> Mesh:
  """A ``("data", "vocab")`` mesh of ``shape`` over the chips of a slice."""
  devices = np.array(topology(topology_name).devices).reshape(shape)
  return Mesh(devices, ("data", "vocab"))


def spec(shape, dtype, where) -> jax.ShapeDtypeStruct:
  """An abstract array on one device (``where`` a device) or laid out by ``where`` (a sharding)."""
  sharding = where if isinstance(where, Sharding) else SingleDeviceSharding(where)
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def temp_bytes(fn, *args) -> int:
  """Scratch memory in bytes per chip of ``jax.jit(fn)`` compiled for the devices of ``args``."""
  memory = jax.jit(fn).lower(*args).compile().memory_analysis()
  if memory is None:
    raise RuntimeError("temp_bytes: this backend's compiler reports no memory analysis.")
  return memory.temp_size_in_bytes


# --------------------------------------------------------------------------- the logits path


class LogitsLoss(NamedTuple):
  """One problem of the logits path: ``loss(logits, labels) -> scalar`` and where it comes from."""

  loss: Callable[..., jax.Array]  # (logits, labels) -> scalar
  public: Callable  # the public function it calls
  dense_labels: bool  # labels are [N, V] probabilities rather than [N] class ids


def logits_losses() -> dict[str, LogitsLoss]:
  r"""One problem per public logits loss.

  Every registered name with its default hyper-parameters (mean reduction), cross-entropy, focal
  and the confidence penalty with probability labels, the optax drop-ins (their per-example
  results summed), and a loss built by `xent_jax.define_loss` (mean absolute error,
  :math:`f(\log p) = 1 - p`).
  """
  losses = {
    name: LogitsLoss(functools.partial(info.fn, **info.hparams), info.fn, False)
    for name, info in xent_jax.list_losses().items()
  }
  losses["cross_entropy[probabilities]"] = LogitsLoss(
    xent_jax.cross_entropy, xent_jax.cross_entropy, True
  )
  # Two variants with probability labels: a phi(log p) head and one with the entropy.
  for name in ("softmax_focal_loss", "confidence_penalty_cross_entropy"):
    info = xent_jax.list_losses()[name]
    losses[f"{name}[probabilities]"] = LogitsLoss(
      functools.partial(info.fn, **info.hparams), info.fn, True
    )
  for fn, dense in (
    (xent_jax.softmax_cross_entropy_with_integer_labels, False),
    (xent_jax.softmax_cross_entropy, True),
    (xent_jax.poly_loss_cross_entropy, True),
  ):
    losses[fn.__name__] = LogitsLoss(lambda x, y, fn=fn: fn(x, y).sum(), fn, dense)
  losses["define_loss[mae]"] = LogitsLoss(xent_jax.define_loss(_mae), xent_jax.define_loss, False)
  return losses


def _mae(log_p):
  """Per-class mean absolute error between the one-hot target and p: ``1 - p``."""
  return -jnp.expm1(log_p)


def logits_nxv_f32_bytes() -> int:
  """Size of one ``[N, V]`` float32 array at `LOGITS_SHAPE`: what a non-fused temporary costs."""
  return int(np.prod(LOGITS_SHAPE)) * 4


@functools.cache
def logits_temp_bytes(loss: str, topology_name: str) -> int:
  """Temp bytes of value and logits-gradient of `logits_losses` ``[loss]`` on one chip."""
  fn, _, dense = logits_losses()[loss]
  chip = topology(topology_name).devices[0]
  logits = spec(LOGITS_SHAPE, jnp.bfloat16, chip)
  labels = (
    spec(LOGITS_SHAPE, jnp.bfloat16, chip) if dense else spec(LOGITS_SHAPE[:1], jnp.int32, chip)
  )
  return temp_bytes(jax.value_and_grad(fn), logits, labels)


# --------------------------------------------------------------------------- heads


def naive_head(hidden_NxD, weight_VxD, labels_N):
  """Mean cross-entropy of ``hidden @ weight.T`` through optax: the ``[N, V]`` baseline."""
  logits_NxV = hidden_NxD @ weight_VxD.T
  return optax.softmax_cross_entropy_with_integer_labels(logits_NxV, labels_N).mean()


def fused_head(hidden_NxD, weight_VxD, labels_N):
  """Mean cross-entropy of ``hidden @ weight.T`` through `xent_jax.linear_cross_entropy`."""
  return xent_jax.linear_cross_entropy(hidden_NxD, weight_VxD, labels_N)


HEAD_FNS = {"naive": naive_head, "fused": fused_head}


@functools.cache
def head_temp_bytes(kind: str, head: str, topology_name: str) -> int:
  """Temp bytes of value and ``(dh, dW)`` of ``HEAD_FNS[kind]`` at ``HEADS[head]``, one chip."""
  loss_and_grads = jax.value_and_grad(HEAD_FNS[kind], argnums=(0, 1))
  return temp_bytes(loss_and_grads, *_head_args(head, topology_name))


def _head_args(head: str, topology_name: str) -> tuple:
  """Abstract ``(hidden [N, D], weight [V, D], labels [N])`` of ``HEADS[head]`` on one chip."""
  n, d, v = HEADS[head]
  chip = topology(topology_name).devices[0]
  return (
    spec((n, d), jnp.bfloat16, chip),
    spec((v, d), jnp.bfloat16, chip),
    spec((n,), jnp.int32, chip),
  )


@functools.cache
def fused_form_temp_bytes(loss: str, topology_name: str) -> int:
  """Temp bytes of value and ``(dh, dW)`` of ``get_loss(loss).linear`` at `FUSED_FORMS_HEAD`."""
  loss_and_grads = jax.value_and_grad(xent_jax.get_loss(loss).linear, argnums=(0, 1))
  return temp_bytes(loss_and_grads, *_head_args(FUSED_FORMS_HEAD, topology_name))


# --------------------------------------------------------------------------- vocabulary-parallel

PARALLEL_KINDS = (
  "vocab_parallel_cross_entropy",
  "vocab_parallel_cross_entropy_local",
  "vocab_parallel_linear_cross_entropy",
  "vocab_parallel_linear_cross_entropy_local",
)


def _parallel_problem(kind: str, m: Mesh):
  """``(loss, args)`` of one vocabulary-parallel loss; logits and weight split over ``vocab``."""
  on = lambda *axes: NamedSharding(m, P(*axes))  # pylint: disable=unnecessary-lambda-assignment
  if kind.startswith("vocab_parallel_linear_cross_entropy"):
    n, d, v = HEADS[PARALLEL_HEAD]
    args: tuple[jax.ShapeDtypeStruct, ...] = (
      spec((n, d), jnp.bfloat16, on("data")),
      spec((v, d), jnp.bfloat16, on("vocab")),
      spec((n,), jnp.int32, on("data")),
    )
    if kind == "vocab_parallel_linear_cross_entropy":
      loss = functools.partial(
        xent_jax.vocab_parallel_linear_cross_entropy, mesh=m, data_axis="data"
      )
    else:
      loss = jax.shard_map(
        functools.partial(xent_jax.vocab_parallel_linear_cross_entropy_local, data_axis="data"),
        mesh=m,
        in_specs=(P("data", None), P("vocab", None), P("data")),
        out_specs=P(),
      )
    return jax.value_and_grad(loss, argnums=(0, 1)), args
  args = (
    spec(LOGITS_SHAPE, jnp.bfloat16, on("data", "vocab")),
    spec(LOGITS_SHAPE[:1], jnp.int32, on("data")),
  )
  if kind == "vocab_parallel_cross_entropy":
    loss = functools.partial(xent_jax.vocab_parallel_cross_entropy, mesh=m, data_axis="data")
  else:
    loss = jax.shard_map(
      functools.partial(xent_jax.vocab_parallel_cross_entropy_local, data_axis="data"),
      mesh=m,
      in_specs=(P("data", "vocab"), P("data")),
      out_specs=P(),
    )
  return jax.value_and_grad(loss), args


# The vocabulary-parallel forms ``get_loss(name).vocab_parallel`` are measured on this mesh.
FORMS_MESH = "2x2"


@functools.cache
def parallel_form_temp_bytes(loss: str, topology_name: str) -> int:
  """Temp bytes per chip of value and gradient of ``get_loss(loss).vocab_parallel`` on the
  `FORMS_MESH` mesh, logits at `LOGITS_SHAPE` split over ``data x vocab``."""
  m = mesh(topology_name, MESHES[FORMS_MESH])
  args = (
    spec(LOGITS_SHAPE, jnp.bfloat16, NamedSharding(m, P("data", "vocab"))),
    spec(LOGITS_SHAPE[:1], jnp.int32, NamedSharding(m, P("data"))),
  )
  loss_fn = functools.partial(xent_jax.get_loss(loss).vocab_parallel, mesh=m, data_axis="data")
  return temp_bytes(jax.value_and_grad(loss_fn), *args)


@functools.cache
def parallel_temp_bytes(kind: str, mesh_name: str, topology_name: str) -> int:
  """Temp bytes per chip of value and gradients of a `PARALLEL_KINDS` loss on a `MESHES` mesh."""
  fn, args = _parallel_problem(kind, mesh(topology_name, MESHES[mesh_name]))
  return temp_bytes(fn, *args)


# --------------------------------------------------------------------------- train step


@functools.cache
def train_step_temp_bytes(fused: bool, topology_name: str) -> int:
  """Temp bytes per chip of the harness's jitted Transformer train step (`TRAIN_STEP` sizes).

  The step is `xent_jax.train.steps.make_train_step` itself (forward, loss, backward, AdamW
  update), with the state replicated and the batch split over the slice's four chips, as the
  trainer lays them out.
  """
  # The training harness is imported here: the loss measurements above do not need flax.
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from xent_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from xent_jax.train import models, optim, steps  # pylint: disable=import-outside-toplevel

  size = TRAIN_STEP
  model_config = config_lib.ModelConfig(
    name="transformer", model_dim=size["dim"], num_layers=2, num_heads=4, dtype="bfloat16"
  )

  def initialize():
    model = models.build_model(
      model_config, input_shape=(size["seq_len"],), num_classes=size["vocab"], seed=0
    )
    tx = optim.build_optimizer(config_lib.OptimConfig(), num_steps=100)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, state = nnx.split(nnx.eval_shape(initialize))
  data_mesh = Mesh(np.array(topology(topology_name).devices), ("data",))
  replicated, split = NamedSharding(data_mesh, P()), NamedSharding(data_mesh, P("data"))
  state = jax.tree.map(lambda s: spec(s.shape, s.dtype, replicated), state)
  ids_BxL = spec((size["batch"], size["seq_len"]), jnp.int32, split)
  train_step = steps.make_train_step(
    graphdef, steps.make_objective(config_lib.LossConfig(fused=fused))
  )
  compiled = train_step.lower(state, ids_BxL, ids_BxL).compile()
  return compiled.memory_analysis().temp_size_in_bytes


# --------------------------------------------------------------------------- vectorized sweep step

# One vectorized group of the MNIST-1D comparison: the 1-D CNN at the paper's batch, focal loss
# with a traced gamma and a traced learning rate per member (`xent_jax.train.sweep`).
GROUP_STEP = {"batch": 100, "length": 40, "classes": 10}


@functools.cache
def group_step_memory(topology_name: str, members: int) -> tuple[int, int]:
  """``(temp, argument)`` bytes per chip of one vectorized group's train step.

  The step is `xent_jax.train.sweep`'s: `steps.make_member_step` vmapped over ``members`` stacked
  states, the members split over the slice's chips (the ``members`` mesh axis) with each member's
  batch on its own chip, as `parallel.member_mesh` lays them out.
  """
  from xent_jax.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from xent_jax.train import data, parallel, steps  # pylint: disable=import-outside-toplevel
  from xent_jax.train import members as members_lib  # pylint: disable=import-outside-toplevel

  size = GROUP_STEP
  config = config_lib.Config(
    model=config_lib.ModelConfig(name="mnist1d_cnn"),
    loss=config_lib.LossConfig(name="focal", hparams={"gamma": 2.0}),
    optim=config_lib.OptimConfig(name="adam", schedule="constant", learning_rate=1e-2),
  )
  x = np.zeros((1, size["length"]), np.float32)
  shapes = data.Dataset(x, np.zeros(1, np.int32), x, np.zeros(1, np.int32), size["classes"])
  graphdef = members_lib.graph_of(config, shapes)
  grid = parallel.member_mesh(topology(topology_name).devices, members, "vmap")
  stacked, split = NamedSharding(grid, P("members")), NamedSharding(grid, P("members", "data"))
  state = _stacked_state_specs(config, shapes, members, stacked)
  traced = ("optim.learning_rate", "loss.hparams.gamma")
  values = {key: spec((members,), jnp.float32, stacked) for key in traced}
  step = steps.over_members(steps.make_member_step(graphdef, config, traced), "vmap", (0,) * 5)
  compiled = (
    jax.jit(step)
    .lower(
      state,
      values,
      spec((members, size["batch"], size["length"]), jnp.float32, split),
      spec((members, size["batch"]), jnp.int32, split),
      spec((members,), jnp.bool_, stacked),
    )
    .compile()
  )
  memory = compiled.memory_analysis()
  if memory is None:
    raise RuntimeError("group_step_memory: this backend's compiler reports no memory analysis.")
  return memory.temp_size_in_bytes, memory.argument_size_in_bytes


def _stacked_state_specs(config, shapes, members: int, sharding):
  """Abstract stacked states ``[members, ...]`` of ``config``'s model and optimizer."""
  from xent_jax.train import members as members_lib  # pylint: disable=import-outside-toplevel

  abstract = jax.eval_shape(
    lambda: members_lib.initial_states(config, shapes, list(range(members)), None)
  )
  return jax.tree.map(lambda s: spec(s.shape, s.dtype, sharding), abstract)
