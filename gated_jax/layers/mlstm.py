"""mLSTM (xLSTM, Beck et al. arXiv 2405.04517 eq. 19-27) as one ``pallas_kernels.linear_attention`` call.

The stabilised recurrence (m_t = max(log f_t + m_{t-1}, i_t); C_t = f' C_{t-1} + i' k_t v_t^T;
n_t = f' n_{t-1} + i' k_t; h_t = C_t^T q / (max(|n_t^T q|, exp(-m_t)) + eps), q scaled by d^-1/2) equals, in
unstabilised terms, ``h_t = C_t^T q / max(|n_t^T q|, 1)`` with ``C_t = f_t C_{t-1} + exp(i_t) k_t v_t^T``:
the stabiliser cancels. Any constant M per (batch, head) is therefore a valid stabiliser: we run linear
attention with per-head log decay ``log f = logsigmoid(f~)``, keys scaled by ``exp(i - M)`` and values
augmented with a ones column (so ``n`` rides along with ``C``), with ``M`` the running max of the input-gate
pre-activations (stop-gradient), and take ``h = num / (max(|den|, exp(-M)) + eps)``. Both gate
pre-activations are soft-capped (``cap * tanh(x / cap)``, cap 15 as in xLSTM-7B), which bounds
``i - M >= -2 cap`` so nothing underflows in float32. Decode caches ``(C, n)`` scaled by ``exp(-M)`` and
``M``, rescaling the state when a new chunk raises ``M``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import pallas_kernels
from gated_jax.layers.linear_base import LinearMixer, check_positive_float
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
    m_BH = jax.lax.stop_gradient(jnp.max(i_BTH, axis=1))
    initial_state = None
    if mode != "off":
      state = self.variable("cache", "state", jnp.zeros, (batch, heads, key_dim, value_dim + 1), jnp.float32)
      stabilizer = self.variable("cache", "stabilizer", jnp.full, (batch, heads), _EMPTY_STABILIZER, jnp.float32)
      if mode == "step":
        m_BH = jnp.maximum(stabilizer.value, m_BH)
        initial_state = state.value * jnp.exp(stabilizer.value - m_BH)[..., None, None]
    k_scaled = (k.astype(jnp.float32) * jnp.exp(i_BTH - m_BH[:, None])[..., None]).astype(k.dtype)
    v_aug = jnp.concatenate([v, jnp.ones((*v.shape[:3], 1), v.dtype)], axis=-1)
    o_aug, final_state = pallas_kernels.linear_attention(
        q, k_scaled, v_aug, log_decay=log_decay, initial_state=initial_state, return_final_state=True,
        segment_ids=segment_ids)
    if mode == "step":
      state.value, stabilizer.value = final_state, m_BH
    o_aug = o_aug.astype(jnp.float32)
    denominator = jnp.maximum(jnp.abs(o_aug[..., value_dim:]), jnp.exp(-m_BH)[:, None, :, None]) + self.eps
    return (o_aug[..., :value_dim] / denominator).astype(q.dtype)
