"""Contract tests shared by every gated linear-attention mixer, and RetNet/Lightning decays and errors."""

from __future__ import annotations

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gated_jax.layers import MIXERS
from gated_jax.layers.linear_attention import Lightning, RetNet

D, H = 16, 2
CAUSAL = {
    "linear_attention": dict(feature_map="elu_plus_one", use_short_conv=True, qk_norm=True),
    "retnet": {},
    "lightning": dict(layer_idx=1, num_layers=3),
    "gla": dict(use_short_conv=True),
    "hgrn2": dict(lower_bound=0.3),
    "deltanet": dict(output_gate="swish"),
    "gated_deltanet": {},
    "mlstm": dict(igate_bias_init=0.0),
    "gsa": dict(num_slots=3),
}
NON_CAUSAL = {"lina": dict(max_len=16), "gla_bidirectional": dict(bidirectional=True)}
ALL = {**CAUSAL, **NON_CAUSAL}
LOGICAL_AXES = {"embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "expert", "state", None}


def make(case: str, **overrides):
  name = "gla" if case == "gla_bidirectional" else case
  return MIXERS.get(name)(d_model=D, num_heads=H, **{**ALL[case], **overrides})


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
  """Tiny shapes: XLA optimisation passes cost far more than they save (as flax's lm1b train_test)."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


# Two packed rows [A, B] and [B, A] (A: 3 tokens, B: 4), positions restarting in each segment.
SEGMENTS = jnp.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 2, 2, 2]])
POSITIONS = jnp.array([[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 0, 1, 2]])
CHUNKS = ((0, 3), (3, 4), (4, 5), (5, 6), (6, 7))  # decode: a 3-token prefill, then one token at a time


def packed_inputs():
  a, b = jnp.split(jax.random.normal(jax.random.PRNGKey(0), (1, 7, D)), [3], axis=1)
  return jnp.concatenate([jnp.concatenate([a, b], 1), jnp.concatenate([b, a], 1)], axis=0)


@pytest.fixture(scope="module", params=sorted(ALL))
def run(request):
  """Everything a case needs, computed with few compilations: init (with the decode cache when causal),
  one jitted forward+backward giving the plain and the packed outputs and the gradients, and decode."""
  name = request.param
  mixer, x = make(name), packed_inputs()
  causal = name in CAUSAL
  variables = jax.jit(functools.partial(mixer.init, decode=causal))(jax.random.PRNGKey(1), x)

  def loss(params):
    y = mixer.apply({"params": params}, x)
    y_packed = mixer.apply({"params": params}, x, segment_ids=SEGMENTS, positions=POSITIONS)
    return jnp.sum(y ** 2) + jnp.sum(y_packed ** 2), (y, y_packed)

  grads, (y, y_packed) = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  decoded = None
  if causal:
    step = jax.jit(lambda v, x_chunk: mixer.apply(v, x_chunk, decode=True, mutable=["cache"]))
    cache, decoded = variables["cache"], []
    for start, stop in CHUNKS:
      y_chunk, updates = step({"params": variables["params"], "cache": cache}, x[:, start:stop])
      cache = updates["cache"]
      decoded.append(y_chunk)
    decoded = (jnp.concatenate(decoded, axis=1), cache)
  return types.SimpleNamespace(name=name, mixer=mixer, x=x, variables=variables, grads=grads, y=y,
                               y_packed=y_packed, decoded=decoded)


def test_shape_dtype_and_logical_axes(run):
  assert run.y.shape == (2, 7, D) and run.y.dtype == jnp.float32
  assert np.all(np.isfinite(run.y))
  params = run.variables["params"]
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
    assert isinstance(leaf, nn.LogicallyPartitioned), f"{run.name} {path}: no logical axes"
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= LOGICAL_AXES, (path, leaf.names)
  bf16 = make(run.name, dtype=jnp.bfloat16)
  out = jax.eval_shape(bf16.apply, run.variables, run.x.astype(jnp.bfloat16))
  assert out.shape == (2, 7, D) and out.dtype == jnp.bfloat16


def test_gradients_finite_and_reach_every_parameter(run):
  for path, g in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(run.grads))[0]:
    assert np.all(np.isfinite(g)), (run.name, path)
    assert np.any(g != 0), (run.name, path)


def test_packed_segments_equal_separate_sequences(run):
  a_after_b, b_after_a = run.y_packed[1, 4:], run.y_packed[0, 3:]
  a_first, b_first = run.y_packed[0, :3], run.y_packed[1, :4]
  np.testing.assert_allclose(a_after_b, a_first, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(b_after_a, b_first, atol=2e-5, rtol=2e-5)
  if run.name in CAUSAL:  # a causal prefix is the sequence alone: compare with the unpacked call
    np.testing.assert_allclose(a_first, run.y[0, :3], atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(b_first, run.y[1, :4], atol=2e-5, rtol=2e-5)
  else:
    assert not np.allclose(run.y[0, :3], a_first, atol=1e-3)  # non-causal: B leaks in without segments


def test_decode_matches_full_sequence(run):
  if run.decoded is None:
    with pytest.raises(ValueError, match="decode"):
      jax.eval_shape(functools.partial(run.mixer.init, decode=True), jax.random.PRNGKey(1), run.x)
    return
  decoded, cache = run.decoded
  np.testing.assert_allclose(decoded, run.y, atol=1e-4, rtol=1e-4)
  assert int(cache["cache_index"]) == 7
  for leaf in jax.tree.leaves({k: v for k, v in cache.items() if k != "cache_index"}):
    assert leaf.dtype in (jnp.float32,), leaf.dtype


def test_retnet_and_lightning_decays():
  np.testing.assert_allclose(np.exp(RetNet(d_model=16, num_heads=4).log_gamma()),
                             [1 - 2.0 ** -5, 1 - 2.0 ** -6, 1 - 2.0 ** -7, 1 - 2.0 ** -8])
  np.testing.assert_allclose(Lightning(d_model=16, num_heads=4, layer_idx=1, num_layers=4).log_gamma(),
                             [0.0, -1.5, -3.0, -4.5])
  np.testing.assert_allclose(Lightning(d_model=16, num_heads=4, layer_idx=0, num_layers=4).log_gamma()[1], -2.0)


@pytest.mark.parametrize("name, kwargs, match", [
    ("linear_attention", dict(feature_map="cosine"), "feature_map"),
    ("linear_attention", dict(output_gate="tanh"), "output_gate"),
    ("linear_attention", dict(expand_k=0.3), "expand_k"),
    ("linear_attention", dict(conv_size=0), "conv_size"),
    ("retnet", dict(expand_v=-1.0), "expand_v"),
    ("lightning", dict(layer_idx=3, num_layers=3), "layer_idx"),
    ("lightning", dict(num_layers=0), "num_layers"),
])
def test_bad_fields_raise(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    MIXERS.get(name)(d_model=D, num_heads=H, **kwargs)


def test_bad_inputs_raise():
  mixer, x = make("retnet"), packed_inputs()
  with pytest.raises(ValueError, match="x_BTD"):
    jax.eval_shape(mixer.init, jax.random.PRNGKey(1), jnp.zeros((2, 7, D + 1)))
  with pytest.raises(ValueError, match="segment_ids"):
    jax.eval_shape(functools.partial(mixer.init, segment_ids=jnp.zeros((2, 6), jnp.int32)), jax.random.PRNGKey(1), x)
