"""Shared skeleton of the gated linear-attention mixers: projections, short convs, the recurrent-state cache
and the (gated) per-head output norm.

Every mixer in this family is ``x -> (q, k, v, log decay) -> recurrence -> norm/gate -> o_proj``; a subclass
overrides only the steps its paper changes (``_qkv``, ``_log_decay``, ``_mix``, ``_output``). The
recurrence itself is always a ``pallas_kernels`` op. Decode follows the flax lm1b idiom: ``model.init(...,
decode=True)`` creates the ``"cache"`` collection (recurrent state ``(B, H, K, V)`` float32, conv windows,
``cache_index``), and later ``decode=True`` calls continue the state from it via the ops' ``initial_state`` /
``return_final_state``, so prefill + token-by-token equals the full-sequence call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import _checks
from gated_jax.layers.conv import ShortConv
from gated_jax.layers.feature_maps import get_feature_map, l2_normalize
from gated_jax.layers.norms import HeadRMSNorm
from gated_jax.layers.registry import check_mixer_input
from gated_jax.layers.selective_rope import SelectiveRoPE, check_selective_rope

OUTPUT_GATES = ("swish", "sigmoid", "none")
_GATE_ACTIVATIONS = {"swish": nn.swish, "sigmoid": nn.sigmoid}


def check_positive_float(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ValueError(f"{name}: got {value!r}; allowed: a positive number")


def check_flag(name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"{name}: got {value!r}; allowed: True or False")


def check_implementation(value: Any) -> None:
  """``None`` (auto), a name from ``pallas_kernels.KNOWN_IMPLEMENTATIONS`` or a non-empty sequence of them."""
  names = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, (tuple, list)) else None
  if value is not None and (not names or any(n not in pallas_kernels.KNOWN_IMPLEMENTATIONS for n in names)):
    raise ValueError(f"implementation: got {value!r}; allowed: None, a name or a non-empty sequence of names "
                     f"from {pallas_kernels.KNOWN_IMPLEMENTATIONS}")


def cache_mode(module: nn.Module, decode: bool) -> str:
  """"off" (no cache), "init" (decode call that creates the cache) or "step" (decode call continuing it).

  Must be called before any cache variable of ``module`` is created.
  """
  if not decode:
    return "off"
  return "step" if module.has_variable("cache", "cache_index") else "init"


def with_state(module: nn.Module, name: str, fn: Callable, state_shape: tuple[int, ...], mode: str,
               init_value: float = 0.0):
  """Runs ``fn(initial_state) -> (o, final_state)`` with the cached state ``name`` (created in "init").

  Outside a decode step ``initial_state`` is None; in "step" the final state replaces the cached one.
  """
  if mode == "off":
    return fn(None)[0]
  state = module.variable("cache", name, lambda: jnp.full(state_shape, init_value, jnp.float32))
  if mode == "init":
    return fn(None)[0]
  o, state.value = fn(state.value)
  return o


def flip_time(x: jax.Array | None) -> jax.Array | None:
  return None if x is None else jnp.flip(x, axis=1)


class LinearMixer(nn.Module):
  """Base gated linear-attention mixer: ``S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t``.

  Without overrides this is plain (optionally feature-mapped) linear attention, Katharopoulos et al.
  arXiv 2006.16236 eq. 4-5 in its unnormalised form (as fla's ``LinearAttention``), with a per-head output
  RMSNorm.

  Attributes:
    d_model: model width D.
    num_heads: heads H.
    expand_k: key width H*K = expand_k * D.
    expand_v: value width H*V = expand_v * D.
    feature_map: a ``FEATURE_MAPS`` name applied to q and k.
    qk_norm: L2-normalise q and k per head (after the feature map).
    use_short_conv: causal depthwise conv (``conv_size`` taps) on q, k, v after their projections.
    conv_size: taps of the short conv.
    conv_activation: SiLU after the short conv.
    output_gate: "swish" / "sigmoid": per-head RMSNorm(o) * act(g_proj(x)); "none": RMSNorm(o).
    norm_eps: epsilon of the output RMSNorm.
    implementation: passed to every ``pallas_kernels`` op call (None: auto; e.g. "reference", "xla").
    chunk_size: chunk length of the chunked op implementations (None: the op's default).
    selective_rope: None, or the options of ``selective_rope.SelectiveRoPE`` (``{}``: its defaults) to rotate
      q and k by input-dependent angles (Selective RoPE, arXiv 2511.17388).
    dtype: compute dtype (parameters are float32; states and gates are float32).
  """
  d_model: int
  num_heads: int
  expand_k: float = 1.0
  expand_v: float = 1.0
  feature_map: str = "identity"
  qk_norm: bool = False
  use_short_conv: bool = False
  conv_size: int = 4
  conv_activation: bool = True
  output_gate: str = "none"
  norm_eps: float = 1e-6
  implementation: Any = None
  chunk_size: int | None = None
  selective_rope: Any = None
  dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("d_model", "num_heads", "conv_size"):
      _checks.check_positive_int(name, getattr(self, name), allow_none=False)
    _checks.check_positive_int("chunk_size", self.chunk_size)
    for name in ("qk_norm", "use_short_conv", "conv_activation"):
      check_flag(name, getattr(self, name))
    for name in ("expand_k", "expand_v", "norm_eps"):
      check_positive_float(name, getattr(self, name))
    for name, expand in (("expand_k", self.expand_k), ("expand_v", self.expand_v)):
      width = self.d_model * expand
      if width != int(width) or int(width) % self.num_heads:
        raise ValueError(f"{name}: got {expand!r}; allowed: d_model * {name} = {width} must be a whole "
                         f"multiple of num_heads={self.num_heads}")
    get_feature_map(self.feature_map)
    _checks.check_choice("output_gate", self.output_gate, OUTPUT_GATES)
    check_implementation(self.implementation)
    check_selective_rope(self.selective_rope)
    super().__post_init__()

  @property
  def causal(self) -> bool:
    """Whether the mixer is causal (and so has a decode path)."""
    return True

  @property
  def op_options(self) -> dict[str, Any]:
    """``implementation`` and ``chunk_size`` for every ``pallas_kernels`` op call."""
    return dict(implementation=self.implementation, chunk_size=self.chunk_size)

  @property
  def key_dim(self) -> int:
    return int(self.d_model * self.expand_k) // self.num_heads

  @property
  def value_dim(self) -> int:
    return int(self.d_model * self.expand_v) // self.num_heads

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, decode: bool = False) -> jax.Array:
    """``x_BTD`` -> ``y_BTD`` (dtype of ``x``); see the module docstring for ``decode``."""
    check_mixer_input(x_BTD, self.d_model, segment_ids)
    if decode and not self.causal:
      raise ValueError(f"decode: got True; {type(self).__name__} is non-causal and has no decode path")
    mode = cache_mode(self, decode)
    x = nn.with_logical_constraint(x_BTD.astype(self.dtype), ("batch", "length", "embed"))
    log_decay = self._log_decay(x)
    q, k, v = self._qkv(x, log_decay, segment_ids, mode)
    if self.selective_rope is not None:
      q, k = SelectiveRoPE(q.shape[2], q.shape[3], dtype=self.dtype, name="selective_rope",
                           **self.selective_rope)(q, k, x, segment_ids=segment_ids, mode=mode)
    o_BTHV = self._mix(q, k, v, log_decay, x, segment_ids, mode, positions)
    y_BTD = self._output(o_BTHV, x).astype(x_BTD.dtype)
    if mode != "off":
      index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
      if mode == "step":
        index.value = index.value + x_BTD.shape[1]
    return nn.with_logical_constraint(y_BTD, ("batch", "length", "embed"))

  # -- building blocks ------------------------------------------------------------------------------------

  def dense(self, x: jax.Array, features: tuple[int, ...], axes: tuple[str | None, ...], name: str, *,
            use_bias: bool = False, bias_init: Callable = nn.initializers.zeros,
            in_axes: tuple[int, ...] = (-1,)) -> jax.Array:
    """DenseGeneral with logical axes ``axes`` on its kernel (input axes first) and its bias (outputs)."""
    out_axes = axes[len(in_axes):]
    return nn.DenseGeneral(features, axis=in_axes, use_bias=use_bias, dtype=self.dtype, name=name,
                           kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                           bias_init=nn.with_logical_partitioning(bias_init, out_axes))(x)

  def heads_proj(self, x: jax.Array, head_dim: int, name: str, segment_ids: jax.Array | None, mode: str,
                 conv: bool | None = None) -> jax.Array:
    """``(B, T, D) -> (B, T, H, head_dim)``, followed by the short conv when enabled."""
    y = self.dense(x, (self.num_heads, head_dim), ("embed", "heads", "head_dim"), f"{name}_proj")
    if self.use_short_conv if conv is None else conv:
      y = ShortConv(self.conv_size, self.conv_activation, self.dtype, name=f"{name}_conv")(y, segment_ids, mode)
    return nn.with_logical_constraint(y, ("batch", "length", "heads", "head_dim"))

  def recurrence(self, q, k, v, log_decay, segment_ids, mode, *, beta=None, name: str = "state", scale=None):
    """``pallas_kernels.linear_attention`` (or ``delta_rule`` when ``beta`` is given) with the decode cache
    ``name`` holding its ``(B, H, K, V)`` state."""
    op = pallas_kernels.linear_attention if beta is None else functools.partial(pallas_kernels.delta_rule,
                                                                                 beta=beta)
    fn = lambda s: op(q, k, v, log_decay=log_decay, scale=scale, initial_state=s, return_final_state=True,
                      segment_ids=segment_ids, **self.op_options)
    return with_state(self, name, fn, (q.shape[0], q.shape[2], q.shape[3], v.shape[3]), mode)

  def output_norm(self, o_BTHV: jax.Array, x_BTD: jax.Array, gate: str | None = None) -> jax.Array:
    """Per-head RMSNorm(o), times ``act(g_proj(x))`` unless the gate is "none"."""
    gate = self.output_gate if gate is None else gate
    o = HeadRMSNorm(eps=self.norm_eps, dtype=self.dtype, name="o_norm")(o_BTHV)
    if gate != "none":
      g = self.dense(x_BTD, o.shape[2:], ("embed", "heads", "head_dim"), "g_proj")
      o = o * _GATE_ACTIVATIONS[gate](g)
    return o

  def out_proj(self, o_BTHV: jax.Array) -> jax.Array:
    return self.dense(o_BTHV, (self.d_model,), ("heads", "head_dim", "embed"), "o_proj", in_axes=(-2, -1))

  # -- the steps a variant overrides ---------------------------------------------------------------------

  def _qkv(self, x, log_decay, segment_ids, mode):
    """Queries, keys ``(B, T, H, K)`` (feature map, optional L2 norm) and values ``(B, T, H, V)``."""
    del log_decay
    phi = get_feature_map(self.feature_map)
    q = phi(self.heads_proj(x, self.key_dim, "q", segment_ids, mode))
    k = phi(self.heads_proj(x, self.key_dim, "k", segment_ids, mode))
    v = self.heads_proj(x, self.value_dim, "v", segment_ids, mode)
    if self.qk_norm:
      q, k = l2_normalize(q), l2_normalize(k)
    return q, k, v

  def _log_decay(self, x):
    """``None`` (no decay), ``(B, T, H)`` or ``(B, T, H, K)`` float32 natural-log decay <= 0."""
    del x
    return None

  def _mix(self, q, k, v, log_decay, x, segment_ids, mode, positions):
    del x, positions
    return self.recurrence(q, k, v, log_decay, segment_ids, mode)

  def _output(self, o_BTHV, x):
    return self.out_proj(self.output_norm(o_BTHV, x))


def both_directions(q, k, v, log_decay_fwd, log_decay_bwd, segment_ids, scale=None, **op_options):
  """Causal ``linear_attention`` left-to-right and right-to-left (each including the diagonal token).

  Returns ``(o_fwd, o_bwd)`` aligned with the input positions: ``o_fwd[t] = scale * sum_{j<=t} q_t^T
  (prod_{j<r<=t} alpha_fwd[r]) k_j v_j^T`` and ``o_bwd[t] = scale * sum_{j>=t} q_t^T (prod_{t<=r<j}
  alpha_bwd[r]) k_j v_j^T`` (``alpha = exp(log_decay)``; the backward pass applies token ``r``'s gate when it
  moves from ``r + 1`` to ``r``). ``op_options``: ``implementation`` / ``chunk_size`` of the op.
  """
  o_fwd = pallas_kernels.linear_attention(q, k, v, log_decay=log_decay_fwd, scale=scale, segment_ids=segment_ids,
                                          **op_options)
  o_bwd = pallas_kernels.linear_attention(flip_time(q), flip_time(k), flip_time(v),
                                          log_decay=flip_time(log_decay_bwd), scale=scale,
                                          segment_ids=flip_time(segment_ids), **op_options)
  return o_fwd, flip_time(o_bwd)
