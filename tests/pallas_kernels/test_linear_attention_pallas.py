"""Pallas kernels of ``linear_attention`` and ``delta_rule`` (TPU and Triton) in interpret mode against the
reference oracle (outputs, final state and every gradient; log decays of -inf, -1e4, -20 and 0 mixed in by the
shared helper; GQA with k/v read per group and their gradients summed per group inside the kernels; lengths
not a multiple of the chunk; packed segments; bf16 with bf16 stored chunk states), plus cross-lowering of the
real forward and backward kernels from this CPU host."""

from __future__ import annotations

import functools
import importlib
import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # tests are not a package (--import-mode=importlib)
import _linear_helpers as helpers  # noqa: E402

import pallas_kernels  # noqa: E402
from pallas_kernels.linear_attention import Config  # noqa: E402

F32 = dict(rms=3e-5, gate_rms=5e-5)
# bf16 inputs go into the kernels' dots in bf16 (flash-linear-attention's choice; the xla path on a CPU stays
# float32): flash-linear-attention's gradient threshold (relative RMS 8e-3), for outputs too.
BF16 = dict(rms=8e-3, gate_rms=2e-2)

pytestmark = pytest.mark.usefixtures("fast_compile")

CASES = {
    # name: (inputs, op kwargs)
    "gla-channel-f32-gqa-segments": (dict(seq=40, kv_heads=1, decay="channel"), dict(chunk_size=16, segments=True)),
    "gla-head-bf16": (dict(seq=45, kv_heads=2, decay="head", dtype=jnp.bfloat16), dict(chunk_size=32)),
    "gla-no-decay-f32-gqa": (dict(seq=37, kv_heads=1, decay="none"), dict(chunk_size=16)),
    "delta-f32-gqa-segments-beta-per-kv": (dict(seq=40, kv_heads=1, decay="head", delta=True, beta_heads=1),
                                           dict(chunk_size=16, segments=True)),
    "delta-bf16-no-decay": (dict(seq=70, kv_heads=2, decay="none", delta=True, dtype=jnp.bfloat16),
                            dict(chunk_size=64)),
    "delta-f32-gqa-beta-per-query": (dict(seq=35, kv_heads=1, decay="head", delta=True), dict(chunk_size=16)),
}
RUNS = [("pallas_tpu", name) for name in CASES] + [
    ("pallas_triton", name) for name in ("gla-channel-f32-gqa-segments", "gla-head-bf16", "delta-bf16-no-decay",
                                         "delta-f32-gqa-beta-per-query")]


@functools.lru_cache(maxsize=None)
def _case(name):
  """``(args, kwargs, reference results)`` of a case (the reference serves both backends)."""
  input_kwargs, op_kwargs = CASES[name]
  args = helpers.inputs(input_kwargs["seq"], heads=2, key_dim=16, value_dim=32, **input_kwargs)
  op_kwargs = dict(op_kwargs)
  if op_kwargs.pop("segments", False):
    positions = jnp.arange(input_kwargs["seq"])[None]
    op_kwargs["segment_ids"] = ((positions >= 7) + (positions >= 26)).astype(jnp.int32)
  return args, op_kwargs, helpers.outputs_and_grads("reference", args, **op_kwargs)


@pytest.mark.parametrize("implementation,name", RUNS, ids=[f"{i}-{n}" for i, n in RUNS])
def test_matches_reference(implementation, name):
  args, kwargs, want = _case(name)
  with pallas_kernels.interpret():
    got = helpers.outputs_and_grads(implementation, args, **kwargs)
  helpers.assert_matches(got, want, **(F32 if args["q"].dtype == jnp.float32 else BF16))


def test_bfloat16_stored_states_keep_the_bfloat16_tolerance():
  """Chunk states stored in bf16 between the passes (float32 accumulation inside them), chosen through the
  public op's ``kernel_config``."""
  args, kwargs, want = _case("gla-head-bf16")
  config = Config(states_dtype="bfloat16")
  with pallas_kernels.interpret():
    got = helpers.outputs_and_grads("pallas_tpu", args, kernel_config=config, **kwargs)
  helpers.assert_matches(got, want, **BF16)


def test_kernel_config_reaches_the_pallas_kernels_and_is_checked():
  args = helpers.inputs(2, seq=40, key_dim=16, value_dim=16, decay="head")
  run = functools.partial(pallas_kernels.linear_attention, args["q"], args["k"], args["v"],
                          log_decay=args["log_decay"], chunk_size=16)
  with pallas_kernels.interpret():
    stored_f32 = run(implementation="pallas_tpu")
    stored_bf16 = run(implementation="pallas_tpu", kernel_config=Config(states_dtype="bfloat16"))
  assert float(jnp.max(jnp.abs(stored_f32 - stored_bf16))) > 0  # the bf16 states were used
  assert jnp.allclose(stored_f32, stored_bf16, atol=5e-2)
  assert jnp.array_equal(run(implementation="xla"), run(implementation="xla", kernel_config=Config()))
  with pytest.raises(ValueError, match="kernel_config"):
    run(kernel_config={"block_k": 64})
  with pytest.raises(ValueError, match="block_k: got 24"):
    Config(block_k=24)
  with pytest.raises(ValueError, match="states_dtype"):
    Config(states_dtype="float16")


