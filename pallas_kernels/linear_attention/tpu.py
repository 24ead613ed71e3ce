"""Pallas TPU (Mosaic) kernels of both chunked ops (the passes of :mod:`._pallas`): a sequential pass is a grid
``(B, H, V tiles, K tiles, N)`` whose chunk axis is last and "arbitrary" (every other axis "parallel"), with
the float32 state tile carried in a VMEM scratch; parallel passes have every axis "parallel". A tile must be
a multiple of 128 dividing its dimension, else the whole dimension is one tile (Mosaic's (8, 128) block rule
then holds for any head size). Opt-in by name (``implementation="pallas_tpu"``) until validated on a TPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import dispatch
from pallas_kernels.linear_attention import _chunked, _pallas
from pallas_kernels.linear_attention._pallas import Config


def default_config() -> Config:
  """128-wide tiles on every TPU generation (the vreg lane width and the MXU side); float32 stored states."""
  return Config(block_k=128, block_v=128)


def _tile(dim: int, block: int) -> int:
  return block if block < dim and dim % block == 0 and block % 128 == 0 else dim


def _params(config: Config, sequential: bool):
  del config
  return pltpu.CompilerParams(dimension_semantics=("parallel",) * 4 + (("arbitrary",) if sequential else ()))


def _scan(s: _pallas.Sizes, inputs, state_in, step, extra_out, *, name, reverse):
  """A sequential pass over grid ``(B, H, Vt, Kt, N)`` (see :class:`._pallas.Platform`)."""
  num = s.num
  ids = lambda b, h, vt, kt, n: (b, h, num - 1 - n if reverse else n, vt, kt)
  states_dtype = jnp.dtype(s.plan.options.states_dtype)

  def kernel(*refs):
    ins, rest = refs[:len(inputs)], refs[len(inputs):]
    init_ref, per_chunk_ref, last_ref, *extra_refs, scratch = rest

    @pl.when(pl.program_id(4) == 0)
    def _():
      scratch[...] = init_ref[...]

    per_chunk_ref[...] = scratch[...].astype(per_chunk_ref.dtype)
    scratch[...] = step(ins, extra_refs, 0, scratch[...])

    @pl.when(pl.program_id(4) == num - 1)
    def _():
      last_ref[...] = scratch[...]

  return pl.pallas_call(
      kernel, grid=(s.batch, s.heads, *s.tiles, num),
      in_specs=[s.row_spec(x, w, ids) for x, w in inputs] + [s.state_spec(ids)],
      out_specs=[s.state_spec(ids, 0), s.state_spec(ids)] + [s.row_spec(shape, w, ids) for shape, w in extra_out],
      out_shape=[s.states_shape(states_dtype), jax.ShapeDtypeStruct(state_in.shape, jnp.float32)]
      + [shape for shape, _ in extra_out],
      scratch_shapes=[pltpu.VMEM((s.bv, s.bk), jnp.float32)], compiler_params=_params(s.plan.options, True),
      interpret=dispatch.interpret_mode(), name=f"{name}_tpu")(*[x for x, _ in inputs], state_in)


PLATFORM = _pallas.Platform("pallas_tpu", params=_params, scan=_scan, tile=_tile, default_config=default_config)


def linear_attention(q, k, v, log_decay, *, config: Config | None = None, **kwargs):
  """Canonical ``linear_attention`` implementation (see ``pallas_kernels.linear_attention``); ``config``
  overrides :func:`default_config`."""
  return _chunked.linear_attention(_pallas.backend(PLATFORM, config), q, k, v, log_decay, **kwargs)


def delta_rule(q, k, v, beta, log_decay, *, config: Config | None = None, **kwargs):
  """Canonical ``delta_rule`` implementation (see ``pallas_kernels.delta_rule``)."""
  return _chunked.delta_rule(_pallas.backend(PLATFORM, config), q, k, v, beta, log_decay, **kwargs)
