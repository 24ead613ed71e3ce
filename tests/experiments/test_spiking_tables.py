"""The spiking tables: grids, claims' judges on synthetic means, the LM variants build, and micro runs of each
table end to end."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from experiments import tables
from experiments.tables import common, spiking_lm, spiking_surrogates
from gated_jax.models import lm_from_config


@pytest.mark.parametrize("name,count", [("spiking_surrogates", 46), ("ultralif", 16), ("spiking_lm", 4)])
def test_tables_declare_their_grids(name, count):
  table = tables.get(name)
  assert len(table.variants) == count and set(common.SCALES) <= set(table.scales)
  for claim in table.claims:
    assert set(claim.variants) <= set(table.variants), claim.name
  for variant in table.variants:
    table.config("tiny", variant)  # every override path exists


def _surrogate_means(default_spread: float, scale_spread: float, live_reset: float):
  means = {}
  for dataset in spiking_surrogates.DATASETS:
    for i, shape in enumerate(spiking_surrogates.SHAPES):
      base = 0.9 - default_spread * i / (len(spiking_surrogates.SHAPES) - 1)
      for suffix, drop in (("", 0.0), (" x0.1", scale_spread), (" x10", 0.0)):
        means[f"{dataset}/{shape}{suffix}"] = {"accuracy": base - drop}
    means[f"{dataset}/atan live reset"] = {"accuracy": 0.9 + live_reset}
  return means


def test_surrogate_claims_judge_spreads_and_the_reset():
  shape_claim, _, reset_claim = spiking_surrogates.TABLE.claims
  assert shape_claim.judge(_surrogate_means(0.02, 0.1, 0.0))
  assert not shape_claim.judge(_surrogate_means(0.1, 0.02, 0.0))
  assert reset_claim.judge(_surrogate_means(0.0, 0.0, 0.005))
  assert not reset_claim.judge(_surrogate_means(0.0, 0.0, 0.05))


def test_spiking_lm_variants_build_and_report_sparsity(monkeypatch):
  table = tables.get("spiking_lm")
  for variant in table.variants:
    model = lm_from_config(table.config("micro", variant).model)
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
  monkeypatch.setattr(common, "train_lm", lambda config, workdir: {"metrics": {"loss": 2.0, "spike_rate": 0.08},
                                                                     "history": []})
  assert spiking_lm.run(None, None)["metrics"]["sparsity"] == pytest.approx(0.92)


@pytest.mark.usefixtures("fast_compile")
def test_ultralif_micro_reproduction(tmp_path):
  table = dataclasses.replace(tables.get("ultralif"), micro_variants=("UltraLIF T=1",))  # one compile
  text = common.reproduce(table, scale="micro", seeds=1, out=tmp_path, log=lambda _: None)
  runs = common.read_runs(tmp_path / "ultralif")
  assert [r["variant"] for r in runs] == list(table.micro_variants)
  for run in runs:
    assert 0.0 <= run["metrics"]["accuracy"] <= 1.0 and 0.0 < run["metrics"]["spike_rate"] < 1.0
    assert run["history"] and run["config"]["data"]["steps"] == 1
  assert "| UltraLIF T=1 |" in text and "paper MNIST T=1 acc" in text
  assert "**not judged** (missing: LIF T=1" in text  # claim (a) needs all five T=1 variants


@pytest.mark.usefixtures("fast_compile")
def test_spiking_surrogates_micro_reproduction(tmp_path):
  """Both datasets (rate-coded digits, Randman) through the runner: accuracies and spike rates in range, the
  surrogate and dataset recorded, the claims reported as not judged (their variants were not run)."""
  table = tables.get("spiking_surrogates")
  text = common.reproduce(table, scale="micro", seeds=1, out=tmp_path, log=lambda _: None)
  runs = common.read_runs(tmp_path / "spiking_surrogates")
  assert [r["variant"] for r in runs] == list(table.micro_variants)
  for run in runs:
    assert 0.0 <= run["metrics"]["accuracy"] <= 1.0 and 0.0 < run["metrics"]["spike_rate"] < 1.0
  assert "| digits/atan |" in text and "| randman/atan |" in text and "**not judged**" in text


@pytest.mark.usefixtures("fast_compile")
def test_spiking_lm_micro_reproduction(tmp_path):
  """The attention baseline and SymbolicLight trained for a few micro steps: finite losses, SymbolicLight's
  sparsity is one minus its measured spike rate, and both claims are judged."""
  table = tables.get("spiking_lm")
  text = common.reproduce(table, scale="micro", seeds=1, out=tmp_path, log=lambda _: None)
  runs = {r["variant"]: r["metrics"] for r in common.read_runs(tmp_path / "spiking_lm")}
  assert set(runs) == {"attention", "symboliclight"}
  assert all(jnp.isfinite(m["loss"]) for m in runs.values())
  spiking = runs["symboliclight"]
  assert 0.0 < spiking["spike_rate"] < 1.0 and spiking["sparsity"] == pytest.approx(1.0 - spiking["spike_rate"])
  assert text.count("**held**") + text.count("**did not hold**") == 2
