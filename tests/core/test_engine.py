"""The row-statistics engine through the public API: forward mode, per-row residuals, every loss's
fused form, and losses defined by users."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import xent_jax
from tests._compiled import cpu_temp_bytes
from xent_jax.core import engine, heads
from xent_jax.fused import heads as fused_heads
from xent_jax.losses import variants
from xent_jax.train.config import LossConfig
from xent_jax.train.steps import make_objective

RNG = np.random.default_rng(7)
LOGITS = jnp.asarray(RNG.normal(size=(6, 9)) * 2, jnp.float32)
LABELS = jnp.asarray([0, 3, 8, -100, 5, 1])
PROBS = jnp.asarray(RNG.dirichlet(np.ones(9), size=6), jnp.float32)
WEIGHT = jnp.asarray(RNG.uniform(0.5, 2.0, size=9), jnp.float32)

PUBLIC_LOSSES = [
  (xent_jax.cross_entropy, dict(label_smoothing=0.1, z_loss=1e-2)),
  (xent_jax.cross_entropy, dict(logit_softcap=3.0, smoothing="t5x", label_smoothing=0.2)),
  (xent_jax.focal_loss, dict(gamma=2.0, alpha=np.linspace(0.1, 0.9, 9))),
  (xent_jax.poly1_cross_entropy, dict(epsilon=1.0)),
  (xent_jax.generalized_cross_entropy, dict(q=0.7)),
  (xent_jax.truncated_generalized_cross_entropy, dict(q=0.7, k=0.05)),
  (xent_jax.taylor_cross_entropy, dict(order=3)),
  (xent_jax.symmetric_cross_entropy, dict(alpha=0.5, beta=1.0)),
  (xent_jax.confidence_penalty_cross_entropy, dict(beta=0.3)),
  (xent_jax.bi_tempered_logistic_loss, dict(t1=0.8, t2=1.2)),
]
IDS = [f"{fn.__name__}-{i}" for i, (fn, _) in enumerate(PUBLIC_LOSSES)]


@pytest.mark.parametrize("fn,hparams", PUBLIC_LOSSES, ids=IDS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_forward_mode_agrees_with_reverse_mode(fn, hparams, smoothing):
  """jax.jvp / jacfwd / linearize work on every loss and match reverse mode (check_grads)."""
  hparams = dict(hparams)
  if smoothing and "label_smoothing" not in hparams:
    hparams["label_smoothing"] = smoothing
  loss = lambda x: fn(x, LABELS, class_weight=WEIGHT, **hparams)
  with jax.enable_x64(True):
    check_grads(jax.jit(loss), (jnp.asarray(LOGITS, jnp.float64),), order=1, modes=("fwd", "rev"))

  def derivatives(x, tangent):
    value, linear = jax.linearize(loss, x)
    return loss(x), value, linear(tangent), jax.grad(loss)(x), jax.jacfwd(loss)(x)

  tangent = jnp.asarray(RNG.normal(size=LOGITS.shape), jnp.float32)
  # One program for the plain value, linearize, grad and jacfwd (each compiled program costs more
  # here than its work).
  plain, value, directional, grad, jac = jax.jit(derivatives)(LOGITS, tangent)
  np.testing.assert_allclose(jac, grad, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(directional, jnp.vdot(grad, tangent), rtol=1e-4)
  np.testing.assert_allclose(value, plain, rtol=1e-6)


@pytest.mark.parametrize("fn,hparams", PUBLIC_LOSSES, ids=IDS)
def test_forward_mode_with_probability_labels(fn, hparams):
  with jax.enable_x64(True):
    loss = lambda x: fn(x, jnp.asarray(PROBS, jnp.float64), **hparams)
    check_grads(jax.jit(loss), (jnp.asarray(LOGITS, jnp.float64),), order=1, modes=("fwd", "rev"))


def _vocab_sized_residuals(fn, logits, inputs):
  """Float residuals of ``jax.vjp(fn, logits)`` with >= half the logits' size, not an input.

  The VJP function is a pytree whose leaves are the residuals, so one jitted program returns them
  (eager, every primitive of the forward pass compiled on its own: 136 programs for 19 cases)."""
  vjp_fn = jax.jit(lambda x: jax.vjp(fn, x)[1])(logits)
  leaves = [
    leaf
    for leaf in jax.tree_util.tree_leaves(vjp_fn)
    if hasattr(leaf, "dtype")
    and jnp.issubdtype(leaf.dtype, jnp.floating)
    and 2 * leaf.size >= logits.size
  ]
  return [
    leaf
    for leaf in leaves
    if not any(leaf.shape == i.shape and bool(jnp.array_equal(leaf, i)) for i in inputs)
  ]


def test_residual_check_can_fail():
  naive = lambda x: -jnp.mean(jax.nn.log_softmax(x)[jnp.arange(6), 0])
  assert _vocab_sized_residuals(naive, LOGITS, [LOGITS])


@pytest.mark.parametrize("fn,hparams", PUBLIC_LOSSES, ids=IDS)
@pytest.mark.parametrize("label_kind", ["integer", "probabilities"])
def test_no_vocab_sized_residual(fn, hparams, label_kind):
  labels = LABELS if label_kind == "integer" else PROBS
  extra = _vocab_sized_residuals(lambda x: fn(x, labels, **hparams), LOGITS, [LOGITS, labels])
  assert not extra, [(leaf.shape, leaf.dtype) for leaf in extra]


def _naive_user_loss(logits, labels, scale):
  """Float64 NumPy-free reference through plain autodiff: scale * (1 - p_y)^2 * -log p_y."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float64) if jax.config.x64_enabled else logits)
  safe = jnp.where(labels >= 0, labels, 0)
  picked = jnp.take_along_axis(log_p, safe[:, None], axis=-1)[:, 0]
  per_row = scale * (1 - jnp.exp(picked)) ** 2 * -picked
  valid = labels != -100
  return jnp.sum(jnp.where(valid, per_row, 0)) / jnp.sum(valid)


