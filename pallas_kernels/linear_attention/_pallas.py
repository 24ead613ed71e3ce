"""The passes of :mod:`._chunked` as ``pallas_call``s, shared by the Pallas backends (:mod:`.tpu`, :mod:`.gpu`):
which blocks each pass reads and writes, over which grid, and which per-chunk function of :mod:`._gla_math` /
:mod:`._delta_math` runs on them. A backend supplies a :class:`Platform`: compiler parameters, its tile rule
and how a sequential pass walks the chunks (a grid axis with the state in VMEM on TPU, a loop inside one
program on Triton).

* Sequential passes (states; state cotangents, in reverse) run in parallel over ``(B, H, V tiles, K tiles)``
  and write the state entering (leaving) every chunk. Gated linear attention tiles K and V (its state update
  is elementwise per entry); the delta rule tiles V only (``delta = u - w S^T`` contracts K).
* Parallel passes run over ``(B, H, N, V tiles)``: the outputs (V tiles), the WY/UT prepare and the gradients
  (whole K and V).

Blocks are ``(C, width)`` rows of ``(B, heads, T, dim)`` arrays; a key/value head is read by its group of query
heads through the index map (``h // group``), never repeated. The gradient passes run over key/value heads
instead (grid ``(B, KV, N, 1)``): one program takes a chunk of a key/value head and of its whole group of query
heads (``(group, C, width)`` blocks), runs the group's query heads one after another and sums their
gradients of k, v (and a per-key/value-head beta) as values, so those are written once, at their own size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import dispatch
from pallas_kernels.linear_attention import _chunked, _delta_math, _gla_math
from pallas_kernels.linear_attention._chunked import Config

SUPPORTED_CHUNKS = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class Platform:
  """What differs between Pallas backends.

  Attributes:
    name: implementation name.
    params: ``(config, sequential: bool) -> compiler params``.
    scan: ``(sizes, inputs, state_in, step, extra_out, *, name, reverse) -> (per-chunk states, last state,
      *extra)``: a sequential pass (see :func:`Sizes.row_spec` for ``inputs``; ``step(input refs, extra refs,
      base row, state) -> state``).
    tile: ``(dim, block) -> tile`` (the whole dimension when ``block`` does not suit it).
    default_config: ``() -> Config`` for the current device.
    pad_pow2: K and V must be powers of two (Triton).
  """
  name: str
  params: Callable[[Config, bool], Any]
  scan: Callable
  tile: Callable[[int, int], int]
  default_config: Callable[[], Config]
  pad_pow2: bool = False


class Sizes:
  """Sizes of one pass and its BlockSpec helpers; logical grid ids are ``(b, h, n, vt, kt)``."""

  def __init__(self, platform: Platform, plan, shape_BHTK, value_dim: int, kv_heads: int, *, tile_k=False,
               tile_v=True):
    self.batch, self.heads, self.seq, self.key_dim = shape_BHTK
    self.value_dim, self.chunk, self.plan, self.platform = value_dim, plan.chunk, plan, platform
    self.group, self.num = self.heads // kv_heads, self.seq // plan.chunk
    self.bk = platform.tile(self.key_dim, plan.options.block_k) if tile_k else self.key_dim
    self.bv = platform.tile(self.value_dim, plan.options.block_v) if tile_v else self.value_dim
    self.tiles = (self.value_dim // self.bv, self.key_dim // self.bk)

  def width(self, x, width: str) -> tuple[int, str]:
    """Block width of ``x`` for ``width`` "k" / "v" (the K / V tile) or "all" (per-head decays: 1)."""
    if x.shape[-1] == 1:
      return 1, "all"
    return {"k": self.bk, "v": self.bv, "all": x.shape[-1]}[width], width

  def row_spec(self, x, width: str, ids, rows: int | None = None):
    """BlockSpec of ``rows`` (default C) rows of ``x`` ``(B, heads, T, dim)``; ``ids(*grid) -> (b, h, n, vt,
    kt)`` with ``n`` the row-block index."""
    size, width = self.width(x, width)
    group = self.group if x.shape[1] != self.heads else 1
    head = (lambda h: h) if group == 1 else (lambda h: jax.lax.div(h, group))  # (ids >= 0: no floor fix-up)

    def index(*grid):
      b, h, n, vt, kt = ids(*grid)
      return b, head(h), n, {"k": kt, "v": vt, "all": 0}[width]
    return pl.BlockSpec((None, None, rows or self.chunk, size), index)

  def state_spec(self, ids, chunks: int | None = None):
    """BlockSpec of a ``(V tile, K tile)`` block of a state array: ``(B, H, V, K)`` (``chunks`` None), or
    ``(B, H, N, V, K)`` with one chunk (``chunks`` 0, the axis squeezed) or ``chunks`` chunks."""
    def index(*grid):
      b, h, n, vt, kt = ids(*grid)
      return (b, h, vt, kt) if chunks is None else (b, h, n, vt, kt)
    lead = (None, None) if chunks is None else (None, None, chunks or None)
    return pl.BlockSpec((*lead, self.bv, self.bk), index)

  def states_shape(self, dtype):
    return jax.ShapeDtypeStruct((self.batch, self.heads, self.num, self.value_dim, self.key_dim), dtype)

  def rows_shape(self, dim: int, dtype=jnp.float32, heads: int | None = None):
    return jax.ShapeDtypeStruct((self.batch, heads or self.heads, self.seq, dim), dtype)

  def kv_rows_shape(self, dim: int):
    """float32 rows of a gradient per key/value head (summed over its group by :meth:`parallel_by_kv`)."""
    return self.rows_shape(dim, heads=self.heads // self.group)

  def parallel(self, kernel, inputs, outputs, name):
    """A parallel pass over grid ``(B, H, N, V tiles)``: ``inputs`` ``[(array or None, width | "state")]``,
    ``outputs`` ``[(ShapeDtypeStruct, width)]`` (rows per query head); ``kernel(*input refs (None for absent
    inputs), *output refs)``."""
    ids = lambda b, h, n, vt: (b, h, n, vt, 0)
    spec = lambda x, w: self.state_spec(ids, 0) if w == "state" else self.row_spec(x, w, ids)
    present = [i for i, (x, _) in enumerate(inputs) if x is not None]

    def body(*refs):
      given = iter(refs[:len(present)])
      kernel(*[next(given) if i in present else None for i in range(len(inputs))], *refs[len(present):])

    return pl.pallas_call(
        body, grid=(self.batch, self.heads, self.num, self.tiles[0]),
        in_specs=[spec(*inputs[i]) for i in present],
        out_specs=[self.row_spec(shape, w, ids) for shape, w in outputs],
        out_shape=[shape for shape, _ in outputs], compiler_params=self.platform.params(self.plan.options, False),
        interpret=dispatch.interpret_mode(), name=name)(*[inputs[i][0] for i in present])

  def parallel_by_kv(self, kernel, inputs, outputs, name):
    """:meth:`parallel` over grid ``(B, KV, N, 1)`` (whole K and V): a program runs ``kernel`` for each query head
    of its group in turn, with ``(C, width)`` views of the per-query-head arrays; outputs with ``KV`` heads
    are sums over the group (float32, :class:`_GroupSum`)."""
    if self.group == 1:
      return self.parallel(kernel, inputs, outputs, name)
    group, heads = self.group, self.heads

    def spec(x, width, block_rows):
      per_query = x.shape[1] == heads
      lead = (None, group if per_query else None)
      if width == "state":  # (B, H, N, V, K), one chunk of the group's heads
        return pl.BlockSpec((*lead, None, self.value_dim, self.key_dim), lambda b, kv, n, _: (b, kv, n, 0, 0))
      return pl.BlockSpec((*lead, block_rows, self.width(x, width)[0]), lambda b, kv, n, _: (b, kv, n, 0))

    present = [i for i, (x, _) in enumerate(inputs) if x is not None]
    per_query_in = [inputs[i][0].shape[1] == heads for i in present]
    per_query_out = [shape.shape[1] == heads for shape, _ in outputs]

    def body(*refs):
      ins, outs = refs[:len(present)], refs[len(present):]
      sums = {i: _GroupSum(out) for i, out in enumerate(outs) if not per_query_out[i]}
      for g in range(group):
        given = iter(_Head(ref, g) if per_query else ref for ref, per_query in zip(ins, per_query_in))
        views = [_Head(out, g) if per_query_out[i] else sums[i] for i, out in enumerate(outs)]
        kernel(*[next(given) if i in present else None for i in range(len(inputs))], *views)
      for total in sums.values():
        total.flush()

    return pl.pallas_call(
        body, grid=(self.batch, heads // group, self.num, 1),
        in_specs=[spec(*inputs[i], self.chunk) for i in present],
        out_specs=[spec(shape, w, self.chunk) for shape, w in outputs],
        out_shape=[shape for shape, _ in outputs], compiler_params=self.platform.params(self.plan.options, False),
        interpret=dispatch.interpret_mode(), name=name)(*[inputs[i][0] for i in present])

  def scan(self, inputs, state_in, step, extra_out=(), *, name, reverse=False):
    """A sequential pass (see :class:`Platform`); absent (None) inputs reach ``step`` as None."""
    present = [i for i, (x, _) in enumerate(inputs) if x is not None]

    def full_step(refs, extra_refs, base, state):
      given = iter(refs)
      return step([next(given) if i in present else None for i in range(len(inputs))], extra_refs, base, state)

    return self.platform.scan(self, [inputs[i] for i in present], state_in, full_step, list(extra_out), name=name,
                              reverse=reverse)


class _Head:
  """Query head ``head`` of a ``(group, rows, width)`` block, indexed like a ``(rows, width)`` ref (one indexer:
  Triton's lowering takes no view of a view)."""

  def __init__(self, ref, head: int):
    self.ref, self.head, self.shape, self.dtype = ref, head, ref.shape[1:], ref.dtype

  def _index(self, index):
    rest = (slice(None), slice(None)) if index is Ellipsis else index if isinstance(index, tuple) else (index,)
    return (self.head, *rest)

  def __getitem__(self, index):
    return self.ref[self._index(index)]

  def __setitem__(self, index, x):
    self.ref[self._index(index)] = x


class _GroupSum:
  """Stands in for a key/value head's output block while a program runs the query heads of its group: what
  each stores is summed as values (in registers / vregs) and written once by :meth:`flush`, so the block is
  never read back (a Triton program's threads do not see each other's global-memory writes without a
  barrier)."""

  def __init__(self, ref):
    self.ref, self.shape, self.dtype = ref, ref.shape, ref.dtype
    self._sums = {}

  def __setitem__(self, index, x):
    key = repr(index)  # static indices: Ellipsis or (pl.ds(start, size), slice)
    self._sums[key] = (index, x if key not in self._sums else self._sums[key][1] + x)

  def flush(self):
    for index, x in self._sums.values():
      self.ref[index] = x


def _f32(ref):
  return ref[...].astype(jnp.float32)


# ---- gated linear attention ----------------------------------------------------------------------------------


def _gla_states(platform, k, v, G, h0, plan):
  s = Sizes(platform, plan, (h0.shape[0], h0.shape[1], k.shape[2], h0.shape[3]), h0.shape[2], k.shape[1],
            tile_k=True)

  def step(ins, _, base, state):
    k_ref, v_ref, G_ref = ins
    return _gla_math.kernel_state_step(k_ref, v_ref, G_ref, base, plan.chunk, state, plan.dtype)

  h_all, final = s.scan([(k, "k"), (v, "v"), (G, "k")], h0, step, name="gla_states")
  return h_all, final


def _gla_output(platform, q, k, v, G, h_all, plan):
  s = Sizes(platform, plan, q.shape, v.shape[-1], k.shape[1])

  def kernel(q_ref, k_ref, v_ref, G_ref, h_ref, o_ref):
    _gla_math.kernel_output(q_ref, k_ref, v_ref, G_ref, _f32(h_ref), o_ref, chunk=plan.chunk, scale=plan.scale,
                            dtype=plan.dtype)

  (o,) = s.parallel(kernel, [(q, "all"), (k, "all"), (v, "v"), (G, "all"), (h_all, "state")],
                    [(s.rows_shape(s.value_dim, q.dtype), "v")], "gla_output")
  return o


def _gla_state_grads(platform, q, G, do, dh_final, plan):
  s = Sizes(platform, plan, q.shape, do.shape[-1], q.shape[1], tile_k=True)

  def step(ins, _, base, dstate):
    q_ref, G_ref, do_ref = ins
    return _gla_math.kernel_state_grad_step(q_ref, G_ref, do_ref, base, plan.chunk, dstate, plan.scale, plan.dtype)

  dS_all, dh0 = s.scan([(q, "k"), (G, "k"), (do, "v")], dh_final, step, name="gla_state_grads", reverse=True)
  return dS_all, dh0


def _gla_grads(platform, q, k, v, G, h_all, dS_all, do, plan):
  s = Sizes(platform, plan, q.shape, v.shape[-1], k.shape[1], tile_v=False)

  def kernel(q_ref, k_ref, v_ref, G_ref, h_ref, dS_ref, do_ref, *grad_refs):
    _gla_math.kernel_grads(q_ref, k_ref, v_ref, G_ref, _f32(h_ref), _f32(dS_ref), do_ref, grad_refs,
                           chunk=plan.chunk, scale=plan.scale, dtype=plan.dtype)

  outputs = [(s.rows_shape(s.key_dim), "all"), (s.kv_rows_shape(s.key_dim), "all"),
             (s.kv_rows_shape(s.value_dim), "all")] + ([] if G is None else [(s.rows_shape(G.shape[-1]), "all")])
  grads = s.parallel_by_kv(kernel, [(q, "all"), (k, "all"), (v, "all"), (G, "all"), (h_all, "state"),
                                    (dS_all, "state"), (do, "all")], outputs, "gla_grads")
  return (*grads[:3], grads[3] if G is not None else None)


# ---- gated delta rule -----------------------------------------------------------------------------------------


def _delta_prepare(platform, k, v, beta, G, plan):
  heads = max(beta.shape[1], 0 if G is None else G.shape[1])
  s = Sizes(platform, plan, (k.shape[0], heads, k.shape[2], k.shape[3]), v.shape[-1], k.shape[1], tile_v=False)

  def kernel(k_ref, v_ref, beta_ref, G_ref, w_ref, u_ref):
    _delta_math.kernel_prepare(k_ref, v_ref, beta_ref, G_ref, w_ref, u_ref, chunk=plan.chunk, dtype=plan.dtype)

  w, u = s.parallel(kernel, [(k, "all"), (v, "all"), (beta, "all"), (G, "all")],
                    [(s.rows_shape(s.key_dim), "all"), (s.rows_shape(s.value_dim), "all")], "delta_prepare")
  return w, u


def _delta_states(platform, k, w, u, G, h0, plan):
  s = Sizes(platform, plan, (h0.shape[0], h0.shape[1], k.shape[2], h0.shape[3]), h0.shape[2], k.shape[1])

  def step(ins, extra, base, state):
    w_ref, u_ref, k_ref, G_ref = ins
    return _delta_math.kernel_state_step(w_ref, u_ref, k_ref, G_ref, extra[0], base, plan.chunk, state, plan.dtype)

  h_all, final, delta = s.scan([(w, "all"), (u, "v"), (k, "all"), (G, "all")], h0, step,
                               [(s.rows_shape(s.value_dim), "v")], name="delta_states")
  return h_all, delta, final


def _delta_output(platform, q, k, G, delta, h_all, plan):
  s = Sizes(platform, plan, q.shape, delta.shape[-1], k.shape[1])

  def kernel(q_ref, k_ref, G_ref, delta_ref, h_ref, o_ref):
    _delta_math.kernel_output(q_ref, k_ref, G_ref, delta_ref, _f32(h_ref), o_ref, chunk=plan.chunk,
                              scale=plan.scale, dtype=plan.dtype)

  (o,) = s.parallel(kernel, [(q, "all"), (k, "all"), (G, "all"), (delta, "v"), (h_all, "state")],
                    [(s.rows_shape(s.value_dim, q.dtype), "v")], "delta_output")
  return o


def _delta_state_grads(platform, q, k, w, G, do, dh_final, plan):
  s = Sizes(platform, plan, q.shape, do.shape[-1], k.shape[1])

  def step(ins, extra, base, dstate):
    q_ref, k_ref, w_ref, G_ref, do_ref = ins
    return _delta_math.kernel_state_grad_step(q_ref, k_ref, w_ref, G_ref, do_ref, extra[0], base, plan.chunk,
                                              dstate, plan.scale, plan.dtype)

  dS_all, dh0, d_delta = s.scan([(q, "all"), (k, "all"), (w, "all"), (G, "all"), (do, "v")], dh_final, step,
                                [(s.rows_shape(s.value_dim), "v")], name="delta_state_grads", reverse=True)
  return dS_all, d_delta, dh0


def _delta_grads(platform, q, k, v, beta, G, h_all, delta, d_delta, dS_all, do, plan):
  s = Sizes(platform, plan, q.shape, v.shape[-1], k.shape[1], tile_v=False)

  def kernel(q_ref, k_ref, v_ref, beta_ref, G_ref, h_ref, delta_ref, d_delta_ref, dS_ref, do_ref, *grad_refs):
    _delta_math.kernel_grads(q_ref, k_ref, v_ref, beta_ref, G_ref, _f32(h_ref), delta_ref, d_delta_ref,
                             _f32(dS_ref), do_ref, grad_refs, chunk=plan.chunk, scale=plan.scale, dtype=plan.dtype)

  outputs = [(s.rows_shape(s.key_dim), "all"), (s.kv_rows_shape(s.key_dim), "all"),
             (s.kv_rows_shape(s.value_dim), "all"), (s.rows_shape(1, heads=beta.shape[1]), "all")] + (
                 [] if G is None else [(s.rows_shape(1), "all")])
  grads = s.parallel_by_kv(kernel, [(q, "all"), (k, "all"), (v, "all"), (beta, "all"), (G, "all"), (h_all, "state"),
                                    (delta, "all"), (d_delta, "all"), (dS_all, "state"), (do, "all")], outputs,
                           "delta_grads")
  return (*grads[:4], grads[4] if G is not None else None)


@functools.lru_cache(maxsize=None)
def backend(platform: Platform, config: Config | None = None) -> _chunked.Backend:
  """The :class:`._chunked.Backend` of ``platform`` with ``config`` (default: the platform's, per device)."""
  bind = lambda fn: functools.partial(fn, platform)

  def plan(q, chunk_size):
    if chunk_size not in SUPPORTED_CHUNKS:
      raise NotImplementedError(f"{platform.name}: chunk_size={chunk_size} is unsupported; supported: "
                                f"{SUPPORTED_CHUNKS}")
    return chunk_size, q.dtype, config or platform.default_config()

  return _chunked.Backend(
      platform.name, gla=_chunked.gla_from_passes(*map(bind, (_gla_states, _gla_output, _gla_state_grads,
                                                                _gla_grads))),
      delta=_chunked.delta_from_passes(*map(bind, (_delta_prepare, _delta_states, _delta_output, _delta_state_grads,
                                                    _delta_grads))),
      plan=plan, pad_pow2=platform.pad_pow2)
