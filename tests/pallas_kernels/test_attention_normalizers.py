"""Each normalizer's reference against its formula written directly in NumPy (float64), the mask semantics,
and a worked example: the weights that softmax, StableMax (arXiv 2501.04697 eq. 6), sparsemax (arXiv 1602.02068
eq. 2) and 1.5-entmax (arXiv 1905.05702 eq. 10) give the scores (-2, 0, 0.5)."""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

sys.path.insert(0, os.path.dirname(__file__))  # tests are not a package (--import-mode=importlib)
import _normalizer_formulas as formulas  # noqa: E402

import pallas_kernels  # noqa: E402
from pallas_kernels.attention import normalizers  # noqa: E402


pytestmark = pytest.mark.usefixtures("fast_compile")


def _stablemax(x):
  s = np.where(x >= 0, x + 1, 1 / (1 - np.minimum(x, 0)))
  return s / s.sum()


def _sparsemax(x):
  tau = formulas.bisect(lambda t: np.maximum(x - t, 0).sum(), x.max() - 1, x.max())
  return np.maximum(x - tau, 0)


def _entmax15(x):
  tau = formulas.bisect(lambda t: (np.maximum(x / 2 - t, 0) ** 2).sum(), x.max() / 2 - 1, x.max() / 2)
  return np.maximum(x / 2 - tau, 0) ** 2


SELECTIVE_C = math.exp(-math.exp(1.5))

# Formula per normalizer (defaults), on the visible scores x of one row; num_keys = S.
FORMULAS = {
    "softmax": lambda x, num_keys: formulas.softmax(x),
    "sigmoid": lambda x, num_keys: 1 / (1 + np.exp(-(x - np.log(num_keys)))),
    "softpick": lambda x, num_keys: np.maximum(np.exp(x) - 1, 0) / (np.abs(np.exp(x) - 1).sum() + 1e-6),
    "ssmax": lambda x, num_keys: formulas.softmax(np.log(len(x)) * x),
    "selective": lambda x, num_keys: formulas.softmax((1 + SELECTIVE_C * np.log(len(x))) * x),
    "stablemax": lambda x, num_keys: _stablemax(x),
    "relu": lambda x, num_keys: np.maximum(x, 0),
    "clipped_softmax": lambda x, num_keys: np.clip(1.025 * formulas.softmax(x) - 0.025, 0, 1),
    "self_adjust": lambda x, num_keys: x * formulas.softmax(x),
    "sparsemax": lambda x, num_keys: _sparsemax(x),
    "entmax15": lambda x, num_keys: _entmax15(x),
}


def _numpy_attention(q, k, v, formula, *, causal, window, offset, q_seg=None, kv_seg=None):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, seq, heads, dim = q.shape
  num_keys, kv_heads = k.shape[1:3]
  out = np.zeros((batch, seq, heads, v.shape[-1]))
  for b in range(batch):
    for t in range(seq):
      pos = offset + t
      keys = [j for j in range(num_keys)
              if (not causal or j <= pos) and (window is None or (pos - j if causal else abs(pos - j)) < window)
              and (q_seg is None or q_seg[b, t] == kv_seg[b, j])]
      for h in range(heads):
        kh = h // (heads // kv_heads)
        if keys:
          x = k[b, keys, kh] @ q[b, t, h] / math.sqrt(dim)
          out[b, t, h] = formula(x, num_keys) @ v[b, keys, kh]
  return out


@pytest.mark.parametrize("name", sorted(FORMULAS))
@pytest.mark.parametrize("mask", ["causal", "window", "segments"])
def test_reference_matches_numpy_formula(name, mask):
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q = 1.5 * jax.random.normal(ks[0], (2, 5, 4, 8))
  k = jax.random.normal(ks[1], (2, 7, 2, 8))
  v = jax.random.normal(ks[2], (2, 7, 2, 3))
  kwargs, q_seg, kv_seg = dict(causal=True, window=None), None, None
  if mask == "window":
    kwargs = dict(causal=False, window=3)
  elif mask == "segments":
    q_seg, kv_seg = np.array([[0, 0, 1, 1, 1]] * 2), np.array([[0, 0, 0, 1, 1, 1, 1]] * 2)
  got = pallas_kernels.attention(q, k, v, normalizer=name, implementation="reference", query_offset=2,
                                 segment_ids=None if q_seg is None else (jnp.asarray(q_seg), jnp.asarray(kv_seg)),
                                 **kwargs)
  want = _numpy_attention(q, k, v, FORMULAS[name], offset=2, q_seg=q_seg, kv_seg=kv_seg, **kwargs)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def _weights(scores, normalizer):
  """Attention weights of one query over keys with the given scores (q = 1, k = scores, v = one-hot)."""
  s = jnp.asarray(scores, jnp.float32)
  q = jnp.ones((1, 1, 1, 1))
  k = s.reshape(1, -1, 1, 1)
  v = jnp.eye(len(scores)).reshape(1, len(scores), 1, len(scores))
  return pallas_kernels.attention(q, k, v, normalizer=normalizer, causal=False, scale=1.0,
                                  implementation="reference")[0, 0, 0]


