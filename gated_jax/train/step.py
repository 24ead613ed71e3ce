"""The jitted pieces of training: the model from the config, state initialisation, train and eval steps.

The train state is a plain dict ``{"step": int32 (), "params": ..., "opt_state": ..., "rng": uint32 (2,)}``
so orbax saves it as one pytree. The loss is token cross-entropy weighted by the batch's ``weights`` and
normalised by their sum over the *whole* global batch, so one step gives the same gradient whatever the
mesh, the number of gradient-accumulation microbatches or the pmap device count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gated_jax.models import DecoderLM, lm_from_config

COMPUTE_DTYPES = ("float32", "bfloat16")
PMAP_AXIS = "batch"
_MODEL_INPUTS = ("segment_ids", "positions")

State = dict[str, Any]
Batch = dict[str, jax.Array]


def make_model(config: Any) -> DecoderLM:
  """``config.model`` as a DecoderLM computing in ``config.train.compute_dtype`` (parameters stay float32)."""
  dtype = config.train.compute_dtype
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f"train.compute_dtype: got {dtype!r}; allowed: {', '.join(COMPUTE_DTYPES)}")
  return lm_from_config({**config.model.to_dict(), "dtype": dtype})


def _apply(model: DecoderLM, params: Any, batch: Batch, **kwargs) -> Any:
  extra = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
  return model.apply({"params": params}, batch["inputs"], **extra, **kwargs)


def weighted_sums(logits_BTV: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(sum w * cross-entropy, sum w * correct, sum w)`` over the batch, in float32."""
  w = batch["weights"].astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), batch["targets"])
  correct = (jnp.argmax(logits_BTV, axis=-1) == batch["targets"]).astype(jnp.float32)
  return jnp.sum(ce * w), jnp.sum(correct * w), jnp.sum(w)


def boxed_state_fn(model: DecoderLM, tx: optax.GradientTransformation, example_BT: jax.ShapeDtypeStruct
                   ) -> Callable[[jax.Array], State]:
  """``rng -> state`` with logically partitioned (boxed) parameters and optimizer state, for
  ``jax.eval_shape`` (sharding specs) and, unboxed, for ``jax.jit(..., out_shardings=...)``."""
  def init(rng: jax.Array) -> State:
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng, jnp.zeros(example_BT.shape, example_BT.dtype))["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params), "rng": state_rng}
  return init


def unboxed(fn: Callable[..., Any]) -> Callable[..., Any]:
  return lambda *args: nn.meta.unbox(fn(*args))


@dataclasses.dataclass(frozen=True)
class StepFns:
  """Builds the un-jitted train and eval steps.

  Attributes:
    model: the LM.
    tx: the optimizer.
    schedule: learning rate as a function of the step (logged).
    grad_accum: microbatches per step (the local batch is split into this many, scanned).
    pmap: True inside ``jax.pmap(axis_name=PMAP_AXIS)``: sums are ``psum``-ed over devices.
  """
  model: DecoderLM
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  grad_accum: int = 1
  pmap: bool = False

  def _reduce(self, tree: Any) -> Any:
    return jax.lax.psum(tree, PMAP_AXIS) if self.pmap else tree

  def _sums_and_grads(self, params: Any, batch: Batch) -> tuple[tuple[jax.Array, ...], Any]:
    def loss_sum(p, mb):
      loss, correct, weight = weighted_sums(_apply(self.model, p, mb), mb)
      return loss, (correct, weight)
    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
    if self.grad_accum == 1:
      (loss, (correct, weight)), grads = grad_fn(params, batch)
      return (loss, correct, weight), grads

    def micro(i):  # microbatch i: rows i, i + n, i + 2n, ... (keeps each shard's rows on its device)
      return jax.tree.map(lambda x: x.reshape(-1, self.grad_accum, *x.shape[1:])[:, i], batch)

    def body(carry, i):
      sums, grads = carry
      (loss, (correct, weight)), g = grad_fn(params, micro(i))
      return (jax.tree.map(jnp.add, sums, (loss, correct, weight)), jax.tree.map(jnp.add, grads, g)), None
    zeros = (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()))
    (sums, grads), _ = jax.lax.scan(body, (zeros, jax.tree.map(jnp.zeros_like, params)),
                                    jnp.arange(self.grad_accum))
    return sums, grads

  def train_step(self, state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer step on the global batch; metrics ``loss``, ``accuracy``, ``grad_norm``, ``lr``, ``finite``."""
    (loss, correct, weight), grads = self._reduce(self._sums_and_grads(state["params"], batch))
    denom = jnp.maximum(weight, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    loss = loss / denom
    grad_norm = optax.tree.norm(grads)
    metrics = {"loss": loss, "accuracy": correct / denom, "grad_norm": grad_norm,
               "lr": self.schedule(state["step"]), "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm)}
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}
    return new_state, metrics

  def eval_step(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
    """Weighted sums ``loss_sum``, ``correct_sum``, ``weight_sum`` of one eval batch."""
    loss, correct, weight = self._reduce(weighted_sums(_apply(self.model, params, batch), batch))
    return {"loss_sum": loss, "correct_sum": correct, "weight_sum": weight}

  def intermediates(self, params: Any, batch: Batch) -> Any:
    """The ``"intermediates"`` the model sows on ``batch`` (attention sinks, gate scores, activations)."""
    _, state = _apply(self.model, params, batch, mutable=["intermediates"])
    return state["intermediates"]
