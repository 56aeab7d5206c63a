"""Typed experiment configs: OmegaConf structured dataclasses, safe YAML, dotted overrides.

The schema below is the single source of truth for what a config may contain. `load_config`
merges a YAML file and ``key.sub=value`` overrides onto it; OmegaConf rejects unknown keys and
wrong types, and `validate` checks the names (loss, model, data set, optimizer, schedule) against
the registries, so every mistake fails before any computation with a `ConfigError` naming the key
and the allowed values.
"""

import copy
import dataclasses
import difflib
import itertools
import math
import pathlib
from typing import Any, cast

import omegaconf
import yaml
from omegaconf import OmegaConf


class ConfigError(ValueError):
  """A config that does not match the schema or names something unknown."""


@dataclasses.dataclass
class DataConfig:
  """Which data set, its splits and the label noise applied to the training split."""

  name: str = "digits"  # digits | gaussian_mixture | pydoc_chars | mnist1d | arrays
  path: str = (
    ""  # arrays: an .npz file or a directory of .npy files (x_train, y_train, x_test, y_test)
  )
  seed: int = 0  # split, synthetic data and label noise; fixed across training seeds
  test_fraction: float = 0.2  # digits, gaussian_mixture, pydoc_chars (mnist1d, arrays: own split)
  holdout_fraction: float = 0.1  # of the training split, held out to fit the temperature
  label_noise: float = 0.0  # fraction of training (and held-out) labels replaced
  noise_type: str = "symmetric"  # symmetric | asymmetric
  num_examples: int = 2000  # gaussian_mixture
  num_classes: int = 10  # gaussian_mixture; arrays: labels must lie in [0, num_classes)
  num_features: int = 20  # gaussian_mixture
  class_separation: float = 3.0  # gaussian_mixture: distance scale of the class means
  seq_len: int = 64  # pydoc_chars: tokens per training window
  max_eval_tokens: int = 16384  # pydoc_chars: held-out tokens scored at each evaluation


@dataclasses.dataclass
class ModelConfig:
  """Which Flax NNX model and its sizes."""

  # linear | mlp | cnn | mnist1d_mlp | mnist1d_cnn | mnist1d_gru | transformer
  name: str = "mlp"
  hidden_dims: list[int] = dataclasses.field(default_factory=lambda: [128])  # mlp
  channels: list[int] = dataclasses.field(default_factory=lambda: [16, 32])  # cnn
  conv: str = "lax"  # mnist1d_cnn: lax (lax.conv) | im2col (patches @ kernel, vmaps well)
  model_dim: int = 128  # transformer
  num_layers: int = 2  # transformer
  num_heads: int = 4  # transformer
  mlp_ratio: int = 4  # transformer
  dtype: str = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)


@dataclasses.dataclass
class LossConfig:
  """A loss from the xent_jax registry, its hyper-parameters, and how the table labels it."""

  name: str = "cross_entropy"  # a registered name (`xent-jax losses`) or "package.module:function"
  hparams: dict[str, Any] = dataclasses.field(default_factory=dict)
  fused: bool = False  # transformer only: linear_cross_entropy on the final hidden states
  label: str = ""  # name in tables and plots; derived from name and hparams when empty


@dataclasses.dataclass
class OptimConfig:
  """An Optax optimizer and learning-rate schedule."""

  name: str = "adamw"  # adam | adamw | sgd
  learning_rate: float = 1e-3
  schedule: str = "cosine"  # constant | cosine | warmup_cosine | linear
  warmup_steps: int = 0
  # None: 1e-4 for adamw, 0 for adam and sgd. adamw decays decoupled (Loshchilov & Hutter); adam
  # and sgd add weight_decay * params to the gradient first (coupled L2, PyTorch's weight_decay).
  weight_decay: float | None = None
  momentum: float = 0.9  # sgd
  grad_clip_norm: float = 0.0  # 0 disables clipping


