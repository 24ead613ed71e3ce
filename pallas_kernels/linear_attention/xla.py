"""Fast pure-XLA implementations (the default everywhere until a Pallas kernel is validated): the chunked
passes of :mod:`._chunked` run on all chunks at once (on a CPU, the chunk-parallel ones in groups of chunks:
:func:`_over_chunk_groups`), with ``lax.scan`` over chunks only for the two state recurrences (whose steps are
then elementwise for gated linear attention), the chunk math of :mod:`._gla_math` / :mod:`._delta_math`, and a
hand-written backward (``jax.custom_vjp`` in the wrapper) that keeps the forward's chunk states instead of
autodiff's per-operation residuals.

Arrays are viewed chunk-major, ``(N, B, KV, group, C, dim)``: a key/value head broadcasts over its group of query
heads (size-1 axis) inside the dots, so GQA never copies k or v, and the state scans walk the leading axis. The
intermediates the passes hand each other (chunk states ``(N, B, KV, group, V, K)``, ``w``, ``u``, ``delta`` and
their cotangents) stay in this layout. Sums of products are dots (``_tiles.row_dot`` etc.; see
``docs/linear_attention_kernels.md``, "The CPU path"). On a CPU every dot runs in float32 (XLA CPU has no
fast 16-bit GEMM); elsewhere dots take the inputs' dtype with float32 accumulation.
"""

from __future__ import annotations

import functools
import math
import typing

import jax
import jax.numpy as jnp

from pallas_kernels.linear_attention import _chunked, _delta_math, _gla_math

# Sub-chunk rows of the exact per-channel intra-chunk scores (:class:`._gla_math.SecondaryChunkScores`).
SUB_CHUNK = 4
# On a CPU, float32 bytes of queries per group of chunks in the chunk-parallel passes (:func:`_over_chunk_groups`);
# the exact per-channel form, whose temporaries are about three times the others', takes groups of an eighth.
GROUP_BYTES = 1 << 20
EXACT_GROUP_BYTES = GROUP_BYTES // 8


class _Groups(typing.NamedTuple):
  """The plan's options: bytes per chunk group of the passes and of the exact per-channel form (None: all
  chunks at once, as on accelerators, which want the whole batch in every operation)."""
  passes: int | None
  exact: int | None


