"""Optax optimizer and learning-rate schedule built from the config."""

import optax

from xent_jax.train.config import OptimConfig


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
  """The optimizer named by ``config.name`` with optional global-norm gradient clipping."""
  schedule = build_schedule(config, num_steps)
  if config.name == "adam":
    tx = optax.adam(schedule)
  elif config.name == "adamw":
    tx = optax.adamw(schedule, weight_decay=config.weight_decay)
  else:
    tx = optax.sgd(schedule, momentum=config.momentum or None)
  if config.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx
