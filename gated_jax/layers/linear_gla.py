"""Mixers with a data-dependent per-key-channel decay: GLA (with ViG's bidirectional mode) and HGRN2."""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from gated_jax.layers.linear_base import LinearMixer, both_directions, check_flag, check_positive_float
from gated_jax.layers.registry import MIXERS


@MIXERS.register("gla")
class GLA(LinearMixer):
  """Gated linear attention, Yang et al. arXiv 2312.06635 eq. 3-4 (fla ``GatedLinearAttention``):
  ``S_t = Diag(alpha_t) S_{t-1} + k_t v_t^T`` with a low-rank gate
  ``log alpha_t = logsigmoid(W2 W1 x_t + b) / gate_logit_normalizer`` (d -> 16 -> key width, tau = 16),
  output per-head RMSNorm(o) * swish(g_proj(x)), then o_proj. With ``num_kv_heads`` the keys, values and
  the decay have KV heads, shared by groups of query heads (fla's layer repeats all three).

  ``bidirectional=True`` is ViG's direction-wise GLA (arXiv 2405.18425 §3.2): shared q/k/v, separate forward
  and backward gates, ``o = (o_fwd + flip(GLA(flip(x), g_bwd))) / 2`` (non-causal: no decode path).

  Attributes:
    gate_low_rank_dim: rank of the decay projection.
    gate_logit_normalizer: tau in ``alpha = sigmoid(.)^(1/tau)``.
    clamp_min: optional lower clamp (< 0) of ``log alpha``.
    bidirectional: ViG mode.
  """
  expand_k: float = 0.5
  expand_v: float = 1.0
  output_gate: str = "swish"
  gate_low_rank_dim: int = 16
  gate_logit_normalizer: float = 16.0
  clamp_min: float | None = None
  bidirectional: bool = False

  def __post_init__(self):
    if (isinstance(self.gate_low_rank_dim, bool) or not isinstance(self.gate_low_rank_dim, int)
        or self.gate_low_rank_dim <= 0):
      raise ValueError(f"gate_low_rank_dim: got {self.gate_low_rank_dim!r}; allowed: a positive int")
    check_positive_float("gate_logit_normalizer", self.gate_logit_normalizer)
    if self.clamp_min is not None and not (isinstance(self.clamp_min, (int, float)) and self.clamp_min < 0):
      raise ValueError(f"clamp_min: got {self.clamp_min!r}; allowed: None or a negative number")
    check_flag("bidirectional", self.bidirectional)
    super().__post_init__()

  @property
  def causal(self) -> bool:
    return not self.bidirectional

  def _log_decay(self, x):
    """``(B, T, H, K)``, or ``(B, T, 2, H, K)`` (forward, backward) when bidirectional."""
    directions = (2,) if self.bidirectional else ()
    head_axis = "heads" if self.kv_heads == self.num_heads else "kv_heads"
    low = self.dense(x, (self.gate_low_rank_dim,), ("embed", None), "gk_down_proj")
    logits = self.dense(low, (*directions, self.kv_heads, self.key_dim),
                        (None, *(None,) * len(directions), head_axis, "head_dim"), "gk_proj", use_bias=True)
    log_decay = jax.nn.log_sigmoid(logits.astype(jnp.float32)) / self.gate_logit_normalizer
    log_decay = jnp.repeat(log_decay, self.num_heads // self.kv_heads, axis=-2)  # query head h: kv head h // g
    return log_decay if self.clamp_min is None else jnp.maximum(log_decay, self.clamp_min)

  def _mix(self, q, k, v, log_decay, x, segment_ids, mode, positions):
    if not self.bidirectional:
      return super()._mix(q, k, v, log_decay, x, segment_ids, mode, positions)
    o_fwd, o_bwd = both_directions(q, k, v, log_decay[:, :, 0], log_decay[:, :, 1], segment_ids,
                                   **self.op_options)
    return (o_fwd + o_bwd) / 2


@MIXERS.register("hgrn2")
class HGRN2(LinearMixer):
  """HGRN2, Qin et al. arXiv 2404.07904 eq. 6 (fla ``HGRN2Attention``): a GLA whose key is tied to the
  forget gate. ``q = swish(q_proj x)``, ``log alpha = logsigmoid(f_proj x)`` (with a lower bound ``lb``:
  ``alpha = lb + (1 - lb) sigmoid(.)``), ``k = 1 - alpha``, ``v = i_proj x``; output one RMSNorm over all
  heads (a per-channel scale of width ``H * V``, = d_model at fla's defaults), then o_proj. The forget/expand
  dim per head (fla ``expand_ratio``) is ``expand_k * d_model / num_heads``. The short conv, when enabled, has
  no activation (as fla's) and acts on q and i; fla also convolves f_proj, which is not done here.

  Attributes:
    lower_bound: forget-gate lower bound in ``[0, 1)`` (HGRN's layer-wise bound; 0 = none).
  """
  supports_kv_heads: ClassVar[bool] = False  # the key is the forget gate of each head
  conv_activation: bool = False
  norm_scope: str = "all_heads"
  lower_bound: float = 0.0

  def __post_init__(self):
    if not (isinstance(self.lower_bound, (int, float)) and 0 <= self.lower_bound < 1):
      raise ValueError(f"lower_bound: got {self.lower_bound!r}; allowed: a number in [0, 1)")
    super().__post_init__()

  def _log_decay(self, x):
    logits = self.dense(x, (self.num_heads, self.key_dim), ("embed", "heads", "head_dim"), "f_proj")
    log_alpha = jax.nn.log_sigmoid(logits.astype(jnp.float32))
    if self.lower_bound > 0:
      log_alpha = jnp.logaddexp(jnp.log(self.lower_bound), jnp.log1p(-self.lower_bound) + log_alpha)
    return log_alpha

  def _qkv(self, x, log_decay, segment_ids, mode):
    q = nn.swish(self.heads_proj(x, self.key_dim, "q", segment_ids, mode))
    k = (-jnp.expm1(log_decay)).astype(q.dtype)
    v = self.heads_proj(x, self.value_dim, "i", segment_ids, mode)
    return q, k, v
