"""xent_jax: exact, fast cross-entropy losses as pure JAX functions.

The public API is exactly what this module re-exports; private modules hold one topic each.
"""

# Core cross-entropy (xent_jax/_cross_entropy.py).

# Fused linear cross-entropy (xent_jax/_linear.py).

# Multi-device cross-entropy (xent_jax/_parallel.py).

# Loss variants and the registry (xent_jax/_variants.py, xent_jax/_registry.py).

__version__ = "0.1.0"

__all__ = [
]
