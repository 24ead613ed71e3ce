"""The jitted pieces of training: the model from the config, state initialisation, train and eval steps.

The train state is a plain dict ``{"step": int32 (), "params": ..., "opt_state": ..., "rng": uint32 (2,)}``
so orbax saves it as one pytree. The loss is token cross-entropy weighted by the batch's ``weights`` and
normalised by their sum over the *whole* global batch, so one step gives the same gradient whatever the
mesh, the number of gradient-accumulation microbatches or the pmap device count.

Layers' auxiliary losses and metrics (``gated_jax.layers.collections``) ride along: each microbatch's sown
auxiliary losses, times ``aux_loss_weights[name]`` and times the microbatch's token weight, join the
cross-entropy sum, so the total stays a token-weighted mean over the global batch; sown metrics are averaged
the same way. Both are logged per layer too: ``aux/<path>/<name>`` beside the summed ``aux/<name>``, and
``<path>/<name>`` beside the mean ``<name>``. Training steps pass a per-step key of the ``NOISE_RNG`` stream
(folded with the step, the microbatch and, under pmap, the device) and the step number; evaluation passes
neither. Parameter updates that layers sow (``sow_param_update``) are averaged like the metrics and added to
their parameters after the optimizer step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gated_jax.layers.collections import AUX_LOSS, LAYER_METRICS, NOISE_RNG, PARAM_UPDATES
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


def _by_name(sown: Any, *, reduce: Callable[[jax.Array], jax.Array]
             ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """Sown scalars (nested by module path, a tuple per call) -> (``name`` reduced over layers by ``reduce``:
  ``jnp.sum`` for losses, ``jnp.mean`` for metrics; ``path/name`` per layer)."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(sown), sep="/")
  grouped: dict[str, list[jax.Array]] = {}
  per_layer: dict[str, jax.Array] = {}
  for path, calls in flat.items():
    per_layer[path] = jnp.mean(jnp.stack([jnp.asarray(c, jnp.float32) for c in calls]))
    grouped.setdefault(path.rsplit("/", 1)[-1], []).append(per_layer[path])
  return {name: reduce(jnp.stack(values)) for name, values in grouped.items()}, per_layer


def _summed_aux(metrics: dict[str, Any]) -> dict[str, Any]:
  """The ``aux/<name>`` entries of a metrics dict (summed over layers; not the per-layer ``aux/<path>/<name>``),
  keyed by ``name``."""
  return {k[4:]: v for k, v in metrics.items() if k.startswith("aux/") and "/" not in k[4:]}


def aux_loss_total(aux: dict[str, jax.Array], weights: dict[str, float]) -> jax.Array:
  """``sum_name weights[name] * aux[name]``; ValueError naming a sown loss that has no configured weight."""
  missing = sorted(set(aux) - set(weights))
  if missing:
    raise ValueError(f"train.aux_loss_weights: the model sows auxiliary losses {missing} that have no weight; "
                     f"configured: {dict(weights)} (set a weight, 0.0 to log a loss without training on it)")
  return sum((weights[name] * value for name, value in aux.items()), jnp.zeros((), jnp.float32))


