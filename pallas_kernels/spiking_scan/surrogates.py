"""Surrogate derivatives of the spike nonlinearity ``S = H(x)``, ``x = U - θ`` (membrane minus threshold).

The forward is the strict Heaviside step ``H(x) = 1[x > 0]`` (snnTorch and spyx); the backward replaces
``δ(x)`` by a surrogate ``σ'(x)`` (Neftci, Mostafa & Zenke 2019, arXiv 1901.09948). Each surrogate has one
scale parameter ``s`` (its default in brackets); the formulas are snnTorch's and SpikingJelly's code:

==================  ==================================  ====================================================
name                σ'(x)                               parameterisation
==================  ==================================  ====================================================
``atan`` [2]        (s/2) / (1 + (π s x / 2)²)           snnTorch ``atan(alpha)``, SpikingJelly ``ATan(alpha)``
``sigmoid`` [25]    s·sig(s x)·(1 - sig(s x))            snnTorch ``sigmoid(slope)``, SpikingJelly ``Sigmoid``
``fast_sigmoid``    1 / (1 + s|x|)²                      snnTorch ``fast_sigmoid(slope)``, SuperSpike
 [25]                                                    (Zenke & Ganguli 2018), spyx ``superspike(k)``
``triangle`` [1]    s·max(0, 1 - s|x|)                   SpikingJelly ``PiecewiseQuadratic(alpha)``
``rectangular`` [1] s·1[|x| < 1/(2s)]                    SpikingJelly ``Rect(alpha)`` (boxcar)
``erf`` [2]         (s/√π)·exp(-s²x²)                    SpikingJelly ``Erf(alpha)``
``straight_through`` s                                   snnTorch ``straight_through_estimator`` (s = 1)
 [1]
==================  ==================================  ====================================================

``superspike`` is another name for ``fast_sigmoid``. Every surrogate except ``fast_sigmoid`` and
``straight_through`` integrates to 1; ``fast_sigmoid`` integrates to ``2/s``. Other libraries' forms map onto
these (``docs/spiking.md`` has the table): spyx ``arctan(k)`` = ``atan(s=2k) / (π k)`` (peak ``1/π``),
spyx ``triangular(k)`` = ``triangle(s=k) / k``, spyx ``boxcar(width=w, height=h)`` = ``rectangular(s=1/w)·h·w``,
SymbolicLight's training ATan ``1/(1+(2x)²)`` = ``atan(s=4/π)·π/2``; snnax's SuperSpike ``1/(1+β|x|)`` is not
squared and has no equivalent here. snnTorch's ``triangular`` is a sign function, not a triangle.

**MPR** (membrane potential rectifier, InfLoR-SNN, Guo et al. ECCV 2022, arXiv 2307.04356): the surrogate
sees a rectified membrane ``φ(u)`` that pulls ``u`` towards the spike values, with ``φ`` fixing 0, the
threshold and 1 (``V_th = 1/2``, ``k = 3`` as in the public implementation):
``φ(u) = tanh(k(u - 1/2)) / (2 tanh(k/2)) + 1/2`` on ``[0, 1]``, ``u^{1/3}`` above 1 and ``1 - (1 - u)^{1/3}``
below 0. ``φ`` is monotone with ``φ(V_th) = V_th``, so spikes are unchanged; the backward becomes
``σ'(g(x))·g'(x)``. For a general threshold the membrane is normalised so that the threshold sits at 1/2:
``u = U / (2θ)``, ``g(x) = 2θ(φ(u) - 1/2)``, ``g'(x) = φ'(u)`` [derived: the paper states ``V_th = 0.5``].
The threshold enters ``g`` only as this normalisation, which gets no gradient.

Every function here is elementwise ``jnp`` (``exp``, ``abs``, ``where``, ``tanh``, ``log``) so that the same
code runs inside the Pallas kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp


def _atan(x, s):
  return (0.5 * s) / (1.0 + (0.5 * math.pi * s * x) ** 2)


def _sigmoid(x, s):  # s·sig(sx)·sig(-sx) written with exp(-|sx|) <= 1: finite for any x
  e = jnp.exp(-jnp.abs(s * x))
  return s * e / (1.0 + e) ** 2


def _fast_sigmoid(x, s):
  return 1.0 / (1.0 + s * jnp.abs(x)) ** 2


def _triangle(x, s):
  return s * jnp.maximum(0.0, 1.0 - s * jnp.abs(x))


def _rectangular(x, s):
  return jnp.where(jnp.abs(x) < 0.5 / s, s, 0.0)


def _erf(x, s):
  return (s / math.sqrt(math.pi)) * jnp.exp(-(s * x) ** 2)


def _straight_through(x, s):
  return jnp.ones_like(x) * s


# name -> (default scale, σ'(x, s))
SURROGATES: dict[str, tuple[float, Callable]] = {
    "atan": (2.0, _atan),
    "sigmoid": (25.0, _sigmoid),
    "fast_sigmoid": (25.0, _fast_sigmoid),
    "superspike": (25.0, _fast_sigmoid),
    "triangle": (1.0, _triangle),
    "rectangular": (1.0, _rectangular),
    "erf": (2.0, _erf),
    "straight_through": (1.0, _straight_through),
}

MPR_K = 3.0  # steepness of the rectifier's tanh branch (public InfLoR-SNN implementation)


def _power(base, exponent: float):
  """``base ** exponent`` for ``base >= 1`` as ``exp(exponent·log(base))`` (lowers everywhere; no cbrt)."""
  return jnp.exp(exponent * jnp.log(base))


def mpr(u):
  """``φ(u)`` of the membrane rectifier (module docstring)."""
  inside = jnp.tanh(MPR_K * (u - 0.5)) / (2.0 * math.tanh(0.5 * MPR_K)) + 0.5
  above = _power(jnp.maximum(u, 1.0), 1.0 / 3.0)
  below = 1.0 - _power(jnp.maximum(1.0 - u, 1.0), 1.0 / 3.0)
  return jnp.where(u > 1.0, above, jnp.where(u < 0.0, below, inside))


def mpr_derivative(u):
  """``φ'(u)``, finite everywhere."""
  t = jnp.tanh(MPR_K * (u - 0.5))
  inside = MPR_K * (1.0 - t * t) / (2.0 * math.tanh(0.5 * MPR_K))
  above = _power(jnp.maximum(u, 1.0), -2.0 / 3.0) / 3.0
  below = _power(jnp.maximum(1.0 - u, 1.0), -2.0 / 3.0) / 3.0
  return jnp.where(u > 1.0, above, jnp.where(u < 0.0, below, inside))