def test_user_defined_loss_matches_autodiff_of_a_naive_implementation():
  def squared_focal(log_p, *, scale=1.0):
    return scale * (-jnp.expm1(log_p)) ** 2 * -log_p

  loss = xent_jax.define_loss(squared_focal)
  got, grad = jax.value_and_grad(lambda x: loss(x, LABELS, scale=1.5))(LOGITS)
  want, want_grad = jax.value_and_grad(lambda x: _naive_user_loss(x, LABELS, 1.5))(LOGITS)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
  with jax.enable_x64(True):
    check_grads(
      jax.jit(lambda x: loss(x, LABELS)),
      (jnp.asarray(LOGITS, jnp.float64),),
      order=1,
      modes=("fwd", "rev"),
    )
  with pytest.raises(TypeError, match="gamma"):
    loss(LOGITS, LABELS, gamma=1.0)


def test_register_loss_reaches_get_loss_list_losses_and_the_fused_form(monkeypatch):
  # A copy of the registry for this test, so the loss does not leak into other tests.
  monkeypatch.setattr(xent_jax.registry, "_LOSSES", dict(xent_jax.registry._LOSSES))
  name = "test_engine_squared_focal"

  @xent_jax.register_loss(name)
  def squared_focal(log_p, *, scale=1.0):
    """Focal loss with gamma 2, times scale."""
    return scale * (-jnp.expm1(log_p)) ** 2 * -log_p

  info = xent_jax.list_losses()[name]
  assert info.hparams == {"scale": 1.0, "label_smoothing": 0.0}
  assert info.summary == "Focal loss with gamma 2, times scale."
  configured = xent_jax.get_loss(name, scale=2.0)
  np.testing.assert_allclose(
    configured(LOGITS, LABELS), _naive_user_loss(LOGITS, LABELS, 2.0), rtol=1e-5
  )
  hidden = jnp.asarray(RNG.normal(size=(6, 4)), jnp.float32)
  weight = jnp.asarray(RNG.normal(size=(9, 4)), jnp.float32)
  np.testing.assert_allclose(
    configured.linear(hidden, weight, LABELS, token_chunk_size=4),
    _naive_user_loss(hidden @ weight.T, LABELS, 2.0),
    rtol=1e-5,
  )
  with pytest.raises(ValueError, match="registered already"):
    xent_jax.register_loss(name)(squared_focal)
  with pytest.raises(ValueError, match="reserved"):
    xent_jax.define_loss(lambda log_p, *, weight=1.0: log_p)


