"""Fast pure-XLA implementations (the default everywhere until a Pallas kernel is validated), with the chunk
math of :mod:`._gla_math` / :mod:`._delta_math` and a hand-written backward (``jax.custom_vjp`` in the wrapper)
that keeps the forward's chunk states instead of autodiff's per-operation residuals.

Each half of an op (forward; backward) is one loop over groups of consecutive chunks (:func:`_over_groups`):
a group's chunk-parallel work (state writes, WY/UT factors, outputs, gradients) runs batched over its chunks,
and the state recurrence runs through them in order (``lax.scan``), the state carried from group to group (in
reverse for the backward). No whole-sequence intermediate is written but the residuals the backward reads (the
chunk states and, for the delta rule, ``delta``; GLA also keeps the final state) and the results.

* On a CPU a group holds about :data:`GROUP_BYTES` of queries (one 64-row chunk at H=8, K=V=128), so its
  intermediates stay in cache and its memory is reused from group to group. XLA:CPU allocates a program's
  temporaries on every call, and past glibc's ``mmap`` threshold every page of them faults on first touch. At
  H=8, K=V=128, T=4096 the same loops with all chunks in one group take 1.7-1.8x as long forward+backward
  (``docs/linear_attention_kernels.md``, "The CPU path").
* On accelerators one group holds all chunks: batched over every chunk, with ``lax.scan`` over chunks only for
  the state recurrence (whose steps are elementwise for gated linear attention).

A group's rows are viewed chunk-major, ``(n, B, KV, group, C, dim)``: a key/value head broadcasts over its group
of query heads (size-1 axis) inside the dots, so GQA never copies k or v. Sums of products are dots (``_tiles.row_dot``
etc.). On a CPU every dot runs in float32 (XLA CPU has no fast 16-bit GEMM); elsewhere dots take the inputs'
dtype with float32 accumulation.
"""

from __future__ import annotations

import functools
import typing

import jax
import jax.numpy as jnp

from pallas_kernels.linear_attention import _chunked, _delta_math, _gla_math, _tiles, reference

_F32 = jnp.float32
# Sub-chunk rows of the exact per-channel intra-chunk scores (:class:`._gla_math.SecondaryChunkScores`).
SUB_CHUNK = 4
# On a CPU, float32 bytes of queries per group of chunks (:func:`_over_groups`): one 64-row chunk at H=8,
# K=V=128. A sequence whose queries fit in WHOLE_BYTES (as at H=2, K=V=32, T=4096) is one group: it stays in
# cache anyway, and fewer, larger operations win. The exact per-channel form, whose temporaries are about
# three times the others', always runs in groups of EXACT_GROUP_BYTES.
GROUP_BYTES = 1 << 18
WHOLE_BYTES = 1 << 20
EXACT_GROUP_BYTES = GROUP_BYTES // 8


class Options(typing.NamedTuple):
  """The plan's options: bytes of queries per group of chunks for the head and mild forms and for the exact
  per-channel form (None: all chunks in one group), and the dtype the forward keeps its chunk states in."""
  group_bytes: int | None
  exact_group_bytes: int | None
  states_dtype: typing.Any = _F32


def _swap(x):
  """``(B, heads, T, D)`` <-> ``(B, T, heads, D)``. The wrapper's arrays are transposes of the caller's
  ``(B, T, heads, D)`` ones, so the two transposes cancel: XLA reads the inputs and writes the results in the
  caller's layout, group by group (:func:`_over_groups`)."""
  return None if x is None else jnp.swapaxes(x, 1, 2)


