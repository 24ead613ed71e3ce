"""``stdlib_bytes``: a byte-level LM corpus built from the installed Python standard library's sources.

No download: the corpus is the concatenation of the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``
(excluding ``site-packages`` and test directories), taken in a fixed pseudo-random order of the sorted
relative paths, each file followed by a ``0`` byte (document separator). Every ``HELDOUT_EVERY``-th file of
the sorted list is held out for validation, so validation text is never trained on. Each split keeps at most
``data.corpus_bytes`` bytes (validation: a tenth of it). Vocabulary: the 256 byte values.

Examples are consecutive, non-overlapping windows of ``seq_len + 1`` bytes:
``inputs = w[:-1]``, ``targets = w[1:]``, ``weights = 1``.
"""

from __future__ import annotations

import functools
import pathlib
import sysconfig
from typing import Any

import grain
import numpy as np

from gated_jax.data.sources import SOURCES, TRAIN, canonical_split

VOCAB_SIZE = 256
SEPARATOR = 0
HELDOUT_EVERY = 20
DEFAULT_CORPUS_BYTES = 4_000_000
_ORDER_SEED = 20250506  # fixes the file order (the Gated Attention paper's arXiv date)
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_files(root: str | None = None) -> tuple[pathlib.Path, ...]:
  """Sorted ``*.py`` paths under the standard library ``root`` (default: this interpreter's), tests excluded."""
  base = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
  files = (p for p in base.rglob("*.py") if not _EXCLUDED_DIRS.intersection(p.relative_to(base).parts[:-1]))
  return tuple(sorted(files, key=lambda p: p.relative_to(base).as_posix()))


def split_files(files: tuple[pathlib.Path, ...], split: str) -> tuple[pathlib.Path, ...]:
  """The files of ``split``: every ``HELDOUT_EVERY``-th sorted file is validation, the rest train."""
  heldout = canonical_split(split) != TRAIN
  return tuple(f for i, f in enumerate(files) if (i % HELDOUT_EVERY == 0) == heldout)


@functools.cache
def corpus_bytes(split: str, max_bytes: int, root: str | None = None) -> np.ndarray:
  """The ``split``'s corpus as a read-only uint8 array of at most ``max_bytes`` bytes (cached per process)."""
  if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
    raise ValueError(f"corpus_bytes: got {max_bytes!r}; allowed: a positive int")
  files = split_files(stdlib_files(root), split)
  order = np.random.default_rng(_ORDER_SEED).permutation(len(files))
  chunks, total = [], 0
  for i in order:
    if total >= max_bytes:
      break
    chunks.append(files[i].read_bytes() + bytes([SEPARATOR]))
    total += len(chunks[-1])
  data = np.frombuffer(b"".join(chunks)[:max_bytes], dtype=np.uint8)
  data.setflags(write=False)
  return data


def _window(data: np.ndarray, seq_len: int, index: int) -> dict[str, np.ndarray]:
  w = data[index * seq_len: index * seq_len + seq_len + 1].astype(np.int32)
  return {"inputs": w[:-1], "targets": w[1:], "weights": np.ones((seq_len,), np.float32)}


def _split_corpus(data_config: Any, split: str) -> tuple[int, np.ndarray]:
  """``(data.seq_len, the split's bytes)``: train keeps ``data.corpus_bytes``, validation a tenth of it."""
  seq_len = data_config["seq_len"]
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
    raise ValueError(f"data.seq_len: got {seq_len!r}; allowed: a positive int")
  budget = data_config.get("corpus_bytes", DEFAULT_CORPUS_BYTES)
  if canonical_split(split) != TRAIN:
    budget = max(budget // 10, seq_len + 1)
  return seq_len, corpus_bytes(canonical_split(split), budget)


@SOURCES.register("stdlib_bytes")
def make_stdlib_bytes(data_config: Any, split: str) -> grain.MapDataset:
  """Windows of ``data_config.seq_len + 1`` bytes of the ``split`` corpus as a ``grain.MapDataset``.

  Args:
    data_config: a ConfigDict (or mapping) with ``seq_len`` and optionally ``corpus_bytes`` (train budget;
      validation gets a tenth; default ``DEFAULT_CORPUS_BYTES``).
    split: ``"train"`` or ``"validation"`` (aliases ``val``, ``valid``, ``eval``).
  """
  seq_len, data = _split_corpus(data_config, split)
  num_windows = (len(data) - 1) // seq_len
  if num_windows < 1:
    raise ValueError(f"data.seq_len: got {seq_len}; the {split} corpus has only {len(data)} bytes")
  return grain.MapDataset.range(num_windows).map(functools.partial(_window, data, seq_len))


def _document_pieces(data: np.ndarray, piece_len: int) -> np.ndarray:
  """``(N, 2)`` start/end offsets of the documents of ``data`` (split after each ``SEPARATOR``; the last one
  may be cut short by the byte budget), each cut into pieces of at most ``piece_len`` bytes; pieces shorter than 2 bytes are dropped."""
  ends = np.flatnonzero(data == SEPARATOR) + 1
  if not len(ends) or ends[-1] != len(data):  # the budget cut the last document short
    ends = np.append(ends, len(data))
  starts = np.concatenate([[0], ends[:-1]])
  spans = []
  for start, end in zip(starts, ends):
    cuts = np.arange(start, end, piece_len)
    spans.extend((c, min(c + piece_len, end)) for c in cuts)
  spans = np.asarray(spans, np.int64).reshape(-1, 2)
  return spans[spans[:, 1] - spans[:, 0] >= 2]


def _piece(data: np.ndarray, spans: np.ndarray, index: int) -> dict[str, np.ndarray]:
  w = data[spans[index, 0]:spans[index, 1]].astype(np.int32)
  return {"inputs": w[:-1], "targets": w[1:], "weights": np.ones((len(w) - 1,), np.float32)}


@SOURCES.register("stdlib_documents")
def make_stdlib_documents(data_config: Any, split: str) -> grain.MapDataset:
  """The ``stdlib_bytes`` corpus as variable-length documents (one per source file, cut into pieces of at most
  ``seq_len + 1`` bytes), for sequence packing (``data.packing=True``): each example is one piece with
  ``inputs``, ``targets`` and ``weights`` of its own length."""
  seq_len, data = _split_corpus(data_config, split)
  spans = _document_pieces(data, seq_len + 1)
  return grain.MapDataset.range(len(spans)).map(functools.partial(_piece, data, spans))
