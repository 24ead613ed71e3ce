"""The ``SOURCES`` registry: dataset name -> ``make_source(data_config, split) -> grain.MapDataset``.

Each source yields per-example dicts ``{"inputs": int32 (T,), "targets": int32 (T,), "weights": float32 (T,)}``
(plus ``"segment_ids": int32 (T,)`` when packed); ``gated_jax.data.pipeline`` shards, shuffles and batches
them. A source registers itself at import::

    @SOURCES.register("stdlib_bytes")
    def make_stdlib_bytes(data_config, split): ...

``SOURCES.get(name)`` raises ValueError listing the known names.
"""

from gated_jax.layers.registry import Registry

SOURCES = Registry("data source")

TRAIN = "train"
VALIDATION = "validation"
SPLITS = (TRAIN, VALIDATION)
_ALIASES = {"train": TRAIN, "validation": VALIDATION, "valid": VALIDATION, "val": VALIDATION,
            "eval": VALIDATION}


def canonical_split(split: str) -> str:
  """Maps a split name (``train``, ``validation`` or its aliases ``valid``/``val``/``eval``) to its canonical form."""
  if split not in _ALIASES:
    raise ValueError(f"split: got {split!r}; allowed: {', '.join(_ALIASES)}")
  return _ALIASES[split]
