"""xent_jax: exact, fast cross-entropy losses as pure JAX functions.

The public API is exactly what this module re-exports; private modules hold one topic each.
"""

# Cross-entropy on logits (losses/cross_entropy.py), label checks (core/labels.py), optax drop-ins.
# Submodules: metrics (`from xent_jax import metrics`) and the optax drop-ins' own namespace.
from xent_jax import metrics, optax_compat
from xent_jax.core.labels import check_labels

# Fused linear cross-entropy (fused/).
from xent_jax.fused.linear import linear_cross_entropy
from xent_jax.losses.bitempered import tempered_softmax
from xent_jax.losses.cross_entropy import cross_entropy

# Loss variants (losses/) and the registry (registry.py).
from xent_jax.losses.variants import (
  bi_tempered_logistic_loss,
  confidence_penalty_cross_entropy,
  focal_loss,
  generalized_cross_entropy,
  poly1_cross_entropy,
  softmax_focal_loss,
  symmetric_cross_entropy,
  taylor_cross_entropy,
  truncated_generalized_cross_entropy,
)
from xent_jax.optax_compat import (
  poly_loss_cross_entropy,
  smooth_labels,
  softmax_cross_entropy,
  softmax_cross_entropy_with_integer_labels,
)
from xent_jax.parallel.linear import (
  vocab_parallel_linear_cross_entropy,
  vocab_parallel_linear_cross_entropy_local,
)

# Vocabulary-parallel cross-entropy over a device mesh (parallel/).
from xent_jax.parallel.logits import (
  vocab_parallel_cross_entropy,
  vocab_parallel_cross_entropy_local,
)
from xent_jax.registry import define_loss, get_loss, list_losses, register_loss

# The one place the version is written: pyproject.toml reads it (setuptools dynamic version).
__version__ = "0.1.0"

__all__ = [
  "bi_tempered_logistic_loss",
  "check_labels",
  "confidence_penalty_cross_entropy",
  "cross_entropy",
  "define_loss",
  "focal_loss",
  "generalized_cross_entropy",
  "get_loss",
  "linear_cross_entropy",
  "list_losses",
  "metrics",
  "optax_compat",
  "poly1_cross_entropy",
  "poly_loss_cross_entropy",
  "register_loss",
  "smooth_labels",
  "softmax_cross_entropy",
  "softmax_cross_entropy_with_integer_labels",
  "softmax_focal_loss",
  "symmetric_cross_entropy",
  "taylor_cross_entropy",
  "tempered_softmax",
  "truncated_generalized_cross_entropy",
  "vocab_parallel_cross_entropy",
  "vocab_parallel_cross_entropy_local",
  "vocab_parallel_linear_cross_entropy",
  "vocab_parallel_linear_cross_entropy_local",
]
