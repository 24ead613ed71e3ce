"""Shared skeleton of the gated linear-attention mixers: projections, short convs, the recurrent-state cache
and the (gated) output norm.

Every mixer in this family is ``x -> (q, k, v, log decay) -> recurrence -> norm/gate -> o_proj``; a subclass
overrides only the steps its paper changes (``_qkv``, ``_log_decay``, ``_mix``, ``_output``). The
recurrence itself is always a ``pallas_kernels`` op. Decode follows the flax lm1b idiom: ``model.init(...,
decode=True)`` creates the ``"cache"`` collection (recurrent state ``(B, H, K, V)`` float32, conv windows,
``cache_index``), and later ``decode=True`` calls continue the state from it: a one-token call runs the ops'
step form (``linear_attention_step`` / ``delta_rule_step``, ``O(K V)`` per head), a longer one the chunked op
with ``initial_state`` / ``return_final_state``, so prefill + token-by-token equals the full-sequence call.

Defaults follow flash-linear-attention's layers (fla, the implementation every mixer here cites), so that a
layer trained with fla computes the same function here once its weights are imported
(``gated_jax.layers.weight_import``): every projection and short-conv kernel starts at ``N(0, 0.02)`` (fla's
models re-initialise every ``nn.Linear`` / ``nn.Conv1d`` with ``initializer_range`` 0.02, biases 0), the output
RMSNorm has epsilon 1e-5 (the layers' ``norm_eps``), and ``num_kv_heads`` shares keys and values between
groups of query heads as fla's GQA layers do (query head ``h`` reads kv head ``h // (H / KV)``). Each departure
is a field: ``init_std=None`` gives LeCun-normal projections and PyTorch-default conv kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels import _checks
from pallas_kernels.linear_attention import check_kernel_config
from gated_jax.layers.conv import ShortConv
from gated_jax.layers.feature_maps import QK_NORMS, get_feature_map
from gated_jax.layers.norms import HeadRMSNorm, RMSNorm
from gated_jax.layers.registry import check_mixer_input
from gated_jax.layers.selective_rope import SelectiveRoPE, check_selective_rope

OUTPUT_GATES = ("swish", "sigmoid", "none")
NORM_SCOPES = ("head", "all_heads")
FLA_INIT_STD = 0.02  # fla's initializer_range
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


def run_recurrence(q, k, v, log_decay, state, *, beta=None, scale=None, segment_ids=None, implementation=None,
                   chunk_size=None, kernel_config=None):
  """``(o, final_state)`` of ``linear_attention`` (``delta_rule`` when ``beta`` is given) from ``state``.

  A single token continuing a state (a decode step) runs the ops' one-step form (``linear_attention_step`` /
  ``delta_rule_step``: ``O(K V)`` per head, no chunk padding); anything longer (prefill) the chunked op.
  """
  if state is not None and q.shape[1] == 1:
    step = lambda x: None if x is None else x[:, 0]
    kwargs = dict(log_decay=step(log_decay), scale=scale, implementation=step_implementation(implementation))
    if beta is None:
      o, state = pallas_kernels.linear_attention_step(step(q), step(k), step(v), state, **kwargs)
    else:
      o, state = pallas_kernels.delta_rule_step(step(q), step(k), step(v), step(beta), state, **kwargs)
    return o[:, None], state
  op = pallas_kernels.linear_attention if beta is None else functools.partial(pallas_kernels.delta_rule, beta=beta)
  return op(q, k, v, log_decay=log_decay, scale=scale, initial_state=state, return_final_state=True,
            segment_ids=segment_ids, implementation=implementation, chunk_size=chunk_size,
            kernel_config=kernel_config)


def step_implementation(implementation):
  """The names in ``implementation`` that the step ops have ("reference", "xla"); None (auto) if none."""
  names = (implementation,) if isinstance(implementation, str) else tuple(implementation or ())
  return tuple(n for n in names if n in ("reference", "xla")) or None


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
    num_kv_heads: key/value heads KV (GQA, divides H; None: H), for the mixers whose fla layer has them.
    expand_k: key width H*K = expand_k * D.
    expand_v: value width H*V = expand_v * D.
    feature_map: a ``FEATURE_MAPS`` name applied to q and k (fla's ``feature_map`` / ``qk_activation``).
    qk_norm: "none", "l2" (``x / sqrt(sum x^2 + 1e-6)`` per head) or "sum" (``x / sum x``, fla's DeltaNet
      option), after the feature map.
    use_short_conv: causal depthwise conv (``conv_size`` taps) on q, k, v after their projections.
    conv_size: taps of the short conv.
    conv_activation: SiLU after the short conv.
    conv_bias: a bias in the short conv (fla ``conv_bias``).
    output_gate: "swish" / "sigmoid": RMSNorm(o) * act(g_proj(x)); "none": RMSNorm(o).
    norm_scope: "head": the output RMSNorm normalises each head, with one scale of width V shared by the
      heads (fla's ``FusedRMSNormGated`` / ``RMSNorm(head_v_dim)``); "all_heads": one RMSNorm over all
      ``H*V`` channels with a per-channel scale (fla's HGRN2).
    norm_eps: epsilon of the output RMSNorm (fla's layers: 1e-5).
    init_std: stddev of the normal init of every projection and short-conv kernel (fla: 0.02); None:
      LeCun-normal projections and PyTorch-default ``U(-1/sqrt(K), 1/sqrt(K))`` conv kernels.
    implementation: passed to every ``pallas_kernels`` op call (None: auto; e.g. "reference", "xla").
    chunk_size: chunk length of the chunked op implementations (None: the op's default).
    kernel_config: ``pallas_kernels.linear_attention.Config`` for the Pallas implementations (None: their
      per-device defaults).
    selective_rope: None, or the options of ``selective_rope.SelectiveRoPE`` (``{}``: its defaults) to rotate
      q and k by input-dependent angles (Selective RoPE, arXiv 2511.17388).
    dtype: compute dtype (parameters are float32; states and gates are float32).
  """
  supports_kv_heads: ClassVar[bool] = True  # False where keys/values cannot be shared by query heads

  d_model: int
  num_heads: int
  num_kv_heads: int | None = None
  expand_k: float = 1.0
  expand_v: float = 1.0
  feature_map: str = "identity"
  qk_norm: str = "none"
  use_short_conv: bool = False
  conv_size: int = 4
  conv_activation: bool = True
  conv_bias: bool = False
  output_gate: str = "none"
  norm_scope: str = "head"
  norm_eps: float = 1e-5
  init_std: float | None = FLA_INIT_STD
  implementation: Any = None
  chunk_size: int | None = None
  kernel_config: Any = None
  selective_rope: Any = None
  dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("d_model", "num_heads", "conv_size"):
      _checks.check_positive_int(name, getattr(self, name), allow_none=False)
    _checks.check_positive_int("chunk_size", self.chunk_size)
    _checks.check_positive_int("num_kv_heads", self.num_kv_heads)
    if self.num_kv_heads is not None:
      if not self.supports_kv_heads:
        raise ValueError(f"num_kv_heads: got {self.num_kv_heads!r}; allowed: None ({type(self).__name__} has no "
                         "shared key/value heads)")
      if self.num_heads % self.num_kv_heads:
        raise ValueError(f"num_kv_heads: got {self.num_kv_heads}; allowed: a divisor of num_heads={self.num_heads}")
    for name in ("use_short_conv", "conv_activation", "conv_bias"):
      check_flag(name, getattr(self, name))
    for name in ("expand_k", "expand_v", "norm_eps"):
      check_positive_float(name, getattr(self, name))
    if self.init_std is not None:
      check_positive_float("init_std", self.init_std)
    for name, expand in (("expand_k", self.expand_k), ("expand_v", self.expand_v)):
      width = self.d_model * expand
      if width != int(width) or int(width) % self.num_heads:
        raise ValueError(f"{name}: got {expand!r}; allowed: d_model * {name} = {width} must be a whole "
                         f"multiple of num_heads={self.num_heads}")
    get_feature_map(self.feature_map)
    _checks.check_choice("qk_norm", self.qk_norm, tuple(QK_NORMS))
    _checks.check_choice("output_gate", self.output_gate, OUTPUT_GATES)
    _checks.check_choice("norm_scope", self.norm_scope, NORM_SCOPES)
    check_implementation(self.implementation)
    check_kernel_config(self.kernel_config)
    check_selective_rope(self.selective_rope)
    if self.selective_rope is not None and self.kv_heads != self.num_heads:
      raise ValueError(f"num_kv_heads: got {self.num_kv_heads}; allowed: None or num_heads={self.num_heads} with "
                       "selective_rope (its angles are per query head)")
    super().__post_init__()

  @property
  def causal(self) -> bool:
    """Whether the mixer is causal (and so has a decode path)."""
    return True

  @property
  def op_options(self) -> dict[str, Any]:
    """``implementation``, ``chunk_size`` and ``kernel_config`` for every ``pallas_kernels`` op call."""
    return dict(implementation=self.implementation, chunk_size=self.chunk_size, kernel_config=self.kernel_config)

  @property
  def key_dim(self) -> int:
    return int(self.d_model * self.expand_k) // self.num_heads

  @property
  def value_dim(self) -> int:
    return int(self.d_model * self.expand_v) // self.num_heads

  @property
  def kv_heads(self) -> int:
    """Heads of the key projection (KV with GQA, else H)."""
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def value_heads(self) -> int:
    """Heads of the value projection (the key heads unless a variant has separate value heads)."""
    return self.kv_heads

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
    """DenseGeneral with logical axes ``axes`` on its kernel (input axes first) and its bias (outputs); the
    kernel starts at ``N(0, init_std)`` (LeCun normal when ``init_std`` is None)."""
    out_axes = axes[len(in_axes):]
    init = nn.initializers.lecun_normal() if self.init_std is None else nn.initializers.normal(self.init_std)
    return nn.DenseGeneral(features, axis=in_axes, use_bias=use_bias, dtype=self.dtype, name=name,
                           kernel_init=nn.with_logical_partitioning(init, axes),
                           bias_init=nn.with_logical_partitioning(bias_init, out_axes))(x)

  def heads_proj(self, x: jax.Array, head_dim: int, name: str, segment_ids: jax.Array | None, mode: str,
                 heads: int | None = None) -> jax.Array:
    """``(B, T, D) -> (B, T, heads, head_dim)`` (``heads`` default H), followed by the short conv when enabled."""
    heads = self.num_heads if heads is None else heads
    head_axis = "heads" if heads == self.num_heads else "kv_heads"
    y = self.dense(x, (heads, head_dim), ("embed", head_axis, "head_dim"), f"{name}_proj")
    if self.use_short_conv:
      y = ShortConv(self.conv_size, self.conv_activation, self.dtype, use_bias=self.conv_bias,
                    init_std=self.init_std, channel_axes=(head_axis, "head_dim"),
                    name=f"{name}_conv")(y, segment_ids, mode)
    return nn.with_logical_constraint(y, ("batch", "length", head_axis, "head_dim"))

  def recurrence(self, q, k, v, log_decay, segment_ids, mode, *, beta=None, name: str = "state", scale=None):
    """``pallas_kernels.linear_attention`` (or ``delta_rule`` when ``beta`` is given) with the decode cache
    ``name`` holding its ``(B, H, K, V)`` state (see :func:`run_recurrence`)."""
    fn = lambda s: run_recurrence(q, k, v, log_decay, s, beta=beta, scale=scale, segment_ids=segment_ids,
                                  **self.op_options)
    return with_state(self, name, fn, (q.shape[0], q.shape[2], q.shape[3], v.shape[3]), mode)

  def output_norm(self, o_BTHV: jax.Array, x_BTD: jax.Array, gate: str | None = None) -> jax.Array:
    """RMSNorm(o) (per head or over all heads, ``norm_scope``), times ``act(g_proj(x))`` unless the gate is
    "none"."""
    gate = self.output_gate if gate is None else gate
    if self.norm_scope == "head":
      o = HeadRMSNorm(eps=self.norm_eps, dtype=self.dtype, name="o_norm")(o_BTHV)
    else:
      batch, seq, heads, value_dim = o_BTHV.shape
      flat = RMSNorm(eps=self.norm_eps, dtype=self.dtype, scale_axes=("heads",), name="o_norm")(
          o_BTHV.reshape(batch, seq, heads * value_dim))
      o = flat.reshape(o_BTHV.shape)
    if gate != "none":
      g = self.dense(x_BTD, o.shape[2:], ("embed", "heads", "head_dim"), "g_proj")
      o = o * _GATE_ACTIVATIONS[gate](g)
    return o

  def out_proj(self, o_BTHV: jax.Array) -> jax.Array:
    return self.dense(o_BTHV, (self.d_model,), ("heads", "head_dim", "embed"), "o_proj", in_axes=(-2, -1))

  # -- the steps a variant overrides ---------------------------------------------------------------------

  def _qkv(self, x, log_decay, segment_ids, mode):
    """Queries ``(B, T, H, K)``, keys ``(B, T, KV, K)`` (feature map, then ``qk_norm``) and values
    ``(B, T, value_heads, V)``."""
    del log_decay
    phi, norm = get_feature_map(self.feature_map), QK_NORMS[self.qk_norm]
    q = norm(phi(self.heads_proj(x, self.key_dim, "q", segment_ids, mode)))
    k = norm(phi(self.heads_proj(x, self.key_dim, "k", segment_ids, mode, heads=self.kv_heads)))
    v = self.heads_proj(x, self.value_dim, "v", segment_ids, mode, heads=self.value_heads)
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
  moves from ``r + 1`` to ``r``). ``op_options``: ``implementation`` / ``chunk_size`` / ``kernel_config`` of the op.
  """
  o_fwd = pallas_kernels.linear_attention(q, k, v, log_decay=log_decay_fwd, scale=scale, segment_ids=segment_ids,
                                          **op_options)
  o_bwd = pallas_kernels.linear_attention(flip_time(q), flip_time(k), flip_time(v),
                                          log_decay=flip_time(log_decay_bwd), scale=scale,
                                          segment_ids=flip_time(segment_ids), **op_options)
  return o_fwd, flip_time(o_bwd)