def _to_chunks(x, kv_heads: int, chunk: int):
  """``(B, R, heads, D)`` -> ``(R / C, B, KV, heads / KV, C, D)``: chunk-major, every dot batching over the
  leading axes and a key/value head broadcasting over its group of query heads (size-1 axis)."""
  batch, rows, heads, dim = x.shape
  return jnp.transpose(x.reshape(batch, rows // chunk, chunk, kv_heads, heads // kv_heads, dim), (1, 0, 3, 4, 2, 5))


def _from_chunks(x):
  """Inverse of :func:`_to_chunks`: ``(n, B, KV, g, C, D)`` -> ``(B, n * C, KV * g, D)``."""
  n, batch, kv, group, chunk, dim = x.shape
  return jnp.transpose(x, (1, 0, 4, 2, 3, 5)).reshape(batch, n * chunk, kv * group, dim)


def _grouped_states(s, kv_heads: int):
  """``(B, H, V, K)`` -> ``(B, KV, group, V, K)``."""
  return s.reshape(s.shape[0], kv_heads, s.shape[1] // kv_heads, *s.shape[2:])


def _flat_states(s):
  """Inverse of :func:`_grouped_states`."""
  return s.reshape(s.shape[0], s.shape[1] * s.shape[2], *s.shape[3:])


def _sum_to(x, like):
  """``x`` ``(..., KV, g, C, D)`` summed over its group of query heads when ``like`` has one (GQA's k, v and a
  per-key-head beta)."""
  return jnp.sum(x, axis=3, keepdims=True) if like.shape[3] == 1 and x.shape[3] != 1 else x


def _cumulative(g, plan):
  """A group's ``G`` from what the op was given: with ``plan.step_decays`` (a per-key-channel decay) the
  per-step log decays, clamped and summed here; else ``G`` itself. Clamped and summed group by group, the
  whole-sequence per-channel ``G`` and its cotangent are never written (16 MiB each at H=8, K=V=128, T=4096),
  nor is a clamped copy of the decays; a per-head ``G`` is small, and summing it here cost more than it saved."""
  if not plan.step_decays or g is None:
    return g
  return _chunked.within_chunk_cumsum(jnp.maximum(g, _tiles.MIN_LOG_DECAY))


def _step_grad(dG, g, plan):
  """The cotangent of what the op was given (:func:`_cumulative`) from that of ``G``."""
  if not plan.step_decays or g is None:
    return dG
  return jnp.where(g >= _tiles.MIN_LOG_DECAY, _chunked.within_chunk_cumsum(dG, reverse=True), 0.0)


def _last(G):
  return None if G is None else G[..., -1:, :]


def _over_groups(body, carry, tokens, chunks, plan, group_bytes: int | None, *, kv_heads: int,
                 reverse: bool = False):
  """``(carry, (token_ys, chunk_ys))`` of ``body(carry, token_xs, chunk_xs) -> (carry, (token_ys, chunk_ys))``
  run on consecutive groups of chunks, in order (``reverse``: from the last).

  ``tokens``: ``(B, T, heads, D)`` arrays (None allowed), given to ``body`` chunk-major (:func:`_to_chunks`);
  ``chunks``: arrays with one entry per chunk on their leading axis. ``body``'s results come back as whole
  arrays of the same two kinds. A group holds about ``group_bytes`` of ``tokens[0]`` (all chunks when None), as
  many chunks as divide the chunk count, at least one. A ``fori_loop`` slices each group out of the whole
  arrays and writes its results in place: a group's temporaries are reused by the next, and only a group's rows
  are ever in the chunk-major layout (the module docstring says why both matter on a CPU).
  """
  seq = tokens[0].shape[1]
  n = seq // plan.chunk
  group = n if group_bytes is None else max(1, group_bytes * n // (4 * tokens[0].size))
  group = min(group, n)
  while n % group:
    group -= 1
  grouped = lambda xs: jax.tree.map(lambda x: _to_chunks(x, kv_heads, plan.chunk), xs)
  if group == n:
    carry, (token_ys, chunk_ys) = body(carry, grouped(tokens), chunks)
    return carry, (jax.tree.map(_from_chunks, token_ys), chunk_ys)
  steps, size = n // group, group * plan.chunk
  take = lambda i: (grouped(jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, i * size, size, 1), tokens)),
                    jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, i * group, group, 0), chunks))
  token_shapes, chunk_shapes = jax.eval_shape(body, carry, *take(0))[1]

  def step(j, state):
    i = steps - 1 - j if reverse else j
    carry, (token_ys, chunk_ys) = body(state[0], *take(i))
    token_out, chunk_out = state[1]
    return carry, (jax.tree.map(lambda out, y: jax.lax.dynamic_update_slice_in_dim(out, _from_chunks(y), i * size, 1),
                                token_out, token_ys),
                   jax.tree.map(lambda out, y: jax.lax.dynamic_update_slice_in_dim(out, y, i * group, 0),
                                chunk_out, chunk_ys))

  token_out = jax.tree.map(lambda s: jnp.zeros((s.shape[1], seq, s.shape[2] * s.shape[3], s.shape[5]), s.dtype),
                           token_shapes)
  chunk_out = jax.tree.map(lambda s: jnp.zeros((n, *s.shape[1:]), s.dtype), chunk_shapes)
  return jax.lax.fori_loop(0, steps, step, (carry, (token_out, chunk_out)))


