"""The ``slstm`` mixer: prefill + token-by-token decode equals the full-sequence call, causality, packed
segments do not see each other, xLSTM's forget-bias initialisations, bad arguments. The mixer runs the op's
``reference`` (cheap to compile); ``xla`` equals it (``tests/pallas_kernels/test_slstm.py``)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gated_jax.layers import MIXERS
from gated_jax.layers.slstm import forget_bias

pytestmark = pytest.mark.usefixtures("fast_compile")
D, H, T = 16, 2, 9


@pytest.fixture(scope="module")
def mixer_and_params():
  mixer = MIXERS.get("slstm")(d_model=D, num_heads=H, layer_idx=1, num_layers=3, implementation="reference")
  x = jax.random.normal(jax.random.key(0), (2, T, D))
  params = nn.unbox(mixer.init(jax.random.key(1), x))["params"]
  # R is zero at init; a non-zero recurrent kernel exercises the memory mixing in every test.
  params["recurrent_kernel"] = 0.4 * jax.random.normal(jax.random.key(2), params["recurrent_kernel"].shape)
  return mixer, params, x


def test_decode_matches_full_sequence(mixer_and_params):
  mixer, params, x = mixer_and_params
  full = jax.jit(mixer.apply)({"params": params}, x)
  cache = nn.unbox(mixer.init(jax.random.key(1), x, decode=True))["cache"]
  step = jax.jit(lambda cache, x: mixer.apply({"params": params, "cache": cache}, x, decode=True, mutable=["cache"]))
  outputs = []
  for chunk in (x[:, :4],) + tuple(x[:, t:t + 1] for t in range(4, T)):
    y, variables = step(cache, chunk)
    outputs.append(y)
    cache = variables["cache"]
  np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, rtol=1e-5, atol=1e-5)
  assert int(cache["cache_index"]) == T


def test_causal_and_packed_segments(mixer_and_params):
  mixer, params, x = mixer_and_params
  apply = jax.jit(lambda x, segment_ids: mixer.apply({"params": params}, x, segment_ids=segment_ids))
  segment_ids = jnp.array([[0] * 5 + [1] * 4] * 2, jnp.int32)
  y = apply(x, segment_ids)
  changed = apply(x.at[:, 6:].set(3.0), segment_ids)
  np.testing.assert_array_equal(y[:, :6], changed[:, :6])
  assert not np.allclose(y[:, 6:], changed[:, 6:])
  # The second segment does not see the first (state and conv window restart at the segment boundary).
  alone = apply(x.at[:, :5].set(0.0), segment_ids)
  np.testing.assert_allclose(alone[:, 5:], y[:, 5:], rtol=1e-6, atol=1e-6)


def test_forget_bias_inits():
  first, last = forget_bias(8, "powerlaw_blockdependent", 0, 4), forget_bias(8, "powerlaw_blockdependent", 3, 4)
  np.testing.assert_allclose([first[0], first[-1], last[0], last[-1]], [5.0, -7.0, 5.0, -7.0])
  np.testing.assert_allclose(first[3], 5.0 - 12.0 * (3 / 7) ** 0.3)
  np.testing.assert_allclose(last[3], 5.0 - 12.0 * (3 / 7) ** 1.6)  # deeper layers keep more memory
  np.testing.assert_allclose(forget_bias(4, "linspace", 0, 1), [3.0, 4.0, 5.0, 6.0])


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=3), "num_heads: got 3"),
    (dict(conv_size=-1), "conv_size: got -1"),
    (dict(forget_gate="tanh"), "forget_gate: got 'tanh'"),
    (dict(forget_bias_init="zeros"), "forget_bias_init: got 'zeros'"),
    (dict(layer_idx=2, num_layers=2), r"layer_idx: got 2"),
    (dict(implementation="cuda"), "implementation: got 'cuda'"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    MIXERS.get("slstm")(**{"d_model": D, "num_heads": H, **kwargs})


def test_bad_input_width(mixer_and_params):
  mixer, params, x = mixer_and_params
  with pytest.raises(ValueError, match="x_BTD: got last dim 8"):
    mixer.apply({"params": params}, x[..., :8])
