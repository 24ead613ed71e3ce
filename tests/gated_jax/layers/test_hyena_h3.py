"""Hyena and H3 (gated_jax/layers/hyena.py, h3.py): the forward against numpy transcriptions of the papers'
operators (Hyena arXiv 2302.10866 eq. 3-7 with Zoology's filter; H3 arXiv 2212.14052 §3.1 with the S4D kernel
checked against the diagonal SSM run as a recurrence), decode (prefill + token by token) against the full
forward, packed segments, causality, bad arguments."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from gated_jax.layers import MIXERS
from gated_jax.layers.h3 import s4d_kernel

B, T, D, MAX_LEN = 2, 9, 8, 12
X = np.random.default_rng(0).normal(size=(B, T, D)).astype(np.float32)
H3_KWARGS = {"head_dim": 2, "state_size": 6}

pytestmark = pytest.mark.usefixtures("fast_compile")


def init_params(layer):
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(1), jnp.asarray(X))["params"])
  # Spread every parameter so that each term matters (Zoology's N(0, 0.02) leaves the filter near 0).
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  return jax.tree.unflatten(tree, [l + 0.3 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def causal_conv(u, kernel):
  """``y_t = sum_{s <= t} kernel_{t-s} u_s`` per channel (``kernel`` ``(taps, C)``, zero past its taps)."""
  seq = u.shape[1]
  kernel = np.concatenate([kernel, np.zeros((seq, kernel.shape[1]))])
  lags = np.arange(seq)[:, None] - np.arange(seq)[None, :]
  toeplitz = np.where((lags >= 0)[..., None], kernel[np.clip(lags, 0, None)], 0.0)
  return np.einsum("tsc,bsc->btc", toeplitz, u)


def linear(p, x):
  return x @ p["kernel"] + p.get("bias", 0.0)


def numpy_hyena(p, x):
  z_t = np.linspace(0, 1, MAX_LEN)[:T, None]
  w = 2 * np.pi * np.arange(MAX_LEN)[:T, None] / MAX_LEN
  z = np.concatenate([z_t, np.cos(1e-4 * w), -np.sin(1e-4 * w)], 1)  # one band, f = 1e-4
  f = p["filter"]
  h = np.sin(f["frequency"] * linear(f["in"], z))
  h = np.sin(f["frequency"] * linear(f["inner_0"], h))
  h = np.sin(f["frequency"] * linear(f["inner_1"], h))
  rates = -np.linspace(np.log(1e-2) / 1.5, np.log(1e-2) / 0.3, D)
  long_filter = linear(f["out"], h) * np.exp(-z_t * rates)
  proj = linear(p["in_proj"], x)
  short = causal_conv(proj, p["short_conv"]["kernel"][::-1]) + p["short_conv"]["bias"]  # tap K-1 is lag 0
  x1, x2, v = np.split(short, 3, axis=-1)
  v = x1 * v
  v = causal_conv(v, long_filter) + p["skip"] * v
  return linear(p["out_proj"], x2 * v)


def numpy_diag_ssm_kernel(p, length):
  """The S4D kernel by running the ZOH-discretised complex diagonal SSM on an impulse: ``h_t = Ā h_{t-1} +
  B̄ δ_t``, ``y_t = 2 Re(C h_t)``, ``Ā = e^{ΔA}``, ``B̄ = (Ā - 1) / A``."""
  a = -np.exp(p["log_neg_a_real"]) + 1j * p["a_imag"]
  a_bar = np.exp(np.exp(p["log_dt"])[:, None] * a)
  state, out = (a_bar - 1) / a, []
  for _ in range(length):
    out.append(2 * np.sum((p["c"][..., 0] + 1j * p["c"][..., 1]) * state, axis=1).real)
    state = a_bar * state
  return np.stack(out)


def numpy_h3(p, x):
  heads, pdim = D // 2, 2
  q, k, v = (linear(p[n], x) for n in ("q_proj", "k_proj", "v_proj"))
  k = causal_conv(k, p["shift_kernel"]) + p["shift_skip"] * k
  kv = (k.reshape(B, T, heads, pdim, 1) * v.reshape(B, T, heads, 1, pdim)).reshape(B, T, -1)
  diag = np.repeat(numpy_diag_ssm_kernel(p, T), pdim * pdim, axis=1)
  y = causal_conv(kv, diag) + np.repeat(p["diag_skip"], pdim * pdim) * kv
  o = np.einsum("bthi,bthij->bthj", q.reshape(B, T, heads, pdim), y.reshape(B, T, heads, pdim, pdim))
  return linear(p["out_proj"], o.reshape(B, T, D))


def test_s4d_kernel_is_the_diagonal_ssm_impulse_response():
  layer = MIXERS.get("h3")(d_model=D, num_heads=1, max_len=MAX_LEN, **H3_KWARGS)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), init_params(layer))
  got = s4d_kernel(*(jnp.asarray(p[n], jnp.float32) for n in ("log_dt", "log_neg_a_real", "a_imag", "c")), T)
  np.testing.assert_allclose(got, numpy_diag_ssm_kernel(p, T), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, kwargs, numpy_fn", [("hyena", {}, numpy_hyena), ("h3", H3_KWARGS, numpy_h3)])
def test_forward_matches_numpy(name, kwargs, numpy_fn):
  layer = MIXERS.get(name)(d_model=D, num_heads=1, max_len=MAX_LEN, **kwargs)
  params = init_params(layer)
  expected = numpy_fn(jax.tree.map(lambda a: np.asarray(a, np.float64), params), X.astype(np.float64))
  got = jax.jit(layer.apply)({"params": params}, jnp.asarray(X))
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())


@pytest.mark.parametrize("name, kwargs", [("hyena", {}), ("h3", H3_KWARGS)])
def test_decode_segments_and_causality(name, kwargs):
  layer = MIXERS.get(name)(d_model=D, num_heads=1, max_len=MAX_LEN, **kwargs)
  x = jnp.asarray(X)
  params = init_params(layer)
  cache = layer.init(jax.random.PRNGKey(1), jnp.zeros((B, MAX_LEN, D)), decode=True)["cache"]
  apply = jax.jit(lambda x, segment_ids=None: layer.apply({"params": params}, x, segment_ids=segment_ids))
  step = jax.jit(lambda cache, chunk: layer.apply({"params": params, "cache": cache}, chunk, decode=True,
                                                  mutable=["cache"]))
  full, outs = apply(x), []
  for start, stop in [(0, 4)] + [(t, t + 1) for t in range(4, T)]:
    y, updates = step(cache, x[:, start:stop])
    cache = updates["cache"]
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-4 * float(jnp.abs(full).max()))
  assert int(cache["cache_index"]) == T
  # Packed: a second segment starting at token 4 sees nothing of the first.
  packed = apply(x, jnp.asarray([[1] * 4 + [2] * (T - 4)] * B))
  alone = layer.apply({"params": params}, x[:, 4:])
  np.testing.assert_allclose(packed[:, 4:], alone, rtol=1e-4, atol=1e-4 * float(jnp.abs(alone).max()))
  # Causal: changing token 5 changes nothing before it, and the outputs after it.
  changed = apply(x.at[:, 5].add(1.0))
  np.testing.assert_allclose(changed[:, :5], full[:, :5], rtol=1e-6, atol=1e-6)
  assert not np.allclose(changed[:, -1], full[:, -1])


@pytest.mark.parametrize("name, kwargs, match", [
    ("hyena", {"max_len": 0}, "max_len"),
    ("hyena", {"filter_options": {"num_inner": -1}}, "num_inner"),
    ("hyena", {"filter_options": {"decay_target": 1.5}}, "decay_target"),
    ("hyena", {"filter_options": {"width": 8}}, "filter_options"),
    ("hyena", {"init_std": 0.0}, "init_std"),
    ("h3", {"head_dim": 3}, "head_dim"),
    ("h3", {"state_size": 5}, "state_size"),
    ("h3", {"dt_min": 0.5, "dt_max": 0.1}, "dt_min"),
])
def test_bad_fields_raise(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    MIXERS.get(name)(d_model=D, num_heads=1, **kwargs)


def test_bad_inputs_raise():
  layer = MIXERS.get("hyena")(d_model=D, num_heads=1, max_len=T - 1)
  with pytest.raises(ValueError, match="max_len"):
    jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.zeros((B, T, D)))
  segments = jnp.zeros((B, T - 1), jnp.int32)
  with pytest.raises(ValueError, match="segment_ids"):
    jax.eval_shape(functools.partial(layer.init, segment_ids=segments, decode=True), jax.random.PRNGKey(0),
                   jnp.zeros((B, T - 1, D)))