@pytest.mark.parametrize("name, expected", [
    ("softmax", [0.049, 0.359, 0.592]),
    ("stablemax", [0.118, 0.353, 0.529]),
    ("sparsemax", [0.0, 0.25, 0.75]),
    ("entmax15", [0.0, 0.326, 0.674]),
])
def test_worked_example_weights(name, expected):
  np.testing.assert_allclose(_weights([-2.0, 0.0, 0.5], name), expected, atol=1e-3)


def test_mask_semantics_causal_window_offset():
  """Uniform scores (q = 0) make softmax weights 1/n_i on exactly the visible keys."""
  q = jnp.zeros((1, 3, 1, 1))
  k = jnp.zeros((1, 5, 1, 1))
  v = jnp.eye(5).reshape(1, 5, 1, 5)
  got = pallas_kernels.attention(q, k, v, window=2, implementation="reference")[0, :, 0]  # offset 5 - 3 = 2
  expected = np.array([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]) / 2
  np.testing.assert_allclose(got, expected, atol=1e-7)


def test_softpick_masked_keys_stay_out_of_denominator():
  """A hidden key (large or small) changes nothing: not in the numerator, not in the |e^s - 1| sum."""
  q = jnp.ones((1, 1, 1, 1))
  v = jnp.eye(4).reshape(1, 4, 1, 4)
  for hidden in (-5.0, 0.3, 4.0):
    k = jnp.array([0.7, -1.0, 0.2, hidden]).reshape(1, 4, 1, 1)
    seg = (jnp.zeros((1, 1), jnp.int32), jnp.array([[0, 0, 0, 1]]))
    got = pallas_kernels.attention(q, k, v, normalizer="softpick", causal=False, scale=1.0, segment_ids=seg,
                                   implementation="reference")[0, 0, 0]
    x = np.array([0.7, -1.0, 0.2])
    want = np.maximum(np.exp(x) - 1, 0) / (np.abs(np.exp(x) - 1).sum() + 1e-6)
    np.testing.assert_allclose(got, np.append(want, 0.0), rtol=1e-6, atol=1e-7)


def test_sigmoid_bias_default_and_explicit():
  scores = [0.5, -1.0, 2.0, 0.0]
  x = np.array(scores)
  np.testing.assert_allclose(_weights(scores, "sigmoid"), 1 / (1 + np.exp(-(x - np.log(4)))), rtol=1e-6)
  np.testing.assert_allclose(_weights(scores, normalizers.Sigmoid(bias=0.5)), 1 / (1 + np.exp(-(x + 0.5))),
                             rtol=1e-6)


def test_clipped_softmax_parameters():
  scores = [3.0, 0.0, -1.0, 0.2]
  got = _weights(scores, normalizers.ClippedSoftmax(gamma=-0.1, zeta=1.2))
  np.testing.assert_allclose(got, np.clip(1.3 * formulas.softmax(np.array(scores)) - 0.1, 0, 1), rtol=1e-6, atol=1e-7)
  assert float(got[2]) == 0.0


