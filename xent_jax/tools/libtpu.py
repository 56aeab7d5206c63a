"""libtpu on a host without a TPU: load it quietly, and from several processes at once."""

import os


def _tpu_chips_attached() -> bool:
  """Whether this host has TPU chips on its PCI bus (the check JAX's own TPU set-up makes)."""
  from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel

  return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0


def quiet_libtpu() -> None:
  """Lets libtpu load on a TPU-less host without warnings and alongside other processes.

  Once installed, libtpu loads whenever JAX initialises its backends. With no TPU attached it
  cannot learn the accelerator type or the worker hosts (it asks the cloud metadata service) and
  prints "could not determine TPU accelerator type", "unexpected worker hostname" and
  "Logging before InitGoogle()" to stderr; it also locks ``/tmp/libtpu_lockfile``, so a second
  process (another pytest-xdist worker) cannot load it. On such a host this names a placeholder
  type and host and allows concurrent loads; compiles use the topology they are given, not these
  variables. Only unset variables are filled, and nothing is set where chips are attached. Call
  it before JAX initialises its backends (before the first ``jax.devices()``).
  """
  if _tpu_chips_attached():
    return
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