def test_import_path_names_a_loss(tmp_path, monkeypatch):
  (tmp_path / "my_losses_mod.py").write_text(
    "import xent_jax\n"
    "def scaled_ce(logits, labels, *, scale=1.0, axis=-1, weight=None, ignore_index=-100,\n"
    "              reduction='mean', where=None):\n"
    "  return scale * xent_jax.cross_entropy(logits, labels, axis=axis, weight=weight,\n"
    "      ignore_index=ignore_index, reduction=reduction, where=where)\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  loss = xent_jax.get_loss("my_losses_mod:scaled_ce", scale=3.0)
  np.testing.assert_allclose(
    loss(LOGITS, LABELS), 3.0 * xent_jax.cross_entropy(LOGITS, LABELS), rtol=1e-6
  )
  with pytest.raises(ValueError, match="cannot import"):
    xent_jax.get_loss("my_losses_mod:missing")
  with pytest.raises(ValueError, match="lacks"):
    xent_jax.get_loss("numpy:sum")
  sys.modules.pop("my_losses_mod", None)


def _fused_cases():
  """Every registered loss with integer labels; with probabilities too, except cross-entropy,
  whose fused kernels take integer labels (tested in test_linear.py)."""
  names = sorted(n for n in xent_jax.list_losses() if not n.startswith("test_engine"))
  return [
    (n, kind)
    for n in names
    for kind in ("integer", "probabilities")
    if kind == "integer" or xent_jax.get_loss(n).fn is not xent_jax.cross_entropy
  ]


@pytest.mark.parametrize("name,label_kind", _fused_cases())
def test_every_registered_loss_has_a_fused_form(name, label_kind):
  """``get_loss(name).linear`` equals the loss on the full logits, value and gradients."""
  hidden = jnp.asarray(RNG.normal(size=(2, 7, 5)), jnp.float32)
  weight = jnp.asarray(RNG.normal(size=(9, 5)), jnp.float32)
  bias = jnp.asarray(RNG.normal(size=(9,)), jnp.float32)
  labels = jnp.asarray(RNG.integers(0, 9, size=(2, 7))).at[0, 2].set(-100)
  if label_kind == "probabilities":
    labels = jnp.asarray(RNG.dirichlet(np.ones(9), size=(2, 7)), jnp.float32)
  loss = xent_jax.get_loss(name)
  full = lambda h, w, b: loss(
    jnp.einsum("btd,vd->btv", h, w) + b[None, None],
    labels,
    reduction="sum",
  )
  fused = lambda h, w, b: loss.linear(
    h,
    w,
    labels,
    bias=b,
    reduction="sum",
    token_chunk_size=4,
  )
  # One jitted program for both (each compiled program costs more here than its work).
  (want, want_grads), (got, got_grads) = jax.jit(
    lambda *p: tuple(jax.value_and_grad(f, argnums=(0, 1, 2))(*p) for f in (full, fused))
  )(hidden, weight, bias)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_fused_form_returns_label_log_prob_and_entropy():
  hidden = jnp.asarray(RNG.normal(size=(6, 4)), jnp.float32)
  weight = jnp.asarray(RNG.normal(size=(9, 4)), jnp.float32)
  loss, stats = xent_jax.get_loss("cross_entropy").linear(
    hidden, weight, LABELS, return_stats=True, token_chunk_size=4
  )
  log_p = np.asarray(jax.nn.log_softmax(np.asarray(hidden, np.float64) @ np.asarray(weight).T))
  valid = np.asarray(LABELS) != -100
  want_log_prob = np.where(valid, log_p[np.arange(6), np.where(valid, LABELS, 0)], 0)
  want_entropy = np.where(valid, -np.sum(np.exp(log_p) * log_p, axis=-1), 0)
  np.testing.assert_allclose(stats["log_prob"], want_log_prob, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["entropy"], want_entropy, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss, -np.sum(want_log_prob) / valid.sum(), rtol=1e-5)


def _vocab_parallel_cases():
  names = sorted(
    n for n in xent_jax.list_losses() if n != "bi_tempered" and not n.startswith("test_engine")
  )
  return [
    (n, ls)
    for n in names
    for ls in (0.0, 0.1)
    if not (ls and xent_jax.get_loss(n).fn is xent_jax.cross_entropy)
  ]


@pytest.mark.parametrize("name,label_smoothing", _vocab_parallel_cases())
def test_every_engine_loss_has_a_vocab_parallel_form(name, label_smoothing):
  """``get_loss(name).vocab_parallel`` on a 2 x 4 (data x vocab) mesh equals the loss on one
  device, value and gradient, with class weights, an ignored row and a mask."""
  hparams = {"label_smoothing": label_smoothing} if label_smoothing else {}
  loss = xent_jax.get_loss(name, **hparams)
  logits = jnp.asarray(RNG.normal(size=(4, 16)) * 3, jnp.float32)
  labels = jnp.asarray([0, 7, -100, 9])
  weight = jnp.asarray(RNG.uniform(0.5, 2.0, size=16), jnp.float32)
  where = jnp.asarray([True, True, True, False])
  mesh = jax.make_mesh((2, 4), ("data", "vocab"), devices=jax.devices()[:8])
  full = lambda x: loss(x, labels, class_weight=weight, where=where)
  sharded = lambda x: loss.vocab_parallel(
    x,
    labels,
    mesh=mesh,
    data_axis="data",
    class_weight=weight,
    where=where,
  )
  # One jitted program for both (each compiled program costs more here than its work).
  (want, want_grad), (got, got_grad) = jax.jit(
    lambda x: (jax.value_and_grad(full)(x), jax.value_and_grad(sharded)(x))
  )(logits)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got_grad), want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
  "name",
  [
    n
    for n, info in xent_jax.list_losses().items()
    if info.fn not in (xent_jax.cross_entropy, xent_jax.bi_tempered_logistic_loss)
  ],
)
def test_every_engine_loss_has_a_vocab_parallel_form_with_probability_labels(name):
  """The same with probability labels (smoothed, class weights, a mask): every class sum, the
  target's mass and the entropy are completed over the vocabulary shards."""
  loss = xent_jax.get_loss(name, label_smoothing=0.1)
  logits = jnp.asarray(RNG.normal(size=(4, 16)) * 3, jnp.float32)
  probs = jnp.asarray(RNG.dirichlet(np.ones(16) * 0.3, size=4), jnp.float32)
  weight = jnp.asarray(RNG.uniform(0.5, 2.0, size=16), jnp.float32)
  where = jnp.asarray([True, True, True, False])
  mesh = jax.make_mesh((2, 4), ("data", "vocab"), devices=jax.devices()[:8])
  full = lambda x, q: loss(x, q, class_weight=weight, where=where)
  sharded = lambda x, q: loss.vocab_parallel(
    x, q, mesh=mesh, data_axis="data", class_weight=weight, where=where
  )
  (want, want_grads), (got, got_grads) = jax.jit(
    lambda *a: tuple(jax.value_and_grad(f, argnums=(0, 1))(*a) for f in (full, sharded))
  )(logits, probs)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["focal", "symmetric_ce", "confidence_penalty", "taylor_ce"])
