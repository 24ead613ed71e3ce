"""The device mesh and the one table that maps logical axis names to it (docs/architecture.md, "Training").

Mesh axes, in order: ``data`` (pure data parallelism: parameters replicated), ``fsdp`` (data parallelism
with ZeRO-3 parameter and optimizer-state sharding over the ``embed`` axis), ``tensor`` (Megatron-style
tensor parallelism over heads, MLP hidden units and the vocabulary), ``expert`` (mixture-of-experts
parallelism: expert weights are sharded over it, and outside the experts it is one more data-parallel axis,
so the batch is split over ``data``, ``fsdp`` and ``expert``, as in MaxText). Sizes come from
``config.mesh``; ``-1`` on one axis takes the remaining devices. The mesh has Auto axis types (``jax.make_mesh``'s default Explicit types break logical-rule sharding).

Every parameter and activation carries logical names (``nn.with_logical_partitioning`` /
``nn.with_logical_constraint`` in the layers); ``RULES`` maps them to mesh axes. A mesh axis is used at most
once per array: the batch takes ``data`` and ``fsdp``, so an activation's ``embed`` stays unsharded while a
parameter's ``embed`` is sharded over ``fsdp``. A dimension whose size the mesh axes do not divide is left
replicated (e.g. 3 heads on ``tensor=2``), so any model runs on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")

RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes of ``AXES`` from ``config.mesh`` (one ``-1`` fills the rest); ValueError unless they use every device."""
  sizes = [int(mesh_config.get(axis, 1)) for axis in AXES]
  unknown = sorted(set(mesh_config) - set(AXES))
  if unknown:
    raise ValueError(f"mesh: got unknown axes {unknown}; allowed: {', '.join(AXES)}")
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: got {dict(zip(AXES, sizes))}; allowed: positive sizes, at most one -1")
  if fill:
    rest = math.prod(s for s in sizes if s != -1)
    if num_devices % rest:
      raise ValueError(f"mesh: got {dict(zip(AXES, sizes))}; the other axes ({rest}) do not divide the "
                       f"{num_devices} devices")
    sizes[fill[0]] = num_devices // rest
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh: got {dict(zip(AXES, sizes))} ({math.prod(sizes)} devices); allowed: sizes whose "
                     f"product is the {num_devices} available devices (use -1 on one axis to fill)")
  return tuple(sizes)


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A ``(data, fsdp, tensor, expert)`` mesh with Auto axis types over ``devices`` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(dict(mesh_config), len(devices))
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def _fitted(spec: PartitionSpec, shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> PartitionSpec:
  """``spec`` with every entry whose mesh size does not divide its dimension replaced by None."""
  entries = []
  for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
    size = math.prod(mesh.shape[a] for a in axes)
    entries.append(entry if entry is not None and dim % size == 0 else None)
  return PartitionSpec(*entries)


def logical_shardings(abstract_tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """NamedShardings for a tree of (possibly ``nn.LogicallyPartitioned``-boxed) abstract values.

  Boxed leaves get their logical names mapped through ``RULES``; plain leaves (step counters, RNG keys) are
  replicated. The result has the structure of the *unboxed* tree.
  """
  def leaf_sharding(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      spec = nn.logical_to_mesh_axes(leaf.names, RULES)
      return NamedSharding(mesh, _fitted(spec, leaf.value.shape, mesh))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(leaf_sharding, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of a ``(batch, ...)`` array: the batch over ``data``, ``fsdp`` and ``expert``."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def batch_shards(mesh: jax.sharding.Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
  """Global arrays sharded over the batch axes, each process contributing its local rows."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}
