"""Pallas Triton (GPU) kernels of both chunked ops (the passes of :mod:`._pallas`): a sequential pass is one
program per ``(B, H, V tile, K tile)`` walking the chunks with ``lax.fori_loop`` and the float32 state tile in
registers (Triton programs cannot share state across a grid axis); parallel passes are one program per
``(B, H, N, V tile)``. K and V are padded to powers of two (>= 16, for ``tl.dot``) by the wrapper.
``triton.CompilerParams`` is passed explicitly (without it the GPU lowering picks Mosaic GPU). Opt-in by name
(``implementation="pallas_triton"``) until validated on a GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import dispatch
from pallas_kernels.linear_attention import _chunked, _pallas
from pallas_kernels.linear_attention._pallas import Config


def default_config() -> Config:
  """Per-GPU defaults from flash-linear-attention's autotuning space (BK, BV in {32, 64}, 2-4 stages): 64-wide
  tiles, 4 warps; 3 pipelining stages on Hopper and later, 2 before."""
  kind = jax.devices()[0].device_kind if jax.devices() else ""
  hopper = any(name in kind for name in ("H100", "H200", "H800", "GH200", "B100", "B200", "GB200"))
  return Config(block_k=64, block_v=64, num_warps=4, num_stages=3 if hopper else 2)


def _tile(dim: int, block: int) -> int:
  return min(dim, block)  # both powers of two


def _params(config: Config, sequential: bool):
  del sequential
  return pltriton.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _scan(s: _pallas.Sizes, inputs, state_in, step, extra_out, *, name, reverse):
  """A sequential pass: grid ``(B, H, Vt, Kt)``, each program loops over the chunks of whole-sequence blocks."""
  num, chunk = s.num, s.chunk
  ids = lambda b, h, vt, kt: (b, h, 0, vt, kt)
  states_dtype = jnp.dtype(s.plan.options.states_dtype)

  def kernel(*refs):
    ins, (init_ref, per_chunk_ref, last_ref, *extra_refs) = refs[:len(inputs)], refs[len(inputs):]

    def body(i, state):
      n = num - 1 - i if reverse else i
      per_chunk_ref[n] = state.astype(per_chunk_ref.dtype)
      return step(ins, extra_refs, pl.multiple_of(n * chunk, chunk), state)

    last_ref[...] = jax.lax.fori_loop(0, num, body, init_ref[...])

  return pl.pallas_call(
      kernel, grid=(s.batch, s.heads, *s.tiles),
      in_specs=[s.row_spec(x, w, ids, rows=s.seq) for x, w in inputs] + [s.state_spec(ids)],
      out_specs=[s.state_spec(ids, num), s.state_spec(ids)]
      + [s.row_spec(shape, w, ids, rows=s.seq) for shape, w in extra_out],
      out_shape=[s.states_shape(states_dtype), jax.ShapeDtypeStruct(state_in.shape, jnp.float32)]
      + [shape for shape, _ in extra_out],
      compiler_params=_params(s.plan.options, True), interpret=dispatch.interpret_mode(),
      name=f"{name}_triton")(*[x for x, _ in inputs], state_in)


PLATFORM = _pallas.Platform("pallas_triton", params=_params, scan=_scan, tile=_tile, default_config=default_config,
                            pad_pow2=True)


def linear_attention(q, k, v, log_decay, *, config: Config | None = None, **kwargs):
  """Canonical ``linear_attention`` implementation (see ``pallas_kernels.linear_attention``); ``config``
  overrides :func:`default_config`."""
  return _chunked.linear_attention(_pallas.backend(PLATFORM, config), q, k, v, log_decay, **kwargs)


def delta_rule(q, k, v, beta, log_decay, *, config: Config | None = None, **kwargs):
  """Canonical ``delta_rule`` implementation (see ``pallas_kernels.delta_rule``)."""
  return _chunked.delta_rule(_pallas.backend(PLATFORM, config), q, k, v, beta, log_decay, **kwargs)
