"""The gateskip and head_gating tables: grids at every scale, the claims' judges on constructed means, and one
micro run of each table's own runner (GateSkip budget sweep; CHG taxonomy, ablations, contrastive CHG)."""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import tables
from experiments.tables import common
from experiments.tables import gateskip as gateskip_table
from gated_jax.train import step as train_step

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.mark.parametrize("name", ["gateskip", "head_gating"])
def test_tables_declare_every_scale_and_their_claims_name_their_variants(name):
  table = tables.get(name)
  assert set(common.SCALES) | set(common.HIDDEN_SCALES) <= set(table.scales)
  for scale in table.scales:
    for variant in table.variants:
      table.config(scale, variant)
  for claim in table.claims:
    assert set(claim.variants) <= set(table.variants)


def test_gateskip_grid_depths_and_training_budget():
  table = tables.get("gateskip")
  layers = {v: table.config("small", v).model.num_layers for v in table.variants}
  assert layers == {"dense L4": 8, "dense L3": 6, "dense L2": 4, "gateskip L4": 8, "skip-middle L4": 8}
  gated = table.config("tiny", "gateskip L4")
  assert (gated.model.gateskip.train_budget, gated.model.gateskip.budget_start,
          gated.model.gateskip.budget_steps) == (0.2, 100, 200)
  assert gated.train.aux_loss_weights.gateskip_sparsity == 1.0


def _gateskip_means(gate_loss, skip_middle_loss):
  gated = {"loss": 2.0, "accuracy": 0.5, "acc_gate_20": 0.46, "first_token_rank": 0.95}
  for budget in gateskip_table.BUDGETS:
    pct = round(100 * budget)
    gated.update({f"loss_gate_{pct}": gate_loss, f"skipped_gate_{pct}": budget, f"loss_random_{pct}": 2.4,
                  f"skipped_random_{pct}": budget})
  return {"gateskip L4": gated, "skip-middle L4": {"loss": skip_middle_loss, "compute": 0.625},
          **{f"dense L{n}": {"loss": loss, "compute": n / 4} for n, loss in ((2, 2.4), (3, 2.2), (4, 2.0))}}


@pytest.mark.parametrize("gate_loss, skip_middle_loss, expected", [
    (2.1, 2.31, {"a": True, "b": True, "c": True, "d": True}),
    (2.25, 2.29, {"a": False, "b": True, "c": False, "d": True}),  # frontier at compute 0.625 is 2.3
])
def test_gateskip_claims_judge_the_means(gate_loss, skip_middle_loss, expected):
  means = _gateskip_means(gate_loss, skip_middle_loss)
  assert {c.name: c.judge(means) for c in tables.get("gateskip").claims} == expected


def test_head_gating_claims_and_missing_classes():
  lm = {"rank_corr": 0.4, "delta_facilitating": 0.3, "delta_irrelevant": 0.01, "contrastive_neg_delta": 0.5,
        "contrastive_pos_delta": 0.1}
  mqar = {"rank_corr": -0.1, "delta_facilitating": 0.2}
  verdicts = common.judge(tables.get("head_gating"), [{"variant": v, "seed": 0, "metrics": m}
                                                      for v, m in (("lm", lm), ("mqar", mqar))])
  assert verdicts["a"].startswith("did not hold") and verdicts["b"].startswith("held")
  assert verdicts["c"].startswith("not judged") and "delta_irrelevant" in verdicts["c"]
  assert verdicts["d"].startswith("held")


def test_gateskip_budget_sweep_on_a_fresh_model():
  config = tables.get("gateskip").config("micro", "gateskip L4")
  model = train_step.make_model(config)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, config.data.seq_len), jnp.int32))
  rng = np.random.default_rng(0)  # any weights will do: no initialiser compiled
  params = jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(s.dtype), flax.core.meta.unbox(shapes))
  m = gateskip_table.budget_sweep(config, params["params"])
  assert set(m) == {"first_token_rank", "loss_gate_50", "acc_gate_50", "skipped_gate_50", "loss_random_50",
                    "skipped_random_50"}
  assert 0.2 < m["skipped_gate_50"] < 0.8 and 0.2 < m["skipped_random_50"] < 0.8 and 0 <= m["first_token_rank"] <= 1
  assert np.isfinite(m["loss_gate_50"]) and np.isfinite(m["loss_random_50"])


@pytest.mark.usefixtures("fast_compile")
def test_gateskip_runner_micro(tmp_path):
  record = common.run_one(tables.get("gateskip"), "micro", "gateskip L4", 0, tmp_path)
  m = record["metrics"]
  assert m["compute"] == 1.0 and np.isfinite(m["loss_gate_50"]) and np.isfinite(m["loss_random_50"])
  assert m["gateskip_skipped"] == 0.0 and m["aux/gateskip_sparsity"] > 0  # the trainer's eval: rule "none"


@pytest.mark.usefixtures("fast_compile")
def test_head_gating_runner_micro(tmp_path):
  table = tables.get("head_gating")
  record = common.run_one(table, "micro", "lm", 0, tmp_path)
  m = record["metrics"]
  assert sum(m[f"n_{label}"] for label in ("facilitating", "interfering", "irrelevant", "ambiguous")) == 4
  assert m["num_heads"] == 4 and np.isfinite(m["contrastive_neg_delta"]) and np.isfinite(m["induction_nll"])
  heads = json.loads((tmp_path / "heads.json").read_text())
  assert np.shape(heads["delta"]) == (2, 2) and len(heads["labels"]) == 2
