"""Every public loss compiled for TPU v5e and v6e slices, without a TPU: it compiles, and its
scratch memory on the chip stays within the library's promise.

`xent_jax.tools.aot` compiles through libtpu's topology descriptions (the ``tpu`` extra) and reads
``memory_analysis().temp_size_in_bytes``; these tests hold the bounds (justified there):

* logits path, O(N): at most 1/64 of one ``[N, V]`` float32 array, integer or probability labels;
* fused head: at most 1/10 of the naive head (matmul + optax) compiled the same way (issue 9),
  for `xent_jax.linear_cross_entropy` at the Llama-3-8B and Gemma-style heads and for every
  registered loss's ``.linear`` at the Llama-3-8B head (1/3 at the 32k-token head, see
  `_FUSED_BOUNDS`);
* vocabulary-parallel: O(N) per chip on logits, on a 2x2 and a 1x4 ``data x vocab`` mesh, and
  every registered loss's ``.vocab_parallel`` on the 2x2 one; the linear version at most 1/3 of
  the naive head's share per chip;
* the Transformer train step compiles; its fused version needs no more than the logits one.

The compiles need libtpu, which the main test venv lacks (it prints errors wherever JAX starts on
a host without a TPU): those tests are marked ``tpu``, skip there, and run in the TPU step of
``.ci/run`` from a venv with the ``tpu-test`` extra (``python -m pytest -m tpu``).

Compiling is the cost (seconds to a minute each on 2 cores): each problem compiles once per
process (cached in `xent_jax.tools.aot`), the heavy ones are marked slow and run on v5e only (see
`_HEAVY_TOPOLOGIES`; ``python experiments/aot_memory.py`` measures every problem on both).
"""

import inspect
import os
import subprocess
import sys

import pytest

import xent_jax
from xent_jax.tools import aot

# Public callables that are not losses (register_loss registers what define_loss builds).
_NOT_LOSSES = {
  "check_labels",
  "focal_loss",  # the deprecated name of softmax_focal_loss, which is compiled
  "get_loss",
  "list_losses",
  "register_loss",
  "smooth_labels",
  "tempered_softmax",
}
# Logits-path compiles slow enough to mark (bi_tempered's now takes about 2 s: none).
_SLOW_LOGITS: set[str] = set()
# The heavy compiles (20-45 s each on 2 cores: fused heads, per-loss sweeps, the train step) run
# on the first topology only; the second chip generation is checked on every logits path, the
# vocabulary-parallel logits paths and the Llama-3-8B fused head, which keeps the suite inside
# its time budget while each kernel is still compiled for both.
_HEAVY_TOPOLOGIES = aot.TOPOLOGIES[:1]


def test_every_public_loss_is_compiled():
  """A new public loss fails here until `xent_jax.tools.aot` compiles it."""
  public = {
    name
    for name in xent_jax.__all__
    if inspect.isfunction(getattr(xent_jax, name)) and name not in _NOT_LOSSES
  }
  covered = {problem.public.__name__ for problem in aot.logits_losses().values()}
  covered |= {"linear_cross_entropy", *aot.PARALLEL_KINDS}
  assert public - covered == set()


@pytest.mark.tpu
def test_libtpu_prints_nothing_on_a_host_without_tpu():
  """A fresh process loads libtpu and compiles for a slice; stderr stays empty."""
  env = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith("TPU_") and k != "ALLOW_MULTIPLE_LIBTPU_LOAD"
  }
  code = (
    "import jax.numpy as jnp; from xent_jax.tools import aot\n"
    "chip = aot.topology('v5e:2x2').devices[0]\n"
    "aot.temp_bytes(lambda x: x.sum(), aot.spec((8, 128), jnp.float32, chip))\n"
    "import jax; jax.devices()\n"
  )
  done = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
  )
  assert done.returncode == 0, done.stderr
  assert done.stderr == ""


def _logits_cases() -> list:
  return [
    pytest.param(
      loss,
      topology,
      id=f"{loss}-{topology}",
      marks=[pytest.mark.slow] if loss in _SLOW_LOGITS else [],
    )
    for loss in aot.logits_losses()
    for topology in aot.TOPOLOGIES
  ]


