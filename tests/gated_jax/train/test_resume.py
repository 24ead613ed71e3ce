"""Exact resume (issue #4): a run killed with SIGKILL mid-training and restarted with the same command
continues from its last checkpoint with the same losses and data order as an uninterrupted run."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np

from gated_jax.train import train

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _tiny  # noqa: E402  pylint: disable=wrong-import-position

ROOT = pathlib.Path(__file__).parents[3]
STEPS = 150
FLAGS = {"train.steps": STEPS, "train.checkpoint_every": 10, "train.eval_every": STEPS, "train.max_to_keep": 3}


def _command(workdir):
  flags = [f"--config.{k}={v}" for k, v in {**_tiny.TINY, **FLAGS}.items()]
  return [sys.executable, "-m", "experiments.train", "--config=experiments/configs/lm.py:tiny", *flags,
          f"--workdir={workdir}"]


def _by_step(path):
  entries = {}
  for line in pathlib.Path(path).read_text().splitlines():
    entry = json.loads(line)
    if "loss" in entry:
      entries[entry["step"]] = entry  # a resumed run re-logs steps after its checkpoint: keep the last
  return entries


def _committed_steps(workdir):
  ckpt = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in ckpt.glob("*") if p.name.isdigit()) if ckpt.exists() else []


def test_sigkill_then_restart_matches_uninterrupted_run(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_command(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not any(s >= 20 for s in _committed_steps(killed)):
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be killed; make it longer"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  at_kill = _committed_steps(killed)
  assert at_kill and max(at_kill) < STEPS

  restart = subprocess.run(_command(killed), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                           check=False)
  assert restart.returncode == 0, restart.stderr[-3000:]
  summary = json.loads(restart.stdout.strip().splitlines()[-1])
  assert summary["resumed_from"] == max(at_kill) and summary["step"] == STEPS

  reference = tmp_path / "reference"
  config = _tiny.tiny_config(**{k.replace(".", "__"): v for k, v in FLAGS.items()})
  train(config, workdir=reference)
  got, want = _by_step(killed / "metrics.jsonl"), _by_step(reference / "metrics.jsonl")
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  after = range(max(at_kill) + 1, STEPS + 1)
  np.testing.assert_allclose([got[s]["loss"] for s in after], [want[s]["loss"] for s in after], rtol=1e-6)
  assert [got[s]["tokens_checksum"] for s in after] == [want[s]["tokens_checksum"] for s in after]
