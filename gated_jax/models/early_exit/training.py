"""Training a ``MultiExitClassifier``: the warm-up and JEI-DNN's bi-level exit/inference training.

JEI-DNN (Regol, Chataoui & Coates, arXiv 2310.09163; the authors' ``train_dynn.py``) trains the IMs and
the gates of a frozen backbone in alternating phases (200 batches each in their runs):

* **warm-up** (:func:`summed_exit_loss`): every IM with the plain sum of its cross-entropy, ``Σ_l CE_l``
  (BranchyNet's joint loss with unit weights, arXiv 1709.01686). Here the backbone has no pretrained
  weights, so the warm-up also trains the backbone;
* **(a) IMs** (:func:`weighted_exit_loss`, gates frozen): ``Σ_l P_l CE_l`` with ``P`` the exit distribution of
  the current gates, rescaled per example by ``Σ_l CE_l / Σ_l P_l CE_l`` so that every example weighs as much
  as in the warm-up — each IM is trained mostly on the examples that leave through it. The weights and the
  rescaling factor are constants (stop-gradient). The authors' code leaves the factor differentiable, which
  makes each example's loss exactly ``Σ_l CE_l`` again and the weighting a no-op for the gradient; we follow
  the paper's intent;
* **(b) gates** (:func:`gate_loss`, IMs frozen): the oracle exit ``l* = argmin_l (CE_l + λ C_l)`` (``λ`` the
  accuracy–cost trade-off, the code's ``ce_ic_tradeoff``: default 0.7, the README example 0.15), targets
  ``1[l* ≤ l]`` for each gated exit ``l``, and binary cross-entropy with the positives of gate ``l`` weighted by
  ``#negatives / #positives`` of the batch, capped at 5 (the authors' class balancing, which they estimate on
  a validation set; per batch here).

Optimisers come from optax: :func:`group_optimizer` applies one to the named parameter groups (``backbone``,
``ims``, ``gates``) and ``optax.set_to_zero`` to the rest, so each phase updates only its own parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gated_jax.models.early_exit.model import MultiExitClassifier
from gated_jax.models.early_exit.policies import exit_distribution

GROUPS = ("backbone", "ims", "gates")
MAX_POSITIVE_WEIGHT = 5.0
Step = Callable[..., tuple[Any, Any, jax.Array]]


def per_exit_ce(logits_LBC: jax.Array, labels_B: jax.Array) -> jax.Array:
  """``(L, B)`` cross-entropy of every exit."""
  if labels_B.shape != logits_LBC.shape[1:2]:
    raise ValueError(f"labels_B: got shape {tuple(labels_B.shape)}; allowed: ({logits_LBC.shape[1]},), the batch "
                     "of logits_LBC")
  return jax.vmap(optax.softmax_cross_entropy_with_integer_labels, in_axes=(0, None))(logits_LBC, labels_B)


def summed_exit_loss(logits_LBC: jax.Array, labels_B: jax.Array) -> jax.Array:
  """Warm-up loss: batch mean of ``Σ_l CE_l``."""
  return per_exit_ce(logits_LBC, labels_B).sum(0).mean()


def weighted_exit_loss(logits_LBC: jax.Array, labels_B: jax.Array, exit_probs_LB: jax.Array) -> jax.Array:
  """Phase (a): batch mean of ``r Σ_l P_l CE_l``, ``r = Σ_l CE_l / Σ_l P_l CE_l``; ``P`` and ``r`` constant."""
  ce_LB = per_exit_ce(logits_LBC, labels_B)
  if exit_probs_LB.shape != ce_LB.shape:
    raise ValueError(f"exit_probs_LB: got shape {tuple(exit_probs_LB.shape)}; allowed: {tuple(ce_LB.shape)} "
                     "(exits, batch)")
  weights_LB = jax.lax.stop_gradient(exit_probs_LB)
  weighted_LB = weights_LB * ce_LB
  rescale_B = jax.lax.stop_gradient(ce_LB.sum(0) / jnp.maximum(weighted_LB.sum(0), 1e-12))
  return (rescale_B * weighted_LB.sum(0)).mean()


def check_tradeoff(tradeoff: float) -> None:
  if isinstance(tradeoff, bool) or not isinstance(tradeoff, (int, float)) or not 0 <= tradeoff < math.inf:
    raise ValueError(f"tradeoff: got {tradeoff!r}; allowed: a finite number >= 0 (lambda of CE_l + lambda C_l)")


def oracle_exits(ce_LB: jax.Array, costs_L, tradeoff: float) -> jax.Array:
  """``l* = argmin_l (CE_l + λ C_l)`` per example (first on ties), ``(B,)``."""
  check_tradeoff(tradeoff)
  if jnp.shape(costs_L) != ce_LB.shape[:1]:
    raise ValueError(f"costs_L: got shape {jnp.shape(costs_L)}; allowed: ({ce_LB.shape[0]},), one per exit")
  return jnp.argmin(ce_LB + tradeoff * jnp.asarray(costs_L, ce_LB.dtype)[:, None], axis=0)


def gate_targets(oracle_B: jax.Array, num_gates: int) -> jax.Array:
  """``(num_gates, B)`` float targets ``1[l* ≤ l]``: exit at ``l*`` or at any gate after it."""
  return (oracle_B[None, :] <= jnp.arange(num_gates)[:, None]).astype(jnp.float32)


def balanced_bce(gate_logits_GB: jax.Array, targets_GB: jax.Array) -> jax.Array:
  """Mean binary cross-entropy, positives of each gate weighted by its ``#neg / #pos`` (capped at 5)."""
  positives = targets_GB.sum(1, keepdims=True)
  weight = jnp.minimum((targets_GB.shape[1] - positives) / jnp.maximum(positives, 1.0), MAX_POSITIVE_WEIGHT)
  weights_GB = jnp.where(targets_GB > 0, weight, 1.0)
  return (weights_GB * optax.sigmoid_binary_cross_entropy(gate_logits_GB, targets_GB)).mean()