@dataclasses.dataclass
class TrainConfig:
  """Length of training, batch sizes and logging / checkpoint intervals (in steps)."""

  seed: int = 0
  num_steps: int = 500
  batch_size: int = 64  # global batch, split over all devices
  eval_every: int = 50
  eval_batch_size: int = 256
  checkpoint_every: int = 100  # a multiple of eval_every; 0 disables checkpoints
  max_checkpoints: int = 2
  num_ece_bins: int = 15


@dataclasses.dataclass
class CompareConfig:
  """The grid that `compare` runs: loss variants x seeds x listed values of other keys."""

  variants: list[LossConfig] = dataclasses.field(default_factory=list)
  seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
  grid: dict[str, list[Any]] = dataclasses.field(
    default_factory=dict
  )  # "data.label_noise": [0, 0.4]
  # How the runs train (not part of a run's identity: each run records the defaults):
  # auto | vmap | map | sequential (see xent_jax.train.sweep); --group-mode, --sequential
  group_mode: str = "auto"
  group_memory_mb: int = 2048  # device memory one vectorized group may take; larger ones split
  lanes: int = 0  # groups trained at once, one thread each; 0: one per CPU core in map mode


@dataclasses.dataclass
class Config:
  """One experiment."""

  name: str = "experiment"
  workdir: str = "runs/${name}"
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  compare: CompareConfig = dataclasses.field(default_factory=CompareConfig)


ALLOWED_NAMES = {
  "data.name": ("digits", "gaussian_mixture", "pydoc_chars", "mnist1d", "arrays"),
  "data.noise_type": ("symmetric", "asymmetric"),
  "model.name": (
    "linear",
    "mlp",
    "cnn",
    "mnist1d_mlp",
    "mnist1d_cnn",
    "mnist1d_gru",
    "transformer",
  ),
  "model.conv": ("lax", "im2col"),
  "model.dtype": ("float32", "bfloat16"),
  "optim.name": ("adam", "adamw", "sgd"),
  "optim.schedule": ("constant", "cosine", "warmup_cosine", "linear"),
  "compare.group_mode": ("auto", "vmap", "map", "sequential"),
}


def dotted_keys(schema=Config, prefix: str = "") -> list[str]:
  """Every leaf key of the schema, dotted (``"optim.learning_rate"``, ...)."""
  keys = []
  for field in dataclasses.fields(schema):
    if dataclasses.is_dataclass(field.type):
      keys += dotted_keys(field.type, f"{prefix}{field.name}.")
    else:
      keys.append(prefix + field.name)
  return keys


def suggest_keys(key: str) -> list[str]:
  """Schema keys close to an unknown ``key``: same-looking last part first, then the whole key.

  ``train.lerning_rate`` -> ``["optim.learning_rate"]`` (difflib ratio >= 0.75 on the last part,
  else >= 0.6 on the dotted key); keys of the same section win; best match first.
  """
  keys = dotted_keys()
  by_leaf: dict[str, list[str]] = {}
  for k in keys:
    by_leaf.setdefault(k.rpartition(".")[2], []).append(k)
  leaves = difflib.get_close_matches(key.rpartition(".")[2], list(by_leaf), n=3, cutoff=0.75)
  found = [k for leaf in leaves for k in by_leaf[leaf]] or difflib.get_close_matches(
    key, keys, n=3, cutoff=0.6
  )
  same_section = [k for k in found if k.rpartition(".")[0] == key.rpartition(".")[0]]
  return sorted(
    same_section or found, key=lambda k: -difflib.SequenceMatcher(None, key, k).ratio()
  )[:3]


