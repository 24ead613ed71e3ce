"""Tests for the max-retrieval table (experiments/tables/max_retrieval.py): the sampled sets, the claims on
constructed means, and a micro reproduction at n = 16 (the softmax row obeys the dispersion bound)."""


import jax
import numpy as np
import pytest

from experiments import tables
from experiments.tables import common
from experiments.tables import max_retrieval as table_module


def test_sampled_sets_target_the_max_visible_item():
  sample = jax.jit(table_module.sample_sets, static_argnums=(1, 2, 3, 4))
  items, valid, onehot, target = sample(jax.random.PRNGKey(0), 64, 3, 9, 12)
  items, valid, onehot, target = (np.asarray(x) for x in (items, valid, onehot, target))
  counts = valid.sum(1)
  assert counts.min() >= 3 and counts.max() <= 9 and np.all(valid[:, 0]) and not np.any(valid[:, 9:])
  top = np.argmax(np.where(valid, items[..., 0], -1), 1)
  np.testing.assert_array_equal(onehot.argmax(1), top)
  np.testing.assert_array_equal(target, items[np.arange(64), top, 1:].argmax(1))


def _means(**changes):
  sizes = (16, 64, 1024)
  means = {"softmax": {**{f"weight_{n}": 0.9 * 16 / n for n in sizes}, **{f"accuracy_{n}": 0.5 for n in sizes}},
           "adaptive": {**{f"weight_{n}": 0.95 * 16 / n for n in sizes}, **{f"accuracy_{n}": 0.6 for n in sizes}}}
  for path, value in changes.items():
    variant, key = path.split(".")
    means[variant][key] = value
  return means


@pytest.mark.parametrize("changes, failing", [
    ({}, None),
    ({"softmax.weight_1024": 0.6, "adaptive.weight_1024": 0.7}, "a"),
    ({"adaptive.weight_64": 0.1}, "b"),
    ({"adaptive.accuracy_1024": 0.4}, "c"),
])
def test_claims_on_constructed_means(changes, failing):
  means = _means(**changes)
  for claim in table_module.CLAIMS:
    assert claim.judge(means) == (claim.name != failing), claim.name


@pytest.mark.usefixtures("fast_compile")
def test_micro_reproduction(tmp_path):
  text = common.reproduce(tables.get("max_retrieval"), scale="micro", seeds=1, out=tmp_path, log=lambda _: None)
  runs = {r["variant"]: r for r in common.read_runs(tmp_path / "max_retrieval")}
  assert list(runs) == ["softmax", "adaptive"]
  assert runs["softmax"]["history"] == runs["adaptive"]["history"]  # one training, two inference rules
  for row in runs.values():
    m = row["metrics"]
    assert set(m) == {f"{kind}_16" for kind in ("accuracy", "weight", "spread", "bound")}
    assert all(0 <= m[k] <= 1 for k in m if not k.startswith("spread")) and m["spread_16"] > 0
  softmax = runs["softmax"]["metrics"]
  assert softmax["weight_16"] <= softmax["bound_16"]  # the dispersion bound holds for softmax
  assert "| adaptive |" in text and "**c**" in text
