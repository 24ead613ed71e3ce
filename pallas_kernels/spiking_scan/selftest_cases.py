"""Self-test cases of :func:`pallas_kernels.spiking_scan`: every reset, both reset timings, float32 and
bfloat16 currents, a length that is not a multiple of the TPU time block and neuron counts that are not
multiples of the lane/thread blocks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.selftest import Case
from pallas_kernels.spiking_scan import spiking_scan

_B, _T, _N = 4, 300, 200


def _inputs(key, *, dtype=jnp.float32):
  """Currents around the threshold (a spike rate near 0.3), per-neuron β and θ, an initial membrane."""
  kc, kb, kt, ku = jax.random.split(key, 4)
  current = (0.6 * jax.random.normal(kc, (_B, _T, _N)) + 0.3).astype(dtype)
  beta = jax.random.uniform(kb, (_N,), minval=0.5, maxval=0.99)
  threshold = jax.random.uniform(kt, (_N,), minval=0.7, maxval=1.3)
  return current, beta, threshold, jax.random.normal(ku, (_B, _N))


def _scan(current, beta, threshold, membrane, *, implementation, **options):
  return spiking_scan(current, beta=beta, threshold=threshold, initial_membrane=membrane, return_membrane=True,
                      return_final_membrane=True, implementation=implementation, **options)


CASES = (
    Case("spiking_scan", "subtract reset atan f32 T=300", functools.partial(_scan, reset="subtract"), _inputs,
         (0, 1, 2, 3), 1e-4),
    Case("spiking_scan", "zero reset immediate live-reset sigmoid+MPR f32 T=300",
         functools.partial(_scan, reset="zero", reset_delay=False, detach_reset=False, surrogate="sigmoid",
                           mpr=True), _inputs, (0, 1, 2, 3), 1e-4),
    Case("spiking_scan", "no reset fast_sigmoid bf16 T=300",
         functools.partial(_scan, reset="none", surrogate="fast_sigmoid"),
         functools.partial(_inputs, dtype=jnp.bfloat16), (0, 1, 2, 3), 2e-2),
)
