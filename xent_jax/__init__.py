"""xent_jax: exact, fast cross-entropy losses as pure JAX functions.

The public API is exactly what this module re-exports; private modules hold one topic each.
"""

# Core cross-entropy (xent_jax/_cross_entropy.py, _optax_compat.py, _label_checks.py).
from xent_jax._cross_entropy import cross_entropy
from xent_jax._label_checks import check_labels
from xent_jax._optax_compat import poly_loss_cross_entropy
from xent_jax._optax_compat import smooth_labels
from xent_jax._optax_compat import softmax_cross_entropy
from xent_jax._optax_compat import softmax_cross_entropy_with_integer_labels

# Fused linear cross-entropy (xent_jax/_linear.py).
from xent_jax._linear import linear_cross_entropy

# Multi-device cross-entropy (xent_jax/_parallel.py).
from xent_jax._parallel import vocab_parallel_cross_entropy
from xent_jax._parallel import vocab_parallel_cross_entropy_local
from xent_jax._parallel import vocab_parallel_linear_cross_entropy

# Loss variants and the registry (xent_jax/_variants.py, xent_jax/_registry.py).
from xent_jax._bitempered import bi_tempered_logistic_loss
from xent_jax._bitempered import tempered_softmax
from xent_jax._registry import define_loss
from xent_jax._registry import get_loss
from xent_jax._registry import list_losses
from xent_jax._registry import register_loss
from xent_jax._variants import confidence_penalty_cross_entropy
from xent_jax._variants import focal_loss
from xent_jax._variants import generalized_cross_entropy
from xent_jax._variants import poly1_cross_entropy
from xent_jax._variants import symmetric_cross_entropy
from xent_jax._variants import taylor_cross_entropy
from xent_jax._variants import truncated_generalized_cross_entropy

# Metrics (xent_jax/metrics.py), used as a submodule: `from xent_jax import metrics`.
from xent_jax import metrics

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
  "poly1_cross_entropy",
  "poly_loss_cross_entropy",
  "register_loss",
  "smooth_labels",
  "softmax_cross_entropy",
  "softmax_cross_entropy_with_integer_labels",
  "symmetric_cross_entropy",
  "taylor_cross_entropy",
  "tempered_softmax",
  "truncated_generalized_cross_entropy",
  "vocab_parallel_cross_entropy",
  "vocab_parallel_cross_entropy_local",
  "vocab_parallel_linear_cross_entropy",
]
