"""Gated linear attention and the (gated) delta rule: public ops, argument checks, registry.

Both ops share one state convention (docs/architecture.md, "Kernels"): layout ``(batch, seq, heads, dim)``;
``k``/``v`` may have fewer heads than ``q`` (GQA: key/value head ``h // (H / KV)`` serves query head ``h``; the
state is per query head, and no implementation but ``reference`` copies k or v); decays are natural-log values
<= 0 (``-inf`` allowed: the state is emptied); the recurrent state is ``(batch, heads, key_dim, value_dim)``
float32.

``linear_attention`` (GLA, arXiv 2312.06635 eq. 1; RetNet arXiv 2307.08621; Mamba-2 SSD):

    S_t = Diag(exp(g_t)) S_{t-1} + k_t v_t^T,      o_t = scale * S_t^T q_t

with ``g_t`` = ``log_decay``: ``None`` (no decay), per head ``(B, T, H)`` or per key channel ``(B, T, H, K)``.

``delta_rule`` (DeltaNet arXiv 2406.06484; Gated DeltaNet arXiv 2412.06464 eq. 10):

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale * S_t^T q_t

with ``beta`` ``(B, T, H)`` or ``(B, T, KV)`` and ``g_t`` ``None`` or per head ``(B, T, H)``. Keys are used as
given (layers L2-normalise them).

``segment_ids`` ``(B, T)`` int marks packed sequences: the state is reset to zero where the id changes, so
each sequence gives the same result as alone (``initial_state`` applies to the first one). Both ops return
``o`` ``(B, T, H, V)`` in ``q.dtype``, and ``(o, final_state)`` when ``return_final_state``.

``linear_attention_step`` / ``delta_rule_step`` advance the same recurrences by one token (decoding): inputs
``(B, heads, dim)``, the state in and out, ``O(K V)`` work per head.

Implementations (``implementation=``; see :mod:`pallas_kernels.dispatch`): ``reference`` (token-by-token
scan, the oracle), ``parallel`` (quadratic form), ``xla`` (chunked, the default), ``pallas_tpu`` /
``pallas_triton`` (chunked Pallas kernels, opt-in by name until validated on hardware). The step ops have
``reference`` and ``xla``. How the chunked implementations are built: ``docs/linear_attention_kernels.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import _checks
from pallas_kernels.dispatch import Op
from pallas_kernels.linear_attention._chunked import Config

DEFAULT_CHUNK_SIZE = 64
SMALL_HEAD_CHUNK_SIZE = 32  # when 2 K V / (K + V) <= 32 (:func:`default_chunk_size`)
_LAYOUT = "(batch, seq, heads, dim)"
_STEP_LAYOUT = "(batch, heads, dim)"

linear_attention_op = Op.public("linear_attention")
delta_rule_op = Op.public("delta_rule")
linear_attention_step_op = Op.public("linear_attention_step")
delta_rule_step_op = Op.public("delta_rule_step")
for _op, _fn in ((linear_attention_op, "linear_attention"), (delta_rule_op, "delta_rule")):
  _op.register("reference", f"pallas_kernels.linear_attention.reference:{_fn}")
  _op.register("parallel", f"pallas_kernels.linear_attention.parallel:{_fn}")
  _op.register("xla", f"pallas_kernels.linear_attention.xla:{_fn}", auto_priority=100)
  _op.register("pallas_tpu", f"pallas_kernels.linear_attention.tpu:{_fn}", platforms=("tpu",),
               auto_priority=0, pallas=True)
  _op.register("pallas_triton", f"pallas_kernels.linear_attention.gpu:{_fn}", platforms=("gpu",),
               auto_priority=1, pallas=True)
for _op, _fn in ((linear_attention_step_op, "linear_attention_step"), (delta_rule_step_op, "delta_rule_step")):
  _op.register("reference", f"pallas_kernels.linear_attention.reference:{_fn}")
  _op.register("xla", f"pallas_kernels.linear_attention.xla:{_fn}", auto_priority=100)


def linear_attention(q, k, v, *, log_decay=None, scale: float | None = None, initial_state=None,
                     return_final_state: bool = False, segment_ids=None, chunk_size: int | None = None,
                     kernel_config: Config | None = None, implementation: str | Sequence[str] | None = None):
  """Gated linear attention (see module docstring for the recurrence).

  Args:
    q: ``(B, T, H, K)`` queries.
    k: ``(B, T, KV, K)`` keys, ``H % KV == 0``.
    v: ``(B, T, KV, V)`` values.
    log_decay: ``None``, ``(B, T, H)`` or ``(B, T, H, K)``; natural-log decay per step, <= 0.
    scale: query scale, default ``K ** -0.5``.
    initial_state: ``(B, H, K, V)`` state before the first token (float32), default zeros.
    return_final_state: also return the state after the last token.
    segment_ids: ``(B, T)`` integer ids of packed sequences (state resets where the id changes).
    chunk_size: chunk length for the chunked implementations (default: :func:`default_chunk_size`).
    kernel_config: :class:`Config` tiles, launch settings and stored-state dtype of the Pallas implementations
      (None: their per-device defaults); the other implementations do not use it.
    implementation: see :mod:`pallas_kernels.dispatch`.
  Returns:
    ``o`` ``(B, T, H, V)`` (dtype of ``q``), or ``(o, final_state)`` with ``final_state`` ``(B, H, K, V)``
    float32.
  """
  kwargs = _sequence_args(q, k, v, log_decay, scale, initial_state, segment_ids, chunk_size, kernel_config,
                          decay_forms=("(B, T, H)", "(B, T, H, K)"))
  o, state = linear_attention_op(q, k, v, log_decay, implementation=implementation,
                                 return_final_state=return_final_state, **kwargs)
  return (o, state) if return_final_state else o


def delta_rule(q, k, v, beta, *, log_decay=None, scale: float | None = None, initial_state=None,
               return_final_state: bool = False, segment_ids=None, chunk_size: int | None = None,
               kernel_config: Config | None = None, implementation: str | Sequence[str] | None = None):
  """(Gated) delta rule (see module docstring). ``beta`` is ``(B, T, H)`` or ``(B, T, KV)`` (the write
  strength, typically a sigmoid in (0, 1), or (0, 2) for negative eigenvalues); the other arguments are as in
  :func:`linear_attention`, with ``log_decay`` ``None`` or per head ``(B, T, H)``."""
  kwargs = _sequence_args(q, k, v, log_decay, scale, initial_state, segment_ids, chunk_size, kernel_config,
                          decay_forms=("(B, T, H)",))
  _check_beta(beta, q.shape[:2], q.shape[2], k.shape[2], "(batch, seq, heads)")
  o, state = delta_rule_op(q, k, v, beta, log_decay, implementation=implementation,
                           return_final_state=return_final_state, **kwargs)
  return (o, state) if return_final_state else o


def linear_attention_step(q, k, v, state, *, log_decay=None, scale: float | None = None,
                          implementation: str | Sequence[str] | None = None):
  """One token of :func:`linear_attention` (decoding): ``S' = Diag(exp(g)) S + k v^T``, ``o = scale S'^T q``.

  Args:
    q: ``(B, H, K)``; k: ``(B, KV, K)``; v: ``(B, KV, V)``.
    state: ``(B, H, K, V)`` the state before this token (float32).
    log_decay: ``None``, ``(B, H)`` or ``(B, H, K)``, <= 0.
    scale: query scale, default ``K ** -0.5``.
    implementation: "reference" or "xla" (see :mod:`pallas_kernels.dispatch`).
  Returns:
    ``(o (B, H, V) in q.dtype, new_state (B, H, K, V) float32)``.
  """
  scale = _step_args(q, k, v, state, log_decay, scale, decay_forms=("(B, H)", "(B, H, K)"))
  return linear_attention_step_op(q, k, v, state.astype(jnp.float32), log_decay, scale=scale,
                                  implementation=implementation)


def delta_rule_step(q, k, v, beta, state, *, log_decay=None, scale: float | None = None,
                    implementation: str | Sequence[str] | None = None):
  """One token of :func:`delta_rule`: ``S' = exp(g) (I - beta k k^T) S + beta k v^T``, ``o = scale S'^T q``;
  ``beta`` ``(B, H)`` or ``(B, KV)``, ``log_decay`` ``None`` or ``(B, H)``; other arguments and the return as in
  :func:`linear_attention_step`."""
  scale = _step_args(q, k, v, state, log_decay, scale, decay_forms=("(B, H)",))
  _check_beta(beta, q.shape[:1], q.shape[1], k.shape[1], "(batch, heads)")
  return delta_rule_step_op(q, k, v, beta, state.astype(jnp.float32), log_decay, scale=scale,
                            implementation=implementation)


def _check_qkv(q, k, v, layout: str, head_axis: int) -> None:
  for name, x in (("q", q), ("k", k), ("v", v)):
    _checks.check_array(name, x, rank=head_axis + 2, layout=layout)
  lead, key_dim = q.shape[:head_axis], q.shape[-1]
  if k.shape[:head_axis] != lead or k.shape[-1] != key_dim:
    raise ValueError(f"k: expected shape {(*lead, 'kv_heads', key_dim)} to match q {tuple(q.shape)}, "
                     f"got {tuple(k.shape)}")
  if v.shape[:-1] != k.shape[:-1]:
    raise ValueError(f"v: expected shape {(*k.shape[:-1], 'value_dim')} to match k, got {tuple(v.shape)}")
  _checks.check_group(q.shape[head_axis], k.shape[head_axis])


def _check_log_decay(log_decay, allowed: dict[str, tuple[int, ...]]) -> None:
  if log_decay is None:
    return
  shapes = list(allowed.values())
  if not hasattr(log_decay, "shape") or tuple(log_decay.shape) not in shapes:
    got = tuple(log_decay.shape) if hasattr(log_decay, "shape") else type(log_decay).__name__
    raise ValueError(f"log_decay: got {got}; allowed: None or shape "
                     + " or ".join(f"{f}={s}" for f, s in allowed.items()))
  _checks.check_array("log_decay", log_decay, rank=log_decay.ndim, layout="log decay")
  if not isinstance(log_decay, jax.core.Tracer):  # only concrete values can be checked (not jit arguments)
    with jax.ensure_compile_time_eval():  # a concrete array closed over by a jitted caller stays concrete
      if bool(jnp.any(log_decay > 0)):
        raise ValueError(f"log_decay: natural-log decays must be <= 0, got max {float(jnp.max(log_decay))}")


def _check_scale(scale, key_dim: int) -> float:
  if scale is None:
    return key_dim ** -0.5
  if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
    raise ValueError(f"scale: expected a positive float or None, got {scale!r}")
  return float(scale)


def _check_beta(beta, lead: tuple[int, ...], heads: int, kv_heads: int, layout: str) -> None:
  _checks.check_array("beta", beta, rank=len(lead) + 1, layout=layout)
  if tuple(beta.shape) not in ((*lead, heads), (*lead, kv_heads)):
    raise ValueError(f"beta: expected shape {(*lead, heads)} or {(*lead, kv_heads)} {layout} (query or "
                     f"key/value heads), got {tuple(beta.shape)}")


def _sequence_args(q, k, v, log_decay, scale, initial_state, segment_ids, chunk_size, kernel_config, *,
                   decay_forms):
  """Validates the arguments of the sequence ops; returns the keyword arguments of every implementation."""
  _check_qkv(q, k, v, _LAYOUT, 2)
  batch, seq, heads, key_dim = q.shape
  value_dim = v.shape[3]
  forms = {"(B, T, H)": (batch, seq, heads), "(B, T, H, K)": (batch, seq, heads, key_dim)}
  _check_log_decay(log_decay, {f: forms[f] for f in decay_forms})
  if initial_state is not None:
    _checks.check_array("initial_state", initial_state, rank=4, layout="(batch, heads, key_dim, value_dim)")
    _checks.check_shape("initial_state", initial_state, (batch, heads, key_dim, value_dim),
                        "(batch, heads, key_dim, value_dim)")
    initial_state = initial_state.astype(jnp.float32)
  if segment_ids is not None:
    _checks.check_array("segment_ids", segment_ids, rank=2, layout="(batch, seq)", floating=False)
    _checks.check_shape("segment_ids", segment_ids, (batch, seq), "(batch, seq)")
  _checks.check_positive_int("chunk_size", chunk_size)
  check_kernel_config(kernel_config)
  return dict(scale=_check_scale(scale, key_dim), initial_state=initial_state, segment_ids=segment_ids,
              chunk_size=chunk_size or default_chunk_size(seq, key_dim, value_dim), config=kernel_config)


def check_kernel_config(kernel_config) -> None:
  """Raises ``ValueError`` unless ``kernel_config`` is None or a :class:`Config` (the ops and the layers)."""
  if kernel_config is not None and not isinstance(kernel_config, Config):
    raise ValueError(f"kernel_config: got {kernel_config!r}; allowed: None or a "
                     "pallas_kernels.linear_attention.Config")


def default_chunk_size(seq: int, key_dim: int, value_dim: int) -> int:
  """``DEFAULT_CHUNK_SIZE``, or ``SMALL_HEAD_CHUNK_SIZE`` for small heads; ``seq`` rounded up to a multiple of
  16 when that is shorter (a short sequence is not padded to a whole chunk; 16 keeps every backend's tile
  constraints).

  Small heads: a ``C``-row chunk's intra-chunk products cost ``2 C (K + V)`` FLOPs per token, its state
  products ``4 K V`` whatever ``C``; they balance at ``C = 2 K V / (K + V)``, and where that is at most 32
  (K = V = 32: a 64-row chunk spends twice as much inside the chunk as on the state) the shorter chunk is
  used. Forward+backward at H=2, K=V=32, T=4096 on the 2-core CPU took less time at chunk 32 than at 64 for
  the delta rule and per-head GLA, and about the same for per-channel GLA
  (``experiments/benchmarks/results/linear_attention_cpu_limits.md``, "Chunk length")."""
  full = SMALL_HEAD_CHUNK_SIZE if 2 * key_dim * value_dim <= 32 * (key_dim + value_dim) else DEFAULT_CHUNK_SIZE
  return min(full, -(-seq // 16) * 16)


def _step_args(q, k, v, state, log_decay, scale, *, decay_forms) -> float:
  """Validates the arguments of the step ops; returns the scale."""
  _check_qkv(q, k, v, _STEP_LAYOUT, 1)
  batch, heads, key_dim = q.shape
  _checks.check_array("state", state, rank=4, layout="(batch, heads, key_dim, value_dim)")
  _checks.check_shape("state", state, (batch, heads, key_dim, v.shape[2]), "(batch, heads, key_dim, value_dim)")
  forms = {"(B, H)": (batch, heads), "(B, H, K)": (batch, heads, key_dim)}
  _check_log_decay(log_decay, {f: forms[f] for f in decay_forms})
  return _check_scale(scale, key_dim)
