"""Gated softmax-family attention (Qiu et al. 2025, "Gated Attention for LLMs", arXiv 2505.06708).

    q, k, v = X W_Q, X W_K, X W_V        (GQA: KV <= H heads; QK-norm and RoPE on q, k)
    o_h     = normalizer(q_h k_hᵀ / sqrt(D)) v_h              (``pallas_kernels.attention``)
    y       = concat_h(o_h ⊙ act(X W_θ^h)) W_O                 (G1, eq. 5; other positions in ``gates``)

The gate's score is computed from the layer input ``X`` (after the pre-norm). Gate positions G1-G5,
granularity, head sharing, additive/multiplicative form, activation and the input-independent control are the
axes of the paper's Tables 1, 3 and 4 (:mod:`gated_jax.layers.gates`). Where a gate on ``q``/``k`` (G4/G3)
sits relative to QK-norm is not stated in the paper; we gate the projection after QK-norm (so a headwise
gate is not normalised away) and before RoPE [derived]. The two nonlinearity controls of Table 3 act on the
SDPA output before any G1 gate: ``sdpa_norm`` (per-head RMSNorm, "SDPA GroupNorm") and ``sdpa_silu``
(parameter-free SiLU).

Normalizers with learnable parameters (the op takes them as arrays):

* ``"ssmax"`` (arXiv 2501.19399 eq. 2): a per-head ``s`` (the paper learns one per layer and head),
  initialised to ``1 / log(max_len)`` so that ``s·log n = 1`` at the longest configured context, i.e. the
  layer starts as softmax there [derived].
* ``"selective"`` (Zhang et al., NeurIPS 2024, arXiv 2411.12892): the position-aware temperature
  of the official code, logits × ``(1 + e^{-e^β}·log n_i)``, with ``β`` per head initialised to 1.5 (the
  official GPT-2 pretraining value; the official code has one ``β`` per layer).
* ``"sigmoid"`` (arXiv 2409.04431 §3): the bias is ``-log(max_len)``, the maximum training length (as in
  AXLearn), so that decode and full-sequence calls agree.
* ``"entmax"`` (arXiv 1909.00015 §3): a per-head ``alpha = max(1.01, 1 + sigmoid(a))`` in (1, 2), ``a``
  initialised to 0 (alpha = 1.5) [derived]; :func:`entmax_alpha` maps the parameter to alpha.
* ``"lssa"`` / ``"lssar"`` (arXiv 2501.13428 §3): q and k are l2-normalised (after RoPE, which preserves norms)
  and the logits are ``log(head_dim) log(n_i) q̂·k̂`` (scale 1); ``"lssar"`` adds the re-weighting, and may be
  swapped in at evaluation for an ``"lssa"`` model (same parameters).

``key_weights`` (``(B, T)`` in [0, 1], optional) hides keys softly, as adding ``log w_j`` to the scores of key
``j`` (skip-the-middle's gated attention, arXiv 2506.21103): the values carry ``[w_j v_j, w_j]`` (in the KV
cache too) and the output is the ratio of the two parts, which equals ``Σ_j w_j e^{s_ij} v_j / Σ_j w_j
e^{s_ij}`` for the softmax-family normalizers (``KEY_WEIGHT_NORMALIZERS``); a row whose visible keys all have
weight 0 outputs 0.

All weights are ``N(0, 0.02)`` without biases, as in the official code (``initializer_range`` 0.02,
``attention_bias=False``). Decoding uses a KV cache (flax lm1b idiom): ``init(..., decode=True)`` on a
``(B, max_len, d_model)`` input sizes it; later ``decode=True`` calls append at ``cache_index`` and attend with
``query_offset = cache_index``.

Diagnostics: with ``"intermediates"`` mutable the layer sows ``first_token_attention`` and ``gate_mean``; with
``ATTENTION_WEIGHTS`` mutable it sows the weights themselves, ``(B, T, H, S)``, for entropy/sparsity studies.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

import pallas_kernels
from gated_jax.layers import gates, positional
from gated_jax.layers.norms import HeadRMSNorm
from gated_jax.layers.registry import MIXERS
from gated_jax.layers.selective_rope import SelectiveRoPE, check_selective_rope
from pallas_kernels.attention import normalizers

ATTENTION_WEIGHTS = "attention_weights"  # opt-in collection: apply(..., mutable=[ATTENTION_WEIGHTS])
KEY_WEIGHT_NORMALIZERS = ("softmax", "ssmax", "selective")  # normalise e^{s}: key weights are exact
LAYER_NORMALIZERS = (*normalizers.NORMALIZERS, "lssar")  # "lssar": LSSA with the re-weighting
ENTMAX_ALPHA = "entmax_alpha"  # the per-head parameter of "entmax" (pre-activation, see entmax_alpha)


def entmax_alpha(a_H: jax.Array) -> jax.Array:
  """alpha in [1.01, 2) from the layer's ``entmax_alpha`` parameter: ``max(1.01, 1 + sigmoid(a))``."""
  return jnp.maximum(normalizers.ENTMAX_MIN_ALPHA, 1.0 + jax.nn.sigmoid(a_H.astype(jnp.float32)))


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name}: got {value!r}; allowed: a positive int{' or None' if allow_none else ''}")


