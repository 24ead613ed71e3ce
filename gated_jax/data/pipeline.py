"""grain pipelines from a ``SOURCES`` entry to per-process batches (docs/architecture.md, "Data").

Train: the source's ``train`` split shuffled by ``seed`` (a fresh permutation every epoch) and repeated
forever defines a sequence of *global* batches of ``data.batch_size`` examples; process ``p`` of ``n`` reads
only rows ``[p * b, (p + 1) * b)`` of each (``b = data.batch_size // n``), so the data order does not depend
on the number of processes. Then optional packing, batching to ``b`` rows and ``data.num_workers`` worker
processes. (Packed pipelines pack each process's rows separately, so their order does depend on ``n``.) The iterator is a ``grain.DatasetIterator``: ``get_state()`` / ``set_state()`` (and orbax's
``grain.checkpoint.CheckpointSave``) resume it at exactly the next batch.

Packing (``data.packing=True``, for variable-length sources such as ``stdlib_documents``): examples are
first-fit packed into rows of ``data.seq_len`` tokens; each batch then also holds ``segment_ids`` (1, 2, ...
per packed example, 0 for padding, whose ``weights`` are 0) and ``positions`` (restarting at 0 in each
example), which the LM hands to its mixers so no token attends across examples.

Batches are dicts of numpy arrays: ``inputs``/``targets`` int32 ``(b, T)``, ``weights`` float32 ``(b, T)``,
plus ``segment_ids``/``positions`` int32 ``(b, T)`` when packed.
"""

from __future__ import annotations

import functools
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


def _row(ds: grain.MapDataset, global_batch: int, local_batch: int, offset: int, index: int) -> Any:
  """Element ``index`` of this process's rows: row ``index % local_batch`` of its block of global batch
  ``index // local_batch``."""
  return ds[(index // local_batch) * global_batch + offset + index % local_batch]


def _process_rows(ds: grain.MapDataset, data_config: Any, process_index: int, process_count: int
                  ) -> grain.MapDataset:
  """This process's rows of the global batches of ``ds`` (lazy: only these examples are ever read)."""
  local = local_batch_size(data_config, process_count)
  length = len(ds) // data_config["batch_size"] * local
  index = functools.partial(_row, ds, data_config["batch_size"], local, process_index * local)
  return grain.MapDataset.range(length).map(index)


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
  if len(source) < data_config["batch_size"]:
    raise ValueError(f"data.batch_size: got {data_config['batch_size']}; {data_config['name']!r} has only "
                     f"{len(source)} training examples")
  shuffled = source.seed(seed).shuffle().repeat(None)
  ds = _batched(_process_rows(shuffled, data_config, process_index, process_count), data_config, local_batch,
                seed)
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
  ds = _batched(_process_rows(source, data_config, process_index, process_count), data_config, local_batch,
                seed=0)
  batches = []
  for batch in ds:
    batches.append(batch)
    if len(batches) == num_batches:
      break
  if not batches:
    raise ValueError(f"data.batch_size: got {data_config['batch_size']}; the validation split of "
                     f"{data_config['name']!r} has only {len(source)} examples")
  return batches