def _recurrence(state, carry, write, *, reverse: bool = False):
  """``S' = carry * S + write`` through a group's chunks: ``(last state, state before each chunk)``; with
  ``reverse``, the state-cotangent recurrence (``(dS entering the first chunk, dS leaving each chunk)``)."""
  step = lambda s, xs: (_gla_math.advance(s, *xs), s)
  return jax.lax.scan(step, state, (carry, write), reverse=reverse)


def _scores(plan, form: str):
  """The intra-chunk scores of ``form``: "head" (:class:`._gla_math.HeadScores`: no decay or a per-head one),
  "mild" (:class:`._gla_math.MidScores`: a per-key-channel decay of mild span) or "exact"
  (:class:`._gla_math.SecondaryChunkScores`: any per-key-channel decay)."""
  return {"head": lambda q, k, G: _gla_math.HeadScores(q, k, G, plan.dtype),
          "mild": lambda q, k, G: _gla_math.MidScores(q, k, G, plan.dtype),
          "exact": lambda q, k, G: _gla_math.SecondaryChunkScores(q, k, G, plan.dtype, SUB_CHUNK)}[form]


def _with_form(plan, g, run):
  """``run(form, group_bytes)`` for the decay form of ``plan`` (:func:`_scores`); ``g`` the per-step log decays
  ``(B, T, H, K')``.

  A per-key-channel decay takes the "mild" form when :func:`._gla_math.is_mild` holds, else "exact": one
  ``lax.cond`` around the whole loop, so each branch compiles as one fused program. A ``cond`` needs the
  temporaries of its larger branch even when that branch never runs, which is why the exact form's groups are
  smaller (``docs/linear_attention_kernels.md``, "Fresh memory: what the choice cost, and chunk groups")."""
  if plan.decay != "channel":
    return run("head", plan.options.group_bytes)
  mild = _gla_math.is_mild(g.reshape(g.shape[0], -1, plan.chunk, g.shape[2] * g.shape[3]))
  return jax.lax.cond(mild, lambda: run("mild", plan.options.group_bytes),
                      lambda: run("exact", plan.options.exact_group_bytes))


# ---- gated linear attention ----------------------------------------------------------------------------------


def _gla_forward(q, k, v, g, h0, plan):
  kv = k.shape[1]
  tokens = tuple(map(_swap, (q, k, v, g)))

  def run(form, group_bytes):
    scores = _scores(plan, form)

    def body(state, xs, _):
      q, k, v, g = xs
      G = _cumulative(g, plan)
      write = _gla_math.state_write(k, v, G, _last(G), plan.dtype)
      state, states = _recurrence(state, _gla_math.carry(_last(G)), write)
      states = states.astype(plan.options.states_dtype)
      o = _gla_math.chunk_output(q, v, G, states, scores(q, k, G), plan.dtype)
      return state, ((plan.scale * o,), (states,))

    final, ((o,), (states,)) = _over_groups(body, _grouped_states(h0, kv), tokens, (), plan, group_bytes,
                                            kv_heads=kv)
    return o, final, states

  o, final, states = _with_form(plan, tokens[3], run)  # swapped outside the cond, where the wrapper's cancels
  return (_swap(o), _flat_states(final)), ((q, k, v, g), states, final.astype(states.dtype))


