"""The same training steps on 1 device and on 8 simulated CPU devices (issue #4): (data=2, fsdp=2, tensor=2),
(data=8) and pmap give the same losses; parameters are sharded as ``RULES`` says; a checkpoint written on
(data=8) restores onto (fsdp=4, tensor=2) and continues exactly."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gated_jax.train import train

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _tiny  # noqa: E402  pylint: disable=wrong-import-position

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parents[2]


def _run_jobs(jobs: list[dict], devices: int) -> list[dict]:
  env = {**os.environ, "JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, str(HERE / "_tiny.py"), json.dumps(jobs)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-4000:]
  return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def single_device_losses():
  return _tiny.losses(train(_tiny.tiny_config()).history)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("data8"))
  jobs = [
      {"overrides": {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}, "specs": True},
      {"overrides": {"mesh.data": 8}},
      {"overrides": {"train.mode": "pmap"}},
      # written on (data=8) up to step 3, then resumed on (fsdp=4, tensor=2) to step 6
      {"overrides": {"mesh.data": 8, "train.steps": 3, "optim.schedule_steps": 6}, "workdir": workdir},
      {"overrides": {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}, "workdir": workdir, "specs": True},
  ]
  return _run_jobs(jobs, devices=8)


@pytest.mark.parametrize("job, name", [(0, "data2-fsdp2-tensor2"), (1, "data8"), (2, "pmap")])
def test_losses_match_single_device(eight_devices, single_device_losses, job, name):
  got = eight_devices[job]["losses"]
  assert len(got) == len(single_device_losses) == 6, name
  np.testing.assert_allclose(got, single_device_losses, rtol=1e-5, atol=1e-5, err_msg=name)


def test_parameters_are_sharded_by_the_rules(eight_devices):
  specs = eight_devices[0]["specs"]
  assert specs["embed/embedding"] == "P('tensor', 'fsdp')"  # (vocab, embed)
  assert specs["layer_0/mlp/wi/kernel"] == "P('fsdp', 'tensor')"  # (embed, mlp)
  assert specs["layer_0/mlp/wo/kernel"] == "P('tensor', 'fsdp')"  # (mlp, embed)
  assert specs["layer_0/mixer/query/kernel"].startswith("P('fsdp', 'tensor'")  # (embed, heads, head_dim)
  assert specs["final_norm/scale"] == "P('fsdp',)"


def test_checkpoint_from_data8_continues_on_fsdp4_tensor2(eight_devices, single_device_losses):
  first, resumed = eight_devices[3], eight_devices[4]
  assert first["steps"] == [1, 2, 3] and resumed["resumed_from"] == 3 and resumed["steps"] == [4, 5, 6]
  np.testing.assert_allclose(first["losses"] + resumed["losses"], single_device_losses, rtol=1e-5, atol=1e-5)
  assert resumed["specs"]["layer_0/mlp/wi/kernel"] == "P('fsdp', 'tensor')"
