"""The second family of normalizers (LSSA/LSSAR, adaptive temperature, alpha-entmax, Sinkhorn) against their
formulas written directly in NumPy (float64): causal masks with a query offset, segments, GQA and a row that
sees no key; xla against reference (forward and gradients, float32 and bfloat16); the learnable alpha's
gradient against finite differences; the limits (alpha -> 1 softmax, alpha = 2 sparsemax, Sinkhorn's sums
-> 1); and the refusals (kernels, xla, causal Sinkhorn, bad arguments)."""

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
from pallas_kernels.attention import BlockSizes, normalizers  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_compile")

BATCH, SEQ, KEYS, HEADS, KV_HEADS, DIM = 2, 6, 9, 4, 2, 8
ALPHA = np.array([1.1, 1.5, 1.8, 2.0])
# Query segment 7 has no keys: row 2 of batch row 0 sees nothing.
SEGMENTS = (np.array([[0, 0, 7, 1, 1, 1], [0] * 3 + [1] * 3]), np.array([[0] * 4 + [1] * 5, [0] * 5 + [1] * 4]))
OFFSET = 3


def _entmax(x, alpha):
  z = (alpha - 1) * x
  tau = formulas.bisect(lambda t: (np.maximum(z - t, 0) ** (1 / (alpha - 1))).sum(), z.max() - 1, z.max())
  return np.maximum(z - tau, 0) ** (1 / (alpha - 1))


def _lssa(x):
  a = np.log1p(np.exp(math.log(64) * math.log(len(x)) * x))
  return a / a.sum()


def _lssar(x):
  a = _lssa(x)
  r = np.maximum(len(x) * a - (1.0 if len(x) > 3 else 0.0), 0) ** 15
  return r / r.sum() if r.sum() > 0 else a


def _adaptive(x):
  p = formulas.softmax(x)
  entropy = -(p * np.log(p + 1e-9)).sum()
  beta = max(1.0, np.polyval([-0.037, 0.481, -2.3, 4.917, -1.791], entropy)) if entropy > 0.5 else 1.0
  return formulas.softmax(beta * x)


# name -> (normalizer instance, formula(x, head), the scale the call uses)
CASES = {
    "lssa": (normalizers.LSSA(), lambda x, h: _lssa(x), 1.0),
    "lssar": (normalizers.LSSA(reweight=True), lambda x, h: _lssar(x), 1.0),
    "adaptive_temperature": ("adaptive_temperature", lambda x, h: _adaptive(x), None),
    "entmax": (normalizers.Entmax(alpha=jnp.asarray(ALPHA, jnp.float32)), lambda x, h: _entmax(x, ALPHA[h]), None),
}


def _inputs(dtype=jnp.float32, seq=SEQ, keys=KEYS, spread=1.5):
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  q = spread * jax.random.normal(ks[0], (BATCH, seq, HEADS, DIM))
  k = jax.random.normal(ks[1], (BATCH, keys, KV_HEADS, DIM))
  v = jax.random.normal(ks[2], (BATCH, keys, KV_HEADS, 3))
  return tuple(x.astype(dtype) for x in (q, k, v))


