"""``linear_attention`` implementations ``xla`` (chunked) and ``parallel`` (quadratic) against the
``reference`` scan: outputs, final state and gradients of every input, float32 and bfloat16, all decay forms,
strong and near-zero decays, lengths that are not a multiple of the chunk, GQA, packed segments."""

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

IMPLS = ("xla", "parallel")
TIGHT = dict(rtol=1e-4, atol=1e-5)
BF16 = dict(rms=5e-3, gate_rms=2e-2)

CASES = [
    # decay, dtype, seq, chunk, kv_heads, segments
    ("channel", jnp.float32, 45, 16, 1, False),
    ("channel", jnp.float32, 70, 64, 2, True),
    ("head", jnp.float32, 40, 32, 1, True),
    ("none", jnp.float32, 20, 64, 2, True),
    ("channel", jnp.bfloat16, 45, 32, 2, True),
]


def _segments(seq):
  positions = jnp.arange(seq)[None]
  return jnp.concatenate([(positions >= 7) + (positions >= 26), positions >= seq // 2]).astype(jnp.int32)


@pytest.mark.parametrize("decay,dtype,seq,chunk,kv_heads,segments", CASES)
def test_matches_reference(decay, dtype, seq, chunk, kv_heads, segments):
  args = helpers.inputs(seq, batch=2, seq=seq, heads=2, kv_heads=kv_heads, dtype=dtype, decay=decay)
  kwargs = dict(segment_ids=_segments(seq) if segments else None, chunk_size=chunk)
  want = helpers.outputs_and_grads("reference", args, **kwargs)
  tolerance = TIGHT if dtype == jnp.float32 else BF16
  for implementation in IMPLS:
    helpers.assert_matches(helpers.outputs_and_grads(implementation, args, **kwargs), want, **tolerance)


def test_packed_segments_equal_separate_runs():
  lengths = (7, 19, 14)
  args = helpers.inputs(1, seq=sum(lengths), decay="channel")
  segment_ids = jnp.repeat(jnp.array([3, 1, 3]), jnp.array(lengths), total_repeat_length=sum(lengths))[None]
  run = jax.jit(functools.partial(pallas_kernels.linear_attention, return_final_state=True, chunk_size=16,
                                  implementation="xla"))
  packed, final = run(**args, segment_ids=segment_ids)
  start = 0
  for i, length in enumerate(lengths):
    part = {n: None if x is None else x[:, start:start + length] for n, x in args.items() if n != "initial_state"}
    alone, alone_final = run(**part, initial_state=args["initial_state"] if i == 0 else None)
    np.testing.assert_allclose(packed[:, start:start + length], alone, rtol=1e-5, atol=1e-5)
    start += length
  np.testing.assert_allclose(final, alone_final, rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_final_state():
  args = helpers.inputs(2, seq=37, decay="head")
  run = jax.jit(functools.partial(pallas_kernels.linear_attention, return_final_state=True, implementation="xla"),
                static_argnames="chunk_size")
  finals = [run(**args, chunk_size=chunk)[1] for chunk in (16, 37, 64)]
  for final in finals[1:]:
    np.testing.assert_allclose(final, finals[0], rtol=1e-5, atol=1e-5)


def test_default_auto_selection_on_cpu_is_xla():
  args = helpers.inputs(3, seq=10, decay="none")
  auto = pallas_kernels.linear_attention(**args)
  np.testing.assert_array_equal(auto, pallas_kernels.linear_attention(**args, implementation="xla"))


@hypothesis.settings(max_examples=3, deadline=None, derandomize=True)
@hypothesis.given(seq=st.integers(1, 40), chunk=st.sampled_from((16, 32, 64)),
                  decay=st.sampled_from(("none", "head", "channel")), kv_heads=st.sampled_from((1, 3)),
                  key_dim=st.sampled_from((4, 8)), value_dim=st.sampled_from((3, 8)))
def test_shape_sweep(seq, chunk, decay, kv_heads, key_dim, value_dim):
  args = helpers.inputs(seq, seq=seq, heads=3, kv_heads=kv_heads, key_dim=key_dim, value_dim=value_dim,
                        decay=decay)
  want = helpers.outputs_and_grads("reference", args, chunk_size=chunk)
  helpers.assert_matches(helpers.outputs_and_grads("xla", args, chunk_size=chunk), want, **TIGHT)
  assert want["o"].shape == (1, seq, 3, value_dim)


@pytest.mark.parametrize("op", ("linear_attention", "delta_rule"))
def test_log_decay_closed_over_under_jit_and_checked_eagerly(op):
  args = helpers.inputs(4, seq=12, decay="head", delta=op == "delta_rule")
  log_decay = args.pop("log_decay")
  positional = [args.pop(n) for n in ("q", "k", "v", "beta") if n in args]
  public = getattr(pallas_kernels, op)
  jitted = jax.jit(lambda *xs: public(*xs, log_decay=log_decay, **args, implementation="xla"))
  np.testing.assert_allclose(jitted(*positional),
                             public(*positional, log_decay=log_decay, **args, implementation="xla"),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="log_decay"):
    public(*positional, log_decay=log_decay.at[0, 3, 1].set(0.5), **args, implementation="xla")
