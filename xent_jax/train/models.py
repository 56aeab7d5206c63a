"""Flax NNX models: MLPs, CNNs for images and 1-D signals, a small causal Transformer char-LM.

``mnist1d_mlp`` and ``mnist1d_cnn`` are the two baselines of MNIST-1D (Greydanus 2020, "Scaling
down deep learning", the authors' ``MLPBase`` and ``ConvBase``); they take any ``[B, L]`` signal.

Parameters are float32; ``dtype`` sets the compute dtype (bfloat16 for mixed precision). Every
model maps inputs to logits; the Transformer also exposes its final hidden states and its
``[V, D]`` unembedding so the loss can be computed by `xent_jax.linear_cross_entropy` without
building the logits.
"""

import itertools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from xent_jax.train.config import ModelConfig


class MLP(nnx.Module):
  """Fully connected ReLU network: ``[B, ...] -> [B, C]`` (examples flattened to ``F`` features)."""

  def __init__(self, num_features: int, num_classes: int, *, hidden_dims, dtype, rngs: nnx.Rngs):
    dims = [num_features, *hidden_dims]
    self.hidden = nnx.List(
      [nnx.Linear(a, b, dtype=dtype, rngs=rngs) for a, b in itertools.pairwise(dims)]
    )
    self.head = nnx.Linear(dims[-1], num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x_Bx___):
    h_BxH = x_Bx___.reshape(x_Bx___.shape[0], -1)
    for layer in self.hidden:
      h_BxH = jax.nn.relu(layer(h_BxH))
    return self.head(h_BxH)


class CNN(nnx.Module):
  """3x3 conv + ReLU layers, global average pooling, linear head: ``[B, H, W(, C)] -> [B, K]``."""

  def __init__(self, in_channels: int, num_classes: int, *, channels, dtype, rngs: nnx.Rngs):
    dims = [in_channels, *channels]
    self.convs = nnx.List(
      [nnx.Conv(a, b, (3, 3), dtype=dtype, rngs=rngs) for a, b in itertools.pairwise(dims)]
    )
    self.head = nnx.Linear(dims[-1], num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x_BxHxWxC):
    h_BxHxWxC = x_BxHxWxC if x_BxHxWxC.ndim == 4 else x_BxHxWxC[..., None]
    for conv in self.convs:
      h_BxHxWxC = jax.nn.relu(conv(h_BxHxWxC))
    return self.head(h_BxHxWxC.mean(axis=(1, 2)))


class ResidualMLP(nnx.Module):
  """The MNIST-1D MLP baseline: ``h = relu(W1 x)``, ``h = h + relu(W2 h)``, logits ``W3 h``.

  Shapes: ``[B, ...] -> [B, C]`` (examples flattened), 100 hidden units as in the paper.
  """

  def __init__(
    self, num_features: int, num_classes: int, *, hidden: int = 100, dtype, rngs: nnx.Rngs
  ):
    self.linear1 = nnx.Linear(num_features, hidden, dtype=dtype, rngs=rngs)
    self.linear2 = nnx.Linear(hidden, hidden, dtype=dtype, rngs=rngs)
    self.linear3 = nnx.Linear(hidden, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x_Bx___):
    h_BxH = jax.nn.relu(self.linear1(x_Bx___.reshape(x_Bx___.shape[0], -1)))
    h_BxH = h_BxH + jax.nn.relu(self.linear2(h_BxH))
    return self.linear3(h_BxH)