@pytest.mark.parametrize("label_kind", ["integer", "probabilities"])
def test_vocab_parallel_form_works_in_forward_mode(name, label_kind):
  """``jax.jvp`` of ``.vocab_parallel`` on a 2 x 4 mesh equals the one-device loss's."""
  loss = xent_jax.get_loss(name, label_smoothing=0.1)
  logits = jnp.asarray(RNG.normal(size=(4, 16)) * 3, jnp.float32)
  tangent = jnp.asarray(RNG.normal(size=(4, 16)), jnp.float32)
  labels = jnp.asarray([0, 7, 3, 9])
  if label_kind == "probabilities":
    labels = jnp.asarray(RNG.dirichlet(np.ones(16), size=4), jnp.float32)
  mesh = jax.make_mesh((2, 4), ("data", "vocab"), devices=jax.devices()[:8])
  sharded = lambda x: loss.vocab_parallel(x, labels, mesh=mesh, data_axis="data")
  # Jitted: eager JVPs compile every primitive of the shard_map's body separately (~4x the time).
  got = jax.jit(lambda x, t: jax.jvp(sharded, (x,), (t,)))(logits, tangent)
  want = jax.jit(lambda x, t: jax.jvp(lambda x: loss(x, labels), (x,), (t,)))(logits, tangent)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def plain_loss(
  logits, labels, *, axis=-1, weight=None, ignore_index=-100, reduction="mean", where=None
):
  """Cross-entropy as a plain function: a loss named by import path that is no engine head."""
  return xent_jax.cross_entropy(
    logits,
    labels,
    axis=axis,
    weight=weight,
    ignore_index=ignore_index,
    reduction=reduction,
    where=where,
  )


def test_vocab_parallel_form_names_what_it_lacks():
  name = f"{__name__}:plain_loss"
  with pytest.raises(NotImplementedError, match=name):
    xent_jax.get_loss(name).vocab_parallel(LOGITS, LABELS, mesh=None)


@pytest.mark.parametrize("name", ["focal", "confidence_penalty", "bi_tempered"])
def test_trainer_fused_objective_works_for_variants(name):
  """The trainer's ``fused: true`` for a loss other than cross-entropy equals its logits path."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from xent_jax.train.models import TransformerLM  # pylint: disable=import-outside-toplevel

  model = TransformerLM(
    11, 6, dim=8, num_layers=1, num_heads=2, mlp_ratio=2, dtype=jnp.float32, rngs=nnx.Rngs(0)
  )
  ids = jnp.asarray(RNG.integers(0, 11, size=(2, 6)))
  results = [
    nnx.jit(nnx.value_and_grad(make_objective(LossConfig(name=name, fused=fused))))(model, ids, ids)
    for fused in (False, True)
  ]
  np.testing.assert_allclose(results[1][0], results[0][0], rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
    results[1][1],
    results[0][1],
  )


HEADS = {
  "cross_entropy": lambda: xent_jax.losses.cross_entropy.cross_entropy_head("uniform", 1e-2),
  "focal": lambda: xent_jax.losses.variants.focal_head(2.0, jnp.linspace(0.5, 1.5, 16)),
  "taylor": lambda: xent_jax.losses.variants.taylor_head(3),
  "symmetric": lambda: xent_jax.losses.variants.symmetric_head(0.5, 1.0, -4.0),
  "confidence_penalty": lambda: xent_jax.losses.variants.confidence_penalty_head(0.3),
}


@pytest.mark.parametrize("head_name", sorted(HEADS))
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_engine_over_vocabulary_shards_equals_one_device(head_name, smoothing):
  """Row statistics completed with pmax/psum over 4 vocabulary shards give the one-device loss and
  gradient, for every kind of head (label logit, class sums, entropy)."""
  from jax.sharding import NamedSharding  # pylint: disable=import-outside-toplevel
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel

  head = HEADS[head_name]()
  logits = jnp.asarray(RNG.normal(size=(4, 16)) * 3, jnp.float32)
  labels = jnp.asarray([0, 7, 15, 9])
  weight = jnp.asarray(RNG.uniform(0.5, 2.0, size=16), jnp.float32)
  target = heads.smoothed_target(16, smoothing)

  def dense(x):
    loss, _ = heads.integer_loss(
      head, x, labels, class_weight=weight, on=target.on, off=target.off, logit_softcap=None
    )
    return jnp.sum(loss)

  mesh = jax.make_mesh(
    (4,), ("vocab",), axis_types=(jax.sharding.AxisType.Explicit,), devices=jax.devices()[:4]
  )

  def local(x, weight_shard):
    loss, _ = heads.integer_loss(
      head,
      x,
      labels,
      class_weight=weight_shard,
      on=target.on,
      off=target.off,
      logit_softcap=None,
      vocab_axis="vocab",
    )
    return jnp.sum(loss)

  sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(None, "vocab"), P("vocab")), out_specs=P())
  x = jax.device_put(logits, NamedSharding(mesh, P(None, "vocab")))
  w = jax.device_put(weight, NamedSharding(mesh, P("vocab")))
  # The reference jitted too: eager, each of its primitives compiled on its own (15 programs).
  want, want_grad = jax.jit(jax.value_and_grad(dense))(logits)
  got, got_grad = jax.jit(jax.value_and_grad(sharded))(x, w)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(got_grad), want_grad, rtol=1e-4, atol=1e-6)


def test_fused_form_names_a_bad_chunk_size():
  hidden = jnp.ones((6, 4))
  weight = jnp.ones((9, 4))
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match="token_chunk_size"):
      xent_jax.get_loss("focal").linear(hidden, weight, LABELS, token_chunk_size=bad)
  with pytest.raises(ValueError, match="weight"):
    xent_jax.get_loss("focal").linear(hidden, jnp.ones((9, 5)), LABELS)


@pytest.mark.parametrize(
  "name", sorted(n for n in xent_jax.list_losses() if not n.startswith("test_"))
)
def test_fused_form_of_an_empty_batch_is_the_logits_path(name):
  """No rows: ``.linear`` gives the loss of the empty logits (it divided by zero before), zero
  gradients and empty statistics."""
  hidden = jnp.zeros((2, 0, 4), jnp.bfloat16)
  weight = jnp.ones((9, 4), jnp.bfloat16)
  labels = jnp.zeros((2, 0), jnp.int32)
  loss = xent_jax.get_loss(name)

  def everything(hidden, weight, labels):
    """Per reduction the fused and the logits path's loss, the gradient, the statistics."""
    losses = {
      reduction: (
        loss.linear(hidden, weight, labels, reduction=reduction),
        loss(jnp.zeros((2, 0, 9), jnp.bfloat16), labels, reduction=reduction),
      )
      for reduction in ("mean", "sum", "none")
    }
    grad = jax.grad(lambda w: jnp.sum(loss.linear(hidden, w, labels)))(weight)
    return losses, grad, loss.linear(hidden, weight, labels, return_stats=True)[1]

  # One jitted program (eagerly, each primitive would compile on its own).
  losses, grad, stats = jax.jit(everything)(hidden, weight, labels)
  for got, want in losses.values():
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  np.testing.assert_array_equal(np.asarray(grad, np.float32), 0.0)
  assert {k: v.shape for k, v in stats.items()} == dict.fromkeys(
    ("entropy", "lse", "log_prob"), (2, 0)
  )


