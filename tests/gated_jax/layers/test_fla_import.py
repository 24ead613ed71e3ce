"""fla layer weights -> our mixers (``weight_import.fla_params``): synthetic PyTorch-layout state dicts, run
through a numpy transcription of each flash-linear-attention layer's forward (``fla/layers/gla.py``,
``gated_deltanet.py``, ``delta_net.py``, ``multiscale_retention.py``, ``hgrn2.py`` and the naive recurrences
of ``fla/ops/*/naive.py``: head-major ``(h d)`` flattening, depthwise causal conv, RMSNorm eps 1e-5), against
our layer with the imported params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gated_jax.layers import MIXERS, weight_import

B, T, D, H = 2, 7, 8, 2
RNG = np.random.default_rng(0)
X = RNG.normal(size=(B, T, D))

pytestmark = pytest.mark.usefixtures("fast_compile")


def silu(x):
  return x / (1 + np.exp(-x))


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def linear(x, state, name):
  return x @ state[f"{name}.weight"].T


def short_conv(x, state, name, activation):
  """fla ``ShortConvolution``: depthwise ``Conv1d`` (weight ``(C, 1, K)``), left-padded by ``K - 1``."""
  weight = state[f"{name}.weight"]
  taps = weight.shape[2]
  padded = np.pad(x, ((0, 0), (taps - 1, 0), (0, 0)))
  y = sum(padded[:, i:i + x.shape[1]] * weight[:, 0, i] for i in range(taps)) + state.get(f"{name}.bias", 0.0)
  return silu(y) if activation else y


def rms_norm(x, weight, eps=1e-5):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def heads(x, dim):
  return x.reshape(*x.shape[:-1], -1, dim)


def gla_recurrence(q, k, v, log_decay, scale):
  """``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale q_t^T S_t``; ``log_decay`` broadcasts over K."""
  state = np.zeros((B, q.shape[2], q.shape[3], v.shape[3]))
  out = []
  for t in range(T):
    state = state * np.exp(log_decay[:, t])[..., None] + k[:, t, :, :, None] * v[:, t, :, None, :]
    out.append(scale * np.einsum("bhk,bhkv->bhv", q[:, t], state))
  return np.stack(out, 1)


def delta_recurrence(q, k, v, beta, log_decay, scale):
  """fla ``naive_recurrent_gated_delta_rule``: decay, then ``v' = beta (v - S^T k)``, ``S += k v'^T``."""
  state = np.zeros((B, q.shape[2], q.shape[3], v.shape[3]))
  out = []
  for t in range(T):
    state = state * np.exp(log_decay[:, t])[..., None, None]
    delta = (v[:, t] - np.einsum("bhkv,bhk->bhv", state, k[:, t])) * beta[:, t, :, None]
    state = state + k[:, t, :, :, None] * delta[:, :, None, :]
    out.append(scale * np.einsum("bhk,bhkv->bhv", q[:, t], state))
  return np.stack(out, 1)


def l2norm(x):
  return x / np.sqrt(np.sum(x * x, -1, keepdims=True) + 1e-6)


def rotary(x):
  """fla ``RotaryEmbedding`` (rotate-half, base 10000) at positions 0..T-1."""
  dim = x.shape[-1]
  angle = np.arange(T)[:, None] / 10000.0 ** (np.arange(0, dim, 2) / dim)
  cos, sin = np.tile(np.cos(angle), 2)[:, None], np.tile(np.sin(angle), 2)[:, None]
  x1, x2 = x[..., :dim // 2], x[..., dim // 2:]
  return x * cos + np.concatenate([-x2, x1], -1) * sin


def project_qkv(state, conv, v_act, qk_act=False):
  """q/k/v projections, short convs (SiLU on q/k when ``qk_act``, on v when ``v_act``)."""
  q, k, v = (linear(X, state, f"{n}_proj") for n in "qkv")
  if conv:
    return (short_conv(q, state, "q_conv1d", qk_act), short_conv(k, state, "k_conv1d", qk_act),
            short_conv(v, state, "v_conv1d", v_act))
  return (silu(q), silu(k), silu(v)) if qk_act else (q, k, silu(v) if v_act else v)


def fla_gla(state, kv, conv):
  key_dim, group = state["q_proj.weight"].shape[0] // H, H // kv
  q, k, v = project_qkv(state, conv, conv, conv)
  gk = linear(linear(X, state, "gk_proj.0"), state, "gk_proj.1") + state["gk_proj.1.bias"]
  k, gk = (np.repeat(heads(a, key_dim), group, axis=2) for a in (k, gk))
  v = np.repeat(heads(v, v.shape[-1] // kv), group, axis=2)
  o = gla_recurrence(heads(q, key_dim), k, v, log_sigmoid(gk) / 16, key_dim ** -0.5)
  g = heads(linear(X, state, "g_proj"), o.shape[-1])
  o = rms_norm(o, state["g_norm_swish_gate.weight"]) * silu(g)
  return linear(o.reshape(B, T, -1), state, "o_proj")


def fla_retnet(state, kv, conv):
  del conv
  key_dim, group = state["q_proj.weight"].shape[0] // H, H // kv
  q, k = (heads(linear(X, state, f"{n}_proj"), key_dim) for n in "qk")
  v = linear(X, state, "v_proj")
  v = np.repeat(heads(v, v.shape[-1] // kv), group, axis=2)
  k = np.repeat(rotary(k), group, axis=2)
  log_gamma = np.log(1 - 2.0 ** (-5.0 - np.arange(H)))[None, None, :, None]
  o = gla_recurrence(rotary(q), k, v, np.broadcast_to(log_gamma, (B, T, H, 1)), key_dim ** -0.5)
  o = rms_norm(o, state["g_norm_swish_gate.weight"]) * silu(heads(linear(X, state, "g_proj"), o.shape[-1]))
  return linear(o.reshape(B, T, -1), state, "o_proj")


def fla_deltanet(state, conv, qk_activation, qk_norm, use_beta):
  key_dim = state["q_proj.weight"].shape[0] // H
  q, k, v = project_qkv(state, conv, True, qk_activation == "silu")
  q, k, v = heads(q, key_dim), heads(k, key_dim), heads(v, v.shape[-1] // H)
  if qk_activation == "elu":  # fla elu_p1
    q, k = (np.where(a > 0, a, np.expm1(a)) + 1 for a in (q, k))
  q, k = (l2norm(q), l2norm(k)) if qk_norm == "l2" else (q / q.sum(-1, keepdims=True), k / k.sum(-1, keepdims=True))
  beta = 1 / (1 + np.exp(-linear(X, state, "b_proj"))) if use_beta else np.ones((B, T, H))
  o = delta_recurrence(q, k, v, beta, np.zeros((B, T, H)), key_dim ** -0.5)
  if "g_proj.weight" in state:
    o = rms_norm(o, state["o_norm.weight"]) * silu(heads(linear(X, state, "g_proj"), o.shape[-1]))
  else:
    o = rms_norm(o, state["o_norm.weight"])
  return linear(o.reshape(B, T, -1), state, "o_proj")


def fla_gated_deltanet(state, num_v_heads, conv):
  key_dim = state["q_proj.weight"].shape[0] // H
  q, k, v = project_qkv(state, conv, True, True)
  group = num_v_heads // H
  q, k = (np.repeat(l2norm(heads(a, key_dim)), group, axis=2) for a in (q, k))
  v = heads(v, v.shape[-1] // num_v_heads)
  beta = 1 / (1 + np.exp(-linear(X, state, "b_proj")))
  a = linear(X, state, "a_proj") + state["dt_bias"]
  log_decay = -np.exp(state["A_log"]) * np.logaddexp(0.0, a)
  o = delta_recurrence(q, k, v, beta, log_decay, key_dim ** -0.5)
  o = rms_norm(o, state["o_norm.weight"]) * silu(heads(linear(X, state, "g_proj"), o.shape[-1]))
  return linear(o.reshape(B, T, -1), state, "o_proj")


def fla_hgrn2(state, conv):
  q, f, i = (linear(X, state, f"{n}_proj") for n in "qfi")
  if conv:
    q, i = short_conv(q, state, "q_conv1d", False), short_conv(i, state, "i_conv1d", False)
  forget_dim = q.shape[-1] // H
  g = log_sigmoid(f)
  q, k, g = (heads(a, forget_dim) for a in (silu(q), 1 - np.exp(g), g))
  o = gla_recurrence(q, k, heads(i, i.shape[-1] // H), g, forget_dim ** -0.5)
  return linear(rms_norm(o.reshape(B, T, -1), state["g_norm.weight"]), state, "o_proj")


def random_state(shapes):
  """Synthetic weights, spread wide enough that every path (gates, norms, decays) matters."""
  state = {name: RNG.normal(scale=0.5, size=shape) for name, shape in shapes.items()}
  for name in state:
    if name.endswith("norm.weight") or name.endswith("gate.weight"):
      state[name] = 1.0 + 0.3 * state[name]
  return state


def conv_shapes(widths, taps=4):
  return {f"{n}_conv1d.weight": (w, 1, taps) for n, w in widths.items()}


KEY = 4  # per-head key width
CASES = {  # name -> (mixer kwargs, fla_params kwargs, fla state shapes, numpy forward)
    "gla_gqa_conv": (dict(expand_k=1.0, num_kv_heads=1, use_short_conv=True, conv_bias=True), dict(num_kv_heads=1),
                     {"q_proj.weight": (H * KEY, D), "k_proj.weight": (KEY, D), "v_proj.weight": (D // H, D),
                      "g_proj.weight": (D, D), "gk_proj.0.weight": (16, D), "gk_proj.1.weight": (KEY, 16),
                      "gk_proj.1.bias": (KEY,), "o_proj.weight": (D, D), "g_norm_swish_gate.weight": (D // H,),
                      **conv_shapes({"q": H * KEY, "k": KEY, "v": D // H}), "q_conv1d.bias": (H * KEY,),
                      "k_conv1d.bias": (KEY,), "v_conv1d.bias": (D // H,)},
                     lambda s: fla_gla(s, kv=1, conv=True)),
    "retnet_gqa": (dict(num_kv_heads=1), dict(num_kv_heads=1),
                   {"q_proj.weight": (D, D), "k_proj.weight": (D // H, D), "v_proj.weight": (D, D),
                    "g_proj.weight": (2 * D, D), "o_proj.weight": (D, 2 * D), "g_norm_swish_gate.weight": (D,)},
                   lambda s: fla_retnet(s, kv=1, conv=False)),
    "deltanet_noconv_elu_sum_nobeta": (
        dict(use_short_conv=False, feature_map="elu_plus_one", qk_norm="sum", use_beta=False), {},
        {"q_proj.weight": (D, D), "k_proj.weight": (D, D), "v_proj.weight": (D, D), "o_proj.weight": (D, D),
         "o_norm.weight": (D // H,)},
        lambda s: fla_deltanet(s, conv=False, qk_activation="elu", qk_norm="sum", use_beta=False)),
    "deltanet_conv_gate": (
        dict(output_gate="swish"), {},
        {"q_proj.weight": (D, D), "k_proj.weight": (D, D), "v_proj.weight": (D, D), "b_proj.weight": (H, D),
         "g_proj.weight": (D, D), "o_proj.weight": (D, D), "o_norm.weight": (D // H,),
         **conv_shapes({"q": D, "k": D, "v": D})},
        lambda s: fla_deltanet(s, conv=True, qk_activation="silu", qk_norm="l2", use_beta=True)),
    "gated_deltanet_gva_noconv": (
        dict(head_dim=KEY, num_v_heads=4, use_short_conv=False), dict(num_v_heads=4),
        {"q_proj.weight": (H * KEY, D), "k_proj.weight": (H * KEY, D), "v_proj.weight": (4 * 2 * KEY, D),
         "a_proj.weight": (4, D), "b_proj.weight": (4, D), "A_log": (4,), "dt_bias": (4,),
         "g_proj.weight": (4 * 2 * KEY, D), "o_proj.weight": (D, 4 * 2 * KEY), "o_norm.weight": (2 * KEY,)},
        lambda s: fla_gated_deltanet(s, num_v_heads=4, conv=False)),
    "hgrn2_conv": (dict(use_short_conv=True), {},
                   {"q_proj.weight": (D, D), "f_proj.weight": (D, D), "i_proj.weight": (D, D),
                    "g_norm.weight": (D,), "o_proj.weight": (D, D), **conv_shapes({"q": D, "i": D})},
                   lambda s: fla_hgrn2(s, conv=True)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_imported_layer_matches_fla_forward(case):
  mixer_kwargs, import_kwargs, shapes, forward = CASES[case]
  kind = case.split("_gqa")[0].split("_noconv")[0].split("_conv")[0].split("_gva")[0]
  state = random_state(shapes)
  expected = forward(state)
  params = weight_import.fla_params(state, kind=kind, num_heads=H, **import_kwargs)
  layer = MIXERS.get(kind)(d_model=D, num_heads=H, **mixer_kwargs)
  abstract = jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.zeros((B, T, D)))["params"]
  ours_shapes = jax.tree.map(lambda a: a.shape, jax.tree.map(jnp.asarray, params))
  assert ours_shapes == jax.tree.map(lambda a: a.value.shape, abstract,
                                     is_leaf=lambda a: hasattr(a, "value")), case
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
  got = jax.jit(layer.apply)({"params": params}, jnp.asarray(X, jnp.float32))
  assert np.std(expected) > 0.1, case  # the comparison is not between two near-zero outputs
  np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-4 * np.std(expected))


def test_errors():
  state = random_state(CASES["retnet_gqa"][2])
  with pytest.raises(ValueError, match="kind"):
    weight_import.fla_params(state, kind="mamba", num_heads=H)
  with pytest.raises(ValueError, match="num_kv_heads"):
    weight_import.fla_params(state, kind="deltanet", num_heads=H, num_kv_heads=1)
  with pytest.raises(ValueError, match="num_v_heads"):
    weight_import.fla_params(state, kind="gla", num_heads=H, num_v_heads=4)
  with pytest.raises(ValueError, match="missing 'gk_proj.0.weight'"):
    weight_import.fla_params(state, kind="gla", num_heads=H, num_kv_heads=1)
  with pytest.raises(ValueError, match="q_proj.weight: got shape"):
    weight_import.fla_params({**state, "q_proj.weight": np.zeros((D + 1, D))}, kind="retnet", num_heads=H)
  with pytest.raises(ValueError, match="f_conv1d"):
    weight_import.fla_params({"f_conv1d.weight": np.zeros((D, 1, 4))}, kind="hgrn2", num_heads=H)