class CNN1D(nnx.Module):
  """The MNIST-1D CNN baseline: three strided 1-D convolutions + ReLU, flatten, linear head.

  Kernels 5, 3, 3, stride 2, padding 1 and 25 channels, as the paper's ``ConvBase``; a length-40
  signal becomes 19, 10 then 5 positions, so the head sees 125 features. Shapes:
  ``[B, L]`` or ``[B, L, C_in]`` -> ``[B, K]``.
  """

  def __init__(
    self,
    length: int,
    in_channels: int,
    num_classes: int,
    *,
    channels: int = 25,
    dtype,
    rngs: nnx.Rngs,
  ):
    kernels = (5, 3, 3)
    dims = [in_channels] + [channels] * len(kernels)
    self.convs = nnx.List(
      [
        nnx.Conv(a, b, (k,), strides=2, padding=[(1, 1)], dtype=dtype, rngs=rngs)
        for a, b, k in zip(dims, dims[1:], kernels)
      ]
    )
    out_length = length
    for k in kernels:
      out_length = (out_length + 2 - k) // 2 + 1
    if out_length < 1:
      raise ValueError(f"model.name 'mnist1d_cnn' needs signals of length >= 3, got {length}")
    self.head = nnx.Linear(out_length * channels, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x_BxLxC):
    h_BxLxC = x_BxLxC if x_BxLxC.ndim == 3 else x_BxLxC[..., None]
    for conv in self.convs:
      h_BxLxC = jax.nn.relu(conv(h_BxLxC))
    return self.head(h_BxLxC.reshape(h_BxLxC.shape[0], -1))


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
    b, seq_len, d = x_BxLxD.shape
    qkv_BxLx3D = self.qkv(self.norm1(x_BxLxD))
    q_BxLxNxH, k_BxLxNxH, v_BxLxNxH = jnp.split(
      qkv_BxLx3D.reshape(b, seq_len, 3 * self.num_heads, d // self.num_heads), 3, axis=2
    )
    att_BxLxNxH = jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, is_causal=True)
    x_BxLxD = x_BxLxD + self.proj(att_BxLxNxH.reshape(b, seq_len, d))
    return x_BxLxD + self.down(jax.nn.gelu(self.up(self.norm2(x_BxLxD))))


class TransformerLM(nnx.Module):
  """Causal character language model: token ids ``[B, L]`` -> next-token logits ``[B, L, V]``."""

  def __init__(
    self,
    vocab_size: int,
    seq_len: int,
    *,
    dim,
    num_layers,
    num_heads,
    mlp_ratio,
    dtype,
    rngs: nnx.Rngs,
  ):
    if dim % num_heads:
      raise ValueError(f"model_dim ({dim}) must be divisible by num_heads ({num_heads})")
    self.dtype = dtype
    self.embed = nnx.Embed(vocab_size, dim, dtype=dtype, rngs=rngs)
    self.pos_LxD = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq_len, dim)))
    self.blocks = nnx.List(
      [Block(dim, num_heads, mlp_ratio, dtype=dtype, rngs=rngs) for _ in range(num_layers)]
    )
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
    input_shape: shape of one example: ``[F]`` or any shape (the MLPs flatten it), ``[H, W]`` or
      ``[H, W, C]`` (cnn), ``[L]`` or ``[L, C]`` (mnist1d_cnn), ``[L]`` token ids (transformer).
    num_classes: number of classes or vocabulary size.
    seed: initialisation seed.

  Raises:
    ValueError: ``input_shape`` does not suit the model (the message names both).
  """
  rngs = nnx.Rngs(seed)
  dtype = jnp.dtype(config.dtype)
  input_shape = tuple(input_shape)
  ranks = {"cnn": (2, 3), "mnist1d_cnn": (1, 2)}.get(config.name)
  if ranks and len(input_shape) not in ranks:
    layout = "[H, W] or [H, W, C]" if config.name == "cnn" else "[L] or [L, C]"
    raise ValueError(
      f"model.name {config.name!r} needs examples of shape {layout}; the data has "
      f"examples of shape {list(input_shape)}"
    )
  if config.name == "mlp":
    return MLP(
      math.prod(input_shape), num_classes, hidden_dims=config.hidden_dims, dtype=dtype, rngs=rngs
    )
  if config.name == "mnist1d_mlp":
    return ResidualMLP(math.prod(input_shape), num_classes, dtype=dtype, rngs=rngs)
  if config.name == "cnn":
    return CNN(
      input_shape[2] if len(input_shape) == 3 else 1,
      num_classes,
      channels=config.channels,
      dtype=dtype,
      rngs=rngs,
    )
  if config.name == "mnist1d_cnn":
    return CNN1D(
      input_shape[0],
      input_shape[1] if len(input_shape) == 2 else 1,
      num_classes,
      dtype=dtype,
      rngs=rngs,
    )
  return TransformerLM(
    num_classes,
    input_shape[0],
    dim=config.model_dim,
    num_layers=config.num_layers,
    num_heads=config.num_heads,
    mlp_ratio=config.mlp_ratio,
    dtype=dtype,
    rngs=rngs,
  )
