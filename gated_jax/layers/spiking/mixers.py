"""Spiking sequence mixers (``MIXERS``), with sequence position as the neurons' time axis: causal, and decoded
token by token with every membrane (and attention state) in the ``"cache"`` collection.

* ``"spiking_self_attention"`` — Spikformer's spiking self-attention (Zhou et al., ICLR 2023, arXiv
  2209.15425, §3.3 eq. 11-14), made causal: binary ``Q``, ``K``, ``V`` from LIF neurons, attention
  ``(Q Kᵀ ⊙ causal) V · s`` without softmax — the causal form is unnormalised linear attention, computed by
  ``pallas_kernels.linear_attention`` (its recurrent state is the decode cache) — then a LIF on the result
  (threshold 0.5 as Spikformer's attention neuron) and the output projection. Spikformer's BatchNorms are
  left out (batch statistics have no place in a causal LM); its neurons are SpikingJelly's LIF with τ = 2,
  hard reset in the same step and a sigmoid surrogate (α = 4), here ``β = 0.5`` with unscaled input.
* ``"sparse_tcam"`` — SymbolicLight's SparseTCAM block (Liu, arXiv 2605.21333; ``model.py`` of
  SymbolicLight-V1): a LIF spike encoder over positions (leak 0.95, threshold 1, reset to zero), a decay
  path ``h_t = d h_{t-1} + (1 - d) W_tcam s_t`` per head (``d = sigmoid(3)`` initially), spike-gated local
  softmax attention on the continuous input (RoPE; keys visible only where the key position spiked; a query
  position without spikes outputs 0) and the learned fusion ``g·attn + (1 - g)·decay``, ``g = sigmoid(0)``
  initially, then ``W_out``. The residual and norm are the LM block's (pre-norm). Departures: the block
  re-encodes its input with its own LIF (SymbolicLight encodes once at the embedding and thresholds later
  LayerNorm outputs without a membrane), the membrane is not clamped to [-3, 3], the training surrogate is
  ``atan`` (theirs is ``1/(1 + (2x)²)``) and gradients flow through time, and the 4 global anchor keys are
  not implemented (they matter only where the window is shorter than the sequence).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import pallas_kernels
from gated_jax.layers import positional
from gated_jax.layers.collections import sow_metric
from gated_jax.layers.linear_base import check_flag, check_implementation, check_positive_float, with_state
from gated_jax.layers.registry import MIXERS
from gated_jax.layers.spiking.neurons import LIF, cache_mode
from pallas_kernels import _checks
from pallas_kernels.spiking_scan import surrogates

_INIT_STDDEV = 0.02


class _SpikingMixer(nn.Module):
  """Shared fields, checks and projections.

  Attributes:
    d_model: model width.
    num_heads: heads ``H``.
    head_dim: per-head width; None: ``d_model // num_heads``.
    surrogate: surrogate of every LIF; surrogate_scale: its scale (None: the default).
    rate_loss: the LIFs also sow their spike rate as the ``spike_rate`` auxiliary loss.
    implementation: passed to the ``pallas_kernels`` op of the mixer (attention / linear attention).
    dtype: compute dtype (membranes and states stay float32).
  """
  d_model: int
  num_heads: int
  head_dim: int | None = None
  surrogate: str = "atan"
  surrogate_scale: float | None = None
  rate_loss: bool = False
  implementation: Any = None
  dtype: Any = jnp.float32

  def __post_init__(self):
    for name in ("d_model", "num_heads"):
      _checks.check_positive_int(name, getattr(self, name), allow_none=False)
    _checks.check_positive_int("head_dim", self.head_dim)
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(f"head_dim: got None with d_model={self.d_model} not divisible by num_heads="
                       f"{self.num_heads}; allowed: an explicit head_dim")
    check_flag("rate_loss", self.rate_loss)
    check_implementation(self.implementation)
    surrogates.get(self.surrogate, self.surrogate_scale)
    super().__post_init__()

  @property
  def dim(self) -> int:
    return self.d_model // self.num_heads if self.head_dim is None else self.head_dim

  def check_inputs(self, x_BTD, segment_ids) -> None:
    _checks.check_array("x_BTD", x_BTD, rank=3, layout="(batch, seq, d_model)")
    if x_BTD.shape[-1] != self.d_model:
      raise ValueError(f"x_BTD: got last dim {x_BTD.shape[-1]}; allowed: d_model={self.d_model}")
    if segment_ids is not None:
      raise ValueError(f"segment_ids: got an array; allowed: None ({type(self).__name__}'s membranes would carry "
                       "over between packed sequences; train it with data.packing=False)")

  def heads(self, x_BTD, name: str, init=nn.initializers.lecun_normal()) -> jax.Array:
    """``(B, T, D) -> (B, T, H, head_dim)`` (LeCun-normal by default: unit-variance inputs to the neurons)."""
    return nn.DenseGeneral((self.num_heads, self.dim), use_bias=False, dtype=self.dtype, name=name,
                           kernel_init=nn.with_logical_partitioning(init, ("embed", "heads", "head_dim")))(x_BTD)

  def out(self, o_BTHK) -> jax.Array:
    init = nn.with_logical_partitioning(nn.initializers.normal(_INIT_STDDEV), ("heads", "head_dim", "embed"))
    return nn.DenseGeneral(self.d_model, axis=(-2, -1), use_bias=False, dtype=self.dtype, kernel_init=init,
                           name="out")(o_BTHK)

  def lif(self, name: str, **fields) -> LIF:
    return LIF(surrogate=self.surrogate, surrogate_scale=self.surrogate_scale, rate_loss=self.rate_loss,
               name=name, **fields)


def _flat_heads(x_BTHK):
  return x_BTHK.reshape(*x_BTHK.shape[:2], -1)


@MIXERS.register("spiking_self_attention")
class SpikingSelfAttention(_SpikingMixer):
  """Causal Spikformer spiking self-attention (module docstring).

  Attributes:
    beta: decay of every LIF (SpikingJelly τ = 2 -> 0.5).
    threshold: threshold of the Q, K, V neurons.
    attention_threshold: threshold of the neuron on the attention output (Spikformer: 0.5).
    scale: the constant ``s`` of ``Q Kᵀ V · s`` (Spikformer: 0.125).
    reset, reset_delay, detach_reset: LIF reset (SpikingJelly's default: hard, same step, not detached).
  """
  surrogate: str = "sigmoid"
  surrogate_scale: float | None = 4.0
  beta: float = 0.5
  threshold: float = 1.0
  attention_threshold: float = 0.5
  scale: float = 0.125
  reset: str = "zero"
  reset_delay: bool = False
  detach_reset: bool = False

  def __post_init__(self):
    for name in ("threshold", "attention_threshold", "scale"):
      check_positive_float(name, getattr(self, name))
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, decode: bool = False) -> jax.Array:
    """``x_BTD`` -> ``y_BTD`` (dtype of ``x``); see the module docstring."""
    del positions  # the neurons' membranes carry order; no position encoding
    self.check_inputs(x_BTD, segment_ids)
    x = x_BTD.astype(self.dtype)
    neuron = dict(beta=self.beta, reset=self.reset, reset_delay=self.reset_delay, detach_reset=self.detach_reset)
    qkv = []
    for name in ("q", "k", "v"):
      h_BTHK = self.heads(x, f"{name}_proj")
      spikes = self.lif(f"{name}_lif", threshold=self.threshold, **neuron)(_flat_heads(h_BTHK), decode=decode)
      qkv.append(spikes.reshape(h_BTHK.shape))
    batch = x.shape[0]

    def attend(state):
      return pallas_kernels.linear_attention(*qkv, scale=self.scale, initial_state=state, return_final_state=True,
                                             implementation=self.implementation)

    o_BTHK = with_state(self, "state", attend, (batch, self.num_heads, self.dim, self.dim),
                        cache_mode(self, decode, "state"))
    o_spikes = self.lif("attention_lif", threshold=self.attention_threshold, **neuron)(_flat_heads(o_BTHK),
                                                                                    decode=decode)
    return self.out(o_spikes.reshape(o_BTHK.shape)).astype(x_BTD.dtype)


@MIXERS.register("sparse_tcam")
class SparseTCAM(_SpikingMixer):
  """SymbolicLight's SparseTCAM dual-path block (module docstring).

  Attributes:
    window: keys at distance ``<= window`` are visible (SymbolicLight: 256); None: all earlier keys.
    max_len: longest sequence (the decode cache length is taken from the ``init`` input).
    leak: the encoder's membrane decay (0.95); threshold: its threshold (1.0).
    decay_init: initial logit of the per-head decay ``d`` (3.0, ``d ≈ 0.95``).
    rope_base: RoPE base of the attention path.
  """
  window: int | None = 256
  max_len: int = 2048
  leak: float = 0.95
  threshold: float = 1.0
  decay_init: float = 3.0
  rope_base: float = 10000.0

  def __post_init__(self):
    _checks.check_positive_int("window", self.window)
    _checks.check_positive_int("max_len", self.max_len, allow_none=False)
    check_positive_float("threshold", self.threshold)
    if isinstance(self.leak, bool) or not isinstance(self.leak, (int, float)) or not 0.0 <= self.leak <= 1.0:
      raise ValueError(f"leak: got {self.leak!r}; allowed: a number in [0, 1]")
    super().__post_init__()

  @nn.compact
  def __call__(self, x_BTD: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, decode: bool = False) -> jax.Array:
    """``x_BTD`` -> ``y_BTD`` (dtype of ``x``); see the module docstring."""
    self.check_inputs(x_BTD, segment_ids)
    x = nn.with_logical_constraint(x_BTD.astype(self.dtype), ("batch", "length", "embed"))
    spikes_BTD = self.lif("encoder", beta=self.leak, threshold=self.threshold, reset="zero",
                          reset_delay=False)(x, decode=decode)
    active_BT = jnp.any(spikes_BTD > 0, axis=-1)
    sow_metric(self, "active_fraction", jnp.mean(active_BT.astype(jnp.float32)))
    decay_BTHK = self._decay_path(spikes_BTD, decode)
    attn_BTHK = self._attention(x, active_BT, positions, decode) * active_BT[:, :, None, None]
    gate = jax.nn.sigmoid(self.param("attn_gate", nn.with_logical_partitioning(nn.initializers.zeros, ()), (),
                                     jnp.float32))
    fused_BTHK = gate * attn_BTHK.astype(jnp.float32) + (1.0 - gate) * decay_BTHK
    y_BTD = self.out(fused_BTHK.astype(self.dtype))
    return nn.with_logical_constraint(y_BTD, ("batch", "length", "embed")).astype(x_BTD.dtype)

  def _decay_path(self, spikes_BTD, decode):
    """``h_t = d h_{t-1} + (1 - d) u_t``, ``u = W_tcam s``, per head: a leaky integrator without spikes, run by
    ``spiking_scan`` with ``reset="none"`` (its membrane is ``h``)."""
    u_BTHK = self.heads(spikes_BTD, "tcam_proj", nn.initializers.normal(_INIT_STDDEV))
    init = nn.with_logical_partitioning(nn.initializers.constant(self.decay_init), ("heads",))
    d_H = jax.nn.sigmoid(self.param("decay_logit", init, (self.num_heads,), jnp.float32))
    d_N = jnp.repeat(d_H, self.dim)
    current = _flat_heads((1.0 - d_H[:, None]) * u_BTHK.astype(jnp.float32))

    def integrate(h_BN):
      _, h_BTN, final = pallas_kernels.spiking_scan(current, beta=d_N, reset="none", initial_membrane=h_BN,
                                                    return_membrane=True, return_final_membrane=True)
      return h_BTN, final

    h_BTN = with_state(self, "decay_state", integrate, (current.shape[0], current.shape[2]),
                       cache_mode(self, decode, "decay_state"))
    return h_BTN.reshape(u_BTHK.shape)

  def _attention(self, x_BTD, active_BT, positions, decode):
    """Softmax attention over keys whose position spiked, causal, within the window (KV cache in decode)."""
    batch, seq, _ = x_BTD.shape
    q, k, v = (self.heads(x_BTD, f"{n}_proj", nn.initializers.normal(_INIT_STDDEV)) for n in ("query", "key", "value"))
    mode = cache_mode(self, decode, "cache_index")
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32)) if mode != "off" else None
    offset = index.value if mode == "step" else 0
    if positions is None:
      positions = positional.default_positions(batch, seq, offset)
    q = positional.apply_rope(q, positions, base=self.rope_base)
    k = positional.apply_rope(k, positions, base=self.rope_base)
    keys_active = active_BT
    if mode != "off":
      caches = [self.variable("cache", f"cached_{n}", jnp.zeros, a.shape, a.dtype)
                for n, a in (("key", k), ("value", v), ("spikes", keys_active))]
      if mode == "step":
        k, v, keys_active = (self._append(c, a, index.value) for c, a in zip(caches, (k, v, keys_active)))
        index.value = index.value + seq
    return pallas_kernels.attention(q, k, v, causal=True, window=None if self.window is None else self.window + 1,
                                    key_mask=keys_active, query_offset=offset if mode == "step" else None,
                                    implementation=self.implementation)

  @staticmethod
  def _append(cache, new, index):
    start = (0, index) + (0,) * (new.ndim - 2)
    cache.value = jax.lax.dynamic_update_slice(cache.value, new.astype(cache.value.dtype), start)
    return cache.value
