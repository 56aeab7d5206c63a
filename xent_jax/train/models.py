"""Flax NNX models: linear, MLPs, CNNs, a GRU for 1-D signals, a small causal Transformer char-LM.

``linear``, ``mnist1d_mlp``, ``mnist1d_cnn`` and ``mnist1d_gru`` are the four baselines of MNIST-1D
(Greydanus 2020, "Scaling down deep learning", the authors' ``LinearBase``, ``MLPBase``,
``ConvBase`` and ``GRUBase``); they take any ``[B, L]`` signal.

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


class Linear(nnx.Module):
  """Logistic regression: one affine map of the flattened example, ``[B, ...] -> [B, C]``."""

  def __init__(self, num_features: int, num_classes: int, *, dtype, rngs: nnx.Rngs):
    self.head = nnx.Linear(num_features, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x_Bx___):
    return self.head(x_Bx___.reshape(x_Bx___.shape[0], -1))


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

  ``conv='lax'`` runs each layer as ``lax.conv_general_dilated`` (``nnx.Conv``); ``'im2col'``
  gathers the ``[B, L_out, k * C_in]`` patches by strided slicing and multiplies them by the same
  kernel reshaped to ``[k * C_in, C_out]``: the same parameters and values, but a batched matmul
  under ``vmap`` (over ensemble members) where ``lax.conv`` becomes a grouped convolution, which
  XLA:CPU runs several times slower.
  """

  def __init__(
    self,
    length: int,
    in_channels: int,
    num_classes: int,
    *,
    channels: int = 25,
    conv: str = "lax",
    dtype,
    rngs: nnx.Rngs,
  ):
    if conv not in ("lax", "im2col"):
      raise ValueError(f"model.conv must be 'lax' or 'im2col', got {conv!r}")
    self.im2col = conv == "im2col"
    self.dtype = dtype
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
      h_BxLxC = jax.nn.relu(self._im2col_conv(conv, h_BxLxC) if self.im2col else conv(h_BxLxC))
    return self.head(h_BxLxC.reshape(h_BxLxC.shape[0], -1))

  def _im2col_conv(self, conv: nnx.Conv, x_BxLxC):
    """``conv`` (stride 2, padding 1) as patches ``[B, O, k * C]`` @ kernel ``[k * C, C_out]``."""
    k, c_in, c_out = conv.kernel.shape
    x_BxLxC = x_BxLxC.astype(self.dtype)
    x_BxPxC = jnp.pad(x_BxLxC, ((0, 0), (1, 1), (0, 0)))
    out = (x_BxPxC.shape[1] - k) // 2 + 1
    # Patch j of output position o is padded position 2 o + j.
    patches_BxOxKxC = jnp.stack(
      [x_BxPxC[:, j : j + 2 * (out - 1) + 1 : 2] for j in range(k)], axis=2
    )
    kernel_KCxO = conv.kernel[...].astype(self.dtype).reshape(k * c_in, c_out)
    y_BxOxC = patches_BxOxKxC.reshape(*patches_BxOxKxC.shape[:2], k * c_in) @ kernel_KCxO
    assert conv.bias is not None  # built with use_bias=True
    return y_BxOxC + conv.bias[...].astype(self.dtype)[None, None]


