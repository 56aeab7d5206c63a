r"""The bi-tempered loss with the classes split over a mesh axis,
``get_loss("bi_tempered").vocab_parallel``, against the one-device loss (itself tested against a
float64 NumPy replica in ``test_bitempered.py``): values, gradients of the logits (and of
probability labels, which get them through class weights), forward mode, per-row memory, and
traced hyper-parameters.

Every test runs on a 2 x 4 (data x vocab) mesh of the 8 fake CPU devices (``conftest.py``): each
device holds ``[N/2, V/4]`` logits, so the maximum, every class sum of the normalization's
fixed-point (:math:`t_2 > 1`) or bisection (:math:`t_2 < 1`) iterations, the loss's row sums and
the tangent's sum are completed with ``pmax``/``psum``, and each label's logit comes from one
shard.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import xent_jax

RNG = np.random.default_rng(21)
N, V = 6, 16
LOGITS_NxV = jnp.asarray(RNG.normal(size=(N, V)) * 3, jnp.float32)
# Labels on every vocabulary shard (4 classes each), an ignored row (-100) and a masked one.
LABELS_N = jnp.asarray([0, 7, -100, 15, 9, 4])
WHERE_N = jnp.asarray([True, True, True, True, False, True])
PROBS_NxV = jnp.asarray(RNG.dirichlet(np.ones(V) * 0.3, size=N), jnp.float32)
WEIGHT_V = jnp.asarray(RNG.uniform(0.5, 2.0, size=V), jnp.float32)
TANGENT_NxV = jnp.asarray(RNG.normal(size=(N, V)), jnp.float32)

# (hyper-parameters, options): t2 on both sides of 1 and at 1, t1 below and at 1, smoothing,
# each with a different reduction, data axis and class axis.
CASES = [
  (dict(t1=0.8, t2=1.2), dict(reduction="mean", data_axis="data")),
  (dict(t1=0.5, t2=0.7, num_iters=25, label_smoothing=0.1), dict(reduction="sum", data_axis=None)),
  (dict(t1=0.7, t2=1.0, label_smoothing=0.2), dict(reduction="none", data_axis="data", axis=0)),
  (dict(t1=1.0, t2=1.5, num_iters=3), dict(reduction="mean", data_axis=None, ignore_index=9)),
]
IDS = ["t2>1-mean", "t2<1-smoothing-sum", "t2=1-none-axis0", "t1=1-ignore_index"]


def _mesh():
  return jax.make_mesh((2, 4), ("data", "vocab"), devices=jax.devices()[:8])


def _scalar(loss, options):
  """The loss made a scalar to differentiate: a fixed random mix of the rows for 'none'."""
  if options["reduction"] != "none":
    return loss
  return jnp.vdot(jnp.linspace(0.5, 1.5, loss.size).reshape(loss.shape), loss)


def _both(hparams, options, labels):
  """The one-device loss and its vocabulary-parallel form, as functions of (logits, labels)."""
  loss = xent_jax.get_loss("bi_tempered", **hparams)
  common = dict(options, weight=WEIGHT_V, where=WHERE_N)
  data_axis = common.pop("data_axis")
  if common.get("axis") == 0:
    labels = labels.T
  full = lambda x, y: _scalar(loss(x, y, **common), options)
  sharded = lambda x, y: _scalar(
    loss.vocab_parallel(x, y, mesh=_mesh(), data_axis=data_axis, **common), options
  )
  return full, sharded, labels


def _assert_close(got, want):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-7)


def _logits(options):
  return LOGITS_NxV.T if options.get("axis") == 0 else LOGITS_NxV


@pytest.mark.parametrize("hparams,options", CASES, ids=IDS)
def test_integer_labels_match_one_device(hparams, options):
  """Value and logits gradient with class weights, an ignored row and a mask, global labels."""
  full, sharded, labels = _both(hparams, options, LABELS_N)
  logits = _logits(options)
  want, want_grad = jax.value_and_grad(full)(logits, labels)
  got, got_grad = jax.jit(jax.value_and_grad(sharded))(logits, labels)
  _assert_close(got, want)
  _assert_close(got_grad, want_grad)


@pytest.mark.parametrize("hparams,options", [CASES[0], CASES[1], CASES[2]], ids=IDS[:3])
def test_probability_labels_match_one_device(hparams, options):
  """Each shard gets its slice of the probabilities; gradients of logits and labels."""
  full, sharded, probs = _both(hparams, options, PROBS_NxV)
  logits = _logits(options)
  want, want_grads = jax.value_and_grad(full, argnums=(0, 1))(logits, probs)
  got, got_grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(logits, probs)
  _assert_close(got, want)
  for g, w in zip(got_grads, want_grads):
    _assert_close(g, w)


@pytest.mark.parametrize(
  "hparams,labels",
  [(CASES[0][0], LABELS_N), (CASES[1][0], PROBS_NxV)],
  ids=["t2>1-integer", "t2<1-probabilities"],
)
def test_forward_mode_matches_one_device(hparams, labels):
  """``jax.jvp`` of the vocabulary-parallel form (its custom JVP's tangent is a ``psum``)."""
  options = dict(reduction="mean", data_axis="data")
  full, sharded, labels = _both(hparams, options, labels)
  jvp = lambda f: jax.jit(lambda x, t: jax.jvp(lambda x: f(x, labels), (x,), (t,)))
  got = jvp(sharded)(LOGITS_NxV, TANGENT_NxV)
  want = jvp(full)(LOGITS_NxV, TANGENT_NxV)
  for g, w in zip(got, want):
    _assert_close(g, w)


def test_traced_hyperparameters_match_one_device():
  """t1, t2 and the smoothing traced (vmapped over t2 below, at and above 1, with t1 = 1 and the
  KL point, and one member out of range): values and gradients wrt the logits and the smoothing of
  the vocabulary-parallel form equal the one-device loss; forward mode too; the out-of-range
  member is NaN."""
  options = dict(CASES[0][1], class_weight=WEIGHT_V, where=WHERE_N)
  data_axis = options.pop("data_axis")

  def loss(t1, t2, label_smoothing):
    return xent_jax.get_loss(
      "bi_tempered", t1=t1, t2=t2, label_smoothing=label_smoothing, num_iters=25
    )

  sharded = lambda x, *h: loss(*h).vocab_parallel(
    x, LABELS_N, mesh=_mesh(), data_axis=data_axis, **options
  )
  full = lambda x, *h: loss(*h)(x, LABELS_N, **options)
  grid = jnp.asarray([(0.5, 0.7, 0.1), (1.0, 1.0, 0.2), (1.0, 1.5, 0.0), (0.8, 1.0, 0.1)]).T
  bad = jnp.asarray([(0.8, 1.2, 1.0)]).T

  def sweep(f):
    value_and_grad = jax.vmap(jax.value_and_grad(f, argnums=(0, 3)), in_axes=(None, 0, 0, 0))
    jvp = jax.vmap(
      lambda x, t, *h: jax.jvp(lambda x: f(x, *h), (x,), (t,))[1], in_axes=(None, None, 0, 0, 0)
    )
    return jax.jit(lambda x, t, *h: (value_and_grad(x, *h), jvp(x, t, *h)))

  got, got_jvp = sweep(sharded)(LOGITS_NxV, TANGENT_NxV, *jnp.concatenate([grid, bad], axis=1))
  want, want_jvp = sweep(full)(LOGITS_NxV, TANGENT_NxV, *grid)
  for g, w in zip(jax.tree.leaves((got, got_jvp)), jax.tree.leaves((want, want_jvp))):
    _assert_close(g[:4], w)
    assert np.all(np.isnan(np.asarray(g[4])))


@pytest.mark.parametrize(
  "label_kind,hparams",
  [
    ("integer", dict()),
    ("integer", dict(t1=0.5, t2=0.8, num_iters=20, label_smoothing=0.1)),
    ("probabilities", dict(label_smoothing=0.1)),
  ],
  ids=["integer-default", "integer-t2<1-smoothing", "probabilities-smoothing"],
)
def test_compiled_temp_memory_is_that_of_one_device_on_its_shard(label_kind, hparams):
  """fwd+bwd of the vocabulary-parallel form keeps no ``[N_s, V_s]`` float32 temporary per device
  beyond what the one-device loss keeps on a block of that size (in practice both keep a few
  per-row vectors, about 1-2 KiB here, against 128 KiB for one block)."""
  n, v = 64, 4096
  n_s, v_s = n // 2, v // 4
  mesh = _mesh()
  loss = xent_jax.get_loss("bi_tempered", **hparams)
  sharded = jax.value_and_grad(lambda x, y: loss.vocab_parallel(x, y, mesh=mesh, data_axis="data"))
  spec = P("data", "vocab")
  x = jax.ShapeDtypeStruct((n, v), jnp.float32, sharding=NamedSharding(mesh, spec))
  x_block = jax.ShapeDtypeStruct((n_s, v_s), jnp.float32)
  if label_kind == "integer":
    y = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=NamedSharding(mesh, P("data")))
    y_block = jax.ShapeDtypeStruct((n_s,), jnp.int32)
  else:
    y = jax.ShapeDtypeStruct((n, v), jnp.float32, sharding=NamedSharding(mesh, spec))
    y_block = x_block
  temp = jax.jit(sharded).lower(x, y).compile().memory_analysis().temp_size_in_bytes
  one = jax.jit(jax.value_and_grad(loss)).lower(x_block, y_block).compile()
  temp_one = one.memory_analysis().temp_size_in_bytes
  bound = temp_one + n_s * v_s * 4 // 8
  assert temp <= bound, f"{temp} bytes of temp memory per device, one device {temp_one}"


def test_return_lse_is_refused_by_name():
  loss = xent_jax.get_loss("bi_tempered")
  with pytest.raises(ValueError, match="`return_lse`"):
    loss.vocab_parallel(LOGITS_NxV, LABELS_N, mesh=_mesh(), return_lse=True)
