"""Which runs of a comparison train together: groups of runs that one compiled program serves.

Two runs share a group when their configs differ only in values that keep every shape: the seed,
the label-noise rate, the learning rate and the values (not the names) of the loss's
hyper-parameters. A run's loss function, model, batch size, number of steps and data set put it
in another group. The learning rate and the hyper-parameters become traced inputs of the group's
step, so they may differ between members only where they trace: a value that cannot be traced
(a schedule that reads it in Python, a loss that checks it at trace time) is probed once with
`jax.eval_shape` and then splits the group instead of failing inside it.
"""

import copy
import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp

import xent_jax
from xent_jax.train.config import Config, OptimConfig, to_yaml
from xent_jax.train.optim import build_optimizer

LEARNING_RATE = "optim.learning_rate"
HPARAM_PREFIX = "loss.hparams."


@dataclasses.dataclass(frozen=True)
class Group:
  """Runs that train as one program.

  Attributes:
    runs: the member configs, in the comparison's order.
    traced: config values that differ between members and enter the step as traced scalars
      (``"optim.learning_rate"``, ``"loss.hparams.<name>"``); seed and label noise differ too,
      but only the initial state and the data depend on them.
  """

  runs: tuple[Config, ...]
  traced: tuple[str, ...]

  def values(self) -> dict[str, list[float]]:
    """``{traced key: [value of each member]}``."""
    return {key: [traced_value(run, key) for run in self.runs] for key in self.traced}


def traced_value(run: Config, key: str) -> float:
  """The value of a traceable key (`LEARNING_RATE` or ``loss.hparams.<name>``) in ``run``."""
  if key == LEARNING_RATE:
    return run.optim.learning_rate
  return run.loss.hparams[key.removeprefix(HPARAM_PREFIX)]


@functools.cache
def _learning_rate_traces(optim_json: str, num_steps: int) -> bool:
  """Whether the optimizer (``optim_json``: its config as JSON text) builds with a traced
  learning rate (optax's warm-up cosine does not)."""
  params = {"w": jnp.zeros(2)}

  def build(learning_rate):
    optim = dataclasses.replace(OptimConfig(**json.loads(optim_json)), learning_rate=learning_rate)
    tx = build_optimizer(optim, num_steps)
    return tx.update(params, tx.init(params), params)[0]

  return _traces(build)


@functools.cache
def _hparam_traces(loss_name: str, key: str, others_json: str) -> bool:
  """Whether loss ``loss_name`` takes hyper-parameter ``key`` as a traced scalar, its other
  hyper-parameters being ``others_json`` (JSON text: a hashable cache key even for lists)."""

  def evaluate(value):
    loss = xent_jax.get_loss(loss_name, **json.loads(others_json), **{key: value})
    return loss(jnp.zeros((2, 3)), jnp.zeros(2, jnp.int32), reduction="mean")

  return _traces(evaluate)


def _traces(fn) -> bool:
  try:
    jax.eval_shape(fn, jax.ShapeDtypeStruct((), jnp.float32))
  except Exception:  # pylint: disable=broad-except  (any failure: the value stays static)
    return False
  return True


def traceable_keys(run: Config) -> list[str]:
  """The keys of ``run`` that may differ inside a group (see the module docstring)."""
  keys = []
  optim_json = json.dumps(dataclasses.asdict(run.optim), sort_keys=True)
  if _learning_rate_traces(optim_json, run.train.num_steps):
    keys.append(LEARNING_RATE)
  for name, value in sorted(run.loss.hparams.items()):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      continue
    others = {k: v for k, v in run.loss.hparams.items() if k != name}
    if _hparam_traces(run.loss.name, name, json.dumps(others, sort_keys=True)):
      keys.append(HPARAM_PREFIX + name)
  return keys


def group_key(run: Config) -> str:
  """Everything a group's members share, as text: the config with its member values blanked."""
  shared = copy.deepcopy(run)
  shared.name = ""
  shared.loss.label = ""
  shared.train.seed = 0
  shared.data.label_noise = 0.0
  for key in traceable_keys(run):
    if key == LEARNING_RATE:
      shared.optim.learning_rate = 1.0
    else:
      shared.loss.hparams[key.removeprefix(HPARAM_PREFIX)] = 0.0
  return to_yaml(shared)


def plan_groups(runs: list[Config]) -> list[Group]:
  """The runs grouped by `group_key`, groups in order of their first run."""
  by_key: dict[str, list[Config]] = {}
  for run in runs:
    by_key.setdefault(group_key(run), []).append(run)
  groups = []
  for members in by_key.values():
    varying = [
      key
      for key in traceable_keys(members[0])
      if len({traced_value(run, key) for run in members}) > 1
    ]
    groups.append(Group(tuple(members), tuple(varying)))
  return groups


def split_group(group: Group, max_members: int) -> list[Group]:
  """``group`` cut into the fewest near-equal parts of at most ``max_members`` members (sizes
  differ by one at most, so at most two compiled shapes)."""
  count = math.ceil(len(group.runs) / max(1, max_members))
  size, extra = divmod(len(group.runs), count)
  parts, start = [], 0
  for index in range(count):
    stop = start + size + (index < extra)
    parts.append(Group(group.runs[start:stop], group.traced))
    start = stop
  return parts