@pytest.mark.tpu
@pytest.mark.parametrize("loss, topology", _logits_cases())
def test_logits_path_temp_is_o_of_n(loss, topology):
  temp = aot.logits_temp_bytes(loss, topology)
  bound = aot.LOGITS_TEMP_FRACTION * aot.logits_nxv_f32_bytes()
  assert temp <= bound, (
    f"{loss} on {topology}: {temp / aot.MIB:.1f} MiB temp at "
    f"{aot.LOGITS_SHAPE} bf16, bound {bound / aot.MIB:.1f} MiB"
  )


# Issue 9 sets the 1/10 target at the Llama-3-8B and Gemma-style heads. At 32k tokens over a
# 32k vocabulary (D=2048) whichever gradient is accumulated across the other loop needs about
# 250 MiB of float32 against a naive head of 2000 MiB (its logits in bf16): 0.25 today, held
# here to 1/3 so that it cannot regress unnoticed. 1/10 there needs a schedule that keeps no
# full float32 buffer for either gradient (open).
_FUSED_BOUNDS = {
  "llama3_8b": aot.FUSED_TEMP_FRACTION,
  "gemma": aot.FUSED_TEMP_FRACTION,
  "n32k_d2k_v32k": 1 / 3,
}


def _fused_head_cases() -> list:
  return [
    (head, topology)
    for head in aot.HEADS
    for topology in aot.TOPOLOGIES
    if topology in _HEAVY_TOPOLOGIES or head == "llama3_8b"
  ]


@pytest.mark.tpu
@pytest.mark.slow
@pytest.mark.parametrize("head, topology", _fused_head_cases())
def test_fused_head_temp_bound(head, topology):
  naive = aot.head_temp_bytes("naive", head, topology)
  fused = aot.head_temp_bytes("fused", head, topology)
  assert fused <= _FUSED_BOUNDS[head] * naive, (
    f"{head} {aot.HEADS[head]} on {topology}: fused {fused / aot.MIB:.0f} MiB temp, naive "
    f"{naive / aot.MIB:.0f} MiB (ratio {fused / naive:.3f})"
  )


@pytest.mark.tpu
@pytest.mark.slow
@pytest.mark.parametrize("topology", _HEAVY_TOPOLOGIES)
@pytest.mark.parametrize("loss", list(xent_jax.list_losses()))
def test_fused_form_of_every_loss_temp_bound(loss, topology):
  fused = aot.fused_form_temp_bytes(loss, topology)
  naive = aot.head_temp_bytes("naive", aot.FUSED_FORMS_HEAD, topology)
  assert fused <= aot.FUSED_TEMP_FRACTION * naive, (
    f"get_loss({loss!r}).linear at {aot.HEADS[aot.FUSED_FORMS_HEAD]} on {topology}: "
    f"{fused / aot.MIB:.0f} MiB temp, naive {naive / aot.MIB:.0f} MiB"
  )


@pytest.mark.tpu
@pytest.mark.parametrize("topology", aot.TOPOLOGIES)
@pytest.mark.parametrize("mesh_name", list(aot.MESHES))
@pytest.mark.parametrize("kind", aot.PARALLEL_KINDS[:2])
def test_vocab_parallel_logits_temp_is_o_of_n(kind, mesh_name, topology):
  temp = aot.parallel_temp_bytes(kind, mesh_name, topology)
  chips = aot.MESHES[mesh_name][0] * aot.MESHES[mesh_name][1]
  # Each chip holds 1/chips of the logits; the O(N) bound is taken of its own [N, V] block.
  bound = aot.LOGITS_TEMP_FRACTION * aot.logits_nxv_f32_bytes() / chips
  assert temp <= bound, (
    f"{kind} on {mesh_name} of {topology}: {temp / aot.MIB:.1f} MiB temp "
    f"per chip, bound {bound / aot.MIB:.1f} MiB"
  )


