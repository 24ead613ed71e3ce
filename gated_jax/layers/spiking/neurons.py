"""Spiking neurons over the time axis of ``(batch, time, neurons)`` currents, as Flax modules.

Time is whatever the caller puts on axis 1: simulation steps of a classifier, or sequence positions in a
language model (then every neuron is causal and ``decode=True`` steps it with its membrane in the ``"cache"``
collection, the flax lm1b idiom: ``init(..., decode=True)`` creates the cache, later calls continue it).

* :class:`LIF` — leaky integrate-and-fire through ``pallas_kernels.spiking_scan`` (snnTorch ``Leaky``
  semantics; every surrogate, the soft reset of InfLoR-SNN arXiv 2307.04356 = ``reset="subtract"``, MPR).
* :class:`PLIF` — LIF with one learnable decay per layer, ``β = sigmoid(w)`` (Fang et al., ICCV 2021,
  arXiv 2007.05785; they scale the input by ``1/τ = sigmoid(w)`` too, we keep snnTorch's unscaled input).
* :class:`ParallelLIF` — no reset: the membrane is a linear recurrence, run by the op as an associative scan
  on accelerators (spyx ``PSU_LIF``).
* :class:`UltraLIF`, :class:`UltraPLIF`, :class:`UltraDLIF`, :class:`UltraDPLIF` — log-sum-exp (max-plus)
  neurons with a learnable smoothing ``ε`` and exact derivatives, no surrogate (Miñoza, arXiv 2602.11206).

Every neuron sows its mean spike rate as the ``spike_rate`` metric (``gated_jax.layers.collections``) and,
with ``rate_loss=True``, as the ``spike_rate`` auxiliary loss: UltraLIF's sparsity penalty ``λ·s̄`` with
``λ = train.aux_loss_weights["spike_rate"]``.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

import pallas_kernels
from gated_jax.layers.collections import sow_aux_loss, sow_metric
from gated_jax.layers.linear_base import check_flag, check_implementation, check_positive_float, with_state
from pallas_kernels import _checks
from pallas_kernels.spiking_scan import surrogates as _surrogates
from pallas_kernels.spiking_scan._step import RESETS

SPIKE_RATE = "spike_rate"  # metric and auxiliary-loss name


def cache_mode(module: nn.Module, decode: bool, name: str) -> str:
  """"off", "init" (this decode call creates the cache variable ``name``) or "step" (it continues it)."""
  if not decode:
    return "off"
  return "step" if module.has_variable("cache", name) else "init"


def sow_rate(module: nn.Module, spikes: jax.Array, rate_loss: bool) -> None:
  """The mean spike rate of this call as the ``spike_rate`` metric, and as the auxiliary loss if asked."""
  rate = jnp.mean(spikes.astype(jnp.float32))
  sow_metric(module, SPIKE_RATE, rate)
  if rate_loss:
    sow_aux_loss(module, SPIKE_RATE, rate)


def _check_current(current_BTN: jax.Array) -> None:
  _checks.check_array("current_BTN", current_BTN, rank=3, layout="(batch, time, neurons)")


class LIF(nn.Module):
  """Leaky integrate-and-fire neurons (``pallas_kernels.spiking_scan``): ``U_t = β U_{t-1} + I_t - reset``,
  ``S_t = H(U_t - θ)``, one neuron per input channel.

  Attributes:
    beta: membrane decay in [0, 1] (the initial value when learnable).
    learn_beta: a learnable ``β`` per neuron, clamped to [0, 1] in the forward (snnTorch).
    threshold: firing threshold > 0 (the initial value when learnable).
    learn_threshold: a learnable ``θ`` per neuron (kept >= 1e-3).
    reset: ``"subtract"`` (soft), ``"zero"`` (hard) or ``"none"``.
    reset_delay: reset in the step after the spike (snnTorch's default).
    detach_reset: no gradient through the reset (snnTorch, snnax; spyx does not detach).
    surrogate: surrogate name (``pallas_kernels.spiking_scan.surrogates.SURROGATES``).
    surrogate_scale: its scale (None: the surrogate's default).
    mpr: InfLoR-SNN's membrane rectifier on the surrogate path.
    rate_loss: also sow the mean spike rate as the ``spike_rate`` auxiliary loss.
    implementation: passed to ``pallas_kernels.spiking_scan``.
  """
  beta: float = 0.9
  learn_beta: bool = False
  threshold: float = 1.0
  learn_threshold: bool = False
  reset: str = "subtract"
  reset_delay: bool = True
  detach_reset: bool = True
  surrogate: str = "atan"
  surrogate_scale: float | None = None
  mpr: bool = False
  rate_loss: bool = False
  implementation: Any = None

  def __post_init__(self):
    if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not 0.0 <= self.beta <= 1.0:
      raise ValueError(f"beta: got {self.beta!r}; allowed: a number in [0, 1]")
    check_positive_float("threshold", self.threshold)
    _checks.check_choice("reset", self.reset, RESETS)
    for name in ("learn_beta", "learn_threshold", "reset_delay", "detach_reset", "mpr", "rate_loss"):
      check_flag(name, getattr(self, name))
    _surrogates.get(self.surrogate, self.surrogate_scale, self.mpr)
    check_implementation(self.implementation)
    super().__post_init__()

  def decay(self, neurons: int) -> jax.Array:
    """``β``: a float32 scalar, or ``(neurons,)`` when learnable."""
    if not self.learn_beta:
      return jnp.float32(self.beta)
    beta = self.param("beta", nn.with_logical_partitioning(nn.initializers.constant(self.beta), ("mlp",)),
                      (neurons,), jnp.float32)
    return jnp.clip(beta, 0.0, 1.0)

  def firing_threshold(self, neurons: int) -> jax.Array:
    if not self.learn_threshold:
      return jnp.float32(self.threshold)
    init = nn.with_logical_partitioning(nn.initializers.constant(self.threshold), ("mlp",))
    return jnp.maximum(self.param("threshold", init, (neurons,), jnp.float32), 1e-3)

  @nn.compact
  def __call__(self, current_BTN: jax.Array, *, decode: bool = False, return_membrane: bool = False):
    """Spikes ``(B, T, N)`` in the current's dtype, and the float32 membrane after each step if asked."""
    _check_current(current_BTN)
    batch, _, neurons = current_BTN.shape
    beta, threshold = self.decay(neurons), self.firing_threshold(neurons)

    def run(initial_BN):
      out = pallas_kernels.spiking_scan(
          current_BTN, beta=beta, threshold=threshold, reset=self.reset, reset_delay=self.reset_delay,
          detach_reset=self.detach_reset, surrogate=self.surrogate, surrogate_scale=self.surrogate_scale,
          mpr=self.mpr, initial_membrane=initial_BN, return_membrane=return_membrane, return_final_membrane=True,
          implementation=self.implementation)
      return out[:-1], out[-1]

    outputs = with_state(self, "membrane", run, (batch, neurons), cache_mode(self, decode, "membrane"))
    sow_rate(self, outputs[0], self.rate_loss)
    return outputs if return_membrane else outputs[0]


class PLIF(LIF):
  """LIF with one learnable decay per layer, ``β = sigmoid(w)``, ``w`` initialised to ``logit(beta)``
  (parametric LIF, Fang et al. arXiv 2007.05785 eq. 6); ``learn_beta`` is ignored."""

  def __post_init__(self):
    if not 0.0 < self.beta < 1.0:
      raise ValueError(f"beta: got {self.beta!r}; allowed: a number in (0, 1) (PLIF learns logit(beta))")
    super().__post_init__()

  def decay(self, neurons: int) -> jax.Array:
    del neurons
    logit = math.log(self.beta / (1.0 - self.beta))
    w = self.param("beta_logit", nn.with_logical_partitioning(nn.initializers.constant(logit), ()), (),
                   jnp.float32)
    return jax.nn.sigmoid(w)


class ParallelLIF(LIF):
  """LIF without reset: the membrane ``U_t = β U_{t-1} + I_t`` is a linear recurrence, so the op runs it as an
  associative scan on accelerators (O(log T) depth; spyx ``PSU_LIF``); spikes ``H(U_t - θ)`` never feed back."""
  reset: str = "none"

  def __post_init__(self):
    if self.reset != "none":
      raise ValueError(f"reset: got {self.reset!r}; allowed: 'none' (ParallelLIF has no reset; use LIF)")
    super().__post_init__()


class UltraLIF(nn.Module):
  """UltraLIF (Miñoza, arXiv 2602.11206; the paper's ablation neurons, threshold 1): a max-plus LIF smoothed by
  the log-sum-exp ``LSE_ε(a, b) = ε log(e^{a/ε} + e^{b/ε})``:

      V_t = LSE_ε(V_{t-1} + log τ, I_t),     s_t = sigmoid((V_t - θ)/ε),     V_t <- V_t (1 - s_t)

  from ``V_0 = 0``. The output ``s_t`` is in (0, 1) and everything is differentiated exactly (no surrogate);
  as ``ε -> 0`` it becomes the hard max-plus neuron ``V_t = max(V_{t-1} + log τ, I_t)``, ``s_t = H(V_t - θ)``
  with a reset to zero. ``ε = exp(log ε)`` is learned (initial ``eps``, clamped to ``eps_range``) unless
  ``learn_eps=False``, where ``eps`` is used as given.

  Attributes:
    tau: decay ``τ`` in (0, 1) (``log τ`` is added in the max-plus domain).
    threshold: ``θ``.
    eps: initial (or fixed) smoothing ``ε`` > 0.
    learn_eps: learn ``log ε`` (one per layer).
    eps_range: clamp of the learned ``ε``.
    rate_loss: also sow the mean spike rate as the ``spike_rate`` auxiliary loss.
  """
  tau: float = 0.9
  threshold: float = 1.0
  eps: float = 1.0
  learn_eps: bool = True
  eps_range: tuple[float, float] = (0.1, 20.0)
  rate_loss: bool = False

  def __post_init__(self):
    if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)) or not 0.0 < self.tau < 1.0:
      raise ValueError(f"tau: got {self.tau!r}; allowed: a number in (0, 1)")
    for name in ("threshold", "eps"):
      check_positive_float(name, getattr(self, name))
    low, high = self.eps_range
    if not 0.0 < low <= high:
      raise ValueError(f"eps_range: got {self.eps_range!r}; allowed: (low, high) with 0 < low <= high")
    check_flag("learn_eps", self.learn_eps)
    check_flag("rate_loss", self.rate_loss)
    super().__post_init__()

  def smoothing(self) -> jax.Array:
    if not self.learn_eps:
      return jnp.float32(self.eps)
    log_eps = self.param("log_eps", nn.with_logical_partitioning(nn.initializers.constant(math.log(self.eps)),
                                                                 ()), (), jnp.float32)
    return jnp.clip(jnp.exp(log_eps), *self.eps_range)

  def decay(self) -> jax.Array:
    """The decay term of :meth:`charge` (``log τ`` here), created outside the time scan."""
    return jnp.float32(math.log(self.tau))

  def charge(self, v_BN: jax.Array, current_BN: jax.Array, eps: jax.Array, decay: jax.Array) -> jax.Array:
    """The membrane after integrating ``current_BN`` (before the spike and reset)."""
    return eps * jnp.logaddexp((v_BN + decay) / eps, current_BN / eps)

  @nn.compact
  def __call__(self, current_BTN: jax.Array, *, decode: bool = False) -> jax.Array:
    """Soft spikes ``(B, T, N)`` float32 in (0, 1)."""
    _check_current(current_BTN)
    batch, _, neurons = current_BTN.shape
    eps, decay = self.smoothing(), self.decay()

    def step(v_BN, current_BN):
      v_BN = self.charge(v_BN, current_BN, eps, decay)
      s_BN = jax.nn.sigmoid((v_BN - self.threshold) / eps)
      return v_BN * (1.0 - s_BN), s_BN

    def run(initial_BN):
      v0 = jnp.zeros((batch, neurons), jnp.float32) if initial_BN is None else initial_BN
      final, spikes_TBN = jax.lax.scan(step, v0, jnp.moveaxis(current_BTN.astype(jnp.float32), 1, 0))
      return jnp.moveaxis(spikes_TBN, 0, 1), final

    spikes = with_state(self, "membrane", run, (batch, neurons), cache_mode(self, decode, "membrane"))
    sow_rate(self, spikes, self.rate_loss)
    return spikes


