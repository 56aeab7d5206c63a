"""Data sets (built-in, MNIST-1D, the user's arrays): splits, label noise, checks, batch order."""

import numpy as np
import pytest

from xent_jax.train import train_and_evaluate
from xent_jax.train.config import ConfigError, DataConfig, load_config
from xent_jax.train.data import (
  DataError,
  Dataset,
  add_label_noise,
  eval_batches,
  load_dataset,
  pydoc_text,
  train_batch,
)


@pytest.mark.parametrize("noise_type", ["symmetric", "asymmetric"])
def test_label_noise_rate_and_kind(noise_type):
  y_N = np.random.default_rng(0).integers(0, 10, size=1000).astype(np.int32)
  noisy_N, mask_N = add_label_noise(
    y_N, rate=0.4, noise_type=noise_type, num_classes=10, rng=np.random.default_rng(1)
  )
  assert mask_N.sum() == 400
  np.testing.assert_array_equal(noisy_N[~mask_N], y_N[~mask_N])
  assert np.all(noisy_N[mask_N] != y_N[mask_N])
  assert np.all((noisy_N >= 0) & (noisy_N < 10))
  if noise_type == "asymmetric":
    np.testing.assert_array_equal(noisy_N[mask_N], (y_N[mask_N] + 1) % 10)
  else:  # every wrong class is reachable
    assert len(np.unique((noisy_N[mask_N] - y_N[mask_N]) % 10)) == 9


@pytest.mark.parametrize("name", ["digits", "gaussian_mixture"])
def test_noise_touches_only_the_training_labels(name):
  clean = load_dataset(DataConfig(name=name))
  noisy = load_dataset(DataConfig(name=name, label_noise=0.4))
  np.testing.assert_array_equal(clean.x_train_NxF, noisy.x_train_NxF)
  np.testing.assert_array_equal(clean.x_test_MxF, noisy.x_test_MxF)
  np.testing.assert_array_equal(clean.y_test_M, noisy.y_test_M)
  changed_N = clean.y_train_N != noisy.y_train_N
  np.testing.assert_array_equal(changed_N, noisy.noise_mask_N)
  assert changed_N.sum() == round(0.4 * len(changed_N))
  # The held-out part of the training data is as noisy as the rest of it.
  np.testing.assert_array_equal(clean.x_holdout_HxF, noisy.x_holdout_HxF)
  changed_H = clean.y_holdout_H != noisy.y_holdout_H
  assert changed_H.sum() == round(0.4 * len(changed_H))


def test_digits_split_is_disjoint_and_complete():
  data = load_dataset(DataConfig(name="digits", test_fraction=0.2, holdout_fraction=0.1))
  assert len(data.y_train_N) + len(data.y_holdout_H) + len(data.y_test_M) == 1797
  assert len(data.y_test_M) == round(0.2 * 1797)
  assert len(data.y_holdout_H) == round(0.1 * (1797 - len(data.y_test_M)))
  splits = [
    {row.tobytes() for row in x} for x in (data.x_train_NxF, data.x_holdout_HxF, data.x_test_MxF)
  ]
  for i, j in ((0, 1), (0, 2), (1, 2)):
    assert len(splits[i] & splits[j]) <= 5  # a handful of digits images are exact duplicates
  assert load_dataset(DataConfig(name="digits"), image=True).x_train_NxF.shape[1:] == (8, 8, 1)


def test_batch_order_depends_only_on_seed_and_step():
  data = load_dataset(DataConfig(name="digits"))
  steps_per_epoch = len(data.y_train_N) // 32
  first = [train_batch(data, seed=3, step=s, batch_size=32)[1] for s in range(steps_per_epoch + 2)]
  again = [train_batch(data, seed=3, step=s, batch_size=32)[1] for s in range(steps_per_epoch + 2)]
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  other = train_batch(data, seed=4, step=0, batch_size=32)[1]
  assert not np.array_equal(first[0], other)
  # One epoch visits distinct examples (Gaussian-mixture rows are all different).
  mixture = load_dataset(DataConfig(name="gaussian_mixture"))
  x_epoch = np.concatenate(
    [
      train_batch(mixture, seed=3, step=s, batch_size=32)[0]
      for s in range(len(mixture.y_train_N) // 32)
    ]
  )
  assert len(np.unique(x_epoch, axis=0)) == len(x_epoch) == (len(mixture.y_train_N) // 32) * 32


def test_process_shares_make_the_global_batch():
  data = load_dataset(DataConfig(name="gaussian_mixture"))
  x_full, y_full = train_batch(data, seed=0, step=5, batch_size=32)
  parts = [
    train_batch(data, seed=0, step=5, batch_size=32, process_index=i, process_count=4)
    for i in range(4)
  ]
  np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x_full)
  np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y_full)


