"""Offline data sets, label noise, and deterministic batch order.

Every data set is built from files that ship with the installed packages (scikit-learn's digits,
CPython's ``pydoc_data.topics``) or generated from a seed, so runs never download anything. The
batch for a training step is a pure function of (seed, step): resuming at step ``s`` replays
exactly the batches an uninterrupted run would have seen.
"""

import dataclasses

import numpy as np

from xent_jax.train.config import DataConfig


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Arrays of one data set, already split; labels of the training split may be noisy.

  For classification, ``x_train_NxF`` holds examples (F = feature shape) and ``y_train_N`` class
  ids. For character language modelling, ``x_train_NxF`` is the training text as token ids
  ``[T]`` and the ``y`` arrays are unused; batches are random windows of it.
  """
  x_train_NxF: np.ndarray
  y_train_N: np.ndarray
  x_test_MxF: np.ndarray
  y_test_M: np.ndarray
  num_classes: int
  is_lm: bool = False
  seq_len: int = 0
  noise_mask_N: np.ndarray | None = None  # True where a training label was corrupted


def _split(x_NxF, y_N, test_fraction, rng):
  perm_N = rng.permutation(len(y_N))
  num_test = int(round(test_fraction * len(y_N)))
  test, train = perm_N[:num_test], perm_N[num_test:]
  return x_NxF[train], y_N[train], x_NxF[test], y_N[test]


def add_label_noise(y_N: np.ndarray, *, rate: float, noise_type: str, num_classes: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Corrupts a fraction ``rate`` of labels.

  ``symmetric``: each chosen label is replaced by one of the other ``K - 1`` classes uniformly.
  ``asymmetric``: each chosen label ``y`` becomes ``(y + 1) mod K`` (a fixed class-flip pairing,
  the structured noise of Patrini et al., 2017, without its hand-picked digit pairs).
  Exactly ``round(rate * N)`` labels are changed.

  Returns:
    (noisy labels ``[N]``, boolean mask ``[N]`` of the changed positions).
  """
  num_noisy = int(round(rate * len(y_N)))
  mask_N = np.zeros(len(y_N), bool)
  mask_N[rng.permutation(len(y_N))[:num_noisy]] = True
  if noise_type == "symmetric":
    shift_N = rng.integers(1, num_classes, size=len(y_N))
  else:
    shift_N = np.ones(len(y_N), np.int64)
  noisy_N = np.where(mask_N, (y_N + shift_N) % num_classes, y_N)
  return noisy_N.astype(np.int32), mask_N


def _digits(image: bool):
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

  digits = load_digits()
  x_NxF = (digits.images if image else digits.data).astype(np.float32) / 16.0
  if image:
    x_NxF = x_NxF[..., None]  # [N, 8, 8, 1]
  return x_NxF, digits.target.astype(np.int32), 10


def _gaussian_mixture(config: DataConfig):
  rng = np.random.default_rng([config.seed, 1])
  means_KxF = rng.normal(size=(config.num_classes, config.num_features))
  means_KxF *= config.class_separation / np.sqrt(config.num_features)
  y_N = rng.integers(0, config.num_classes, size=config.num_examples).astype(np.int32)
  x_NxF = means_KxF[y_N] + rng.normal(size=(config.num_examples, config.num_features))
  return x_NxF.astype(np.float32), y_N, config.num_classes


def pydoc_text() -> str:
  """CPython's bundled help text (``pydoc_data.topics``), topics in sorted order."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel

  return "\n".join(topics.topics[key] for key in sorted(topics.topics))


def _pydoc_chars(config: DataConfig) -> Dataset:
  text = pydoc_text()
  codes_T = np.frombuffer(text.encode("utf-32-le"), np.uint32)
  vocab_V = np.unique(codes_T)
  ids_T = np.searchsorted(vocab_V, codes_T).astype(np.int32)
  num_test = int(round(config.test_fraction * len(ids_T)))
  train_T, test_T = ids_T[:-num_test], ids_T[-num_test:]
  num_windows = min(config.max_eval_tokens, len(test_T) - 1) // config.seq_len
  span = num_windows * config.seq_len
  x_test = test_T[:span].reshape(num_windows, config.seq_len)
  y_test = test_T[1:span + 1].reshape(num_windows, config.seq_len)
  return Dataset(train_T, np.zeros(0, np.int32), x_test, y_test, len(vocab_V), True, config.seq_len)


def load_dataset(config: DataConfig, *, image: bool = False) -> Dataset:
  """Builds the data set named by ``config.name`` (split, then noise on the training split)."""
  if config.name == "pydoc_chars":
    return _pydoc_chars(config)
  if config.name == "digits":
    x_NxF, y_N, num_classes = _digits(image)
  else:
    x_NxF, y_N, num_classes = _gaussian_mixture(config)
  rng = np.random.default_rng([config.seed, 0])
  x_train, y_train, x_test, y_test = _split(x_NxF, y_N, config.test_fraction, rng)
  mask_N = np.zeros(len(y_train), bool)
  if config.label_noise > 0:
    y_train, mask_N = add_label_noise(
        y_train, rate=config.label_noise, noise_type=config.noise_type,
        num_classes=num_classes, rng=np.random.default_rng([config.seed, 2]))
  return Dataset(x_train, y_train, x_test, y_test, num_classes, noise_mask_N=mask_N)


def train_batch(data: Dataset, *, seed: int, step: int, batch_size: int,
                process_index: int = 0, process_count: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """This process's share of the global training batch of ``step``.

  Classification: each epoch is a fresh permutation drawn from ``default_rng([seed, epoch])``;
  the incomplete last batch of an epoch is dropped. Language modelling: ``batch_size`` windows
  at offsets drawn from ``default_rng([seed, step])``. Either way the batch depends only on
  (seed, step), which is the whole data-order state a checkpoint needs.

  Returns:
    ``(x_BxF, y_B)`` or, for language modelling, ``(x_BxL, y_BxL)`` with ``y`` shifted by one.
  """
  local = batch_size // process_count
  lo, hi = process_index * local, (process_index + 1) * local
  if data.is_lm:
    rng = np.random.default_rng([seed, step])
    starts_B = rng.integers(0, len(data.x_train_NxF) - data.seq_len - 1, size=batch_size)[lo:hi]
    offsets_BxL = starts_B[:, None] + np.arange(data.seq_len)[None, :]
    return data.x_train_NxF[offsets_BxL], data.x_train_NxF[offsets_BxL + 1]
  steps_per_epoch = len(data.y_train_N) // batch_size
  epoch, index = divmod(step, steps_per_epoch)
  perm_N = np.random.default_rng([seed, epoch]).permutation(len(data.y_train_N))
  idx_B = perm_N[index * batch_size:(index + 1) * batch_size][lo:hi]
  return data.x_train_NxF[idx_B], data.y_train_N[idx_B]


def eval_batches(data: Dataset, *, batch_size: int):
  """Yields ``(x, y, valid)`` batches of the test split, the last one padded (valid False)."""
  num = len(data.x_test_MxF)
  for start in range(0, num, batch_size):
    x, y = data.x_test_MxF[start:start + batch_size], data.y_test_M[start:start + batch_size]
    valid_B = np.ones(len(x), bool)
    pad = batch_size - len(x)
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros((pad,) + y.shape[1:], y.dtype)])
      valid_B = np.concatenate([valid_B, np.zeros(pad, bool)])
    yield x, y, valid_B