def _omegaconf_error(err: omegaconf.errors.OmegaConfBaseException, source: str) -> ConfigError:
  """Turns an OmegaConf error into a message naming the key and what it accepts."""
  key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
  message = str(err).splitlines()[0]
  if isinstance(err, (omegaconf.errors.ConfigKeyError, omegaconf.errors.ConfigAttributeError)):
    schema: type | None = getattr(err, "object_type", None)
    if dataclasses.is_dataclass(schema) and schema is not Config and "." not in str(key):
      # A key inside a list entry (compare.variants): OmegaConf names only the key itself.
      allowed = [field.name for field in dataclasses.fields(schema)]
      close = difflib.get_close_matches(str(key), allowed, n=3, cutoff=0.6)
      hint = f"did you mean {' or '.join(repr(k) for k in close)}? " if close else ""
      return ConfigError(
        f"{source}: unknown key '{key}' in a {schema.__name__} entry (such as "
        f"compare.variants); {hint}allowed keys there: {allowed}"
      )
    parent, _, _ = str(key).rpartition(".")
    node = OmegaConf.structured(Config)
    for part in filter(None, parent.split(".")):
      node = node.get(part, None)
      if node is None:
        break
    allowed = sorted(map(str, node.keys())) if isinstance(node, omegaconf.DictConfig) else []
    close = suggest_keys(str(key))
    hint = f"did you mean {' or '.join(repr(k) for k in close)}? " if close else ""
    return ConfigError(f"{source}: unknown config key '{key}'; {hint}allowed keys here: {allowed}")
  return ConfigError(f"{source}: invalid value for config key '{key}': {message}")


def _read_yaml(path: str) -> dict[str, Any]:
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f"config file not found: '{path}'")
  with file.open() as f:
    try:
      data = yaml.safe_load(f)
    except yaml.YAMLError as err:
      raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
  if data is None:
    return {}
  if not isinstance(data, dict):
    raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
  return data


def load_config(path: str | None, overrides: tuple[str, ...] = ()) -> Config:
  """Reads a YAML config, applies ``key.sub=value`` overrides, validates, returns a `Config`.

  Args:
    path: a YAML file (read with ``yaml.safe_load``), or None for the defaults.
    overrides: dotted assignments such as ``("train.num_steps=100", "loss.name=focal")``.

  Returns:
    The resolved, validated `Config` (a plain dataclass instance).

  Raises:
    ConfigError: missing file, unknown key, wrong type, or an unknown name, naming the key.
  """
  schema = OmegaConf.structured(Config)
  source = path or "<defaults>"
  try:
    merged = OmegaConf.merge(schema, _read_yaml(path) if path else {})
  except omegaconf.errors.OmegaConfBaseException as err:
    raise _omegaconf_error(err, source) from None
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override '{item}' must look like key.sub=value")
    try:  # one at a time, so that a YAML error names its override
      OmegaConf.from_dotlist([item])
    except yaml.YAMLError as err:
      reason = " ".join(str(err).split())
      raise ConfigError(f"override '{item}': its value is not valid YAML ({reason})") from None
  try:
    merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    config = cast(Config, OmegaConf.to_object(merged))  # a structured Config node
  except omegaconf.errors.OmegaConfBaseException as err:
    raise _omegaconf_error(err, "command-line override" if overrides else source) from None
  validate(config)
  runs = set()
  for run_config in expand_grid(config):
    validate(run_config)
    run = (run_config.name, run_config.train.seed)
    if run in runs:  # one run directory for two runs: the second would be skipped as finished
      raise ConfigError(
        f"config key 'compare.variants' gives two variants the name {run[0]!r}: "
        "give each its own 'label'"
      )
    runs.add(run)
  return config


