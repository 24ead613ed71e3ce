"""Expert parallelism (issue #9): the MoE layer and an MoE LM training step on 2 and 4 simulated CPU devices
(mesh ``expert`` = 2, 4) equal one device; the experts are sharded over ``expert`` and the dropless layer
all-gathers and reduce-scatters. One subprocess (``_moe_ep.py``) runs every multi-device check."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parents[2]


def _run(*args: str) -> dict:
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": "4", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, str(HERE / "_moe_ep.py"), *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600, check=False)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-4000:]
  return json.loads(lines[-1][len("RESULT "):])


def _check(results: dict) -> None:
  for dispatch in ("dropless", "capacity"):
    for shards, r in results.get(dispatch, {}).items():
      assert r["y"] < 1e-5 and r["grads"] < 1e-5, (dispatch, shards, r)
      assert r["wi_spec"].startswith("P('expert'"), r
  for shards, r in results["dropless"].items():
    assert r["collectives"] == ["all_gather", "reduce_scatter"], (shards, r)
  assert results["train_step"]["bias_moved"]
  for shards, r in results["train_step"].items():
    if shards != "bias_moved":
      assert r["loss"] < 1e-5 and r["load_balance"] < 1e-5 and r["params"] < 1e-5, (shards, r)


def test_expert_parallel_equals_one_device():
  results = _run()
  assert set(results["dropless"]) == {"2", "4"} and "4" in results["train_step"]
  _check(results)


@pytest.mark.slow
def test_expert_parallel_equals_one_device_full():
  results = _run("--full")
  assert set(results["capacity"]) == {"2", "4"} and "2" in results["train_step"]
  _check(results)