def _numpy(q, k, v, formula, scale):
  """Causal attention with query offset ``OFFSET``, segments and GQA, one row at a time."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  scale = scale or DIM ** -0.5
  out = np.zeros(q.shape[:3] + (v.shape[-1],))
  for b in range(BATCH):
    for t in range(SEQ):
      keys = [j for j in range(KEYS) if j <= OFFSET + t and SEGMENTS[0][b, t] == SEGMENTS[1][b, j]]
      for h in range(HEADS):
        if keys:
          kh = h // (HEADS // KV_HEADS)
          out[b, t, h] = formula(scale * k[b, keys, kh] @ q[b, t, h], h) @ v[b, keys, kh]
  return out


def _attend(q, k, v, name, implementation="reference", **kwargs):
  norm, _, scale = CASES[name]
  segments = tuple(jnp.asarray(x) for x in SEGMENTS)
  return pallas_kernels.attention(q, k, v, normalizer=norm, scale=scale, segment_ids=segments, query_offset=OFFSET,
                                  implementation=implementation, **kwargs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_numpy_formula(name):
  q, k, v = _inputs()
  got = np.asarray(_attend(q, k, v, name))
  np.testing.assert_allclose(got, _numpy(q, k, v, CASES[name][1], CASES[name][2]), rtol=2e-5, atol=2e-5)
  np.testing.assert_array_equal(got[0, 2], 0.0)  # the row that sees no key


def test_formulas_differ_where_they_should():
  """The cases above are not vacuous: the adaptive temperature is above 1 on some rows, the re-weighting
  changes LSSA, and alpha-entmax gives exact zeros among the visible keys."""
  q, k, v = _inputs()
  softmax = pallas_kernels.attention(q, k, v, segment_ids=tuple(jnp.asarray(x) for x in SEGMENTS),
                                     query_offset=OFFSET, implementation="reference")
  assert float(jnp.abs(_attend(q, k, v, "adaptive_temperature") - softmax).max()) > 1e-2
  assert float(jnp.abs(_attend(q, k, v, "lssar") - _attend(q, k, v, "lssa")).max()) > 1e-2
  eye = jnp.broadcast_to(jnp.eye(KEYS)[None, :, None], (BATCH, KEYS, KV_HEADS, KEYS))
  weights = np.asarray(_attend(q, k, eye, "entmax"))
  visible = _numpy(np.ones((BATCH, SEQ, HEADS, 1)), np.ones((BATCH, KEYS, KV_HEADS, 1)), np.asarray(eye),
                   lambda x, h: np.ones_like(x), 1.0) > 0
  assert np.sum((weights == 0) & visible) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name, dtype", [("adaptive_temperature", jnp.bfloat16), ("lssa", jnp.bfloat16),
                                         ("adaptive_temperature", jnp.float32)])
def test_xla_matches_reference_forward_and_gradients(name, dtype):
  """Several query and key blocks (T = 21, S = 37 with 8 x 16 tiles), GQA, segments and the empty row, with
  logits spread wide enough that the adaptive temperature is above 1 on some rows and 1 on others (slow; the
  default run has float32 in tests/pallas_kernels/test_attention.py, which covers every blockwise normalizer)."""
  q, k, v = _inputs(dtype, seq=21, keys=37, spread=3.0)
  segments = (jnp.asarray(np.r_[[0, 0, 7], [1] * 18][None].repeat(BATCH, 0)),
              jnp.asarray(np.r_[[0] * 15, [1] * 22][None].repeat(BATCH, 0)))
  norm, _, scale = CASES[name]
  do = jax.random.normal(jax.random.PRNGKey(5), (BATCH, 21, HEADS, 3)).astype(dtype)

  def run(implementation):
    fn = lambda q, k, v: pallas_kernels.attention(q, k, v, normalizer=norm, scale=scale, segment_ids=segments,
                                                  query_offset=16, implementation=implementation,
                                                  block_sizes=BlockSizes(8, 16, 8, 16))
    o, vjp = jax.vjp(fn, q, k, v)
    return (o,) + vjp(do)

  tolerance = 2e-5 if dtype == jnp.float32 else 3e-2
  for got, want in zip(jax.jit(lambda: run("xla"))(), jax.jit(lambda: run("reference"))()):
    assert got.dtype == want.dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("name", [pytest.param("lssar", marks=pytest.mark.slow), "entmax"])
def test_bfloat16_inputs_match_numpy_formula(name):
  """bfloat16 q, k, v (the formula sees the same rounded values): the output is the formula's, rounded."""
  q, k, v = (x.astype(jnp.bfloat16) for x in _inputs())
  got = _attend(q, k, v, name)
  assert got.dtype == jnp.bfloat16
  want = _numpy(q, k, v, CASES[name][1], CASES[name][2])
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2, atol=1e-2)


def _row_weights(scores, normalizer):
  """``normalizer.weights`` of one row of scores, every key visible (the contract the op builds on)."""
  s = jnp.asarray(scores, jnp.float32)
  return normalizers.get(normalizer).weights(s, jnp.ones(s.shape, bool))


