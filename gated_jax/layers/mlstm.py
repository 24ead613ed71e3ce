"""mLSTM (xLSTM, Beck et al. arXiv 2405.04517 eq. 19-27) as one ``pallas_kernels.linear_attention`` call.

The stabilised recurrence (arXiv 2405.04517 eq. 15-17 and 19-27)

    m_t = max(log f_t + m_{t-1}, i_t),   f' = exp(log f_t + m_{t-1} - m_t),   i' = exp(i_t - m_t)
    C_t = f' C_{t-1} + i' k_t v_t^T,     n_t = f' n_{t-1} + i' k_t
    h_t = C_t^T q_t / (max(|n_t^T q_t|, exp(-m_t)) + eps),          q_t scaled by d^-1/2

keeps ``C_t = exp(-m_t) C*_t`` where ``C*_t = f_t C*_{t-1} + exp(i_t) k_t v_t^T`` is the unstabilised state
(likewise ``n``), so ``h_t = C*_t^T q / (max(|n*_t^T q|, 1) + eps exp(m_t))``. We therefore run linear
attention once with per-head log decay ``log f = logsigmoid(f~)``, keys scaled by ``exp(i - M)`` and values
augmented with a ones column (``n`` rides along with ``C``), where ``M`` is one constant per (batch, head)
(the largest input-gate pre-activation, stop-gradient; it cancels), and take
``h = num / (max(|den|, exp(-M)) + eps exp(m_t - M))``. The stabiliser ``m_t`` itself is the max-plus scan
``m_t = max(log f_t + m_{t-1}, i_t)`` (``m_0 = -inf``, the row-wise max of the paper's parallel form),
computed with ``lax.associative_scan``; it only sets where ``eps`` acts. Both gate pre-activations are
soft-capped (``cap * tanh(x / cap)``, cap 15 as in xLSTM-7B), which bounds ``i - M >= -2 cap`` so nothing
underflows in float32. Decode caches ``(C*, n*)`` scaled by ``exp(-M)``, ``M`` and ``m_t``, rescaling the
state when a new chunk raises ``M``.
"""

from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from gated_jax.layers.linear_base import LinearMixer, check_positive_float, run_recurrence
from gated_jax.layers.registry import MIXERS

_EMPTY_STABILIZER = -1e30


@MIXERS.register("mlstm")
class MLSTM(LinearMixer):
  """mLSTM cell as a mixer: q/k (``expand_k`` 0.5, xLSTM-7B's qk_dim_factor), v, exponential input gate,
  sigmoid forget gate, normaliser; output per-head RMSNorm(h) * sigmoid(o_proj gate), then o_proj.

  Attributes:
    igate_bias_init: input-gate bias init (-10 in xLSTM-7B).
    fgate_bias_init: forget-gate bias init (a positive value keeps early memory).
    gate_soft_cap: soft cap of both gate pre-activations.
    eps: added to the normaliser.
  """
  supports_kv_heads: ClassVar[bool] = False
  expand_k: float = 0.5
  output_gate: str = "sigmoid"
  igate_bias_init: float = -10.0
  fgate_bias_init: float = 3.0
  gate_soft_cap: float = 15.0
  eps: float = 1e-6

  def __post_init__(self):
    check_positive_float("gate_soft_cap", self.gate_soft_cap)
    check_positive_float("eps", self.eps)
    super().__post_init__()

  def _gate(self, x, name: str, bias: float) -> jax.Array:
    """Soft-capped ``(B, T, H)`` float32 gate pre-activation."""
    logits = self.dense(x, (self.num_heads,), ("embed", "heads"), name, use_bias=True,
                        bias_init=nn.initializers.constant(bias)).astype(jnp.float32)
    return self.gate_soft_cap * jnp.tanh(logits / self.gate_soft_cap)

  def _log_decay(self, x):
    return jax.nn.log_sigmoid(self._gate(x, "f_gate", self.fgate_bias_init))

  def _mix(self, q, k, v, log_decay, x, segment_ids, mode, positions):
    del positions
    i_BTH = self._gate(x, "i_gate", self.igate_bias_init)
    batch, _, heads, key_dim = q.shape
    value_dim = v.shape[-1]
    scale_max_BH = jax.lax.stop_gradient(jnp.max(i_BTH, axis=1))
    initial_state, m_prev_BH = None, jnp.full((batch, heads), _EMPTY_STABILIZER, jnp.float32)
    if mode != "off":
      state = self.variable("cache", "state", jnp.zeros, (batch, heads, key_dim, value_dim + 1), jnp.float32)
      key_scale = self.variable("cache", "key_scale_max", jnp.full, (batch, heads), _EMPTY_STABILIZER,
                                jnp.float32)
      stabilizer = self.variable("cache", "stabilizer", jnp.full, (batch, heads), _EMPTY_STABILIZER, jnp.float32)
      if mode == "step":
        scale_max_BH = jnp.maximum(key_scale.value, scale_max_BH)
        initial_state = state.value * jnp.exp(key_scale.value - scale_max_BH)[..., None, None]
        m_prev_BH = stabilizer.value
    m_BTH = stabilizer_scan(i_BTH, log_decay, m_prev_BH, segment_ids)
    k_scaled = (k.astype(jnp.float32) * jnp.exp(i_BTH - scale_max_BH[:, None])[..., None]).astype(k.dtype)
    v_aug = jnp.concatenate([v, jnp.ones((*v.shape[:3], 1), v.dtype)], axis=-1)
    o_aug, final_state = run_recurrence(q, k_scaled, v_aug, log_decay, initial_state, segment_ids=segment_ids,
                                        **self.op_options)
    if mode == "step":
      state.value, key_scale.value, stabilizer.value = final_state, scale_max_BH, m_BTH[:, -1]
    o_aug = o_aug.astype(jnp.float32)
    floor = jnp.exp(-scale_max_BH)[:, None, :, None]
    eps = self.eps * jnp.exp(m_BTH - scale_max_BH[:, None])[..., None]
    denominator = jnp.maximum(jnp.abs(o_aug[..., value_dim:]), floor) + eps
    return (o_aug[..., :value_dim] / denominator).astype(q.dtype)


def stabilizer_scan(i_BTH: jax.Array, log_f_BTH: jax.Array, m_prev_BH: jax.Array,
                    segment_ids: jax.Array | None) -> jax.Array:
  """``m_t = max(log f_t + m_{t-1}, i_t)`` from ``m_prev`` (restarting from ``-inf`` where the segment id
  changes), as an associative scan of the max-plus maps ``m -> max(a + m, b)``; stop-gradient."""
  a_BTH, b_BTH = jax.lax.stop_gradient(log_f_BTH), jax.lax.stop_gradient(i_BTH)
  if segment_ids is not None:
    starts = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
    a_BTH = jnp.where(starts[..., None], _EMPTY_STABILIZER, a_BTH)

  def compose(first, second):
    (a1, b1), (a2, b2) = first, second
    return a1 + a2, jnp.maximum(a2 + b1, b2)

  a_cum, b_cum = jax.lax.associative_scan(compose, (a_BTH, b_BTH), axis=1)
  return jnp.maximum(a_cum + jax.lax.stop_gradient(m_prev_BH)[:, None], b_cum)
