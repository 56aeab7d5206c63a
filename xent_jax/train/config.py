"""Typed experiment configs: OmegaConf structured dataclasses, safe YAML, dotted overrides.

The schema below is the single source of truth for what a config may contain. `load_config`
merges a YAML file and ``key.sub=value`` overrides onto it; OmegaConf rejects unknown keys and
wrong types, and `validate` checks the names (loss, model, data set, optimizer, schedule) against
the registries, so every mistake fails before any computation with a `ConfigError` naming the key
and the allowed values.
"""

import copy
import dataclasses
import itertools
import pathlib
from typing import Any

import omegaconf
import yaml
from omegaconf import OmegaConf


class ConfigError(ValueError):
  """A config that does not match the schema or names something unknown."""


@dataclasses.dataclass
class DataConfig:
  """Which data set, its split and the label noise applied to the training split."""
  name: str = "digits"  # digits | gaussian_mixture | pydoc_chars
  seed: int = 0  # split, synthetic data and label noise; fixed across training seeds
  test_fraction: float = 0.2
  label_noise: float = 0.0  # fraction of training labels replaced
  noise_type: str = "symmetric"  # symmetric | asymmetric
  num_examples: int = 2000  # gaussian_mixture
  num_classes: int = 10  # gaussian_mixture
  num_features: int = 20  # gaussian_mixture
  class_separation: float = 3.0  # gaussian_mixture: distance scale of the class means
  seq_len: int = 64  # pydoc_chars: tokens per training window
  max_eval_tokens: int = 16384  # pydoc_chars: held-out tokens scored at each evaluation


@dataclasses.dataclass
class ModelConfig:
  """Which Flax NNX model and its sizes."""
  name: str = "mlp"  # mlp | cnn | transformer
  hidden_dims: list[int] = dataclasses.field(default_factory=lambda: [128])  # mlp
  channels: list[int] = dataclasses.field(default_factory=lambda: [16, 32])  # cnn
  model_dim: int = 128  # transformer
  num_layers: int = 2  # transformer
  num_heads: int = 4  # transformer
  mlp_ratio: int = 4  # transformer
  dtype: str = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)


@dataclasses.dataclass
class LossConfig:
  """A loss from the xent_jax registry, its hyper-parameters, and how the table labels it."""
  name: str = "cross_entropy"
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
  weight_decay: float = 1e-4  # adamw
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
  grid: dict[str, list[Any]] = dataclasses.field(default_factory=dict)  # "data.label_noise": [0, 0.4]


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
    "data.name": ("digits", "gaussian_mixture", "pydoc_chars"),
    "data.noise_type": ("symmetric", "asymmetric"),
    "model.name": ("mlp", "cnn", "transformer"),
    "model.dtype": ("float32", "bfloat16"),
    "optim.name": ("adam", "adamw", "sgd"),
    "optim.schedule": ("constant", "cosine", "warmup_cosine", "linear"),
}
FUSED_HPARAMS = ("label_smoothing", "smoothing", "z_loss", "logit_softcap", "token_chunk_size",
                 "vocab_chunk_size")


def _omegaconf_error(err: omegaconf.errors.OmegaConfBaseException, source: str) -> ConfigError:
  """Turns an OmegaConf error into a message naming the key and what it accepts."""
  key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
  message = str(err).splitlines()[0]
  if isinstance(err, (omegaconf.errors.ConfigKeyError, omegaconf.errors.ConfigAttributeError)):
    parent, _, _ = str(key).rpartition(".")
    node = OmegaConf.structured(Config)
    for part in filter(None, parent.split(".")):
      node = node[part] if part in node else None
      if node is None:
        break
    allowed = sorted(node.keys()) if isinstance(node, omegaconf.DictConfig) else []
    return ConfigError(f"{source}: unknown config key '{key}'; allowed keys here: {allowed}")
  return ConfigError(f"{source}: invalid value for config key '{key}': {message}")


def _read_yaml(path: str) -> dict[str, Any]:
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f"config file not found: '{path}'")
  with file.open() as f:
    try:
      data = yaml.safe_load(f)
    except yaml.YAMLError as err:
      raise ConfigError(f"{path}: not valid YAML: {err}") from None
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
  try:
    merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    config = OmegaConf.to_object(merged)
  except omegaconf.errors.OmegaConfBaseException as err:
    raise _omegaconf_error(err, "command-line override" if overrides else source) from None
  validate(config)
  for run_config in expand_grid(config):
    validate(run_config)
  return config