def validate(config: Config) -> None:
  """Checks names against the registries and the intervals against each other."""
  for key, allowed in ALLOWED_NAMES.items():
    section, field = key.split(".")
    value = getattr(getattr(config, section), field)
    if value not in allowed:
      raise ConfigError(f"config key '{key}' is {value!r}; allowed values: {list(allowed)}")
  for loss, key in [(config.loss, "loss")] + [
    (v, f"compare.variants[{i}]") for i, v in enumerate(config.compare.variants)
  ]:
    validate_loss(loss, key, config.model.name)
  validate_numbers(config)
  train = config.train
  if train.checkpoint_every % train.eval_every:
    raise ConfigError(
      f"config key 'train.checkpoint_every' must be 0 or a multiple of train.eval_every "
      f"({train.eval_every}), got {train.checkpoint_every}"
    )
  if config.optim.warmup_steps >= train.num_steps:
    raise ConfigError(
      f"config key 'optim.warmup_steps' must be in [0, train.num_steps="
      f"{train.num_steps}), got {config.optim.warmup_steps}"
    )
  if config.model.model_dim % config.model.num_heads:
    raise ConfigError(
      f"config key 'model.num_heads' ({config.model.num_heads}) must divide "
      f"model.model_dim ({config.model.model_dim})"
    )
  seeds = config.compare.seeds
  if not seeds or len(set(seeds)) != len(seeds):
    raise ConfigError(
      f"config key 'compare.seeds' must list distinct seeds, at least one, got {seeds}"
    )
  for key, values in config.compare.grid.items():
    if not values:
      raise ConfigError(f"config key 'compare.grid' lists no values for {key!r}")
  if config.data.name == "arrays" and not pathlib.Path(config.data.path).exists():
    raise ConfigError(
      f"config key 'data.path' must name an .npz file or a directory of .npy files "
      f"when data.name is 'arrays', got {config.data.path!r} (not found)"
    )
  if config.model.name == "cnn" and config.data.name in ("mnist1d", "gaussian_mixture"):
    raise ConfigError(
      f"config key 'model.name' is 'cnn' (2-D images) but data.name is "
      f"{config.data.name!r}, whose examples are 1-D: use linear, mlp, mnist1d_mlp, "
      "mnist1d_cnn or mnist1d_gru"
    )
  if config.model.conv == "im2col" and config.model.name == "cnn":
    raise ConfigError(
      "config key 'model.conv' is 'im2col', which only mnist1d_cnn has (models without a "
      "convolution ignore it); the 2-D cnn runs lax.conv: drop the key or set it to 'lax'"
    )
  is_lm = config.data.name == "pydoc_chars"
  if is_lm != (config.model.name == "transformer"):
    raise ConfigError(
      f"config key 'model.name' is {config.model.name!r} but data.name is {config.data.name!r}: "
      "the transformer pairs with pydoc_chars, the other models with the classification data sets"
    )


POSITIVE = ("> 0", lambda v: v > 0)
NON_NEGATIVE = (">= 0", lambda v: v >= 0)
FRACTION = ("in [0, 1)", lambda v: 0 <= v < 1)
# The range of every numeric schema field (a list field: of each entry). NaN and +-inf are refused
# for all of them; tests/train/test_train_config.py checks that no numeric field is missing here.
NUMERIC_RULES = {
  "data.seed": NON_NEGATIVE,
  "data.test_fraction": ("in (0, 1)", lambda v: 0 < v < 1),
  "data.holdout_fraction": FRACTION,
  "data.label_noise": FRACTION,
  "data.num_examples": POSITIVE,
  "data.num_classes": (">= 2", lambda v: v >= 2),
  "data.num_features": POSITIVE,
  "data.class_separation": NON_NEGATIVE,
  "data.seq_len": POSITIVE,
  "data.max_eval_tokens": POSITIVE,
  "model.hidden_dims": POSITIVE,
  "model.channels": POSITIVE,
  "model.model_dim": POSITIVE,
  "model.num_layers": POSITIVE,
  "model.num_heads": POSITIVE,
  "model.mlp_ratio": POSITIVE,
  "optim.learning_rate": POSITIVE,
  "optim.warmup_steps": NON_NEGATIVE,
  "optim.weight_decay": NON_NEGATIVE,
  "optim.momentum": FRACTION,
  "optim.grad_clip_norm": (">= 0 (0 disables clipping)", lambda v: v >= 0),
  "train.seed": NON_NEGATIVE,
  "train.num_steps": POSITIVE,
  "train.batch_size": POSITIVE,
  "train.eval_every": POSITIVE,
  "train.eval_batch_size": POSITIVE,
  "train.checkpoint_every": (">= 0 (0 disables checkpoints)", lambda v: v >= 0),
  "train.max_checkpoints": POSITIVE,
  "train.num_ece_bins": POSITIVE,
  "compare.seeds": NON_NEGATIVE,
  "compare.group_memory_mb": POSITIVE,
  "compare.lanes": (">= 0 (0: one per CPU core in map mode on CPU, else 1)", lambda v: v >= 0),
}