def test_fused_form_per_row_losses_match_the_logits_path():
  """reduction='none' (the blocked two-pass schedule, which also takes forward mode)."""
  hidden = jnp.asarray(RNG.normal(size=(6, 4)), jnp.float32)
  weight = jnp.asarray(RNG.normal(size=(9, 4)), jnp.float32)
  loss = xent_jax.get_loss("generalized_ce")
  got = loss.linear(hidden, weight, LABELS, reduction="none", token_chunk_size=4)
  np.testing.assert_allclose(got, loss(hidden @ weight.T, LABELS, reduction="none"), rtol=1e-5)
  tangent = jnp.ones_like(hidden)
  _, jvp_out = jax.jvp(
    lambda h: loss.linear(h, weight, LABELS, reduction="none"), (hidden,), (tangent,)
  )
  _, want = jax.jvp(lambda h: loss(h @ weight.T, LABELS, reduction="none"), (hidden,), (tangent,))
  np.testing.assert_allclose(jvp_out, want, rtol=1e-4, atol=1e-6)


def test_fused_form_plans_its_schedule_from_the_shapes():
  """One pass (a float32 [V, D] accumulator) only while that is at most 1/8 of the [N, V] logits
  or one block; at the Llama-3-8B head the blocked or rematerialising schedule (no such
  accumulator)."""
  from xent_jax.fused import schedule  # pylint: disable=import-outside-toplevel

  assert schedule.one_pass_fits(4096, 512, 32768)
  assert schedule.one_pass_fits(14, 5, 9)
  assert not schedule.one_pass_fits(8192, 4096, 128256)
  assert not schedule.one_pass_fits(8192, 2304, 256000)


@pytest.mark.parametrize("name", xent_jax.list_losses())
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_compiled_temp_memory_is_per_row_on_cpu(name, label_smoothing, dtype):
  """fwd+bwd of every loss keeps no ``[N, V]`` temporary on this backend (XLA:CPU), with and
  without smoothing (whose class sums XLA:CPU would otherwise store as ``[N, V]`` arrays),
  compiled for the CPU."""
  n, v = 256, 4096
  hparams = {"label_smoothing": label_smoothing} if label_smoothing else {}
  loss = xent_jax.get_loss(name, **hparams)
  step = jax.value_and_grad(lambda x, y: loss(x, y))
  args = (jax.ShapeDtypeStruct((n, v), dtype), jax.ShapeDtypeStruct((n,), jnp.int32))
  temp = cpu_temp_bytes(step, *args)
  assert temp <= n * v * 4 / 32, f"{name}: {temp / 2**20:.2f} MiB temp, one [N, V] f32 is 4 MiB"


# Losses whose fused form is not linear_cross_entropy (whose kernels are reverse-mode only).
_ENGINE_FUSED = [
  name for name, info in xent_jax.list_losses().items() if info.fn is not xent_jax.cross_entropy
]


@pytest.mark.parametrize("name", _ENGINE_FUSED)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_form_works_in_forward_mode(name, reduction):
  """``.linear`` in forward mode equals the logits path's, in both schedules: 'mean' takes the
  one-pass schedule here (gradients in the forward pass, their inner product with the tangents as
  its JVP), 'none' the blocked two-pass one (bi-tempered: the rematerialising one).

  Bi-tempered takes 20 normalization iterations here, not its default 5: its derivatives are
  those of the exact normalization, and the 5-iteration value differs from it by up to ~5e-5
  relative, which check_grads' finite differences see on some draws of the inputs."""
  iterations = {"num_iters": 20} if "num_iters" in xent_jax.list_losses()[name].hparams else {}
  with jax.enable_x64(True):
    hidden = jnp.asarray(RNG.normal(size=(14, 5)))
    weight = jnp.asarray(RNG.normal(size=(9, 5)) * 0.5)
    labels = jnp.asarray(RNG.integers(0, 9, size=14)).at[3].set(-100)
    loss = xent_jax.get_loss(name, label_smoothing=0.1, **iterations)
    fused = lambda h, w: loss.linear(h, w, labels, reduction=reduction)
    full = lambda h, w: loss(h @ w.T, labels, reduction=reduction)
    tangents = (jnp.asarray(RNG.normal(size=(14, 5))), jnp.asarray(RNG.normal(size=(9, 5))))
    # One jitted program for both: eager, every primitive of the loops compiles separately.
    got, want = jax.jit(
      lambda p, t: (jax.jvp(fused, p, t), jax.jvp(full, p, t)),
    )((hidden, weight), tangents)
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
    summed = jax.jit(lambda h, w: jnp.sum(fused(h, w)))
    check_grads(summed, (hidden, weight), order=1, modes=("fwd", "rev"))


