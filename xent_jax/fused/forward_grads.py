r"""A scalar loss whose gradients its forward pass computes, differentiable in both modes.

The one-pass schedules of the fused heads (:func:`xent_jax.fused.chunked.one_pass_linear_sum`, the
one-pass ``linear_cross_entropy`` kernel and its vocabulary-parallel twin) build each block of
logits once and differentiate it right away, so a forward pass returns
:math:`L = \sum_i s_i \ell_i` together with :math:`g_k = \partial L / \partial a_k` for its
differentiable inputs :math:`a_k` (``hidden``, ``weight``, ``bias``). :func:`sum_with_gradients`
makes that a ``jax.custom_jvp`` with tangent

.. math::
   \dot L = \sum_k \langle g_k, \dot a_k \rangle,

which forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.linearize``) evaluates, and which reverse
mode transposes into ":math:`\bar a_k = \bar L\, g_k`": the backward pass only scales the stored
gradients, as a ``custom_vjp`` would, but without ``custom_vjp``'s refusal of forward mode.

The forward pass sits behind a ``custom_vjp`` whose backward pass is plain autodiff of it (only
second derivatives reach it). That boundary is opaque to partial evaluation: without it,
linearising the JVP hoists loop-invariant ``[chunk, V]`` constants of the forward's loop (an iota,
a zero broadcast) out of the loop and keeps them alive.

References:
  Hsu et al., "Liger Kernel: Efficient Triton Kernels for LLM Training", 2024 (gradients in the
  forward pass); Radul et al., "You Only Linearize Once", 2023 (JAX's reverse mode as
  linearisation and transposition).
"""

from collections.abc import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
from jax import lax


def sum_with_gradients(
  forward: Callable[..., tuple[jax.Array, tuple]],
  *args,
  num_differentiable: int,
  value: Callable[..., jax.Array] | None = None,
  tangent_axes: Sequence[tuple[Hashable, ...]] | None = None,
) -> jax.Array:
  """``forward(*args)[0]``, differentiated through the gradients ``forward`` returns.

  Args:
    forward: ``forward(*args) -> (total, grads)``: ``total`` a scalar and ``grads[k]`` its
      gradient for ``args[k]`` (same shape; None where ``args[k]`` is None), for each of the
      first ``num_differentiable`` arguments. Pure: it is traced again for second derivatives.
    *args: its arguments; those after the first ``num_differentiable`` are held constant (their
      tangents are ignored, as a ``custom_vjp`` returning None for them would).
    num_differentiable: how many leading arguments are differentiated.
    value: ``value(*args) -> total`` without the gradients (cheaper), called where nothing is
      differentiated; None: ``forward(*args)[0]``.
    tangent_axes: inside ``shard_map``, for each differentiable argument the mesh axes over which
      its inner product :math:`\\langle g_k, \\dot a_k\\rangle` is a partial sum (the axes its
      shards split): they are ``psum``-ed so that the tangent has ``total``'s type. None: no axes.

  Returns:
    The scalar ``total``.
  """
  if tangent_axes is None:
    tangent_axes = [()] * num_differentiable
  opaque = jax.custom_vjp(forward)
  opaque.defvjp(
    lambda *a: (forward(*a), a), lambda a, cotangent: jax.vjp(forward, *a)[1](cotangent)
  )

  @jax.custom_jvp
  def total(*a):
    return forward(*a)[0] if value is None else value(*a)

  @total.defjvp
  def total_jvp(primals, tangents):
    value, grads = opaque(*primals)
    t_value = jnp.zeros((), value.dtype)
    for grad, tangent, axes in zip(grads, tangents[:num_differentiable], tangent_axes):
      if grad is None:
        continue
      term = jnp.sum(grad * tangent.astype(grad.dtype), dtype=value.dtype)
      t_value = t_value + (lax.psum(term, axes) if axes else term)
    return value, t_value

  return total(*args)
