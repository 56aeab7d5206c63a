"""Tests of ``xent_jax.linear_cross_entropy``: the fused loss equals the unfused one.

Values and gradients (``hidden``, ``weight``, ``bias``) are compared with the float64 NumPy
reference of ``_reference.py`` applied to the logits ``hidden @ weight.T + bias`` (gradients by the
chain rule through the reference's analytic logits gradient), for every option, both schedules
(one pass, two passes), chunk sizes that divide the token count and vocabulary and ones that don't,
both weight layouts, bfloat16 inputs, leading batch dimensions, jit and vmap.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import xent_jax
from tests import _reference as ref
from tests._compiled import cpu_temp_bytes
from xent_jax.fused import kernels as fused_kernels
from xent_jax.fused import ops as fused_ops
from xent_jax.fused import schedule as fused_schedule

N, D, V = 61, 6, 53  # prime token count and vocabulary: no chunk size below them divides them
IGNORE = -100

OPTION_SETS = {
  "plain": {},
  "weight_ignore_where": {"class_weight": True, "ignore": True, "where": True},
  "smooth_uniform": {"label_smoothing": 0.1},
  "smooth_t5x_weighted": {"label_smoothing": 0.2, "smoothing": "t5x", "class_weight": True},
  "zloss_softcap": {"z_loss": 0.05, "logit_softcap": 2.5},
  "everything": {
    "class_weight": True,
    "ignore": True,
    "where": True,
    "label_smoothing": 0.15,
    "z_loss": 0.01,
    "logit_softcap": 3.0,
  },
}

# (token_chunk_size, vocab_chunk_size): one pass unless vocab_chunk_size is given.
CHUNKS = {
  "one_pass_uneven": (8, None),
  "one_pass_single_chunk": (None, None),
  "two_pass_uneven": (10, 7),
  "two_pass_one_class": (61, 1),
}


def _problem(seed=0, n=N, d=D, v=V, options=None):
  """Random inputs plus the keyword options for both the fused call and the reference."""
  options = dict(options or {})
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(n, d))
  weight = rng.normal(size=(v, d)) * 0.7
  bias = rng.normal(size=(v,)) * 0.3
  labels = rng.integers(0, v, size=(n,))
  kwargs = {}
  if options.pop("class_weight", False):
    kwargs["class_weight"] = rng.uniform(0.2, 2.0, size=(v,))
  if options.pop("ignore", False):
    labels[::5] = IGNORE
  if options.pop("where", False):
    kwargs["where"] = rng.uniform(size=(n,)) > 0.25
  kwargs.update(options)
  return hidden, weight, bias, labels, kwargs


def _reference(hidden, weight, bias, labels, reduction, kwargs):
  """float64 loss and gradients of the unfused loss (``"none"``: gradients of the summed loss)."""
  options = dict(kwargs)
  if "class_weight" in options:
    options["weight"] = options.pop("class_weight")
  logits = hidden @ weight.T + (0.0 if bias is None else bias)
  loss = ref.cross_entropy(logits, labels, reduction=reduction, ignore_index=IGNORE, **options)
  g = ref.cross_entropy_grad(logits, labels, reduction=reduction, ignore_index=IGNORE, **options)
  return loss, g @ weight, g.T @ hidden, g.sum(axis=0)


def _fused(hidden, weight, bias, labels, reduction, kwargs, **chunks):
  """Loss and gradients of the fused function (``"none"``: of the summed loss), float32."""
  kwargs = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}

  def loss_fn(h, w, b):
    return xent_jax.linear_cross_entropy(
      h, w, jnp.asarray(labels), bias=b, reduction=reduction, **kwargs, **chunks
    )

  def summed(*args):
    value = loss_fn(*args)
    return jnp.sum(value), value

  (_, value), grads = jax.jit(jax.value_and_grad(summed, argnums=(0, 1, 2), has_aux=True))(
    jnp.float32(hidden), jnp.float32(weight), jnp.float32(bias)
  )
  return value, *grads


def _assert_close(actual, expected, rtol=2e-5, atol=2e-6):
  for a, e in zip(actual, expected):
    np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol)


class TestMatchesUnfused:
  @pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
  @pytest.mark.parametrize("option_set", list(OPTION_SETS))
  def test_options(self, option_set, reduction):
    hidden, weight, bias, labels, kwargs = _problem(1, options=OPTION_SETS[option_set])
    expected = _reference(hidden, weight, bias, labels, reduction, kwargs)
    for token_chunk, vocab_chunk in [(8, None), (10, 7)]:
      actual = _fused(
        hidden,
        weight,
        bias,
        labels,
        reduction,
        kwargs,
        token_chunk_size=token_chunk,
        vocab_chunk_size=vocab_chunk,
      )
      _assert_close(actual, expected)

  @pytest.mark.parametrize("reduction", ["none", "mean"])
  @pytest.mark.parametrize("chunks", list(CHUNKS))
  def test_chunk_sizes(self, chunks, reduction):
    token_chunk, vocab_chunk = CHUNKS[chunks]
    hidden, weight, bias, labels, kwargs = _problem(2, options=OPTION_SETS["everything"])
    expected = _reference(hidden, weight, bias, labels, reduction, kwargs)
    actual = _fused(
      hidden,
      weight,
      bias,
      labels,
      reduction,
      kwargs,
      token_chunk_size=token_chunk,
      vocab_chunk_size=vocab_chunk,
    )
    _assert_close(actual, expected)

  @pytest.mark.parametrize("vocab_chunk", [None, 12])
  def test_chunks_that_divide(self, vocab_chunk):
    hidden, weight, bias, labels, kwargs = _problem(
      3, n=36, v=48, options=OPTION_SETS["everything"]
    )
    expected = _reference(hidden, weight, bias, labels, "mean", kwargs)
    actual = _fused(
      hidden,
      weight,
      bias,
      labels,
      "mean",
      kwargs,
      token_chunk_size=12,
      vocab_chunk_size=vocab_chunk,
    )
    _assert_close(actual, expected)

  @pytest.mark.parametrize("layout", ["vd", "dv"])
  def test_weight_gradient_in_uneven_class_slices(self, layout, monkeypatch):
    """The one-pass weight gradient accumulates in slices of classes: 7 per slice here."""
    monkeypatch.setattr(fused_kernels, "WEIGHT_GRAD_ELEMENTS", 7 * D)
    hidden, weight, bias, labels, kwargs = _problem(9, options=OPTION_SETS["everything"])
    expected = _reference(hidden, weight, bias, labels, "mean", kwargs)
    kwargs = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
    w = weight if layout == "vd" else weight.T
    value, (dh, dw, db) = jax.value_and_grad(
      lambda h, w, b: xent_jax.linear_cross_entropy(
        h, w, jnp.asarray(labels), bias=b, weight_layout=layout, token_chunk_size=8, **kwargs
      ),
      argnums=(0, 1, 2),
    )(jnp.float32(hidden), jnp.float32(w), jnp.float32(bias))
    _assert_close((value, dh, dw if layout == "vd" else dw.T, db), expected)

  @pytest.mark.parametrize("vocab_chunk", [None, 9])
  def test_weight_layout_dv(self, vocab_chunk):
    hidden, weight, bias, labels, kwargs = _problem(4, options=OPTION_SETS["everything"])
    expected = _reference(hidden, weight, bias, labels, "sum", kwargs)
    kwargs = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}

    def loss_fn(h, w_dv, b):
      return xent_jax.linear_cross_entropy(
        h,
        w_dv,
        jnp.asarray(labels),
        bias=b,
        weight_layout="dv",
        reduction="sum",
        token_chunk_size=8,
        vocab_chunk_size=vocab_chunk,
        **kwargs,
      )

    args = (jnp.float32(hidden), jnp.float32(weight.T), jnp.float32(bias))
    value, (dh, dw_dv, db) = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(*args)
    assert dw_dv.shape == (D, V)
    _assert_close((value, dh, dw_dv.T, db), expected)

  def test_without_bias(self):
    hidden, weight, _, labels, kwargs = _problem(5, options={"label_smoothing": 0.1})
    loss, dh, dw, _ = _reference(hidden, weight, None, labels, "mean", kwargs)
    value, (g_h, g_w) = jax.value_and_grad(
      lambda h, w: xent_jax.linear_cross_entropy(
        h, w, jnp.asarray(labels), label_smoothing=0.1, token_chunk_size=8
      ),
      argnums=(0, 1),
    )(jnp.float32(hidden), jnp.float32(weight))
    _assert_close((value, g_h, g_w), (loss, dh, dw))

  def test_equals_unfused_xent_jax(self):
    """Consistency with the library's own unfused function, the documented equality."""
    hidden, weight, bias, labels, _ = _problem(6)
    args = (jnp.float32(hidden), jnp.float32(weight), jnp.float32(bias))
    options = dict(label_smoothing=0.1, smoothing="t5x", z_loss=1e-3, logit_softcap=4.0)
    fused = jax.value_and_grad(
      lambda h, w, b: xent_jax.linear_cross_entropy(
        h, w, jnp.asarray(labels), bias=b, token_chunk_size=16, **options
      ),
      argnums=(0, 1, 2),
    )(*args)
    unfused = jax.value_and_grad(
      lambda h, w, b: xent_jax.cross_entropy(h @ w.T + b[None, :], jnp.asarray(labels), **options),
      argnums=(0, 1, 2),
    )(*args)
    for a, e in zip(jax.tree.leaves(fused), jax.tree.leaves(unfused)):
      np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-6)


