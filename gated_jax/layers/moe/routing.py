"""What every router returns, the ``ROUTERS`` registry and the pieces routers share.

A router maps tokens ``x_BTD`` to a :class:`Routing`: per token ``S`` routing *slots*, each an expert id and a
combine weight. Token-choice routers have ``S = k`` (fewer active slots for adaptive routers, whose inactive
slots hold the sentinel id ``num_experts`` and weight 0); expert choice has one slot per expert. The full
distribution over experts and the raw logits ride along for the losses and metrics of
:mod:`gated_jax.layers.moe.losses`. Routing math is always float32, whatever the model's compute dtype
(Switch Transformer's "selective precision", arXiv 2101.03961 §2.4): the router kernel is a float32 parameter
and the tokens are cast up before the product.

Routers are linen modules built as ``ROUTERS.get(name)(num_experts=E, k=k, **router_kwargs)`` and called as
``router(x_BTD, train_step=None) -> Routing``. Stochastic routers draw noise from
``gated_jax.layers.collections.noise_key`` and are deterministic without it (evaluation, decoding).
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gated_jax.layers.registry import Registry

ROUTERS = Registry("router")

_INIT_STDDEV = 0.02


@flax.struct.dataclass
class Routing:
  """Routing decisions of a batch (all float32 / int32).

  Attributes:
    weights: ``(B, T, S)`` combine weights; 0 in inactive slots.
    indices: ``(B, T, S)`` expert ids; ``num_experts`` (the sentinel) in inactive slots.
    probs: ``(B, T, E)`` the router's distribution over experts (balance loss, entropy).
    logits: ``(B, T, E)`` raw router logits (z-loss).
    aux: router-specific auxiliary losses, name -> scalar (e.g. noisy top-k's ``importance`` and ``load``).
  """
  weights: jax.Array
  indices: jax.Array
  probs: jax.Array
  logits: jax.Array
  aux: Mapping[str, jax.Array] = flax.struct.field(default_factory=dict)


def check_positive_int(name: str, value) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name}: got {value!r}; allowed: a positive int")


def check_choice(name: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f"{name}: got {value!r}; allowed: {', '.join(map(repr, allowed))}")


class Router(nn.Module):
  """Base of the routers: a float32 ``(embed, experts)`` kernel and the field checks.

  Attributes:
    num_experts: E.
    k: routing slots per token (the most experts a token may use).
  """
  num_experts: int
  k: int = 2
  kernel_init: nn.initializers.Initializer = nn.initializers.normal(_INIT_STDDEV)

  def check_fields(self, *, k_max: int | None = None) -> None:
    check_positive_int("num_experts", self.num_experts)
    check_positive_int("k", self.k)
    limit = self.num_experts if k_max is None else k_max
    if self.k > limit:
      raise ValueError(f"k: got {self.k}; allowed: 1 to {limit} for {type(self).__name__} with "
                       f"{self.num_experts} experts")

  def logits(self, x_BTD: jax.Array, name: str = "kernel") -> jax.Array:
    """``x W`` in float32 at the highest precision, ``(B, T, E)``."""
    kernel = self.param(name, nn.with_logical_partitioning(self.kernel_init, ("embed", None)),
                        (x_BTD.shape[-1], self.num_experts), jnp.float32)
    return jnp.einsum("btd,de->bte", x_BTD.astype(jnp.float32), kernel, precision=jax.lax.Precision.HIGHEST)


def top_k(scores_BTE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """The ``k`` largest scores and their expert ids (int32), largest first (ties: lower id first)."""
  values, indices = jax.lax.top_k(scores_BTE, k)
  return values, indices.astype(jnp.int32)


def deactivate(weights: jax.Array, indices: jax.Array, active: jax.Array, num_experts: int
               ) -> tuple[jax.Array, jax.Array]:
  """Slots where ``active`` is False get weight 0 and the sentinel id ``num_experts``."""
  return jnp.where(active, weights, 0.0), jnp.where(active, indices, num_experts).astype(jnp.int32)


def linear_schedule(train_step: jax.Array | None, start: float, end: float, steps: int) -> jax.Array:
  """``start`` at step 0 to ``end`` at ``steps`` (then flat); ``end`` when ``train_step`` is None (outside
  training)."""
  if train_step is None:
    return jnp.asarray(end, jnp.float32)
  fraction = jnp.clip(jnp.asarray(train_step, jnp.float32) / max(steps, 1), 0.0, 1.0)
  return jnp.asarray(start, jnp.float32) + (end - start) * fraction
