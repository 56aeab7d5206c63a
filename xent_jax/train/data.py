"""Offline data sets, label noise, a held-out split, and deterministic batch order.

Every data set is built from files that ship with the installed packages (scikit-learn's digits,
CPython's ``pydoc_data.topics``), generated from a seed (Gaussian mixture, MNIST-1D), or read from
the user's own arrays, so runs never download anything. The batch for a training step is a pure
function of (seed, step): resuming at step ``s`` replays exactly the batches an uninterrupted run
would have seen.

Splits: train / held-out / test. The held-out split is a fraction ``data.holdout_fraction`` of the
TRAINING data (labels as noisy as the training labels), never trained on; temperature scaling is
fitted on it, so the test split is only ever used for scoring.
"""

import dataclasses
import functools
import pathlib
from typing import Any

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
  x_holdout_HxF: np.ndarray | None = None  # held out of the training data, laid out like test
  y_holdout_H: np.ndarray | None = None


def without_rows(data: Dataset) -> Dataset:
  """``data`` with every array emptied to 0 rows: its example shapes, dtypes, number of classes
  and sequence length stay. What a compiled program kept for later runs may close over, instead
  of the arrays of the first run's data set. Every array field is emptied, so one added to
  `Dataset` later is too."""
  emptied: dict[str, Any] = {
    field.name: np.empty((0, *value.shape[1:]), value.dtype)
    for field in dataclasses.fields(data)
    if getattr(value := getattr(data, field.name), "ndim", 0) >= 1
  }
  return dataclasses.replace(data, **emptied)


def _split(x_NxF, y_N, fraction, rng):
  """``(x_rest, y_rest, x_part, y_part)``: a random ``fraction`` of the rows split off."""
  perm_N = rng.permutation(len(y_N))
  num_part = round(fraction * len(y_N))
  part, rest = perm_N[:num_part], perm_N[num_part:]
  return x_NxF[rest], y_N[rest], x_NxF[part], y_N[part]


def add_label_noise(
  y_N: np.ndarray, *, rate: float, noise_type: str, num_classes: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """Corrupts a fraction ``rate`` of labels.

  ``symmetric``: each chosen label is replaced by one of the other ``K - 1`` classes uniformly.
  ``asymmetric``: each chosen label ``y`` becomes ``(y + 1) mod K`` (a fixed class-flip pairing,
  the structured noise of Patrini et al., 2017, without its hand-picked digit pairs).
  Exactly ``round(rate * N)`` labels are changed.

  Returns:
    (noisy labels ``[N]``, boolean mask ``[N]`` of the changed positions).
  """
  num_noisy = round(rate * len(y_N))
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


class DataError(ValueError):
  """Arrays of ``data.name: arrays`` that are missing, mis-shaped, mis-typed or mislabelled."""


ARRAY_KEYS = ("x_train", "y_train", "x_test", "y_test")


@functools.cache
def _mnist1d():
  """MNIST-1D (Greydanus 2020) generated offline with the package's default arguments.

  ``mnist1d.data.make_dataset`` builds the 5000 examples from the 10 templates with its seed (42),
  4000 train and 1000 test, ``[N, 40]`` signals; ``get_dataset`` is avoided because it downloads.
  The package seeds NumPy's and Python's global generators, so their states are restored after.
  """
  import random  # pylint: disable=import-outside-toplevel

  from mnist1d.data import get_dataset_args, make_dataset  # pylint: disable=import-outside-toplevel

  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    data = make_dataset(get_dataset_args())
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)
  arrays = (
    data["x"].astype(np.float32),
    data["y"].astype(np.int32),
    data["x_test"].astype(np.float32),
    data["y_test"].astype(np.int32),
  )
  for array in arrays:
    array.flags.writeable = False  # shared by every run of a process
  return arrays


