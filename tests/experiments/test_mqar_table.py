"""Tests for the MQAR table (experiments/tables/mqar.py), its config (experiments/configs/mqar.py) and the
vmapped learning-rate sweep (experiments/tables/_lr_sweep.py)."""


import pytest

from experiments import __main__ as cli
from experiments import tables
from experiments.configs import mqar as mqar_config
from experiments.tables import common, mqar

# Recurrent state in floats at width d (the table's mixers): GLA d²/4, linear attention and DeltaNet d²/2,
# Gated DeltaNet d²; attention's KV cache 2 L d, Hyena's input caches 2 L d, H3's 6 L d (2 layers).
STATE_FACTOR = {"gla": 0.25, "linear_attention": 0.5, "deltanet": 0.5, "gated_deltanet": 1.0, "base_conv": 0.0,
                "gated_conv": 0.0}
SEQUENCE_STATE = {"attention": 2, "hyena": 2, "h3": 6}  # times L d


def _means(accuracy, scale="small"):  # widths 64, 128, 256
  """Synthetic means: ``accuracy[mixer]`` is a number or a ``d_model -> accuracy`` dict."""
  means = {}
  for p in mqar.grid(scale):
    acc = accuracy.get(p.mixer, 0.5)
    state = SEQUENCE_STATE[p.mixer] * p.seq_len * p.d_model if p.mixer in SEQUENCE_STATE else \
        STATE_FACTOR[p.mixer] * p.d_model ** 2
    means[p.name] = {"accuracy": acc[p.d_model] if isinstance(acc, dict) else acc, "state_bytes": 4 * state}
  return means


def test_registered_and_grid():
  assert tables.get("mqar") is mqar.TABLE and mqar.TABLE.default_seeds == 3
  sweep = mqar_config.SWEEPS["tiny"]
  assert sweep.tasks[0][1] >= 8 and len(sweep.lrs) >= 2 and sweep.num_train_examples is None  # fresh data
  widths = {m: sweep.widths if m not in mqar_config.CONV_ROWS else sweep.conv_widths for m in mqar.MIXERS}
  assert len(mqar.TABLE.run_variants("tiny")) == sum(map(len, widths.values())) * len(sweep.tasks)
  assert sweep.conv_widths == (64,) and set(mqar_config.CONV_ROWS) < set(mqar.MIXERS)
  paper = mqar.grid("paper")
  assert {p.d_model for p in paper} == {64, 128, 256, 512} and len(mqar_config.SWEEPS["paper"].lrs) == 4
  with pytest.raises(ValueError, match="scale"):
    mqar.TABLE.run_variants("huge")


def test_config_of_a_point():
  point = [p for p in mqar.grid("small") if p.mixer == "gated_deltanet"][-1]
  config = mqar.TABLE.config("small", point.name)
  assert config.model.mixer == ("base_conv", "gated_deltanet") and config.model.num_layers == 2  # Zoology
  assert config.model.mlp == "none" and config.model.d_model == point.d_model
  assert tuple(config.optim.lr_sweep) == mqar_config.SWEEPS["small"].lrs
  assert config.data.name == "mqar" and config.data.seq_len == point.seq_len == config.model.max_len
  assert config.data.vocab_size == config.model.vocab_size == 8192
  assert config.train.steps == round(16 * 100_000 / 512)
  hyena = mqar.TABLE.config("tiny", "hyena L64/kv8 d64")
  assert hyena.model.mixer == "hyena" and tuple(hyena.optim.lr_sweep) == mqar_config.SWEEPS["tiny"].conv_lrs
  assert hyena.model.max_len == 64  # Zoology: the filter spans l_max = the sequence length
  tiny = mqar.TABLE.config("tiny", mqar.grid("tiny")[0].name)
  assert tiny.data.num_train_examples == tiny.train.steps * tiny.data.batch_size  # fresh examples every step
  with pytest.raises(ValueError, match="variant"):
    mqar.TABLE.config("tiny", "nope")