def gate_loss(logits_LBC: jax.Array, gate_logits_GB: jax.Array, labels_B: jax.Array, costs_L,
              tradeoff: float) -> jax.Array:
  """Phase (b): class-balanced BCE of the gates toward ``1[l* ≤ l]`` (the IMs' CE is a constant here)."""
  ce_LB = per_exit_ce(jax.lax.stop_gradient(logits_LBC), labels_B)
  return balanced_bce(gate_logits_GB, gate_targets(oracle_exits(ce_LB, costs_L, tradeoff), gate_logits_GB.shape[0]))


def param_groups(params: Any) -> Any:
  """The same tree with each leaf labelled ``backbone``, ``ims`` or ``gates`` (by its top-level name)."""
  def group(name: str) -> str:
    label = "ims" if name.startswith("ims_") else name
    if label not in GROUPS:
      raise ValueError(f"params: top-level entry {name!r} is not part of a MultiExitClassifier; allowed: backbone, "
                       "ims_<l>, gates")
    return label
  return {name: jax.tree.map(lambda _, g=group(name): g, sub) for name, sub in params.items()}


def group_optimizer(tx: optax.GradientTransformation, train: Collection[str]) -> optax.GradientTransformation:
  """``tx`` on the parameter groups in ``train``, zero updates on the others."""
  unknown = sorted(set(train) - set(GROUPS))
  if not train or unknown:
    raise ValueError(f"train: got {sorted(train)!r}; allowed: a non-empty subset of {', '.join(GROUPS)}")
  return optax.multi_transform({g: tx if g in train else optax.set_to_zero() for g in GROUPS}, param_groups)


def _step(loss_fn: Callable[..., jax.Array], tx: optax.GradientTransformation) -> Step:
  @jax.jit
  def step(params, opt_state, *batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return step


def warmup_step(model: MultiExitClassifier, tx: optax.GradientTransformation) -> Step:
  """``step(params, opt_state, images, labels) -> (params, opt_state, loss)``: backbone and IMs on the summed
  loss; ``tx`` must be a :func:`group_optimizer` (or mask the gates itself)."""
  def loss_fn(params, images, labels):
    return summed_exit_loss(model.apply({"params": params}, images).logits_LBC, labels)
  return _step(loss_fn, tx)


def ims_step(model: MultiExitClassifier, tx: optax.GradientTransformation) -> Step:
  """Phase (a) on cached block states: ``step(params, opt_state, states_LBTD, labels)``."""
  def loss_fn(params, states, labels):
    logits, gate_logits = model.apply({"params": params}, states, method=MultiExitClassifier.from_states)
    return weighted_exit_loss(logits, labels, exit_distribution(jax.nn.sigmoid(gate_logits)))
  return _step(loss_fn, tx)


def gates_step(model: MultiExitClassifier, tx: optax.GradientTransformation, costs_L, tradeoff: float) -> Step:
  """Phase (b) on cached block states: ``step(params, opt_state, states_LBTD, labels)``."""
  check_tradeoff(tradeoff)
  costs = jnp.asarray(costs_L, jnp.float32)

  def loss_fn(params, states, labels):
    logits, gate_logits = model.apply({"params": params}, states, method=MultiExitClassifier.from_states)
    return gate_loss(logits, gate_logits, labels, costs, tradeoff)
  return _step(loss_fn, tx)


def fit_jei(model: MultiExitClassifier, params: Any, batches: Iterator[tuple[Any, Any]], *, costs_L, tradeoff: float,
            steps: int, phase_steps: int, ims_tx: optax.GradientTransformation,
            gates_tx: optax.GradientTransformation) -> tuple[Any, list[dict[str, float]]]:
  """Alternates phase (a) and (b) every ``phase_steps`` batches of ``(states_LBTD, labels_B)``, starting with
  the gates (the IMs come warmed up); returns the parameters and one ``{"step", "phase", "loss"}`` per step.
  ``ims_tx`` / ``gates_tx`` are plain optax optimisers; each is applied to its own group only."""
  for name, value in (("steps", steps), ("phase_steps", phase_steps)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}: got {value!r}; allowed: a positive int")
  costs = np.asarray(costs_L, np.float64)
  if costs.shape != (model.backbone.num_layers,) or np.any(np.diff(costs) <= 0) or not np.isclose(costs[-1], 1.0):
    raise ValueError(f"costs_L: got {costs_L!r}; allowed: {model.backbone.num_layers} increasing costs ending at 1")
  txs = {"gates": group_optimizer(gates_tx, ("gates",)), "ims": group_optimizer(ims_tx, ("ims",))}
  step_fns = {"gates": gates_step(model, txs["gates"], costs, tradeoff), "ims": ims_step(model, txs["ims"])}
  opt_states = {name: tx.init(params) for name, tx in txs.items()}
  history = []
  for i in range(steps):
    phase = ("gates", "ims")[(i // phase_steps) % 2]
    states, labels = next(batches)
    params, opt_states[phase], loss = step_fns[phase](params, opt_states[phase], states, labels)
    history.append({"step": i + 1, "phase": phase, "loss": float(loss)})
  return params, history
