"""Offline data sets: label noise on the training split only, deterministic batch order."""

import numpy as np
import pytest

from xent_jax.train.config import DataConfig
from xent_jax.train.data import add_label_noise, eval_batches, load_dataset, pydoc_text, train_batch


@pytest.mark.parametrize("noise_type", ["symmetric", "asymmetric"])
def test_label_noise_rate_and_kind(noise_type):
  y_N = np.random.default_rng(0).integers(0, 10, size=1000).astype(np.int32)
  noisy_N, mask_N = add_label_noise(y_N, rate=0.4, noise_type=noise_type, num_classes=10,
                                    rng=np.random.default_rng(1))
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


def test_digits_split_is_disjoint_and_complete():
  data = load_dataset(DataConfig(name="digits", test_fraction=0.2))
  assert len(data.y_train_N) + len(data.y_test_M) == 1797
  assert len(data.y_test_M) == round(0.2 * 1797)
  rows = {row.tobytes() for row in data.x_train_NxF} & {row.tobytes() for row in data.x_test_MxF}
  assert len(rows) <= 5  # a handful of digits images are exact duplicates in the raw data
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
  x_epoch = np.concatenate([train_batch(mixture, seed=3, step=s, batch_size=32)[0]
                            for s in range(len(mixture.y_train_N) // 32)])
  assert len(np.unique(x_epoch, axis=0)) == len(x_epoch) == (len(mixture.y_train_N) // 32) * 32


def test_process_shares_make_the_global_batch():
  data = load_dataset(DataConfig(name="gaussian_mixture"))
  x_full, y_full = train_batch(data, seed=0, step=5, batch_size=32)
  parts = [train_batch(data, seed=0, step=5, batch_size=32, process_index=i, process_count=4)
           for i in range(4)]
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
