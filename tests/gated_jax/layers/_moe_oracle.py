"""A loop-over-experts oracle of the MoE layer (MaxText's ``MoeLoopBlock`` pattern): every expert on every
token in float32 at the highest precision, weighted by the router's slots that chose it."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gated_jax.layers import MLPS, ROUTERS


def glu(x, wi, wi_up, wo):
  with jax.default_matmul_precision("highest"):
    return (jax.nn.silu(x @ wi) * (x @ wi_up)) @ wo


def routing_of(params, x, *, router, num_experts, k, router_kwargs=None):
  return ROUTERS.get(router)(num_experts=num_experts, k=k, **(router_kwargs or {})).apply(
      {"params": params["router"]}, x)


def loop_moe(params, x, routing, *, num_shared_experts=0, hidden_dim=None):
  """``Σ_e (Σ_slots [index == e] weight) · expert_e(x)`` plus the shared experts."""
  x32 = x.astype(jnp.float32)
  y = jnp.zeros(x.shape, jnp.float32)
  for e in range(params["wi"].shape[0]):
    weight = jnp.sum(jnp.where(routing.indices == e, routing.weights, 0.0), axis=-1)
    y = y + weight[..., None] * glu(x32, params["wi"][e], params["wi_up"][e], params["wo"][e])
  if num_shared_experts:
    shared = MLPS.get("swiglu")(d_model=x.shape[-1], hidden_dim=num_shared_experts * hidden_dim)
    y = y + shared.apply({"params": params["shared"]}, x32)
  return y