@pytest.mark.parametrize("implementation", ("pallas_tpu", "pallas_triton"))
@pytest.mark.parametrize("op", ("linear_attention", "delta_rule"))
def test_all_minus_inf_decay_is_finite_and_equals_reference(implementation, op):
  """The reported NaN: every log decay -inf (forward)."""
  args = helpers.inputs(3, seq=32, key_dim=16, value_dim=16, decay="head", delta=op == "delta_rule")
  args["log_decay"] = jnp.full_like(args["log_decay"], -jnp.inf)
  positional = [args.pop(n) for n in ("q", "k", "v", "beta") if n in args]
  public = getattr(pallas_kernels, op)
  want = public(*positional, **args, implementation="reference")
  with pallas_kernels.interpret():
    got = public(*positional, **args, implementation=implementation)
  assert bool(jnp.all(jnp.isfinite(got)))
  assert helpers.rel_rms(got, want) < 3e-5


@pytest.mark.parametrize("implementation", ("pallas_tpu", "pallas_triton"))
@pytest.mark.parametrize("op", ("linear_attention", "delta_rule"))
def test_unsupported_chunk_size_raises(implementation, op):
  args = helpers.inputs(0, seq=8, key_dim=16, value_dim=16, decay="none", delta=op == "delta_rule")
  positional = [args[n] for n in ("q", "k", "v", "beta") if n in args]
  with pallas_kernels.interpret(), pytest.raises(NotImplementedError, match="chunk_size=24.*supported"):
    getattr(pallas_kernels, op)(*positional, chunk_size=24, implementation=implementation)


def _pallas_outputs(jaxpr, found):
  """``{kernel name: output shapes}`` of every ``pallas_call`` in ``jaxpr`` and its sub-jaxprs."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      found[eqn.params["name"]] = [tuple(v.aval.shape) for v in eqn.outvars]
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        _pallas_outputs(inner, found)
  return found


@pytest.mark.parametrize("module", ("tpu", "gpu"))
def test_gqa_gradients_of_k_v_beta_leave_the_kernel_at_their_own_size(module):
  """The gradient kernels sum a group's query heads themselves: dk, dv (and a per-key/value-head dbeta) come
  out with KV heads, never as per-query-head copies."""
  impl = importlib.import_module(f"pallas_kernels.linear_attention.{module}")
  batch, seq, heads, kv_heads, dim = 1, 64, 4, 2, 16
  common = dict(scale=0.25, initial_state=None, return_final_state=False, segment_ids=None, chunk_size=16)

  def loss(q, k, v, log_decay, beta):
    o = impl.linear_attention(q, k, v, log_decay, **common)[0]
    o2 = impl.delta_rule(q, k, v, beta, log_decay[..., 0], **common)[0]
    return jnp.sum(o) + jnp.sum(o2)

  sds = jax.ShapeDtypeStruct
  q, kv = sds((batch, seq, heads, dim), jnp.float32), sds((batch, seq, kv_heads, dim), jnp.float32)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=range(5)))(q, kv, kv, q, sds((batch, seq, kv_heads), jnp.float32))
  found = _pallas_outputs(jaxpr.jaxpr, {})
  per_query, per_kv = (batch, heads, seq, dim), (batch, kv_heads, seq, dim)
  assert found["gla_grads"] == [per_query, per_kv, per_kv, per_query]
  assert found["delta_grads"] == [per_query, per_kv, per_kv, (batch, kv_heads, seq, 1), (batch, heads, seq, 1)]


@pytest.mark.parametrize("module,platform,marker", [("tpu", "tpu", "tpu_custom_call"),
                                                    ("gpu", "cuda", "__gpu$xla.gpu.triton")])
def test_cross_lowers_forward_and_backward(module, platform, marker):
  """The real (non-interpret) kernels lower for their platform: bf16, K = V = 128, GQA, GLA with a per-channel
  decay (16-row blocks) and a per-head one (whole-chunk scores) and the gated delta rule, with packed segments,
  forward and backward."""
  impl = importlib.import_module(f"pallas_kernels.linear_attention.{module}")
  batch, seq, heads, kv_heads, dim = 1, 256, 4, 2, 128
  segments = (jnp.arange(seq)[None] >= 100).astype(jnp.int32)

  def f(q, k, v, log_decay, beta, state):
    common = dict(scale=dim ** -0.5, initial_state=state, return_final_state=True, segment_ids=segments,
                  chunk_size=64)
    o, final = impl.linear_attention(q, k, v, log_decay, **common)
    o2, final2 = impl.delta_rule(q, k, v, beta, log_decay[..., 0], **common)
    o3, final3 = impl.linear_attention(q, k, v, log_decay[..., 0], **common)
    outputs = (o.astype(jnp.float32) + o2.astype(jnp.float32) + o3.astype(jnp.float32))
    return jnp.sum(outputs) + jnp.sum(final + final2 + final3)

  sds = jax.ShapeDtypeStruct
  args = (sds((batch, seq, heads, dim), jnp.bfloat16),) + (sds((batch, seq, kv_heads, dim), jnp.bfloat16),) * 2 + (
      sds((batch, seq, heads, dim), jnp.float32), sds((batch, seq, kv_heads), jnp.float32),
      sds((batch, heads, dim, dim), jnp.float32))
  text = jax.jit(jax.value_and_grad(f, argnums=range(6))).trace(*args).lower(
      lowering_platforms=(platform,)).as_text()
  assert text.count(marker) >= 17  # GLA (twice): 2 forward + 3 backward kernels; delta rule: 3 + 4
  for name in ("gla_states", "gla_output", "gla_state_grads", "gla_grads", "delta_prepare", "delta_states",
               "delta_output", "delta_state_grads", "delta_grads"):
    assert name in text, name