@pytest.mark.parametrize("name", ["sparsemax", "entmax15"])
def test_sort_based_gradients_match_finite_differences(name):
  k = jnp.array([0.3, -0.4, 0.9, 0.1, 0.5]).reshape(1, 5, 1, 1)
  q = jnp.ones((1, 2, 1, 1))
  v = jax.random.normal(jax.random.PRNGKey(3), (1, 5, 1, 2))
  fn = lambda q, k, v: pallas_kernels.attention(q, k, v, normalizer=name, causal=False, scale=1.0,
                                                implementation="reference")
  check_grads(fn, (q, k, v), order=1, modes=["rev"], eps=1e-3, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("name", ["sparsemax", "entmax15"])
def test_sort_based_are_reference_only(name):
  """xla refuses them; auto (and an explicit sequence) fall back to reference with a FallbackWarning and give
  the formula's weights."""
  scores = [-2.0, 0.0, 0.5, 0.3]
  q = jnp.ones((1, 1, 1, 1))
  k = jnp.asarray(scores).reshape(1, 4, 1, 1)
  v = jnp.eye(4).reshape(1, 4, 1, 4)
  with pytest.raises(NotImplementedError, match=r'implementation="reference" or a sequence \("xla", "reference"\)'):
    pallas_kernels.attention(q, k, v, normalizer=name, implementation="xla")
  for implementation in (None, ("xla", "reference")):
    with pytest.warns(pallas_kernels.FallbackWarning, match=f"ran 'reference' after xla: normalizer '{name}'"):
      got = pallas_kernels.attention(q, k, v, normalizer=name, causal=False, scale=1.0,
                                     implementation=implementation)
    np.testing.assert_allclose(got[0, 0, 0], FORMULAS[name](np.array(scores), 4), rtol=1e-5, atol=1e-6)


def test_normalizer_registry_and_instances():
  assert set(normalizers.NORMALIZERS) == set(FORMULAS) | {"lssa", "adaptive_temperature", "entmax", "sinkhorn"}
  for name, cls in normalizers.NORMALIZERS.items():
    assert isinstance(normalizers.get(name), cls)
  custom = normalizers.Softpick(eps=1e-3)
  assert normalizers.get(custom) is custom
  with pytest.raises(ValueError, match="normalizer: got 'softmaxx'; allowed: .*'sparsemax'"):
    normalizers.get("softmaxx")


@pytest.mark.parametrize("make, field", [
    (lambda: normalizers.ClippedSoftmax(gamma=0.1), "ClippedSoftmax.gamma"),
    (lambda: normalizers.ClippedSoftmax(zeta=0.5), "ClippedSoftmax.zeta"),
    (lambda: normalizers.Softpick(eps=-1.0), "Softpick.eps"),
    (lambda: normalizers.Sigmoid(bias=float("nan")), "Sigmoid.bias"),
])
def test_bad_static_parameters(make, field):
  with pytest.raises(ValueError, match=field):
    make()


def test_parameterised_normalizers_are_pytrees():
  s = jnp.arange(1.0, 3.0)
  leaves = jax.tree.leaves(normalizers.SSMax(s=s))
  assert len(leaves) == 1 and leaves[0] is s
  assert jax.tree.leaves(normalizers.ClippedSoftmax(gamma=-0.2)) == []
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 2, 4))
  jitted = jax.jit(lambda norm: pallas_kernels.attention(q, q, q, normalizer=norm, implementation="reference"))
  np.testing.assert_allclose(jitted(normalizers.SSMax(s=s)),
                             pallas_kernels.attention(q, q, q, normalizer=normalizers.SSMax(s=s),
                                                      implementation="reference"), rtol=1e-6)


def test_ssmax_and_selective_row_scales():
  """SSMax with per-head s and Selective with a temperature against their formulas (n_i = i + 1, causal)."""
  ks = jax.random.split(jax.random.PRNGKey(1), 4)
  q = jax.random.normal(ks[0], (1, 4, 2, 3))
  k = jax.random.normal(ks[1], (1, 4, 2, 3))
  v = jax.random.normal(ks[2], (1, 4, 2, 2))
  s = np.array([0.5, 2.0])
  temp = np.asarray(1 + jax.random.uniform(ks[3], (1, 4, 2)))
  got_ss = pallas_kernels.attention(q, k, v, normalizer=normalizers.SSMax(s=jnp.asarray(s)),
                                    implementation="reference")
  got_sel = pallas_kernels.attention(q, k, v, implementation="reference",
                                     normalizer=normalizers.Selective(temperature=jnp.asarray(temp),
                                                                      position_scale=None))
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  for t in range(4):
    for h in range(2):
      x = kn[0, :t + 1, h] @ qn[0, t, h] / math.sqrt(3)
      np.testing.assert_allclose(got_ss[0, t, h], formulas.softmax(s[h] * np.log(t + 1) * x) @ vn[0, :t + 1, h],
                                 rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(got_sel[0, t, h], formulas.softmax(temp[0, t, h] * x) @ vn[0, :t + 1, h],
                                 rtol=1e-5, atol=1e-6)
