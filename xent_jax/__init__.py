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

# Multi-device cross-entropy (xent_jax/_parallel.py).

# Loss variants and the registry (xent_jax/_variants.py, xent_jax/_registry.py).

__version__ = "0.1.0"

__all__ = [
    "check_labels",
    "cross_entropy",
    "poly_loss_cross_entropy",
    "smooth_labels",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
]
