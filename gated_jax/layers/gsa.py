"""Gated Slot Attention, Zhang et al. arXiv 2409.07146 eq. 8-10 (fla ``GatedSlotAttention``): two gated
linear-attention passes joined by a softmax over ``m`` memory slots with per-slot forget gates.

    H^k_t = H^k_{t-1} Diag(alpha_t) + k_t s_t^T,   o'_t = q_t^T H^k_t,      p_t = softmax(o'_t)  (over slots)
    H^v_t = Diag(alpha_t) H^v_{t-1} + s_t v_t^T,   o_t  = p_t^T H^v_t,      s_t = 1 - alpha_t

Pass 2 is ``linear_attention(q=p, k=s, v=v)`` with per-key-channel (slot) decay. Pass 1 decays the *value*
side of ``H^k`` (K x m), which the op does not do directly, so each slot j becomes its own head with scalar
decay ``alpha_{t,j}`` and a one-dimensional value ``s_{t,j}``: heads ``H * m``, state ``(B, H*m, K, 1)``
(the same numbers as ``H^k``). Scale is 1 in both passes, as in the fla layer.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels import _checks
from gated_jax.layers.linear_base import LinearMixer, check_positive_float
from gated_jax.layers.registry import MIXERS


@MIXERS.register("gsa")
class GSA(LinearMixer):
  """GSA: swish q/k, SiLU v, ``log alpha = logsigmoid(f_proj x) / 8`` over ``num_slots`` slots; output
  RMSNorm(silu(o)), then o_proj.

  Attributes:
    num_slots: memory slots m per head.
    gate_logit_normalizer: divides the logsigmoid of the slot gates.
  """
  supports_kv_heads: ClassVar[bool] = False
  feature_map: str = "swish"
  num_slots: int = 64
  gate_logit_normalizer: float = 8.0

  def __post_init__(self):
    _checks.check_positive_int("num_slots", self.num_slots, allow_none=False)
    check_positive_float("gate_logit_normalizer", self.gate_logit_normalizer)
    super().__post_init__()

  def _log_decay(self, x):
    logits = self.dense(x, (self.num_heads, self.num_slots), ("embed", "heads", "state"), "f_proj")
    return jax.nn.log_sigmoid(logits.astype(jnp.float32)) / self.gate_logit_normalizer

  def _qkv(self, x, log_decay, segment_ids, mode):
    q, k, v = super()._qkv(x, log_decay, segment_ids, mode)
    return q, k, nn.silu(v)

  def _mix(self, q, k, v, log_decay, x, segment_ids, mode, positions):
    del x, positions
    batch, seq, heads, key_dim = q.shape
    slots = self.num_slots
    write_BTHM = (-jnp.expm1(log_decay)).astype(q.dtype)
    per_slot = lambda a: jnp.repeat(a, slots, axis=2)  # head h -> heads h*m .. h*m + m - 1
    scores = self.recurrence(per_slot(q), per_slot(k), write_BTHM.reshape(batch, seq, heads * slots, 1),
                             log_decay.reshape(batch, seq, heads * slots), segment_ids, mode,
                             name="state_k", scale=1.0)
    p_BTHM = jax.nn.softmax(scores.reshape(batch, seq, heads, slots).astype(jnp.float32), axis=-1)
    return self.recurrence(p_BTHM.astype(q.dtype), write_BTHM, v, log_decay, segment_ids, mode,
                           name="state_v", scale=1.0)

  def _output(self, o_BTHV, x):
    return self.out_proj(self.output_norm(nn.silu(o_BTHV), x))
