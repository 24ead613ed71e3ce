"""The state_tracking table: its grid, the claim judges on synthetic means, and a micro run end to end."""

from __future__ import annotations


import pytest

from experiments import tables
from experiments.tables import common
from experiments.tables import state_tracking as st


def _means(ext):
  """Every variant with ``acc_extrapolation`` from ``ext[(task, model)]`` (default 0.5)."""
  return {st.variant(t, m): {"acc_extrapolation": ext.get((t, m), 0.5)} for t in st.TASKS for m in st.MODELS}


def test_grid_and_configs():
  assert tables.get("state_tracking") is st.TABLE
  assert len(st.TABLE.variants) == len(st.TASKS) * len(st.MODELS)
  config = st.TABLE.config("tiny", "mod5/gated_deltanet_negeig")
  assert config.model.vocab_size == 6 and config.data.modulus == 5 and config.data.task == "modular_sum"
  assert config.model.mixer_kwargs.allow_neg_eigval and config.model.max_len == max(st.EVAL_LENGTHS) + 1
  assert st.TABLE.config("tiny", "parity/xlstm[1:1]").model.mixer == ("mlstm", "slstm")
  for claim in st.TABLE.claims:
    assert set(claim.variants) <= set(st.TABLE.variants)


def test_claim_judges():
  solved = {(t, "slstm"): 1.0 for t in st.TASKS} | {("parity", "gated_deltanet_negeig"): 0.95,
                                                    ("mod5", "gated_deltanet_negeig"): 0.6,
                                                    ("parity", "gla+srope"): 0.7, ("mod5", "gla+srope"): 0.55}
  means = _means(solved)
  assert st._xlstm_claim(means) and st._negeig_parity(means) and st._negeig_mod5(means)
  assert st._attention_claim(means) and st._selective_rope_claim(means)
  assert not st._selective_rope_claim(_means({**solved, ("mod5", "gla+srope"): 0.5}))
  assert not st._xlstm_claim(_means({**solved, ("mod5", "slstm"): 0.8}))
  assert not st._xlstm_claim(_means({**solved, ("parity", "mlstm"): 0.7}))
  assert not st._negeig_parity(_means({**solved, ("parity", "gla"): 0.9}))
  assert not st._negeig_mod5(_means({**solved, ("mod5", "gated_deltanet"): 0.7}))
  assert not st._attention_claim(_means({("parity", "attention"): 0.95}))


def test_micro_end_to_end(tmp_path, fast_compile):
  text = common.reproduce(st.TABLE, scale="micro", seeds=1, out=tmp_path, log=lambda _: None)
  runs = common.read_runs(tmp_path / "state_tracking")
  assert [r["variant"] for r in runs] == list(st.TABLE.micro_variants)
  for run in runs:
    metrics = run["metrics"]
    assert set(metrics) >= {"acc_4", "acc_8", "acc_16", "acc_extrapolation", "train_accuracy", "num_params"}
    assert metrics["acc_extrapolation"] == pytest.approx(metrics["acc_16"])  # the only length beyond 8
    assert 0.0 <= metrics["acc_16"] <= 1.0 and len(run["history"]) == 3
  assert "state_tracking (micro scale" in text and "not judged" in text
