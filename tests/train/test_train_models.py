"""The MNIST-1D baselines against PyTorch twins of the authors' models, and input layouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from xent_jax.train.config import ModelConfig
from xent_jax.train.models import build_model


def _build(name, input_shape, num_classes=10, **kwargs):
  config = ModelConfig(name=name, **kwargs)
  return nnx.jit(
    lambda: build_model(config, input_shape=input_shape, num_classes=num_classes, seed=0)
  )()


def _params(model):
  return {
    "/".join(map(str, path)): np.asarray(leaf, np.float64)
    for path, leaf in jax.tree_util.tree_leaves_with_path(
      nnx.to_pure_dict(nnx.state(model, nnx.Param))
    )
    for path in [[p.key for p in path]]
  }


class _TorchConvBase(torch.nn.Module):
  """Greydanus (2020) ConvBase: Conv1d(1,25,5,s2,p1), Conv1d(25,25,3,s2,p1) x2, Linear(125, 10)."""

  def __init__(self):
    super().__init__()
    self.convs = torch.nn.ModuleList(
      [
        torch.nn.Conv1d(1, 25, 5, stride=2, padding=1),
        torch.nn.Conv1d(25, 25, 3, stride=2, padding=1),
        torch.nn.Conv1d(25, 25, 3, stride=2, padding=1),
      ]
    )
    self.linear = torch.nn.Linear(125, 10)

  def forward(self, x_BxL):
    h = x_BxL[:, None, :]
    for conv in self.convs:
      h = conv(h).relu()
    return self.linear(h.flatten(1))  # channel-major flatten


class _TorchMLPBase(torch.nn.Module):
  """Greydanus (2020) MLPBase: h = relu(W1 x); h = h + relu(W2 h); W3 h; 100 hidden units."""

  def __init__(self):
    super().__init__()
    self.linear1, self.linear2 = torch.nn.Linear(40, 100), torch.nn.Linear(100, 100)
    self.linear3 = torch.nn.Linear(100, 10)

  def forward(self, x_BxL):
    h = self.linear1(x_BxL).relu()
    return self.linear3(h + self.linear2(h).relu())


def _t(array):
  return torch.tensor(np.ascontiguousarray(array))


def test_mnist1d_cnn_equals_the_authors_conv_base():
  model = _build("mnist1d_cnn", (40,))
  params = _params(model)
  assert sum(p.size for p in params.values()) == 5210  # ConvBase's parameter count
  twin = _TorchConvBase().double()
  with torch.no_grad():
    for i, conv in enumerate(twin.convs):
      conv.weight.copy_(
        _t(params[f"convs/{i}/kernel"].transpose(2, 1, 0))
      )  # [k, in, out] -> [out, in, k]
      conv.bias.copy_(_t(params[f"convs/{i}/bias"]))
    # Ours flattens [L=5, C=25] position-major, PyTorch [C, L] channel-major.
    kernel = params["head/kernel"].reshape(5, 25, 10).transpose(1, 0, 2).reshape(125, 10)
    twin.linear.weight.copy_(_t(kernel.T))
    twin.linear.bias.copy_(_t(params["head/bias"]))
  x_BxL = np.random.default_rng(0).normal(size=(6, 40))
  expected = twin(_t(x_BxL)).detach().numpy()
  got = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x_BxL, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_mnist1d_mlp_equals_the_authors_mlp_base():
  model = _build("mnist1d_mlp", (40,))
  params = _params(model)
  assert sum(p.size for p in params.values()) == 15210  # MLPBase's parameter count
  twin = _TorchMLPBase().double()
  with torch.no_grad():
    for name in ("linear1", "linear2", "linear3"):
      getattr(twin, name).weight.copy_(_t(params[f"{name}/kernel"].T))
      getattr(twin, name).bias.copy_(_t(params[f"{name}/bias"]))
  x_BxL = np.random.default_rng(1).normal(size=(6, 40))
  expected = twin(_t(x_BxL)).detach().numpy()
  got = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x_BxL, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


class _TorchGRUBase(torch.nn.Module):
  """Greydanus (2020) GRUBase: bidirectional GRU(1, 6), batch first, h0 = 0, Linear(480, 10)."""

  def __init__(self):
    super().__init__()
    self.gru = torch.nn.GRU(1, 6, batch_first=True, bidirectional=True)
    self.linear = torch.nn.Linear(40 * 12, 10)

  def forward(self, x_BxL):
    output, _ = self.gru(x_BxL[..., None], torch.zeros(2, x_BxL.shape[0], 6, dtype=x_BxL.dtype))
    return self.linear(output.reshape(output.shape[0], -1))


def test_mnist1d_gru_equals_the_authors_gru_base():
  model = _build("mnist1d_gru", (40,))
  # Nonzero biases (they start at 0), so that b_hn inside r * (W_hn h + b_hn) is tested too.
  rng = np.random.default_rng(2)
  graphdef, state = nnx.split(model)
  state_dict = nnx.to_pure_dict(state)
  for layer in ("input_fwd", "state_fwd", "input_bwd", "state_bwd"):
    state_dict[layer]["bias"] = jnp.asarray(rng.normal(size=18), jnp.float32)
  nnx.replace_by_pure_dict(state, state_dict)
  model = nnx.merge(graphdef, state)
  params = _params(model)
  assert sum(p.size for p in params.values()) == 5134  # GRUBase's parameter count
  twin = _TorchGRUBase().double()
  with torch.no_grad():
    for ours, suffix in (("fwd", ""), ("bwd", "_reverse")):
      # Ours [in, 3H] with gates (r, z, n) on the output axis; PyTorch [3H, in], same order.
      getattr(twin.gru, f"weight_ih_l0{suffix}").copy_(_t(params[f"input_{ours}/kernel"].T))
      getattr(twin.gru, f"bias_ih_l0{suffix}").copy_(_t(params[f"input_{ours}/bias"]))
      getattr(twin.gru, f"weight_hh_l0{suffix}").copy_(_t(params[f"state_{ours}/kernel"].T))
      getattr(twin.gru, f"bias_hh_l0{suffix}").copy_(_t(params[f"state_{ours}/bias"]))
    twin.linear.weight.copy_(_t(params["head/kernel"].T))  # both flatten [L, 2H] step-major
    twin.linear.bias.copy_(_t(params["head/bias"]))
  x_BxL = rng.normal(size=(6, 40))
  expected = twin(_t(x_BxL)).detach().numpy()
  got = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x_BxL, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_linear_equals_the_authors_linear_base():
  model = _build("linear", (40,))
  params = _params(model)
  assert sum(p.size for p in params.values()) == 410  # LinearBase's parameter count
  twin = torch.nn.Linear(40, 10).double()
  with torch.no_grad():
    twin.weight.copy_(_t(params["head/kernel"].T))
    twin.bias.copy_(_t(params["head/bias"]))
  x_BxL = np.random.default_rng(3).normal(size=(6, 40))
  expected = twin(_t(x_BxL)).detach().numpy()
  got = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(x_BxL, jnp.float32))
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("input_shape", [(40,), (17, 2)])
def test_mnist1d_cnn_im2col_equals_lax_conv(input_shape):
  """The same parameters give the same logits and gradients, also under vmap over members."""
  lax_model = _build("mnist1d_cnn", input_shape)
  im2col_model = _build("mnist1d_cnn", input_shape, conv="im2col")
  np.testing.assert_equal(_params(im2col_model), _params(lax_model))
  x_BxF = jnp.asarray(np.random.default_rng(4).normal(size=(5,) + input_shape), jnp.float32)
  y_B = jnp.arange(5) % 10

  def loss(model, x):
    logits = model(x)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(5), y_B]), logits

  grad_fn = nnx.jit(nnx.grad(loss, has_aux=True))
  (lax_grads, lax_logits), (im2col_grads, im2col_logits) = (
    grad_fn(lax_model, x_BxF),
    grad_fn(im2col_model, x_BxF),
  )
  np.testing.assert_allclose(im2col_logits, lax_logits, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(im2col_grads), jax.tree.leaves(lax_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  members_MxBxF = jnp.stack([x_BxF, 2 * x_BxF])
  graphdef, state = nnx.split(im2col_model)
  vmapped = jax.jit(jax.vmap(lambda x: nnx.merge(graphdef, state)(x)))(members_MxBxF)
  np.testing.assert_allclose(vmapped[1], lax_model(2 * x_BxF), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "name,input_shape",
  [
    ("linear", (4, 5)),
    ("mnist1d_gru", (7,)),
    ("mnist1d_gru", (7, 3)),
    ("mlp", (4, 5)),
    ("mnist1d_mlp", (4, 5)),
    ("cnn", (6, 6)),
    ("cnn", (6, 6, 3)),
    ("mnist1d_cnn", (17,)),
    ("mnist1d_cnn", (17, 2)),
  ],
)
def test_models_take_every_example_layout(name, input_shape):
  model = _build(name, input_shape, num_classes=3, hidden_dims=[8], channels=[4])
  logits = nnx.jit(lambda m, x: m(x))(model, jnp.ones((2,) + input_shape))
  assert logits.shape == (2, 3)


@pytest.mark.parametrize(
  "name,input_shape,layout",
  [("cnn", (40,), r"\[H, W\] or \[H, W, C\]"), ("mnist1d_cnn", (8, 8, 1), r"\[L\] or \[L, C\]")],
)
def test_model_refuses_examples_of_the_wrong_rank(name, input_shape, layout):
  with pytest.raises(ValueError, match=rf"model.name '{name}' needs examples of shape {layout}"):
    build_model(ModelConfig(name=name), input_shape=input_shape, num_classes=3, seed=0)
