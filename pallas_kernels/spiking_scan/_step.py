"""One time step of the LIF recurrence and its hand-derived backward, shared by the ``xla`` scan and the
Pallas kernels (elementwise float32 ``jnp`` only, so the same code runs in ``lax.scan`` and inside kernels).

Forward, per neuron (``H`` the strict Heaviside, ``σ'`` the surrogate of :mod:`.surrogates`):

    r_t = H(U_{t-1} - θ)                                   the delayed reset (previous membrane over threshold)
    V_t = β U_{t-1} + I_t - r_t θ          (subtract)
        = β (1 - r_t) U_{t-1} + I_t        (zero)
        = β U_{t-1} + I_t                  (none)
    S_t = H(V_t - θ)
    U_t = V_t                              (reset_delay, or reset "none")
        = V_t - (S_t - r_t) θ              (immediate subtract)
        = V_t (1 - S_t + r_t)              (immediate zero)

which is snnTorch's ``Leaky.forward`` (``reset_delay=False`` resets in the same step; ``r_t`` then only
corrects a membrane still over threshold after its reset). Gradients: the spike ``S_t`` uses ``σ'(V_t - θ)``;
the reset term gets a gradient only when ``detach_reset`` is False — through ``r_t`` (``σ'(U_{t-1} - θ)``)
with ``reset_delay``, through ``S_t`` in the immediate reset otherwise, where ``r_t`` is always detached (as
snnTorch). ``backward_step`` is the exact vector-Jacobian product of ``forward_step`` under those rules.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from pallas_kernels.spiking_scan.surrogates import Surrogate

RESETS = ("subtract", "zero", "none")


@dataclasses.dataclass(frozen=True)
class ScanConfig:
  """The static options of one ``spiking_scan`` call (validated by the public op)."""
  reset: str = "subtract"
  reset_delay: bool = True
  detach_reset: bool = True
  surrogate: Surrogate = Surrogate()

  @property
  def immediate(self) -> bool:
    """Whether the reset happens in the step that spikes (``reset_delay=False``)."""
    return not self.reset_delay and self.reset != "none"


def forward_step(u_prev, current, beta, theta, config: ScanConfig):
  """``(S_t, U_t)`` from ``U_{t-1}`` and ``I_t`` (float32, broadcastable with ``beta``/``theta``)."""
  r = (u_prev - theta > 0).astype(jnp.float32)
  if config.reset == "subtract":
    v = beta * u_prev + current - r * theta
  elif config.reset == "zero":
    v = beta * ((1.0 - r) * u_prev) + current
  else:
    v = beta * u_prev + current
  s = (v - theta > 0).astype(jnp.float32)
  if not config.immediate:
    return s, v
  if config.reset == "subtract":
    return s, v - (s - r) * theta
  return s, v * (1.0 - s + r)


def backward_step(u_prev, current, beta, theta, g_u, g_s, config: ScanConfig):
  """VJP of :func:`forward_step`: cotangents ``g_u`` of ``U_t`` and ``g_s`` of ``S_t`` ->
  ``(g_current, g_u_prev, g_beta, g_theta)``, elementwise (``g_beta``/``g_theta`` not yet summed)."""
  r = (u_prev - theta > 0).astype(jnp.float32)
  if config.reset == "zero":
    kept = (1.0 - r) * u_prev
    v = beta * kept + current
  else:
    kept = u_prev
    v = beta * u_prev + current - (r * theta if config.reset == "subtract" else 0.0)
  s = (v - theta > 0).astype(jnp.float32)
  live = not config.detach_reset
  g_v, g_theta = g_u, 0.0
  if config.immediate and config.reset == "subtract":
    g_theta = -g_u * (s - r)
    if live:
      g_s = g_s - g_u * theta
  elif config.immediate:
    g_v = g_u * (1.0 - s + r)
    if live:
      g_s = g_s - g_u * v
  d_spike = g_s * config.surrogate.grad(v - theta, theta)
  g_v = g_v + d_spike
  g_theta = g_theta - d_spike
  g_beta = g_v * kept
  g_u_prev = g_v * beta * (1.0 - r) if config.reset == "zero" else g_v * beta
  if config.reset == "subtract":
    g_theta = g_theta - g_v * r
  if live and config.reset_delay and config.reset != "none":
    g_r = -g_v * theta if config.reset == "subtract" else -g_v * beta * u_prev
    d_reset = g_r * config.surrogate.grad(u_prev - theta, theta)
    g_u_prev = g_u_prev + d_reset
    g_theta = g_theta - d_reset
  return g_v, g_u_prev, g_beta, g_theta
