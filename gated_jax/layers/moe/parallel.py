"""Expert parallelism over the mesh's ``expert`` axis (``gated_jax.train.sharding``).

* Dropless (:func:`dropless_expert_parallel`): a ``jax.shard_map`` in which every ``expert`` shard all-gathers
  the tokens and routing of its expert group (the batch is sharded over ``data``, ``fsdp`` and ``expert``),
  keeps the assignments to its own ``E / ep`` experts (ids shifted by ``shard · E / ep``; the others become the
  sentinel), runs the local grouped matmuls and reduce-scatters (``psum_scatter``) the partial outputs back to
  the batch shards: all-gather, local grouped matmul, reduce-scatter, as MaxText's "ring of experts". Expert
  weights enter sharded ``P("expert")`` (their ``fsdp``/``tensor`` shards are gathered at the boundary).
* Capacity: :func:`expert_buffer_constraint` shards the ``(E, B, C, D)`` expert buffers over ``expert`` (and
  the batch over ``data``/``fsdp``), and the SPMD partitioner inserts the all-to-alls (GShard arXiv 2006.16668).

``jax.lax.ragged_all_to_all`` (all-to-all of exactly the routed rows) is not offered: XLA:CPU does not
implement it, so it could not be tested here.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gated_jax.layers.moe import dispatch

EXPERT_AXIS = "expert"
_BATCH_AXES = ("data", "fsdp", EXPERT_AXIS)


def expert_shards() -> int:
  """Size of the context mesh's ``expert`` axis (1 without a mesh or without that axis)."""
  mesh = jax.sharding.get_abstract_mesh()
  return dict(zip(mesh.axis_names, mesh.axis_sizes)).get(EXPERT_AXIS, 1) if mesh.axis_names else 1


def _batch_axes(mesh) -> tuple[str, ...]:
  return tuple(a for a in _BATCH_AXES if a in mesh.axis_names)


def batch_divides(batch: int) -> bool:
  """Whether ``batch`` rows split evenly over the context mesh's batch axes (``data``, ``fsdp``, ``expert``)."""
  mesh = jax.sharding.get_abstract_mesh()
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  shards = 1
  for axis in _batch_axes(mesh):
    shards *= sizes[axis]
  return batch % shards == 0


def dropless_expert_parallel(x_BTD: jax.Array, weights_BTS: jax.Array, indices_BTS: jax.Array,
                             experts: dispatch.Experts, *, implementation: str | Sequence[str] | None = None
                             ) -> jax.Array:
  """The dropless layer with experts sharded over ``expert`` (module docstring); ``(B, T, D)`` float32."""
  mesh = jax.sharding.get_abstract_mesh()
  shards = expert_shards()
  num_experts = experts.wi.shape[0]
  if num_experts % shards:
    raise ValueError(f"num_experts: got {num_experts}; allowed: a multiple of the mesh's expert axis ({shards})")
  local = num_experts // shards
  batch = P(_batch_axes(mesh))

  def body(x, weights, indices, wi, wi_up, wo):
    x, weights, indices = (jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True) for a in (x, weights, indices))
    local_ids = indices - jax.lax.axis_index(EXPERT_AXIS) * local
    mine = (local_ids >= 0) & (local_ids < local)
    weights, local_ids = jnp.where(mine, weights, 0.0), jnp.where(mine, local_ids, local)
    group, seq, dim = x.shape
    y = dispatch.dropless(x.reshape(group * seq, dim), weights.reshape(group * seq, -1),
                          local_ids.reshape(group * seq, -1), dispatch.Experts(wi, wi_up, wo, experts.activation),
                          implementation=implementation)
    return jax.lax.psum_scatter(y.reshape(group, seq, dim), EXPERT_AXIS, scatter_dimension=0, tiled=True)

  expert = P(EXPERT_AXIS)
  return jax.shard_map(body, in_specs=(batch, batch, batch, expert, expert, expert), out_specs=batch)(
      x_BTD, weights_BTS, indices_BTS, experts.wi, experts.wi_up, experts.wo)


def expert_buffer_constraint(buffers_EBCD: jax.Array) -> jax.Array:
  """Shards ``(E, B, C, D)`` expert buffers: E over ``expert``, B over ``data``/``fsdp`` (where they divide)."""
  mesh = jax.sharding.get_abstract_mesh()
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  batch_axes = tuple(a for a in ("data", "fsdp") if a in sizes)
  batch_size = 1
  for axis in batch_axes:
    batch_size *= sizes[axis]
  spec = P(EXPERT_AXIS if buffers_EBCD.shape[0] % sizes[EXPERT_AXIS] == 0 else None,
           batch_axes if batch_axes and buffers_EBCD.shape[1] % batch_size == 0 else None)
  return jax.lax.with_sharding_constraint(buffers_EBCD, spec)