@dataclasses.dataclass(frozen=True)
class Surrogate:
  """A resolved surrogate: ``name`` from :data:`SURROGATES`, its ``scale``, and whether MPR is applied.

  Build it with :func:`get` (validates); it is hashable, so it can be a static argument.
  """
  name: str = "atan"
  scale: float = 2.0
  mpr: bool = False

  def grad(self, x, threshold):
    """``dS/dx`` at ``x = U - θ`` (float32), for thresholds ``threshold`` broadcastable to ``x``."""
    fn = SURROGATES[self.name][1]
    if not self.mpr:
      return fn(x, self.scale)
    u = (x + threshold) / (2.0 * threshold)
    return fn(2.0 * threshold * (mpr(u) - 0.5), self.scale) * mpr_derivative(u)


def get(surrogate: str | Surrogate = "atan", scale: float | None = None, mpr_rectifier: bool = False
        ) -> Surrogate:
  """Validates a surrogate name (or passes a ``Surrogate`` through) and its scale; ValueError otherwise."""
  if isinstance(surrogate, Surrogate):
    if scale is not None or mpr_rectifier:
      raise ValueError(f"surrogate_scale/mpr: got {scale!r}/{mpr_rectifier!r} with a Surrogate instance "
                       f"{surrogate}; allowed: None/False (the instance carries them)")
    return surrogate
  if not isinstance(surrogate, str) or surrogate not in SURROGATES:
    raise ValueError(f"surrogate: got {surrogate!r}; allowed: {', '.join(map(repr, SURROGATES))}")
  if scale is None:
    scale = SURROGATES[surrogate][0]
  elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
    raise ValueError(f"surrogate_scale: got {scale!r}; allowed: None (the surrogate's default "
                     f"{SURROGATES[surrogate][0]:g}) or a positive finite number")
  if not isinstance(mpr_rectifier, bool):
    raise ValueError(f"mpr: got {mpr_rectifier!r}; allowed: True or False")
  return Surrogate(surrogate, float(scale), mpr_rectifier)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def spike(surrogate: Surrogate, x, threshold):
  """``H(x) = 1[x > 0]`` in ``x.dtype`` with the surrogate backward; ``threshold`` (broadcastable to ``x``) is
  used only by MPR's normalisation and gets a zero cotangent."""
  x = jnp.asarray(x)
  return (x > 0).astype(x.dtype)


def _spike_fwd(surrogate, x, threshold):
  x = jnp.asarray(x)
  return spike(surrogate, x, threshold), (x, jnp.asarray(threshold))


def _spike_bwd(surrogate, residuals, g):
  x, threshold = residuals
  grad = surrogate.grad(x.astype(jnp.float32), jnp.asarray(threshold, jnp.float32))
  return (g * grad).astype(x.dtype), jnp.zeros_like(threshold)


spike.defvjp(_spike_fwd, _spike_bwd)
