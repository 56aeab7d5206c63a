"""Orbax checkpoints of the training state, with a fingerprint to catch corrupt files.

Each checkpoint holds the model and optimizer state (a pytree of arrays, saved by
``ocp.args.StandardSave``) and a JSON record: the step, the data-order state (seed and step fully
determine the batch order, see `data.train_batch`) and a fingerprint of the arrays (per-leaf
float64 sum and sum of squares). Restoring walks the steps from newest to oldest and takes the
first one that loads and matches its fingerprint, so a partial or corrupt latest checkpoint
falls back to the previous one. Nothing is pickled.
"""

import logging
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp


def fingerprint(tree) -> list[list[float]]:
  """Per-leaf ``[sum, sum of squares]`` in float64, in tree order."""
  leaves = jax.tree.leaves(jax.device_get(tree))
  return [[float(np.sum(np.asarray(x, np.float64))), float(np.sum(np.square(np.asarray(x, np.float64))))]
          for x in leaves]


class Checkpointer:
  """Saves and restores ``(state, record)`` pairs under ``directory``."""

  def __init__(self, directory: pathlib.Path, *, max_to_keep: int):
    self.manager = ocp.CheckpointManager(
        directory.absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False,
                                             create=True))

  def save(self, step: int, state, record: dict) -> None:
    """Writes checkpoint ``step`` (synchronously; orbax commits it atomically)."""
    record = dict(record, step=step, fingerprint=fingerprint(state))
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)), force=True)
    self.manager.wait_until_finished()

  def restore_latest(self, like_state):
    """The newest readable checkpoint as ``(state, record)``, or None when there is none.

    Args:
      like_state: a pytree with the target shapes, dtypes and shardings of the state.
    """
    abstract_state = jax.tree.map(ocp.utils.to_shape_dtype_struct, like_state)
    self.manager.reload()
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), record=ocp.args.JsonRestore()))
        if restored.record["fingerprint"] != fingerprint(restored.state):
          raise ValueError("array fingerprint does not match the saved one")
      except Exception as err:  # pylint: disable=broad-except
        logging.warning("checkpoint at step %d is unreadable (%s); deleting it, trying an older one",
                        step, str(err).splitlines()[0] if str(err) else type(err).__name__)
        self._discard(step)
        continue
      return restored.state, restored.record
    return None

  def _discard(self, step: int) -> None:
    """Removes an unreadable checkpoint so that the step can be saved again."""
    if jax.process_index() == 0:
      shutil.rmtree(self.manager.directory / str(step), ignore_errors=True)
    self.manager.reload()

  def close(self) -> None:
    self.manager.close()
