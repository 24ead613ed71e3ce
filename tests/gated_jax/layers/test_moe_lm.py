"""An MoE language model (``experiments/configs/moe.py``) trains and resumes exactly from a checkpoint, the
loss-free-balancing bias (a parameter updated outside the optimizer) included."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from experiments.configs import moe
from experiments.tables.common import apply_overrides
from gated_jax.train import train

pytestmark = pytest.mark.slow

TINY = {"model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2, "model.mlp_hidden_dim": 32,
        "model.max_len": 32, "model.mlp_kwargs.num_experts": 4, "model.mlp_kwargs.router": "sigmoid",
        "model.mlp_kwargs.router_kwargs": {"balance_rate": 0.01}, "data.seq_len": 32, "data.batch_size": 8,
        "data.corpus_bytes": 100_000, "optim.warmup_steps": 1, "train.steps": 6, "train.log_every": 1,
        "train.eval_every": 6, "train.eval_batches": 1, "train.checkpoint_every": 3, "train.max_to_keep": 3,
        "train.diagnostics": False, "train.progress": False, "train.async_checkpointing": False, "mesh.data": 1}


def test_moe_lm_trains_and_resumes_exactly(tmp_path):
  config = apply_overrides(moe.get_config("tiny"), TINY)
  full = train(config, workdir=tmp_path / "full")
  losses = [h["loss"] for h in full.history]
  assert losses[-1] < losses[0]
  bias = np.asarray(full.params["layer_0"]["mlp"]["router"]["selection_bias"])
  assert np.any(bias != 0) and set(np.round(np.abs(bias) / 0.01, 3)) <= {float(i) for i in range(7)}
  resumed_dir = tmp_path / "resumed"
  shutil.copytree(tmp_path / "full", resumed_dir)
  shutil.rmtree(resumed_dir / "checkpoints" / "6")  # keep the step-3 checkpoint only
  resumed = train(config, workdir=resumed_dir)
  assert resumed.resumed_from == 3 and [h["step"] for h in resumed.history] == [4, 5, 6]
  np.testing.assert_allclose([h["loss"] for h in resumed.history], losses[3:], rtol=1e-6)
  np.testing.assert_array_equal(resumed.params["layer_0"]["mlp"]["router"]["selection_bias"], bias)
