"""Config schema: overrides, shipped configs, grid expansion, and errors that name the key."""

import dataclasses
import pathlib

import pytest

from xent_jax.train.config import (
  NUMERIC_RULES,
  Config,
  ConfigError,
  expand_grid,
  load_config,
  to_yaml,
)

CONFIGS = sorted((pathlib.Path(__file__).parents[2] / "configs").glob("*.yaml"))


def test_overrides_are_typed_and_applied():
  config = load_config(
    None,
    (
      "train.num_steps=7",
      "optim.learning_rate=0.5",
      "model.hidden_dims=[4,5]",
      "loss.hparams={label_smoothing: 0.2}",
    ),
  )
  assert config.train.num_steps == 7
  assert config.optim.learning_rate == 0.5
  assert config.model.hidden_dims == [4, 5]
  assert config.loss.hparams == {"label_smoothing": 0.2}


def test_command_line_beats_file(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("name: x\ntrain:\n  num_steps: 3\n  batch_size: 16\n")
  config = load_config(str(path), ("train.num_steps=9",))
  assert (config.name, config.train.num_steps, config.train.batch_size) == ("x", 9, 16)
  assert config.workdir == "runs/x"  # interpolation resolved


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path):
  config = load_config(str(path))
  assert expand_grid(config)


def test_grid_is_variants_times_seeds_times_values(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text(
    "compare:\n  seeds: [0, 1, 2]\n  grid: {data.label_noise: [0.0, 0.4]}\n"
    "  variants:\n    - {name: cross_entropy}\n"
    "    - {name: cross_entropy, hparams: {label_smoothing: 0.1}, label: ls}\n"
  )
  runs = expand_grid(load_config(str(path)))
  assert len(runs) == 2 * 2 * 3
  groups = {(r.name, r.train.seed) for r in runs}
  assert len(groups) == len(runs)
  assert {r.data.label_noise for r in runs} == {0.0, 0.4}
  assert all(r.name.startswith(f"label_noise={r.data.label_noise}__") for r in runs)
  assert {r.loss.hparams.get("label_smoothing", 0.0) for r in runs if r.name.endswith("__ls")} == {
    0.1
  }
  # Runs of one grid point are copies of one config: changing one changes no other.
  runs[0].model.hidden_dims.append(7)
  runs[0].loss.hparams["label_smoothing"] = 0.3
  assert all(7 not in r.model.hidden_dims for r in runs[1:])
  assert all(r.loss.hparams.get("label_smoothing", 0.0) != 0.3 for r in runs[1:])


BAD_OVERRIDES = [
  # (override, words the message must contain)
  ("train.nums_steps=5", ["train.nums_steps", "num_steps"]),
  ("train.num_steps=many", ["train.num_steps"]),
  ("model.name=resnet", ["model.name", "mlp", "cnn", "transformer"]),
  ("data.name=mnist", ["data.name", "digits", "pydoc_chars"]),
  ("optim.name=rmsprop", ["optim.name", "adamw", "sgd"]),
  ("optim.schedule=step", ["optim.schedule", "cosine"]),
  ("data.noise_type=pairflip", ["data.noise_type", "asymmetric"]),
  ("loss.name=no_such_loss", ["loss", "no_such_loss", "cross_entropy"]),
  ("loss.hparams={not_an_option: 1}", ["loss", "not_an_option"]),
  ("train.checkpoint_every=15", ["train.checkpoint_every", "eval_every"]),
  ("data.label_noise=1.5", ["data.label_noise"]),
  ("optim.warmup_steps=100000", ["optim.warmup_steps", "num_steps"]),
  ("loss.fused=true", ["loss.fused", "transformer"]),
  ("model.name=transformer", ["model.name", "pydoc_chars"]),
  ("nonsense", ["nonsense", "key.sub=value"]),
]


@pytest.mark.parametrize("override,words", BAD_OVERRIDES, ids=[b[0] for b in BAD_OVERRIDES])
def test_bad_override_names_the_key(override, words):
  with pytest.raises(ConfigError) as info:
    load_config(None, (override,))
  for word in words:
    assert word in str(info.value)


BAD_FILES = [
  ("model:\n  hiden_dims: [3]\n", ["model.hiden_dims", "hidden_dims"]),
  ("train:\n  batch_size: [1]\n", ["train.batch_size"]),
  ("compare:\n  grid: {data.noise: [0.1]}\n", ["data.noise"]),
  (
    "compare:\n  variants:\n    - {name: cross_entropy}\n    - {name: nope}\n",
    ["compare.variants[1]", "nope"],
  ),
  ("- just\n- a list\n", ["top level", "mapping"]),
  ("train: {num_steps: 3\n", ["YAML"]),
  ("!!python/object:os.system {}\n", ["YAML"]),  # safe loading refuses Python tags
]


@pytest.mark.parametrize("text,words", BAD_FILES, ids=range(len(BAD_FILES)))
def test_bad_file_names_the_key(tmp_path, text, words):
  path = tmp_path / "bad.yaml"
  path.write_text(text)
  with pytest.raises(ConfigError) as info:
    load_config(str(path))
  for word in words:
    assert word in str(info.value)


def test_missing_file_names_the_path(tmp_path):
  missing = str(tmp_path / "absent.yaml")
  with pytest.raises(ConfigError, match="not found") as info:
    load_config(missing)
  assert missing in str(info.value)


def test_every_numeric_field_has_a_range_rule():
  """A numeric field added to the schema must get its range in NUMERIC_RULES (checked at load)."""
  numeric = set()
  for section in dataclasses.fields(Config):
    if dataclasses.is_dataclass(section.type):
      numeric |= {
        f"{section.name}.{field.name}"
        for field in dataclasses.fields(section.type)
        if field.type in (int, float, float | None, list[int], list[float])
      }
  assert numeric == set(NUMERIC_RULES)


@pytest.mark.parametrize(
  "override,words",
  [
    ("optim.learning_rate=-0.001", ["optim.learning_rate", "> 0"]),
    ("optim.learning_rate=inf", ["optim.learning_rate"]),
    ("data.test_fraction=-0.2", ["data.test_fraction", "(0, 1)"]),
    ("data.test_fraction=0", ["data.test_fraction"]),
    ("model.hidden_dims=[32,0]", ["model.hidden_dims", "every entry"]),
    ("data.num_classes=0", ["data.num_classes", ">= 2"]),
    ("optim.weight_decay=-0.1", ["optim.weight_decay", ">= 0"]),
    ("optim.grad_clip_norm=-1", ["optim.grad_clip_norm"]),
    ("model.num_heads=3", ["model.num_heads", "model.model_dim"]),
    ("compare.seeds=[1,1]", ["compare.seeds", "distinct"]),
    ("compare.seeds=[]", ["compare.seeds"]),
    ("compare.grid={data.label_noise: []}", ["compare.grid", "data.label_noise"]),
    (
      "compare.variants=[{name: focal}, {name: focal, hparams: {gamma: 1.0}, label: focal}]",
      ["compare.variants", "focal", "label"],
    ),
  ],
)
def test_out_of_range_values_name_the_key(override, words):
  with pytest.raises(ConfigError) as info:
    load_config(None, (override,))
  for word in words:
    assert word in str(info.value)


def test_grid_values_are_range_checked_too():
  with pytest.raises(ConfigError, match=r"optim\.learning_rate"):
    load_config(None, ("compare.grid={optim.learning_rate: [0.01, 0.0]}",))


def test_grid_sweeps_model_names():
  config = load_config(
    None,
    ("data.name=mnist1d", "compare.grid={model.name: [linear, mnist1d_cnn, mnist1d_gru]}"),
  )
  runs = expand_grid(config)
  assert [r.model.name for r in runs] == ["linear", "mnist1d_cnn", "mnist1d_gru"]
  assert [r.name for r in runs] == [f"name={r.model.name}__cross_entropy" for r in runs]
  with pytest.raises(ConfigError, match=r"'model\.name' is 'resnet'; allowed values: \['linear'"):
    load_config(None, ("data.name=mnist1d", "compare.grid={model.name: [linear, resnet]}"))
  with pytest.raises(ConfigError, match=r"'model\.name' is 'cnn' \(2-D images\)"):
    load_config(None, ("data.name=mnist1d", "compare.grid={model.name: [cnn]}"))


@pytest.mark.parametrize(
  "overrides,words",
  [
    (("model.conv=fft",), ["model.conv", "'lax', 'im2col'"]),
    (("model.name=cnn", "model.conv=im2col"), ["model.conv", "mnist1d_cnn"]),
  ],
)
def test_conv_form_is_checked(overrides, words):
  with pytest.raises(ConfigError) as err:
    load_config(None, overrides)
  for word in words:
    assert word in str(err.value)


@pytest.mark.parametrize(
  "override,words",
  [
    ("compare.group_mode=pmap", ["compare.group_mode", "'pmap'", "'vmap', 'map'"]),
    ("compare.group_memory_mb=0", ["compare.group_memory_mb", "> 0", "got 0"]),
    ("compare.group_memory_mb=-5", ["compare.group_memory_mb", "got -5"]),
  ],
)
def test_group_keys_are_checked(override, words):
  with pytest.raises(ConfigError) as err:
    load_config(None, (override,))
  for word in words:
    assert word in str(err.value)


def test_weight_decay_defaults_to_the_optimizers_own_and_round_trips(tmp_path):
  config = load_config(None, ("optim.name=adam",))
  assert config.optim.weight_decay is None
  path = tmp_path / "c.yaml"
  path.write_text(to_yaml(config))
  assert load_config(str(path)) == config
  assert load_config(None, ("optim.name=sgd", "optim.weight_decay=0.01")).optim.weight_decay == 0.01
