"""Flax NNX models: an MLP, a small CNN for 8x8 images, a small causal Transformer char-LM.

Parameters are float32; ``dtype`` sets the compute dtype (bfloat16 for mixed precision). Every
model maps inputs to logits; the Transformer also exposes its final hidden states and its
``[V, D]`` unembedding so the loss can be computed by `xent_jax.linear_cross_entropy` without
building the logits.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from xent_jax.train.config import ModelConfig


class MLP(nnx.Module):
  """Fully connected ReLU network: ``[B, F] -> [B, C]``."""

  def __init__(self, num_features: int, num_classes: int, *, hidden_dims, dtype, rngs: nnx.Rngs):
    dims = [num_features, *hidden_dims]
    self.hidden = nnx.List([nnx.Linear(a, b, dtype=dtype, rngs=rngs) for a, b in zip(dims, dims[1:])])
    self.head = nnx.Linear(dims[-1], num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x_BxF):
    h_BxH = x_BxF
    for layer in self.hidden:
      h_BxH = jax.nn.relu(layer(h_BxH))
    return self.head(h_BxH)


class CNN(nnx.Module):
  """3x3 conv + ReLU layers, global average pooling, linear head: ``[B, H, W, 1] -> [B, C]``."""

  def __init__(self, num_classes: int, *, channels, dtype, rngs: nnx.Rngs):
    dims = [1, *channels]
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), dtype=dtype, rngs=rngs) for a, b in zip(dims, dims[1:])])
    self.head = nnx.Linear(dims[-1], num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x_BxHxWx1):
    h_BxHxWxC = x_BxHxWx1
    for conv in self.convs:
      h_BxHxWxC = jax.nn.relu(conv(h_BxHxWxC))
    return self.head(h_BxHxWxC.mean(axis=(1, 2)))


class Block(nnx.Module):
  """Pre-LayerNorm Transformer block: causal self-attention then a GELU MLP."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: int, *, dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.norm1 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.qkv = nnx.Linear(dim, 3 * dim, use_bias=False, dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, use_bias=False, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.up = nnx.Linear(dim, mlp_ratio * dim, dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(mlp_ratio * dim, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x_BxLxD):
    b, l, d = x_BxLxD.shape
    qkv_BxLx3D = self.qkv(self.norm1(x_BxLxD))
    q_BxLxNxH, k_BxLxNxH, v_BxLxNxH = jnp.split(
        qkv_BxLx3D.reshape(b, l, 3 * self.num_heads, d // self.num_heads), 3, axis=2)
    att_BxLxNxH = jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, is_causal=True)
    x_BxLxD = x_BxLxD + self.proj(att_BxLxNxH.reshape(b, l, d))
    return x_BxLxD + self.down(jax.nn.gelu(self.up(self.norm2(x_BxLxD))))


class TransformerLM(nnx.Module):
  """Causal character language model: token ids ``[B, L]`` -> next-token logits ``[B, L, V]``."""

  def __init__(self, vocab_size: int, seq_len: int, *, dim, num_layers, num_heads, mlp_ratio,
               dtype, rngs: nnx.Rngs):
    if dim % num_heads:
      raise ValueError(f"model_dim ({dim}) must be divisible by num_heads ({num_heads})")
    self.dtype = dtype
    self.embed = nnx.Embed(vocab_size, dim, dtype=dtype, rngs=rngs)
    self.pos_LxD = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, dim)))
    self.blocks = nnx.List([Block(dim, num_heads, mlp_ratio, dtype=dtype, rngs=rngs)
                            for _ in range(num_layers)])
    self.norm = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.unembed_VxD = nnx.Param(jax.random.normal(rngs.params(), (vocab_size, dim)) / dim**0.5)

  def hidden(self, ids_BxL):
    """Final hidden states ``[B, L, D]`` (after the last LayerNorm)."""
    x_BxLxD = self.embed(ids_BxL) + self.pos_LxD[...].astype(self.dtype)[None, : ids_BxL.shape[1]]
    for block in self.blocks:
      x_BxLxD = block(x_BxLxD)
    return self.norm(x_BxLxD)

  def __call__(self, ids_BxL):
    return self.hidden(ids_BxL) @ self.unembed_VxD[...].astype(self.dtype).T


def build_model(config: ModelConfig, *, input_shape, num_classes: int, seed: int) -> nnx.Module:
  """The model named by ``config.name``, initialised from ``seed``.

  Args:
    config: the model section of the experiment config.
    input_shape: shape of one example (``[F]``, ``[8, 8, 1]`` or ``[L]`` for the LM).
    num_classes: number of classes or vocabulary size.
    seed: initialisation seed.
  """
  rngs = nnx.Rngs(seed)
  dtype = jnp.dtype(config.dtype)
  if config.name == "mlp":
    return MLP(math.prod(input_shape), num_classes, hidden_dims=config.hidden_dims,
               dtype=dtype, rngs=rngs)
  if config.name == "cnn":
    return CNN(num_classes, channels=config.channels, dtype=dtype, rngs=rngs)
  return TransformerLM(num_classes, input_shape[0], dim=config.model_dim, num_layers=config.num_layers,
                       num_heads=config.num_heads, mlp_ratio=config.mlp_ratio, dtype=dtype, rngs=rngs)