@pytest.mark.parametrize("name", ["focal", "confidence_penalty"])
def test_fused_one_pass_second_derivative(name):
  """Reverse over reverse through the one-pass schedule equals the logits path's Hessian."""
  with jax.enable_x64(True):
    hidden = jnp.asarray(RNG.normal(size=(14, 5)))
    weight = jnp.asarray(RNG.normal(size=(9, 5)) * 0.5)
    labels = jnp.asarray(RNG.integers(0, 9, size=14))
    loss = xent_jax.get_loss(name, label_smoothing=0.1)
    fused = lambda w: loss.linear(hidden, w, labels)
    full = lambda w: loss(hidden @ w.T, labels)
    hessian = lambda f: jax.jit(jax.jacrev(jax.grad(f)))(weight)
    np.testing.assert_allclose(hessian(fused), hessian(full), rtol=1e-8, atol=1e-12)


def test_fused_bfloat16_weight_gradient_sums_chunks_in_float32(monkeypatch):
  """The rematerialising schedule ('none'; forced here, as for probability labels) over 128 token
  chunks of bfloat16 inputs: where a float32 [V, D] buffer is small the weight gradient sums over
  the chunks in float32, within 1e-2 of its largest entry of the float64 gradient (summed in
  bfloat16 it was off by about 5e-2)."""
  monkeypatch.setattr(fused_heads, "takes_blocks", lambda *dtypes: False)
  n, d, v = 2048, 32, 512
  hidden = jnp.asarray(RNG.normal(size=(n, d)) / 4, jnp.bfloat16)
  weight = jnp.asarray(RNG.normal(size=(v, d)), jnp.bfloat16)
  labels = jnp.asarray(RNG.integers(0, v, size=n))
  got, want = _fused_and_float64_weight_grads(xent_jax.get_loss("focal"), hidden, weight, labels)
  assert np.max(np.abs(got - want)) <= 1e-2 * np.max(np.abs(want))


def _fused_and_float64_weight_grads(loss, hidden, weight, labels):
  """The weight gradient of ``loss.linear`` ('none', summed; 16-row token chunks) and the float64
  gradient of the same inputs on the full logits."""
  fused = lambda w: jnp.sum(loss.linear(hidden, w, labels, reduction="none", token_chunk_size=16))
  got = np.asarray(jax.jit(jax.grad(fused))(weight), np.float64)
  with jax.enable_x64(True):
    h64 = jnp.asarray(hidden, jnp.float64)
    full = lambda w: jnp.sum(loss(h64 @ w.T, labels, reduction="none"))
    want = np.asarray(jax.jit(jax.grad(full))(jnp.asarray(weight, jnp.float64)))
  return got, want


# The engine's heads (every registered loss but cross-entropy, whose fused form is
# linear_cross_entropy, and bi-tempered, which rematerialises token chunks).
_ENGINE_HEADS = [n for n in _ENGINE_FUSED if n != "bi_tempered"]