def test_entmax_limits():
  """alpha = 2 is sparsemax and 1.5 is 1.5-entmax (the sort-based ones), alpha -> 1 tends to softmax."""
  x = [-2.0, 0.0, 0.5, 0.3]
  np.testing.assert_allclose(_row_weights(x, normalizers.Entmax(alpha=2.0)), _row_weights(x, "sparsemax"), atol=1e-6)
  np.testing.assert_allclose(_row_weights(x, normalizers.Entmax(alpha=1.5)), _row_weights(x, "entmax15"), atol=1e-6)
  near_one = _row_weights(x, normalizers.Entmax(alpha=1.01))
  np.testing.assert_allclose(near_one, formulas.softmax(np.array(x)), atol=5e-3)
  assert float(jnp.abs(near_one - formulas.softmax(np.array(x))).max()) < float(
      jnp.abs(_row_weights(x, normalizers.Entmax(alpha=1.1)) - formulas.softmax(np.array(x))).max())


def test_entmax_alpha_and_input_gradients_match_finite_differences():
  ks = jax.random.split(jax.random.PRNGKey(2), 3)
  q = jax.random.normal(ks[0], (1, 3, 2, 4))
  k = jax.random.normal(ks[1], (1, 5, 2, 4))
  v = jax.random.normal(ks[2], (1, 5, 2, 2))
  fn = jax.jit(lambda q, k, alpha: pallas_kernels.attention(q, k, v, normalizer=normalizers.Entmax(alpha=alpha),
                                                            causal=False, implementation="reference"))
  check_grads(fn, (q, k, jnp.array([1.3, 1.7])), order=1, modes=["rev"], eps=1e-3, atol=2e-2, rtol=2e-2)
  d_alpha = jax.grad(lambda a: jnp.sum(fn(q, k, a) ** 2))(jnp.array([1.3, 1.7]))
  assert np.all(np.abs(np.asarray(d_alpha)) > 1e-4)  # both heads receive a gradient


def _sinkhorn_numpy(s, iterations):
  """Alternating row / column normalisation of exp(s) (linear domain), rows first."""
  p = np.exp(np.asarray(s, np.float64))
  for i in range(iterations):
    p = p / p.sum(-1, keepdims=True) if i % 2 == 0 else p / p.sum(-2, keepdims=True) * p.shape[-2] / p.shape[-1]
  return p


