"""Contract tests of every gated linear-attention mixer (parametrised over ``MIXERS`` names): decode (prefill
+ token by token) equals the full forward, packed segments equal separate sequences, finite gradients that
reach every parameter, ``implementation="reference"`` agrees with ``"xla"``, logical axes, constructor errors.

Tiny shapes: B=2, T=13 (not a multiple of the mixers' ``chunk_size=4``, so the chunked path crosses chunk
boundaries), d_model=32, 2 heads.
"""

from __future__ import annotations

import functools
import types

import flax.linen as nn
import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from gated_jax.layers import MIXERS
from gated_jax.layers.linear_attention import Lightning, RetNet
from pallas_kernels.linear_attention import Config as KernelConfig

B, T, D, H = 2, 13, 32, 2
CHUNK = 4
CAUSAL = {
    "linear_attention": dict(feature_map="elu_plus_one", use_short_conv=True, qk_norm="l2"),
    "retnet": dict(num_kv_heads=1),  # RoPE positions in packed rows and across decode steps, GQA
    "lightning": dict(layer_idx=1, num_layers=3),
    "gla": dict(use_short_conv=True, conv_bias=True, num_kv_heads=1),
    "hgrn2": dict(lower_bound=0.3),  # the all-heads output norm
    "deltanet": dict(output_gate="swish", allow_neg_eigval=True),  # gated_deltanet covers beta in (0, 1)
    "gated_deltanet": dict(num_v_heads=4),  # separate value heads
    "mlstm": dict(igate_bias_init=0.0),
    "gsa": dict(num_slots=3),
}
NON_CAUSAL = {"lina": dict(max_len=16), "gla_bidirectional": dict(bidirectional=True)}
ALL = {**CAUSAL, **NON_CAUSAL}
LOGICAL_AXES = {"embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "expert", "state", None}
TOL = dict(atol=1e-4, rtol=1e-4)

# Two packed rows [A, B] and [B, A] (A: 5 tokens, B: 8), positions restarting in each segment.
LEN_A = 5
SEGMENTS = jnp.array([[1] * LEN_A + [2] * (T - LEN_A), [1] * (T - LEN_A) + [2] * LEN_A])
POSITIONS = jnp.array([list(range(LEN_A)) + list(range(T - LEN_A)), list(range(T - LEN_A)) + list(range(LEN_A))])
PREFILL = 5  # decode: a 5-token prefill, then one token at a time


def mixer_name(case: str) -> str:
  return "gla" if case == "gla_bidirectional" else case


def make(case: str, **overrides):
  return MIXERS.get(mixer_name(case))(d_model=D, num_heads=H, **{"chunk_size": CHUNK, **ALL[case], **overrides})


pytestmark = pytest.mark.usefixtures("fast_compile")


def packed_inputs():
  a, b = jnp.split(jax.random.normal(jax.random.PRNGKey(0), (1, T, D)), [LEN_A], axis=1)
  return jnp.concatenate([jnp.concatenate([a, b], 1), jnp.concatenate([b, a], 1)], axis=0)


@pytest.fixture(scope="module", params=sorted(ALL))
def run(request):
  """Everything a case needs with few compilations: init (with the decode cache when causal; traced with the
  cheaper-to-compile reference op, same variables); one jitted forward+backward of the xla path on
  ``[x; packed x]`` (plain rows: one segment each) plus the reference path on ``x`` (no segment_ids), giving
  the outputs and gradients; decode on the xla path."""
  name = request.param
  mixer, x = make(name, implementation="xla"), packed_inputs()
  reference = make(name, implementation="reference")
  causal = name in CAUSAL
  variables = jax.jit(functools.partial(reference.init, decode=causal))(jax.random.PRNGKey(1), x)
  x2 = jnp.concatenate([x, x])
  segments2 = jnp.concatenate([jnp.ones_like(SEGMENTS), SEGMENTS])
  positions2 = jnp.concatenate([jnp.broadcast_to(jnp.arange(T), (B, T)), POSITIONS])

  def loss(params):
    y, y_packed = jnp.split(mixer.apply({"params": params}, x2, segment_ids=segments2, positions=positions2), 2)
    y_reference = reference.apply({"params": params}, x)
    return jnp.sum(y ** 2) + jnp.sum(y_packed ** 2), (y, y_packed, y_reference)

  grads, (y, y_packed, y_reference) = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  decoded = None
  if causal:
    step = jax.jit(lambda v, x_chunk: mixer.apply(v, x_chunk, decode=True, mutable=["cache"]))
    cache, decoded = variables["cache"], []
    for start, stop in [(0, PREFILL)] + [(t, t + 1) for t in range(PREFILL, T)]:
      y_chunk, updates = step({"params": variables["params"], "cache": cache}, x[:, start:stop])
      cache = updates["cache"]
      decoded.append(y_chunk)
    decoded = (jnp.concatenate(decoded, axis=1), cache)
  return types.SimpleNamespace(name=name, mixer=mixer, x=x, variables=variables, grads=grads, y=y,
                               y_packed=y_packed, y_reference=y_reference, decoded=decoded)


def test_shape_dtype_and_logical_axes(run):
  assert run.y.shape == (B, T, D) and run.y.dtype == jnp.float32
  assert np.all(np.isfinite(run.y))
  params = run.variables["params"]
  for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]:
    assert isinstance(leaf, nn.LogicallyPartitioned), f"{run.name} {path}: no logical axes"
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= LOGICAL_AXES, (path, leaf.names)
  bf16 = make(run.name, dtype=jnp.bfloat16)
  out = jax.eval_shape(bf16.apply, run.variables, run.x.astype(jnp.bfloat16))
  assert out.shape == (B, T, D) and out.dtype == jnp.bfloat16


