"""The attention op: xla against reference (forward and gradients, fp32 and bf16, awkward shapes, GQA, masks,
decode offsets, empty rows), the gate, argument errors, and the blockwise memory claim (no (T, S) array)."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

import pallas_kernels
from pallas_kernels.attention import masking, normalizers

BLOCKWISE = sorted(name for name, cls in normalizers.NORMALIZERS.items() if cls.blockwise)
BLOCK = 4  # a small key block, so tiny shapes span several blocks and a padded last block


pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
  monkeypatch.setattr(masking, "BLOCK_KV", BLOCK)


def _inputs(batch=2, seq=6, keys=11, heads=4, kv_heads=2, dim=8, value_dim=3, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = 1.5 * jax.random.normal(ks[0], (batch, seq, heads, dim))
  k = jax.random.normal(ks[1], (batch, keys, kv_heads, dim))
  v = jax.random.normal(ks[2], (batch, keys, kv_heads, value_dim))
  do = jax.random.normal(ks[3], (batch, seq, heads, value_dim))
  return tuple(x.astype(dtype) for x in (q, k, v, do))


def _forward_and_grads(implementation, q, k, v, do, **kwargs):
  """``(o, (dq, dk, dv))`` for the cotangent ``do``, jitted."""
  def run(q, k, v):
    o, vjp = jax.vjp(lambda *a: pallas_kernels.attention(*a, implementation=implementation, **kwargs), q, k, v)
    return o, vjp(do)
  return jax.jit(run)(q, k, v)


def _assert_close(got, want, tol):
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    assert bool(jnp.all(jnp.isfinite(g)))
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol)


# Query segment 9 has no keys: query 4 of batch row 0 sees nothing.
HARD_MASK = dict(window=5, query_offset=jnp.array([5, 2]),
                 segment_ids=(jnp.array([[0, 0, 1, 1, 9, 1], [0, 0, 0, 0, 1, 1]]),
                              jnp.array([[0] * 5 + [1] * 6, [0] * 5 + [1] * 6])))


@pytest.mark.parametrize("name", BLOCKWISE)
def test_xla_matches_reference_fp32(name):
  """GQA, S = 11 (not a multiple of the block), window, segments, per-batch query offsets and a row without
  visible keys (output exactly 0, finite gradients), all together."""
  q, k, v, do = _inputs()
  got = _forward_and_grads("xla", q, k, v, do, normalizer=name, **HARD_MASK)
  want = _forward_and_grads("reference", q, k, v, do, normalizer=name, **HARD_MASK)
  _assert_close(got, want, 1e-5)
  np.testing.assert_array_equal(got[0][0, 4], 0.0)


@pytest.mark.parametrize("name", ["softmax", "softpick", "clipped_softmax"])
def test_xla_matches_reference_bf16(name):
  q, k, v, do = _inputs(dtype=jnp.bfloat16)
  got = _forward_and_grads("xla", q, k, v, do, normalizer=name)
  want = _forward_and_grads("reference", q, k, v, do, normalizer=name)
  _assert_close(got, want, 3e-2)


@pytest.mark.parametrize("name, mask", [
    ("softmax", dict()),
    ("softmax", dict(causal=False)),
    ("softmax", dict(window=3)),
    ("softpick", dict(causal=False, window=4)),
    ("clipped_softmax", dict(segment_ids=jnp.array([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0] * 9]))),
])
def test_masks(name, mask):
  q, k, v, do = _inputs(seq=9, keys=9, heads=2, kv_heads=1)
  got = _forward_and_grads("xla", q, k, v, do, normalizer=name, **mask)
  want = _forward_and_grads("reference", q, k, v, do, normalizer=name, **mask)
  _assert_close(got, want, 1e-5)


@pytest.mark.parametrize("implementation, name", [("xla", "ssmax"), ("xla", "softpick"), ("reference", "softmax")])
def test_key_mask_equals_dropping_the_keys(implementation, name):
  """Masked keys (different ones per batch row) change nothing: the output and dq equal attention over the
  kept keys alone, dk/dv of the kept keys match and those of masked keys are 0. Batch row 1 masks every
  key: its output is 0 and all its gradients are finite (0)."""
  q, k, v, do = _inputs(keys=11)
  key_mask = jnp.array([[True, True, False, True, True, False, True, True, True, False, True], [False] * 11])
  got_o, (dq, dk, dv) = _forward_and_grads(implementation, q, k, v, do, normalizer=name, causal=False,
                                          key_mask=key_mask)
  kept = np.flatnonzero(key_mask[0])
  want_o, (want_dq, want_dk, want_dv) = _forward_and_grads(implementation, q[:1], k[:1, kept], v[:1, kept],
                                                           do[:1], normalizer=name, causal=False)
  _assert_close((got_o[:1], dq[:1], dk[:1, kept], dv[:1, kept]), (want_o, want_dq, want_dk, want_dv), 1e-5)
  np.testing.assert_array_equal(dk[0, ~key_mask[0]], 0.0)
  np.testing.assert_array_equal(dv[0, ~key_mask[0]], 0.0)
  np.testing.assert_array_equal(got_o[1], 0.0)
  for grad in (dq[1], dk[1], dv[1]):
    np.testing.assert_array_equal(grad, 0.0)


def _attend(q, k, v, **kwargs):
  return jax.jit(lambda q, k, v: pallas_kernels.attention(q, k, v, **kwargs))(q, k, v)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_decode_rows_equal_rows_of_the_full_computation(implementation):
  q, k, v, _ = _inputs(seq=9, keys=9)
  full = _attend(q, k, v, implementation=implementation)
  last = _attend(q[:, -1:], k, v, implementation=implementation)  # default offset S - T = 8
  np.testing.assert_allclose(last, full[:, -1:], rtol=1e-5, atol=1e-6)
  offsets = jnp.array([3, 7])  # a different cache index per batch row
  rows = jnp.stack([q[0, 3:5], q[1, 7:9]])
  chunk = jax.jit(lambda rows, offsets: pallas_kernels.attention(rows, k, v, query_offset=offsets,
                                                                  implementation=implementation))(rows, offsets)
  np.testing.assert_allclose(chunk, jnp.stack([full[0, 3:5], full[1, 7:9]]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_more_queries_than_keys_leaves_leading_rows_empty(implementation):
  """Bottom-right alignment: with T = 5 > S = 3 the default offset is -2, so rows 0 and 1 see nothing."""
  q, k, v, do = _inputs(seq=5, keys=3, heads=2, kv_heads=1)
  o, grads = _forward_and_grads(implementation, q, k, v, do)
  np.testing.assert_array_equal(o[:, :2], 0.0)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
  np.testing.assert_allclose(o[:, 2:], _attend(q[:, 2:], k, v, implementation=implementation), rtol=1e-6)


@pytest.mark.parametrize("name, make", [
    ("ssmax", lambda p: normalizers.SSMax(s=p)),
    ("selective_temperature", lambda p: normalizers.Selective(temperature=p[None, None, :] * jnp.ones((2, 6, 4)))),
    ("selective_position", lambda p: normalizers.Selective(position_scale=p)),
])
def test_gradients_to_learnable_parameters(name, make):
  q, k, v, do = _inputs()
  param = jnp.array([0.5, 1.0, 1.5, 2.0])

  def grads(implementation):
    loss = lambda p, q: jnp.sum(pallas_kernels.attention(q, k, v, normalizer=make(p), implementation=implementation,
                                                         **HARD_MASK) * do)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(param, q)

  got, want = grads("xla"), grads("reference")
  assert float(jnp.abs(want[0]).min()) > 0
  _assert_close(got, want, 1e-5)


@pytest.mark.parametrize("gate_width", [3, 1])
def test_gate_multiplies_the_output(gate_width):
  q, k, v, _ = _inputs()
  gate = jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(5), (2, 6, 4, gate_width)))
  plain = _attend(q, k, v)
  gated = _attend(q, k, v, gate=gate)
  np.testing.assert_allclose(gated, plain * gate, rtol=1e-6, atol=1e-7)
  dgate = jax.jit(jax.grad(lambda g: pallas_kernels.attention(q, k, v, gate=g).sum()))(gate)
  np.testing.assert_allclose(dgate, plain.sum(-1, keepdims=True) if gate_width == 1 else plain, rtol=1e-5, atol=1e-6)


def test_first_key_weight_via_one_hot_values():
  """The attention-sink trick of the contract: v = one-hot of key 0 gives the weight on the first key."""
  q, k, _, _ = _inputs(seq=7, keys=7)
  v = jnp.zeros((2, 7, 2, 1)).at[:, 0].set(1.0)
  got = _attend(q, k, v, implementation="xla")[..., 0]
  kr = jnp.repeat(k, 2, axis=2)
  s = jnp.einsum("bthd,bshd->bhts", q, kr) / jnp.sqrt(8.0)
  s = jnp.where(jnp.tril(jnp.ones((7, 7), bool)), s, -jnp.inf)
  np.testing.assert_allclose(got, jnp.swapaxes(jax.nn.softmax(s, -1)[..., 0], 1, 2), rtol=1e-5, atol=1e-6)


def _bad(**changes):
  def call():
    q, k, v, _ = _inputs(seq=6, keys=11)
    args = {"q": q, "k": k, "v": v, **changes}
    return pallas_kernels.attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
  return call


@pytest.mark.parametrize("call, message", [
    (_bad(q=jnp.ones((2, 6, 4))), r"q: expected shape"),
    (_bad(q=jnp.ones((2, 6, 4, 8), jnp.int32)), r"q: expected a floating dtype"),
    (_bad(k=jnp.ones((3, 11, 2, 8))), r"k: expected shape \(2, keys, kv_heads, 8\)"),
    (_bad(k=jnp.ones((2, 11, 2, 5))), r"k: expected shape"),
    (_bad(k=jnp.ones((2, 11, 3, 8)), v=jnp.ones((2, 11, 3, 3))), r"k: number of heads 3 must divide the query heads 4"),
    (_bad(v=jnp.ones((2, 10, 2, 3))), r"v: expected shape"),
    (_bad(normalizer="bogus"), r"normalizer: got 'bogus'; allowed: .*'softmax'.*'entmax15'"),
    (_bad(normalizer=3), r"normalizer: got 3"),
    (_bad(normalizer=normalizers.SSMax(s=jnp.ones(3))), r"SSMax.s: got float32\(3,\)"),
    (_bad(normalizer=normalizers.Selective(temperature=jnp.ones((2, 6)))), r"Selective.temperature"),
    (_bad(causal="yes"), r"causal: got 'yes'"),
    (_bad(window=0), r"window: expected a positive int or None, got 0"),
    (_bad(window=2.5), r"window: expected a positive int"),
    (_bad(window=True), r"window: expected a positive int"),
    (_bad(segment_ids=jnp.zeros((2, 6), jnp.int32)), r"segment_ids: a single \(B, T\) array needs T == S"),
    (_bad(segment_ids=(jnp.zeros((2, 6)), jnp.zeros((2, 11)))), r"segment_ids\[0\]: expected an integer dtype"),
    (_bad(segment_ids=(jnp.zeros((2, 6), int), jnp.zeros((2, 10), int))), r"segment_ids\[1\]: expected shape \(2, 11\)"),
    (_bad(segment_ids=(jnp.zeros((2, 6), int),)), r"segment_ids: got a sequence of 1 items"),
    (_bad(q=jnp.ones((2, 11, 4, 8)), segment_ids=jnp.zeros((2, 10), int)), r"segment_ids: expected shape \(2, 11\)"),
    (_bad(scale=0.0), r"scale: got 0.0; allowed: a positive finite float"),
    (_bad(scale=float("nan")), r"scale: got nan"),
    (_bad(scale="big"), r"scale: got 'big'"),
    (_bad(scale=np.float32(-2.0)), r"scale: got .*-2.0\)?; allowed"),
    (_bad(gate=jnp.ones((2, 6, 4, 2))), r"gate: got shape \(2, 6, 4, 2\); allowed: \(2, 6, 4, 3\) or \(2, 6, 4, 1\)"),
    (_bad(gate=jnp.ones((2, 6, 4, 3), jnp.int32)), r"gate: expected a floating dtype"),
    (_bad(key_mask=jnp.ones((2, 10), bool)), r"key_mask: got an array bool\(2, 10\); allowed: a \(2, 11\) bool"),
    (_bad(key_mask=jnp.ones((2, 11), jnp.int32)), r"key_mask: got an array int32\(2, 11\)"),
    (_bad(key_mask=[[True] * 11] * 2), r"key_mask: expected a \(2, 11\) bool array or None, got list"),
    (_bad(query_offset=-1), r"query_offset: got -1; allowed: None, an int >= 0"),
    (_bad(query_offset=1.5), r"query_offset: got 1.5"),
    (_bad(query_offset=jnp.zeros((3,), jnp.int32)), r"query_offset: got an array int32\(3,\)"),
    (_bad(query_offset=jnp.zeros((2,))), r"query_offset: got an array float32\(2,\)"),
    (_bad(query_offset=jnp.array([1, -2])), r"query_offset: got negative values"),
    (_bad(implementation="bogus"), r"implementation for attention: got 'bogus'"),
])
def test_bad_arguments_raise_value_error_naming_them(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def _avals(jaxpr):
  """Every intermediate aval of a jaxpr, sub-jaxprs (scan bodies, jit, custom rules) included."""
  for eqn in jaxpr.eqns:
    yield from (v.aval for v in eqn.outvars)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _avals(sub)


@pytest.mark.parametrize("name", ["softmax", "ssmax", "clipped_softmax"])
def test_xla_never_builds_a_T_by_S_array(name):
  """Forward and backward keep O(T * block) memory: no intermediate has a T-like and an S-like dimension
  (T = 40 queries and R = 80 GQA rows, S = 56 keys, block 4), and none is even T * S / 4 elements."""
  seq, keys = 40, 56
  q, k, v, _ = _inputs(batch=1, seq=seq, keys=keys, heads=2, kv_heads=1, dim=3, value_dim=5)

  def offenders(implementation):
    loss = lambda q, k, v: jnp.sum(pallas_kernels.attention(q, k, v, normalizer=name, window=30,
                                                            implementation=implementation) ** 2)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr
    return [a.shape for a in _avals(jaxpr) if hasattr(a, "shape") and (
        (set(a.shape) & {seq, 2 * seq} and keys in a.shape) or np.prod(a.shape) >= seq * keys // 4)]

  assert offenders("reference")  # the check sees the materialised scores
  assert offenders("xla") == []


@settings(max_examples=5, deadline=None, phases=(Phase.explicit, Phase.generate))
@given(batch=st.integers(1, 2), seq=st.integers(1, 9), extra_keys=st.integers(0, 6), kv_heads=st.sampled_from([1, 2]),
       group=st.sampled_from([1, 3]), dim=st.sampled_from([1, 4]), causal=st.booleans(),
       window=st.sampled_from([None, 1, 3]), name=st.sampled_from(BLOCKWISE), seed=st.integers(0, 99))
def test_shape_sweep(batch, seq, extra_keys, kv_heads, group, dim, causal, window, name, seed):
  q, k, v, do = _inputs(batch, seq, seq + extra_keys, kv_heads * group, kv_heads, dim, 2, seed=seed)
  kwargs = dict(normalizer=name, causal=causal, window=window)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(masking, "BLOCK_KV", BLOCK)
    got = _forward_and_grads("xla", q, k, v, do, **kwargs)
  want = _forward_and_grads("reference", q, k, v, do, **kwargs)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # relative to each array's largest entry:
    assert g.shape == w.shape  # rows with all logits near 0 make softpick's gradients ill-conditioned
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-4 * (1 + float(jnp.abs(w).max())))
