"""Vision mixers against direct float64 numpy computations on small inputs (ViT attention, ConViT's GPSA and
its locality initialisation, ViG's locality-gated bidirectional GLA, the three shifted-window Manhattan-decay
attentions), ``pallas_kernels.biased_attention``, and bad arguments."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from gated_jax.layers.vision import VISION_MIXERS
from gated_jax.layers.vision import attention as vision_attention
from gated_jax.layers.vision import common as vision_common
from gated_jax.layers.vision import swin_rmt

pytestmark = pytest.mark.usefixtures("fast_compile")
B, D, H = 2, 8, 4


def _setup(name, grid, seed=0, **kwargs):
  """``(params as float64 numpy, x float64, y)`` of one random call (params perturbed away from their init)."""
  mixer = VISION_MIXERS.get(name)(d_model=D, num_heads=H, grid=grid, **kwargs)
  x = jax.random.normal(jax.random.key(seed), (B, grid[0] * grid[1], D))
  params = nn.unbox(mixer.init(jax.random.key(seed + 1), x))["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 2), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  y = mixer.apply({"params": params}, x)
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params), np.asarray(x, np.float64), y


def _softmax(s, axis=-1):
  e = np.exp(s - s.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _heads(p, x, name):
  out = np.einsum("bnd,dhk->bnhk", x, p[name]["kernel"])
  return out + p[name]["bias"] if "bias" in p[name] else out


def _out(p, o):
  return np.einsum("bnhk,hkd->bnd", o, p["out"]["kernel"]) + p["out"]["bias"]


def _attend(q, k, v):
  """Softmax attention over every token, per head: ``(B, N, H, K)``."""
  s = np.einsum("bihk,bjhk->bhij", q, k) / np.sqrt(q.shape[-1])
  return np.einsum("bhij,bjhk->bihk", _softmax(s), v)


@pytest.mark.slow  # the same computation is GPSA's content term (test_gpsa_mixes_content_and_position)
def test_vit_attention():
  p, x, y = _setup("vit", (3, 2))
  want = _out(p, _attend(*(_heads(p, x, n) for n in ("query", "key", "value"))))
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def test_gpsa_mixes_content_and_position():
  grid = (3, 3)
  p, x, y = _setup("convit", grid)
  q, k, v = (_heads(p, x, n) for n in ("query", "key", "value"))
  rows, cols = np.divmod(np.arange(9), 3)
  dx, dy = cols[None, :] - cols[:, None], rows[None, :] - rows[:, None]
  r = np.stack([dx, dy, dx ** 2 + dy ** 2], axis=-1)  # r_ij, offset of key j from query i
  positional = _softmax(np.einsum("ijc,ch->hij", r, p["pos_proj"]))
  gate = _sigmoid(p["gating_param"])[None, :, None]
  content = _attend(q, k, v)
  mixed = (1 - gate) * content + gate * np.einsum("hij,bjhk->bihk", positional, v)
  np.testing.assert_allclose(y, _out(p, mixed), rtol=1e-4, atol=1e-5)


def test_gpsa_locality_init_makes_each_head_a_conv_tap():
  """With locality strength alpha, head h's positional attention peaks at the key offset Delta_h of its centre;
  the four heads' centres tile a 2x2 square."""
  weights = vision_attention.local_position_weights(4, strength=5.0, distance=1.0)
  centres = {(weights[0, h] / 10.0, weights[1, h] / 10.0) for h in range(4)}
  assert centres == {(-0.5, -0.5), (0.5, -0.5), (-0.5, 0.5), (0.5, 0.5)} and np.all(weights[2] == -5.0)
  r = vision_attention.relative_offsets((5, 5))
  scores = np.einsum("ijc,ch->hij", r, weights)
  centre_token = 12  # (2, 2)
  for h in range(4):
    best = np.flatnonzero(scores[h, centre_token] == scores[h, centre_token].max())
    offsets = {(int(j % 5) - 2, int(j // 5) - 2) for j in best}  # (dx, dy) of the best keys
    want_x, want_y = weights[0, h] / 10.0, weights[1, h] / 10.0
    assert offsets == {(int(np.floor(want_x)), int(np.floor(want_y))), (int(np.ceil(want_x)), int(np.ceil(want_y))),
                       (int(np.floor(want_x)), int(np.ceil(want_y))), (int(np.ceil(want_x)), int(np.floor(want_y)))}


def _rms(o, scale, eps=1e-6):
  return o / np.sqrt(np.mean(o ** 2, axis=-1, keepdims=True) + eps) * scale


def _depthwise(x_BND, grid, kernel):
  """Zero-padded depthwise (cross-correlation) conv, ``kernel`` ``(k, k, D)``, one output pixel at a time."""
  size, half = kernel.shape[0], kernel.shape[0] // 2
  x = x_BND.reshape(x_BND.shape[0], *grid, -1)
  out = np.zeros_like(x)
  for r in range(grid[0]):
    for c in range(grid[1]):
      for i in range(size):
        for j in range(size):
          if 0 <= r + i - half < grid[0] and 0 <= c + j - half < grid[1]:
            out[:, r, c] += kernel[i, j] * x[:, r + i - half, c + j - half]
  return out.reshape(x_BND.shape)


@pytest.mark.parametrize("grid, size", [((4, 4), 5), ((2, 3), 3), ((7, 6), 3)])  # matrix, matrix, taps
def test_depthwise_conv_both_forms(grid, size):
  conv = vision_common.DepthwiseConv2D(grid, size)
  x = np.asarray(jax.random.normal(jax.random.key(0), (2, grid[0] * grid[1], 5)))
  p = nn.unbox(conv.init(jax.random.key(1), x))
  want = _depthwise(x, grid, np.asarray(p["params"]["kernel"]))
  np.testing.assert_allclose(conv.apply(p, x), want, rtol=1e-5, atol=1e-5)


def test_vig_locality_gate_and_bidirectional_gla():
  grid = (2, 3)
  p, x, y = _setup("vig", grid, implementation="reference")
  local = _depthwise(x, grid, p["conv"]["kernel"])
  local = local * _sigmoid(local)
  g = p["gla"]
  q, k, v = (np.einsum("bnd,dhk->bnhk", local, g[f"{n}_proj"]["kernel"]) for n in "qkv")
  logits = np.einsum("bnr,rshk->bnshk", local @ g["gk_down_proj"]["kernel"], g["gk_proj"]["kernel"])
  log_a = np.log(_sigmoid(logits + g["gk_proj"]["bias"])) / 16.0  # (B, N, direction, H, K)
  n = x.shape[1]
  o = np.zeros(v.shape)
  for t in range(n):  # forward: keys j <= t decayed by a_fwd[j+1..t]; backward: keys j >= t by a_bwd[t..j-1]
    for j in range(n):
      decay = np.exp(log_a[:, j + 1:t + 1, 0].sum(1)) if j <= t else 0.0
      decay = decay + (np.exp(log_a[:, t:j, 1].sum(1)) if j >= t else 0.0)
      score = np.einsum("bhk,bhk->bh", q[:, t] * decay, k[:, j]) / np.sqrt(q.shape[-1]) / 2
      o[:, t] += score[..., None] * v[:, j]
  gate = _sigmoid(np.einsum("bnd,dhk->bnhk", local, g["locality_gate"]["kernel"]) + g["locality_gate"]["bias"])
  eps = 1e-5  # the linear mixers' norm_eps (fla's)
  blended = (gate * _rms(o, g["o_norm"]["scale"], eps)
             + (1 - gate) * _rms(local.reshape(o.shape), g["local_norm"]["scale"], eps))
  want = np.einsum("bnhk,hkd->bnd", blended, g["o_proj"]["kernel"])
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


def _numpy_window_attention(q, k, v, grid, window, shift, log_gamma, normalizer, slopes=None):
  """Shifted-window, row-then-column decayed attention with loops over windows, rows and columns."""
  batch, _, heads, _ = q.shape
  roll = lambda t: np.roll(t.reshape(batch, *grid, *t.shape[2:]), (-shift, -shift), (1, 2))
  q, k, v = roll(q), roll(k), roll(v)
  region = np.zeros(grid, int)
  if shift:
    cuts = [(0, grid[0] - window), (grid[0] - window, grid[0] - shift), (grid[0] - shift, grid[0])]
    for a, (r0, r1) in enumerate(cuts):
      for b, (c0, c1) in enumerate(cuts):
        region[r0:r1, c0:c1] = 3 * a + b

  def one_pass(q_line, k_line, v_line, regions):  # (B, L, H, K) tokens on one line of a window
    s = np.einsum("bihk,bjhk->bhij", q_line, k_line) / np.sqrt(q_line.shape[-1])
    distance = np.abs(np.arange(len(regions))[:, None] - np.arange(len(regions))[None, :])
    visible = regions[:, None] == regions[None, :]
    if normalizer == "softmax":
      w = _softmax(np.where(visible, s + log_gamma[:, None, None] * distance, -np.inf))
    else:
      w = _sigmoid(s + slopes[:, None, None] * distance) * np.exp(log_gamma[:, None, None] * distance) * visible
    return np.einsum("bhij,bjhk->bihk", w, v_line)

  def every_row(q, k, v, region):  # one pass along each row of each window
    out = np.zeros(v.shape)
    for r0 in range(0, region.shape[0], window):
      for c0 in range(0, region.shape[1], window):
        cs = slice(c0, c0 + window)
        for r in range(r0, r0 + window):
          out[:, r, cs] = one_pass(q[:, r, cs], k[:, r, cs], v[:, r, cs], region[r, cs])
    return out

  rows_out = every_row(q, k, v, region)
  t = lambda a: np.swapaxes(a, 1, 2)  # columns as rows
  out = t(every_row(t(q), t(k), t(rows_out), region.T))
  return np.roll(out, (shift, shift), (1, 2)).reshape(batch, -1, heads, v.shape[-1])


@pytest.mark.parametrize("name, layer_idx", [("gated_swin_rmt_retention", 1), ("gated_swin_rmt_swat", 1),
                                             pytest.param("swin_rmt", 0, marks=pytest.mark.slow)])
def test_swin_rmt_variants(name, layer_idx):
  grid, window = (4, 4), 2
  p, x, y = _setup(name, grid, window=window, layer_idx=layer_idx)
  q, k, v = (_heads(p, x, n) for n in ("query", "key", "value"))
  log_gamma = np.log1p(-(2.0 ** (-2.0 - 4.0 * np.arange(H) / H)))
  shift = window // 2 if layer_idx % 2 else 0
  if name == "gated_swin_rmt_swat":
    v = _heads(p, x, "value_gate") * _sigmoid(_heads(p, x, "value_gate")) * v
    slopes = np.array([-2.0 ** -4, -2.0 ** -8, 2.0 ** -4, 2.0 ** -8])
    o = _numpy_window_attention(q, k, v, grid, window, shift, log_gamma, "sigmoid", slopes)
    o = _rms(o, p["o_norm"]["scale"])
  else:
    o = _numpy_window_attention(q, k, v, grid, window, shift, log_gamma, "softmax")
    o = o + _depthwise(v.reshape(x.shape), grid, p["lce"]["kernel"]).reshape(o.shape)
    if name == "gated_swin_rmt_retention":
      o = o * _sigmoid(_heads(p, x, "gate"))
  np.testing.assert_allclose(y, _out(p, o), rtol=1e-4, atol=1e-5)


def test_swin_layout_and_regions():
  assert swin_rmt.window_layout((8, 8), 4, 3) == (4, 2)
  assert swin_rmt.window_layout((4, 4), 4, 1) == (4, 0)  # the map is one window: no shift (global attention)
  regions = swin_rmt.region_ids((4, 4), 2, 1)
  assert regions[0, 0] == 0 and regions[2, 2] == 4 and regions[3, 3] == 8 and len(np.unique(regions)) == 9
  np.testing.assert_allclose(swin_rmt.balanced_alibi_slopes(4), [-2.0 ** -4, -2.0 ** -8, 2.0 ** -4, 2.0 ** -8])


def test_biased_attention_against_numpy():
  keys = jax.random.split(jax.random.key(3), 6)
  q, k, v = (jax.random.normal(kk, (2, 5, 3, 4)) for kk in keys[:3])
  bias = jax.random.normal(keys[3], (3, 5, 5))
  weight = jax.random.uniform(keys[4], (2, 3, 5, 5))
  mask = jax.random.uniform(keys[5], (2, 5, 5)) > 0.3
  mask = mask.at[:, jnp.arange(5), jnp.arange(5)].set(True)
  q64, k64, v64, b64, w64, m64 = (np.asarray(a, np.float64) for a in (q, k, v, bias, weight, mask))
  s = np.einsum("bihk,bjhk->bhij", q64, k64) / 2.0 + b64
  for normalizer, implementation in (("softmax", "reference"), ("softmax", "xla"), ("sigmoid", "xla")):
    p = _softmax(np.where(m64[:, None] > 0, s, -np.inf)) if normalizer == "softmax" else _sigmoid(s) * m64[:, None]
    want = np.einsum("bhij,bjhk->bihk", p * w64, v64)
    got = pallas_kernels.biased_attention(q, k, v, bias=bias, weight=weight, mask=mask, normalizer=normalizer,
                                          implementation=implementation)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  bf16 = pallas_kernels.biased_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), bias=bias)
  assert bf16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf16, np.float32), pallas_kernels.biased_attention(q, k, v, bias=bias),
                             rtol=5e-2, atol=5e-2)
  positional = pallas_kernels.biased_attention(None, None, v, bias=bias)  # scores from the bias alone
  np.testing.assert_allclose(positional, np.einsum("hij,bjhk->bihk", _softmax(np.asarray(bias, np.float64)), v64),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, match", [
    (lambda v: pallas_kernels.biased_attention(None, None, v), "bias: got None"),
    (lambda v: pallas_kernels.biased_attention(v, None, v, bias=jnp.zeros((3, 5, 5))), "q, k: got q only"),
    (lambda v: pallas_kernels.biased_attention(v, v, v, bias=jnp.zeros((3, 4, 5))), r"bias: got shape \(3, 4, 5\)"),
    (lambda v: pallas_kernels.biased_attention(v, v, v, mask=jnp.ones((5, 5))), "mask: got float32"),
    (lambda v: pallas_kernels.biased_attention(v, v, v, normalizer="relu"), "normalizer: got 'relu'"),
])
def test_biased_attention_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call(jnp.zeros((2, 5, 3, 4)))


@pytest.mark.parametrize("name, kwargs, match", [
    ("convit", dict(num_heads=2), "num_heads: got 2; allowed: a square number"),
    ("swin_rmt", dict(window=3), "window: got 3; allowed: a divisor"),
    ("swin_rmt", dict(normalizer="relu"), "normalizer: got 'relu'"),
    ("vig", dict(conv_size=-1), "conv_size: got -1"),
    ("vit", dict(grid=(4,)), r"grid: got \(4,\)"),
    ("vit", dict(num_heads=3), "num_heads: got 3; allowed: a divisor"),
])
def test_bad_arguments(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    VISION_MIXERS.get(name)(**{"d_model": D, "num_heads": H, "grid": (4, 4), **kwargs})


def test_bad_input_shape():
  mixer = VISION_MIXERS.get("vit")(d_model=D, num_heads=H, grid=(2, 2))
  with pytest.raises(ValueError, match=r"x_BND: got shape \(1, 5, 8\); allowed: \(batch, 4, 8\)"):
    mixer.init(jax.random.key(0), jnp.zeros((1, 5, D)))
  with pytest.raises(ValueError, match="vision mixer: got 'nope'"):
    VISION_MIXERS.get("nope")
