"""Pallas Triton (GPU) kernels for ``spiking_scan``: the time loop fused in one kernel each way.

Grid ``(M / BLOCK,)`` over the flat neurons of :mod:`._flat` (``M`` padded to a multiple of ``BLOCK``): each
program owns ``BLOCK`` neurons for the whole sequence and walks time with a ``fori_loop``, the float32
membrane in registers; each step loads one coalesced ``BLOCK``-wide row of the time-major current and writes
one row of spikes and of the membrane entering the step (the backward's only residual). The backward walks
time in reverse carrying the membrane cotangent and the per-neuron ``β``/``θ`` gradient sums in registers.
``triton.CompilerParams`` is passed explicitly (the default GPU lowering is Mosaic GPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import dispatch
from pallas_kernels.spiking_scan import _flat
from pallas_kernels.spiking_scan._step import backward_step, forward_step

BLOCK = 256  # neurons per program (a power of two, as Triton needs)
_PARAMS = pltriton.CompilerParams(num_warps=4, num_stages=1)


def _padded(a, neurons_pad, fill=0.0):
  """Pads the last (neuron) axis to ``neurons_pad``."""
  pad = [(0, 0)] * (a.ndim - 1) + [(0, neurons_pad - a.shape[-1])]
  return jnp.pad(a, pad, constant_values=fill)


def _call(kernel, ins, outs, name):
  neurons_pad = ins[0].shape[-1]
  spec = lambda a: pl.BlockSpec(a.shape[:-1] + (BLOCK,), lambda i: (0,) * (a.ndim - 1) + (i,))
  return pl.pallas_call(kernel, out_shape=outs, grid=(neurons_pad // BLOCK,), in_specs=[spec(a) for a in ins],
                        out_specs=[spec(o) for o in outs], compiler_params=_PARAMS,
                        interpret=dispatch.interpret_mode(), name=name)(*ins)


def _forward(x_TM, beta_M, theta_M, u0_M, *, config):
  seq, neurons = x_TM.shape
  neurons_pad = -(-neurons // BLOCK) * BLOCK

  def kernel(x_ref, beta_ref, theta_ref, u0_ref, s_ref, pre_ref, final_ref):
    beta, theta = beta_ref[...], theta_ref[...]

    def step(t, u):
      pre_ref[t, :] = u
      s, u = forward_step(u, x_ref[t, :].astype(jnp.float32), beta, theta, config)
      s_ref[t, :] = s.astype(s_ref.dtype)
      return u

    final_ref[...] = jax.lax.fori_loop(0, seq, step, u0_ref[...])

  x = _padded(x_TM, neurons_pad)
  ins = (x, _padded(beta_M, neurons_pad), _padded(theta_M, neurons_pad, 1.0), _padded(u0_M, neurons_pad))
  outs = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(x.shape, jnp.float32),
          jax.ShapeDtypeStruct((neurons_pad,), jnp.float32)]
  spikes, pre, final = _call(kernel, ins, outs, "spiking_scan_fwd_triton")
  return spikes[:, :neurons], pre[:, :neurons], final[:neurons]


def _backward(x_TM, beta_M, theta_M, pre_TM, g_spikes_TM, g_pre_TM, g_final_M, *, config):
  seq, neurons = x_TM.shape
  neurons_pad = -(-neurons // BLOCK) * BLOCK
  with_pre = g_pre_TM is not None

  def kernel(*refs):
    x_ref, pre_ref, gs_ref = refs[:3]
    gpre_ref = refs[3] if with_pre else None
    beta_ref, theta_ref, gfinal_ref, gx_ref, gbeta_ref, gtheta_ref, gu0_ref = refs[3 + with_pre:]
    beta, theta = beta_ref[...], theta_ref[...]

    def step(j, carry):
      g_u, g_b, g_t = carry
      t = seq - 1 - j
      g_x, g_u, d_b, d_t = backward_step(pre_ref[t, :], x_ref[t, :].astype(jnp.float32), beta, theta, g_u,
                                         gs_ref[t, :].astype(jnp.float32), config)
      gx_ref[t, :] = g_x
      if gpre_ref is not None:
        g_u = g_u + gpre_ref[t, :]
      return g_u, g_b + d_b, g_t + d_t

    zeros = jnp.zeros_like(beta)
    gu0_ref[...], gbeta_ref[...], gtheta_ref[...] = jax.lax.fori_loop(0, seq, step,
                                                                      (gfinal_ref[...], zeros, zeros))

  time_ins = (x_TM, pre_TM, g_spikes_TM) + ((g_pre_TM,) if with_pre else ())
  ins = tuple(_padded(a, neurons_pad) for a in time_ins) + (
      _padded(beta_M, neurons_pad), _padded(theta_M, neurons_pad, 1.0), _padded(g_final_M, neurons_pad))
  per = jax.ShapeDtypeStruct((neurons_pad,), jnp.float32)
  outs = [jax.ShapeDtypeStruct((seq, neurons_pad), jnp.float32), per, per, per]
  g_x, g_beta, g_theta, g_u0 = _call(kernel, ins, outs, "spiking_scan_bwd_triton")
  return g_x[:, :neurons], g_beta[:neurons], g_theta[:neurons], g_u0[:neurons]


_KERNELS = _flat.Kernels("pallas_triton", _forward, _backward)


def spiking_scan(current, beta, threshold, initial_membrane, *, config, return_membrane):
  """Canonical ``spiking_scan`` implementation (see ``pallas_kernels.spiking_scan``)."""
  return _flat.spiking_scan(_KERNELS, current, beta, threshold, initial_membrane, config=config,
                            return_membrane=return_membrane)