def validate_numbers(config: Config) -> None:
  """Checks every numeric field against `NUMERIC_RULES` (finite and in range)."""
  for key, (expected, holds) in NUMERIC_RULES.items():
    section, field = key.split(".")
    value = getattr(getattr(config, section), field)
    if value is None:  # an optional number (optim.weight_decay): the optimizer's default
      continue
    for item in value if isinstance(value, list) else [value]:
      if not (math.isfinite(item) and holds(item)):
        each = " in every entry" if isinstance(value, list) else ""
        raise ConfigError(f"config key '{key}' must be {expected}{each}, got {value!r}")


def validate_loss(loss: LossConfig, key: str, model_name: str) -> None:
  """Resolves a loss through the registry so that bad names fail now, not mid-run."""
  import xent_jax  # pylint: disable=import-outside-toplevel

  if loss.fused and model_name != "transformer":
    raise ConfigError(
      f"config key '{key}.fused' needs model.name 'transformer', got {model_name!r}"
    )
  try:
    xent_jax.get_loss(loss.name, **loss.hparams)
  except (ValueError, TypeError) as err:
    raise ConfigError(
      f"config key '{key}' (name={loss.name!r}, hparams={dict(loss.hparams)}): {err}"
    ) from None


def loss_label(loss: LossConfig) -> str:
  """The table name of a loss: its label, or name plus hyper-parameters."""
  if loss.label:
    return loss.label
  parts = [loss.name] + [f"{k}={v}" for k, v in sorted(loss.hparams.items())]
  return ("fused_" if loss.fused else "") + ",".join(parts)


def to_yaml(config: object) -> str:
  """The resolved config, or one of its sections, as YAML (what each run directory records)."""
  return OmegaConf.to_yaml(OmegaConf.structured(config))


def expand_grid(config: Config) -> list[Config]:
  """The runs of `compare`: one Config per (grid values, loss variant, seed).

  Each returned config has `name` set to its group (everything but the seed), so runs of one
  group differ only by seed. With no variants listed the config's own loss is the only variant.
  """
  variants = config.compare.variants or [config.loss]
  grid_keys = sorted(config.compare.grid)
  runs = []
  for values in itertools.product(*(config.compare.grid[k] for k in grid_keys)):
    # One typed OmegaConf update per grid point (building the node is ~70 ms); its variants and
    # seeds are plain copies of the resulting dataclass.
    node = OmegaConf.structured(config)
    try:
      for key, value in zip(grid_keys, values):
        OmegaConf.update(node, key, value, merge=False)
    except omegaconf.errors.OmegaConfBaseException as err:
      raise _omegaconf_error(err, "compare.grid") from None
    point = cast(Config, OmegaConf.to_object(node))
    for variant in variants:
      for seed in config.compare.seeds:
        run = copy.deepcopy(point)
        run.loss = copy.deepcopy(variant)
        run.train.seed = seed
        run.compare = CompareConfig()
        grid_part = [f"{k.split('.')[-1]}={v}" for k, v in zip(grid_keys, values)]
        run.name = "__".join(grid_part + [loss_label(variant)])
        runs.append(run)
  return runs
