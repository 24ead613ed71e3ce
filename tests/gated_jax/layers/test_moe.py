"""The MoE layer (``MLPS["moe"]``): dropless, capacity (with capacity >= T·k) and a loop-over-experts oracle
agree in outputs and gradients; hand-built capacity cases drop the expected slots; the balance loss and z-loss
match their definitions; routing stays float32 under bfloat16; every causal router is causal; MoDES skipping;
bad arguments."""

from __future__ import annotations

import pathlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gated_jax.layers import MLPS, ROUTERS
from gated_jax.layers.collections import AUX_LOSS, LAYER_METRICS
from gated_jax.layers.moe import dispatch, losses

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import _moe_oracle as oracle  # noqa: E402  pylint: disable=wrong-import-position

pytestmark = pytest.mark.usefixtures("fast_compile")

B, T, D, H, E, K = 2, 7, 8, 12, 4, 2


def _x(seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(seed), (B, T, D)).astype(dtype)


def _moe(**kwargs):
  return MLPS.get("moe")(**{"d_model": D, "hidden_dim": H, "num_experts": E, "k": K, **kwargs})


def _init(moe, x):
  params = nn.meta.unbox(moe.init(jax.random.PRNGKey(1), x)["params"])
  # larger router weights than the 0.02 init, so routing is far from uniform and ties
  return {**params, "router": jax.tree.map(lambda p: p * 50.0, params["router"])}


def _value_and_grads(fn, params, x):
  def objective(params, x):
    y = fn(params, x).astype(jnp.float32)
    return jnp.sum(y * jnp.cos(y)), y
  (_, y), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(params, x)
  return y, grads