def test_gradients_finite_and_reach_every_parameter(run):
  for path, g in jax.tree_util.tree_flatten_with_path(nn.meta.unbox(run.grads))[0]:
    assert np.all(np.isfinite(g)), (run.name, path)
    assert np.any(g != 0), (run.name, path)


def test_reference_implementation_agrees_with_xla(run):
  np.testing.assert_allclose(run.y, run.y_reference, **TOL)


def test_packed_segments_equal_separate_sequences(run):
  a_after_b, b_after_a = run.y_packed[1, T - LEN_A:], run.y_packed[0, LEN_A:]
  a_first, b_first = run.y_packed[0, :LEN_A], run.y_packed[1, :T - LEN_A]
  np.testing.assert_allclose(a_after_b, a_first, **TOL)
  np.testing.assert_allclose(b_after_a, b_first, **TOL)
  if run.name in CAUSAL:  # a causal prefix is the sequence alone: compare with the unpacked call
    np.testing.assert_allclose(a_first, run.y[0, :LEN_A], **TOL)
    np.testing.assert_allclose(b_first, run.y[1, :T - LEN_A], **TOL)
  else:
    assert not np.allclose(run.y[0, :LEN_A], a_first, atol=1e-3)  # non-causal: B leaks in without segments


def test_decode_matches_full_sequence(run):
  if run.decoded is None:
    with pytest.raises(ValueError, match="decode"):
      jax.eval_shape(functools.partial(run.mixer.init, decode=True), jax.random.PRNGKey(1), run.x)
    return
  decoded, cache = run.decoded
  np.testing.assert_allclose(decoded, run.y, **TOL)
  assert int(cache["cache_index"]) == T
  for leaf in jax.tree.leaves({k: v for k, v in cache.items() if k != "cache_index"}):
    assert leaf.dtype == jnp.float32, leaf.dtype


def _all_eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jex.core.jaxprs_in_params(eqn.params):
      yield from _all_eqns(sub)