def _gla_backward(residuals, cotangents, plan):
  (q, k, v, g), states, final = residuals
  do, dh_final = cotangents
  kv = k.shape[1]
  tokens = tuple(map(_swap, (q, k, v, g, do)))
  dh_final = _grouped_states(dh_final, kv)
  # The last row's extra dG of every chunk, sum_v S' * dS' (:func:`._gla_math.end_state_grad`), pairs the
  # state entering the next chunk with its cotangent; for a group's last chunk both belong to the group after
  # it, which the reverse loop has just run and which passes the product on in its carry.
  d_end = _gla_math.end_state_grad(final, dh_final, jnp.zeros((1, q.shape[-1] if plan.decay == "channel" else 1)))

  def run(form, group_bytes):
    scores = _scores(plan, form)

    def body(carry, xs, chunk_xs):
      (dstate, d_end), (q, k, v, g, do), (h,) = carry, xs, chunk_xs
      G, do = _cumulative(g, plan), plan.scale * do.astype(_F32)
      write = _gla_math.state_grad_write(q, G, do, plan.dtype)
      dstate, dS = _recurrence(dstate, _gla_math.carry(_last(G)), write, reverse=True)
      if G is not None:
        d_ends = jnp.concatenate([_gla_math.end_state_grad(h[1:], dS[:-1], _last(G)), d_end[None]])
        d_end = _gla_math.end_state_grad(h[0], dstate, _last(G))
      dq, dk, dv, dG = _gla_math.chunk_grads(q, k, v, G, _last(G), h, dS, do, scores(q, k, G), plan.dtype,
                                             d_last=None if G is None else d_ends)
      return (dstate, d_end), ((dq, _sum_to(dk, k), _sum_to(dv, v), _step_grad(dG, g, plan)), ())

    (dh0, _), (grads, _) = _over_groups(body, (dh_final, d_end), tokens, (states,), plan, group_bytes,
                                        kv_heads=kv, reverse=True)
    return grads, _flat_states(dh0)

  grads, dh0 = _with_form(plan, tokens[3], run)
  return (*map(_swap, grads), dh0)


# ---- gated delta rule -----------------------------------------------------------------------------------------


def _delta_forward(q, k, v, beta, G, h0, plan):
  kv = k.shape[1]

  def body(state, xs, _):
    q, k, v, beta, G = xs
    factors = _delta_math.prepare(k, v, beta, G, plan.dtype)

    def step(s, xs):
      delta, new = _delta_math.state_step(*xs, s, plan.dtype)
      return new, (s, delta)

    k_end = _gla_math.key_to_end(k, G, _last(G))
    state, (states, delta) = jax.lax.scan(step, state, (factors.w, factors.u, k_end, _gla_math.carry(_last(G))))
    states = states.astype(plan.options.states_dtype)
    return state, ((plan.scale * _delta_math.output(q, k, G, delta, states, plan.dtype),), (states, delta))

  final, ((o,), (states, delta)) = _over_groups(body, _grouped_states(h0, kv), tuple(map(_swap, (q, k, v, beta, G))),
                                                (), plan, plan.options.group_bytes, kv_heads=kv)
  return (_swap(o), _flat_states(final)), ((q, k, v, beta, G), states, delta)


def _delta_backward(residuals, cotangents, plan):
  (q, k, v, beta, G), states, delta = residuals
  do, dh_final = cotangents
  kv = k.shape[1]

  def body(dstate, xs, chunk_xs):
    (q, k, v, beta, G, do), (h, delta) = xs, chunk_xs
    do = plan.scale * do.astype(_F32)
    factors = _delta_math.prepare(k, v, beta, G, plan.dtype)
    scores, d_delta_intra, write = _delta_math.state_grad_inputs(q, k, G, do, plan.dtype)

    def step(ds, xs):
      d_delta, ds_prev = _delta_math.state_grad_step(*xs, ds, plan.dtype)
      return ds_prev, (ds, d_delta)

    k_end = _gla_math.key_to_end(k, G, _last(G))
    dstate, (dS, d_delta) = jax.lax.scan(step, dstate, (d_delta_intra, write, k_end, factors.w,
                                                        _gla_math.carry(_last(G))), reverse=True)
    dq, dk, dv, dbeta, dG = _delta_math.grads(q, k, v, beta, G, _last(G), h, delta, d_delta, dS, do, plan.dtype,
                                              factors=factors, scores=scores)
    return dstate, ((dq, _sum_to(dk, k), _sum_to(dv, v), _sum_to(dbeta, beta), dG), ())

  dh0, (grads, _) = _over_groups(body, _grouped_states(dh_final, kv), tuple(map(_swap, (q, k, v, beta, G, do))),
                                 (states, delta), plan, plan.options.group_bytes, kv_heads=kv, reverse=True)
  return (*map(_swap, grads), _flat_states(dh0))