ORACLE_CASES = [
    ("topk_softmax", {"renormalize": True}, 1),
    pytest.param("top_p", {"p": 0.5}, 0, marks=pytest.mark.slow),
    pytest.param("expert_choice", {"allow_noncausal": True}, 0, marks=pytest.mark.slow),
    pytest.param("sigmoid", {}, 0, marks=pytest.mark.slow),
    pytest.param("laplace", {}, 0, marks=pytest.mark.slow),
    pytest.param("adaptive", {"threshold": 0.3}, 0, marks=pytest.mark.slow),
    pytest.param("activation_dts", {"tau_end": 0.5}, 0, marks=pytest.mark.slow),
    pytest.param("hash", {}, 0, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("router,router_kwargs,shared", ORACLE_CASES)
def test_dropless_capacity_and_loop_oracle_agree(router, router_kwargs, shared):
  x = _x()
  common = dict(router=router, router_kwargs=router_kwargs, num_shared_experts=shared)
  dropless, capacity = _moe(**common), _moe(dispatch="capacity", capacity_factor=float(E), **common)
  params = _init(dropless, x)

  def loop(params, x):
    routing = oracle.routing_of(params, x, router=router, num_experts=E, k=K, router_kwargs=router_kwargs)
    return oracle.loop_moe(params, x, routing, num_shared_experts=shared, hidden_dim=H)

  want_y, want_g = _value_and_grads(loop, params, x)
  for moe in (dropless, capacity):
    got_y, got_g = _value_and_grads(lambda p, x: moe.apply({"params": p}, x), params, x)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)
    for g, w in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("priority,kept", [
    ("token_order", [[1, 1], [1, 1], [0, 0], [0, 0]]),  # expert 0: t0 t1 | expert 1: t0 t1
    ("top1_first", [[1, 1], [1, 0], [0, 0], [1, 0]]),  # first choices first: expert 1 takes t3 before t0's 2nd
])
def test_capacity_drops_the_expected_slots(priority, kept):
  indices = jnp.array([[[0, 1], [0, 1], [0, 1], [1, 0]]], jnp.int32)  # (1, 4, 2), E = 2, capacity 2
  weights = jnp.array([[[0.6, 0.4], [0.7, 0.3], [0.5, 0.5], [0.9, 0.1]]])
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(ks[0], (1, 4, D))
  experts = dispatch.Experts(jax.random.normal(ks[1], (2, D, H)), jax.random.normal(ks[2], (2, D, H)),
                             jax.random.normal(ks[3], (2, H, D)), jax.nn.silu)
  y, dropped = jax.jit(lambda *a: dispatch.capacity(*a, capacity=2, priority=priority))(x, weights, indices, experts)
  outputs = jnp.stack([oracle.glu(x, experts.wi[e], experts.wi_up[e], experts.wo[e]) for e in range(2)])
  want = jnp.zeros_like(x)
  for t in range(4):
    for s in range(2):
      want = want.at[0, t].add(kept[t][s] * weights[0, t, s] * outputs[indices[0, t, s], 0, t])
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  assert float(dropped) == pytest.approx(1 - np.sum(kept) / 8)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_uniform_router_balance_loss_is_exactly_one(k):
  indices = jax.random.randint(jax.random.PRNGKey(k), (3, 5, k), 0, 8)
  assert float(losses.load_balance(jnp.full((3, 5, 8), 1 / 8), indices)) == pytest.approx(1.0, abs=1e-6)


def test_collapsed_router_balance_loss_is_num_experts_and_only_probs_have_gradient():
  probs = jax.nn.one_hot(jnp.zeros((4, 6), jnp.int32), 8)
  assert float(losses.load_balance(probs, jnp.zeros((4, 6, 1), jnp.int32))) == pytest.approx(8.0)
  indices = jax.random.randint(jax.random.PRNGKey(0), (4, 6, 2), 0, 8)
  grad = jax.grad(losses.load_balance)(jnp.full((4, 6, 8), 1 / 8), indices)
  fraction = np.bincount(np.asarray(indices).ravel(), minlength=8) / indices.size
  np.testing.assert_allclose(grad, np.broadcast_to(8 * fraction / 24, (4, 6, 8)), rtol=1e-6)


def test_z_loss_closed_form():
  logits = jnp.broadcast_to(jnp.arange(3.0)[:, None, None], (3, 2, 8))  # token value c on every expert
  want = np.mean([(c + np.log(8)) ** 2 for c in range(3)])
  assert float(losses.z_loss(logits)) == pytest.approx(want, rel=1e-6)


def test_routing_is_float32_under_bfloat16():
  """Logits differing by less than bf16 resolution: the router selects as float32 math does."""
  x = jnp.ones((1, 1, D), jnp.bfloat16)
  kernel = jnp.zeros((D, E)).at[:, 1].set(1.0).at[:, 2].set(1.0).at[0, 2].add(1e-3)
  routing = ROUTERS.get("topk_softmax")(num_experts=E, k=1).apply({"params": {"kernel": kernel}}, x)
  assert routing.logits.dtype == routing.weights.dtype == jnp.float32
  assert int(routing.indices[0, 0, 0]) == 2  # in bf16, 8 + 1e-3 rounds to 8: a tie resolved to expert 1
  moe = _moe(dtype=jnp.bfloat16)
  y = moe.apply(moe.init(jax.random.PRNGKey(0), _x(dtype=jnp.bfloat16)), _x(dtype=jnp.bfloat16))
  assert y.dtype == jnp.bfloat16


_DEFAULT_CAUSAL = ("noisy_topk", "sigmoid", "dts", "top_p")  # the rest (per-token routers too) under slow
CAUSAL = [(name, {}) if name in _DEFAULT_CAUSAL else pytest.param(name, {}, marks=pytest.mark.slow)
          for name in ROUTERS.names() if name != "expert_choice"] + [
              ("topk_softmax", {"dispatch": "capacity", "capacity_factor": 0.5})]


@pytest.mark.parametrize("router,extra", CAUSAL)
def test_causal_routers_leave_earlier_outputs_unchanged(router, extra):
  x = _x()
  x = x.at[1].set(x[0]).at[1, 4:].set(-3.0 * x[0, 4:])  # row 1: row 0 with tokens 4.. changed
  y, _ = _moe(router=router, **extra).init_with_output(jax.random.PRNGKey(2), x)
  np.testing.assert_allclose(y[1, :4], y[0, :4], rtol=1e-6, atol=1e-6)
  assert not np.allclose(y[1, 4:], y[0, 4:])


def test_expert_choice_is_refused_when_causal():
  with pytest.raises(ValueError, match="expert_choice.*future tokens"):
    _moe(router="expert_choice").init(jax.random.PRNGKey(0), _x())


@pytest.mark.slow
def test_expert_choice_leaks_the_future_when_allowed():
  x = _x()
  x = x.at[1].set(x[0]).at[1, 4:].set(-3.0 * x[0, 4:])
  moe = _moe(router="expert_choice", router_kwargs={"allow_noncausal": True})
  y, _ = moe.init_with_output(jax.random.PRNGKey(2), x)
  assert not np.allclose(y[1, :4], y[0, :4], atol=1e-6)


def test_modes_skipping_only_outside_training():
  x = _x()
  moe, full = _moe(skip_threshold=0.3), _moe()
  params = _init(full, x)
  routing = oracle.routing_of(params, x, router="topk_softmax", num_experts=E, k=K)
  expected_skipped = float(jnp.mean(routing.weights < 0.3))
  assert 0 < expected_skipped < 1
  y, sown = moe.apply({"params": params}, x, mutable=[LAYER_METRICS])
  assert float(sown[LAYER_METRICS]["skipped_fraction"][0]) == pytest.approx(expected_skipped)
  kept = routing.replace(weights=jnp.where(routing.weights < 0.3, 0.0, routing.weights))
  np.testing.assert_allclose(y, oracle.loop_moe(params, x, kept), rtol=1e-5, atol=1e-5)
  y_train, sown = moe.apply({"params": params}, x, train_step=jnp.int32(3), mutable=[LAYER_METRICS])
  assert "skipped_fraction" not in sown[LAYER_METRICS]
  np.testing.assert_allclose(y_train, full.apply({"params": params}, x), rtol=1e-6)


def test_sown_losses_and_metrics():
  moe = _moe(router="noisy_topk", dispatch="capacity", capacity_factor=0.5)
  _, sown = moe.init_with_output(jax.random.PRNGKey(0), _x(), mutable=["params", AUX_LOSS, LAYER_METRICS])
  assert set(sown[AUX_LOSS]) == {"load_balance", "router_z", "importance", "load"}
  assert set(sown[LAYER_METRICS]) == {"load_cv", "load_max_over_mean", "dropped_fraction", "router_entropy",
                                      "active_experts"}
  assert 0 < float(sown[LAYER_METRICS]["dropped_fraction"][0]) < 1


@pytest.mark.parametrize("kwargs,match", [
    ({"router": "nope"}, "router: got 'nope'; known: activation_dts, adaptive"),
    ({"dispatch": "dense"}, "dispatch: got 'dense'"),
    ({"k": 5}, "k: got 5; allowed: 1 to 4"),
    ({"router": "noisy_topk", "k": 4}, "k: got 4; allowed: 1 to 3"),
    ({"dispatch": "capacity", "priority": "top1_first"}, "priority: got 'top1_first' with causal=True"),
    ({"capacity_factor": 0.0}, "capacity_factor: got 0.0"),
    ({"num_shared_experts": -1}, "num_shared_experts: got -1"),
    ({"d_model": 9}, r"x_BTD: got shape \(2, 7, 8\)"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _moe(**kwargs).init(jax.random.PRNGKey(0), _x())