class UltraPLIF(UltraLIF):
  """UltraLIF with a learnable ``log τ`` (one per layer, initial ``log tau``, clamped to [-2.3, -0.01] as the
  paper's ablation code)."""

  def decay(self) -> jax.Array:
    init = nn.with_logical_partitioning(nn.initializers.constant(math.log(self.tau)), ())
    return jnp.clip(self.param("log_tau", init, (), jnp.float32), -2.3, -0.01)


class UltraDLIF(UltraLIF):
  """Spatial UltraLIF (diffusion across neighbouring neurons, circular over the neuron axis):
  ``V_i <- LSE_ε(V_{i-1}, V_i, V_{i+1}) + I_i``, then the same spike and reset (``tau`` is unused)."""

  def decay(self) -> jax.Array:
    return jnp.float32(1.0)  # the centre term's factor

  def charge(self, v_BN, current_BN, eps, decay):
    terms = jnp.stack([jnp.roll(v_BN, 1, axis=-1), decay * v_BN, jnp.roll(v_BN, -1, axis=-1)], axis=-1)
    return eps * jax.nn.logsumexp(terms / eps, axis=-1) + current_BN


class UltraDPLIF(UltraDLIF):
  """UltraDLIF whose centre term is ``τ V_i`` with a learnable ``τ`` clamped to [0.1, 0.99] (multiplicative,
  unlike UltraPLIF's additive ``log τ``; as the paper's ablation code)."""

  def decay(self) -> jax.Array:
    init = nn.with_logical_partitioning(nn.initializers.constant(math.log(self.tau)), ())
    return jnp.clip(jnp.exp(self.param("log_tau", init, (), jnp.float32)), 0.1, 0.99)


NEURONS: dict[str, type[nn.Module]] = {
    "lif": LIF, "plif": PLIF, "parallel_lif": ParallelLIF, "ultralif": UltraLIF, "ultraplif": UltraPLIF,
    "ultradlif": UltraDLIF, "ultradplif": UltraDPLIF,
}


def get_neuron(name: str) -> type[nn.Module]:
  """The neuron class registered as ``name`` (ValueError listing the known names)."""
  if name not in NEURONS:
    raise ValueError(f"neuron: got {name!r}; allowed: {', '.join(map(repr, NEURONS))}")
  return NEURONS[name]