class TestFeatures:
  @pytest.mark.parametrize("vocab_chunk", [None, 11])
  def test_return_lse_and_its_gradient(self, vocab_chunk):
    hidden, weight, bias, labels, _ = _problem(7)
    logits = hidden @ weight.T + bias
    _, expected_lse = ref.cross_entropy(logits, labels, return_lse=True, z_loss=0.1)
    args = (jnp.float32(hidden), jnp.float32(weight), jnp.float32(bias))

    def fused(h, w, b):
      return xent_jax.linear_cross_entropy(
        h,
        w,
        jnp.asarray(labels),
        bias=b,
        z_loss=0.1,
        return_lse=True,
        token_chunk_size=8,
        vocab_chunk_size=vocab_chunk,
      )

    _, lse = fused(*args)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-5)
    # d(loss + sum(lse)): the lse cotangent flows through the fused backward pass. The softmax
    # is the gradient of lse, so the reference is the loss gradient plus softmax terms.
    p = np.exp(logits - expected_lse[:, None])
    _, dh, dw, db = _reference(hidden, weight, bias, labels, "mean", {"z_loss": 0.1})
    got = jax.grad(lambda *a: fused(*a)[0] + jnp.sum(fused(*a)[1]), argnums=(0, 1, 2))(*args)
    _assert_close(got, (dh + p @ weight, dw + p.T @ hidden, db + p.sum(0)))

  def test_leading_batch_dims(self):
    hidden, weight, bias, labels, _ = _problem(8, n=30)
    where = np.random.default_rng(0).uniform(size=(3, 1, 5)) > 0.3  # broadcast over the middle
    expected = ref.cross_entropy(
      hidden @ weight.T + bias,
      labels,
      where=np.broadcast_to(where, (3, 2, 5)).reshape(30),
      reduction="none",
    ).reshape(3, 2, 5)
    got = xent_jax.linear_cross_entropy(
      jnp.float32(hidden.reshape(3, 2, 5, D)),
      jnp.float32(weight),
      jnp.asarray(labels.reshape(3, 2, 5)),
      bias=jnp.float32(bias),
      where=jnp.asarray(where),
      reduction="none",
      token_chunk_size=7,
    )
    assert got.shape == (3, 2, 5)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)

  def test_jit_and_vmap(self):
    batch = [_problem(10 + i, n=12) for i in range(3)]
    hidden = jnp.float32(np.stack([b[0] for b in batch]))
    labels = jnp.asarray(np.stack([b[3] for b in batch]))
    weight, bias = jnp.float32(batch[0][1]), jnp.float32(batch[0][2])

    def loss_fn(h, w, b, y):
      return xent_jax.linear_cross_entropy(h, w, y, bias=b, label_smoothing=0.1, token_chunk_size=5)

    per_problem = jax.jit(
      jax.vmap(jax.value_and_grad(loss_fn, argnums=(0, 1, 2)), in_axes=(0, None, None, 0))
    )
    values, (dh, dw, db) = per_problem(hidden, weight, bias, labels)
    for i in range(3):
      loss, e_dh, e_dw, e_db = _reference(
        np.asarray(hidden[i], np.float64),
        batch[0][1],
        batch[0][2],
        np.asarray(labels[i]),
        "mean",
        {"label_smoothing": 0.1},
      )
      _assert_close((values[i], dh[i], dw[i], db[i]), (loss, e_dh, e_dw, e_db))

  @pytest.mark.parametrize("vocab_chunk", [None, 5])
  def test_check_grads(self, vocab_chunk):
    hidden, weight, bias, labels, kwargs = _problem(
      11, n=9, v=13, options=OPTION_SETS["everything"]
    )
    with jax.enable_x64(True):
      kwargs = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
      fn = lambda h, w, b: xent_jax.linear_cross_entropy(
        h,
        w,
        jnp.asarray(labels),
        bias=b,
        token_chunk_size=4,
        vocab_chunk_size=vocab_chunk,
        **kwargs,
      )
      check_grads(
        jax.jit(fn),
        (jnp.asarray(hidden), jnp.asarray(weight), jnp.asarray(bias)),
        order=1,
        modes=("rev",),
      )

  @pytest.mark.parametrize(
    "n, d, v, token_chunk, vocab_chunk, upcast_platforms",
    [
      (256, 16, 300, 64, None, ("cpu",)),  # one pass, float32 copies (CPU's default)
      (256, 16, 300, 64, None, ()),  # one pass, bfloat16 blocks (GPU's and TPU's)
      (64, 32, 300, 16, 64, ("cpu",)),  # two passes, vocabulary-major (V > N + C)
      (300, 64, 256, 64, 100, ("cpu",)),  # two passes, token-major
    ],
  )
  def test_bfloat16_accumulates_in_float32(
    self, n, d, v, token_chunk, vocab_chunk, upcast_platforms, monkeypatch
  ):
    """Both branches of the one-pass schedule's platform choice (``fused_ops.UPCAST_PLATFORMS``)
    run here, on CPU."""
    monkeypatch.setattr(fused_ops, "UPCAST_PLATFORMS", upcast_platforms)
    plan = fused_schedule.plan_schedule(
      "f",
      n,
      d,
      v,
      linear_reduction=True,
      token_chunk_size=token_chunk,
      vocab_chunk_size=vocab_chunk,
      hidden_dtype=jnp.bfloat16,
      weight_dtype=jnp.bfloat16,
    )
    two_pass = vocab_chunk is not None
    assert (plan.one_pass, plan.vocab_major) == (not two_pass, two_pass and v > n + vocab_chunk)
    hidden, weight, bias, labels, _ = _problem(12, n=n, d=d, v=v)
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    rounded = [np.asarray(bf(x), np.float64) for x in (hidden, weight, bias)]
    expected = _reference(*rounded, labels, "mean", {"label_smoothing": 0.1})
    value, grads = jax.jit(
      jax.value_and_grad(
        lambda h, w, b: xent_jax.linear_cross_entropy(
          h,
          w,
          jnp.asarray(labels),
          bias=b,
          label_smoothing=0.1,
          token_chunk_size=token_chunk,
          vocab_chunk_size=vocab_chunk,
        ),
        argnums=(0, 1, 2),
      )
    )(bf(hidden), bf(weight), bf(bias))
    assert value.dtype == jnp.float32
    assert all(g.dtype == jnp.bfloat16 for g in grads)
    # The loss sees exact float32 logits of the rounded inputs; gradients are bfloat16 outputs of
    # bfloat16 matmuls (float32 accumulation): the documented tolerance is 1e-2 of the largest
    # entry (measured: below 4.2e-3). With float32 copies the gradient is rounded to bfloat16
    # once, at the end: within 2**-8 of the largest entry (measured: below 2.9e-3).
    tol = 2.0**-8 if upcast_platforms and vocab_chunk is None else 1e-2
    np.testing.assert_allclose(value, expected[0], rtol=1e-5)
    for g, e in zip(grads, expected[1:]):
      np.testing.assert_allclose(np.asarray(g, np.float64), e, rtol=0, atol=tol * np.abs(e).max())

  def test_one_pass_bfloat16_products_follow_the_target_platform(self):
    """Lowered for CPU, the one-pass schedule's three products (logits, ``d_hidden``,
    ``d_weight``) take float32 operands, cast once up front; lowered for a TPU or a GPU from this
    same CPU host, as an ahead-of-time compile is, they take the bfloat16 inputs as they come."""
    hidden, weight, _, labels, _ = _problem(14, n=256, d=16, v=300)
    labels = jnp.asarray(labels)
    loss = lambda h, w: xent_jax.linear_cross_entropy(h, w, labels, token_chunk_size=64)
    traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(
      jnp.asarray(hidden, jnp.bfloat16), jnp.asarray(weight, jnp.bfloat16)
    )
    operands = re.compile(r"dot_general[^\n]*: \(tensor<[0-9x]*x(\w+)>, tensor<[0-9x]*x(\w+)>\)")
    for platform, dtype in [("cpu", "f32"), ("tpu", "bf16"), ("cuda", "bf16")]:
      text = traced.lower(lowering_platforms=(platform,)).as_text()
      assert operands.findall(text) == [(dtype, dtype)] * 3, platform

  def test_out_of_range_label_gives_nan(self):
    hidden, weight, _, labels, _ = _problem(13)
    labels[3] = V + 2
    for vocab_chunk in (None, 10):
      loss = xent_jax.linear_cross_entropy(
        jnp.float32(hidden),
        jnp.float32(weight),
        jnp.asarray(labels),
        token_chunk_size=8,
        vocab_chunk_size=vocab_chunk,
        reduction="none",
      )
      assert np.isnan(loss[3]) and np.isfinite(np.delete(np.asarray(loss), 3)).all()
      mean = xent_jax.linear_cross_entropy(
        jnp.float32(hidden),
        jnp.float32(weight),
        jnp.asarray(labels),
        token_chunk_size=8,
        vocab_chunk_size=vocab_chunk,
      )
      assert np.isnan(mean)

  @pytest.mark.parametrize("reduction", ["none", "mean"])
  def test_no_rows(self, reduction):
    loss = xent_jax.linear_cross_entropy(
      jnp.ones((0, D)),
      jnp.ones((V, D)),
      jnp.zeros((0,), jnp.int32),
      bias=jnp.ones((V,)),
      reduction=reduction,
    )
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert reduction == "none" or float(loss) == 0.0

  def test_all_ignored_mean_is_zero_with_zero_gradient(self):
    hidden, weight, _, _, _ = _problem(14)
    labels = jnp.full((N,), IGNORE)
    value, grads = jax.value_and_grad(
      lambda h, w: xent_jax.linear_cross_entropy(h, w, labels, token_chunk_size=8),
      argnums=(0, 1),
    )(jnp.float32(hidden), jnp.float32(weight))
    assert float(value) == 0.0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


