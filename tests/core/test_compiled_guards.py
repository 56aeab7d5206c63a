"""Speed guards that read the compiled program, not the clock (issue 19).

For ``jax.jit(jax.value_and_grad(loss))`` compiled for XLA:CPU at a small ``[N, V]`` they hold:

* transcendentals per element, ``compiled.cost_analysis()["transcendentals"] / (N V)``: one
  exponential per logit where the logits are float32 (the backward's :math:`e^{x - m}` is the
  forward's, :func:`xent_jax.core.engine.shares_forward_exp`), two for half precision (recomputed
  rather than stored in float32) and for the fused head (whose logits exist only in blocks);
* passes over ``[N, V]``: instructions of the optimised HLO outside fused computations that read
  an ``[N, V]`` operand (a fusion reading it counts once);
* temporaries, ``memory_analysis().temp_size_in_bytes``: per-row arrays only, far below one
  ``[N, V]`` float32 array.

Each bound is the minimum the formulation needs (plus per-row work, under 0.1 per element), so
a second exponential, a stored ``[N, V]`` temporary or an extra pass breaks it.
"""

import functools
import re

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import SingleDeviceSharding

import xent_jax
from tests._compiled import large_non_input_residuals
from xent_jax.core import engine

N, V, D = 64, 512, 32
# A block of the fused head: token_chunk_size rows by all classes.
TOKEN_CHUNK = 8
# Per-row temporaries: a few [N] float32 arrays, far below one [N, V] float32 array (128 KiB).
ROW_TEMP_BYTES = 64 * N * 4
# Calls and control flow that only pass buffers on.
_NOT_A_PASS = {"tuple", "get-tuple-element", "bitcast", "parameter", "constant"}
_NOT_A_PASS |= {"while", "conditional", "call", "opt-barrier"}


def _cpu_spec(shape, dtype):
  cpu = SingleDeviceSharding(jax.devices("cpu")[0])
  return jax.ShapeDtypeStruct(shape, dtype, sharding=cpu)