@pytest.mark.parametrize("name", _ENGINE_HEADS)
@pytest.mark.parametrize("order", ["token", "vocab"])
def test_fused_head_blocks_equal_the_logits_path(name, order, monkeypatch):
  """The blocked two-pass schedule of an engine head ('none', return_stats), in both loop orders,
  with chunks that do not divide N or V, smoothing, class weights, a bias, an ignored row and
  both weight layouts:
  values, statistics, JVP and gradients equal the logits path's in float64."""
  from xent_jax.fused import schedule as fused_schedule  # pylint: disable=import-outside-toplevel

  plan = fused_schedule.plan_schedule
  monkeypatch.setattr(
    fused_schedule,
    "plan_schedule",
    lambda *a, **k: plan(*a, **k)._replace(
      token_chunk=4, vocab_chunk=4, vocab_major=order == "vocab"
    ),
  )
  monkeypatch.setattr(fused_heads, "takes_blocks", lambda *dtypes: True)
  with jax.enable_x64(True):
    hidden = jnp.asarray(RNG.normal(size=(14, 5)))
    weight = jnp.asarray(RNG.normal(size=(9, 5)) * 0.7)
    bias = jnp.asarray(RNG.normal(size=(9,)))
    class_weight = jnp.asarray(RNG.uniform(0.5, 2.0, size=9))
    labels = jnp.asarray(RNG.integers(0, 9, size=14)).at[3].set(-100)
    loss = xent_jax.get_loss(name, label_smoothing=0.1)
    # The [D, V] layout in vocabulary-major order, [V, D] in token-major.
    layout = "dv" if order == "vocab" else "vd"
    as_layout = (lambda w: w.T) if layout == "dv" else (lambda w: w)
    options = dict(bias=bias, class_weight=class_weight, reduction="none", weight_layout=layout)
    fused = lambda h, w: loss.linear(h, as_layout(w), labels, return_stats=True, **options)
    logits = lambda h, w: h @ w.T + bias[None]
    full = lambda h, w: loss(logits(h, w), labels, class_weight=class_weight, reduction="none")
    per_row = lambda h, w: fused(h, w)[0]
    tangents = (jnp.asarray(RNG.normal(size=(14, 5))), jnp.asarray(RNG.normal(size=(9, 5))))
    scale = jnp.asarray(RNG.normal(size=14))

    def derivatives(f, h, w):
      """The JVP along the tangents and the gradients of ``sum(scale * f)``."""
      weighted_sum = lambda h, w: jnp.sum(scale * f(h, w))
      return jax.jvp(f, (h, w), tangents), jax.grad(weighted_sum, argnums=(0, 1))(h, w)

    # One jitted program for both paths: eager, every primitive of the loops compiles separately,
    # and each compiled program costs more here than its work.
    both = jax.jit(
      lambda h, w: (fused(h, w), full(h, w), derivatives(per_row, h, w), derivatives(full, h, w))
    )
    (got, stats), want_values, (got_jvp, got_grads), (want_jvp, want_grads) = both(hidden, weight)
    np.testing.assert_allclose(got, want_values, rtol=1e-10, atol=1e-12)
    log_p = jax.nn.log_softmax(logits(hidden, weight))
    valid = labels != -100
    want_stats = {
      "log_prob": jnp.take_along_axis(log_p, jnp.where(valid, labels, 0)[:, None], -1)[:, 0],
      "entropy": -jnp.sum(jnp.exp(log_p) * log_p, -1),
      "lse": jax.nn.logsumexp(logits(hidden, weight), -1),
    }
    for key, want in want_stats.items():
      np.testing.assert_allclose(stats[key], jnp.where(valid, want, 0), rtol=1e-10, atol=1e-12)
    for g, w in zip(got_jvp, want_jvp):
      np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
      np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_fused_head_blocks_second_derivative(monkeypatch):
  """Forward over reverse through the blocked two-pass schedule equals the logits path's
  Hessian (the confidence penalty with smoothing: the class-sum and entropy pass is
  differentiated too)."""
  name = "confidence_penalty"
  from xent_jax.fused import schedule as fused_schedule  # pylint: disable=import-outside-toplevel

  plan = fused_schedule.plan_schedule
  monkeypatch.setattr(
    fused_schedule,
    "plan_schedule",
    lambda *a, **k: plan(*a, **k)._replace(token_chunk=4, vocab_chunk=4),
  )
  monkeypatch.setattr(fused_heads, "takes_blocks", lambda *dtypes: True)
  with jax.enable_x64(True):
    hidden = jnp.asarray(RNG.normal(size=(14, 5)))
    weight = jnp.asarray(RNG.normal(size=(9, 5)) * 0.5)
    labels = jnp.asarray(RNG.integers(0, 9, size=14))
    loss = xent_jax.get_loss(name, label_smoothing=0.1)
    fused = lambda w: jnp.sum(loss.linear(hidden, w, labels, reduction="none"))
    full = lambda w: jnp.sum(loss(hidden @ w.T, labels, reduction="none"))
    hessian = lambda f: jax.jit(jax.jacfwd(jax.grad(f)))(weight)
    np.testing.assert_allclose(hessian(fused), hessian(full), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["cross_entropy", "focal", "confidence_penalty"])
def test_fused_form_takes_vocab_chunk_size(name):
  """``vocab_chunk_size`` selects the blocked schedule whatever the dtype (float64 here, 'mean',
  which would otherwise take one pass), with chunks that do not divide V, as
  ``linear_cross_entropy``'s does; values and gradients equal the logits path's."""
  with jax.enable_x64(True):
    hidden = jnp.asarray(RNG.normal(size=(14, 5)))
    weight = jnp.asarray(RNG.normal(size=(9, 5)) * 0.5)
    labels = jnp.asarray(RNG.integers(0, 9, size=14)).at[3].set(-100)
    loss = xent_jax.get_loss(name)
    fused = lambda h, w: loss.linear(h, w, labels, vocab_chunk_size=4, token_chunk_size=4)
    full = lambda h, w: loss(h @ w.T, labels)
    # One jitted program for both (eagerly, each primitive would compile on its own).
    got, want = jax.jit(
      lambda *p: [jax.value_and_grad(f, argnums=(0, 1))(*p) for f in (fused, full)]
    )(hidden, weight)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_fused_form_refuses_vocab_chunk_size_it_cannot_use():
  hidden, weight = jnp.ones((6, 4)), jnp.ones((9, 4))
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match="vocab_chunk_size"):
      xent_jax.get_loss("focal").linear(hidden, weight, LABELS, vocab_chunk_size=bad)
  with pytest.raises(ValueError, match=r"vocab_chunk_size.*'bi_tempered'"):
    xent_jax.get_loss("bi_tempered").linear(hidden, weight, LABELS, vocab_chunk_size=4)
  probabilities = jnp.full((6, 9), 1 / 9)
  with pytest.raises(ValueError, match=r"vocab_chunk_size.*probability labels"):
    xent_jax.get_loss("focal").linear(hidden, weight, probabilities, vocab_chunk_size=4)


