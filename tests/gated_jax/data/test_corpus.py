"""Tests for the stdlib_bytes corpus: determinism, held-out files, windows, errors."""

import numpy as np
import pytest
from numpy import testing as npt

from gated_jax.data import SOURCES, corpus

_CONFIG = {"seq_len": 32, "corpus_bytes": 100_000}


def test_build_is_deterministic():
  first = corpus.corpus_bytes("train", 50_000).copy()
  corpus.corpus_bytes.cache_clear()
  second = corpus.corpus_bytes("train", 50_000)
  assert len(first) == 50_000
  npt.assert_array_equal(first, second)


def test_splits_are_disjoint_by_file():
  files = corpus.stdlib_files()
  train, val = corpus.split_files(files, "train"), corpus.split_files(files, "validation")
  assert len(files) > 100
  assert not set(train) & set(val)
  assert set(train) | set(val) == set(files)
  assert val == files[::corpus.HELDOUT_EVERY]
  assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.parts[-2:-1])


def test_examples_are_shifted_windows():
  ds = SOURCES.get("stdlib_bytes")(_CONFIG, "train")
  first, second = ds[0], ds[1]
  assert len(ds) == (100_000 - 1) // 32
  for key, dtype in (("inputs", np.int32), ("targets", np.int32), ("weights", np.float32)):
    assert first[key].shape == (32,) and first[key].dtype == dtype
  npt.assert_array_equal(first["targets"][:-1], first["inputs"][1:])
  assert second["inputs"][0] == first["targets"][-1]
  assert first["inputs"].min() >= 0 and first["inputs"].max() < corpus.VOCAB_SIZE
  npt.assert_array_equal(first["weights"], 1.0)


def test_validation_is_a_tenth_and_differs():
  train = SOURCES.get("stdlib_bytes")(_CONFIG, "train")
  val = SOURCES.get("stdlib_bytes")(_CONFIG, "val")
  assert len(val) == (10_000 - 1) // 32
  assert not np.array_equal(val[0]["inputs"], train[0]["inputs"])


@pytest.mark.parametrize("config, split, match", [
    (_CONFIG, "dev", "split"),
    ({"seq_len": 0}, "train", "seq_len"),
    ({"seq_len": 8, "corpus_bytes": -1}, "train", "corpus_bytes"),
])
def test_bad_input_raises(config, split, match):
  with pytest.raises(ValueError, match=match):
    SOURCES.get("stdlib_bytes")(config, split)


def test_unknown_source_lists_known():
  with pytest.raises(ValueError, match="stdlib_bytes"):
    SOURCES.get("wikitext")
