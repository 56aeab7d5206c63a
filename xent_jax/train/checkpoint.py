"""Orbax checkpoints of the training state, with a fingerprint to catch corrupt files.

Each checkpoint holds the model and optimizer state (a pytree of arrays, saved by
``ocp.args.StandardSave``) and a JSON record: the step, the data-order state (seed and step fully
determine the batch order, see `data.train_batch`) and a fingerprint of the arrays (per-leaf
float64 sum and sum of squares). Nothing is pickled.

The restore rule: never delete a checkpoint that may be valid. Restoring walks the steps from
newest to oldest. A step is skipped only on *verified* corruption, and then moved aside to
``checkpoints/corrupt-<step>/`` (never deleted):

- its JSON files do not parse (torn or overwritten), or the record lacks its step or fingerprint;
- tensorstore reports undecodable or truncated array data (``DATA_LOSS``, ``OUT_OF_RANGE``,
  "Error decoding", "Data corruption", "Truncated");
- the arrays load but do not match their saved fingerprint.

Every other failure stops the run with a `CheckpointError` and leaves the files as they were: a
file that cannot be opened (permission, I/O error; every file is opened before orbax reads any),
a missing file (deleted, or another orbax version's layout: not proof of bad data), arrays of
other shapes, dtypes or names than the current config builds (orbax would restore the saved
shapes silently, so they are compared first from the saved metadata), and any error not listed
above. The message says how to fall back by hand: move the checkpoint aside.

With several processes (``--distributed``) every process restores the same step and they decide
together: each reports its outcome (restored, verified corrupt, or stopped with its error) and
all processes see every report (`parallel.gather_text`). Any error stops every process: the one
that hit it raises its own error, the others an error that quotes it. Otherwise, if any process
verified corruption, process 0 moves the checkpoint aside, the others wait for the move, and all
re-read the directory before trying the next older step; so no process keeps a stale list of
steps. Restores read with a checkpointer of this process alone (no orbax barriers), so a read
that fails on one process leaves none of the others waiting.
"""

import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from xent_jax.train.parallel import gather_text

