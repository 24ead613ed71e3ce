"""Tests for gated_jax.layers.positional: RoPE vs an explicit numpy rotation, relative-position property."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from numpy import testing as npt

from gated_jax.layers import positional


def _np_rope(x, positions, base, rot):
  """Rotates channel pairs (i, i + rot/2) by 2x2 rotation matrices; channels >= rot pass through."""
  x = np.asarray(x, np.float64)
  out = x.copy()
  for i in range(rot // 2):
    theta = positions[..., None] * base ** (-2.0 * i / rot)  # (B, T, 1)
    c, s = np.cos(theta), np.sin(theta)
    a, b = x[..., i], x[..., i + rot // 2]
    out[..., i], out[..., i + rot // 2] = c * a - s * b, s * a + c * b
  return out


@settings(max_examples=4, deadline=None)
@given(fraction=st.sampled_from([1.0, 0.5, 0.25]), base=st.sampled_from([10000.0, 500.0]))
def test_rope_matches_numpy_rotation(fraction, base):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 3, 16))
  positions = np.array([[0, 1, 2, 3, 4], [7, 3, 100, 0, 9]])
  rope = jax.jit(positional.apply_rope, static_argnames=("base", "fraction"))
  y = rope(x, jnp.asarray(positions), base=base, fraction=fraction)
  rot = positional.rotary_dim(16, fraction)
  assert rot == int(16 * fraction)
  npt.assert_allclose(y, _np_rope(x, positions, base, rot), rtol=1e-5, atol=1e-5)
  npt.assert_array_equal(y[..., rot:], x[..., rot:])
  npt.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 8))
  k = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 8))
  rope = jax.jit(positional.apply_rope)
  score = lambda m, n: float(jnp.sum(rope(q, jnp.array([[m]])) * rope(k, jnp.array([[n]]))))  # noqa: E731
  npt.assert_allclose(score(5, 2), score(105, 102), rtol=1e-4)
  npt.assert_allclose(score(0, 3), score(40, 43), rtol=1e-4)
  assert abs(score(5, 2) - score(5, 4)) > 1e-3


def test_rope_keeps_dtype_and_default_positions():
  x = jnp.ones((2, 3, 1, 4), jnp.bfloat16)
  assert positional.apply_rope(x, positional.default_positions(2, 3)).dtype == jnp.bfloat16
  npt.assert_array_equal(positional.default_positions(2, 3, 5), [[5, 6, 7], [5, 6, 7]])


@pytest.mark.parametrize("call,match", [
    (lambda: positional.rotary_dim(16, 0.0), "fraction"),
    (lambda: positional.rotary_dim(16, 1.5), "fraction"),
    (lambda: positional.rotary_dim(4, 0.25), "fraction"),
    (lambda: positional.inverse_frequencies(4, 1.0), "base"),
    (lambda: positional.apply_rope(jnp.ones((1, 3, 1, 4)), jnp.zeros((1, 2), jnp.int32)), "positions_BT"),
    (lambda: positional.apply_rope(jnp.ones((3, 1, 4)), jnp.zeros((1, 3), jnp.int32)), "x_BTHK"),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
