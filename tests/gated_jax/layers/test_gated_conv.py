"""BaseConv and Dauphin et al.'s gated convolutions (gated_jax/layers/gated_conv.py): the forward against a
numpy transcription (Zoology's ``BaseConv``: ``Linear`` times a depthwise ``Conv1d`` left-padded by K - 1,
plus the input; arXiv 1612.08083 eq. 1-2 for the gates), decode (prefill + token by token) against the full
forward, packed segments, causality, bad arguments."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from gated_jax.layers import MIXERS
from gated_jax.layers.gated_conv import GATES

B, T, D = 2, 9, 8
X = np.random.default_rng(0).normal(size=(B, T, D)).astype(np.float32)

pytestmark = pytest.mark.usefixtures("fast_compile")


def causal_windows(x, taps):
  """``(K, B, T, D)``: window ``i`` is ``x`` shifted right by ``K - 1 - i`` (zeros before the start)."""
  padded = np.pad(x, ((0, 0), (taps - 1, 0), (0, 0)))
  return np.stack([padded[:, i:i + x.shape[1]] for i in range(taps)])


def numpy_base_conv(p, x, activation):
  conv = np.einsum("kbtd,kd->btd", causal_windows(x, p["conv"]["kernel"].shape[0]), p["conv"]["kernel"])
  conv = conv + p["conv"]["bias"]
  proj = x @ p["proj"]["kernel"] + p["proj"]["bias"]
  if activation:
    silu = lambda a: a / (1 + np.exp(-a))
    conv, proj = silu(conv), silu(proj)
  return proj * conv + x


def numpy_gated_conv(p, x, gate):
  h = np.einsum("kbtd,kdne->bnte", causal_windows(x, p["kernel"].shape[0]), p["kernel"]) + p["bias"][:, None]
  a, b = h[:, 0], h[:, -1]
  sigmoid = 1 / (1 + np.exp(-b))
  return {"glu": a * sigmoid, "gtu": np.tanh(a) * sigmoid, "bilinear": a * b, "relu": np.maximum(a, 0),
          "tanh": np.tanh(a), "linear": a}[gate]


def init_params(layer):
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(1), jnp.asarray(X))["params"])
  # Spread every parameter so that biases and both factors matter.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  return jax.tree.unflatten(tree, [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


@pytest.mark.parametrize("activation", [False, True])
def test_base_conv_matches_numpy(activation):
  layer = MIXERS.get("base_conv")(d_model=D, num_heads=1, activation=activation)
  params = init_params(layer)
  expected = numpy_base_conv(jax.tree.map(np.asarray, params), X, activation)
  np.testing.assert_allclose(layer.apply({"params": params}, jnp.asarray(X)), expected, rtol=1e-5, atol=1e-5)


def test_gated_conv_gates_match_numpy():
  for gate in GATES:
    layer = MIXERS.get("gated_conv")(d_model=D, num_heads=1, gate=gate, kernel_size=3)
    params = init_params(layer)
    expected = numpy_gated_conv(jax.tree.map(np.asarray, params), X, gate)
    got = layer.apply({"params": params}, jnp.asarray(X))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=gate)


def test_default_inits():
  base = nn.meta.unbox(MIXERS.get("base_conv")(d_model=64, num_heads=1).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4, 64)))["params"])
  assert abs(float(jnp.std(base["proj"]["kernel"])) - 0.02) < 0.002  # Zoology: Linear N(0, 0.02)
  assert float(jnp.max(jnp.abs(base["conv"]["kernel"]))) <= 3 ** -0.5  # PyTorch Conv1d U(-1/sqrt(3), ..)
  glu = nn.meta.unbox(MIXERS.get("gated_conv")(d_model=64, num_heads=1).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4, 64)))["params"])
  assert abs(float(jnp.std(glu["kernel"])) - (4 / (4 * 64)) ** 0.5) < 0.01  # fairseq GCNN init


@pytest.mark.parametrize("name, kwargs", [("base_conv", {}), ("gated_conv", {"gate": "gtu"})])
def test_decode_segments_and_causality(name, kwargs):
  layer = MIXERS.get(name)(d_model=D, num_heads=1, **kwargs)
  x = jnp.asarray(X)
  variables = layer.init(jax.random.PRNGKey(1), x, decode=True)  # eager: cheaper than compiling at this size
  params = variables["params"]
  apply = layer.apply
  full = apply({"params": params}, x)
  step = lambda cache, chunk: layer.apply({"params": params, "cache": cache}, chunk, decode=True, mutable=["cache"])
  cache, outs = variables["cache"], []
  for start, stop in [(0, 4)] + [(t, t + 1) for t in range(4, T)]:
    y, updates = step(cache, x[:, start:stop])
    cache = updates["cache"]
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
  assert int(cache["cache_index"]) == T
  # Packed: a second segment starting at token 4 sees nothing of the first.
  segments = jnp.asarray([[1] * 4 + [2] * (T - 4)] * B)
  packed = apply({"params": params}, x, segment_ids=segments)
  np.testing.assert_allclose(packed[:, 4:], apply({"params": params}, x[:, 4:]), rtol=1e-5, atol=1e-5)
  # Causal: changing the last token changes only the last output.
  changed = apply({"params": params}, x.at[:, -1].add(1.0))
  np.testing.assert_allclose(changed[:, :-1], full[:, :-1], rtol=1e-6, atol=1e-6)
  assert not np.allclose(changed[:, -1], full[:, -1])


@pytest.mark.parametrize("name, kwargs, match", [
    ("base_conv", {"kernel_size": 0}, "kernel_size"),
    ("base_conv", {"activation": "silu"}, "activation"),
    ("base_conv", {"init_std": 0.0}, "init_std"),
    ("gated_conv", {"gate": "swiglu"}, "gate"),
    ("gated_conv", {"init_std": -1.0}, "init_std"),
])
def test_bad_fields_raise(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    MIXERS.get(name)(d_model=D, num_heads=1, **kwargs)


def test_bad_inputs_raise():
  layer = MIXERS.get("gated_conv")(d_model=D, num_heads=1)
  with pytest.raises(ValueError, match="x_BTD"):
    jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.zeros((B, T, D + 1)))
  with pytest.raises(ValueError, match="segment_ids"):
    jax.eval_shape(functools.partial(layer.init, segment_ids=jnp.zeros((B, T - 1), jnp.int32)),
                   jax.random.PRNGKey(0), jnp.zeros((B, T, D)))