class TestSchedules:
  """The schedule and loop order chosen from the shapes (``fused_schedule.plan_schedule``)."""

  @pytest.mark.parametrize(
    "n, d, v, reduction, vocab_chunk, dtype, expected",
    [
      (4096, 512, 32768, "mean", None, "float32", (True, False)),  # CPU benchmark: one pass
      (32768, 2048, 32000, "mean", None, "bfloat16", (True, False)),
      (8192, 4096, 128256, "mean", None, "bfloat16", (False, True)),  # Llama-3-8B: vocab-major
      (8192, 2304, 256000, "sum", None, "bfloat16", (False, True)),  # Gemma-style head
      # float32: the token-major [V, D] accumulator is the weight gradient itself.
      (8192, 4096, 128256, "mean", None, "float32", (False, False)),
      (4096, 512, 32768, "none", None, "bfloat16", (False, True)),  # per-row losses
      (4096, 512, 32768, "none", 4096, "float32", (False, False)),
      (65536, 512, 32768, "mean", 4096, "bfloat16", (False, False)),  # V < N: token-major
      (256, 1024, 16384, "mean", None, "float32", (True, False)),  # [V, D] within one block
      (256, 1024, 32768, "mean", None, "float32", (False, False)),
    ],
  )
  def test_plan(self, n, d, v, reduction, vocab_chunk, dtype, expected):
    plan = fused_schedule.plan_schedule(
      "f",
      n,
      d,
      v,
      linear_reduction=reduction != "none",
      token_chunk_size=None,
      vocab_chunk_size=vocab_chunk,
      hidden_dtype=dtype,
      weight_dtype=dtype,
      platform="cpu",
    )
    assert (plan.one_pass, plan.vocab_major) == expected
    if plan.vocab_major:  # the float32 [C, D] block of d_weight stays small
      assert plan.vocab_chunk <= 4096 and plan.token_chunk <= 1024

  @pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
  @pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
  def test_default_blocks_by_platform(self, platform, dtype):
    """At Llama-3-8B's head (two passes) a GPU gets [8192, 4008] blocks in both loop orders (4008:
    the largest divisor of V up to 4096); the CPU (and TPU, unmeasured) [T, V] rows in float32
    and [1024, 4008] vocabulary-major blocks in bfloat16. Explicit sizes are kept."""
    n, d, v = 8192, 4096, 128256
    common = dict(linear_reduction=True, hidden_dtype=dtype, weight_dtype=dtype, platform=platform)
    plan = fused_schedule.plan_schedule(
      "f", n, d, v, token_chunk_size=None, vocab_chunk_size=None, **common
    )
    assert not plan.one_pass and plan.vocab_major == (dtype == "bfloat16")
    expected = {"gpu": (8192, 4008)}.get(platform, (1024, 4008) if plan.vocab_major else (128, v))
    assert (plan.token_chunk, plan.vocab_chunk) == expected
    explicit = fused_schedule.plan_schedule(
      "f", n, d, v, token_chunk_size=300, vocab_chunk_size=5000, **common
    )
    assert (explicit.token_chunk, explicit.vocab_chunk) == (300, 5000)
    # One pass keeps [512, V] blocks everywhere: larger ones cost a GPU the memory saved.
    one_pass = fused_schedule.plan_schedule(
      "f", 4096, 512, 32768, token_chunk_size=None, vocab_chunk_size=None, **common
    )
    assert one_pass.one_pass and (one_pass.token_chunk, one_pass.vocab_chunk) == (512, 32768)

  @pytest.mark.parametrize("layout", ["vd", "dv"])
  @pytest.mark.parametrize(
    "n, reduction, vocab_chunk, order",
    [
      (61, "mean", None, "one_pass"),
      (61, "none", 7, "token"),
      (37, "mean", 7, "vocab"),
      (37, "none", 7, "vocab"),
      (37, "sum", 7, "token"),
    ],
  )
  def test_every_schedule_matches_the_reference(
    self, layout, n, reduction, vocab_chunk, order, monkeypatch
  ):
    # Uneven chunks on both axes (10 rows, 7 classes) except for the one-pass schedule, which
    # takes whole-vocabulary blocks. float32 heads this small would take the token-major order:
    # the plan is forced to test both.
    plan, plans = fused_schedule.plan_schedule, []

    def forced(*args, **kwargs):
      plans.append(plan(*args, **kwargs)._replace(vocab_major=order == "vocab"))
      return plans[-1]

    monkeypatch.setattr(fused_schedule, "plan_schedule", forced)
    hidden, weight, bias, labels, kwargs = _problem(21, n=n, options=OPTION_SETS["everything"])
    expected = _reference(hidden, weight, bias, labels, reduction, kwargs)
    kwargs = {k: jnp.asarray(x) if isinstance(x, np.ndarray) else x for k, x in kwargs.items()}

    def summed(h, w, b):
      loss = xent_jax.linear_cross_entropy(
        h,
        w,
        jnp.asarray(labels),
        bias=b,
        weight_layout=layout,
        reduction=reduction,
        token_chunk_size=10,
        vocab_chunk_size=vocab_chunk,
        **kwargs,
      )
      return jnp.sum(loss), loss

    w = weight if layout == "vd" else weight.T
    (_, value), grads = jax.jit(jax.value_and_grad(summed, argnums=(0, 1, 2), has_aux=True))(
      jnp.float32(hidden), jnp.float32(w), jnp.float32(bias)
    )
    assert [p.one_pass for p in plans] == [order == "one_pass"]
    d_weight = grads[1] if layout == "vd" else grads[1].T
    _assert_close((value, grads[0], d_weight, grads[2]), expected)

  def test_two_passes_keep_no_float32_vocab_by_features_temporary(self):
    # N=256, D=1024, V=32768: one pass would keep a float32 [V, D] accumulator (128 MiB) next to
    # [N, V] logits of only 32 MiB; two passes accumulate into the float32 gradient itself.
    n, d, v = 256, 1024, 32768
    args = (
      jax.ShapeDtypeStruct((n, d), jnp.float32),
      jax.ShapeDtypeStruct((v, d), jnp.float32),
      jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    grad = jax.value_and_grad(
      lambda h, w, y: xent_jax.linear_cross_entropy(h, w, y), argnums=(0, 1)
    )
    temp = cpu_temp_bytes(grad, *args)
    assert temp < v * d * 4 / 2, temp / 2**20


class TestSliceKernels:
  """The kernels a vocabulary-sharded caller combines: two slices equal the whole vocabulary."""

  @pytest.mark.parametrize("vocab_major", [False, True])
  def test_two_slices_combine_to_the_whole(self, vocab_major):
    hidden, weight, bias, labels, _ = _problem(15)
    class_weight = np.random.default_rng(1).uniform(0.5, 1.5, size=V)
    h, y = jnp.float32(hidden), jnp.asarray(labels)
    split = 20
    parts = []
    for lo, hi in [(0, split), (split, V)]:
      cfg = fused_schedule.BlockConfig(
        "vd", 3.0, token_chunk=8, vocab_chunk=6, class_offset=lo, weighted_sum=True
      )
      parts.append(
        fused_kernels.vocab_slice_stats(
          h,
          jnp.float32(weight[lo:hi]),
          jnp.float32(bias[lo:hi]),
          y,
          jnp.float32(class_weight[lo:hi]),
          cfg,
        )
      )
    m = jnp.maximum(parts[0].max, parts[1].max)
    lse = m + jnp.log(sum(p.sumexp * jnp.exp(p.max - m) for p in parts))
    x = ref.softcap(hidden @ weight.T + bias, 3.0)
    np.testing.assert_allclose(lse, ref.logsumexp(x), rtol=1e-5)
    np.testing.assert_allclose(sum(p.target for p in parts), x[np.arange(N), labels], rtol=1e-5)
    np.testing.assert_allclose(sum(p.weighted_sum for p in parts), x @ class_weight, rtol=1e-5)

    # Tangents given lse: the slices' partial tangents sum to the whole vocabulary's, and their
    # transposes (reverse mode's backward pass) hold disjoint parts of d_weight/d_bias and sum to
    # d_hidden.
    rng = np.random.default_rng(2)
    t_hidden, t_weight = rng.normal(size=hidden.shape), rng.normal(size=weight.shape)
    t_bias = rng.normal(size=V)
    cap_grad = 1 - (x / 3.0) ** 2
    p = np.exp(x - lse[:, None])
    dx = (t_hidden @ weight.T + hidden @ t_weight.T + t_bias) * cap_grad
    cot = tuple(jnp.float32(rng.normal(size=N)) for _ in range(3))
    g = (
      cot[0][:, None] * p
      + cot[1][:, None] * (np.arange(V)[None, :] == labels[:, None])
      + cot[2][:, None] * class_weight[None, :]
    ) * cap_grad
    tangents, d_hidden = 0, 0
    for lo, hi in [(0, split), (split, V)]:
      cfg = fused_schedule.BlockConfig(
        "vd",
        3.0,
        token_chunk=8,
        vocab_chunk=6,
        class_offset=lo,
        weighted_sum=True,
        vocab_major=vocab_major,
      )
      slice_primals = (jnp.float32(weight[lo:hi]), jnp.float32(bias[lo:hi]))

      def slice_tangents(th, tw, tb, cfg=cfg, slice_primals=slice_primals, lo=lo, hi=hi):
        w, b = slice_primals
        cw = jnp.float32(class_weight[lo:hi])
        return fused_kernels.vocab_slice_tangents(h, w, b, y, cw, lse, (th, tw, tb), cfg)

      tangents = tangents + np.stack(
        slice_tangents(
          jnp.float32(t_hidden), jnp.float32(t_weight[lo:hi]), jnp.float32(t_bias[lo:hi])
        )
      )
      dh, dw, db = jax.linear_transpose(slice_tangents, h, *slice_primals)(cot)
      np.testing.assert_allclose(dw, g[:, lo:hi].T @ hidden, rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(db, g[:, lo:hi].sum(0), rtol=1e-4, atol=1e-5)
      d_hidden = d_hidden + dh
    want = ((p * dx).sum(1), dx[np.arange(N), labels], dx @ class_weight)
    np.testing.assert_allclose(tangents, np.stack(want), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d_hidden, g @ weight, rtol=1e-4, atol=1e-5)


def _forward_derivatives(loss):
  """``(primals, tangents) -> (jvp, linearize's tangent, jacfwd)`` of ``loss(hidden, weight,
  bias)``, to jit as one program."""
  return lambda p, t: (
    jax.jvp(loss, p, t),
    jax.linearize(loss, *p)[1](*t),
    jax.jacfwd(loss, argnums=(0, 1, 2))(*p),
  )


class TestForwardMode:
  """Both schedules are custom JVPs. The one-pass schedule's tangent is the inner product of the
  gradients it computes with the inputs' tangents; the two-pass schedule's is a second blocked
  pass over the statistics, whose transpose is its backward pass. jax.jvp, jacfwd and linearize
  equal the unfused loss's, and reverse mode over them is unchanged."""

  @pytest.mark.parametrize(
    "name, reduction, layout",
    [("plain", "mean", "vd"), ("smooth_t5x_weighted", "mean", "dv"), ("everything", "sum", "dv")],
  )
  def test_jvp_jacfwd_linearize_equal_the_unfused_loss(self, name, reduction, layout):
    hidden, weight, bias, labels, kwargs = _problem(11, options=OPTION_SETS[name])
    rng = np.random.default_rng(12)
    tangents = (rng.normal(size=hidden.shape), rng.normal(size=weight.shape), rng.normal(size=V))
    with jax.enable_x64(True):
      w_layout = (lambda w: w) if layout == "vd" else (lambda w: w.T)
      options = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
      assert fused_schedule.plan_schedule(
        "t",
        N,
        D,
        V,
        linear_reduction=True,
        token_chunk_size=8,
        vocab_chunk_size=None,
        hidden_dtype=jnp.float64,
        weight_dtype=jnp.float64,
      ).one_pass

      def fused(h, w, b):
        return xent_jax.linear_cross_entropy(
          h,
          w_layout(w),
          jnp.asarray(labels),
          bias=b,
          weight_layout=layout,
          reduction=reduction,
          token_chunk_size=8,
          **options,
        )

      def unfused(h, w, b):
        cross_options = dict(options)
        if "class_weight" in cross_options:
          cross_options["weight"] = cross_options.pop("class_weight")
        return xent_jax.cross_entropy(
          h @ w.T + b[None, :], jnp.asarray(labels), reduction=reduction, **cross_options
        )

      primals = tuple(jnp.asarray(a) for a in (hidden, weight, bias))
      tangents = tuple(jnp.asarray(t) for t in tangents)
      # Everything jitted (eager, every primitive of the loops compiles separately), and in one
      # program per loss (each compiled program costs more here than its work).
      got, linearized, jac = jax.jit(_forward_derivatives(fused))(primals, tangents)
      want, grads = jax.jit(
        lambda p, t: (jax.jvp(unfused, p, t), jax.grad(unfused, argnums=(0, 1, 2))(*p))
      )(primals, tangents)
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
      np.testing.assert_allclose(linearized, want[1], rtol=1e-10, atol=1e-12)
      for got_jac, grad in zip(jac, grads):
        np.testing.assert_allclose(got_jac, grad, rtol=1e-10, atol=1e-12)
      check_grads(jax.jit(fused), primals, order=1, modes=("fwd", "rev"))

  @pytest.mark.parametrize(
    "name, reduction, layout, order, options",
    [
      ("plain", "none", "vd", "token", {}),
      ("weight_ignore_where", "none", "dv", "vocab", {"vocab_chunk_size": 7}),
      ("smooth_t5x_weighted", "mean", "dv", "token", {"vocab_chunk_size": 7}),
      ("everything", "sum", "vd", "vocab", {"return_lse": True}),
      # 'mean' in two passes, as at a language-model head (8D > N and VD > 2**24).
      ("zloss_softcap", "mean", "vd", "vocab", {}),
    ],
  )
  def test_two_pass_forward_mode_and_per_example_grads(
    self, name, reduction, layout, order, options, monkeypatch
  ):
    """The two-pass schedule is a custom JVP too (its tangent a second blocked pass, which
    reverse mode transposes): jvp, linearize and jacfwd equal the unfused float64 loss's, and so
    do per-example gradients (vmap of grad), in both loop orders."""
    plan, plans = fused_schedule.plan_schedule, []

    def forced(*args, **kwargs):
      plans.append(plan(*args, **kwargs)._replace(one_pass=False, vocab_major=order == "vocab"))
      return plans[-1]

    monkeypatch.setattr(fused_schedule, "plan_schedule", forced)
    hidden, weight, bias, labels, kwargs = _problem(17, options=OPTION_SETS[name])
    rng = np.random.default_rng(18)
    tangents = (rng.normal(size=hidden.shape), rng.normal(size=weight.shape), rng.normal(size=V))
    return_lse = options.get("return_lse", False)
    with jax.enable_x64(True):
      w_layout = (lambda w: w) if layout == "vd" else (lambda w: w.T)
      kwargs = {k: jnp.asarray(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}
      y = jnp.asarray(labels)

      def combined(out):  # the loss, plus the lse's sum when it is returned
        return out[0] + 0.5 * jnp.sum(out[1]) if return_lse else out

      def fused(h, w, b):
        return combined(
          xent_jax.linear_cross_entropy(
            h,
            w_layout(w),
            y,
            bias=b,
            weight_layout=layout,
            reduction=reduction,
            token_chunk_size=10,
            **options,
            **kwargs,
          )
        )

      def unfused(h, w, b):
        cross_options = dict(kwargs)
        if "class_weight" in cross_options:
          cross_options["weight"] = cross_options.pop("class_weight")
        return combined(
          xent_jax.cross_entropy(
            h @ w.T + b[None, :], y, reduction=reduction, return_lse=return_lse, **cross_options
          )
        )

      primals = tuple(jnp.asarray(a) for a in (hidden, weight, bias))
      tangents = tuple(jnp.asarray(t) for t in tangents)
      # Per-example gradients: two copies of the batch, the second scaled; vmapped for the fused
      # loss, one at a time for the unfused one.
      summed = lambda f: lambda h, w, b: jnp.sum(f(h, w, b))
      batch = jnp.stack([primals[0], 0.5 * primals[0]])
      per_example = jax.vmap(jax.grad(summed(fused), argnums=(0, 1, 2)), (0, None, None))
      unfused_grad = jax.grad(summed(unfused), argnums=(0, 1, 2))
      # Everything jitted (eager, every primitive of the loops compiles separately), and in one
      # program per loss (each compiled program costs more here than its work).
      (got, linearized, jac), got_per_example = jax.jit(
        lambda p, t, batch: (_forward_derivatives(fused)(p, t), per_example(batch, *p[1:]))
      )(primals, tangents, batch)
      want, want_jacs, want_per_example = jax.jit(
        lambda p, t, batch: (
          jax.jvp(unfused, p, t),
          jax.jacrev(unfused, argnums=(0, 1, 2))(*p),
          [unfused_grad(h, *p[1:]) for h in batch],
        )
      )(primals, tangents, batch)
      np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
      assert plans and not any(p.one_pass for p in plans)
      np.testing.assert_allclose(linearized, want[1], rtol=1e-10, atol=1e-12)
      for got_jac, want_jac in zip(jac, want_jacs):
        np.testing.assert_allclose(got_jac, want_jac, rtol=1e-10, atol=1e-12)
      for k, want in enumerate(want_per_example):
        for got_grad, want_grad in zip(got_per_example, want):
          np.testing.assert_allclose(got_grad[k], want_grad, rtol=1e-10, atol=1e-12)
      check_grads(jax.jit(fused), primals, order=1, modes=("fwd", "rev"))

  # One pass, and two passes (vocabulary chunks): reverse mode over the transposed tangent pass.
  @pytest.mark.parametrize("vocab_chunk", [None, 3])
  def test_reverse_over_reverse_equals_the_unfused_hessian(self, vocab_chunk):
    hidden, weight, _, labels, kwargs = _problem(13, n=9, d=3, v=7, options={"z_loss": 0.1})
    with jax.enable_x64(True):
      labels = jnp.asarray(labels)
      fused = lambda h: xent_jax.linear_cross_entropy(
        h, jnp.asarray(weight), labels, token_chunk_size=4, vocab_chunk_size=vocab_chunk, **kwargs
      )
      unfused = lambda h: xent_jax.cross_entropy(h @ jnp.asarray(weight).T, labels, **kwargs)
      np.testing.assert_allclose(
        jax.jit(jax.jacrev(jax.grad(fused)))(jnp.asarray(hidden)),
        jax.jit(jax.hessian(unfused))(jnp.asarray(hidden)),
        rtol=1e-9,
        atol=1e-12,
      )


class TestMemory:
  def test_fused_gradient_needs_far_less_temporary_memory(self):
    n, d, v = 2048, 64, 8192
    hidden = jax.ShapeDtypeStruct((n, d), jnp.float32)
    weight = jax.ShapeDtypeStruct((v, d), jnp.float32)
    labels = jax.ShapeDtypeStruct((n,), jnp.int32)

    def temp_bytes(loss_fn):
      return cpu_temp_bytes(jax.value_and_grad(loss_fn, argnums=(0, 1)), hidden, weight, labels)

    unfused = temp_bytes(lambda h, w, y: xent_jax.cross_entropy(h @ w.T, y))
    fused = temp_bytes(lambda h, w, y: xent_jax.linear_cross_entropy(h, w, y, token_chunk_size=128))
    low = temp_bytes(
      lambda h, w, y: xent_jax.linear_cross_entropy(
        h, w, y, token_chunk_size=128, vocab_chunk_size=1024
      )
    )
    logits_bytes = n * v * 4
    assert unfused >= logits_bytes  # the unfused gradient holds at least the [N, V] logits
    assert fused < unfused / 4, (fused, unfused)
    assert low < unfused / 20, (low, unfused)


class TestBadInput:
  @pytest.mark.parametrize(
    "change, name",
    [
      (dict(hidden=np.zeros((4, 3), np.int32)), "hidden"),
      (dict(weight=np.zeros((2, 5, 3), np.float32)), "weight"),
      (dict(weight=np.zeros((7, 4), np.float32)), "hidden"),  # D mismatch
      (dict(labels=np.zeros((4,), np.float32)), "labels"),
      (dict(labels=np.zeros((5,), np.int32)), "labels"),
      (dict(bias=np.zeros((6,), np.float32)), "bias"),
      (dict(class_weight=np.ones((3,), np.float32)), "class_weight"),
      (dict(where=np.ones((3,), bool)), "where"),
      (dict(token_chunk_size=0), "token_chunk_size"),
      (dict(vocab_chunk_size=2.5), "vocab_chunk_size"),
      (dict(weight_layout="nd"), "weight_layout"),
      (dict(reduction="avg"), "reduction"),
      (dict(label_smoothing=1.5), "label_smoothing"),
      (dict(smoothing="gauss"), "smoothing"),
      (dict(logit_softcap=0.0), "logit_softcap"),
    ],
  )
  def test_error_names_the_argument(self, change, name):
    args = dict(
      hidden=np.zeros((4, 3), np.float32),
      weight=np.zeros((7, 3), np.float32),
      labels=np.zeros((4,), np.int32),
    )
    args.update(change)
    positional = [args.pop(k) for k in ("hidden", "weight", "labels")]
    with pytest.raises((ValueError, TypeError, AssertionError), match=f"`{name}`"):
      xent_jax.linear_cross_entropy(*positional, **args)