@pytest.mark.tpu
@pytest.mark.slow
@pytest.mark.parametrize("topology", _HEAVY_TOPOLOGIES)
@pytest.mark.parametrize("loss", list(xent_jax.list_losses()))
def test_vocab_parallel_form_of_every_loss_temp_is_o_of_n(loss, topology):
  temp = aot.parallel_form_temp_bytes(loss, topology)
  chips = aot.MESHES[aot.FORMS_MESH][0] * aot.MESHES[aot.FORMS_MESH][1]
  bound = aot.LOGITS_TEMP_FRACTION * aot.logits_nxv_f32_bytes() / chips
  assert temp <= bound, (
    f"get_loss({loss!r}).vocab_parallel on {aot.FORMS_MESH} of {topology}: "
    f"{temp / aot.MIB:.1f} MiB temp per chip, bound {bound / aot.MIB:.1f} MiB"
  )


@pytest.mark.tpu
@pytest.mark.slow
@pytest.mark.parametrize("topology", _HEAVY_TOPOLOGIES)
@pytest.mark.parametrize(
  "kind, mesh_name",
  [(aot.PARALLEL_KINDS[2], name) for name in aot.MESHES] + [(aot.PARALLEL_KINDS[3], "2x2")],
)
def test_vocab_parallel_linear_temp_bound(kind, mesh_name, topology):
  temp = aot.parallel_temp_bytes(kind, mesh_name, topology)
  # The naive head split over the chips by XLA needs 1/chips of its one-chip temp per chip
  # (measured: 501 MiB on each of 4 v5e chips against 2004 MiB on one), so the one-chip baseline,
  # compiled once for the fused-head test, stands in for it.
  chips = aot.MESHES[mesh_name][0] * aot.MESHES[mesh_name][1]
  naive = aot.head_temp_bytes("naive", aot.PARALLEL_HEAD, topology) / chips
  # 0.13 to 0.32 of that per chip today: held to 1/3 (the one-chip 1/10 is not reached per chip:
  # each chip's share of the vocabulary-major schedule keeps [N, D] float32 partial d_hidden).
  assert temp <= naive / 3, (
    f"{kind} {aot.HEADS[aot.PARALLEL_HEAD]} on {mesh_name} of "
    f"{topology}: {temp / aot.MIB:.0f} MiB temp per chip, naive {naive / aot.MIB:.0f} MiB"
  )


@pytest.mark.tpu
@pytest.mark.slow
@pytest.mark.parametrize("topology", _HEAVY_TOPOLOGIES)
def test_transformer_train_step_compiles_and_fused_head_saves_memory(topology):
  logits = aot.train_step_temp_bytes(False, topology)
  fused = aot.train_step_temp_bytes(True, topology)
  assert fused <= logits, (
    f"train step {aot.TRAIN_STEP} on {topology}: fused head "
    f"{fused / aot.MIB:.1f} MiB temp, logits {logits / aot.MIB:.1f} MiB"
  )


@pytest.mark.tpu
@pytest.mark.parametrize("topology", _HEAVY_TOPOLOGIES)
def test_vectorized_group_step_compiles_with_members_sharded(topology, record_property):
  """One group of the MNIST-1D comparison (1-D CNN, traced gamma and learning rate) compiles for
  the slice; each chip holds only its own members' states and batches: 8 members over 4 chips
  take twice the argument memory per chip of 4 members, not eight times."""
  temp_4, args_4 = aot.group_step_memory(topology, 4)
  temp_8, args_8 = aot.group_step_memory(topology, 8)
  record_property(
    "group_step_mib",
    {"4": (temp_4 / aot.MIB, args_4 / aot.MIB), "8": (temp_8 / aot.MIB, args_8 / aot.MIB)},
  )
  message = (
    f"group step {aot.GROUP_STEP} on {topology}: 4 members {temp_4 / aot.MIB:.2f} MiB temp, "
    f"{args_4 / aot.MIB:.2f} MiB arguments per chip; 8 members {temp_8 / aot.MIB:.2f} / "
    f"{args_8 / aot.MIB:.2f} MiB"
  )
  assert 0 < args_4 < aot.MIB, message
  assert args_8 == pytest.approx(2 * args_4, rel=0.01), message
  assert temp_8 <= 2 * temp_4 + aot.MIB, message