def test_sinkhorn_matches_numpy_and_converges_to_doubly_stochastic():
  q, k, _ = _inputs(seq=KEYS)
  eye = jnp.broadcast_to(jnp.eye(KEYS)[None, :, None], (BATCH, KEYS, KV_HEADS, KEYS))
  scores = np.einsum("bthd,bshd->bhts", np.asarray(q, np.float64),
                     np.repeat(np.asarray(k, np.float64), 2, axis=2)) / math.sqrt(DIM)
  for iterations in (1, 3, 41):
    got = np.asarray(pallas_kernels.attention(q, k, eye, normalizer=normalizers.Sinkhorn(iterations), causal=False,
                                              implementation="reference")).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(got, _sinkhorn_numpy(scores, iterations), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(got.sum(-2), 1.0, atol=1e-3)
  softmax = pallas_kernels.attention(q, k, eye, causal=False, implementation="reference")
  np.testing.assert_allclose(pallas_kernels.attention(q, k, eye, normalizer=normalizers.Sinkhorn(1), causal=False,
                                                      implementation="reference"), softmax, atol=1e-6)


@pytest.mark.slow
def test_sinkhorn_key_mask():
  """Masked keys get 0 and the visible columns share the mass of the rows (8 rows over 6 keys: 4/3 each)."""
  q, k, v = _inputs(seq=8, keys=8)
  key_mask = jnp.array([[True] * 6 + [False] * 2, [True] * 8])
  eye = jnp.broadcast_to(jnp.eye(8)[None, :, None], (BATCH, 8, KV_HEADS, 8))
  got = np.asarray(pallas_kernels.attention(q, k, eye, normalizer=normalizers.Sinkhorn(61), causal=False,
                                            key_mask=key_mask, implementation="reference"))
  np.testing.assert_array_equal(got[0, :, :, 6:], 0.0)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(got[0].sum(0)[:, :6], 8 / 6, atol=1e-3)


@pytest.mark.slow
def test_sinkhorn_gradients_match_finite_differences():
  q, k, v = _inputs(seq=8, keys=8)
  key_mask = jnp.array([[True] * 6 + [False] * 2, [True] * 8])
  fn = jax.jit(lambda q, k, v: pallas_kernels.attention(q, k, v, normalizer="sinkhorn", causal=False,
                                                        key_mask=key_mask, implementation="reference"))
  check_grads(fn, (q, k, v), order=1, modes=["rev"], eps=1e-3, atol=2e-2, rtol=2e-2)


def test_lssar_zeroes_weights_below_uniform():
  """Rows with more than 3 keys keep only the keys above 1/n; rows with at most 3 keys keep every key."""
  scores = np.array([0.9, -0.2, 0.1, 0.5, -0.7])
  got = np.asarray(_row_weights(math.log(64) * math.log(5) * scores, normalizers.LSSA(reweight=True, power=3.0)))
  a = _lssa(scores)
  want = np.maximum(5 * a - 1, 0) ** 3
  np.testing.assert_allclose(got, want / want.sum(), rtol=1e-5, atol=1e-7)
  assert (got == 0).sum() == (a <= 1 / 5).sum() > 0
  assert np.all(np.asarray(_row_weights(scores[:3], normalizers.LSSA(reweight=True))) > 0)  # o_i = 0: all kept


@pytest.mark.parametrize("norm", [pytest.param(normalizers.LSSA(reweight=True), marks=pytest.mark.slow),
                                  normalizers.Entmax(), pytest.param(normalizers.Sinkhorn(), marks=pytest.mark.slow)])
def test_reference_only_normalizers_refused_by_xla_and_fall_back(norm):
  q = jnp.ones((1, 3, 1, 2))
  with pytest.raises(NotImplementedError, match="no blockwise .* in xla"):
    pallas_kernels.attention(q, q, q, normalizer=norm, causal=False, implementation="xla")
  with pytest.warns(pallas_kernels.FallbackWarning, match=f"ran 'reference' after xla: normalizer '{norm.name}'"):
    pallas_kernels.attention(q, q, q, normalizer=norm, causal=False)


@pytest.mark.parametrize("norm", ["adaptive_temperature", normalizers.LSSA(reweight=True), "entmax"])
def test_kernels_refuse_multi_pass_normalizers(norm):
  q = jnp.ones((1, 4, 1, 2))
  with pallas_kernels.interpret(), pytest.raises(NotImplementedError,
                                                 match="more than one pass.*the kernels take.*lssa"):
    pallas_kernels.attention(q, q, q, normalizer=norm, implementation="pallas_triton")


@pytest.mark.parametrize("make, message", [
    (lambda: normalizers.LSSA(head_dim=1), "LSSA.head_dim: got 1"),
    (lambda: normalizers.LSSA(reweight=1), "LSSA.reweight: got 1"),
    (lambda: normalizers.LSSA(power=0.5), "LSSA.power: got 0.5"),
    (lambda: normalizers.AdaptiveTemperature(threshold=-1.0), "AdaptiveTemperature.threshold: got -1.0"),
    (lambda: normalizers.AdaptiveTemperature(coefficients=()), "AdaptiveTemperature.coefficients: got ()"),
    (lambda: normalizers.Entmax(alpha=1.0), "Entmax.alpha: got 1.0; allowed: a float >= 1.01"),
    (lambda: normalizers.Entmax(iterations=0), "Entmax.iterations: got 0"),
    (lambda: normalizers.Sinkhorn(iterations=0), "Sinkhorn.iterations: got 0"),
])
def test_bad_parameters(make, message):
  with pytest.raises(ValueError, match=message):
    make()


@pytest.mark.parametrize("kwargs, message", [
    (dict(normalizer=normalizers.Entmax(alpha=jnp.array([1.5, 1.0]))), r"Entmax.alpha: got a minimum of 1.0"),
    (dict(normalizer=normalizers.Entmax(alpha=jnp.ones(3) * 1.5)), r"Entmax.alpha: got float32\(3,\)"),
    (dict(normalizer="sinkhorn"), "causal: got True with normalizer 'sinkhorn'"),
])
def test_bad_call_arguments(kwargs, message):
  q = jnp.ones((1, 3, 2, 2))
  with pytest.raises(ValueError, match=message):
    pallas_kernels.attention(q, q, q, implementation="reference", **kwargs)