@functools.lru_cache(maxsize=None)
def backend(states_dtype: str = "float32") -> _chunked.Backend:
  """The ``xla`` :class:`._chunked.Backend`; ``states_dtype``: the dtype its forward keeps the chunk states in
  for the backward (the Pallas kernels' ``Config.states_dtype``; float32 as shipped, bfloat16 for the numerics
  study ``experiments.benchmarks.linear_attention_state_dtype``)."""
  def plan(q, chunk_size):
    if jax.default_backend() != "cpu":
      return chunk_size, q.dtype, Options(None, None, jnp.dtype(states_dtype))
    group_bytes = None if 4 * q.size <= WHOLE_BYTES else GROUP_BYTES
    return chunk_size, _F32, Options(group_bytes, EXACT_GROUP_BYTES, jnp.dtype(states_dtype))

  return _chunked.Backend("xla", gla=_chunked.Op(_gla_forward, _gla_backward),
                          delta=_chunked.Op(_delta_forward, _delta_backward), plan=plan,
                          sums_channel_decays=True)


BACKEND = backend()


def linear_attention(q, k, v, log_decay, *, config=None, **kwargs):
  """Chunked gated linear attention; arguments and returns as in :mod:`pallas_kernels.linear_attention`."""
  del config  # Pallas settings
  return _chunked.linear_attention(BACKEND, q, k, v, log_decay, **kwargs)


def delta_rule(q, k, v, beta, log_decay, *, config=None, **kwargs):
  """Chunked (gated) delta rule via the per-chunk WY/UT transform and a state scan over chunks."""
  del config  # Pallas settings
  return _chunked.delta_rule(BACKEND, q, k, v, beta, log_decay, **kwargs)


# ---- one decoding step ---------------------------------------------------------------------------------------


def _broadcast_heads(x, heads: int):
  """``(B, KV, ...)`` -> ``(B, heads, ...)`` float32 as a broadcast, which XLA fuses into the state update that
  reads it (GQA without storing k, v or beta per query head)."""
  x = x.astype(jnp.float32)
  batch, kv = x.shape[:2]
  if kv == heads:
    return x
  return jnp.broadcast_to(x[:, :, None], (batch, kv, heads // kv, *x.shape[2:])).reshape(batch, heads, *x.shape[2:])


def linear_attention_step(q, k, v, state, log_decay, *, scale):
  """One token of gated linear attention in ``O(K V)`` per head: the token-by-token math of
  :func:`.reference.linear_attention_step` on the state's own ``(B, H, K, V)`` shape, with k, v broadcast to the
  query heads. (On ``(B, KV, group, K, V)`` views of the state, XLA copied the state and computed its update
  twice every step: 4x the time on the 2-core CPU at H=8, K=V=128, and 13x for the delta rule;
  ``experiments/benchmarks/linear_attention_step.py``.)"""
  heads = q.shape[1]
  return reference.linear_attention_step(q, _broadcast_heads(k, heads), _broadcast_heads(v, heads), state,
                                         log_decay, scale=scale)


def delta_rule_step(q, k, v, beta, state, log_decay, *, scale):
  """One token of the gated delta rule in ``O(K V)`` per head, reading the state once before writing it.

  With ``d = exp(g)`` and ``S' = d S + k delta^T``: ``delta = beta (v - d S^T k)`` and
  ``o = scale S'^T q = scale (d S^T q + (q . k) delta)``, so ``S^T k`` and ``S^T q`` are one two-column product
  over the old state, and the update is one more pass. (The recurrence as written, as in
  :func:`.reference.delta_rule_step`, reads the state three times: ``S^T k``, the update, ``S'^T q``; 2.5x the
  time on the 2-core CPU at B=64, H=8, K=V=128.) k, v and beta are broadcast to the query heads."""
  heads, dtype = q.shape[1], q.dtype
  k, v, beta = (_broadcast_heads(x, heads) for x in (k, v, beta))
  q = q.astype(jnp.float32)
  decay = 1.0 if log_decay is None else jnp.exp(log_decay.astype(jnp.float32))[..., None]  # (B, H, 1)
  both = jnp.einsum("bhjk,bhkv->bhjv", jnp.stack([k, q], axis=2), state)  # (B, H, 2, V)
  k_S, q_S = decay * both[:, :, 0], decay * both[:, :, 1]
  delta = beta[..., None] * (v - k_S)
  state = (1.0 if log_decay is None else decay[..., None]) * state + k[..., None] * delta[..., None, :]
  o = scale * (q_S + jnp.sum(q * k, axis=-1, keepdims=True) * delta)
  return o.astype(dtype), state
