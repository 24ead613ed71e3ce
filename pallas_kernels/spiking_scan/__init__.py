"""The leaky integrate-and-fire time loop as an op: ``spiking_scan``.

For input currents ``I`` ``(batch, seq, neurons)`` (time is the ``seq`` axis) and per-neuron decay ``β`` and
threshold ``θ`` (snnTorch ``Leaky``, Eshraghian et al. arXiv 2109.12894; the recurrence and its reset variants
are written out in :mod:`._step`):

    U_t = β U_{t-1} + I_t - reset(S_{t-1}),      S_t = H(U_t - θ)

with the surrogate derivative of :mod:`.surrogates` in the backward. ``reset`` is ``"subtract"`` (the soft
reset, InfLoR-SNN arXiv 2307.04356: the residual over threshold is kept), ``"zero"`` (hard reset) or
``"none"`` (a linear leaky integrator). ``reset_delay`` (snnTorch's default) resets in the step after a
spike; ``detach_reset`` (snnTorch and snnax: True; spyx: False) stops the gradient through the reset. The
membrane is float32 whatever the input dtype (a bfloat16 threshold comparison flips spikes).

Implementations: ``reference`` (``lax.scan`` + autodiff, the oracle), ``xla`` (the auto default: a scan with
a hand-written backward-through-time scan, and for ``reset="none"`` an associative scan), ``pallas_tpu`` and
``pallas_triton`` (the time loop fused in one kernel each way, membrane in VMEM / registers; opt-in by name).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _checks
from pallas_kernels.dispatch import Op
from pallas_kernels.spiking_scan import surrogates
from pallas_kernels.spiking_scan._step import RESETS, ScanConfig
from pallas_kernels.spiking_scan.surrogates import SURROGATES, Surrogate

spiking_scan_op = Op.public("spiking_scan")
spiking_scan_op.register("reference", "pallas_kernels.spiking_scan.reference:spiking_scan")
spiking_scan_op.register("xla", "pallas_kernels.spiking_scan.xla:spiking_scan", auto_priority=100)
spiking_scan_op.register("pallas_tpu", "pallas_kernels.spiking_scan.tpu:spiking_scan", platforms=("tpu",),
                         auto_priority=0, pallas=True)
spiking_scan_op.register("pallas_triton", "pallas_kernels.spiking_scan.gpu:spiking_scan", platforms=("gpu",),
                         auto_priority=1, pallas=True)


def spiking_scan(current, *, beta, threshold=1.0, reset: str = "subtract", reset_delay: bool = True,
                 detach_reset: bool = True, surrogate: str | Surrogate = "atan",
                 surrogate_scale: float | None = None, mpr: bool = False, initial_membrane=None,
                 return_membrane: bool = False, return_final_membrane: bool = False,
                 implementation: str | Sequence[str] | None = None):
  """Leaky integrate-and-fire neurons over the time axis (see module docstring).

  Args:
    current: ``(B, T, N)`` input currents (float32 or bfloat16).
    beta: membrane decay in [0, 1]: a number, or a ``()`` / ``(N,)`` array (differentiable). Concrete values
      outside [0, 1] are an error; traced ones are clamped to it (snnTorch's ``beta.clamp(0, 1)``).
    threshold: firing threshold > 0: a number, or a ``()`` / ``(N,)`` array (differentiable).
    reset: ``"subtract"``, ``"zero"`` or ``"none"``.
    reset_delay: reset in the step after the spike (True, snnTorch's default) or in the same step.
    detach_reset: no gradient through the reset term.
    surrogate: a name from :data:`.surrogates.SURROGATES` or a :class:`.surrogates.Surrogate`.
    surrogate_scale: the surrogate's scale (None: its default).
    mpr: apply InfLoR-SNN's membrane rectifier on the surrogate path.
    initial_membrane: ``(B, N)`` membrane before the first step (default zeros).
    return_membrane: also return the membrane after every step, ``(B, T, N)`` float32.
    return_final_membrane: also return the membrane after the last step, ``(B, N)`` float32.
    implementation: see :mod:`pallas_kernels.dispatch`.
  Returns:
    ``spikes`` ``(B, T, N)`` in ``current.dtype`` (0 or 1), followed by the membrane and/or the final membrane
    when asked for, as a tuple.
  """
  _checks.check_array("current", current, rank=3, layout="(batch, seq, neurons)")
  batch, _, neurons = current.shape
  beta_N = _per_neuron("beta", beta, neurons, lambda x: (x >= 0) & (x <= 1), "values in [0, 1]")
  beta_N = jnp.clip(beta_N, 0.0, 1.0)  # traced values are not checked: clamp them as snnTorch does
  theta_N = _per_neuron("threshold", threshold, neurons, lambda x: x > 0, "positive finite values")
  _checks.check_choice("reset", reset, RESETS)
  for name, flag in (("reset_delay", reset_delay), ("detach_reset", detach_reset),
                     ("return_membrane", return_membrane), ("return_final_membrane", return_final_membrane)):
    if not isinstance(flag, bool):
      raise ValueError(f"{name}: got {flag!r}; allowed: True or False")
  config = ScanConfig(reset, reset_delay, detach_reset, surrogates.get(surrogate, surrogate_scale, mpr))
  if initial_membrane is None:
    initial_BN = jnp.zeros((batch, neurons), jnp.float32)
  else:
    _checks.check_array("initial_membrane", initial_membrane, rank=2, layout="(batch, neurons)")
    _checks.check_shape("initial_membrane", initial_membrane, (batch, neurons), "(batch, neurons)")
    initial_BN = initial_membrane.astype(jnp.float32)
  spikes, membrane, final = spiking_scan_op(current, beta_N, theta_N, initial_BN, config=config,
                                            return_membrane=return_membrane, implementation=implementation)
  extras = ((membrane,) if return_membrane else ()) + ((final,) if return_final_membrane else ())
  return (spikes, *extras) if extras else spikes


def _per_neuron(name, value, neurons, valid, allowed):
  """A number or ``()``/``(N,)`` array -> ``(N,)`` float32; concrete values are checked with ``valid``."""
  if isinstance(value, bool) or not (isinstance(value, (int, float)) or hasattr(value, "shape")):
    raise ValueError(f"{name}: got {type(value).__name__}; allowed: a number or a () / ({neurons},) array of "
                     f"{allowed}")
  if hasattr(value, "shape") and (tuple(value.shape) not in ((), (neurons,))
                                  or not jnp.issubdtype(value.dtype, jnp.floating)):
    raise ValueError(f"{name}: got shape {tuple(value.shape)} dtype {value.dtype}; allowed: a number or a "
                     f"floating () / ({neurons},) array of {allowed}")
  if not isinstance(value, jax.core.Tracer):  # only concrete values can be checked (not jit arguments)
    concrete = np.asarray(value, np.float64)
    ok = valid(concrete) & np.isfinite(concrete)
    if not np.all(ok):
      raise ValueError(f"{name}: got {float(concrete.reshape(-1)[np.argmin(ok.reshape(-1))])!r}; allowed: "
                       f"{allowed}")
  return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (neurons,))


__all__ = ["SURROGATES", "Surrogate", "spiking_scan", "spiking_scan_op"]