class GRU1D(nnx.Module):
  r"""The MNIST-1D GRU baseline: a bidirectional GRU over the signal, every step's state to a head.

  As the paper's ``GRUBase`` (``torch.nn.GRU``, 6 hidden units per direction, batch first, zero
  initial state): each of the ``L`` positions is one step of ``C_in`` features (1 for MNIST-1D);
  the forward and the backward states of every step, ``[B, L, 2H]``, are flattened step-major
  into a linear head (``40 * 12 = 480`` features). Each direction's cell is PyTorch's:

  .. math::
     r = \sigma(W_{ir} x + b_{ir} + W_{hr} h + b_{hr}), \quad
     z = \sigma(W_{iz} x + b_{iz} + W_{hz} h + b_{hz}),

     n = \tanh(W_{in} x + b_{in} + r \odot (W_{hn} h + b_{hn})), \quad
     h' = (1 - z) \odot n + z \odot h

  (``nnx.GRUCell`` has no :math:`b_{hn}`, hence this cell). Shapes: ``[B, L]`` or
  ``[B, L, C_in]`` -> ``[B, K]``.
  """

  def __init__(
    self,
    length: int,
    in_channels: int,
    num_classes: int,
    *,
    hidden: int = 6,
    dtype,
    rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    orthogonal = nnx.initializers.orthogonal()

    def dense(a, b, **kwargs):
      return nnx.Linear(a, b, dtype=dtype, rngs=rngs, **kwargs)

    # Gates in PyTorch's order (r, z, n) along the output axis of each kernel.
    self.input_fwd = dense(in_channels, 3 * hidden)
    self.state_fwd = dense(hidden, 3 * hidden, kernel_init=orthogonal)
    self.input_bwd = dense(in_channels, 3 * hidden)
    self.state_bwd = dense(hidden, 3 * hidden, kernel_init=orthogonal)
    self.head = dense(length * 2 * hidden, num_classes)

  def _run(self, inputs_BxLx3H, state: nnx.Linear, reverse: bool):
    """States ``[B, L, H]`` of one direction, from the input projections of every step."""
    w_Hx3H = state.kernel[...].astype(self.dtype)
    assert state.bias is not None  # built with use_bias=True
    b_1x3H = state.bias[...].astype(self.dtype)[None]

    def step(h_BxH, xi_Bx3H):
      hi_Bx3H = h_BxH @ w_Hx3H + b_1x3H
      xr, xz, xn = jnp.split(xi_Bx3H, 3, axis=-1)
      hr, hz, hn = jnp.split(hi_Bx3H, 3, axis=-1)
      r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
      h_BxH = (1 - z) * jnp.tanh(xn + r * hn) + z * h_BxH
      return h_BxH, h_BxH

    b, _, three_h = inputs_BxLx3H.shape
    h0_BxH = jnp.zeros((b, three_h // 3), inputs_BxLx3H.dtype)
    _, h_LxBxH = jax.lax.scan(step, h0_BxH, inputs_BxLx3H.swapaxes(0, 1), reverse=reverse)
    return h_LxBxH.swapaxes(0, 1)

  def __call__(self, x_BxLxC):
    x_BxLxC = x_BxLxC if x_BxLxC.ndim == 3 else x_BxLxC[..., None]
    h_BxLx2H = jnp.concatenate(
      [
        self._run(self.input_fwd(x_BxLxC), self.state_fwd, reverse=False),
        self._run(self.input_bwd(x_BxLxC), self.state_bwd, reverse=True),
      ],
      axis=-1,
    )
    return self.head(h_BxLx2H.reshape(h_BxLx2H.shape[0], -1))


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
    b, length, d = x_BxLxD.shape
    qkv_BxLx3D = self.qkv(self.norm1(x_BxLxD))
    q_BxLxNxH, k_BxLxNxH, v_BxLxNxH = jnp.split(
      qkv_BxLx3D.reshape(b, length, 3 * self.num_heads, d // self.num_heads), 3, axis=2
    )
    att_BxLxNxH = jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, is_causal=True)
    x_BxLxD = x_BxLxD + self.proj(att_BxLxNxH.reshape(b, length, d))
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
      ``[H, W, C]`` (cnn), ``[L]`` or ``[L, C]`` (mnist1d_cnn, mnist1d_gru), ``[L]`` token ids
      (transformer).
    num_classes: number of classes or vocabulary size.
    seed: initialisation seed.

  Raises:
    ValueError: ``input_shape`` does not suit the model (the message names both).
  """
  rngs = nnx.Rngs(seed)
  dtype = jnp.dtype(config.dtype)
  input_shape = tuple(input_shape)
  ranks = {"cnn": (2, 3), "mnist1d_cnn": (1, 2), "mnist1d_gru": (1, 2)}.get(config.name)
  if ranks and len(input_shape) not in ranks:
    layout = "[H, W] or [H, W, C]" if config.name == "cnn" else "[L] or [L, C]"
    raise ValueError(
      f"model.name {config.name!r} needs examples of shape {layout}; the data has "
      f"examples of shape {list(input_shape)}"
    )
  if config.name == "linear":
    return Linear(math.prod(input_shape), num_classes, dtype=dtype, rngs=rngs)
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
  if config.name in ("mnist1d_cnn", "mnist1d_gru"):
    length, features = input_shape[0], input_shape[1] if len(input_shape) == 2 else 1
    if config.name == "mnist1d_gru":
      return GRU1D(length, features, num_classes, dtype=dtype, rngs=rngs)
    return CNN1D(length, features, num_classes, conv=config.conv, dtype=dtype, rngs=rngs)
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
