"""Tests for the grokking table (experiments/tables/grokking.py): the claims on constructed runs, the MLP's
first layer against the one-hot product, and a micro reproduction."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import tables
from experiments.tables import common
from experiments.tables import grokking


def _runs(**changes):
  """One seed of every variant where each claim holds, then ``variant.metric = value`` changes."""
  metrics = {"softmax": dict(test_accuracy=0.01, absorbed_max=0.8, step_90=math.inf),
             "softmax-fp64": dict(test_accuracy=0.3, absorbed_max=0.1, step_90=math.inf),
             "stablemax": dict(test_accuracy=0.95, absorbed_max=0.0, step_90=900.0),
             "orthograd": dict(test_accuracy=1.0, absorbed_max=0.0, step_90=100.0)}
  runs = [{"variant": f"{task} {name}", "seed": 0, "metrics": dict(m), "history": []}
          for task in grokking.TASKS for name, m in metrics.items() if f"{task} {name}" in grokking.VARIANTS]
  for path, value in changes.items():
    variant, key = path.rsplit(".", 1)
    next(r for r in runs if r["variant"] == variant)["metrics"][key] = value
  return runs


@pytest.mark.parametrize("changes, failing", [
    ({}, ()),
    ({"add softmax.absorbed_max": 0.2}, ("add: softmax collapses",)),
    ({"multiply softmax.test_accuracy": 0.95},
     ("multiply: softmax collapses", "multiply: stablemax prevents collapse")),
    ({"add stablemax.absorbed_max": 0.01}, ("add: stablemax prevents collapse",)),
    ({"add stablemax.test_accuracy": 0.5}, ("add: stablemax generalises",)),
    ({"multiply orthograd.step_90": 1000.0}, ("multiply: orthograd generalises first",)),
    ({"add stablemax.step_90": math.inf, "add stablemax.test_accuracy": 0.2},
     ("add: stablemax generalises",)),  # orthograd still first: inf is never reached
    ({"add softmax-fp64.absorbed_max": 0.9}, ("add: float64 delays collapse",)),
])
def test_verdicts_on_constructed_runs(changes, failing):
  verdicts = common.judge(grokking.TABLE, _runs(**changes))
  assert len(verdicts) == 9
  for name, verdict in verdicts.items():
    assert verdict.startswith(common.NOT_HELD if name in failing else common.HELD), (name, verdict)


def test_first_layer_is_the_one_hot_product():
  model = grokking.GrokkingMLP(5, (3,))
  pairs = jnp.array([[0, 4], [2, 2], [4, 1]])
  params = model.init(jax.random.PRNGKey(0), pairs)["params"]
  hidden = jnp.concatenate([jax.nn.one_hot(pairs[:, 0], 5), jax.nn.one_hot(pairs[:, 1], 5)], 1) @ params["input"]
  expected = jax.nn.relu(hidden) @ params["out"]["kernel"]
  np.testing.assert_allclose(model.apply({"params": params}, pairs), expected, rtol=1e-6)
  assert float(jnp.max(jnp.abs(params["input"]))) <= 1 / np.sqrt(10)  # U(±1/sqrt(fan_in)), fan_in = 2p


def test_micro_reproduction(tmp_path):
  text = common.reproduce(tables.get("grokking"), scale="micro", seeds=1, out=tmp_path, log=lambda _: None)
  out = tmp_path / "grokking"
  for name in ("table.md", "runs.jsonl", "plot.png", "summary.md", "curves.png"):
    assert (out / name).stat().st_size > 0, name
  runs = {r["variant"]: r for r in common.read_runs(out)}
  assert list(runs) == list(grokking.TABLE.micro_variants)
  for run in runs.values():
    history = run["history"]
    assert [h["step"] for h in history] == [0, 10, 20]
    assert history[-1]["loss"] < 0.9 * history[0]["loss"]  # it learns the training set
    assert history[-1]["train_accuracy"] > history[0]["train_accuracy"]
  assert "Step at which test accuracy passes 90%" in text
