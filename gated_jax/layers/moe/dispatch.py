"""How routed tokens reach the experts: the dropless path (sort by expert, grouped matmul, unsort) and the
capacity path (fixed per-expert buffers, token dropping). Both take flat routing slots and return the
weighted sum of expert outputs in float32.

* :func:`dropless` (MegaBlocks, arXiv 2211.15841 §3; MaxText's sparse path): every active slot's token is
  copied into a buffer sorted by expert id (inactive slots, id = E, sort last), the experts run as three
  :func:`pallas_kernels.grouped_matmul` calls (gate, up, down of a GLU), the rows are put back in slot order and
  weighted. Nothing is dropped; the buffer has a static ``tokens × slots`` rows.
* :func:`capacity` (GShard arXiv 2006.16668 §2.2; Switch Transformer arXiv 2101.03961 eq. 3): per sequence,
  each expert has ``capacity`` buffer slots; assignments past it are dropped (the token keeps only its other
  experts, or the residual). Priority is ``"token_order"`` (earlier tokens first, each token's slots in
  order: causal within a sequence) or ``"top1_first"`` (every token's first choice before any second choice,
  as flaxformer and V-MoE; a token's later slots then depend on later tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp

from pallas_kernels import grouped_matmul

PRIORITIES = ("token_order", "top1_first")


@flax.struct.dataclass
class Experts:
  """GLU experts ``(act(x W_i) ⊙ x W_up) W_o`` (arXiv 2002.05202 eq. 6), one matrix slice per expert.

  Attributes:
    wi: ``(E, D, H)``; wi_up: ``(E, D, H)``; wo: ``(E, H, D)``, all in the compute dtype.
    activation: the gate's activation (applied in float32).
  """
  wi: jax.Array
  wi_up: jax.Array
  wo: jax.Array
  activation: Callable[[jax.Array], jax.Array] = flax.struct.field(pytree_node=False)


@jax.custom_vjp
def permute(x: jax.Array, order: jax.Array) -> jax.Array:
  """``x[order]`` for a permutation ``order``; the backward is the inverse gather, not a scatter-add."""
  return x[order]


def _permute_fwd(x, order):
  return x[order], order


def _permute_bwd(order, g):
  return g[inverse_permutation(order)], None


permute.defvjp(_permute_fwd, _permute_bwd)


def inverse_permutation(order: jax.Array) -> jax.Array:
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def dropless(x_ND: jax.Array, weights_NS: jax.Array, indices_NS: jax.Array, experts: Experts, *,
             implementation: str | Sequence[str] | None = None) -> jax.Array:
  """``(N, D)`` float32: ``Σ_s weight_s · expert_{index_s}(x)``; ids equal to E (inactive) contribute 0."""
  num_experts = experts.wi.shape[0]
  tokens, slots = indices_NS.shape
  flat = indices_NS.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  group_sizes = jax.ops.segment_sum(jnp.ones_like(flat), flat, num_segments=num_experts)
  rows = permute(jnp.repeat(x_ND.astype(experts.wi.dtype), slots, axis=0), order)

  def gmm(lhs, rhs):
    return grouped_matmul(lhs, rhs, group_sizes, implementation=implementation)

  hidden = experts.activation(gmm(rows, experts.wi).astype(jnp.float32)) * gmm(rows, experts.wi_up).astype(
      jnp.float32)
  out_rows = gmm(hidden.astype(experts.wo.dtype), experts.wo)
  out_NSD = permute(out_rows, inverse_permutation(order)).reshape(tokens, slots, -1)
  return jnp.einsum("nsd,ns->nd", out_NSD.astype(jnp.float32), weights_NS.astype(jnp.float32))


def capacity(x_BTD: jax.Array, weights_BTS: jax.Array, indices_BTS: jax.Array, experts: Experts, *,
             capacity: int, priority: str, constrain: Callable[[jax.Array], jax.Array] = lambda x: x
             ) -> tuple[jax.Array, jax.Array]:
  """``((B, T, D) float32 output, dropped fraction)``; ``capacity`` buffer slots per expert and sequence.

  ``constrain`` is applied to the ``(E, B, C, D)`` expert buffers (expert parallelism: shard E over the
  ``expert`` mesh axis and let the partitioner insert the all-to-alls).
  """
  num_experts = experts.wi.shape[0]
  batch, seq, slots = indices_BTS.shape
  assigned = jax.nn.one_hot(indices_BTS, num_experts, dtype=jnp.int32)  # (B, T, S, E); inactive: all zero
  queue = jnp.swapaxes(assigned, 1, 2) if priority == "top1_first" else assigned  # (B, slots in priority, E)
  flat_queue = queue.reshape(batch, seq * slots, num_experts)
  position = (jnp.cumsum(flat_queue, axis=1) * flat_queue - 1).reshape(queue.shape)  # -1: not assigned
  if priority == "top1_first":
    position = jnp.swapaxes(position, 1, 2)
  kept = (assigned > 0) & (position < capacity)  # (B, T, S, E)
  slot_buffer = jax.nn.one_hot(jnp.where(kept, position, -1), capacity, dtype=jnp.float32)  # (B, T, S, E, C)
  dispatch_BTEC = jnp.sum(slot_buffer, axis=2)
  combine_BTEC = jnp.einsum("btsec,bts->btec", slot_buffer, weights_BTS.astype(jnp.float32))
  buffers_EBCD = constrain(jnp.einsum("btec,btd->ebcd", dispatch_BTEC.astype(experts.wi.dtype),
                                      x_BTD.astype(experts.wi.dtype)))
  gate = jnp.einsum("ebcd,edh->ebch", buffers_EBCD, experts.wi, preferred_element_type=jnp.float32)
  up = jnp.einsum("ebcd,edh->ebch", buffers_EBCD, experts.wi_up, preferred_element_type=jnp.float32)
  hidden = (experts.activation(gate) * up).astype(experts.wo.dtype)
  out_EBCD = constrain(jnp.einsum("ebch,ehd->ebcd", hidden, experts.wo, preferred_element_type=jnp.float32))
  y_BTD = jnp.einsum("ebcd,btec->btd", out_EBCD, combine_BTEC)
  active = jnp.sum(assigned)
  dropped = 1.0 - jnp.sum(kept) / jnp.maximum(active, 1)
  return y_BTD, dropped.astype(jnp.float32)