def apply_param_updates(params: Any, updates: Any) -> Any:
  """``params`` with each sown update (nested like the parameters) added to the parameter at its path."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(updates), sep="/")
  paths = {"/".join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  unknown = sorted(set(flat) - paths)
  if unknown:
    raise ValueError(f"sow_param_update: no parameter at {unknown}; the name must be a parameter of the layer")
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p + flat["/".join(k.key for k in path)].astype(p.dtype)
      if "/".join(k.key for k in path) in flat else p, params)


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
  aux_loss_weights: tuple[tuple[str, float], ...] = ()

  def _reduce(self, tree: Any) -> Any:
    return jax.lax.psum(tree, PMAP_AXIS) if self.pmap else tree

  def _forward_sums(self, params: Any, batch: Batch, train: bool = False, **kwargs
                    ) -> tuple[jax.Array, dict[str, Any]]:
    """``(objective sum, sums)`` of one (micro)batch: cross-entropy plus weighted auxiliary losses, each times
    the token weight; ``sums`` holds ``loss``, ``correct``, ``weight`` and weight-times ``aux/<name>`` (summed
    over layers), ``aux/<path>/<name>`` (each layer), the metrics' ``name`` (mean over layers) and ``path/name``
    (and, in training, weight-times the sown parameter updates under ``PARAM_UPDATES``)."""
    collections = [AUX_LOSS, LAYER_METRICS] + ([PARAM_UPDATES] if train else [])
    logits, sown = _apply(self.model, params, batch, mutable=collections, **kwargs)
    loss, correct, weight = weighted_sums(logits, batch)
    aux, aux_per_layer = _by_name(sown.get(AUX_LOSS, {}), reduce=jnp.sum)
    objective = loss + weight * aux_loss_total(aux, dict(self.aux_loss_weights))
    metric_means, metric_per_layer = _by_name(sown.get(LAYER_METRICS, {}), reduce=jnp.mean)
    weighted = {**{f"aux/{k}": v for k, v in {**aux_per_layer, **aux}.items()}, **metric_per_layer,
                **metric_means}
    sums = {"loss": loss, "correct": correct, "weight": weight, **{k: weight * v for k, v in weighted.items()}}
    if train:
      sums[PARAM_UPDATES] = jax.tree.map(lambda calls: weight * jnp.mean(jnp.stack(calls), axis=0),
                                         sown.get(PARAM_UPDATES, {}), is_leaf=lambda x: isinstance(x, tuple))
    return objective, sums

  def _sums_and_grads(self, params: Any, batch: Batch, key: jax.Array, train_step: jax.Array
                      ) -> tuple[dict[str, jax.Array], Any]:
    def objective(p, mb, i):
      return self._forward_sums(p, mb, True, rngs={NOISE_RNG: jax.random.fold_in(key, i)}, train_step=train_step)
    grad_fn = jax.grad(objective, has_aux=True)
    if self.grad_accum == 1:
      grads, sums = grad_fn(params, batch, 0)
      return sums, grads

    def micro(i):  # microbatch i: rows i, i + n, i + 2n, ... (keeps each shard's rows on its device)
      return jax.tree.map(lambda x: x.reshape(-1, self.grad_accum, *x.shape[1:])[:, i], batch)

    def body(carry, i):
      g, sums = grad_fn(params, micro(i), i)
      return jax.tree.map(jnp.add, carry, (sums, g)), None
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, micro(0), 0)[::-1])
    (sums, grads), _ = jax.lax.scan(body, zeros, jnp.arange(self.grad_accum))
    return sums, grads

  def _step_key(self, state: State) -> jax.Array:
    key = jax.random.fold_in(state["rng"], state["step"])
    return jax.random.fold_in(key, jax.lax.axis_index(PMAP_AXIS)) if self.pmap else key

  def train_step(self, state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
    """One optimizer step on the global batch; metrics ``loss`` (cross-entropy), ``accuracy``, ``grad_norm``,
    ``lr``, ``finite``, plus ``aux/<name>`` (unweighted, summed over layers: what the objective adds),
    ``aux/<path>/<name>`` per layer (e.g. ``aux/layer_1/mlp/load_balance``) and the layers' sown metrics."""
    sums, grads = self._reduce(self._sums_and_grads(state["params"], batch, self._step_key(state), state["step"]))
    denom = jnp.maximum(sums.pop("weight"), 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    params = apply_param_updates(params, jax.tree.map(lambda u: u / denom, sums.pop(PARAM_UPDATES)))
    grad_norm = optax.tree.norm(grads)
    metrics = {k: v / denom for k, v in sums.items()}
    metrics["accuracy"] = metrics.pop("correct")
    total = metrics["loss"] + aux_loss_total(_summed_aux(metrics), dict(self.aux_loss_weights))
    metrics.update(grad_norm=grad_norm, lr=self.schedule(state["step"]),
                   finite=jnp.isfinite(total) & jnp.isfinite(grad_norm))
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "rng": state["rng"]}
    return new_state, metrics

  def eval_step(self, params: Any, batch: Batch) -> dict[str, jax.Array]:
    """Weighted sums of one eval batch: ``loss_sum``, ``correct_sum``, ``weight_sum`` and, for each sown
    metric, ``<name>_sum`` (metric times token weight)."""
    _, sums = self._forward_sums(params, batch)
    sums = self._reduce(sums)
    return {"loss_sum": sums.pop("loss"), "correct_sum": sums.pop("correct"), "weight_sum": sums.pop("weight"),
            **{f"{k}_sum": v for k, v in sums.items()}}

  def intermediates(self, params: Any, batch: Batch) -> Any:
    """The ``"intermediates"`` the model sows on ``batch`` (attention sinks, gate scores, activations)."""
    _, state = _apply(self.model, params, batch, mutable=["intermediates"])
    return state["intermediates"]