def test_claims_on_synthetic_means():
  ordered = dict(attention=1.0, gated_deltanet={64: 0.6, 128: 0.9, 256: 0.97},
                 deltanet={64: 0.5, 128: 0.8, 256: 0.95}, gla={64: 0.3, 128: 0.5, 256: 0.8},
                 linear_attention={64: 0.2, 128: 0.4, 256: 0.6})
  assert mqar._attention_solves(_means(ordered))
  assert mqar._attention_above_recurrent(_means(ordered))
  assert mqar._delta_above_gla_above_linear(_means(ordered))
  assert mqar._rises_with_state(_means(ordered))
  assert not mqar._attention_solves(_means({**ordered, "attention": 0.9}))
  assert not mqar._attention_above_recurrent(_means({**ordered, "attention": {64: 1.0, 128: 0.85, 256: 1.0}}))
  assert not mqar._rises_with_state(_means({**ordered, "gla": {64: 0.3, 128: 0.5, 256: 0.45}}))
  assert mqar._rises_with_state(_means({**ordered, "gla": {64: 0.3, 128: 0.99, 256: 0.98}}))  # saturated


def test_gated_convolutions_below_attention_claim():
  below = dict(attention=1.0, base_conv=0.3, hyena={64: 0.6, 128: 0.9, 256: 0.97}, h3=0.5, gated_conv=0.1)
  assert mqar._convs_below_attention(_means(below))
  assert not mqar._convs_below_attention(_means({**below, "hyena": {64: 0.6, 128: 0.9, 256: 0.99}}))
  with pytest.raises(KeyError):
    mqar._convs_below_attention({})


def test_orderings_are_judged_at_equal_state_not_equal_width():
  """Linear attention is ahead of GLA at every width, but GLA's state is half as large: at equal state
  (log-linear interpolation between widths) GLA is ahead everywhere."""
  means = _means(dict(gla={64: 0.1, 128: 0.32, 256: 0.55}, linear_attention={64: 0.2, 128: 0.35, 256: 0.6}))
  assert mqar.at_least_at_equal_state(means, "gla", "linear_attention")
  assert not mqar.at_least_at_equal_state(means, "linear_attention", "gla")
  with pytest.raises(KeyError):
    mqar.at_least_at_equal_state({}, "gla", "linear_attention")


def test_micro_run_writes_files_and_verdicts(tmp_path, capsys):
  assert cli.main(["reproduce", "mqar", "--scale", "micro", "--seeds", "2", "--out", str(tmp_path)]) == 0
  out_dir = tmp_path / "mqar"
  for name in ("table.md", "table.csv", "runs.jsonl", "plot.png", "summary.md", "accuracy_vs_state.png"):
    assert (out_dir / name).stat().st_size > 0, name
  printed = capsys.readouterr().out
  assert "best accuracy over learning rates vs width and recurrent-state size" in printed
  runs = common.read_runs(out_dir)
  assert sorted((r["variant"], r["seed"]) for r in runs) == sorted(
      (p.name, s) for p in mqar.grid("micro") for s in range(2))
  state = {mqar._POINTS[r["variant"]].mixer: r["metrics"]["state_bytes"] for r in runs}
  # GLA at d16, 2 heads: K = 16 * 0.5 / 2 = 4, V = 8 -> 2 * 4 * 8 float32; attention: K and V caches of L=32.
  assert state == {"gla": 2 * 4 * 8 * 4, "attention": 2 * 32 * 16 * 4}
  for run in runs:
    lrs = mqar_config.SWEEPS["micro"].lrs
    per_lr = [run["metrics"][f"accuracy_lr{lr:g}"] for lr in lrs]
    assert run["metrics"]["accuracy"] == max(per_lr) and run["metrics"]["best_lr"] in lrs
    assert len(run["history"]) == mqar_config.SWEEPS["micro"].steps_fresh  # log_every 1 at 8 steps
  summary = (out_dir / "summary.md").read_text()
  assert "| attention | 32 / 2 | 16 |" in summary and "| gla | 32 / 2 | 16 |" in summary