CORRUPT_PREFIX = "corrupt-"
REQUIRED_FILES = ("state/_METADATA", "record/metadata")  # what every committed checkpoint has
# Tensorstore's words for data it read but could not decode (see the module docstring).
_CORRUPT_DATA = re.compile(r"DATA_LOSS|OUT_OF_RANGE|Error decoding|Data corruption|Truncated")
_DENIED = re.compile(r"PERMISSION_DENIED|Permission denied")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored or saved, and may be valid: the run stops, files stay."""


class _Corrupt(Exception):
  """Verified corruption of one checkpoint (internal: the checkpoint is moved aside)."""


def fingerprint(tree) -> list[list[float]]:
  """Per-leaf ``[sum, sum of squares]`` in float64, in tree order."""
  leaves = jax.tree.leaves(jax.device_get(tree))
  return [
    [float(np.sum(np.asarray(x, np.float64))), float(np.sum(np.square(np.asarray(x, np.float64))))]
    for x in leaves
  ]


def _first_line(err: BaseException) -> str:
  text = str(err).strip()
  return text.splitlines()[0][:300] if text else type(err).__name__


def _chain(err: BaseException):
  while err is not None:
    yield err
    err = err.__cause__ or err.__context__


def _corruption_evidence(err: BaseException) -> BaseException | None:
  """The error in ``err``'s chain that proves the data bad, or None when none does (the data
  may be unreadable or mismatched, not bad)."""
  for link in _chain(err):
    if isinstance(link, (json.JSONDecodeError, UnicodeDecodeError)):
      return link
    if isinstance(link, PermissionError) or _DENIED.search(str(link)):
      return None
    if isinstance(link, ValueError) and _CORRUPT_DATA.search(str(link)):
      return link
  return None


def _classify(step_dir: pathlib.Path, err: Exception) -> Exception:
  """The error to raise for a failed read: `_Corrupt` on verified corruption, else a stop."""
  evidence = _corruption_evidence(err)
  if evidence is not None:
    return _Corrupt(_first_line(evidence).split(" [tensorstore_spec=")[0])
  return CheckpointError(
    f"could not restore checkpoint {step_dir}: {_first_line(err)}; this does not prove it "
    f"corrupt, so it was left as is (move it aside, e.g. to {CORRUPT_PREFIX}{step_dir.name}, to "
    "resume from an older checkpoint)"
  )


def _leaf_specs(tree) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{"a/b/0": (shape, dtype name)}`` of a pytree of arrays or of orbax array metadata."""

  def name(path):
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)

  return {
    name(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def _describe(spec) -> str:
  return "absent" if spec is None else f"{spec[1]}{list(spec[0])}"


def _check_readable(step_dir: pathlib.Path) -> None:
  """Opens every file of a checkpoint; an error here (permission, I/O) is not corruption."""
  try:
    for root, _, files in os.walk(step_dir, onerror=_raise):
      for name in files:
        with open(os.path.join(root, name), "rb") as f:
          f.read(1)
  except OSError as err:
    raise CheckpointError(
      f"cannot read checkpoint file {err.filename or step_dir}: {err.strerror or err}; the "
      "checkpoint may be valid, so it was left as is: fix the access and rerun"
    ) from err


def _raise(err: OSError) -> None:
  raise err


def _remove_uncommitted(directory: pathlib.Path, step: int, deadline: float, quiet=1.0) -> None:
  """Removes the temporary directories of the failed save of ``step`` until none has come back
  for ``quiet`` seconds, or until ``deadline`` (``time.monotonic()``): a writer of orbax's that
  started before the save (a pooled thread, not joined) can still recreate one after a removal."""
  last_seen = time.monotonic()
  while True:
    found = list(directory.glob(f"{step}.orbax-checkpoint-tmp*"))
    for tmp in found:
      shutil.rmtree(tmp, ignore_errors=True)
    now = time.monotonic()
    if found:
      last_seen = now
    if now - last_seen >= quiet or now >= deadline:
      return
    time.sleep(0.05)


class Checkpointer:
  """Saves and restores ``(state, record)`` pairs under ``directory``."""

  def __init__(self, directory: pathlib.Path, *, max_to_keep: int):
    self.directory = directory.absolute()
    # cleanup_tmp_directories: a ``<step>.orbax-checkpoint-tmp`` directory is a save that never
    # committed (killed mid-write), so it is not a checkpoint and is removed.
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=False,
        create=True,
        cleanup_tmp_directories=True,
      ),
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "record": ocp.JsonCheckpointHandler(),
      },
    )
    # Restores go through a checkpointer whose barriers involve this process only: orbax's
    # manager ends each restore with a barrier of all processes, which a process whose read
    # failed would never reach (the others would wait at it). Each process still reads every
    # array it holds, whichever process wrote it.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler())
    registry.add("record", ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
    me = jax.process_index()
    self._reader = ocp.Checkpointer(
      ocp.CompositeCheckpointHandler(handler_registry=registry),
      multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}
      ),
    )

  def save(self, step: int, state, record: dict) -> None:
    """Writes checkpoint ``step`` (synchronously; orbax commits it atomically by a rename).

    Raises:
      CheckpointError: the write failed (full disk, permission); its uncommitted temporary
        directory is removed, older checkpoints are untouched.
    """
    record = dict(record, step=step, fingerprint=fingerprint(state))
    threads = set(threading.enumerate())
    try:
      self.manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
        ),
        force=True,
      )
      self.manager.wait_until_finished()
    except Exception as err:  # pylint: disable=broad-except
      # Orbax raises the first failed write while its other writer threads go on: let them end
      # (30 s at most), or they recreate the temporary directory after it is removed.
      deadline = time.monotonic() + 30
      for thread in set(threading.enumerate()) - threads:
        with contextlib.suppress(Exception):  # orbax's threads re-raise their own error here
          thread.join(max(0.0, deadline - time.monotonic()))
      if jax.process_index() == 0:
        _remove_uncommitted(self.directory, step, deadline)
      raise CheckpointError(
        f"could not save checkpoint {self.directory / str(step)}: {_first_line(err)}"
      ) from err

  def restore_latest(self, like_state):
    """The newest intact checkpoint as ``(state, record)``, or None when there is none.

    Corrupt checkpoints met on the way are moved to ``corrupt-<step>/`` (see the module
    docstring for what counts as corrupt, and for how several processes agree on it). Every
    process must call this, and all return the same step or all raise.

    Args:
      like_state: a pytree with the target shapes, dtypes and shardings of the state.

    Raises:
      CheckpointError: a checkpoint that is not verifiably corrupt could not be restored, on this
        process or another (the message names it, the reason and, for another's, the process);
        nothing was moved or deleted.
    """
    abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
    self.manager.reload()
    step = None
    while (step := self._agreed_next_step(below=step)) is not None:
      target = self._aside(step)  # named before any process moves anything
      restored, error, report = None, None, "ok"
      try:
        restored = self._restore(step, abstract_state)
      except _Corrupt as err:
        report = f"corrupt {err}"
      except Exception as err:  # pylint: disable=broad-except  (raised below)
        error, report = err, f"stop {' '.join(str(err).split()) or type(err).__name__}"
      reports = [text.partition(" ") for text in gather_text(report)]
      stops = [(k, message) for k, (kind, _, message) in enumerate(reports) if kind == "stop"]
      if error is not None:
        raise error
      if stops:
        k, message = stops[0]
        raise CheckpointError(f"process {k} of {len(reports)} stopped the run: {message}")
      corrupt = [(k, message) for k, (kind, _, message) in enumerate(reports) if kind == "corrupt"]
      if not corrupt:
        return restored
      if len(reports) == 1:
        reason = corrupt[0][1]
      else:
        reason = "; ".join(f"process {k}: {message}" for k, message in corrupt)
      self._move_aside(step, target, reason)
    return None

  def _agreed_next_step(self, below: int | None) -> int | None:
    """The newest step older than ``below`` (None: any), the same on every process.

    Raises:
      CheckpointError: the processes see different steps (storage not shared by all of them).
    """
    mine = max((s for s in self.manager.all_steps() if below is None or s < below), default=None)
    seen = gather_text(str(mine))
    if len(set(seen)) > 1:
      found = ", ".join(f"process {k}: {text}" for k, text in enumerate(seen))
      raise CheckpointError(
        f"the processes see different newest checkpoints in {self.directory} ({found}); the run "
        "directory must be on storage that every process shares"
      )
    return mine

  def _restore(self, step: int, abstract_state):
    step_dir = self.directory / str(step)
    _check_readable(step_dir)
    for part in REQUIRED_FILES:
      if not (step_dir / part).is_file():
        raise CheckpointError(
          f"checkpoint {step_dir} lacks {part} (deleted, or written by another orbax version); "
          f"it was left as is: move it aside, e.g. to {self._aside(step)}, to resume from an "
          "older checkpoint"
        )
    try:
      saved = _leaf_specs(self.manager.item_metadata(step).state.tree)
    except Exception as err:  # pylint: disable=broad-except
      raise _classify(step_dir, err) from err
    wanted = _leaf_specs(abstract_state)
    if saved != wanted:
      name = next(k for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k))
      raise CheckpointError(
        f"checkpoint {step_dir} holds state of another shape than this config builds "
        f"({name}: saved {_describe(saved.get(name))}, expected {_describe(wanted.get(name))}); "
        "was config.yaml edited or the code changed? The checkpoint was left as is"
      )
    try:
      restored = self._reader.restore(
        step_dir,
        args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()
        ),
      )
    except Exception as err:  # pylint: disable=broad-except
      raise _classify(step_dir, err) from err
    record = restored.record
    if not isinstance(record, dict) or not {"step", "fingerprint"} <= set(record):
      raise _Corrupt("its record lacks 'step' or 'fingerprint'")
    if record["fingerprint"] != fingerprint(restored.state):
      raise _Corrupt("its arrays do not match their saved fingerprint")
    return restored.state, record

  def _aside(self, step: int) -> pathlib.Path:
    """``corrupt-<step>`` (``-2``, ``-3``... if taken): where a bad checkpoint goes."""
    target, n = self.directory / f"{CORRUPT_PREFIX}{step}", 1
    while target.exists():
      n += 1
      target = self.directory / f"{CORRUPT_PREFIX}{step}-{n}"
    return target

  def _move_aside(self, step: int, target: pathlib.Path, reason: str) -> None:
    """Renames a corrupt checkpoint to ``target`` (process 0), keeping every byte of it; every
    process then re-reads the directory, once the move is done.

    Raises:
      CheckpointError: the rename failed (on process 0; every process raises it).
    """
    source = self.directory / str(step)
    error = ""
    if jax.process_index() == 0:
      try:
        source.rename(target)
      except OSError as err:
        error = (
          f"checkpoint {source} is corrupt ({reason}) but could not be moved aside to {target}: "
          f"{err.strerror or err}; nothing was deleted"
        )
    error = gather_text(error)[0]  # process 0's outcome, after its rename: also a barrier
    if error:
      raise CheckpointError(error)
    logging.warning(
      "checkpoint %s is corrupt (%s); moved to %s, trying an older one", source, reason, target
    )
    self.manager.reload()

  def close(self) -> None:
    self.manager.close()
    self._reader.close()