def test_fused_head_takes_blocks_for_narrow_weights():
  """The blocked statistics serve weights narrower than the accumulation dtype; float32 and
  float64 weights rematerialise (their gradient sums in float32 either way)."""
  assert fused_heads.takes_blocks(jnp.bfloat16, jnp.bfloat16)
  assert fused_heads.takes_blocks(jnp.float32, jnp.float16)
  assert not fused_heads.takes_blocks(jnp.bfloat16, jnp.float32)
  assert not fused_heads.takes_blocks(jnp.float32, jnp.float32)
  assert not fused_heads.takes_blocks(jnp.float64, jnp.float64)


def test_fused_head_bfloat16_weight_gradient_is_summed_in_float32():
  """A bfloat16 head whose float32 [V, D] buffer is not small takes the vocabulary-major order:
  each block of the weight gradient is summed over all 16 token chunks in float32 and rounded to
  bfloat16 once, so every entry is within bfloat16 rounding (2**-8, relative) of the float64
  gradient of the same bfloat16 inputs. Summed in bfloat16 over the chunks, as rematerialised
  token chunks do, entries are off by several roundings."""
  from xent_jax.fused import schedule as fused_schedule  # pylint: disable=import-outside-toplevel

  n, d, v = 256, 32, 8192
  plan = fused_schedule.plan_schedule(
    "t",
    n,
    d,
    v,
    linear_reduction=False,
    token_chunk_size=16,
    vocab_chunk_size=None,
    hidden_dtype=jnp.bfloat16,
    weight_dtype=jnp.bfloat16,
  )
  assert plan.vocab_major and not plan.one_pass
  hidden = jnp.asarray(RNG.normal(size=(n, d)), jnp.bfloat16)
  weight = jnp.asarray(RNG.normal(size=(v, d)) / 4, jnp.bfloat16)
  labels = jnp.asarray(RNG.integers(0, v, size=n))
  # The class sum and the entropy: every term of the blocked tangent.
  loss = xent_jax.get_loss("confidence_penalty", label_smoothing=0.1)
  got, want = _fused_and_float64_weight_grads(loss, hidden, weight, labels)
  error = np.abs(got - want)
  assert np.all(error <= 2.0**-8 * np.abs(want) + 1e-6 * np.max(np.abs(want))), np.max(
    error / (np.abs(want) + 1e-6 * np.max(np.abs(want)))
  )


SERIES_HEADS = {
  "poly1": lambda: variants.poly1_head(1.5),
  "generalized_ce": lambda: variants.generalized_head(0.7),
  "taylor2": lambda: variants.taylor_head(2),
  "cross_entropy": lambda: heads.Head(heads.neg_log, class_series=engine.PowerSeries(-1.0)),
}


@pytest.mark.parametrize("name", sorted(SERIES_HEADS))
def test_power_series_equals_its_class_fn_and_saves_passes(name, monkeypatch):
  """A head's declared power series is its class function (float64, p from 1e-30 to 1 - 1e-12),
  the engine's sums and their derivatives are those of the elementwise form, and the JVP makes
  fewer passes over the logits."""
  head = SERIES_HEADS[name]()
  series = head.class_series
  with jax.enable_x64(True):
    p = np.concatenate(
      [np.logspace(-30, -1, 40), np.linspace(0.1, 0.9, 9), 1 - np.logspace(-12, -2, 10)]
    )
    a, c = series.log_coef, series.constant
    expected = a * np.log(p) + c + sum(b * p**j for j, b in series.powers)
    np.testing.assert_allclose(
      jax.jit(head.class_fn)(jnp.log(jnp.asarray(p))), expected, rtol=1e-12, atol=1e-14
    )

    logits = jnp.asarray(LOGITS, jnp.float64)
    labels = jnp.asarray([0, 3, 8, 2, 5, 1], jnp.int32)  # also read outside x64 below
    sums = lambda s: (
      lambda x: engine.row_stats(x, labels, (engine.ClassSum(head.class_fn, series=s),)).class_sums[
        0
      ]
    )
    with_series, elementwise = jax.jit(sums(series)), sums(None)
    # The sums and both Jacobians of both forms in one jitted program.
    got, want = jax.jit(
      lambda x: [(f(x), jax.jacfwd(f)(x), jax.jacrev(f)(x)) for f in (sums(series), elementwise)]
    )(logits)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
    for got_jac, want_jac in zip(got[1:], want[1:]):
      np.testing.assert_allclose(got_jac, want_jac, rtol=1e-10, atol=1e-12)
    check_grads(with_series, (logits,), order=2, modes=("fwd", "rev"))

  passes = []
  separate_sums = engine.separate_sums
  monkeypatch.setattr(
    engine, "separate_sums", lambda s, like: passes.append(len(s)) or separate_sums(s, like)
  )
  for s in (series, None):  # the passes are counted as the JVP is traced
    jax.make_jaxpr(lambda x, s=s: jax.jvp(sums(s), (x,), (x,)))(LOGITS)
  assert passes[0] < passes[1], passes


def test_power_series_is_left_out_where_it_would_lose_precision():
  assert variants.generalized_head(0.05).class_series is None  # (1 - p^q)/q cancels
  assert variants.taylor_head(3).class_series is None  # as many passes as f and f'
  assert variants.poly1_head(jnp.float32(1.0)).class_series is None  # a traced hyper-parameter
  weighted = variants.poly1_head(1.0)
  assert heads._series_for(weighted, weighted=True) is None  # several terms, class weights
  assert heads._series_for(weighted, weighted=False) is weighted.class_series