@pytest.mark.parametrize("name", sorted(CAUSAL))
def test_decode_step_costs_one_state_update(name):
  """A one-token decode call runs the ops' step form: with chunk_size 64 (no other dimension here is 64), its
  program pads nothing to a chunk, runs no chunked scan or custom_vjp, and no array in it outgrows the largest
  cached state plus the parameters' largest matrix."""
  mixer = make(name, chunk_size=64)
  x = packed_inputs()
  variables = jax.eval_shape(functools.partial(mixer.init, decode=True), jax.random.PRNGKey(1), x[:, :PREFILL])
  jaxpr = jax.make_jaxpr(lambda v, t: mixer.apply(v, t, decode=True, mutable=["cache"]))(variables, x[:, :1]).jaxpr
  eqns = list(_all_eqns(jaxpr))
  assert not {"scan", "while", "custom_vjp_call"} & {e.primitive.name for e in eqns}, name
  shapes = [v.aval.shape for e in eqns for v in e.outvars]
  assert not any(64 in shape for shape in shapes), name
  largest = max(np.prod(leaf.shape) for leaf in jax.tree.leaves(variables))
  assert max(np.prod(shape) for shape in shapes) <= largest, name


def test_mlstm_prefix_ignores_later_large_input_gates():
  """The normaliser's eps acts relative to the per-step stabiliser exp(-m_t) (xLSTM eq. 19-27): with input
  gates spanning the soft cap, a stabiliser taken over the whole sequence would let the early cell outputs
  h_t (the input of the output RMSNorm, which would hide a per-token scale) depend on later tokens."""
  mixer, x = make("mlstm"), packed_inputs()
  params = nn.meta.unbox(jax.jit(mixer.init)(jax.random.PRNGKey(1), x)["params"])
  params["i_gate"]["kernel"] = 8.0 * params["i_gate"]["kernel"]  # i = 15 tanh(x w / 15) spans about +-15

  @jax.jit
  def cell_output(x_BTD):
    seen = []

    def record(next_fun, args, kwargs, context):
      if context.module.name == "o_norm":
        seen.append(args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      mixer.apply({"params": params}, x_BTD)
    return seen[0]

  full = cell_output(x)
  assert float(jnp.max(jnp.abs(full))) > 0.1
  np.testing.assert_allclose(cell_output(x[:, :PREFILL]), full[:, :PREFILL], **TOL)


def test_fla_initialisation_by_default():
  """Every projection and short-conv kernel starts at N(0, 0.02) (fla's models); ``init_std=None`` restores
  LeCun-normal projections and PyTorch-default conv kernels."""
  x = jnp.zeros((1, 4, 64))
  fla = nn.meta.unbox(jax.jit(MIXERS.get("gla")(d_model=64, num_heads=2, use_short_conv=True).init)(
      jax.random.PRNGKey(0), x)["params"])
  for name in ("q_proj", "g_proj", "o_proj", "gk_down_proj", "q_conv"):
    assert abs(float(jnp.std(fla[name]["kernel"])) - 0.02) < 0.003, name
  assert float(jnp.max(jnp.abs(fla["gk_proj"]["bias"]))) == 0.0
  lecun = nn.meta.unbox(jax.jit(MIXERS.get("gla")(d_model=64, num_heads=2, use_short_conv=True, init_std=None).init)(
      jax.random.PRNGKey(0), x)["params"])
  assert abs(float(jnp.std(lecun["q_proj"]["kernel"])) - 64 ** -0.5) < 0.02
  assert float(jnp.max(jnp.abs(lecun["q_conv"]["kernel"]))) > 0.1  # U(-1/2, 1/2): far wider than N(0, 0.02)


def test_retnet_and_lightning_decays():
  np.testing.assert_allclose(np.exp(RetNet(d_model=16, num_heads=4).log_gamma()),
                             [1 - 2.0 ** -5, 1 - 2.0 ** -6, 1 - 2.0 ** -7, 1 - 2.0 ** -8])
  np.testing.assert_allclose(Lightning(d_model=16, num_heads=4, layer_idx=1, num_layers=4).log_gamma(),
                             [0.0, -1.5, -3.0, -4.5])
  np.testing.assert_allclose(Lightning(d_model=16, num_heads=4, layer_idx=0, num_layers=4).log_gamma()[1], -2.0)


COMMON_BAD = [dict(num_heads=0), dict(expand_k=0.3), dict(expand_v=-1.0), dict(feature_map="cosine"),
              dict(output_gate="tanh"), dict(conv_size=0), dict(qk_norm="yes"), dict(use_short_conv=1),
              dict(implementation="fast"), dict(implementation=()), dict(chunk_size=0), dict(norm_eps=0.0),
              dict(norm_scope="group"), dict(init_std=0.0), dict(conv_bias=None),
              dict(kernel_config={"block_k": 64})]
SPECIFIC_BAD = [
    ("lightning", dict(layer_idx=3, num_layers=3), "layer_idx"),
    ("lightning", dict(num_layers=0), "num_layers"),
    ("gla", dict(gate_low_rank_dim=0), "gate_low_rank_dim"),
    ("gla", dict(gate_logit_normalizer=-16.0), "gate_logit_normalizer"),
    ("gla", dict(clamp_min=0.5), "clamp_min"),
    ("gla", dict(bidirectional="both"), "bidirectional"),
    ("gla", dict(num_kv_heads=3), "num_kv_heads"),
    ("retnet", dict(rope="yes"), "rope"),
    ("retnet", dict(rope_base=1.0), "rope_base"),
    ("hgrn2", dict(num_kv_heads=1), "num_kv_heads"),
    ("deltanet", dict(use_beta=1), "use_beta"),
    ("deltanet", dict(num_kv_heads=1), "num_kv_heads"),
    ("gated_deltanet", dict(num_v_heads=3), "num_v_heads"),
    ("hgrn2", dict(lower_bound=1.0), "lower_bound"),
    ("deltanet", dict(allow_neg_eigval=None), "allow_neg_eigval"),
    ("gated_deltanet", dict(head_dim=0), "head_dim"),
    ("gated_deltanet", dict(a_init_range=(16.0, 1.0)), "a_init_range"),
    ("gated_deltanet", dict(dt_min=0.5, dt_max=0.1), "dt_max"),
    ("gated_deltanet", dict(dt_init_floor=0.0), "dt_init_floor"),
    ("mlstm", dict(gate_soft_cap=0.0), "gate_soft_cap"),
    ("mlstm", dict(eps=-1.0), "eps"),
    ("gsa", dict(num_slots=0), "num_slots"),
    ("gsa", dict(gate_logit_normalizer=0.0), "gate_logit_normalizer"),
    ("lina", dict(max_len=0), "max_len"),
]
BAD = [(name, kwargs, next(iter(kwargs))) for name in sorted({mixer_name(c) for c in ALL}) for kwargs in COMMON_BAD]


@pytest.mark.parametrize("name, kwargs, match", BAD + SPECIFIC_BAD)
def test_bad_fields_raise(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    MIXERS.get(name)(**{"d_model": D, "num_heads": H, **kwargs})


def test_kernel_config_reaches_the_op():
  """A mixer's ``kernel_config`` reaches the Pallas kernels: bf16 stored states change the output a little."""
  x = jax.random.normal(jax.random.PRNGKey(1), (B, 40, D))  # 3 chunks of 16 (the kernels' smallest)
  plain = make("gla", implementation="pallas_tpu", chunk_size=16)
  bf16_states = make("gla", implementation="pallas_tpu", chunk_size=16,
                     kernel_config=KernelConfig(states_dtype="bfloat16"))
  with pallas_kernels.interpret():
    params = plain.init(jax.random.PRNGKey(0), x)
    y_f32, y_bf16 = plain.apply(params, x), bf16_states.apply(params, x)
  assert float(jnp.max(jnp.abs(y_f32 - y_bf16))) > 0
  np.testing.assert_allclose(y_bf16, y_f32, atol=2e-2)


def test_bad_inputs_raise():
  mixer, x = make("retnet"), packed_inputs()
  with pytest.raises(ValueError, match="x_BTD"):
    jax.eval_shape(mixer.init, jax.random.PRNGKey(1), jnp.zeros((B, T, D + 1)))
  with pytest.raises(ValueError, match="segment_ids"):
    jax.eval_shape(functools.partial(mixer.init, segment_ids=jnp.zeros((B, T - 1), jnp.int32)),
                   jax.random.PRNGKey(1), x)
  with pytest.raises(ValueError, match="x_BTD"):  # LINA has one KV-gate scalar per position below max_len
    jax.eval_shape(make("lina", max_len=T - 1).init, jax.random.PRNGKey(1), x)
