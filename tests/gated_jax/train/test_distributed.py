"""Multi-host code paths (issue #4): two processes on localhost with ``jax.distributed.initialize`` (Gloo
collectives) train a few steps, each reading only its rows of every global batch, write one checkpoint
together, and agree with the single-process run."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

from gated_jax.train import train

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _tiny  # noqa: E402  pylint: disable=wrong-import-position

HERE = pathlib.Path(__file__).parent


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  port = _free_port()
  procs = []
  for pid in range(2):
    job = [{"overrides": {"mesh.data": -1, "distributed.enabled": True,
                          "distributed.coordinator_address": f"127.0.0.1:{port}",
                          "distributed.num_processes": 2, "distributed.process_id": pid},
            "workdir": str(tmp_path)}]
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"}
    procs.append(subprocess.Popen([sys.executable, str(HERE / "_tiny.py"), json.dumps(job)], cwd=HERE.parents[2],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-4000:]
  results = [json.loads([l for l in out.splitlines() if l.startswith("RESULT ")][-1][7:])[0] for out, _ in outputs]
  single = _tiny.losses(train(_tiny.tiny_config()).history)
  for result in results:
    np.testing.assert_allclose(result["losses"], single, rtol=1e-5, atol=1e-5)
  assert (tmp_path / "metrics.jsonl").exists()  # written by process 0 only
  written = {p.name for p in (tmp_path / "checkpoints" / "6" / "data").iterdir()}
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= written  # each process saved its iterator