def test_char_corpus_windows_are_shifted_by_one():
  config = DataConfig(name="pydoc_chars", seq_len=16, max_eval_tokens=1000)
  data = load_dataset(config)
  text = pydoc_text()
  assert len(text) > 400_000 and data.is_lm
  assert data.num_classes == len(set(text))
  x_BxL, y_BxL = train_batch(data, seed=0, step=7, batch_size=4)
  assert x_BxL.shape == y_BxL.shape == (4, 16)
  np.testing.assert_array_equal(x_BxL[:, 1:], y_BxL[:, :-1])
  np.testing.assert_array_equal(data.x_test_MxF[:, 1:], data.y_test_M[:, :-1])
  assert data.x_test_MxF.size <= 1000
  # Token ids map back to the characters of the text in order.
  vocab = sorted(set(text))
  train_text = "".join(vocab[i] for i in data.x_train_NxF[:200])
  assert train_text == text[:200]


def test_eval_batches_pad_and_mask():
  data = load_dataset(DataConfig(name="digits"))
  batches = list(eval_batches(data, batch_size=128))
  assert all(len(x) == 128 for x, _, _ in batches)
  assert sum(valid.sum() for _, _, valid in batches) == len(data.y_test_M)
  np.testing.assert_array_equal(np.concatenate([y[v] for _, y, v in batches]), data.y_test_M)


def test_holdout_batches_cover_the_holdout_split():
  data = load_dataset(DataConfig(name="gaussian_mixture", holdout_fraction=0.25))
  batches = list(eval_batches(data, batch_size=64, split="holdout"))
  np.testing.assert_array_equal(np.concatenate([y[v] for _, y, v in batches]), data.y_holdout_H)
  assert len(data.y_holdout_H) == round(0.25 * 0.8 * 2000)
  assert (
    len(load_dataset(DataConfig(name="gaussian_mixture", holdout_fraction=0.0)).y_holdout_H) == 0
  )


def test_holdout_batches_of_a_data_set_without_holdout_name_split():
  x, y = np.zeros((4, 2), np.float32), np.zeros(4, np.int32)
  data = Dataset(x, y, x, y, num_classes=2)
  with pytest.raises(ValueError, match=r"`split`.*'holdout'"):
    list(eval_batches(data, batch_size=2, split="holdout"))


def test_char_corpus_holdout_comes_from_the_training_text():
  data = load_dataset(
    DataConfig(name="pydoc_chars", seq_len=16, max_eval_tokens=512, holdout_fraction=0.1)
  )
  full = load_dataset(
    DataConfig(name="pydoc_chars", seq_len=16, max_eval_tokens=512, holdout_fraction=0.0)
  )
  num_train = len(full.x_train_NxF)
  assert len(data.x_train_NxF) == num_train - round(0.1 * num_train)
  # The held-out windows start where the (shortened) training text ends, inside the old one.
  np.testing.assert_array_equal(
    data.x_holdout_HxF[0], full.x_train_NxF[len(data.x_train_NxF) :][:16]
  )
  np.testing.assert_array_equal(data.x_holdout_HxF[:, 1:], data.y_holdout_H[:, :-1])
  np.testing.assert_array_equal(data.x_test_MxF, full.x_test_MxF)


def test_mnist1d_is_generated_offline_like_the_package():
  from mnist1d.data import get_dataset_args, make_dataset  # the package itself, as reference

  rng_state = np.random.get_state()[1].copy()
  data = load_dataset(DataConfig(name="mnist1d", holdout_fraction=0.1))
  np.testing.assert_array_equal(np.random.get_state()[1], rng_state)  # global NumPy RNG untouched
  reference = make_dataset(get_dataset_args())
  assert data.x_train_NxF.shape == (3600, 40) and data.x_holdout_HxF.shape == (400, 40)
  assert data.x_test_MxF.shape == (1000, 40) and data.num_classes == 10
  np.testing.assert_allclose(data.x_test_MxF, reference["x_test"], rtol=1e-6)
  np.testing.assert_array_equal(data.y_test_M, reference["y_test"])
  ours = np.concatenate([data.x_train_NxF, data.x_holdout_HxF])
  order_ours, order_ref = np.lexsort(ours.T), np.lexsort(reference["x"].T)
  np.testing.assert_allclose(ours[order_ours], reference["x"][order_ref], rtol=1e-6)
  labels = np.concatenate([data.y_train_N, data.y_holdout_H])
  np.testing.assert_array_equal(labels[order_ours], reference["y"][order_ref])


def _arrays(rng, num_features=6, num_classes=3):
  return {
    "x_train": rng.normal(size=(50, num_features)).astype(np.float32),
    "y_train": rng.integers(0, num_classes, 50),
    "x_test": rng.normal(size=(20, num_features)),
    "y_test": rng.integers(0, num_classes, 20).astype(np.int32),
  }


