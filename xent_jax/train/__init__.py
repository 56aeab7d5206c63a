"""Config-driven Flax NNX + Optax training that compares xent_jax loss variants.

Needs the ``experiments`` extra (flax, optax, orbax-checkpoint, omegaconf, tqdm, matplotlib,
scikit-learn). Entry points: `train_and_evaluate` for one run, `run_comparison` for a grid, and
`build_report` to rebuild tables and plots from logged files; the ``xent-jax`` CLI wraps them.
"""

from xent_jax.train.compare import run_comparison
from xent_jax.train.config import Config, ConfigError, load_config
from xent_jax.train.report import build_report
from xent_jax.train.trainer import NonFiniteLossError, RunDirectoryError, train_and_evaluate

__all__ = [
  "Config",
  "ConfigError",
  "NonFiniteLossError",
  "RunDirectoryError",
  "build_report",
  "load_config",
  "run_comparison",
  "train_and_evaluate",
]
