"""Tests of the vocabulary-parallel losses on 8 fake CPU devices (tests/conftest.py sets them).

Every sharded result is compared with the single-device xent_jax function and with the float64
NumPy reference of the formula (tests/_reference.py), values and gradients, on the meshes
(data x vocab) = (1 x 8), (2 x 4) and (4 x 2).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.test_util import check_grads

import xent_jax
from tests import _reference as ref
from xent_jax.fused import schedule as fused_schedule

pytestmark = pytest.mark.skipif(
  jax.device_count() < 8,
  reason=f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax "
  f"starts, as tests/conftest.py does), found {jax.device_count()}",
)

MESH_SHAPES = [(1, 8), (2, 4), (4, 2)]
N, V, D = 8, 32, 6

# Option sets, all for integer labels; "weight"/"where"/"ignore" are materialised by _inputs.
OPTIONS = {
  "plain": {},
  "weight_ignore_uniform_zloss": {
    "weight": True,
    "ignore": True,
    "label_smoothing": 0.1,
    "z_loss": 1e-2,
  },
  "t5x_softcap_where": {
    "label_smoothing": 0.2,
    "smoothing": "t5x",
    "logit_softcap": 4.0,
    "where": True,
    "weight": True,
  },
}


def _mesh(shape):
  return jax.make_mesh(shape, ("data", "vocab"))


def _inputs(seed, *, weight=False, ignore=False, where=False, batch=(N,), **options):
  rng = np.random.default_rng(seed)
  logits = (3.0 * rng.standard_normal(batch + (V,))).astype(np.float32)
  labels = rng.integers(0, V, batch).astype(np.int32)
  if ignore:
    labels.reshape(-1)[1] = -100
  if weight:
    options["weight"] = rng.uniform(0.5, 2.0, V).astype(np.float32)
  if where:
    mask = np.ones(batch, bool)
    mask.reshape(-1)[-2] = False
    options["where"] = mask
  return logits, labels, options


def _close(actual, expected, tol=2e-5):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=tol, atol=tol)


def _assert_linear_derivatives(single, primals, tangents, value, tangent, jac, grads):
  """The sharded loss's value, JVP tangent, ``jacfwd`` and ``grad`` (over hidden, weight and
  bias) against the single-device loss ``single``: forward mode equals reverse mode, and both
  the single-device gradient."""
  (want_value, want_tangent), want_grads = jax.jit(
    lambda p, t: (jax.jvp(single, p, t), jax.grad(single, argnums=(0, 1, 2))(*p))
  )(primals, tangents)
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  np.testing.assert_allclose(tangent, want_tangent, rtol=1e-4, atol=1e-5)
  for got_jac, grad, want in zip(jac, grads, want_grads):
    np.testing.assert_allclose(got_jac, grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)


def _linear_derivatives(loss):
  """``(primals, tangents) -> (jvp, jacfwd, grad)`` of ``loss(hidden, weight, bias)``, to jit as
  one program (each compiled program costs more here than its work)."""
  argnums = (0, 1, 2)
  return lambda p, t: (
    jax.jvp(loss, p, t),
    jax.jacfwd(loss, argnums=argnums)(*p),
    jax.grad(loss, argnums=argnums)(*p),
  )


def _linear_problem(rng, n=12):
  """A head for the linear losses: ``hidden [n, D]``, ``weight [V, D]``, ``bias [V]``, labels with
  an ignored row (2), ``options`` with class weights, smoothing 0.1, z-loss, a soft cap and a
  masked row (7)."""
  hidden = rng.standard_normal((n, D)).astype(np.float32)
  weight_VxD = (0.7 * rng.standard_normal((V, D))).astype(np.float32)
  bias = rng.standard_normal(V).astype(np.float32)
  labels = rng.integers(0, V, n).astype(np.int32)
  labels[2] = -100
  options = dict(
    class_weight=rng.uniform(0.5, 2.0, V).astype(np.float32),
    label_smoothing=0.1,
    z_loss=1e-3,
    logit_softcap=5.0,
    where=np.arange(n) != 7,
  )
  return hidden, weight_VxD, bias, labels, options


class TestVocabParallelCrossEntropy:
  @pytest.mark.parametrize("mesh_shape", MESH_SHAPES)
  @pytest.mark.parametrize("name", list(OPTIONS))
  def test_matches_single_device_and_reference(self, mesh_shape, name):
    logits, labels, options = _inputs(0, **OPTIONS[name])
    mesh = _mesh(mesh_shape)
    sharded = functools.partial(
      xent_jax.vocab_parallel_cross_entropy, mesh=mesh, data_axis="data", **options
    )

    @jax.jit
    def run(x):
      per_example = sharded(x, labels, reduction="none")
      mean, grad = jax.value_and_grad(lambda x: sharded(x, labels, reduction="mean"))(x)
      return per_example, mean, grad

    with jax.set_mesh(mesh):
      per_example, mean, grad = run(logits)
    single, single_grad = jax.jit(
      lambda x: (
        xent_jax.cross_entropy(x, labels, reduction="none", **options),
        jax.grad(lambda x: xent_jax.cross_entropy(x, labels, **options))(x),
      )
    )(logits)
    np.testing.assert_allclose(per_example, single, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, single_grad, rtol=1e-5, atol=1e-6)
    _close(per_example, ref.cross_entropy(logits, labels, reduction="none", **options))
    _close(mean, ref.cross_entropy(logits, labels, reduction="mean", **options))
    _close(grad, ref.cross_entropy_grad(logits, labels, reduction="mean", **options), 1e-5)

  @pytest.mark.parametrize("smoothing", ["uniform", "t5x"])
  def test_smoothing_spreads_over_global_class_count(self, smoothing):
    # The same loss for 1, 2, 4 and 8 vocabulary shards. Megatron-LM's vocab-parallel CE does
    # not have this property: its smoothing term uses the local partition (see
    # _megatron_smoothed_loss), so its loss moves with the number of shards by far more than
    # this test's tolerance.
    logits, labels, _ = _inputs(1)
    options = {"label_smoothing": 0.3, "smoothing": smoothing, "reduction": "none"}
    expected = ref.cross_entropy(logits, labels, **options)
    for vocab in (1, 2, 4, 8):
      mesh = _mesh((8 // vocab, vocab))
      with jax.set_mesh(mesh):
        got = jax.jit(
          functools.partial(
            xent_jax.vocab_parallel_cross_entropy, mesh=mesh, data_axis="data", **options
          )
        )(logits, labels)
      _close(got, expected)
      if vocab > 1:
        megatron_change = _megatron_smoothed_loss(logits, labels, 0.3, vocab) - (
          _megatron_smoothed_loss(logits, labels, 0.3, 1)
        )
        assert np.max(np.abs(megatron_change)) > 1e-2

  def test_axis_and_two_batch_dims(self):
    # [B, V, T] logits (PyTorch layout, axis=1); the first batch dimension is split over data.
    logits, labels, options = _inputs(2, batch=(4, 3), **OPTIONS["weight_ignore_uniform_zloss"])
    logits_BxVxT = np.moveaxis(logits, -1, 1)
    mesh = _mesh((2, 4))
    with jax.set_mesh(mesh):
      loss, grad = jax.jit(
        jax.value_and_grad(
          lambda x: xent_jax.vocab_parallel_cross_entropy(
            x, labels, mesh=mesh, data_axis="data", axis=1, reduction="sum", **options
          )
        )
      )(logits_BxVxT)
    _close(loss, ref.cross_entropy(logits_BxVxT, labels, axis=1, reduction="sum", **options))
    _close(
      grad, ref.cross_entropy_grad(logits_BxVxT, labels, axis=1, reduction="sum", **options), 1e-5
    )

  def test_return_lse_and_its_gradient(self):
    logits, labels, _ = _inputs(3)
    mesh = _mesh((2, 4))

    def total(x):
      loss, lse = xent_jax.vocab_parallel_cross_entropy(
        x, labels, mesh=mesh, data_axis="data", z_loss=0.1, return_lse=True
      )
      return loss + jnp.sum(lse**2), lse

    with jax.set_mesh(mesh):
      (_, lse), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(logits)
    single = lambda x: (lambda loss, s: loss + jnp.sum(s**2))(
      *xent_jax.cross_entropy(x, labels, z_loss=0.1, return_lse=True)
    )
    _close(lse, ref.logsumexp(logits))
    np.testing.assert_allclose(grad, jax.grad(single)(logits), rtol=1e-5, atol=1e-6)

  def test_check_grads(self):
    logits, labels, options = _inputs(4, **OPTIONS["t5x_softcap_where"])
    mesh = _mesh((2, 4))
    loss = jax.jit(
      lambda x: xent_jax.vocab_parallel_cross_entropy(
        x, labels, mesh=mesh, data_axis="data", z_loss=1e-2, **options
      )
    )
    with jax.set_mesh(mesh):
      check_grads(loss, (jnp.asarray(logits),), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)

  def test_auto_mesh_and_replicated_batch(self):
    # A mesh with Auto axes built by hand, rows replicated (data_axis=None), bf16 logits.
    logits, labels, options = _inputs(5, **OPTIONS["weight_ignore_uniform_zloss"])
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "vocab"))
    logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
    fn = lambda x: xent_jax.vocab_parallel_cross_entropy(x, labels, mesh=mesh, **options)
    loss, grad = jax.jit(jax.value_and_grad(fn))(logits_bf16)
    single = lambda x: xent_jax.cross_entropy(x, labels, **options)
    np.testing.assert_allclose(loss, single(logits_bf16), rtol=1e-5)
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(
      np.asarray(grad, np.float32),
      np.asarray(jax.grad(single)(logits_bf16), np.float32),
      rtol=1e-2,
      atol=1e-4,
    )

  def test_local_function_inside_user_shard_map(self):
    logits, labels, options = _inputs(6, **OPTIONS["weight_ignore_uniform_zloss"])
    weight = options.pop("weight")
    mesh = _mesh((4, 2))

    def local(x, y, w):
      return xent_jax.vocab_parallel_cross_entropy_local(
        x, y, vocab_axis="vocab", data_axis="data", weight=w, **options
      )

    mapped = jax.shard_map(
      local, mesh=mesh, in_specs=(P("data", "vocab"), P("data"), P("vocab")), out_specs=P()
    )
    with jax.set_mesh(mesh):
      args = [
        jax.device_put(a, jax.sharding.NamedSharding(mesh, s))
        for a, s in ((logits, P("data", "vocab")), (labels, P("data")), (weight, P("vocab")))
      ]
      loss, grad = jax.jit(jax.value_and_grad(mapped))(*args)
    _close(loss, ref.cross_entropy(logits, labels, weight=weight, **options))
    _close(grad, ref.cross_entropy_grad(logits, labels, weight=weight, **options), 1e-5)

  def test_out_of_range_label_is_nan_and_all_ignored_mean_is_zero(self):
    logits, labels, _ = _inputs(7)
    mesh = _mesh((2, 4))
    bad = labels.copy()
    bad[3] = V  # one past the last global class: no shard owns it.
    ignored = np.full_like(labels, -100)
    with jax.set_mesh(mesh):
      run = jax.jit(
        lambda x, y, r: xent_jax.vocab_parallel_cross_entropy(
          x, y, mesh=mesh, data_axis="data", reduction=r
        ),
        static_argnums=2,
      )
      per_example = run(logits, bad, "none")
      mean, grad = jax.value_and_grad(run)(logits, ignored, "mean")
    per_example = np.asarray(per_example)
    assert np.isnan(per_example[3]) and np.all(np.isfinite(np.delete(per_example, 3)))
    assert float(mean) == 0.0 and np.all(np.asarray(grad) == 0.0)


class TestVocabParallelLinearCrossEntropy:
  @pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
  def test_empty_batch_gives_the_single_device_value(self, reduction):
    # No rows to chunk: the loss of the empty logits, as linear_cross_entropy's (it raised
    # AttributeError on the missing schedule before).
    hidden, weight = np.zeros((0, D), np.float32), np.ones((V, D), np.float32)
    labels = np.zeros(0, np.int32)
    # Jitted: eager, every primitive in the shard_map compiles separately.
    got = jax.jit(
      lambda h, w: xent_jax.vocab_parallel_linear_cross_entropy(
        h, w, labels, mesh=_mesh((2, 4)), data_axis="data", reduction=reduction
      )
    )(hidden, weight)
    want = jax.jit(lambda h, w: xent_jax.linear_cross_entropy(h, w, labels, reduction=reduction))(
      hidden, weight
    )
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)

  @pytest.mark.parametrize("mesh_shape", MESH_SHAPES)
  @pytest.mark.parametrize(
    "reduction, layout, token_chunk, vocab_chunk",
    [("mean", "vd", None, None), ("sum", "dv", 3, None), ("none", "vd", 5, 3)],
  )
  def test_matches_single_device_and_reference(
    self, mesh_shape, reduction, layout, token_chunk, vocab_chunk
  ):
    # 'mean'/'sum' without vocab chunks take the one-pass schedule (gradients in the forward
    # pass); 'none' and vocab chunks the two-pass one. Chunks need not divide the shard sizes.
    hidden, weight_VxD, bias, labels, options = _linear_problem(np.random.default_rng(8))
    options.update(smoothing="t5x" if reduction == "sum" else "uniform", reduction=reduction)
    weight = weight_VxD if layout == "vd" else weight_VxD.T
    mesh = _mesh(mesh_shape)

    def sharded(h, w, b):
      return jnp.sum(
        xent_jax.vocab_parallel_linear_cross_entropy(
          h,
          w,
          labels,
          mesh=mesh,
          data_axis="data",
          bias=b,
          weight_layout=layout,
          token_chunk_size=token_chunk,
          vocab_chunk_size=vocab_chunk,
          **options,
        )
      )

    def single(h, w, b):
      return jnp.sum(
        xent_jax.linear_cross_entropy(h, w, labels, bias=b, weight_layout=layout, **options)
      )

    with jax.set_mesh(mesh):
      loss, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1, 2)))(hidden, weight, bias)
    single_loss, single_grads = jax.value_and_grad(single, argnums=(0, 1, 2))(hidden, weight, bias)
    np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
    for got, want in zip(grads, single_grads):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    logits = hidden.astype(np.float64) @ weight_VxD.T.astype(np.float64) + bias
    ref_options = {k: v for k, v in options.items() if k != "class_weight"}
    ref_options["weight"] = options["class_weight"]
    _close(loss, np.sum(ref.cross_entropy(logits, labels, **ref_options)), 1e-4)
    d_logits = ref.cross_entropy_grad(logits, labels, **ref_options)
    _close(grads[0], d_logits @ weight_VxD.astype(np.float64), 1e-4)
    d_weight_VxD = d_logits.T @ hidden.astype(np.float64)
    _close(grads[1], d_weight_VxD if layout == "vd" else d_weight_VxD.T, 1e-4)
    _close(grads[2], d_logits.sum(0), 1e-4)

  @pytest.mark.parametrize("order", ["token", "vocab"])
  def test_two_pass_loop_orders(self, order, monkeypatch):
    # Both backward loop orders on every shard (float32 shards this small would go token-major).
    plan = fused_schedule.plan_schedule
    monkeypatch.setattr(
      fused_schedule,
      "plan_schedule",
      lambda *a, **k: plan(*a, **k)._replace(vocab_major=order == "vocab"),
    )
    rng = np.random.default_rng(18)
    hidden = rng.standard_normal((12, D)).astype(np.float32)
    weight = (0.7 * rng.standard_normal((V, D))).astype(np.float32)
    bias = rng.standard_normal(V).astype(np.float32)
    labels = rng.integers(0, V, 12).astype(np.int32)
    mesh = _mesh((2, 4))
    options = {"label_smoothing": 0.1, "z_loss": 1e-3, "bias": bias}
    with jax.set_mesh(mesh):
      loss, grads = jax.jit(
        jax.value_and_grad(
          lambda h, w: jnp.sum(
            xent_jax.vocab_parallel_linear_cross_entropy(
              h,
              w,
              labels,
              mesh=mesh,
              data_axis="data",
              reduction="none",
              token_chunk_size=4,
              vocab_chunk_size=3,
              **options,
            )
          ),
          argnums=(0, 1),
        )
      )(hidden, weight)
    logits = hidden.astype(np.float64) @ weight.T.astype(np.float64) + bias
    ref_options = {"label_smoothing": 0.1, "z_loss": 1e-3}
    d_logits = ref.cross_entropy_grad(logits, labels, reduction="sum", **ref_options)
    _close(loss, ref.cross_entropy(logits, labels, reduction="sum", **ref_options), 1e-5)
    _close(grads[0], d_logits @ weight.astype(np.float64), 1e-4)
    _close(grads[1], d_logits.T @ hidden.astype(np.float64), 1e-4)

  def test_return_lse_and_batch_dims(self):
    rng = np.random.default_rng(9)
    hidden = rng.standard_normal((4, 3, D)).astype(np.float32)
    weight = rng.standard_normal((V, D)).astype(np.float32)
    labels = rng.integers(0, V, (4, 3)).astype(np.int32)
    mesh = _mesh((2, 4))
    with jax.set_mesh(mesh):
      loss, lse = jax.jit(
        lambda h, w: xent_jax.vocab_parallel_linear_cross_entropy(
          h, w, labels, mesh=mesh, data_axis="data", return_lse=True
        )
      )(hidden, weight)
    logits = hidden.astype(np.float64) @ weight.T.astype(np.float64)
    _close(loss, ref.cross_entropy(logits, labels), 1e-5)
    _close(lse, ref.logsumexp(logits), 1e-5)

  def test_bfloat16_on_an_auto_mesh(self):
    # bf16 inputs, a mesh with Auto axes built by hand: equal to the single-device fused loss,
    # gradients in bf16.
    rng = np.random.default_rng(11)
    hidden = jnp.asarray(rng.standard_normal((N, D)), jnp.bfloat16)
    weight = jnp.asarray(rng.standard_normal((V, D)), jnp.bfloat16)
    labels = rng.integers(0, V, N).astype(np.int32)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "vocab"))
    sharded = lambda h, w: xent_jax.vocab_parallel_linear_cross_entropy(
      h, w, labels, mesh=mesh, data_axis="data", z_loss=1e-3
    )
    single = lambda h, w: xent_jax.linear_cross_entropy(h, w, labels, z_loss=1e-3)
    loss, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(hidden, weight)
    single_loss, single_grads = jax.value_and_grad(single, argnums=(0, 1))(hidden, weight)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
    for got, want in zip(grads, single_grads):
      assert got.dtype == jnp.bfloat16
      np.testing.assert_allclose(
        np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-3
      )

  @pytest.mark.parametrize("reduction", ["mean", "none"])
  def test_local_function_inside_user_shard_map(self, reduction):
    # The per-shard function under the caller's own shard_map: 'mean' runs the one-pass schedule,
    # 'none' the two-pass one; values and gradients equal the single-device function's.
    from xent_jax.parallel.linear import vocab_parallel_linear_cross_entropy_local

    hidden, weight_VxD, bias, labels, options = _linear_problem(np.random.default_rng(31))
    options.update(reduction=reduction)
    class_weight, where = options.pop("class_weight"), options.pop("where")
    mesh = _mesh((2, 4))

    def local(h, w, y, b, cw, m):
      loss = vocab_parallel_linear_cross_entropy_local(
        h, w, y, vocab_axis="vocab", data_axis="data", bias=b, class_weight=cw, where=m, **options
      )
      return jax.lax.psum(jnp.sum(loss), "data") if reduction == "none" else loss

    rows, classes = P("data"), P("vocab")
    specs = (P("data", None), P("vocab", None), rows, classes, classes, rows)
    mapped = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P())
    args = (hidden, weight_VxD, labels, bias, class_weight, where)
    with jax.set_mesh(mesh):
      placed = [jax.device_put(a, jax.sharding.NamedSharding(mesh, s)) for a, s in zip(args, specs)]
      loss, grads = jax.jit(jax.value_and_grad(mapped, argnums=(0, 1, 3)))(*placed)

    def single(h, w, b):
      return jnp.sum(
        xent_jax.linear_cross_entropy(
          h, w, labels, bias=b, class_weight=class_weight, where=where, **options
        )
      )

    single_loss, single_grads = jax.value_and_grad(single, argnums=(0, 1, 2))(
      hidden, weight_VxD, bias
    )
    np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
    for got, want in zip(grads, single_grads):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


class TestMeshWithAnUnusedAxis:
  def test_both_losses_on_data_x_vocab_x_model(self):
    # A third mesh axis the losses do not use: everything is replicated over it, and gradients
    # must not be counted once per copy.
    rng = np.random.default_rng(10)
    hidden = rng.standard_normal((N, D)).astype(np.float32)
    weight = rng.standard_normal((V, D)).astype(np.float32)
    labels = rng.integers(0, V, N).astype(np.int32)
    mesh = jax.make_mesh((2, 2, 2), ("data", "vocab", "model"))
    logits_loss = lambda x: xent_jax.vocab_parallel_cross_entropy(
      x, labels, mesh=mesh, data_axis="data", label_smoothing=0.1
    )
    linear_loss = lambda h, w: xent_jax.vocab_parallel_linear_cross_entropy(
      h, w, labels, mesh=mesh, data_axis="data", label_smoothing=0.1
    )
    logits = hidden @ weight.T
    with jax.set_mesh(mesh):
      d_logits = jax.jit(jax.grad(logits_loss))(logits)
      d_hidden, d_weight = jax.jit(jax.grad(linear_loss, argnums=(0, 1)))(hidden, weight)
    expected = ref.cross_entropy_grad(logits, labels, label_smoothing=0.1)
    _close(d_logits, expected, 1e-5)
    _close(d_hidden, expected @ weight.astype(np.float64), 1e-4)
    _close(d_weight, expected.T @ hidden.astype(np.float64), 1e-4)


class TestProbabilityLabels:
  @pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 8)])
  @pytest.mark.parametrize(
    "options",
    [
      {},
      {"label_smoothing": 0.1, "z_loss": 1e-2, "weight": True, "where": True},
      {"label_smoothing": 0.2, "smoothing": "t5x", "logit_softcap": 4.0, "weight": True},
    ],
    ids=["plain", "uniform_zloss_weight_where", "t5x_softcap_weight"],
  )
  def test_matches_reference_and_single_device(self, mesh_shape, options):
    # Targets split over the classes like the logits; gradients for logits and targets.
    logits, _, options = _inputs(12, **options)
    rng = np.random.default_rng(13)
    probs = rng.dirichlet(np.ones(V), size=N).astype(np.float32)
    probs[1, :5] = 0.0  # classes without target mass
    probs[1] /= probs[1].sum()
    mesh = _mesh(mesh_shape)
    sharded = lambda x, q, r: xent_jax.vocab_parallel_cross_entropy(
      x, q, mesh=mesh, data_axis="data", reduction=r, **options
    )
    with jax.set_mesh(mesh):
      per_example = jax.jit(sharded, static_argnums=2)(logits, probs, "none")
      mean, (d_logits, d_probs) = jax.jit(
        jax.value_and_grad(sharded, argnums=(0, 1)), static_argnums=2
      )(logits, probs, "mean")
    _close(per_example, ref.cross_entropy(logits, probs, reduction="none", **options))
    _close(mean, ref.cross_entropy(logits, probs, **options))
    _close(d_logits, ref.cross_entropy_grad(logits, probs, **options), 1e-5)
    single = lambda x, q: xent_jax.cross_entropy(x, q, **options)
    np.testing.assert_allclose(
      d_probs, jax.grad(single, argnums=1)(logits, probs), rtol=1e-5, atol=1e-6
    )

  def test_class_axis_and_local_function(self):
    # [B, V, T] logits and targets (axis=1); the local function inside a user's shard_map.
    logits, _, _ = _inputs(14, batch=(4, 3))
    probs = np.random.default_rng(15).dirichlet(np.ones(V), size=(4, 3)).astype(np.float32)
    mesh = _mesh((2, 4))
    x_BxVxT, q_BxVxT = np.moveaxis(logits, -1, 1), np.moveaxis(probs, -1, 1)
    with jax.set_mesh(mesh):
      loss = jax.jit(
        lambda x, q: xent_jax.vocab_parallel_cross_entropy(
          x, q, mesh=mesh, data_axis="data", axis=1, label_smoothing=0.1
        )
      )(x_BxVxT, q_BxVxT)
      local = jax.shard_map(
        lambda x, q: xent_jax.vocab_parallel_cross_entropy_local(
          x, q, vocab_axis="vocab", data_axis="data", reduction="sum"
        ),
        mesh=mesh,
        in_specs=(P("data", None, "vocab"),) * 2,
        out_specs=P(),
      )
      spec = jax.sharding.NamedSharding(mesh, P("data", None, "vocab"))
      total = jax.jit(local)(*(jax.device_put(a, spec) for a in (logits, probs)))
    _close(loss, ref.cross_entropy(x_BxVxT, q_BxVxT, axis=1, label_smoothing=0.1))
    _close(total, ref.cross_entropy(logits, probs, reduction="sum"))


# Probability-label option sets of TestForwardMode ("weight"/"where" materialised by _inputs).
FORWARD_OPTIONS = {
  "plain": {},
  "uniform_zloss_weight_where": {
    "label_smoothing": 0.1,
    "z_loss": 1e-2,
    "weight": True,
    "where": True,
  },
  "t5x_softcap_weight": {
    "label_smoothing": 0.2,
    "smoothing": "t5x",
    "logit_softcap": 4.0,
    "weight": True,
  },
}


class TestForwardMode:
  """jax.jvp / jacfwd / linearize of the sharded loss (the engine's custom JVP over the shards)
  equal reverse mode and the single-device cross_entropy, for probability and integer labels."""

  @staticmethod
  def _problem(options, probabilities):
    logits, labels, options = _inputs(21, **options)
    if probabilities:
      labels = np.random.default_rng(22).dirichlet(np.ones(V), size=N).astype(np.float32)
      labels[1, :5] = 0.0  # classes without target mass
      labels[1] /= labels[1].sum()
    return logits, labels, options

  @pytest.mark.parametrize("name", list(FORWARD_OPTIONS))
  @pytest.mark.parametrize("mesh_shape", [(2, 4), (1, 8)])
  def test_probability_labels_jvp_jacfwd_linearize(self, mesh_shape, name):
    logits, probs, options = self._problem(FORWARD_OPTIONS[name], True)
    mesh = _mesh(mesh_shape)
    sharded = lambda x, q: xent_jax.vocab_parallel_cross_entropy(
      x, q, mesh=mesh, data_axis="data", **options
    )
    single = lambda x, q: xent_jax.cross_entropy(x, q, **options)
    rng = np.random.default_rng(23)
    t_logits = rng.standard_normal(logits.shape).astype(np.float32)
    t_probs = rng.standard_normal(probs.shape).astype(np.float32)

    def derivatives(x, q, tx, tq):
      value, tangent = jax.jvp(sharded, (x, q), (tx, tq))
      lin_value, linear = jax.linearize(sharded, x, q)
      jacs = jax.jacfwd(sharded)(x, q), jax.jacfwd(sharded, argnums=1)(x, q)
      grads = jax.grad(sharded, argnums=(0, 1))(x, q)
      return value, tangent, lin_value, linear(tx, tq), jacs, grads

    # One jitted program per loss: eager, every primitive in the shard_map compiles separately,
    # and each compiled program costs more here than its work.
    with jax.set_mesh(mesh):
      value, tangent, lin_value, lin_tangent, (jac_logits, jac_probs), grads = jax.jit(derivatives)(
        logits, probs, t_logits, t_probs
      )
    (want_value, want_tangent), want_probs_grad = jax.jit(
      lambda p, t: (jax.jvp(single, p, t), jax.grad(single, argnums=1)(*p))
    )((logits, probs), (t_logits, t_probs))
    _close(value, ref.cross_entropy(logits, probs, **options))
    _close(lin_value, want_value)
    np.testing.assert_allclose(tangent, want_tangent, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lin_tangent, want_tangent, rtol=1e-5, atol=1e-6)
    # Forward mode equals reverse mode, and both the single-device gradient.
    np.testing.assert_allclose(jac_logits, grads[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(jac_probs, grads[1], rtol=1e-5, atol=1e-7)
    _close(grads[0], ref.cross_entropy_grad(logits, probs, **options), 1e-5)
    np.testing.assert_allclose(grads[1], want_probs_grad, rtol=1e-5, atol=1e-6)

  def test_integer_labels_jacfwd_equals_grad(self):
    logits, labels, options = self._problem(FORWARD_OPTIONS["uniform_zloss_weight_where"], False)
    mesh = _mesh((2, 4))
    sharded = lambda x: xent_jax.vocab_parallel_cross_entropy(
      x, labels, mesh=mesh, data_axis="data", **options
    )
    with jax.set_mesh(mesh):
      jac = jax.jit(jax.jacfwd(sharded))(logits)
      grad = jax.jit(jax.grad(sharded))(logits)
    np.testing.assert_allclose(jac, grad, rtol=1e-5, atol=1e-7)
    _close(grad, ref.cross_entropy_grad(logits, labels, **options), 1e-5)

  @pytest.mark.parametrize("mesh_shape, reduction", [((2, 4), "mean"), ((1, 8), "sum")])
  def test_linear_one_pass_jvp_jacfwd_equal_one_device(self, mesh_shape, reduction):
    # 'sum'/'mean' without vocabulary chunks: the one-pass schedule, whose tangent adds the
    # shards' inner products of their gradients with the tangents.
    rng = np.random.default_rng(24)
    hidden, weight, bias, labels, options = _linear_problem(rng)
    options.update(reduction=reduction)
    tangents = tuple(
      rng.standard_normal(a.shape).astype(np.float32) for a in (hidden, weight, bias)
    )
    mesh = _mesh(mesh_shape)
    sharded = lambda h, w, b: xent_jax.vocab_parallel_linear_cross_entropy(
      h, w, labels, mesh=mesh, data_axis="data", bias=b, **options
    )
    single = lambda h, w, b: xent_jax.linear_cross_entropy(h, w, labels, bias=b, **options)
    with jax.set_mesh(mesh):
      (value, tangent), jac, grads = jax.jit(_linear_derivatives(sharded))(
        (hidden, weight, bias), tangents
      )
    _assert_linear_derivatives(single, (hidden, weight, bias), tangents, value, tangent, jac, grads)

  @pytest.mark.parametrize(
    "mesh_shape, reduction, options, vocab_major",
    [
      ((2, 4), "none", {"return_lse": True}, False),
      ((1, 8), "mean", {"vocab_chunk_size": 3}, True),
      ((2, 4), "sum", {"vocab_chunk_size": 3}, False),
    ],
  )
  def test_linear_two_pass_forward_mode_and_per_example_grads(
    self, mesh_shape, reduction, options, vocab_major, monkeypatch
  ):
    # The two-pass schedule: each shard's tangent pass gives partial tangents of the statistics,
    # summed over the vocabulary axis; reverse mode (its transpose) and per-example gradients
    # (vmap of grad) equal one device's.
    plan = fused_schedule.plan_schedule
    monkeypatch.setattr(
      fused_schedule,
      "plan_schedule",
      lambda *a, **k: plan(*a, **k)._replace(one_pass=False, vocab_major=vocab_major),
    )
    rng = np.random.default_rng(25)
    hidden, weight, bias, labels, kwargs = _linear_problem(rng)
    kwargs.update(reduction=reduction, **options)
    tangents = tuple(
      rng.standard_normal(a.shape).astype(np.float32) for a in (hidden, weight, bias)
    )
    mesh = _mesh(mesh_shape)

    def scalar(out):
      out = out[0] + 0.5 * out[1] if kwargs.get("return_lse") else out
      return jnp.sum(out)

    sharded = lambda h, w, b: scalar(
      xent_jax.vocab_parallel_linear_cross_entropy(
        h, w, labels, mesh=mesh, data_axis="data", bias=b, **kwargs
      )
    )
    single = lambda h, w, b: scalar(xent_jax.linear_cross_entropy(h, w, labels, bias=b, **kwargs))
    batch = np.stack([hidden, 0.5 * hidden])
    per_example = jax.vmap(jax.grad(sharded, argnums=(0, 1, 2)), (0, None, None))
    with jax.set_mesh(mesh):
      ((value, tangent), jac, grads), got_per_example = jax.jit(
        lambda p, t, batch: (_linear_derivatives(sharded)(p, t), per_example(batch, *p[1:]))
      )((hidden, weight, bias), tangents, batch)
    _assert_linear_derivatives(single, (hidden, weight, bias), tangents, value, tangent, jac, grads)
    single_grad = jax.jit(jax.grad(single, argnums=(0, 1, 2)))
    for k, h in enumerate(batch):
      want = single_grad(h, weight, bias)
      for got_grad, want_grad in zip(got_per_example, want):
        np.testing.assert_allclose(got_grad[k], want_grad, rtol=1e-5, atol=1e-6)

  @pytest.mark.parametrize("smoothing", ["uniform", "t5x"])
  @pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
  def test_probability_labels_keep_no_logits_sized_residual(self, label_smoothing, smoothing):
    # Reverse mode recomputes p from the logits and the per-row statistics: the compiled
    # per-device temporaries stay far below one [N, V_s] float32 block (0.01 MiB against 1 MiB;
    # the former hand-written VJP kept one or two such blocks with smoothing).
    n, v = 512, 4096
    mesh = _mesh((1, 8))
    step = jax.jit(
      jax.value_and_grad(
        lambda x, q: xent_jax.vocab_parallel_cross_entropy(
          x, q, mesh=mesh, label_smoothing=label_smoothing, smoothing=smoothing
        ),
        argnums=(0, 1),
      )
    )
    sharding = jax.sharding.NamedSharding(mesh, P(None, "vocab"))
    arg = jax.ShapeDtypeStruct((n, v), jnp.float32, sharding=sharding)
    with jax.set_mesh(mesh):
      temp = step.lower(arg, arg).compile().memory_analysis().temp_size_in_bytes
    block = n * v // 8 * 4
    assert temp <= block / 4, (
      f"{temp / 2**20:.2f} MiB temp, one [N, V_s] f32 is {block / 2**20} MiB"
    )


class TestMeshUse:
  def test_tuple_data_axis(self):
    # Rows split over two mesh axes (data x fsdp), classes over the third.
    rng = np.random.default_rng(16)
    hidden = rng.standard_normal((N, D)).astype(np.float32)
    weight = rng.standard_normal((V, D)).astype(np.float32)
    labels = rng.integers(0, V, N).astype(np.int32)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "vocab"))
    rows = ("data", "fsdp")
    logits = hidden @ weight.T
    with jax.set_mesh(mesh):
      d_logits = jax.jit(
        jax.grad(
          lambda x: xent_jax.vocab_parallel_cross_entropy(
            x, labels, mesh=mesh, data_axis=rows, z_loss=1e-2
          )
        )
      )(logits)
      per_row = jax.jit(
        lambda x: xent_jax.vocab_parallel_cross_entropy(
          x, labels, mesh=mesh, data_axis=rows, reduction="none"
        )
      )(logits)
      loss, (d_hidden, d_weight) = jax.jit(
        jax.value_and_grad(
          lambda h, w: xent_jax.vocab_parallel_linear_cross_entropy(
            h, w, labels, mesh=mesh, data_axis=rows, z_loss=1e-2
          ),
          argnums=(0, 1),
        )
      )(hidden, weight)
    assert per_row.sharding.spec[0] == rows
    expected = ref.cross_entropy_grad(logits, labels, z_loss=1e-2)
    _close(d_logits, expected, 1e-5)
    _close(per_row, ref.cross_entropy(logits, labels, reduction="none"))
    _close(loss, ref.cross_entropy(logits, labels, z_loss=1e-2), 1e-5)
    _close(d_hidden, expected @ weight.astype(np.float64), 1e-4)
    _close(d_weight, expected.T @ hidden.astype(np.float64), 1e-4)

  def test_eager_value_and_grad_outside_a_mesh_context(self):
    # jax.make_mesh builds Explicit axes; no jit, no jax.set_mesh.
    rng = np.random.default_rng(17)
    hidden = rng.standard_normal((N, D)).astype(np.float32)
    weight = rng.standard_normal((V, D)).astype(np.float32)
    labels = rng.integers(0, V, N).astype(np.int32)
    mesh = _mesh((2, 4))
    logits = hidden @ weight.T
    loss, d_logits = jax.value_and_grad(
      lambda x: xent_jax.vocab_parallel_cross_entropy(x, labels, mesh=mesh, data_axis="data")
    )(logits)
    linear_loss, (d_hidden, d_weight) = jax.value_and_grad(
      lambda h, w: xent_jax.vocab_parallel_linear_cross_entropy(
        h, w, labels, mesh=mesh, data_axis="data"
      ),
      argnums=(0, 1),
    )(hidden, weight)
    expected = ref.cross_entropy_grad(logits, labels)
    _close(loss, ref.cross_entropy(logits, labels))
    _close(d_logits, expected, 1e-5)
    _close(linear_loss, ref.cross_entropy(logits, labels), 1e-5)
    _close(d_hidden, expected @ weight.astype(np.float64), 1e-4)
    _close(d_weight, expected.T @ hidden.astype(np.float64), 1e-4)

  @pytest.mark.parametrize("reduction", ["mean", "none"])  # one pass, two passes
  def test_linear_path_checks_varying_axes(self, reduction):
    # The sharded linear loss runs under shard_map(check_vma=True).
    hidden, weight = np.ones((N, D), np.float32), np.ones((V, D), np.float32)
    labels = np.zeros(N, np.int32)
    mesh = _mesh((2, 4))
    jaxpr = jax.make_jaxpr(
      jax.grad(
        lambda h, w: jnp.sum(
          xent_jax.vocab_parallel_linear_cross_entropy(
            h, w, labels, mesh=mesh, data_axis="data", reduction=reduction
          )
        ),
        argnums=(0, 1),
      )
    )(hidden, weight)
    flags = [
      e.params["check_vma"] for e in _equations(jaxpr.jaxpr) if e.primitive.name == "shard_map"
    ]
    assert flags and all(flags), flags


def _equations(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs nested in its equations' parameters."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax_core.jaxprs_in_params(eqn.params):
      yield from _equations(sub)


class TestBadInput:
  @pytest.fixture
  def mesh(self):
    return _mesh((2, 4))

  @pytest.mark.parametrize(
    "kwargs, error, names",
    [
      ({"vocab_axis": "model"}, ValueError, ["`vocab_axis`", "'model'"]),
      ({"data_axis": "batch"}, ValueError, ["`data_axis`", "'batch'"]),
      ({"data_axis": "vocab"}, ValueError, ["`data_axis`", "`vocab_axis`"]),
      ({"label_smoothing": 1.5}, ValueError, ["`label_smoothing`"]),
      ({"reduction": "avg"}, ValueError, ["`reduction`"]),
      ({"class_weight": np.ones(V - 1, np.float32)}, AssertionError, ["`class_weight`"]),
    ],
  )
  def test_options_are_named(self, mesh, kwargs, error, names):
    logits, labels, _ = _inputs(0)
    with pytest.raises(error) as info:
      xent_jax.vocab_parallel_cross_entropy(logits, labels, mesh=mesh, **kwargs)
    for name in names:
      assert name in str(info.value)

  def test_class_count_not_divisible(self, mesh):
    logits = np.zeros((N, 30), np.float32)
    with pytest.raises(ValueError, match=r"`logits` \(30\).*`vocab_axis`='vocab' \(4\)"):
      xent_jax.vocab_parallel_cross_entropy(logits, np.zeros(N, np.int32), mesh=mesh)
    with pytest.raises(ValueError, match=r"`weight` \(30\).*`vocab_axis`='vocab' \(4\)"):
      xent_jax.vocab_parallel_linear_cross_entropy(
        np.zeros((N, D), np.float32),
        np.zeros((30, D), np.float32),
        np.zeros(N, np.int32),
        mesh=mesh,
      )

  def test_batch_not_divisible(self, mesh):
    with pytest.raises(ValueError, match=r"`logits`.*\(3,\).*`data_axis`='data' \(2\)"):
      xent_jax.vocab_parallel_cross_entropy(
        np.zeros((3, V), np.float32), np.zeros(3, np.int32), mesh=mesh, data_axis="data"
      )

  def test_mesh_and_labels_types(self, mesh):
    logits, labels, _ = _inputs(0)
    with pytest.raises(TypeError, match="`mesh`"):
      xent_jax.vocab_parallel_cross_entropy(logits, labels, mesh=jax.devices())
    with pytest.raises(TypeError, match="`labels`"):
      xent_jax.vocab_parallel_cross_entropy(logits, labels.astype(bool), mesh=mesh)
    # Float labels are probabilities: they need the logits' shape.
    with pytest.raises(AssertionError, match="`labels`"):
      xent_jax.vocab_parallel_cross_entropy(logits, labels.astype(np.float32), mesh=mesh)
    with pytest.raises(TypeError, match="`labels`"):
      xent_jax.vocab_parallel_linear_cross_entropy(
        np.zeros((N, D), np.float32),
        np.zeros((V, D), np.float32),
        labels.astype(np.float32),
        mesh=mesh,
      )

  def test_linear_shapes_are_named(self, mesh):
    hidden, labels = np.zeros((N, D), np.float32), np.zeros(N, np.int32)
    with pytest.raises(ValueError, match=r"`hidden`.*`weight`"):
      xent_jax.vocab_parallel_linear_cross_entropy(
        hidden, np.zeros((V, D + 1), np.float32), labels, mesh=mesh
      )
    with pytest.raises(AssertionError, match="`class_weight`"):
      xent_jax.vocab_parallel_linear_cross_entropy(
        hidden,
        np.zeros((V, D), np.float32),
        labels,
        mesh=mesh,
        class_weight=np.ones(V + 1, np.float32),
      )
    with pytest.raises(ValueError, match="`weight_layout`"):
      xent_jax.vocab_parallel_linear_cross_entropy(
        hidden, np.zeros((V, D), np.float32), labels, mesh=mesh, weight_layout="vx"
      )


def _megatron_smoothed_loss(logits, labels, eps, shards):
  r"""Float64 per-row loss of Megatron-LM's ``_VocabParallelCrossEntropy`` with smoothing, as seen
  on the first of ``shards`` vocabulary partitions (for demonstration, not a reference of ours).

  Megatron sets :math:`s = \epsilon V_p/(V_p - 1)` with :math:`V_p` the *partition's* vocabulary
  size and returns :math:`(1 - s)(\mathrm{lse} - x_y) - s\,\mathrm{mean}_{c \in p} \log p_c`,
  the mean taken over the partition's classes only.
  """
  x = np.asarray(logits, np.float64)
  lse = ref.logsumexp(x)
  nll = lse - np.take_along_axis(x, labels[:, None], axis=1)[:, 0]
  part = x[:, : x.shape[1] // shards]
  s = eps * part.shape[1] / (part.shape[1] - 1)
  return (1.0 - s) * nll - s * np.mean(part - lse[:, None], axis=1)