def _flag(name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"{name}: got {value!r}; allowed: True or False")


def _dense(features, axes, dtype, param_dtype, name, axis=-1) -> nn.DenseGeneral:
  init = nn.with_logical_partitioning(nn.initializers.normal(gates.INIT_STDDEV), axes)
  return nn.DenseGeneral(features, axis=axis, use_bias=False, kernel_init=init, dtype=dtype,
                         param_dtype=param_dtype, name=name)


@MIXERS.register("gated_attention")
class GatedAttention(nn.Module):
  """Multi-head (GQA) attention with an optional gate anywhere in the G1-G5 design space.

  Attributes:
    d_model: input/output width.
    num_heads: query heads ``H``.
    num_kv_heads: key/value heads ``KV`` (GQA, divides ``H``); None: ``H``.
    head_dim: ``D``; None: ``d_model // num_heads``.
    qk_norm: per-head RMSNorm on q and k (Qwen3 default).
    rope: rotary position embedding on q and k.
    rope_base: RoPE base.
    rope_fraction: fraction of each head's channels that rotate (partial rotary).
    selective_rope: None, or the options of ``selective_rope.SelectiveRoPE`` (``{}``: its defaults): rotate q
      and k by input-dependent angles instead of RoPE (arXiv 2511.17388; needs ``rope=False`` and no GQA).
    normalizer: score normalizer name from ``pallas_kernels.attention.normalizers.NORMALIZERS``.
    window: sliding window (keys with ``pos_q - pos_k < window``); None: global.
    max_len: longest training/decode length (sigmoid bias, SSMax init).
    implementation: passed to ``pallas_kernels.attention`` (None: auto).
    gate_position: ``"none"`` or ``"G1"``..``"G5"``.
    granularity: ``"elementwise"`` or ``"headwise"``.
    head_shared: one score shared across heads.
    gate_mode: ``"multiplicative"`` or ``"additive"``.
    gate_activation: ``"sigmoid"``, ``"silu"``, ``"ns_sigmoid"`` or ``"identity"``.
    input_dependent: False: a learnable zero-initialised tensor instead of ``X W_θ``.
    sdpa_norm: per-head RMSNorm on the SDPA output (control).
    sdpa_silu: parameter-free SiLU on the SDPA output (control).
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  d_model: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  qk_norm: bool = True
  rope: bool = True
  rope_base: float = 10000.0
  rope_fraction: float = 1.0
  selective_rope: Any = None
  normalizer: str = "softmax"
  window: int | None = None
  max_len: int = 2048
  implementation: Any = None
  gate_position: str = "G1"
  granularity: str = "elementwise"
  head_shared: bool = False
  gate_mode: str = "multiplicative"
  gate_activation: str = "sigmoid"
  input_dependent: bool = True
  sdpa_norm: bool = False
  sdpa_silu: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  accepts_key_weights: ClassVar[bool] = True

  def __post_init__(self):
    _positive_int("d_model", self.d_model)
    _positive_int("num_heads", self.num_heads)
    _positive_int("num_kv_heads", self.num_kv_heads, allow_none=True)
    _positive_int("head_dim", self.head_dim, allow_none=True)
    _positive_int("window", self.window, allow_none=True)
    _positive_int("max_len", self.max_len)
    if self.num_heads % self.kv_heads:
      raise ValueError(f"num_kv_heads: got {self.kv_heads}; allowed: a divisor of num_heads={self.num_heads}")
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"head_dim: got None with d_model={self.d_model} not divisible by num_heads="
                       f"{self.num_heads}; allowed: an explicit head_dim")
    for name in ("qk_norm", "rope", "sdpa_norm", "sdpa_silu"):
      _flag(name, getattr(self, name))
    if self.rope:
      positional.rotary_dim(self.dim, self.rope_fraction)
      positional.inverse_frequencies(2, self.rope_base)
    check_selective_rope(self.selective_rope)
    if self.selective_rope is not None and (self.rope or self.kv_heads != self.num_heads):
      raise ValueError(f"selective_rope: got {self.selective_rope!r} with rope={self.rope}, num_kv_heads="
                       f"{self.kv_heads}; allowed: rope=False and num_kv_heads == num_heads={self.num_heads}")
    if not isinstance(self.normalizer, str) or self.normalizer not in LAYER_NORMALIZERS:
      raise ValueError(f"normalizer: got {self.normalizer!r}; allowed: {', '.join(map(repr, LAYER_NORMALIZERS))}")
    self.gate_spec.validate()
    super().__post_init__()

  @property
  def kv_heads(self) -> int:
    return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

  @property
  def dim(self) -> int:
    return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

  @property
  def gate_spec(self) -> gates.GateSpec:
    return gates.GateSpec(self.gate_position, self.granularity, self.head_shared, self.gate_mode,
                          self.gate_activation, self.input_dependent)

  def _gate(self, x_BTD: jax.Array, position: str, target: jax.Array, scores: list) -> jax.Array:
    """Applies the gate to ``target`` when the layer's gate sits at ``position``."""
    spec = self.gate_spec
    if spec.position != position:
      return target
    heads = None if position == "G5" else target.shape[2]
    axis = "kv_heads" if position in ("G2", "G3") else "heads"
    score = gates.Gate(spec, heads, target.shape[-1], axis, self.dtype, self.param_dtype, name="gate")(x_BTD)
    scores.append(score)
    return gates.apply_gate(target, score, spec.mode)

  def _normalizer(self) -> str | normalizers.Normalizer:
    """The op's normalizer, with this layer's parameters for the learnable ones (module docstring)."""
    heads = ("heads",)
    if self.normalizer == "ssmax":
      init = nn.with_logical_partitioning(nn.initializers.constant(1.0 / math.log(max(self.max_len, 2))), heads)
      return normalizers.SSMax(s=self.param("ssmax_s", init, (self.num_heads,), self.param_dtype))
    if self.normalizer == "selective":
      init = nn.with_logical_partitioning(nn.initializers.constant(1.5), heads)
      beta_H = self.param("selective_beta", init, (self.num_heads,), self.param_dtype).astype(jnp.float32)
      return normalizers.Selective(temperature=None, position_scale=jnp.exp(-jnp.exp(beta_H)))
    if self.normalizer == "sigmoid":
      return normalizers.Sigmoid(bias=-math.log(self.max_len))
    if self.normalizer == "entmax":
      a_H = self.param(ENTMAX_ALPHA, nn.with_logical_partitioning(nn.initializers.zeros, heads), (self.num_heads,),
                       self.param_dtype)
      return normalizers.Entmax(alpha=entmax_alpha(a_H))
    if self.normalizer in ("lssa", "lssar"):
      return normalizers.LSSA(head_dim=max(self.dim, 2), reweight=self.normalizer == "lssar")
    return self.normalizer

  def _check_inputs(self, x_BTD, segment_ids, positions, decode, key_weights) -> None:
    if not hasattr(x_BTD, "ndim") or x_BTD.ndim != 3 or x_BTD.shape[-1] != self.d_model:
      raise ValueError(f"x_BTD: got shape {getattr(x_BTD, 'shape', type(x_BTD))}; allowed: (batch, seq, "
                       f"{self.d_model})")
    if positions is not None and tuple(positions.shape) != tuple(x_BTD.shape[:2]):
      raise ValueError(f"positions: got shape {tuple(positions.shape)}; allowed: {tuple(x_BTD.shape[:2])}")
    if decode and segment_ids is not None:
      raise ValueError("segment_ids: got an array with decode=True; allowed: None (the KV cache holds one "
                       "sequence per batch row)")
    if key_weights is not None:
      if tuple(key_weights.shape) != tuple(x_BTD.shape[:2]):
        raise ValueError(f"key_weights: got shape {tuple(key_weights.shape)}; allowed: {tuple(x_BTD.shape[:2])}")
      if self.normalizer not in KEY_WEIGHT_NORMALIZERS:
        raise ValueError(f"key_weights: given with normalizer={self.normalizer!r}; allowed with "
                         f"{', '.join(map(repr, KEY_WEIGHT_NORMALIZERS))} (they normalise e^score)")

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, decode: bool = False,
               key_weights: jax.Array | None = None) -> jax.Array:
    """``x_BTD`` ``(B, T, d_model)`` -> ``(B, T, d_model)`` in ``x_BTD.dtype``.

    Args:
      x_BTD: layer input (after the pre-norm); also the gate's input.
      segment_ids: ``(B, T)`` packed-sequence ids (keys visible only within a segment); not with decode.
      positions: ``(B, T)`` int positions for RoPE; default ``arange(T)`` (``cache_index + arange(T)`` in
        decode).
      decode: read and append to the ``"cache"`` collection (see module docstring).
      key_weights: ``(B, T)`` soft key weights in [0, 1] (see module docstring); None: all 1.
    """
    self._check_inputs(x_BTD, segment_ids, positions, decode, key_weights)
    batch, seq, _ = x_BTD.shape
    heads, kv_heads, dim = self.num_heads, self.kv_heads, self.dim
    x_BTD = nn.with_logical_constraint(x_BTD.astype(self.dtype), ("batch", "length", "embed"))
    scores: list[jax.Array] = []

    q_BTHK = _dense((heads, dim), ("embed", "heads", "head_dim"), self.dtype, self.param_dtype, "query")(x_BTD)
    k_BTNK = _dense((kv_heads, dim), ("embed", "kv_heads", "head_dim"), self.dtype, self.param_dtype,
                    "key")(x_BTD)
    v_BTNK = _dense((kv_heads, dim), ("embed", "kv_heads", "head_dim"), self.dtype, self.param_dtype,
                    "value")(x_BTD)
    if self.qk_norm:
      q_BTHK = HeadRMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="q_norm")(q_BTHK)
      k_BTNK = HeadRMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="k_norm")(k_BTNK)
    v_BTNK = self._gate(x_BTD, "G2", v_BTNK, scores)
    k_BTNK = self._gate(x_BTD, "G3", k_BTNK, scores)
    q_BTHK = self._gate(x_BTD, "G4", q_BTHK, scores)
    if key_weights is not None:  # values [w v, w]: numerator and denominator of the key-weighted average
      w_BTN1 = jnp.broadcast_to(key_weights.astype(v_BTNK.dtype)[:, :, None, None], (*v_BTNK.shape[:3], 1))
      v_BTNK = jnp.concatenate([v_BTNK * w_BTN1, w_BTN1], axis=-1)

    query_offset, cache = None, None
    if decode:
      cache = self._cache(k_BTNK, v_BTNK)
      if cache is not None:
        query_offset = cache[2].value
    if positions is None:
      positions = positional.default_positions(batch, seq, 0 if query_offset is None else query_offset)
    if self.rope:
      q_BTHK = positional.apply_rope(q_BTHK, positions, base=self.rope_base, fraction=self.rope_fraction)
      k_BTNK = positional.apply_rope(k_BTNK, positions, base=self.rope_base, fraction=self.rope_fraction)
    if self.selective_rope is not None:
      mode = "off" if not decode else "init" if cache is None else "step"
      q_BTHK, k_BTNK = SelectiveRoPE(heads, dim, dtype=self.dtype, name="selective_rope", **self.selective_rope)(
          q_BTHK, k_BTNK, x_BTD, segment_ids=segment_ids, mode=mode)
    scale = None
    if self.normalizer in ("lssa", "lssar"):  # cosine logits (module docstring)
      q_BTHK, k_BTNK = (_l2_normalize(x) for x in (q_BTHK, k_BTNK))
      scale = 1.0
    if cache is not None:
      k_BTNK, v_BTNK = self._append(cache, k_BTNK, v_BTNK)

    attend = dict(normalizer=self._normalizer(), window=self.window, segment_ids=segment_ids,
                  query_offset=query_offset, implementation=self.implementation, scale=scale)
    spec = self.gate_spec
    fused = (spec.position == "G1" and spec.mode == "multiplicative" and not (self.sdpa_norm or self.sdpa_silu)
             and key_weights is None)
    gate_score = gates.Gate(spec, heads, dim, "heads", self.dtype, self.param_dtype, name="gate")(x_BTD) \
        if fused else None
    if fused:
      scores.append(gate_score)
      gate_score = jnp.broadcast_to(gate_score, (batch, seq, heads, gate_score.shape[-1]))
    o_BTHK = pallas_kernels.attention(q_BTHK, k_BTNK, v_BTNK, gate=gate_score, **attend)
    if key_weights is not None:
      o32, weight = o_BTHK[..., :-1].astype(jnp.float32), o_BTHK[..., -1:].astype(jnp.float32)
      o_BTHK = jnp.where(weight > 0, o32 / jnp.where(weight > 0, weight, 1.0), 0.0).astype(o_BTHK.dtype)
    if self.sdpa_norm:
      o_BTHK = HeadRMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, scale_axes=("heads", "head_dim"),
                           name="sdpa_norm")(o_BTHK)
    if self.sdpa_silu:
      o_BTHK = jax.nn.silu(o_BTHK.astype(jnp.float32)).astype(o_BTHK.dtype)
    if not fused:
      o_BTHK = self._gate(x_BTD, "G1", o_BTHK, scores)

    y_BTD = _dense(self.d_model, ("heads", "head_dim", "embed"), self.dtype, self.param_dtype, "out",
                   axis=(-2, -1))(o_BTHK)
    y_BTD = self._gate(x_BTD, "G5", y_BTD, scores)
    if self.is_mutable_collection("intermediates"):
      self._sow_diagnostics(q_BTHK, k_BTNK, scores, attend)
    if self.is_mutable_collection(ATTENTION_WEIGHTS):
      self._sow_weights(q_BTHK, k_BTNK, attend)
    return nn.with_logical_constraint(y_BTD, ("batch", "length", "embed")).astype(x_BTD.dtype)

  def _cache(self, k_BTNK, v_BTNK):
    """The ``(key, value, index)`` cache variables, or None while ``init`` creates them."""
    initialized = self.has_variable("cache", "cached_key")
    key = self.variable("cache", "cached_key", jnp.zeros, k_BTNK.shape, k_BTNK.dtype)
    value = self.variable("cache", "cached_value", jnp.zeros, v_BTNK.shape, v_BTNK.dtype)
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    return (key, value, index) if initialized else None

  @staticmethod
  def _append(cache, k_BTNK, v_BTNK):
    """Writes this chunk at ``cache_index``; returns the full ``(B, max_len, KV, D)`` keys and values."""
    key, value, index = cache
    start = (0, index.value, 0, 0)
    key.value = jax.lax.dynamic_update_slice(key.value, k_BTNK.astype(key.value.dtype), start)
    value.value = jax.lax.dynamic_update_slice(value.value, v_BTNK.astype(value.value.dtype), start)
    index.value = index.value + k_BTNK.shape[1]
    return key.value, value.value

  def _sow_weights(self, q_BTHK, k_BSNK, attend) -> None:
    """The attention weights ``(B, T, H, S)`` under ``ATTENTION_WEIGHTS`` (opt-in: O(T·S) memory per head),
    computed by attending to one-hot values (value ``j`` is ``e_j``), so every normalizer's exact zeros stay 0."""
    batch, keys, kv_heads, _ = k_BSNK.shape
    eye_BSNS = jnp.broadcast_to(jnp.eye(keys, dtype=q_BTHK.dtype)[None, :, None, :], (batch, keys, kv_heads, keys))
    self.sow(ATTENTION_WEIGHTS, "weights", pallas_kernels.attention(q_BTHK, k_BSNK, eye_BSNS, **attend))

  def _sow_diagnostics(self, q_BTHK, k_BSNK, scores, attend) -> None:
    """``gate_mean`` (scalar) and ``first_token_attention`` ``(H,)``: the weight on key 0, computed by
    attending to a one-hot value of key position 0."""
    if scores:
      self.sow("intermediates", "gate_mean", jnp.mean(scores[0]))
    onehot_BSN1 = jnp.zeros(k_BSNK.shape[:3] + (1,), q_BTHK.dtype).at[:, 0].set(1)
    first_BTH1 = pallas_kernels.attention(q_BTHK, k_BSNK, onehot_BSN1, **attend)
    self.sow("intermediates", "first_token_attention", jnp.mean(first_BTH1.astype(jnp.float32), axis=(0, 1, 3)))


def _l2_normalize(x_BTHK: jax.Array) -> jax.Array:
  x = x_BTHK.astype(jnp.float32)
  return (x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-12))).astype(x_BTHK.dtype)
