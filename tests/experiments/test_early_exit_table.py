"""The early_exit table: its grid at every scale, the claim judges on constructed means, and one micro run end to
end (warm-up, cascade, JEI-DNN, the accuracy–cost plot)."""

from __future__ import annotations


import numpy as np
import pytest

from experiments import tables
from experiments.tables import common
from experiments.tables import early_exit as ee_table


def test_grid_scales_and_claims():
  table = tables.get("early_exit")
  assert table is ee_table.TABLE and table.default_seeds >= 3
  assert set(common.SCALES) | set(common.HIDDEN_SCALES) <= set(table.scales)
  for scale in table.scales:
    for variant in table.variants:
      table.config(scale, variant)
  assert table.config("tiny", ee_table.jei(0.15)).jei.tradeoff == 0.15
  assert table.config("tiny", ee_table.cascade(0.95)).policy.threshold == 0.95
  for claim in table.claims:
    assert set(claim.variants) <= set(table.variants)


def _means(jei_gap, ece_gap, cheap_accuracy):
  means = {ee_table.FULL: {"accuracy": 97.0, "cost": 1.0, "ece": 2.0}}
  means.update({ee_table.cascade(t): {"accuracy": 90.0 + 7 * t, "cost": t, "ece": 3.0} for t in ee_table.THRESHOLDS})
  means[ee_table.cascade(0.5)]["accuracy"] = cheap_accuracy
  means.update({ee_table.jei(t): {"accuracy": 95.0 + jei_gap, "cascade_accuracy": 95.0, "ece": 2.0 + ece_gap,
                                  "cascade_ece": 2.0, "cost": 0.7} for t in ee_table.TRADEOFFS})
  return means


@pytest.mark.parametrize("jei_gap, ece_gap, cheap_accuracy, expected", [
    (0.5, -0.5, 96.5, (True, True, True)),
    (-0.5, 0.5, 95.5, (False, False, False)),
])
def test_claim_judges(jei_gap, ece_gap, cheap_accuracy, expected):
  means = _means(jei_gap, ece_gap, cheap_accuracy)
  assert tuple(claim.judge(means) for claim in ee_table.TABLE.claims) == expected


def test_micro_end_to_end(tmp_path, fast_compile):
  text = common.reproduce(ee_table.TABLE, scale="micro", seeds=1, out=tmp_path, log=lambda _: None)
  out = tmp_path / "early_exit"
  runs = {r["variant"]: r["metrics"] for r in common.read_runs(out)}
  assert list(runs) == list(ee_table.TABLE.micro_variants)
  for metrics in runs.values():
    fractions = np.array([metrics["exit_0"], metrics["exit_1"]])
    costs = np.array([metrics["cost_exit_0"], metrics["cost_exit_1"]])
    assert fractions.sum() == pytest.approx(1.0) and 0.0 < costs[0] < costs[1] == pytest.approx(1.0)
    assert metrics["cost"] == pytest.approx(float(fractions @ costs), rel=1e-5)  # cost of the exits taken
  assert runs[ee_table.FULL]["exit_1"] == 1.0
  assert "early_exit (micro scale" in text and "Accuracy and ECE against cost" in text
  assert (out / "plot.png").stat().st_size > 0
