"""grain pipelines from a ``SOURCES`` entry to per-process batches (DESIGN.md, "Training" / "Data").

Train: the source's ``train`` split, sliced to this process's share (``[process_index::process_count]``),
shuffled by ``seed`` (a fresh permutation every epoch), repeated forever, optionally packed, batched to the
*local* batch ``data.batch_size // process_count`` and optionally prefetched by ``data.num_workers`` worker
processes. The iterator is a ``grain.DatasetIterator``: ``get_state()`` / ``set_state()`` (and orbax's
``grain.checkpoint.CheckpointSave``) resume it at exactly the next batch.

Packing (``data.packing=True``, for variable-length sources such as ``stdlib_documents``): examples are
first-fit packed into rows of ``data.seq_len`` tokens; each batch then also holds ``segment_ids`` (1, 2, ...
per packed example, 0 for padding, whose ``weights`` are 0) and ``positions`` (restarting at 0 in each
example), which the LM hands to its mixers so no token attends across examples.

Batches are dicts of numpy arrays: ``inputs``/``targets`` int32 ``(b, T)``, ``weights`` float32 ``(b, T)``,
plus ``segment_ids``/``positions`` int32 ``(b, T)`` when packed.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from gated_jax.data.sources import SOURCES, TRAIN, VALIDATION

_FIELDS = ("inputs", "targets", "weights")


def _get(data_config: Any, name: str, default: Any) -> Any:
  return data_config[name] if name in data_config and data_config[name] is not None else default


def local_batch_size(data_config: Any, process_count: int) -> int:
  """``data.batch_size`` (global) divided over processes; ValueError unless it divides evenly."""
  batch = data_config["batch_size"]
  if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0 or batch % process_count:
    raise ValueError(f"data.batch_size: got {batch!r}; allowed: a positive multiple of the {process_count} "
                     "processes")
  return batch // process_count


def _as_example(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: example[k] for k in _FIELDS}


def _unpacked_names(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {k: example[k] for k in _FIELDS}
  out["segment_ids"] = example["inputs_segment_ids"].astype(np.int32)
  out["positions"] = example["inputs_positions"].astype(np.int32)
  return out


def _packed(ds: grain.IterDataset, seq_len: int, local_batch: int, seed: int) -> grain.IterDataset:
  lengths = {k: seq_len for k in _FIELDS}
  packed = grain.experimental.FirstFitPackIterDataset(ds.map(_as_example), length_struct=lengths,
                                                      num_packing_bins=max(local_batch, 2), seed=seed)
  return packed.map(_unpacked_names)


def _batched(ds: grain.MapDataset, data_config: Any, local_batch: int, seed: int) -> grain.IterDataset:
  it = ds.to_iter_dataset()
  if _get(data_config, "packing", False):
    it = _packed(it, data_config["seq_len"], local_batch, seed)
  else:
    it = it.map(_as_example)
  return it.batch(local_batch, drop_remainder=True)


def train_dataset(data_config: Any, *, seed: int, process_index: int = 0, process_count: int = 1
                  ) -> grain.IterDataset:
  """The endless, shuffled, per-process training batches of ``data_config``."""
  local_batch = local_batch_size(data_config, process_count)
  source = SOURCES.get(data_config["name"])(data_config, TRAIN)
  if len(source) < process_count:
    raise ValueError(f"data.name: {data_config['name']!r} has {len(source)} training examples, fewer than the "
                     f"{process_count} processes")
  shard = source[process_index::process_count].seed(seed).shuffle().repeat(None)
  ds = _batched(shard, data_config, local_batch, seed)
  workers = int(_get(data_config, "num_workers", 0))
  if workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return ds


def train_iterator(data_config: Any, *, seed: int, process_index: int = 0, process_count: int = 1
                   ) -> grain.DatasetIterator:
  """A checkpointable iterator over ``train_dataset``."""
  return iter(train_dataset(data_config, seed=seed, process_index=process_index, process_count=process_count))


def eval_batches(data_config: Any, *, num_batches: int, process_index: int = 0, process_count: int = 1
                 ) -> list[dict[str, np.ndarray]]:
  """The first ``num_batches`` local batches of the validation split, in order (the same every call).

  ValueError when the split cannot fill one batch; fewer batches than asked when it cannot fill them all.
  """
  local_batch = local_batch_size(data_config, process_count)
  source = SOURCES.get(data_config["name"])(data_config, VALIDATION)
  ds = _batched(source[process_index::process_count], data_config, local_batch, seed=0)
  batches = []
  for batch in ds:
    batches.append(batch)
    if len(batches) == num_batches:
      break
  if not batches:
    raise ValueError(f"data.batch_size: got {data_config['batch_size']}; the validation split of "
                     f"{data_config['name']!r} has only {len(source)} examples")
  return batches
