"""Tests for the table machinery (experiments/tables/common.py) and an end-to-end micro reproduction."""


import ml_collections
import numpy as np
import pytest

from experiments import tables
from experiments.tables import common


def _toy_table(**kwargs):
  fields = dict(
      name="toy", paper="Toy paper (arXiv 0000.00000), Table 1",
      variants={"a": {"train.steps": 1}, "b": {"train.steps": 2}},
      scales={"micro": {}, "tiny": {"model.width": 8}},
      metrics=(common.Metric("loss", "val loss"), common.Metric("gate_mean", "gate")),
      paper_columns=("PPL",), paper_numbers={"a": {"PPL": 6.0}},
      claims=(common.Claim("x", "b beats a", ("a", "b"), lambda m: m["b"]["loss"] < m["a"]["loss"]),
              common.Claim("y", "c beats a", ("a", "c"), lambda m: True)),
      base_config=lambda: ml_collections.ConfigDict({"seed": 3, "model": {"width": 4}, "train": {"steps": 0}}))
  return common.Table(**{**fields, **kwargs})


def _runs():
  return [{"variant": "a", "seed": s, "metrics": {"loss": 2.0 + s}, "history": [{"step": 0, "loss": 3.0}]}
          for s in range(2)] + [{"variant": "b", "seed": 0, "metrics": {"loss": 1.0, "gate_mean": 0.25},
                                 "history": [{"step": 0, "loss": 2.5}, {"step": 1, "loss": 2.0}]}]


def test_config_layers_scale_variant_seed():
  config = _toy_table().config("tiny", "b", seed=2)
  assert (config.model.width, config.train.steps, config.seed) == (8, 2, 5)


@pytest.mark.parametrize("overrides, match", [({"nope.x": 1}, "nope"), ({"model.depth": 1}, "depth")])
def test_unknown_override_raises(overrides, match):
  with pytest.raises(ValueError, match=match):
    common.apply_overrides(ml_collections.ConfigDict({"model": {"width": 4}}), overrides)


def test_unknown_scale_variant_table_raise():
  with pytest.raises(ValueError, match="small"):
    _toy_table().config("small", "a")
  with pytest.raises(ValueError, match="'z'"):
    _toy_table().config("tiny", "z")
  with pytest.raises(ValueError, match="gated_attention"):
    tables.get("no_such_table")


def test_aggregate_and_judge():
  stats = common.aggregate(_runs(), ["loss", "gate_mean"])
  assert stats["a"]["loss"] == pytest.approx((2.5, 0.5))
  assert "gate_mean" not in stats["a"] and stats["b"]["gate_mean"] == pytest.approx((0.25, 0.0))
  verdicts = common.judge(_toy_table(), _runs())
  # b has seed 0 only: seed 1 cannot judge x
  assert verdicts["x"] == "held (1 seed: spread not measured; 1 of 2 seeds lack a variant or metric it needs)"
  assert verdicts["y"].startswith("not judged") and "c" in verdicts["y"]
  flipped = common.judge(_toy_table(claims=(common.Claim("x", "a beats b", ("a", "b"),
                                                         lambda m: m["a"]["loss"] < m["b"]["loss"]),)), _runs())
  assert flipped["x"].startswith("did not hold")


def _two_seed_runs(b_losses):
  return [{"variant": v, "seed": s, "metrics": {"loss": loss}, "history": []}
          for s, b in enumerate(b_losses) for v, loss in (("a", 2.0), ("b", b))]


def test_verdict_needs_every_seed_to_agree():
  table = _toy_table(claims=(common.Claim("x", "b beats a", ("a", "b"), lambda m: m["b"]["loss"] < m["a"]["loss"]),))
  assert common.judge(table, _two_seed_runs([1.0, 1.5]))["x"] == "held (all 2 seeds)"
  assert common.judge(table, _two_seed_runs([2.5, 2.1]))["x"] == "did not hold (all 2 seeds)"
  # The mean (1.9) beats a, but seed 1 does not: the difference is within the seed spread.
  assert common.judge(table, _two_seed_runs([1.5, 2.3]))["x"] == "not resolved at this scale (held in 1 of 2 seeds)"


def test_custom_runner_and_default_seeds(tmp_path):
  calls = []
  def runner(config, workdir):
    calls.append((config.train.steps, config.seed))
    return {"metrics": {"loss": 1.0 / config.train.steps}, "history": [{"step": 1, "loss": 1.0}]}
  table = _toy_table(runner=runner, default_seeds=2, micro_variants=("a", "b"))
  text = common.reproduce(table, scale="micro", out=tmp_path, log=lambda _: None)
  assert calls == [(1, 3), (1, 4), (2, 3), (2, 4)]
  assert "2 seeds" in text and "**held** (all 2 seeds)" in text
def test_write_results(tmp_path):
  text = common.write_results(_toy_table(), "micro", 2, _runs(), tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png", "runs.jsonl", "table.csv", "table.md"]
  assert "| a | 2.500 ± 0.500 | – | 6 |" in text and "**held**" in text
  assert len(common.read_runs(tmp_path)) == 3
  assert "claim:x,held (1 seed" in (tmp_path / "table.csv").read_text()


def test_gated_attention_table_declares_the_grid():
  table = tables.get("gated_attention")
  assert len(table.variants) == 9 and set(common.SCALES) <= set(table.scales)
  positions = {v: table.config("tiny", v).model.mixer_kwargs.gate_position for v in table.variants}
  assert positions["baseline"] == "none" and positions["G5"] == "G5"
  for claim in table.claims:
    assert set(claim.variants) <= set(table.variants)


def test_reproduce_micro_end_to_end(tmp_path):
  table = tables.get("gated_attention")
  lines = []
  text = common.reproduce(table, scale="micro", seeds=1, out=tmp_path, log=lines.append)
  out = tmp_path / "gated_attention"
  for name in ("table.md", "table.csv", "runs.jsonl", "plot.png"):
    assert (out / name).stat().st_size > 0, name
  runs = common.read_runs(out)
  assert [r["variant"] for r in runs] == list(table.micro_variants)
  for run in runs:
    assert run["config"]["train"]["steps"] == 5 and run["history"]
    assert run["metrics"]["loss"] > 0 and run["metrics"]["num_params"] > 0
    # N(0, 0.02) weights after 5 steps at 1e-3: near-uniform causal attention, so the weight on token 0 averages
    # mean_i 1/(i+1) over the 32 queries (0.127) and no head is a sink; the sigmoid gate sits near 0.5.
    assert run["metrics"]["first_token_attention"] == pytest.approx(np.mean(1 / np.arange(1, 33)), abs=0.03)
    assert run["metrics"]["sink_rate"] == 0.0
  metrics = {r["variant"]: r["metrics"] for r in runs}
  assert "gate_mean" not in metrics["baseline"] and metrics["G1"]["gate_mean"] == pytest.approx(0.5, abs=0.05)
  assert "gated_attention (micro scale" in text and lines[-1] == text
  assert "G1" in text and "5.761" in text
