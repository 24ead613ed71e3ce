"""Layers' auxiliary losses, metrics, noise stream and training step reach the trainer
(``gated_jax.layers.collections``): the objective, its gradient, accumulation invariance, eval metrics."""

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gated_jax.layers import MLPS
from gated_jax.layers.collections import noise_key, sow_aux_loss, sow_metric
from gated_jax.models import DecoderLM
from gated_jax.train import step

pytestmark = pytest.mark.usefixtures("fast_compile")


@MLPS.register("_test_aux_mlp")
class _AuxMLP(nn.Module):
  """A linear MLP that sows ``square`` = mean(y**2) as a loss, and as metrics the noise and step it saw."""
  d_model: int
  hidden_dim: int
  uses_train_step: ClassVar[bool] = True

  @nn.compact
  def __call__(self, x, train_step=None):
    y = nn.Dense(self.d_model, use_bias=False)(x)
    sow_aux_loss(self, "square", jnp.mean(jnp.square(y)))
    key = noise_key(self)
    sow_metric(self, "noisy", 0.0 if key is None else 1.0)
    sow_metric(self, "seen_step", -1.0 if train_step is None else train_step)
    return y


def _fns(weight, grad_accum=1):
  model = DecoderLM(vocab_size=32, d_model=16, num_layers=2, num_heads=2, mixer="gated_attention", mlp="_test_aux_mlp",
                    mlp_hidden_dim=16, max_len=8)
  tx = optax.sgd(0.1)
  return step.StepFns(model, tx, optax.constant_schedule(0.1), grad_accum,
                      aux_loss_weights=() if weight is None else (("square", weight),))


def _state_and_batch(fns):
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 8), 0, 32)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": jnp.ones((4, 8))}
  init = step.unboxed(step.boxed_state_fn(fns.model, fns.tx, jax.ShapeDtypeStruct((1, 8), jnp.int32)))
  state = init(jax.random.PRNGKey(0))
  return {**state, "step": jnp.asarray(7, jnp.int32)}, batch


def test_weighted_aux_loss_joins_the_gradient_and_is_logged_unweighted():
  fns0, fns1 = _fns(0.0), _fns(2.5)
  state, batch = _state_and_batch(fns0)
  new0, m0 = jax.jit(fns0.train_step)(state, batch)
  new1, m1 = jax.jit(fns1.train_step)(state, batch)
  assert m0["aux/square"] == pytest.approx(float(m1["aux/square"]))
  assert m0["aux/square"] > 0 and m0["loss"] == pytest.approx(float(m1["loss"]))

  def square_sum(params):  # the sown losses of both layers, summed, through the model
    _, sown = fns0.model.apply({"params": params}, batch["inputs"], mutable=["aux_loss"])
    return sum(jnp.sum(jnp.stack(v)) for v in jax.tree.leaves(sown, is_leaf=lambda x: isinstance(x, tuple)))
  grad_aux = jax.grad(square_sum)(state["params"])
  # sgd(0.1): new1 - new0 = -0.1 * 2.5 * grad(aux)
  delta = jax.tree.map(lambda a, b: a - b, new1["params"], new0["params"])
  expected = jax.tree.map(lambda g: -0.1 * 2.5 * g, grad_aux)
  for d, e in zip(jax.tree.leaves(delta), jax.tree.leaves(expected)):
    np.testing.assert_allclose(d, e, rtol=2e-4, atol=1e-7)


def test_metrics_see_noise_and_step_in_training_but_not_in_eval():
  fns = _fns(1.0)
  state, batch = _state_and_batch(fns)
  _, m = jax.jit(fns.train_step)(state, batch)
  assert m["noisy"] == 1.0 and m["seen_step"] == 7.0
  assert m["layer_0/mlp/seen_step"] == 7.0 and "layer_1/mlp/noisy" in m
  sums = jax.jit(fns.eval_step)(state["params"], batch)
  assert sums["noisy_sum"] == 0.0 and sums["seen_step_sum"] == -1.0 * float(sums["weight_sum"])


def test_gradient_accumulation_keeps_the_token_weighted_objective():
  one, two = _fns(1.0), _fns(1.0, grad_accum=2)
  state, batch = _state_and_batch(one)
  new1, m1 = jax.jit(one.train_step)(state, batch)
  new2, m2 = jax.jit(two.train_step)(state, batch)
  assert m2["aux/square"] == pytest.approx(float(m1["aux/square"]), rel=1e-5)
  for a, b in zip(jax.tree.leaves(new1["params"]), jax.tree.leaves(new2["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_sown_loss_without_a_weight_is_an_error():
  fns = _fns(None)
  state, batch = _state_and_batch(fns)
  with pytest.raises(ValueError, match=r"aux_loss_weights.*\['square'\]"):
    jax.jit(fns.train_step)(state, batch)


def test_moe_lm_logs_each_layers_aux_losses_and_their_sum():
  model = DecoderLM(vocab_size=32, d_model=16, num_layers=2, num_heads=2, mixer="base_conv", mlp="moe",  # cheap
                    mlp_hidden_dim=8, max_len=8, mlp_kwargs={"num_experts": 4, "k": 2, "dispatch": "capacity"})
  fns = step.StepFns(model, optax.sgd(0.1), optax.constant_schedule(0.1),
                     aux_loss_weights=(("load_balance", 1e-2), ("router_z", 1e-3)))
  state, batch = _state_and_batch(fns)
  _, m = jax.jit(fns.train_step)(state, batch)
  for name in ("load_balance", "router_z"):
    layers = [float(m[f"aux/layer_{i}/mlp/{name}"]) for i in range(2)]
    assert layers[0] != layers[1] and all(v > 0 for v in layers)
    assert float(m[f"aux/{name}"]) == pytest.approx(sum(layers), rel=1e-6)
  assert {k for k in m if k.startswith("aux/")} == {f"aux/{p}{n}" for n in ("load_balance", "router_z")
                                                      for p in ("", "layer_0/mlp/", "layer_1/mlp/")}
