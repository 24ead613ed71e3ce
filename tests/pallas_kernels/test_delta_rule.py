"""``delta_rule`` implementations ``xla`` (chunked WY/UT) and ``parallel`` (one WY/UT transform over the
sequence) against the ``reference`` scan: outputs, final state and gradients of q, k, v, beta, log_decay and
initial_state, float32 and bfloat16, no decay and per-head decay (with -inf, -1e4, -20 and 0 mixed in), betas in
(0, 2) per query or per key/value head, lengths that are not a multiple of the chunk, GQA and packed segments;
the unit-lower-triangular inverse in both of its forms."""

from __future__ import annotations

import functools
import os
import sys

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests are not a package (--import-mode=importlib)
import _linear_helpers as helpers  # noqa: E402

import pallas_kernels  # noqa: E402
from pallas_kernels.linear_attention import _delta_math  # noqa: E402

IMPLS = ("xla", "parallel")
F32 = dict(rms=3e-5, gate_rms=5e-5)
BF16 = dict(rms=5e-3, gate_rms=2e-2)

pytestmark = pytest.mark.usefixtures("fast_compile")

CASES = [
    # decay, dtype, seq, chunk, kv_heads, beta per key/value head, segments
    ("head", jnp.float32, 45, 16, 1, False, True),
    ("head", jnp.float32, 40, 32, 2, True, False),
    ("none", jnp.float32, 70, 64, 2, False, True),
    ("head", jnp.bfloat16, 37, 16, 2, False, True),
]


@pytest.mark.parametrize("decay,dtype,seq,chunk,kv_heads,beta_per_kv,segments", CASES)
def test_matches_reference(decay, dtype, seq, chunk, kv_heads, beta_per_kv, segments):
  args = helpers.inputs(seq, batch=2, seq=seq, heads=2, kv_heads=kv_heads, dtype=dtype, decay=decay, delta=True,
                        beta_heads=kv_heads if beta_per_kv else None)
  positions = jnp.arange(seq)[None]
  segment_ids = jnp.concatenate([(positions >= 7) + (positions >= 26), positions >= seq // 2]).astype(jnp.int32)
  kwargs = dict(segment_ids=segment_ids if segments else None, chunk_size=chunk)
  want = helpers.outputs_and_grads("reference", args, **kwargs)
  for implementation in IMPLS:
    helpers.assert_matches(helpers.outputs_and_grads(implementation, args, **kwargs), want,
                           **(F32 if dtype == jnp.float32 else BF16))


def test_packed_segments_equal_separate_runs():
  lengths = (9, 20, 6)
  args = helpers.inputs(1, seq=sum(lengths), decay="head", delta=True)
  segment_ids = jnp.repeat(jnp.array([0, 1, 0]), jnp.array(lengths), total_repeat_length=sum(lengths))[None]
  q, k, v, beta = (args.pop(n) for n in ("q", "k", "v", "beta"))
  state = args.pop("initial_state")
  run = jax.jit(functools.partial(pallas_kernels.delta_rule, return_final_state=True, chunk_size=16,
                                  implementation="xla"))
  packed, final = run(q, k, v, beta, log_decay=args["log_decay"], initial_state=state, segment_ids=segment_ids)
  start = 0
  for i, length in enumerate(lengths):
    part = lambda x: x[:, start:start + length]
    alone, alone_final = run(part(q), part(k), part(v), part(beta), log_decay=part(args["log_decay"]),
                             initial_state=state if i == 0 else None)
    np.testing.assert_allclose(packed[:, start:start + length], alone, rtol=1e-5, atol=1e-5)
    start += length
  np.testing.assert_allclose(final, alone_final, rtol=1e-5, atol=1e-5)


@hypothesis.settings(max_examples=2, deadline=None, derandomize=True)
@hypothesis.given(seq=st.integers(1, 40), chunk=st.sampled_from((16, 32, 64)),
                  decay=st.sampled_from(("none", "head")), kv_heads=st.sampled_from((1, 3)),
                  value_dim=st.sampled_from((3, 8)))
def test_shape_sweep(seq, chunk, decay, kv_heads, value_dim):
  args = helpers.inputs(seq, seq=seq, heads=3, kv_heads=kv_heads, value_dim=value_dim, decay=decay, delta=True)
  want = helpers.outputs_and_grads("reference", args, chunk_size=chunk)
  assert want["o"].shape == (1, seq, 3, value_dim)
  helpers.assert_matches(helpers.outputs_and_grads("xla", args, chunk_size=chunk), want, **F32)


@pytest.mark.parametrize("size,blocked", [(1, True), (5, True), (70, True), (32, False), (128, False)])
def test_unit_lower_inverse_matches_dense_inverse(size, blocked):
  """Both forms: blocked (batched arrays, any size) and masked (inside kernels, powers of two)."""
  a = jnp.tril(jax.random.uniform(jax.random.PRNGKey(size), (2, size, size), minval=-0.5, maxval=0.5), -1)
  if not blocked:
    a = a[0]
  got = jax.jit(functools.partial(_delta_math.unit_lower_inverse, blocked=blocked))(a)
  want = np.linalg.inv(np.eye(size) + np.asarray(a, np.float64))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.max(np.abs(want)))))
  np.testing.assert_array_equal(np.triu(np.asarray(got), 1), 0.0)