def _read_arrays(path_text: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """The four arrays of an ``.npz`` file or a directory of ``.npy`` files, and where each was."""
  path = pathlib.Path(path_text)
  if path.is_dir():
    files = {key: path / f"{key}.npy" for key in ARRAY_KEYS}
    missing = [str(f) for f in files.values() if not f.is_file()]
    if missing:
      raise DataError(
        f"data.path '{path}' is a directory without {missing}; it needs "
        f"{[f'{k}.npy' for k in ARRAY_KEYS]}"
      )
    arrays, where = {}, {}
    for key, file in files.items():
      try:
        arrays[key] = np.load(file, allow_pickle=False)
      except ValueError as err:
        raise DataError(f"{file}: not a plain .npy array ({err})") from None
      where[key] = str(file)
    return arrays, where
  if not path.is_file():
    raise DataError(
      f"data.path '{path_text}' is neither an .npz file nor a directory of .npy files"
    )
  try:
    with np.load(path, allow_pickle=False) as npz:
      missing = [key for key in ARRAY_KEYS if key not in npz.files]
      if missing:
        raise DataError(
          f"{path}: missing key(s) {missing}; it holds {sorted(npz.files)} and needs "
          f"{list(ARRAY_KEYS)}"
        )
      arrays = {key: npz[key] for key in ARRAY_KEYS}
  except (ValueError, OSError) as err:
    if isinstance(err, DataError):
      raise
    raise DataError(f"{path}: not a readable .npz file of plain arrays ({err})") from None
  return arrays, {key: f"{path} key '{key}'" for key in ARRAY_KEYS}


def _check_arrays(arrays: dict[str, np.ndarray], where: dict[str, str], num_classes: int) -> None:
  """Raises `DataError` naming the file and key of the first array that breaks a rule."""
  for split in ("train", "test"):
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    x_at, y_at = where[f"x_{split}"], where[f"y_{split}"]
    if x.dtype.kind not in "fiu":
      raise DataError(f"{x_at}: expected numeric features (float or integer), got dtype {x.dtype}")
    if x.ndim < 2:
      raise DataError(f"{x_at}: expected shape [N, features...], got {x.shape}")
    if y.dtype.kind not in "iu":
      raise DataError(f"{y_at}: expected integer class ids, got dtype {y.dtype}")
    if y.ndim != 1:
      raise DataError(f"{y_at}: expected shape [N], got {y.shape}")
    if len(x) != len(y):
      raise DataError(f"{x_at} has {len(x)} examples but {y_at} has {len(y)}")
    if not len(y):
      raise DataError(f"{x_at}: the {split} split is empty")
    if not np.all(np.isfinite(x)):
      raise DataError(f"{x_at}: has NaN or infinite values")
    bad_N = (y < 0) | (y >= num_classes)
    if bad_N.any():
      index = int(np.flatnonzero(bad_N)[0])
      raise DataError(
        f"{y_at}: labels must lie in [0, data.num_classes={num_classes}); found "
        f"{y[index]} at index {index}"
      )
  if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
    raise DataError(
      f"{where['x_train']} has examples of shape {arrays['x_train'].shape[1:]} but "
      f"{where['x_test']} has {arrays['x_test'].shape[1:]}"
    )


def _arrays(config: DataConfig):
  arrays, where = _read_arrays(config.path)
  _check_arrays(arrays, where, config.num_classes)
  return (
    arrays["x_train"].astype(np.float32),
    arrays["y_train"].astype(np.int32),
    arrays["x_test"].astype(np.float32),
    arrays["y_test"].astype(np.int32),
  )


def pydoc_text() -> str:
  """CPython's bundled help text (``pydoc_data.topics``), topics in sorted order."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel

  return "\n".join(topics.topics[key] for key in sorted(topics.topics))


def _windows(ids_T: np.ndarray, seq_len: int, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """Consecutive ``[M, L]`` input windows of a token stream and their targets shifted by one."""
  num_windows = min(max_tokens, len(ids_T) - 1) // seq_len
  span = num_windows * seq_len
  return ids_T[:span].reshape(num_windows, seq_len), ids_T[1 : span + 1].reshape(
    num_windows, seq_len
  )


def _pydoc_chars(config: DataConfig) -> Dataset:
  text = pydoc_text()
  codes_T = np.frombuffer(text.encode("utf-32-le"), np.uint32)
  vocab_V = np.unique(codes_T)
  ids_T = np.searchsorted(vocab_V, codes_T).astype(np.int32)
  num_test = round(config.test_fraction * len(ids_T))
  train_T, test_T = ids_T[:-num_test], ids_T[-num_test:]
  num_holdout = round(config.holdout_fraction * len(train_T))
  train_T, holdout_T = train_T[: len(train_T) - num_holdout], train_T[len(train_T) - num_holdout :]
  x_test, y_test = _windows(test_T, config.seq_len, config.max_eval_tokens)
  x_holdout, y_holdout = _windows(holdout_T, config.seq_len, config.max_eval_tokens)
  return Dataset(
    train_T,
    np.zeros(0, np.int32),
    x_test,
    y_test,
    len(vocab_V),
    True,
    config.seq_len,
    x_holdout_HxF=x_holdout,
    y_holdout_H=y_holdout,
  )


def load_dataset(config: DataConfig, *, image: bool = False) -> Dataset:
  """Builds the data set named by ``config.name``: train / held-out / test, noisy training labels.

  ``digits`` and ``gaussian_mixture`` are split with ``config.test_fraction``; ``mnist1d`` and
  ``arrays`` bring their own test split. A fraction ``config.holdout_fraction`` of the training
  split is then held out, and ``config.label_noise`` corrupts the labels of the training and the
  held-out parts alike (the test labels stay clean).

  Args:
    config: the data section of the experiment config.
    image: digits as ``[8, 8, 1]`` images (for the 2-D CNN) instead of 64 features.

  Raises:
    DataError: ``arrays`` whose file, keys, shapes, dtypes or labels are wrong.
  """
  if config.name == "pydoc_chars":
    return _pydoc_chars(config)
  if config.name in ("mnist1d", "arrays"):
    x_train, y_train, x_test, y_test = _mnist1d() if config.name == "mnist1d" else _arrays(config)
    num_classes = 10 if config.name == "mnist1d" else config.num_classes
  else:
    x_NxF, y_N, num_classes = (
      _digits(image) if config.name == "digits" else _gaussian_mixture(config)
    )
    x_train, y_train, x_test, y_test = _split(
      x_NxF, y_N, config.test_fraction, np.random.default_rng([config.seed, 0])
    )
  x_train, y_train, x_holdout, y_holdout = _split(
    x_train, y_train, config.holdout_fraction, np.random.default_rng([config.seed, 3])
  )
  mask_N = np.zeros(len(y_train), bool)
  if config.label_noise > 0:
    noise: dict[str, Any] = dict(
      rate=config.label_noise, noise_type=config.noise_type, num_classes=num_classes
    )
    y_train, mask_N = add_label_noise(y_train, **noise, rng=np.random.default_rng([config.seed, 2]))
    y_holdout, _ = add_label_noise(y_holdout, **noise, rng=np.random.default_rng([config.seed, 4]))
  return Dataset(
    x_train,
    y_train,
    x_test,
    y_test,
    num_classes,
    noise_mask_N=mask_N,
    x_holdout_HxF=x_holdout,
    y_holdout_H=y_holdout,
  )


def train_batch(
  data: Dataset,
  *,
  seed: int,
  step: int,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
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
  perm_N = _epoch_order(seed, epoch, len(data.y_train_N))
  idx_B = perm_N[index * batch_size : (index + 1) * batch_size][lo:hi]
  return data.x_train_NxF[idx_B], data.y_train_N[idx_B]


@functools.lru_cache(maxsize=256)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """The permutation of ``n`` training examples in ``epoch`` for ``seed`` (read-only): drawn once
  per epoch, not once per step (a vectorized group asks for every member's at every step)."""
  order = np.random.default_rng([seed, epoch]).permutation(n)
  order.flags.writeable = False
  return order


def eval_batches(data: Dataset, *, batch_size: int, split: str = "test"):
  """Yields ``(x, y, valid)`` batches of the ``test`` or ``holdout`` split, the last one padded.

  Padding rows are zeros with ``valid`` False.
  """
  x_all, y_all = (
    (data.x_test_MxF, data.y_test_M) if split == "test" else (data.x_holdout_HxF, data.y_holdout_H)
  )
  if x_all is None or y_all is None:
    raise ValueError(f"eval_batches: `split` must be a split this data set holds, got {split!r}.")
  for start in range(0, len(x_all), batch_size):
    x, y = x_all[start : start + batch_size], y_all[start : start + batch_size]
    valid_B = np.ones(len(x), bool)
    pad = batch_size - len(x)
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros((pad,) + y.shape[1:], y.dtype)])
      valid_B = np.concatenate([valid_B, np.zeros(pad, bool)])
    yield x, y, valid_B