@pytest.mark.parametrize("layout", ["npz", "npy_dir"])
def test_own_arrays_are_read_split_and_noised(tmp_path, layout):
  arrays = _arrays(np.random.default_rng(0))
  if layout == "npz":
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
  else:
    path = tmp_path / "arrays"
    path.mkdir()
    for key, value in arrays.items():
      np.save(path / f"{key}.npy", value)
  config = DataConfig(
    name="arrays", path=str(path), num_classes=3, holdout_fraction=0.2, label_noise=0.4
  )
  data = load_dataset(config)
  np.testing.assert_allclose(data.x_test_MxF, arrays["x_test"].astype(np.float32))
  np.testing.assert_array_equal(data.y_test_M, arrays["y_test"])
  assert data.x_train_NxF.dtype == np.float32 and data.y_train_N.dtype == np.int32
  assert len(data.y_train_N) == 40 and len(data.y_holdout_H) == 10 and data.num_classes == 3
  # Every training example is one of the file's, with its label replaced where the mask says so.
  rows = {row.tobytes(): label for row, label in zip(arrays["x_train"], arrays["y_train"])}
  clean_N = np.array([rows[row.tobytes()] for row in data.x_train_NxF])
  np.testing.assert_array_equal(clean_N != data.y_train_N, data.noise_mask_N)
  assert data.noise_mask_N.sum() == round(0.4 * 40)


@pytest.mark.parametrize(
  "change,message",
  [
    (lambda a: a.pop("y_test"), r"missing key\(s\) \['y_test'\]"),
    (
      lambda a: a.update(y_train=a["y_train"].astype(np.float32)),
      r"key 'y_train'.*integer class ids",
    ),
    (lambda a: a.update(x_test=a["x_test"][:, :4]), r"key 'x_train'.*\(6,\).*key 'x_test'.*\(4,\)"),
    (
      lambda a: a.update(y_test=a["y_test"][:5]),
      r"key 'x_test' has 20 examples.*key 'y_test' has 5",
    ),
    (
      lambda a: a["y_train"].__setitem__(7, 3),
      r"key 'y_train'.*\[0, data.num_classes=3\).*3 at index 7",
    ),
    (lambda a: a["x_train"].__setitem__((2, 2), np.nan), r"key 'x_train'.*NaN"),
    (lambda a: a.update(x_train=a["x_train"][:, 0]), r"key 'x_train'.*\[N, features...\]"),
  ],
)
def test_bad_arrays_name_the_file_and_key(tmp_path, change, message):
  arrays = _arrays(np.random.default_rng(1))
  change(arrays)
  np.savez(tmp_path / "bad.npz", **arrays)
  with pytest.raises(DataError, match=r"bad\.npz.*" + message):
    load_dataset(DataConfig(name="arrays", path=str(tmp_path / "bad.npz"), num_classes=3))


def test_missing_npy_file_is_named(tmp_path):
  for key, value in _arrays(np.random.default_rng(2)).items():
    if key != "x_test":
      np.save(tmp_path / f"{key}.npy", value)
  with pytest.raises(DataError, match=r"x_test\.npy"):
    load_dataset(DataConfig(name="arrays", path=str(tmp_path), num_classes=3))


def test_config_refuses_missing_arrays_and_a_2d_cnn_on_signals(tmp_path):
  with pytest.raises(ConfigError, match=r"'data.path'.*'arrays'.*nowhere\.npz"):
    load_config(None, ("data.name=arrays", f"data.path={tmp_path / 'nowhere.npz'}"))
  with pytest.raises(ConfigError, match=r"'model.name' is 'cnn'.*'mnist1d'.*mnist1d_cnn"):
    load_config(None, ("data.name=mnist1d", "model.name=cnn"))


@pytest.mark.slow
@pytest.mark.parametrize("model,shape", [("mnist1d_cnn", (12,)), ("cnn", (6, 6))])
def test_own_arrays_train_end_to_end_with_noise_and_temperature(tmp_path, model, shape):
  """A run on the user's arrays: noisy labels, any model, a temperature from held-out data."""
  rng = np.random.default_rng(3)
  y_train, y_test = rng.integers(0, 4, 400), rng.integers(0, 4, 100)
  means = rng.normal(size=(4,) + shape)
  np.savez(
    tmp_path / "mine.npz",
    x_train=means[y_train] + rng.normal(size=(400,) + shape),
    y_train=y_train,
    x_test=means[y_test] + rng.normal(size=(100,) + shape),
    y_test=y_test,
  )
  config = load_config(
    None,
    (
      "data.name=arrays",
      f"data.path={tmp_path / 'mine.npz'}",
      "data.num_classes=4",
      "data.label_noise=0.2",
      f"model.name={model}",
      "model.channels=[4]",
      "train.num_steps=30",
      "train.batch_size=32",
      "train.eval_every=15",
      "train.eval_batch_size=64",
      "train.checkpoint_every=0",
    ),
  )
  summary = train_and_evaluate(config, tmp_path / "run", progress=False)
  final = summary["final"]
  assert 0.0 < final["eval/temperature"] < 100.0
  assert {"eval/ece_ts", "eval/adaptive_ece", "eval/classwise_ece", "eval/mce"} <= set(final)
  assert sum(summary["calibration_counts_ts"]["count"]) == 100  # the whole test split, once