def _grouped(x, kv_heads: int, chunk: int):
  """``(B, heads, T, D)`` -> ``(N, B, KV, heads / KV, C, D)``: chunk-major, so the state scans walk the leading
  axis (no relayout of their inputs and outputs) and every dot batches over the leading axes."""
  if x is None:
    return None
  batch, heads, seq, dim = x.shape
  return jnp.moveaxis(x.reshape(batch, kv_heads, heads // kv_heads, seq // chunk, chunk, dim), 3, 0)


def _grouped_states(s, kv_heads: int):
  """``(B, H, V, K)`` -> ``(B, KV, group, V, K)``."""
  return s.reshape(s.shape[0], kv_heads, s.shape[1] // kv_heads, *s.shape[2:])


def _flat(x):
  """Inverse of :func:`_grouped`: ``(N, B, KV, g, C, D)`` -> ``(B, KV * g, T, D)``."""
  n, batch, kv, group, chunk, dim = x.shape
  return jnp.moveaxis(x, 0, 3).reshape(batch, kv * group, n * chunk, dim)


def _flat_states(s):
  """Inverse of :func:`_grouped_states`."""
  return s.reshape(s.shape[0], s.shape[1] * s.shape[2], *s.shape[3:])


def _group_sum(x_grouped):
  """Sums a per-query-head gradient over its group (``(N, B, KV, g, C, D)`` -> ``(B, KV, T, D)``)."""
  return _flat(jnp.sum(x_grouped, axis=3, keepdims=True))


def _regroup(x, kv_heads: int):
  """A grouped per-chunk array of the passes, ``(N, B, KV', g', R, D)``, under ``kv_heads`` key/value heads."""
  return x.reshape(x.shape[0], x.shape[1], kv_heads, -1, *x.shape[4:])


def _last(G):
  return None if G is None else G[..., -1:, :]


def _over_chunk_groups(fn, chunks, group_bytes: int | None):
  """``fn(*chunks)`` (``chunks``: chunk-major arrays, leading axis the chunks; None allowed) on groups of about
  ``group_bytes`` of ``chunks[0]``, or on all chunks at once when they fit in one group (or ``group_bytes`` is
  None). A ``fori_loop`` slices each group out of the whole arrays and writes its results into whole outputs
  (a group size that divides the chunk count, so every group is whole).

  Why, on a CPU: XLA:CPU allocates a program's temporaries on every call, and beyond glibc's ``mmap``
  threshold (at most 32 MiB) that memory comes fresh from the kernel each call, every page faulting on first
  touch. Group by group, a pass's intermediates are reused from one group to the next: at H=8, K=V=128,
  T=4096 a per-channel forward+backward touches about 200 MiB less fresh memory than on all chunks at once
  (``docs/linear_attention_kernels.md``, "Fresh memory: what the choice cost, and chunk groups")."""
  n = chunks[0].shape[0]
  group = n if group_bytes is None else max(1, group_bytes // (4 * math.prod(chunks[0].shape[1:])))
  if group >= n:
    return fn(*chunks)
  while n % group:
    group -= 1
  take = lambda i: jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, i * group, group, 0), chunks)
  shapes = jax.eval_shape(lambda xs: fn(*xs), take(0))

  def step(i, outputs):
    return jax.tree.map(lambda out, y: jax.lax.dynamic_update_slice_in_dim(out, y, i * group, 0), outputs,
                        fn(*take(i)))

  outputs = jax.tree.map(lambda s: jnp.zeros((n, *s.shape[1:]), s.dtype), shapes)
  return jax.lax.fori_loop(0, n // group, step, outputs)


def run_form(plan, form: str, body, chunks):
  """``body(scores, *chunks)`` chunk group by chunk group, ``scores(q, k, G)`` the intra-chunk scores of
  ``form``: "head" (:class:`._gla_math.HeadScores`: no decay or a per-head one), "mild"
  (:class:`._gla_math.MidScores`: a per-key-channel decay of mild span) or "exact"
  (:class:`._gla_math.SecondaryChunkScores`: any per-key-channel decay, in its smaller groups)."""
  scores = {"head": lambda q, k, G: _gla_math.HeadScores(q, k, G, plan.dtype),
            "mild": lambda q, k, G: _gla_math.MidScores(q, k, G, plan.dtype),
            "exact": lambda q, k, G: _gla_math.SecondaryChunkScores(q, k, G, plan.dtype, SUB_CHUNK)}[form]
  group_bytes = plan.options.exact if form == "exact" else plan.options.passes
  return _over_chunk_groups(functools.partial(body, scores), chunks, group_bytes)


def _with_scores(plan, G, body, chunks, finish):
  """``finish(body(scores, *chunks))`` (:func:`run_form`): ``chunks`` the pass's chunk-major arrays, ``scores``
  for the decay form of ``plan``, ``finish`` the relayout of the pass's results (inside each branch, where it
  fuses with their last operations).

  A per-key-channel decay takes the "mild" form when :func:`._gla_math.is_mild` holds, else "exact": one
  ``lax.cond`` around the whole pass, so each branch compiles as one fused program. A ``cond`` needs the
  temporaries of its larger branch even when that branch never runs, which is why the exact form's groups are
  smaller: on all chunks at once it needed 47 MiB of temporaries at H=2, K=V=32, T=4096 (the mild form 15 MiB),
  past glibc's ``mmap`` threshold, and the choice then took 2.3x the mild form alone
  (``docs/linear_attention_kernels.md``, "Fresh memory: what the choice cost, and chunk groups")."""
  if plan.decay != "channel":
    return finish(run_form(plan, "head", body, chunks))
  return jax.lax.cond(_gla_math.is_mild(G), lambda: finish(run_form(plan, "mild", body, chunks)),
                      lambda: finish(run_form(plan, "exact", body, chunks)))


# ---- gated linear attention ----------------------------------------------------------------------------------


def _gla_states(k, v, G, h0, plan):
  kv = k.shape[1]
  k, v, G = (_grouped(x, kv, plan.chunk) for x in (k, v, G))
  write = _gla_math.state_write(k, v, G, _last(G), plan.dtype)
  step = lambda h, xs: (_gla_math.advance(h, *xs), h)
  final, h_all = jax.lax.scan(step, _grouped_states(h0, kv), (_gla_math.carry(_last(G)), write))
  return h_all, _flat_states(final)


def _gla_output(q, k, v, G, h_all, plan):
  kv = k.shape[1]
  q, k, v, G = (_grouped(x, kv, plan.chunk) for x in (q, k, v, G))
  output = lambda scores, q, k, v, G, h: _gla_math.inter_output(q, G, h, plan.dtype) + scores(q, k, G).apply(v)
  return _with_scores(plan, G, output, (q, k, v, G, _regroup(h_all, kv)), lambda o: _flat(plan.scale * o))


def _gla_state_grads(q, G, do, dh_final, plan):
  heads = q.shape[1]
  q, G, do = (_grouped(x, heads, plan.chunk) for x in (q, G, do))
  write = _gla_math.state_grad_write(q, G, plan.scale * do.astype(jnp.float32), plan.dtype)
  step = lambda ds, xs: (_gla_math.advance(ds, *xs), ds)
  dh0, dS_all = jax.lax.scan(step, _grouped_states(dh_final, heads), (_gla_math.carry(_last(G)), write), reverse=True)
  return dS_all, _flat_states(dh0)


def _gla_grads(q, k, v, G, h_all, dS_all, do, plan):
  kv = k.shape[1]
  q, k, v, G, do = (_grouped(x, kv, plan.chunk) for x in (q, k, v, G, do))
  h, dS = _regroup(h_all, kv), _regroup(dS_all, kv)
  do = plan.scale * do.astype(jnp.float32)

  def grads(scores, q, k, v, G, h, dS, do):
    dq_a, dk_a, dv_a = scores(q, k, G).backward(do, v)
    dq, dk, dv, d_keys = _gla_math.inter_grads(q, k, v, G, _last(G), h, dS, do, plan.dtype)
    dq, dk, dv = dq + dq_a, dk + dk_a, dv + dv_a
    d_last = None if G is None else d_keys + _gla_math.carry_grad(_last(G), h, dS)
    return dq, dk, dv, _gla_math.gate_grad(q, k, dq, dk, G, d_last)

  finish = lambda dq, dk, dv, dG: (_flat(dq), _group_sum(dk), _group_sum(dv), None if dG is None else _flat(dG))
  return _with_scores(plan, G, grads, (q, k, v, G, h, dS, do), lambda grads: finish(*grads))


# ---- gated delta rule -----------------------------------------------------------------------------------------


def _delta_prepare(k, v, beta, G, plan):
  kv = k.shape[1]
  k, v, beta, G = (_grouped(x, kv, plan.chunk) for x in (k, v, beta, G))
  w, u, _ = _delta_math.prepare(k, v, beta, G, plan.dtype)
  return w, u  # per key/value head (group axis 1) when nothing in them is per query head


def _delta_states(k, w, u, G, h0, plan):
  kv = k.shape[1]
  k, G = (_grouped(x, kv, plan.chunk) for x in (k, G))
  k_end = _gla_math.key_to_end(k, G, _last(G))

  def step(h, xs):
    w_n, u_n, k_end_n, carry_n = xs
    delta, new = _delta_math.state_step(w_n, u_n, k_end_n, carry_n, h, plan.dtype)
    return new, (h, delta)

  final, (h_all, delta) = jax.lax.scan(step, _grouped_states(h0, kv), (w, u, k_end, _gla_math.carry(_last(G))))
  return h_all, delta, _flat_states(final)


def _delta_output(q, k, G, delta, h_all, plan):
  kv = k.shape[1]
  q, k, G = (_grouped(x, kv, plan.chunk) for x in (q, k, G))
  output = lambda q, k, G, delta, h: _delta_math.output(q, k, G, delta, h, plan.dtype)
  return _flat(plan.scale * _over_chunk_groups(output, (q, k, G, delta, h_all), plan.options.passes))


def _delta_state_grads(q, k, w, G, do, dh_final, plan):
  kv = k.shape[1]
  q, k, G, do = (_grouped(x, kv, plan.chunk) for x in (q, k, G, do))
  d_delta_intra, write = _delta_math.state_grad_inputs(q, k, G, plan.scale * do.astype(jnp.float32), plan.dtype)
  k_end = _gla_math.key_to_end(k, G, _last(G))

  def step(ds, xs):
    d_delta, ds_prev = _delta_math.state_grad_step(*xs, ds, plan.dtype)
    return ds_prev, (ds, d_delta)

  carry = _gla_math.carry(_last(G))
  dh0, (dS_all, d_delta) = jax.lax.scan(step, _grouped_states(dh_final, kv),
                                        (d_delta_intra, write, k_end, w, carry), reverse=True)
  return dS_all, d_delta, _flat_states(dh0)


def _delta_grads(q, k, v, beta, G, h_all, delta, d_delta, dS_all, do, plan):
  kv, heads, beta_heads = k.shape[1], q.shape[1], beta.shape[1]
  q, k, v, beta, G, do = (_grouped(x, kv, plan.chunk) for x in (q, k, v, beta, G, do))
  grads = lambda q, k, v, beta, G, h, delta, d_delta, dS, do: _delta_math.grads(
      q, k, v, beta, G, _last(G), h, delta, d_delta, dS, plan.scale * do.astype(jnp.float32), plan.dtype)
  dq, dk, dv, dbeta, dG = _over_chunk_groups(grads, (q, k, v, beta, G, h_all, delta, d_delta, dS_all, do),
                                             plan.options.passes)
  dbeta = _flat(dbeta) if beta_heads == heads else _group_sum(dbeta)
  return _flat(dq), _group_sum(dk), _group_sum(dv), dbeta, None if dG is None else _flat(dG)


def _plan(q, chunk_size):
  if jax.default_backend() == "cpu":
    return chunk_size, jnp.float32, _Groups(GROUP_BYTES, EXACT_GROUP_BYTES)
  return chunk_size, q.dtype, _Groups(None, None)


BACKEND = _chunked.Backend(
    "xla", gla=(_gla_states, _gla_output, _gla_state_grads, _gla_grads),
    delta=(_delta_prepare, _delta_states, _delta_output, _delta_state_grads, _delta_grads),
    plan=_plan, save_states=True)


def linear_attention(q, k, v, log_decay, *, config=None, **kwargs):
  """Chunked gated linear attention; arguments and returns as in :mod:`pallas_kernels.linear_attention`."""
  del config  # Pallas settings
  return _chunked.linear_attention(BACKEND, q, k, v, log_decay, **kwargs)


def delta_rule(q, k, v, beta, log_decay, *, config=None, **kwargs):
  """Chunked (gated) delta rule via the per-chunk WY/UT transform and a state scan over chunks."""
  del config  # Pallas settings
  return _chunked.delta_rule(BACKEND, q, k, v, beta, log_decay, **kwargs)


# ---- one decoding step ---------------------------------------------------------------------------------------


def _step_grouped(x, kv_heads: int):
  """``(B, heads, ...)`` -> ``(B, KV, heads / KV, ...)``."""
  return x.reshape(x.shape[0], kv_heads, x.shape[1] // kv_heads, *x.shape[2:])


def _step_decay(log_decay, kv_heads):
  """``exp(log_decay)`` as ``(B, KV, g, 1|K, 1)``; 1 without decay."""
  if log_decay is None:
    return 1.0
  decay = _step_grouped(jnp.exp(log_decay.astype(jnp.float32)), kv_heads)
  return decay[..., None, None] if decay.ndim == 3 else decay[..., None]


def linear_attention_step(q, k, v, state, log_decay, *, scale):
  """One token of gated linear attention in ``O(K V)`` per head; GQA without copying k or v."""
  kv = k.shape[1]
  q_g, s_g = _step_grouped(q.astype(jnp.float32), kv), _step_grouped(state, kv)
  kv_outer = k.astype(jnp.float32)[:, :, None, :, None] * v.astype(jnp.float32)[:, :, None, None, :]
  s_g = _step_decay(log_decay, kv) * s_g + kv_outer
  o = jnp.einsum("bhgk,bhgkv->bhgv", q_g * scale, s_g)
  return o.reshape(*q.shape[:2], -1).astype(q.dtype), s_g.reshape(state.shape)


def delta_rule_step(q, k, v, beta, state, log_decay, *, scale):
  """One token of the gated delta rule in ``O(K V)`` per head; GQA without copying k, v or beta."""
  kv = k.shape[1]
  q_g, s_g = _step_grouped(q.astype(jnp.float32), kv), _step_grouped(state, kv)
  k_g, v_g = k.astype(jnp.float32)[:, :, None], v.astype(jnp.float32)[:, :, None]
  beta_g = _step_grouped(beta.astype(jnp.float32), kv)
  s_g = _step_decay(log_decay, kv) * s_g
  delta = beta_g[..., None] * (v_g - jnp.sum(k_g[..., None] * s_g, axis=-2))
  s_g = s_g + k_g[..., None] * delta[..., None, :]
  o = jnp.einsum("bhgk,bhgkv->bhgv", q_g * scale, s_g)
  return o.reshape(*q.shape[:2], -1).astype(q.dtype), s_g.reshape(state.shape)
