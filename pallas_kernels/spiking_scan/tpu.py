"""Pallas TPU (Mosaic) kernels for ``spiking_scan``: the time loop fused in one kernel each way.

The flat ``(T, M)`` problem (:mod:`._flat`) is laid out ``(T, R, 128)`` (neurons on the 128 lanes and ``R``
sublane rows, padded to a multiple of the row block). Grid ``(R / rows, T / steps)``: neuron blocks
"parallel", time chunks last and "arbitrary". The membrane of a ``(rows, 128)`` block stays in a VMEM scratch
across time chunks and in vector registers across the steps of a chunk (a ``fori_loop`` over the chunk's
leading, untiled time axis). The forward writes the spikes and the float32 membrane entering each step (the
backward's only residual) once; the backward walks the chunks in reverse carrying the membrane cotangent and
the per-neuron ``β``/``θ`` gradient sums in VMEM and applies the surrogate (:func:`._step.backward_step`).
A ragged last chunk runs only its real steps (the trip count is ``min(steps, T - start)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import dispatch
from pallas_kernels.spiking_scan import _flat
from pallas_kernels.spiking_scan._step import backward_step, forward_step

LANES = 128
ROW_BLOCK = 64  # sublane rows per neuron block: 64 x 128 neurons, 32 KiB of float32 per time step
TIME_BLOCK = 128  # time steps per grid step
_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"))


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


class _Layout:
  """Padding of the flat ``(T, M)`` arrays to ``(T_pad, R, 128)`` blocks of ``(steps, rows, 128)``."""

  def __init__(self, seq: int, neurons: int):
    self.seq, self.neurons = seq, neurons
    rows = _round_up(-(-neurons // LANES), 16)  # 16: bfloat16 sublane tiling
    self.rows = min(ROW_BLOCK, rows)
    self.total_rows = _round_up(rows, self.rows)
    self.steps = min(TIME_BLOCK, seq)
    self.num_chunks = -(-seq // self.steps)
    self.grid = (self.total_rows // self.rows, self.num_chunks)

  def time_major(self, a_TM, *, reverse=False):
    pad = ((0, self.num_chunks * self.steps - self.seq), (0, self.total_rows * LANES - self.neurons))
    block = pl.BlockSpec((self.steps, self.rows, LANES),
                         (lambda i, n: (self.num_chunks - 1 - n, i, 0)) if reverse else (lambda i, n: (n, i, 0)))
    return jnp.pad(a_TM, pad).reshape(-1, self.total_rows, LANES), block

  def per_neuron(self, a_M, fill=0.0):
    padded = jnp.pad(a_M, (0, self.total_rows * LANES - self.neurons), constant_values=fill)
    return padded.reshape(self.total_rows, LANES), pl.BlockSpec((self.rows, LANES), lambda i, n: (i, 0))

  def chunk_steps(self, n):
    """Real steps in chunk ``n`` (the last chunk may be ragged)."""
    return jnp.minimum(self.steps, self.seq - n * self.steps)

  def unpad_time(self, a):
    return a.reshape(-1, self.total_rows * LANES)[:self.seq, :self.neurons]

  def unpad_neurons(self, a):
    return a.reshape(-1)[:self.neurons]

  def call(self, kernel, ins, in_specs, out_shapes, out_specs, scratch, name):
    return pl.pallas_call(kernel, out_shape=out_shapes, grid=self.grid, in_specs=in_specs, out_specs=out_specs,
                          scratch_shapes=[pltpu.VMEM((self.rows, LANES), jnp.float32)] * scratch,
                          compiler_params=_PARAMS, interpret=dispatch.interpret_mode(), name=name)(*ins)


def _forward(x_TM, beta_M, theta_M, u0_M, *, config):
  layout = _Layout(*x_TM.shape)
  x, x_spec = layout.time_major(x_TM)
  (beta, spec), (theta, _), (u0, _) = (layout.per_neuron(beta_M), layout.per_neuron(theta_M, 1.0),
                                       layout.per_neuron(u0_M))

  def kernel(x_ref, beta_ref, theta_ref, u0_ref, s_ref, pre_ref, final_ref, u_scratch):
    n = pl.program_id(1)

    @pl.when(n == 0)
    def _():
      u_scratch[...] = u0_ref[...]

    beta_v, theta_v = beta_ref[...], theta_ref[...]

    def step(t, u):
      pre_ref[t] = u
      s, u = forward_step(u, x_ref[t].astype(jnp.float32), beta_v, theta_v, config)
      s_ref[t] = s.astype(s_ref.dtype)
      return u

    u_scratch[...] = jax.lax.fori_loop(0, layout.chunk_steps(n), step, u_scratch[...])

    @pl.when(n == pl.num_programs(1) - 1)
    def _():
      final_ref[...] = u_scratch[...]

  shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(x.shape, jnp.float32),
            jax.ShapeDtypeStruct(beta.shape, jnp.float32)]
  spikes, pre, final = layout.call(kernel, (x, beta, theta, u0), [x_spec, spec, spec, spec], shapes,
                                   [x_spec, x_spec, spec], 1, "spiking_scan_fwd_tpu")
  return layout.unpad_time(spikes), layout.unpad_time(pre), layout.unpad_neurons(final)


def _backward(x_TM, beta_M, theta_M, pre_TM, g_spikes_TM, g_pre_TM, g_final_M, *, config):
  layout = _Layout(*x_TM.shape)
  with_pre = g_pre_TM is not None
  time_arrays = [layout.time_major(a, reverse=True) for a in (x_TM, pre_TM, g_spikes_TM)
                 + ((g_pre_TM,) if with_pre else ())]
  (beta, spec), (theta, _), (g_final, _) = (layout.per_neuron(beta_M), layout.per_neuron(theta_M, 1.0),
                                            layout.per_neuron(g_final_M))
  time_spec = time_arrays[0][1]

  def kernel(*refs):
    x_ref, pre_ref, gs_ref = refs[:3]
    gpre_ref = refs[3] if with_pre else None
    beta_ref, theta_ref, gfinal_ref, gx_ref, gbeta_ref, gtheta_ref, gu0_ref, gu_scr, gb_scr, gt_scr = \
        refs[3 + with_pre:]
    n = pl.program_id(1)
    chunk = layout.num_chunks - 1 - n

    @pl.when(n == 0)
    def _():
      gu_scr[...] = gfinal_ref[...]
      gb_scr[...] = jnp.zeros_like(gb_scr)
      gt_scr[...] = jnp.zeros_like(gt_scr)

    beta_v, theta_v = beta_ref[...], theta_ref[...]
    count = layout.chunk_steps(chunk)

    def step(j, carry):
      g_u, g_b, g_t = carry
      t = count - 1 - j
      g_x, g_u, d_b, d_t = backward_step(pre_ref[t], x_ref[t].astype(jnp.float32), beta_v, theta_v, g_u,
                                         gs_ref[t].astype(jnp.float32), config)
      gx_ref[t] = g_x
      if gpre_ref is not None:
        g_u = g_u + gpre_ref[t]
      return g_u, g_b + d_b, g_t + d_t

    g_u, g_b, g_t = jax.lax.fori_loop(0, count, step, (gu_scr[...], gb_scr[...], gt_scr[...]))
    gu_scr[...], gb_scr[...], gt_scr[...] = g_u, g_b, g_t

    @pl.when(n == pl.num_programs(1) - 1)
    def _():
      gbeta_ref[...], gtheta_ref[...], gu0_ref[...] = g_b, g_t, g_u

  padded_x = time_arrays[0][0]
  per = jax.ShapeDtypeStruct(beta.shape, jnp.float32)
  g_x, g_beta, g_theta, g_u0 = layout.call(
      kernel, tuple(a for a, _ in time_arrays) + (beta, theta, g_final),
      [time_spec] * len(time_arrays) + [spec] * 3,
      [jax.ShapeDtypeStruct(padded_x.shape, jnp.float32), per, per, per], [time_spec, spec, spec, spec], 3,
      "spiking_scan_bwd_tpu")
  return (layout.unpad_time(g_x), layout.unpad_neurons(g_beta), layout.unpad_neurons(g_theta),
          layout.unpad_neurons(g_u0))


_KERNELS = _flat.Kernels("pallas_tpu", _forward, _backward)


def spiking_scan(current, beta, threshold, initial_membrane, *, config, return_membrane):
  """Canonical ``spiking_scan`` implementation (see ``pallas_kernels.spiking_scan``)."""
  return _flat.spiking_scan(_KERNELS, current, beta, threshold, initial_membrane, config=config,
                            return_membrane=return_membrane)
