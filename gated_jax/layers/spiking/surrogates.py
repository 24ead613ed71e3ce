"""Surrogate spike functions: ``S = H(x) = 1[x > 0]`` forward, a smooth pseudo-derivative backward.

Each named function takes ``x = U - θ`` (membrane minus threshold) and its scale parameter, named as in the
library it comes from; the formulas, defaults and the equivalents in spyx, SymbolicLight and snnax are in
:mod:`pallas_kernels.spiking_scan.surrogates` (the single definition shared with the ``spiking_scan``
kernels) and ``docs/spiking.md``::

    atan(x, alpha=2)            (α/2) / (1 + (π α x / 2)²)          snnTorch / SpikingJelly default
    sigmoid(x, slope=25)        k·sig(kx)·(1 - sig(kx))             numerically stable form
    fast_sigmoid(x, slope=25)   1 / (1 + k|x|)²                     = superspike
    triangle(x, alpha=1)        α·max(0, 1 - α|x|)                  SpikingJelly PiecewiseQuadratic
    rectangular(x, alpha=1)     α·1[|x| < 1/(2α)]                   boxcar
    erf(x, alpha=2)             (α/√π)·exp(-α²x²)
    straight_through(x, scale=1) scale

``spike_fn(name, scale, mpr)`` builds the same function by name, optionally with InfLoR-SNN's membrane
rectifier (MPR) on the surrogate path (it needs the threshold: ``fn(x, threshold)``).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.spiking_scan import surrogates as _kernel_surrogates
from pallas_kernels.spiking_scan.surrogates import SURROGATES, Surrogate, spike


def _named(name: str, x: jax.Array, scale: float) -> jax.Array:
  return spike(_kernel_surrogates.get(name, scale), x, jnp.ones((), jnp.float32))


def atan(x: jax.Array, alpha: float = 2.0) -> jax.Array:
  """Heaviside with the arctangent surrogate (snnTorch ``surrogate.atan``, SpikingJelly ``ATan``)."""
  return _named("atan", x, alpha)


def sigmoid(x: jax.Array, slope: float = 25.0) -> jax.Array:
  """Heaviside with the sigmoid-derivative surrogate (snnTorch ``surrogate.sigmoid``), finite for any x."""
  return _named("sigmoid", x, slope)


def fast_sigmoid(x: jax.Array, slope: float = 25.0) -> jax.Array:
  """Heaviside with the fast-sigmoid / SuperSpike surrogate (Zenke & Ganguli 2018, arXiv 1705.11146)."""
  return _named("fast_sigmoid", x, slope)


superspike = fast_sigmoid


def triangle(x: jax.Array, alpha: float = 1.0) -> jax.Array:
  """Heaviside with the triangle surrogate (SpikingJelly ``PiecewiseQuadratic``; Esser et al. 2016)."""
  return _named("triangle", x, alpha)


def rectangular(x: jax.Array, alpha: float = 1.0) -> jax.Array:
  """Heaviside with the rectangular (boxcar) surrogate (SpikingJelly ``Rect``)."""
  return _named("rectangular", x, alpha)


def erf(x: jax.Array, alpha: float = 2.0) -> jax.Array:
  """Heaviside with the Gaussian (erf-derivative) surrogate (SpikingJelly ``Erf``)."""
  return _named("erf", x, alpha)


def straight_through(x: jax.Array, scale: float = 1.0) -> jax.Array:
  """Heaviside with a constant pseudo-derivative (straight-through estimator, Bengio et al. arXiv 1308.3432)."""
  return _named("straight_through", x, scale)


def spike_fn(name: str = "atan", scale: float | None = None, mpr: bool = False
             ) -> Callable[..., jax.Array]:
  """``fn(x, threshold=1.0)``: the Heaviside of ``x = U - θ`` with surrogate ``name`` (ValueError on an unknown
  name or a bad scale); ``threshold`` only normalises the MPR rectifier."""
  surrogate = _kernel_surrogates.get(name, scale, mpr)
  return lambda x, threshold=1.0: spike(surrogate, x, jnp.asarray(threshold, jnp.float32))


__all__ = ["SURROGATES", "Surrogate", "atan", "erf", "fast_sigmoid", "rectangular", "sigmoid", "spike",
           "spike_fn", "straight_through", "superspike", "triangle"]