def validate(config: Config) -> None:
  """Checks names against the registries and the intervals against each other."""
  for key, allowed in ALLOWED_NAMES.items():
    section, field = key.split(".")
    value = getattr(getattr(config, section), field)
    if value not in allowed:
      raise ConfigError(f"config key '{key}' is {value!r}; allowed values: {list(allowed)}")
  for loss, key in [(config.loss, "loss")] + [
      (v, f"compare.variants[{i}]") for i, v in enumerate(config.compare.variants)]:
    validate_loss(loss, key, config.model.name)
  train = config.train
  for key in ("num_steps", "batch_size", "eval_every", "eval_batch_size", "num_ece_bins"):
    if getattr(train, key) <= 0:
      raise ConfigError(f"config key 'train.{key}' must be positive, got {getattr(train, key)}")
  if train.checkpoint_every < 0 or (train.checkpoint_every % train.eval_every):
    raise ConfigError(
        f"config key 'train.checkpoint_every' must be 0 or a multiple of train.eval_every "
        f"({train.eval_every}), got {train.checkpoint_every}")
  if config.optim.warmup_steps < 0 or config.optim.warmup_steps >= train.num_steps:
    raise ConfigError(f"config key 'optim.warmup_steps' must be in [0, train.num_steps="
                      f"{train.num_steps}), got {config.optim.warmup_steps}")
  if not 0.0 <= config.data.label_noise < 1.0:
    raise ConfigError(f"config key 'data.label_noise' must be in [0, 1), got {config.data.label_noise}")
  is_lm = config.data.name == "pydoc_chars"
  if is_lm != (config.model.name == "transformer"):
    raise ConfigError(
        f"config key 'model.name' is {config.model.name!r} but data.name is {config.data.name!r}: "
        "the transformer pairs with pydoc_chars, mlp and cnn with the classification data sets")


def validate_loss(loss: LossConfig, key: str, model_name: str) -> None:
  """Resolves a loss through the registry so that bad names fail now, not mid-run."""
  import xent_jax  # pylint: disable=import-outside-toplevel

  if loss.fused:
    if model_name != "transformer":
      raise ConfigError(f"config key '{key}.fused' needs model.name 'transformer', got {model_name!r}")
    if loss.name != "cross_entropy":
      raise ConfigError(f"config key '{key}.name' must be 'cross_entropy' when fused, got {loss.name!r}")
    unknown = sorted(set(loss.hparams) - set(FUSED_HPARAMS))
    if unknown:
      raise ConfigError(
          f"config key '{key}.hparams' has {unknown}, which the fused loss does not take; "
          f"allowed: {list(FUSED_HPARAMS)}")
    return
  try:
    xent_jax.get_loss(loss.name, **loss.hparams)
  except (ValueError, TypeError) as err:
    raise ConfigError(f"config key '{key}' (name={loss.name!r}, hparams={dict(loss.hparams)}): {err}") from None


def loss_label(loss: LossConfig) -> str:
  """The table name of a loss: its label, or name plus hyper-parameters."""
  if loss.label:
    return loss.label
  parts = [loss.name] + [f"{k}={v}" for k, v in sorted(loss.hparams.items())]
  return ("fused_" if loss.fused else "") + ",".join(parts)


def to_yaml(config: Config) -> str:
  """The resolved config as YAML (what each run directory records)."""
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
    for variant in variants:
      for seed in config.compare.seeds:
        node = OmegaConf.structured(config)
        try:
          for key, value in zip(grid_keys, values):
            OmegaConf.update(node, key, value, merge=False)
        except omegaconf.errors.OmegaConfBaseException as err:
          raise _omegaconf_error(err, "compare.grid") from None
        run = OmegaConf.to_object(node)
        run.loss = copy.deepcopy(variant)
        run.train.seed = seed
        run.compare = CompareConfig()
        grid_part = [f"{k.split('.')[-1]}={v}" for k, v in zip(grid_keys, values)]
        run.name = "__".join(grid_part + [loss_label(variant)])
        runs.append(run)
  return runs