def hlo_passes(hlo: str, shape: tuple[int, ...]) -> list[str]:
  """Instructions outside fused and reducer computations that read an operand of ``shape``."""
  dims = ",".join(map(str, shape))
  callees = set(re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", hlo))
  shapes = dict(re.findall(r"%([\w.\-]+) = \w+\[([\d,]*)\]", hlo))
  shapes.update(re.findall(r"([\w.\-]+): \w+\[([\d,]*)\]", hlo))  # computation parameters
  readers = []
  for computation in re.split(r"\n(?=\S)", hlo):
    name = re.match(r"(?:ENTRY )?%([\w.\-]+)", computation)
    if not name or name.group(1) in callees:
      continue
    for line in computation.splitlines()[1:]:
      inst = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = .*? ([a-z][\w\-]*)\((.*?)\)(?:,|$)", line)
      if not inst or inst.group(2) in _NOT_A_PASS:
        continue
      if any(shapes.get(arg) == dims for arg in re.findall(r"%([\w.\-]+)", inst.group(3))):
        readers.append(inst.group(1))
  return readers


class Facts:
  """What the compiled value-and-gradient program does per ``[N, V]`` element."""

  def __init__(self, compiled, elements: int, shape: tuple[int, ...]):
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    self.transcendentals = cost.get("transcendentals", 0.0) / elements
    self.temp_bytes = compiled.memory_analysis().temp_size_in_bytes
    self.passes = hlo_passes(compiled.as_text(), shape)


LOSSES = {
  "fp32": (lambda x, y: xent_jax.cross_entropy(x, y), jnp.float32),
  "smoothing": (lambda x, y: xent_jax.cross_entropy(x, y, label_smoothing=0.1), jnp.float32),
  "bf16": (lambda x, y: xent_jax.cross_entropy(x, y), jnp.bfloat16),
  "focal": (lambda x, y: xent_jax.softmax_focal_loss(x, y, gamma=2.0), jnp.float32),
  "poly1": (lambda x, y: xent_jax.poly1_cross_entropy(x, y, epsilon=1.0), jnp.float32),
  "gce": (lambda x, y: xent_jax.generalized_cross_entropy(x, y, q=0.7), jnp.float32),
  "bitempered": (
    lambda x, y: xent_jax.bi_tempered_logistic_loss(x, y, t1=0.8, t2=1.2),
    jnp.float32,
  ),
}

# (exponentials per element, passes over [N, V]) each formulation needs:
# cross-entropy: max, exp(x - m) (stored in the gradient's buffer), its row sum, the label's
# logit, the gradient; + one pass for smoothing's sum of logits; half precision recomputes the
# exp in the gradient pass instead of storing it (one pass fewer, one exponential more); focal,
# poly-1 and GCE add one power-sum pass to cross-entropy's.
MINIMUM = {
  "fp32": (1, 5),
  "smoothing": (1, 6),
  "bf16": (2, 4),
  "focal": (1, 5),
  "poly1": (1, 5),
  "gce": (1, 5),
}
# The bi-tempered loss has no exponential (XLA's cost model does not count its powers): max,
# three normalisation passes, the loss and the gradient.
BITEMPERED_PASSES = 6


@functools.cache
def facts(name: str) -> Facts:
  loss, dtype = LOSSES[name]
  compiled = (
    jax.jit(jax.value_and_grad(loss))
    .lower(_cpu_spec((N, V), dtype), _cpu_spec((N,), jnp.int32))
    .compile()
  )
  return Facts(compiled, N * V, (N, V))


@functools.cache
def fused_facts() -> Facts:
  loss = lambda h, w, y: xent_jax.linear_cross_entropy(h, w, y, token_chunk_size=TOKEN_CHUNK)
  compiled = (
    jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    .lower(
      _cpu_spec((N, D), jnp.float32), _cpu_spec((V, D), jnp.float32), _cpu_spec((N,), jnp.int32)
    )
    .compile()
  )
  # XLA's cost analysis counts a loop body once: transcendentals per element of one block.
  return Facts(compiled, TOKEN_CHUNK * V, (V, TOKEN_CHUNK))


@pytest.mark.parametrize("name", sorted(MINIMUM))
def test_exponentials_per_element(name):
  exps, _ = MINIMUM[name]
  got = facts(name).transcendentals
  assert exps <= got < exps + 0.1, f"{name}: {got:.3f} transcendentals per element"


@pytest.mark.parametrize("name", sorted(MINIMUM))
def test_passes_over_logits(name):
  _, passes = MINIMUM[name]
  got = facts(name).passes
  assert len(got) <= passes, f"{name}: {len(got)} passes over [N, V]: {got}"


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_temporaries_per_row_only(name):
  got = facts(name).temp_bytes
  assert got <= ROW_TEMP_BYTES, f"{name}: {got} bytes of temporaries"


def test_bitempered_passes():
  got = facts("bitempered").passes
  assert len(got) <= BITEMPERED_PASSES, f"{len(got)} passes over [N, V]: {got}"


def test_fused_head_two_exponentials_and_one_block():
  """The fused head computes each block's exponentials in the forward pass and again in the
  backward (it keeps no logits), and holds one ``[T, V]`` float32 block at a time besides the
  one-pass schedule's float32 ``[V, D]`` weight-gradient accumulator."""
  got = fused_facts()
  assert 2 <= got.transcendentals < 2.1, f"{got.transcendentals:.3f} per block element"
  bound = TOKEN_CHUNK * V * 4 + V * D * 4 + ROW_TEMP_BYTES
  assert got.temp_bytes <= bound, got.temp_bytes
  assert bound < N * V * 4  # the bound excludes a whole [N, V] float32 array
  assert 0 < len(got.passes) <= 6, got.passes


@pytest.mark.parametrize(
  "dtype, shares", [(jnp.float32, True), (jnp.float64, True), (jnp.bfloat16, False)]
)
def test_shares_forward_exp_by_dtype(dtype, shares):
  """Both branches of the choice exist on every host: it depends on the dtype only."""
  assert engine.shares_forward_exp(dtype) is shares


def test_separate_backward_keeps_no_logits_sized_residual():
  """Compiled apart (``jax.vjp``), the shared-exponential form keeps per-row residuals only."""
  logits = jax.random.normal(jax.random.key(0), (N, V), jnp.float32)
  labels = jnp.arange(N) % V
  loss = lambda x: xent_jax.cross_entropy(x, labels, label_smoothing=0.1)
  assert not large_non_input_residuals(loss, logits, [logits])


@pytest.mark.skipif(jax.device_count("cpu") < 2, reason="needs 2 CPU devices (tests/conftest.py)")
def test_vocab_parallel_shard_one_exponential():
  """Each shard of the vocabulary-parallel loss runs the same kernel: one exponential per local
  element, cross-entropy's five passes over its ``[N, V / 2]`` slice, per-row temporaries."""
  mesh = jax.make_mesh((1, 2), ("data", "vocab"), devices=jax.devices("cpu")[:2])
  loss = lambda x, y: xent_jax.vocab_parallel_cross_entropy(x, y, mesh=mesh, data_axis="data")
  specs = jax.ShapeDtypeStruct((N, V), jnp.float32), jax.ShapeDtypeStruct((N,), jnp.int32)
  got = Facts(jax.jit(jax.value_and_grad(loss)).lower(*specs).compile(), N * V // 2, (N, V // 2))
  assert 1 <= got.transcendentals < 1.1, f"{got.transcendentals:.3f} per local element"
  assert len(got.passes) <= MINIMUM["fp32"][1], got.passes
  assert got.temp_bytes <= ROW_TEMP_BYTES, got.temp_bytes
