"""Expert parallelism against one device, run in a subprocess with ``JAX_NUM_CPU_DEVICES=4`` by
``test_moe_parallel.py``: the MoE layer (outputs and gradients) and one training step of an MoE LM (loss and
updated parameters, the loss-free-balancing bias included) on meshes with ``expert`` = 2 and 4.

    python tests/gated_jax/layers/_moe_ep.py [--full]

The default run checks the dropless layer on 2 and 4 devices and the training step on 4; ``--full`` adds the
capacity layer and the training step on 2. Prints ``RESULT {json}`` with the largest absolute differences, the
expert weights' sharding and the collectives in the lowered dropless layer."""

from __future__ import annotations

import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gated_jax.layers import MLPS
from gated_jax.layers.moe import DEFAULT_AUX_LOSS_WEIGHTS
from gated_jax.models import DecoderLM
from gated_jax.train import sharding, step

jax.config.update("jax_disable_most_optimizations", True)


def _max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _placed(boxed_abstract, tree, mesh):
  return jax.device_put(tree, sharding.logical_shardings(boxed_abstract, mesh))


def layer_results(dispatch: str, meshes: tuple[int, ...]) -> dict:
  moe = MLPS.get("moe")(d_model=16, hidden_dim=8, num_experts=4, k=2, dispatch=dispatch, capacity_factor=4.0,
                        router_kwargs={})
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 6, 16))
  boxed = jax.eval_shape(moe.init, jax.random.PRNGKey(1), x)["params"]
  params = nn.meta.unbox(jax.jit(moe.init)(jax.random.PRNGKey(1), x)["params"])

  def objective(p, x):
    y = moe.apply({"params": p}, x)
    return jnp.sum(y * jnp.cos(y)), y

  fn = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))
  (_, want_y), want_g = fn(params, x)
  out = {}
  for shards in meshes:
    mesh = sharding.make_mesh({"expert": shards}, jax.devices()[:shards])
    with jax.set_mesh(mesh):
      args = (_placed(boxed, params, mesh), jax.device_put(x, sharding.batch_sharding(mesh)))
      lowered = fn.lower(*args)
      (_, y), g = lowered.compile()(*args)
      text = lowered.as_text()
    out[str(shards)] = {"y": _max_diff(y, want_y), "grads": _max_diff(g, want_g),
                        "wi_spec": str(args[0]["wi"].sharding.spec),
                        "collectives": sorted(c for c in ("all_gather", "reduce_scatter", "all_to_all") if c in text)}
  return out


def train_step_results(meshes: tuple[int, ...]) -> dict:
  model = DecoderLM(vocab_size=32, d_model=16, num_layers=1, num_heads=2, mixer="linear_attention", mlp="moe",
                    mlp_hidden_dim=8, max_len=8, mlp_kwargs={"num_experts": 4, "k": 2, "router": "sigmoid",
                                                             "router_kwargs": {"balance_rate": 0.01}})
  fns = step.StepFns(model, optax.sgd(0.5), optax.constant_schedule(0.5),
                     aux_loss_weights=tuple(sorted(DEFAULT_AUX_LOSS_WEIGHTS.items())))
  boxed_init = step.boxed_state_fn(model, fns.tx, jax.ShapeDtypeStruct((1, 8), jnp.int32))
  boxed = jax.eval_shape(boxed_init, jax.random.PRNGKey(0))
  state = jax.jit(step.unboxed(boxed_init))(jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (8, 8), 0, 32)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": jnp.ones((8, 8))}
  train = jax.jit(fns.train_step)
  want_state, want_metrics = train(state, batch)
  out = {"bias_moved": bool(np.any(np.asarray(want_state["params"]["layer_0"]["mlp"]["router"]["selection_bias"])))}
  for shards in meshes:
    mesh = sharding.make_mesh({"expert": shards}, jax.devices()[:shards])
    with jax.set_mesh(mesh):
      placed = _placed(boxed, state, mesh)
      got_state, got_metrics = train(placed, jax.device_put(batch, sharding.batch_sharding(mesh)))
    out[str(shards)] = {"loss": abs(float(got_metrics["loss"]) - float(want_metrics["loss"])),
                        "load_balance": abs(float(got_metrics["aux/load_balance"])
                                            - float(want_metrics["aux/load_balance"])),
                        "params": _max_diff(got_state["params"], want_state["params"])}
  return out


def main(full: bool) -> dict:
  results = {"dropless": layer_results("dropless", (2, 4)), "train_step": train_step_results((2, 4) if full else (4,))}
  if full:
    results["capacity"] = layer_results("capacity", (2, 4))
  return results


if __name__ == "__main__":
  print("RESULT " + json.dumps(main("--full" in sys.argv[1:])))
