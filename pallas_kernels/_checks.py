"""Argument checks shared by the public ops: each raises ValueError naming the argument, what was given
and what is allowed, before anything reaches XLA."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def shape_of(x) -> tuple[int, ...]:
  return tuple(jax.typeof(x).shape) if hasattr(jax, "typeof") else tuple(jnp.shape(x))


def check_array(name: str, x, *, rank: int, layout: str, floating: bool = True) -> None:
  """Checks that ``x`` is an array of ``rank`` dims (``layout`` names them, e.g. "(batch, seq, heads, dim)")."""
  if not hasattr(x, "shape") or not hasattr(x, "dtype"):
    raise ValueError(f"{name}: expected an array of shape {layout}, got {type(x).__name__}")
  if x.ndim != rank:
    raise ValueError(f"{name}: expected shape {layout} (rank {rank}), got shape {tuple(x.shape)}")
  if floating and not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name}: expected a floating dtype, got {x.dtype}")
  if not floating and not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name}: expected an integer dtype, got {x.dtype}")


def check_shape(name: str, x, expected: Sequence[int], layout: str) -> None:
  if tuple(x.shape) != tuple(expected):
    raise ValueError(f"{name}: expected shape {tuple(expected)} {layout}, got {tuple(x.shape)}")


def check_choice(name: str, value, allowed: Sequence) -> None:
  if value not in allowed:
    raise ValueError(f"{name}: got {value!r}; allowed: {', '.join(map(repr, allowed))}")


def check_positive_int(name: str, value, *, allow_none: bool = True) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name}: expected a positive int{' or None' if allow_none else ''}, got {value!r}")


def check_group(q_heads: int, kv_heads: int, kv_name: str = "k") -> int:
  """GQA: query heads must be a positive multiple of key/value heads; returns the group size."""
  if kv_heads <= 0 or q_heads % kv_heads:
    raise ValueError(f"{kv_name}: number of heads {kv_heads} must divide the query heads {q_heads} (GQA)")
  return q_heads // kv_heads
