"""The jitted training step and evaluation, the loss they optimize, and the final calibration.

The loss comes from the xent_jax registry by name or import path (`xent_jax.get_loss`), so a new
loss variant never touches this file. With ``loss.fused`` the Transformer's loss is the loss's
fused form (``get_loss(...).linear``: `xent_jax.linear_cross_entropy` for cross-entropy) on its
final hidden states and ``[V, D]`` unembedding, which never builds the ``[tokens, V]`` logits.
After training, `calibration_row` fits a temperature on the held-out part of the training data and
scores the test split before and after scaling.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import xent_jax
from xent_jax import metrics
from xent_jax.train.config import Config, LossConfig
from xent_jax.train.optim import build_optimizer


def make_objective(loss: LossConfig):
  """``objective(model, x, y) -> scalar`` mean training loss of one batch."""
  loss_fn = xent_jax.get_loss(loss.name, **loss.hparams)
  if loss.fused:

    def fused_objective(model, ids_BxL, labels_BxL):
      h_BxLxD = model.hidden(ids_BxL)
      h_NxD = h_BxLxD.reshape(-1, h_BxLxD.shape[-1])
      w_VxD = model.unembed_VxD[...].astype(h_NxD.dtype)
      return loss_fn.linear(h_NxD, w_VxD, labels_BxL.reshape(-1), reduction="mean")

    return fused_objective

  def objective(model, x_BxF, labels_B):
    logits_BxC = model(x_BxF)
    return loss_fn(
      logits_BxC.reshape(-1, logits_BxC.shape[-1]), labels_B.reshape(-1), reduction="mean"
    )

  return objective


def _update(model, optimizer, objective, x_BxF, y_B):
  """One optimizer step of ``model`` in place; returns ``(loss, finite)``.

  ``finite`` is True when the loss and every updated parameter are finite, so a step that
  blows up the weights is caught even while its own loss was still finite.
  """
  loss, grads = nnx.value_and_grad(objective)(model, x_BxF, y_B)
  optimizer.update(model, grads)
  params = nnx.state(model, nnx.Param)
  finite = jnp.isfinite(loss) & jnp.all(
    jnp.array([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)])
  )
  return loss, finite


def make_train_step(graphdef, objective):
  """``train_step(state, x, y) -> (state, loss, finite)``, jitted, donating the old state.

  ``finite``: see `_update`.
  """

  def train_step(state, x_BxF, y_B):
    model, optimizer = nnx.merge(graphdef, state)
    loss, finite = _update(model, optimizer, objective, x_BxF, y_B)
    return nnx.state((model, optimizer)), loss, finite

  return jax.jit(train_step, donate_argnums=0)


def make_member_step(graphdef, config: Config, traced: tuple[str, ...]):
  """``member_step(state, values, x, y, active) -> (state, loss, finite)`` of one sweep member.

  The pure (unjitted) step of `make_train_step` where the config values named in ``traced``
  (``"optim.learning_rate"``, ``"loss.hparams.<name>"``) come in as traced scalars ``values``
  (a dict keyed by those names), so one compiled program serves every member of a group. The
  optimizer is rebuilt from the traced learning rate (its state layout does not depend on it),
  and the loss from the traced hyper-parameters.

  The step runs under ``jax.lax.cond(active, ...)``: where ``active`` is False the state is
  returned unchanged, with loss 0 and ``finite`` True (a member waiting for the group to reach
  its checkpoint, whose losses are not logged, or one stopped by a non-finite loss), so the
  members never influence each other. A conditional, not a ``jnp.where`` of the updated and the
  old state: the select joined the optimizer update's fusions and changed its float rounding
  (the MNIST-1D CNN's weights parted from the sequential run's by 1.5e-8 after two steps), while
  the conditional's branch compiles as the sequential step does, bit for bit. Under ``map`` an
  inactive member also skips its work; under ``vmap`` both branches run and a select picks.
  """

  def member_step(state, values, x_BxF, y_B, active):
    def update(state):
      model, optimizer = nnx.merge(graphdef, state)
      if "optim.learning_rate" in traced:
        optim = dataclasses.replace(config.optim, learning_rate=values["optim.learning_rate"])
        optimizer.tx = build_optimizer(optim, config.train.num_steps)
      hparams = dict(config.loss.hparams)
      hparams.update({k.split(".", 2)[2]: v for k, v in values.items() if k.startswith("loss.")})
      objective = make_objective(dataclasses.replace(config.loss, hparams=hparams))
      loss, finite = _update(model, optimizer, objective, x_BxF, y_B)
      return nnx.state((model, optimizer)), loss.astype(jnp.float32), finite

    def keep(state):
      return state, jnp.zeros((), jnp.float32), jnp.ones((), bool)

    return jax.lax.cond(active, update, keep, state)

  return member_step


def over_members(fn, mode: str, in_axes: tuple):
  """``fn`` applied to every member: ``jax.vmap`` (mode ``vmap``) or ``jax.lax.map`` (``map``).

  ``in_axes`` holds 0 for an argument stacked over members and None for one they share. With
  ``map`` the members run one after another inside the same program, so each keeps the
  unbatched kernels (a vmapped convolution becomes a grouped one, slow on XLA:CPU).
  """
  if mode == "vmap":
    return jax.vmap(fn, in_axes=in_axes)

  def mapped(*args):
    stacked = [a for a, axis in zip(args, in_axes) if axis == 0]

    def one(member_args):
      rest = iter(member_args)
      return fn(*[next(rest) if axis == 0 else a for a, axis in zip(args, in_axes)])

    return jax.lax.map(one, stacked)

  return mapped


def _model(graphdef, state):
  """The model of ``graphdef`` and ``state``: of a ``(model, optimizer)`` pair, or of a model alone
  (a vectorized group's evaluation takes only the models, so that groups of the same model with
  another loss or optimizer share its compiled program)."""
  merged = nnx.merge(graphdef, state)
  return merged[0] if isinstance(merged, tuple) else merged


def make_eval_step(graphdef, *, num_bins: int, num_shards: int):
  """`eval_sums_fn`, jitted."""
  return jax.jit(eval_sums_fn(graphdef, num_bins=num_bins, num_shards=num_shards))


def eval_sums_fn(graphdef, *, num_bins: int, num_shards: int):
  """``eval_step(state, x, y, valid) -> metrics.EvalSums`` with a leading ``[num_shards]`` axis
  (``graphdef`` and ``state``: of the ``(model, optimizer)`` pair or of the model alone).

  Each device's rows are summed separately (no cross-device reduction, whose order is not fixed
  on CPU); the caller adds the shards on the host in a fixed order, so evaluation is bitwise
  reproducible. The sums add up across batches, so logits never leave the devices.
  """

  def shard_sums(logits_SxC, y_S, where_S):
    return metrics.eval_sums(logits_SxC, y_S, num_bins=num_bins, where=where_S)

  def eval_step(state, x_BxF, y_B, valid_B):
    model = _model(graphdef, state)
    logits_BxC = model(x_BxF)
    where_B = jnp.broadcast_to(valid_B.reshape(valid_B.shape + (1,) * (y_B.ndim - 1)), y_B.shape)
    split = lambda a: a.reshape((num_shards, -1) + a.shape[1:])  # pylint: disable=unnecessary-lambda-assignment
    return jax.vmap(shard_sums)(split(logits_BxC), split(y_B), split(where_B))

  return eval_step


def finish_eval(sums: metrics.EvalSums) -> tuple[dict, dict]:
  """The logged metric row and the calibration counts (for reliability diagrams) of the sums.

  Args:
    sums: the total over the test split (host arrays without the shard axis).
  """
  row = {f"eval/{k}": float(v) for k, v in metrics.metrics_from_sums(sums).items()}
  counts = {k: np.asarray(v).tolist() for k, v in sums.calibration._asdict().items()}
  return row, counts


def make_logits_step(graphdef):
  """`logits_fn`, jitted."""
  return jax.jit(logits_fn(graphdef))


def logits_fn(graphdef):
  """``logits_step(state, x) -> logits`` (``[B, C]`` or ``[B, L, V]``; ``graphdef`` and
  ``state`` as in `eval_sums_fn`)."""

  def logits_step(state, x_BxF):
    model = _model(graphdef, state)
    return model(x_BxF)

  return logits_step


def calibration_row(
  logits_holdout_HxC, y_holdout_H, logits_test_MxC, y_test_M, *, num_bins: int
) -> tuple[dict, dict | None]:
  r"""Test calibration before and after temperature scaling fitted on held-out training data.

  :math:`T` minimises the NLL of ``softmax(logits_holdout / T)`` (`metrics.fit_temperature`; Guo
  et al. 2017); the held-out examples come from the training split, so the test split is only
  scored. Before scaling: adaptive ECE, classwise ECE and MCE (plain ECE, NLL and Brier are in the
  streamed evaluation row). After scaling, with suffix ``_ts``: NLL, Brier, ECE, adaptive ECE,
  classwise ECE and MCE (accuracy does not change: ``x / T`` keeps every arg-max).

  The fit, every metric and the counts are one compiled program (`_calibration_arrays`), not one
  per metric, so a run's end compiles once.

  Args:
    logits_holdout_HxC: ``[H, C]`` logits of the held-out examples (``H`` may be 0).
    y_holdout_H: ``[H]`` their (possibly noisy) labels.
    logits_test_MxC: ``[M, C]`` test logits.
    y_test_M: ``[M]`` test labels.
    num_bins: calibration bins (equal-width; equal-mass for the adaptive ECE).

  Returns:
    ``(row, counts_ts)``: ``{"eval/temperature": T, "eval/adaptive_ece": ..., ...}`` as floats,
    and the `metrics.CalibrationCounts` of the scaled test logits as lists (reliability diagrams);
    without held-out examples ``T`` is None, no ``_ts`` metric is given and ``counts_ts`` is None.
  """
  fit = bool(len(y_holdout_H))
  temperature, before, after, counts = jax.device_get(
    _calibration_arrays(
      logits_holdout_HxC, y_holdout_H, logits_test_MxC, y_test_M, num_bins=num_bins, fit=fit
    )
  )
  row = {"eval/temperature": float(temperature) if fit else None}
  row.update({f"eval/{name}": float(value) for name, value in zip(_BEFORE, before, strict=True)})
  if not fit:
    return row, None
  row.update({f"eval/{name}_ts": float(value) for name, value in zip(_AFTER, after, strict=True)})
  return row, {k: np.asarray(v).tolist() for k, v in counts._asdict().items()}


# The calibration row's metrics, in its order: of the test logits, then of the scaled ones.
_BEFORE = ("adaptive_ece", "classwise_ece", "mce")
_AFTER = (*_BEFORE, "nll", "brier", "ece")
_BINNED = {
  "adaptive_ece": metrics.adaptive_calibration_error,
  "classwise_ece": metrics.classwise_calibration_error,
  "mce": metrics.maximum_calibration_error,
  "ece": metrics.expected_calibration_error,
}
_UNBINNED = {"nll": metrics.negative_log_likelihood, "brier": metrics.brier_score}


@functools.partial(jax.jit, static_argnames=("num_bins", "fit"))
def _calibration_arrays(
  logits_holdout_HxC, y_holdout_H, logits_test_MxC, y_test_M, *, num_bins: int, fit: bool
):
  """`calibration_row`'s values: ``(T, before, after, counts)``, ``before`` and ``after`` the
  metrics named by `_BEFORE` and `_AFTER` as scalar arrays; without ``fit`` only ``before`` (the
  rest None)."""

  def scores(names, logits_MxC):
    return [
      _BINNED[name](logits_MxC, y_test_M, num_bins=num_bins)
      if name in _BINNED
      else _UNBINNED[name](logits_MxC, y_test_M)
      for name in names
    ]

  before = scores(_BEFORE, logits_test_MxC)
  if not fit:
    return None, before, None, None
  temperature = metrics.fit_temperature(logits_holdout_HxC, y_holdout_H)
  scaled_MxC = metrics.apply_temperature(logits_test_MxC, temperature)
  counts = metrics.calibration_counts(scaled_MxC, y_test_M, num_bins=num_bins)
  return temperature, before, scores(_AFTER, scaled_MxC), counts
