"""Tests for the MQAR table (experiments/tables/mqar.py) and its config (experiments/configs/mqar.py)."""

import pytest

from experiments import __main__ as cli
from experiments import tables
from experiments.configs import mqar as mqar_config
from experiments.tables import common, mqar


def _means(accuracy_by_mixer, scale="tiny"):
  return {p.name: {"accuracy": accuracy_by_mixer.get(p.mixer, 0.5)} for p in mqar.grid(scale)}


def test_registered_and_grid():
  assert tables.get("mqar") is mqar.TABLE
  tiny = mqar.TABLE.run_variants("tiny")
  sweep = mqar_config.SWEEPS["tiny"]
  assert len(tiny) == len(mqar.MIXERS) * len(sweep.tasks) * len(sweep.widths) * len(sweep.lrs)
  paper = mqar.grid("paper")
  assert {p.d_model for p in paper} == {64, 128, 256, 512} and len({p.lr for p in paper}) == 4
  with pytest.raises(ValueError, match="scale"):
    mqar.TABLE.run_variants("huge")


def test_config_of_a_point():
  point = mqar.grid("small")[-1]
  config = mqar.TABLE.config("small", point.name)
  assert config.model.mlp == "none" and config.model.num_layers == 2
  assert config.model.d_model == point.d_model and config.optim.lr == point.lr
  assert config.data.name == "mqar" and config.data.seq_len == point.seq_len == config.model.max_len
  assert config.data.vocab_size == config.model.vocab_size == 8192
  assert config.train.steps == round(16 * 100_000 / 512)
  with pytest.raises(ValueError, match="variant"):
    mqar.TABLE.config("tiny", "nope")


def test_best_over_lr_and_claims():
  means = {p.name: {"accuracy": 0.2 + 0.1 * i} for i, p in enumerate(mqar.grid("small")) if p.mixer == "gla"}
  best = mqar.best_over_lr(means)
  assert set(best) == {("gla", 128, d) for d in (64, 128, 256)}
  per_width = {d: max(v["accuracy"] for n, v in means.items() if mqar._POINTS[n].d_model == d)
               for d in (64, 128, 256)}
  assert all(best[("gla", 128, d)] == per_width[d] for d in per_width)
  ordered = dict(attention=1.0, deltanet=0.9, gated_deltanet=0.95, gla=0.8, linear_attention=0.6)
  assert mqar._attention_near_one(_means(ordered))
  assert mqar._delta_above_gla_above_linear(_means(ordered))
  assert not mqar._attention_near_one(_means({**ordered, "attention": 0.5}))
  assert not mqar._delta_above_gla_above_linear(_means({**ordered, "gla": 0.5}))
  runs = [{"variant": n, "seed": 0, "metrics": {"accuracy": 0.3}} for n in mqar.TABLE.run_variants("micro")]
  verdicts = common.judge(mqar.TABLE, runs)
  assert verdicts["attention"].startswith("did not hold") and verdicts["delta>gla>linear"].startswith("not judged")


def test_micro_run_writes_files_and_verdicts(tmp_path, capsys):
  assert cli.main(["reproduce", "mqar", "--scale", "micro", "--out", str(tmp_path)]) == 0
  out_dir = tmp_path / "mqar"
  for name in ("table.md", "table.csv", "runs.jsonl", "plot.png", "summary.md", "accuracy_vs_state.png"):
    assert (out_dir / name).stat().st_size > 0, name
  printed = capsys.readouterr().out
  claim_lines = {line.split("**")[1]: line for line in printed.splitlines() if line.startswith("- **")}
  assert "did not hold" in claim_lines["attention"]  # a few micro steps cannot reach 0.9 accuracy
  assert "best accuracy over learning rates vs width and recurrent-state size" in printed
  summary = (out_dir / "summary.md").read_text()
  assert "| attention | 32 / 2 | 32 |" in summary and "| gla | 32 / 2 | 32 |" in summary
