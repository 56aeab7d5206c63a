"""Optax optimizer and learning-rate schedule built from the config.

Weight decay: ``adamw`` decays the weights decoupled from the gradient (Loshchilov & Hutter 2019,
``optax.adamw``: ``p <- p - lr * (adam_step + wd * p)``). ``adam`` and ``sgd`` with a
``weight_decay`` add ``wd * p`` to the gradient before the update (``optax.add_decayed_weights``
chained first): coupled L2 regularisation, PyTorch's ``Adam(weight_decay=)`` and
``SGD(weight_decay=)``; under Adam the decay is then rescaled by the second-moment estimate, which
is what AdamW avoids.
"""

import optax

from xent_jax.train.config import OptimConfig

# The weight decay of each optimizer when the config leaves optim.weight_decay unset (None).
DEFAULT_WEIGHT_DECAY = {"adamw": 1e-4, "adam": 0.0, "sgd": 0.0}


def build_schedule(config: OptimConfig, num_steps: int) -> optax.Schedule:
  """Learning rate per step: constant, cosine decay, linear warm-up + cosine, or linear decay."""
  lr = config.learning_rate
  if config.schedule == "constant":
    return optax.constant_schedule(lr)
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, decay_steps=num_steps)
  if config.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=config.warmup_steps, decay_steps=num_steps
    )
  return optax.linear_schedule(lr, 0.0, transition_steps=num_steps)


def build_optimizer(config: OptimConfig, num_steps: int) -> optax.GradientTransformation:
  """The optimizer named by ``config.name``, its weight decay, optional global-norm clipping.

  The order is clip, then (adam, sgd) coupled decay, then the optimizer: the gradient is clipped
  before the decay term joins it.
  """
  schedule = build_schedule(config, num_steps)
  weight_decay = config.weight_decay
  if weight_decay is None:
    weight_decay = DEFAULT_WEIGHT_DECAY[config.name]
  if config.name == "adamw":
    tx = optax.adamw(schedule, weight_decay=weight_decay)
  else:
    if config.name == "adam":
      tx = optax.adam(schedule)
    else:
      tx = optax.sgd(schedule, momentum=config.momentum or None)
    if weight_decay > 0:
      tx = optax.chain(optax.add_decayed_weights(weight_decay), tx)
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx
