"""``linear_attention`` implementations ``xla`` (chunked) and ``parallel`` (quadratic) against the
``reference`` scan: outputs, final state and gradients of every input, float32 and bfloat16, all decay forms
(log decays of -inf, -1e4, -20 and 0 mixed in by the shared helper), lengths that are not a multiple of the
chunk, GQA, packed segments; the one-step ops ``linear_attention_step`` / ``delta_rule_step``; argument errors."""

from __future__ import annotations

import functools
import os
import sys

import hypothesis
import hypothesis.strategies as st
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests are not a package (--import-mode=importlib)
import _linear_helpers as helpers  # noqa: E402

import pallas_kernels  # noqa: E402

IMPLS = ("xla", "parallel")
F32 = dict(rms=3e-5, gate_rms=5e-5)
BF16 = dict(rms=5e-3, gate_rms=2e-2)

pytestmark = pytest.mark.usefixtures("fast_compile")

CASES = [
    # decay, dtype, seq, chunk, kv_heads, segments, implementations
    ("mild", jnp.float32, 45, 16, 1, False, IMPLS),
    ("channel", jnp.float32, 70, 64, 2, True, ("xla",)),
    ("head", jnp.float32, 40, 32, 1, True, IMPLS),
    ("none", jnp.float32, 20, 64, 2, True, ("xla",)),
    ("channel", jnp.bfloat16, 45, 32, 2, True, IMPLS),
]


def _segments(seq):
  positions = jnp.arange(seq)[None]
  return jnp.concatenate([(positions >= 7) + (positions >= 26), positions >= seq // 2]).astype(jnp.int32)


@pytest.mark.parametrize("decay,dtype,seq,chunk,kv_heads,segments,implementations", CASES)
def test_matches_reference(decay, dtype, seq, chunk, kv_heads, segments, implementations):
  """"mild" (GLA-like gates) takes the one-matmul path of the per-channel scores, "channel" the exact one."""
  args = helpers.inputs(seq, batch=2, seq=seq, heads=2, kv_heads=kv_heads, dtype=dtype, decay=decay)
  kwargs = dict(segment_ids=_segments(seq) if segments else None, chunk_size=chunk)
  want = helpers.outputs_and_grads("reference", args, **kwargs)
  for implementation in implementations:
    helpers.assert_matches(helpers.outputs_and_grads(implementation, args, **kwargs), want,
                           **(F32 if dtype == jnp.float32 else BF16))


@pytest.mark.parametrize("op", ("linear_attention", "delta_rule"))
def test_all_minus_inf_decay_is_finite_and_equals_reference(op):
  """The case that gave NaN before: every log decay -inf (each step sees only its own token)."""
  args = helpers.inputs(7, seq=32, decay="head", delta=op == "delta_rule")
  args["log_decay"] = jnp.full_like(args["log_decay"], -jnp.inf)
  want = helpers.outputs_and_grads("reference", args, chunk_size=16)
  helpers.assert_matches(helpers.outputs_and_grads("xla", args, chunk_size=16), want, **F32)


@pytest.mark.parametrize("group_chunks", (1, 4))
@pytest.mark.parametrize("decay,delta", (("mild", False), ("channel", False), ("head", False), ("head", True)))
def test_chunk_groups_match_reference(decay, delta, group_chunks, monkeypatch):
  """On a CPU ``xla`` runs each half of an op as a loop over groups of chunks, the state carried from group to
  group (in reverse for the backward); forced down to groups of 1 chunk or of 4 (cut to 3, to divide the 6
  chunks), and of 2 for the exact per-channel form, it still matches."""
  from pallas_kernels.linear_attention import xla as linear_xla  # pylint: disable=import-outside-toplevel
  args = helpers.inputs(11, batch=2, seq=90, heads=4, kv_heads=2, decay=decay, delta=delta)
  query_chunk_bytes = 4 * 2 * 4 * 16 * 8  # float32 (batch, heads, chunk, key_dim)
  monkeypatch.setattr(linear_xla, "WHOLE_BYTES", 0)
  monkeypatch.setattr(linear_xla, "GROUP_BYTES", group_chunks * query_chunk_bytes)
  monkeypatch.setattr(linear_xla, "EXACT_GROUP_BYTES", 2 * query_chunk_bytes)
  want = helpers.outputs_and_grads("reference", args, chunk_size=16)
  helpers.assert_matches(helpers.outputs_and_grads("xla", args, chunk_size=16), want, **F32)


def test_mild_form_is_chosen_from_unclamped_step_decays():
  """``is_mild`` reads the per-step log decays before the clamp: a span of at most 20 nats over rows 2..C is
  mild, whatever the first row holds while it is finite; -inf anywhere (first row included) is not, and never
  NaN (the first row is clamped before it is taken from the sum)."""
  from pallas_kernels.linear_attention import _gla_math  # pylint: disable=import-outside-toplevel
  g = jnp.full((2, 3, 16, 8), -1.0)  # (batch, chunks, C, K): span 15 per chunk
  assert bool(_gla_math.is_mild(g))
  assert bool(_gla_math.is_mild(g.at[1, 2, 0, 5].set(-25.0)))  # the first row is not part of the span
  assert bool(_gla_math.is_mild(g.at[1, 2, 3, 5].set(-6.0)))  # 20 nats over rows 2..C
  assert not bool(_gla_math.is_mild(g.at[1, 2, 3, 5].set(-6.5)))  # 20.5
  for row in (0, 7):
    verdict = _gla_math.is_mild(g.at[0, 1, row, 2].set(-jnp.inf))
    assert verdict.dtype == jnp.bool_ and not bool(verdict)


def test_default_chunk_shrinks_for_short_sequences_and_small_heads():
  from pallas_kernels.linear_attention import default_chunk_size  # pylint: disable=import-outside-toplevel
  assert [default_chunk_size(t, 128, 128) for t in (1, 16, 17, 40, 64, 65, 4096)] == [16, 16, 32, 48, 64, 64, 64]
  # small heads (2 K V / (K + V) <= 32) take 32-row chunks; K=V=64 and K=32, V=128 keep 64
  assert [default_chunk_size(4096, k, v) for k, v in ((32, 32), (16, 64), (64, 64), (32, 128))] == [32, 32, 64, 64]
  assert default_chunk_size(20, 32, 32) == 32
  args = helpers.inputs(3, seq=17, decay="channel")
  run = lambda **kw: pallas_kernels.linear_attention(**args, return_final_state=True, implementation="xla", **kw)
  for got, want in zip(run(), run(chunk_size=64)):  # one 32-row chunk instead of one 64-row chunk: same result
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


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
    assert helpers.rel_rms(final, finals[0]) <= F32["rms"]


@pytest.mark.parametrize("batched", (True, False))
def test_sums_of_products_match_numpy(batched):
  """The chunk math's sums (``_tiles``): dots on batched arrays (a size-1 group axis broadcasting), reductions on
  2-D kernel tiles."""
  from pallas_kernels.linear_attention import _tiles  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(3, 1, 5, 4)), rng.normal(size=(3, 2, 5, 4))
  if not batched:
    a, b = a[0, 0], b[0, 0]
  prod = a * b
  for got, want in ((_tiles.row_dot(a, b), prod.sum(-1, keepdims=True)),
                    (_tiles.col_dot(a, b), prod.sum(-2, keepdims=True)),
                    (_tiles.row_sum(jnp.asarray(b, jnp.float32)), b.sum(-1, keepdims=True)),
                    (_tiles.col_sum(jnp.asarray(b, jnp.float32)), b.sum(-2, keepdims=True))):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_default_auto_selection_on_cpu_is_xla():
  args = helpers.inputs(3, seq=10, decay="none")
  run = lambda implementation: jax.jit(functools.partial(pallas_kernels.linear_attention,
                                                         implementation=implementation))(**args)
  np.testing.assert_array_equal(run(None), run("xla"))


@hypothesis.settings(max_examples=2, deadline=None, derandomize=True)
@hypothesis.given(seq=st.integers(1, 40), chunk=st.sampled_from((16, 32, 64)),
                  decay=st.sampled_from(("none", "head", "channel")), kv_heads=st.sampled_from((1, 3)),
                  key_dim=st.sampled_from((4, 8)), value_dim=st.sampled_from((3, 8)))
def test_shape_sweep(seq, chunk, decay, kv_heads, key_dim, value_dim):
  args = helpers.inputs(seq, seq=seq, heads=3, kv_heads=kv_heads, key_dim=key_dim, value_dim=value_dim,
                        decay=decay)
  want = helpers.outputs_and_grads("reference", args, chunk_size=chunk)
  helpers.assert_matches(helpers.outputs_and_grads("xla", args, chunk_size=chunk), want, **F32)
  assert want["o"].shape == (1, seq, 3, value_dim)


@pytest.mark.parametrize("op", ("linear_attention", "delta_rule"))
def test_log_decay_closed_over_under_jit_and_checked_eagerly(op):
  args = helpers.inputs(4, seq=12, decay="head", delta=op == "delta_rule")
  log_decay = args.pop("log_decay")
  positional = [args.pop(n) for n in ("q", "k", "v", "beta") if n in args]
  public = getattr(pallas_kernels, op)
  closed_over = jax.jit(lambda *xs: public(*xs, log_decay=log_decay, **args, implementation="xla"))
  passed = jax.jit(lambda *xs, g: public(*xs, log_decay=g, **args, implementation="xla"))
  np.testing.assert_array_equal(closed_over(*positional), passed(*positional, g=log_decay))
  with pytest.raises(ValueError, match="log_decay"):
    public(*positional, log_decay=log_decay.at[0, 3, 1].set(0.5), **args, implementation="xla")


# ---- one-step ops ----------------------------------------------------------------------------------------------


def _step_inputs(op, seq):
  """Sequence inputs with GQA (4 query heads, 2 key/value heads), per-channel decay for linear attention and a
  per-key/value-head beta for the delta rule."""
  delta = op == "delta_rule"
  return helpers.inputs(8, batch=2, seq=seq, heads=4, kv_heads=2, decay="head" if delta else "channel",
                        delta=delta, beta_heads=2)


def _steps(op, args, implementation):
  """Runs the step op over the sequence: ``(o (B, T, H, V), final state)``."""
  step = getattr(pallas_kernels, f"{op}_step")
  state, outputs = args["initial_state"], []
  for t in range(args["q"].shape[1]):
    at = {n: None if x is None else x[:, t] for n, x in args.items() if n != "initial_state"}
    positional = [at.pop(n) for n in ("q", "k", "v", "beta") if n in at]
    o, state = step(*positional, state, **at, implementation=implementation)
    outputs.append(o)
  return jnp.stack(outputs, axis=1), state


@pytest.mark.parametrize("op", ("linear_attention", "delta_rule"))
def test_steps_chain_to_the_sequence_op(op):
  args = _step_inputs(op, seq=6)
  want = helpers.outputs_and_grads("reference", args)
  for implementation in ("reference", "xla"):
    o, state = jax.jit(functools.partial(_steps, op, implementation=implementation))(args)
    assert o.dtype == args["q"].dtype and state.dtype == jnp.float32
    np.testing.assert_allclose(o, want["o"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state, want["final_state"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ("linear_attention", "delta_rule"))
def test_step_gradients_match_reference(op):
  args = {n: None if x is None else (x[:, 0] if x.ndim >= 3 and n != "initial_state" else x)
          for n, x in _step_inputs(op, seq=1).items()}
  names = [n for n, x in args.items() if x is not None]

  def loss(implementation, *xs):
    call = dict(zip(names, xs))
    state = call.pop("initial_state")
    positional = [call.pop(n) for n in ("q", "k", "v", "beta") if n in call]
    o, new = getattr(pallas_kernels, f"{op}_step")(*positional, state, **call, implementation=implementation)
    return jnp.sum(jnp.sin(o)) + jnp.sum(jnp.cos(new))

  grad = lambda impl: jax.jit(jax.grad(functools.partial(loss, impl), argnums=tuple(range(len(names)))))(
      *[args[n] for n in names])
  for got, want in zip(grad("xla"), grad("reference")):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_delta_step_without_decay_in_bfloat16_matches_reference():
  """The xla delta step's one-read form (``S^T k`` and ``S^T q`` before the update) without a decay, bf16 inputs,
  a per-query-head beta and GQA."""
  args = helpers.inputs(11, batch=2, seq=1, heads=4, kv_heads=2, decay="none", delta=True, dtype=jnp.bfloat16)
  at = [args[n][:, 0] for n in ("q", "k", "v", "beta")]
  (o, state), (o_ref, state_ref) = (pallas_kernels.delta_rule_step(*at, args["initial_state"], implementation=impl)
                                    for impl in ("xla", "reference"))
  assert o.dtype == jnp.bfloat16 and state.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(o_ref, np.float32), rtol=2e-2, atol=2e-2)
  np.testing.assert_allclose(state, state_ref, rtol=1e-5, atol=1e-5)


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jex.core.jaxprs_in_params(eqn.params):
      yield from _all_eqns(sub)


@pytest.mark.parametrize("op", ("linear_attention", "delta_rule"))
def test_step_costs_one_state_update(op):
  """The xla step touches ``O(K V)`` per head: no array in its program is larger than the state, and nothing
  is padded to a chunk or scanned."""
  args = {n: None if x is None else (x[:, 0] if x.ndim >= 3 and n != "initial_state" else x)
          for n, x in _step_inputs(op, seq=1).items()}
  state = args.pop("initial_state")
  positional = [args.pop(n) for n in ("q", "k", "v", "beta") if n in args]
  step = getattr(pallas_kernels, f"{op}_step")
  jaxpr = jax.make_jaxpr(lambda *xs: step(*xs, **args, implementation="xla"))(*positional, state).jaxpr
  eqns = list(_all_eqns(jaxpr))
  assert not {"scan", "while", "custom_vjp_call"} & {e.primitive.name for e in eqns}
  assert max(np.prod(v.aval.shape) for e in eqns for v in e.outvars) <= state.size


# ---- argument errors ---------------------------------------------------------------------------------------------


def test_bad_arguments_raise_value_errors_naming_them():
  args = helpers.inputs(9, seq=8, heads=4, kv_heads=2, decay="head", delta=True)
  q, k, v, beta, state = args["q"], args["k"], args["v"], args["beta"], args["initial_state"]
  with pytest.raises(ValueError, match="k: number of heads 3 must divide"):
    pallas_kernels.linear_attention(q, jnp.zeros((1, 8, 3, 8)), jnp.zeros((1, 8, 3, 8)))
  with pytest.raises(ValueError, match=r"beta: expected shape \(1, 8, 4\) or \(1, 8, 2\)"):
    pallas_kernels.delta_rule(q, k, v, beta[..., :3])
  with pytest.raises(ValueError, match="state: expected shape"):
    pallas_kernels.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state[:, :, :4])
  with pytest.raises(ValueError, match="log_decay"):
    pallas_kernels.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state, log_decay=jnp.zeros((1, 4, 3)))
  with pytest.raises(ValueError, match="beta"):
    pallas_kernels.delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0, :3], state)
  with pytest.raises(ValueError, match="implementation"):
    pallas_kernels.linear_attention_step(q[:, 0], k[:, 0], v[:, 0], state, implementation="pallas_tpu")
