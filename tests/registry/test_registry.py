"""Tests of the loss registry: names, hyper-parameters read off signatures, eager validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import xent_jax

LOGITS = np.random.default_rng(1).normal(size=(4, 3)).astype(np.float32)
LABELS = np.array([0, 2, -100, 1], np.int32)
CONVENTIONS = {"axis", "weight", "ignore_index", "reduction", "where"}

EXPECTED = {
  "cross_entropy": (xent_jax.cross_entropy, {}),
  "label_smoothing": (xent_jax.cross_entropy, {"label_smoothing": 0.1}),
  "z_loss": (xent_jax.cross_entropy, {"z_loss": 1e-4}),
  "softmax_focal_loss": (xent_jax.softmax_focal_loss, {}),
  "poly1_cross_entropy": (xent_jax.poly1_cross_entropy, {}),
  "bi_tempered_logistic_loss": (xent_jax.bi_tempered_logistic_loss, {}),
  "symmetric_cross_entropy": (xent_jax.symmetric_cross_entropy, {}),
  "generalized_cross_entropy": (xent_jax.generalized_cross_entropy, {}),
  "truncated_generalized_cross_entropy": (xent_jax.truncated_generalized_cross_entropy, {}),
  "taylor_cross_entropy": (xent_jax.taylor_cross_entropy, {}),
  "confidence_penalty_cross_entropy": (xent_jax.confidence_penalty_cross_entropy, {}),
}


def test_names_and_functions():
  losses = xent_jax.list_losses()
  assert set(losses) == set(EXPECTED)
  for name, (fn, _) in EXPECTED.items():
    assert losses[name].fn is fn
    assert losses[name].summary and "\n" not in losses[name].summary
  # Registered under the function's own name, except the two cross-entropy presets.
  for name, info in losses.items():
    assert name in ("label_smoothing", "z_loss") or info.fn.__name__ == name


def test_aliases_configure_the_same_loss():
  """The short names of configs and earlier releases still name each loss."""
  logits, labels = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2]]), jnp.array([0, 2])
  for alias, name in xent_jax.registry.ALIASES.items():
    assert name in xent_jax.list_losses() and alias not in xent_jax.list_losses()
    np.testing.assert_array_equal(
      xent_jax.get_loss(alias)(logits, labels), xent_jax.get_loss(name)(logits, labels)
    )
  with pytest.raises(ValueError, match="registered already"):
    xent_jax.register_loss("focal")(lambda log_p: -log_p)


def test_focal_loss_is_the_deprecated_name_of_softmax_focal_loss():
  logits, labels = jnp.array([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2]]), jnp.array([0, 2])
  with pytest.warns(DeprecationWarning, match="renamed softmax_focal_loss"):
    old = xent_jax.focal_loss(logits, labels, gamma=1.5)
  np.testing.assert_array_equal(old, xent_jax.softmax_focal_loss(logits, labels, gamma=1.5))


DOCUMENTED_HPARAMS = {
  "cross_entropy": {
    "label_smoothing": 0.0,
    "smoothing": "uniform",
    "z_loss": 0.0,
    "logit_softcap": None,
  },
  "label_smoothing": {
    "label_smoothing": 0.1,
    "smoothing": "uniform",
    "z_loss": 0.0,
    "logit_softcap": None,
  },
  "z_loss": {"label_smoothing": 0.0, "smoothing": "uniform", "z_loss": 1e-4, "logit_softcap": None},
  "softmax_focal_loss": {"gamma": 2.0, "alpha": None, "label_smoothing": 0.0},
  "poly1_cross_entropy": {"epsilon": 2.0, "label_smoothing": 0.0},
  "bi_tempered_logistic_loss": {"t1": 0.8, "t2": 1.2, "label_smoothing": 0.0, "num_iters": 5},
  "symmetric_cross_entropy": {"alpha": 0.1, "beta": 1.0, "log_clip": -4.0, "label_smoothing": 0.0},
  "generalized_cross_entropy": {"q": 0.7, "label_smoothing": 0.0},
  "truncated_generalized_cross_entropy": {"q": 0.7, "k": 0.5, "label_smoothing": 0.0},
  "taylor_cross_entropy": {"order": 2, "label_smoothing": 0.0},
  "confidence_penalty_cross_entropy": {"beta": 0.1, "label_smoothing": 0.0},
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_documented_hparams(name):
  """The hyper-parameters and defaults the README documents, written out by hand."""
  assert xent_jax.list_losses()[name].hparams == DOCUMENTED_HPARAMS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_get_loss_defaults_equal_direct_call(name, reduction):
  fn, overrides = EXPECTED[name]
  loss_fn = xent_jax.get_loss(name)
  got = loss_fn(
    LOGITS, LABELS, reduction=reduction, class_weight=np.array([1.0, 2.0, 0.5], np.float32)
  )
  want = fn(
    LOGITS,
    LABELS,
    **overrides,
    reduction=reduction,
    class_weight=np.array([1.0, 2.0, 0.5], np.float32),
  )
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bound_hparams_and_conventions_reach_the_loss():
  loss_fn = xent_jax.get_loss("focal", gamma=0.5, alpha=[0.2, 0.3, 0.5])
  logits_ckl = np.moveaxis(LOGITS.reshape(2, 2, 3), -1, 1)
  got = jax.jit(
    lambda x: loss_fn(
      x,
      LABELS.reshape(2, 2),
      axis=1,
      reduction="sum",
      where=np.array([[True, False], [True, True]]),
    )
  )(logits_ckl)
  want = xent_jax.softmax_focal_loss(
    logits_ckl,
    LABELS.reshape(2, 2),
    gamma=0.5,
    alpha=[0.2, 0.3, 0.5],
    axis=1,
    reduction="sum",
    where=np.array([[True, False], [True, True]]),
  )
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
  assert loss_fn.hparams == {"gamma": 0.5, "alpha": [0.2, 0.3, 0.5], "label_smoothing": 0.0}


def test_label_smoothing_and_z_loss_entries_configure_cross_entropy():
  got = xent_jax.get_loss("label_smoothing", label_smoothing=0.2, smoothing="t5x")(LOGITS, LABELS)
  want = xent_jax.cross_entropy(LOGITS, LABELS, label_smoothing=0.2, smoothing="t5x")
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  got = xent_jax.get_loss("z_loss")(LOGITS, LABELS)
  plain = xent_jax.cross_entropy(LOGITS, LABELS, reduction="none")
  lse = jax.nn.logsumexp(jnp.asarray(LOGITS), axis=-1)
  valid = LABELS != -100
  want = np.sum(np.where(valid, plain + 1e-4 * lse**2, 0)) / np.sum(valid)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def test_unknown_name_lists_the_registered_ones():
  with pytest.raises(ValueError, match=r"unknown loss 'focall'.*'focal'.*'taylor_ce'"):
    xent_jax.get_loss("focall")


def test_unknown_hparam_lists_the_valid_ones():
  with pytest.raises(
    ValueError, match=r"\['gammma'\].*valid ones: \['gamma', 'alpha', 'label_smoothing'\]"
  ):
    xent_jax.get_loss("focal", gammma=1.0)
  with pytest.raises(ValueError, match="'reduction'"):  # a convention is not a hyper-parameter
    xent_jax.get_loss("poly1", reduction="sum")


@pytest.mark.parametrize(
  "name,hparams,bad",
  [
    ("focal", dict(gamma=-0.5), "gamma"),
    ("focal", dict(alpha=[1.0, -1.0]), "alpha"),
    ("poly1", dict(epsilon=-3.0), "epsilon"),
    ("generalized_ce", dict(q=0.0), "q"),
    ("generalized_ce", dict(q=1.01), "q"),
    ("truncated_gce", dict(k=1.0), "k"),
    ("taylor_ce", dict(order=0), "order"),
    ("bi_tempered", dict(t1=1.2), "t1"),
    ("bi_tempered", dict(t2=-1.0), "t2"),
    ("bi_tempered", dict(label_smoothing=1.0), "label_smoothing"),
    ("symmetric_ce", dict(log_clip=1.0), "log_clip"),
    ("confidence_penalty", dict(beta=-0.1), "beta"),
    ("label_smoothing", dict(label_smoothing=1.5), "label_smoothing"),
    ("cross_entropy", dict(smoothing="gaussian"), "smoothing"),
    ("z_loss", dict(z_loss=-1.0), "z_loss"),
    ("cross_entropy", dict(logit_softcap=0.0), "logit_softcap"),
    ("focal", dict(gamma=math.nan), "gamma"),
  ],
)
def test_out_of_range_hparams_fail_in_get_loss(name, hparams, bad):
  with pytest.raises(ValueError, match=f"`{bad}`"):
    xent_jax.get_loss(name, **hparams)


def test_checks_run_once_per_scalar_value_or_traced_abstract_value(monkeypatch):
  """get_loss remembers a passed check by what it could see: a scalar's value, a traced value's
  shape and dtype. A new value, dtype or x64 mode is checked again; a concrete array every time;
  a failure is never remembered."""
  calls = []
  check = xent_jax.registry._check_on_abstract_inputs
  monkeypatch.setattr(
    xent_jax.registry, "_check_on_abstract_inputs", lambda fn, h: calls.append(h) or check(fn, h)
  )
  monkeypatch.setattr(xent_jax.registry, "_PASSED", {})

  def traced(gamma):
    return xent_jax.get_loss("focal", gamma=gamma)(LOGITS, LABELS)

  jax.jit(jax.vmap(traced))(jnp.asarray([0.5, 1.0]))
  jax.jit(traced)(jnp.float32(3.0))  # another trace, the same abstract value: not checked
  assert len(calls) == 1
  jax.jit(traced)(jnp.float16(3.0))
  jax.jit(traced)(3.0)  # a weakly typed float32
  assert len(calls) == 3
  xent_jax.get_loss("focal", gamma=1.5)
  xent_jax.get_loss("focal", gamma=1.5)
  assert len(calls) == 4
  with jax.enable_x64(True):
    xent_jax.get_loss("focal", gamma=1.5)
  assert len(calls) == 5
  xent_jax.get_loss("focal", alpha=np.array([1.0, 1.0, 1.0]))
  xent_jax.get_loss("focal", alpha=np.array([1.0, 1.0, 1.0]))
  assert len(calls) == 7
  for _ in range(2):
    with pytest.raises(ValueError, match="`gamma`"):
      xent_jax.get_loss("focal", gamma=-1.0)
  with pytest.raises(ValueError, match="`alpha`"):
    xent_jax.get_loss("focal", alpha=np.array([1.0, -1.0, 1.0]))
  assert len(calls) == 10


def test_wrong_kind_of_hparam_fails_in_get_loss():
  with pytest.raises(TypeError, match="`order`"):
    xent_jax.get_loss("taylor_ce", order=2.5)


def test_call_time_hparams_are_rejected():
  loss_fn = xent_jax.get_loss("focal")
  with pytest.raises(ValueError, match=r"gamma.*conventions"):
    loss_fn(LOGITS, LABELS, gamma=1.0)
  assert repr(loss_fn) == "get_loss('focal', gamma=2.0, alpha=None, label_smoothing=0.0)"


def test_vocab_parallel_form_refuses_an_unknown_keyword_by_name():
  """The sharded forms read their keywords themselves; a misspelt one is named, not ignored."""
  mesh = jax.make_mesh((1, 2), ("data", "vocab"), devices=jax.devices()[:2])
  logits, labels = jnp.zeros((2, 4)), jnp.array([0, 1])
  for name in ("focal", "bi_tempered"):
    with pytest.raises(TypeError, match=r"vocab_parallel: unexpected keyword argument 'wehre'"):
      xent_jax.get_loss(name).vocab_parallel(logits, labels, mesh=mesh, wehre=None)
