"""sLSTM recurrence (xLSTM, Beck et al. arXiv 2405.04517 §2.2, eq. 8-17): public op, argument checks, registry.

Per head ``h`` and hidden unit, with the input pre-activations ``z~, i~, f~, o~`` (``W x_t + b``, computed by
the layer) and the block-diagonal recurrent kernel ``R`` (one ``D x 4D`` block per head: memory mixing only
within a head):

    (z~, i~, f~, o~) += R_h^T h_{t-1}
    z = tanh(z~),  o = sigmoid(o~),  log f = logsigmoid(f~) ("sigmoid") or f~ ("exp"),  i = exp(i~)
    m_t = max(log f + m_{t-1}, i~)                                 stabiliser (eq. 15), m_0 = -inf
    i' = exp(i~ - m_t),   f' = exp(log f + m_{t-1} - m_t)          (eq. 16-17)
    c_t = f' c_{t-1} + i' z,   n_t = f' n_{t-1} + i',   h_t = o c_t / n_t

The stabiliser rescales ``c`` and ``n`` by the same factor ``exp(-m_t)``, so ``h`` does not depend on it; each
step's ``m_t`` is held out of differentiation (exactly: ``h`` is constant in it), while the initial state's
``m``, which scales its ``c`` and ``n``, keeps its gradient. ``n_t >= 1`` after the first step of a
sequence, since one of ``i'``, ``f'`` is 1. The state is :class:`SLSTMState` ``(h, c, n, m)``, each
``(B, H, D)`` float32; ``segment_ids`` restart it from the empty state where the id changes (``initial_state``
applies to the first segment), so packed sequences give the same result as alone.

Implementations: ``reference`` (a ``lax.scan`` of the step above, autodiff) and ``xla`` (the same forward scan,
time-major and unrolled, under a ``custom_vjp`` whose backward is a hand-derived reverse scan that leaves the
``R`` gradient to one contraction over all steps). There is no Pallas kernel
(``docs/vision_and_state_tracking.md`` says why).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels import _checks
from pallas_kernels.dispatch import Op

FORGET_GATES = ("sigmoid", "exp")
GATES = ("z", "i", "f", "o")
EMPTY_STABILIZER = -1e30  # m of the empty state: exp(log f + m_{-1} - m) underflows to exactly 0

slstm_op = Op.public("slstm")
slstm_op.register("reference", "pallas_kernels.slstm.reference:slstm")
slstm_op.register("xla", "pallas_kernels.slstm.xla:slstm", auto_priority=100)


class SLSTMState(NamedTuple):
  """Recurrent state of the sLSTM: hidden ``h``, cell ``c``, normaliser ``n``, stabiliser ``m``; each
  ``(B, H, D)`` float32."""
  h: jax.Array
  c: jax.Array
  n: jax.Array
  m: jax.Array

  @classmethod
  def empty(cls, batch: int, heads: int, dim: int) -> SLSTMState:
    zeros = jnp.zeros((batch, heads, dim), jnp.float32)
    return cls(zeros, zeros, zeros, jnp.full((batch, heads, dim), EMPTY_STABILIZER, jnp.float32))


def slstm(z, i, f, o, recurrent_kernel, *, forget_gate: str = "sigmoid", initial_state: SLSTMState | None = None,
          return_final_state: bool = False, segment_ids=None,
          implementation: str | Sequence[str] | None = None):
  """The sLSTM recurrence (module docstring) over a sequence.

  Args:
    z, i, f, o: ``(B, T, H, D)`` input pre-activations of the cell input and the input, forget and output
      gates (``W x_t + b``; the recurrent term is added here).
    recurrent_kernel: ``(H, D, 4, D)``: ``pre[h, g, e] += sum_d h_{t-1}[h, d] R[h, d, g, e]`` for the gates
      ``g`` in the order z, i, f, o.
    forget_gate: ``"sigmoid"`` (``log f = logsigmoid(f~)``, the paper's default) or ``"exp"`` (``log f = f~``).
    initial_state: :class:`SLSTMState` before the first token; default the empty state.
    return_final_state: also return the state after the last token.
    segment_ids: ``(B, T)`` int ids of packed sequences (the state restarts where the id changes).
    implementation: see :mod:`pallas_kernels.dispatch`.
  Returns:
    ``h`` ``(B, T, H, D)`` in the dtype of ``z``, or ``(h, final_state)``.
  """
  for name, x in zip(GATES, (z, i, f, o)):
    _checks.check_array(name, x, rank=4, layout="(batch, seq, heads, head_dim)")
    _checks.check_shape(name, x, z.shape, "(batch, seq, heads, head_dim) like z")
  batch, seq, heads, dim = z.shape
  _checks.check_array("recurrent_kernel", recurrent_kernel, rank=4, layout="(heads, head_dim, 4, head_dim)")
  _checks.check_shape("recurrent_kernel", recurrent_kernel, (heads, dim, 4, dim), "(heads, head_dim, 4, head_dim)")
  _checks.check_choice("forget_gate", forget_gate, FORGET_GATES)
  if not isinstance(return_final_state, bool):
    raise ValueError(f"return_final_state: got {return_final_state!r}; allowed: True or False")
  if initial_state is None:
    initial_state = SLSTMState.empty(batch, heads, dim)
  else:
    if not isinstance(initial_state, tuple) or len(initial_state) != 4:
      raise ValueError(f"initial_state: got {type(initial_state).__name__}; allowed: an SLSTMState (h, c, n, m)")
    for name, x in zip(SLSTMState._fields, initial_state):
      _checks.check_array(f"initial_state.{name}", x, rank=3, layout="(batch, heads, head_dim)")
      _checks.check_shape(f"initial_state.{name}", x, (batch, heads, dim), "(batch, heads, head_dim)")
    initial_state = SLSTMState(*(x.astype(jnp.float32) for x in initial_state))
  resets = None
  if segment_ids is not None:
    _checks.check_array("segment_ids", segment_ids, rank=2, layout="(batch, seq)", floating=False)
    _checks.check_shape("segment_ids", segment_ids, (batch, seq), "(batch, seq)")
    resets = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))
  x_BTHGD = jnp.stack([g.astype(jnp.float32) for g in (z, i, f, o)], axis=3)
  h, state = slstm_op(x_BTHGD, recurrent_kernel.astype(jnp.float32), initial_state, resets,
                      implementation=implementation, forget_gate=forget_gate)
  h = h.astype(z.dtype)
  return (h, state) if return_final_state else h
