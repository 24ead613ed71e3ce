"""The two MoE tables: ``moe_routers`` declares every router at equal active parameters and runs end to end at
micro scale; ``gaussian_moe``'s estimator, loss and slopes, and its micro run."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import tables
from experiments.tables import common, gaussian_moe, moe_routers
from gated_jax.layers import ROUTERS


def test_moe_routers_declares_every_router_at_equal_active_parameters():
  table = tables.get("moe_routers")
  configs = {v: moe_routers.resolved(table.config("tiny", v)) for v in table.variants}
  routers = {c.model.mlp_kwargs.router for c in configs.values() if c.model.mlp == "moe"}
  assert routers == set(ROUTERS.names())
  moe = configs["softmax"].model
  assert configs["dense"].model.mlp_hidden_dim == moe.mlp_kwargs.k * moe.mlp_hidden_dim
  assert (moe.mlp_kwargs.num_experts, moe.mlp_kwargs.k) == (8, 2)
  assert configs["dts"].model.mlp_kwargs.router_kwargs.tau_steps == configs["dts"].train.steps
  assert configs["sigmoid_loss_free"].train.aux_loss_weights.load_balance == 0.0
  for claim in table.claims:
    assert set(claim.variants) <= set(table.variants) and "expert_choice" not in claim.variants


@pytest.mark.usefixtures("fast_compile")
def test_moe_routers_micro_end_to_end(tmp_path):
  table = tables.get("moe_routers")
  text = common.reproduce(table, scale="micro", seeds=1, out=tmp_path, log=lambda _: None)
  runs = common.read_runs(tmp_path / "moe_routers")
  assert [r["variant"] for r in runs] == list(table.micro_variants)
  metrics = {r["variant"]: r["metrics"] for r in runs}
  assert metrics["softmax"]["dropped_fraction"] == 0.0 and metrics["softmax"]["active_experts"] == 2.0
  assert metrics["softmax"]["load_cv"] >= 0 and metrics["softmax"]["tokens_per_s"] > 0
  assert metrics["softmax"]["num_params"] > metrics["dense"]["num_params"]
  assert "moe_routers (micro scale" in text


def test_voronoi_loss_is_zero_at_the_truth_and_sums_cell_masses():
  truth = gaussian_moe.truth("softmax")
  assert float(gaussian_moe.voronoi_loss("softmax", truth, cell_exponent=4.0)) == pytest.approx(0.0, abs=1e-6)
  moved = {**truth, "a": truth["a"] + jnp.array([0.1, 0.0])}  # singleton cell: exp(β0) |Δa|
  want = np.exp(-8.0) * 0.1
  assert float(gaussian_moe.voronoi_loss("softmax", moved, cell_exponent=4.0)) == pytest.approx(want, rel=1e-4)
  split = {"beta0": jnp.array([-8.0 - np.log(2), -8.0 - np.log(2), 0.0]), "beta1": jnp.array([25.125, 24.875, 0.0]),
           "a": jnp.array([-20.0, -20.0, 20.0]), "b": jnp.array([15.0, 15.0, -5.0]), "nu": jnp.array([.09, .09, .16])}
  # two fitted experts share the first cell: each adds exp(β0) |Δβ1|^r; the cell masses add up exactly
  got = float(gaussian_moe.voronoi_loss("softmax", split, cell_exponent=4.0))
  # the cell-mass term is 0 up to float32 rounding of β0 (~1e-10 here)
  assert got == pytest.approx(2 * np.exp(-8.0) / 2 * 0.125 ** 4, abs=5e-10)


def test_temperature_gate_cells_weigh_experts_by_their_gate_mass():
  truth = gaussian_moe.truth("activation")  # τ = 0.1: an expert's gate mass is exp(β0 / τ)
  split = {k: jnp.concatenate([v[:1], v]) if v.ndim else v for k, v in truth.items()}
  split["beta0"] = split["beta0"].at[:2].add(-0.1 * np.log(2))  # two halves of the first true expert
  assert float(gaussian_moe.voronoi_loss("activation", split, cell_exponent=4.0)) == pytest.approx(0.0, abs=1e-6)
  heavier = {**split, "beta0": split["beta0"].at[0].add(0.1 * np.log(2))}  # cell mass 1.5 times the true one
  want = 0.5 * np.exp(-0.5 / 0.1)
  got = float(gaussian_moe.voronoi_loss("activation", heavier, cell_exponent=4.0))
  assert got == pytest.approx(want, rel=1e-3)


@pytest.mark.slow
def test_em_recovers_the_softmax_truth():
  x, y = gaussian_moe.sample("softmax", jax.random.PRNGKey(0), 4000)
  fitted = gaussian_moe.em("softmax", gaussian_moe.initial("softmax", jax.random.PRNGKey(1), 2), x, y,
                           jnp.int32(4000), iterations=30, gate_steps=2, chunk=1000)
  np.testing.assert_allclose(fitted["a"], [-20.0, 20.0], atol=0.5)
  np.testing.assert_allclose(fitted["nu"], [0.09, 0.16], atol=0.03)


def test_slope_is_the_log_log_fit():
  assert gaussian_moe.slope([100, 1000, 10000], [1.0, 10 ** -0.5, 0.1]) == pytest.approx(-0.5)


def test_gaussian_moe_micro_end_to_end(tmp_path):
  table = tables.get("gaussian_moe")
  text = common.reproduce(table, scale="micro", seeds=1, out=tmp_path, log=lambda _: None)
  out = tmp_path / "gaussian_moe"
  assert (out / "loglog.png").stat().st_size > 0 and "loglog.png" in text
  run = common.read_runs(out)[0]
  assert [h["step"] for h in run["history"]] == [100, 1000] and np.isfinite(run["metrics"]["slope"])
