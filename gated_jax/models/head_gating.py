"""Causal head gating (CHG; Nam, Conklin, Yang, Griffiths, Cohen & Leslie 2025, "Causal Head Gating: A
Framework for Interpreting Roles of Attention Heads in Transformers", arXiv 2505.13737) on a frozen
``DecoderLM``.

One gate per (layer, head), ``G = σ(θ)``, scales the head's output before the output projection:
``Z_ℓh = G_ℓh·(head output)``, ``out = concat_h(Z_ℓh) W_O``. Scaling row block ``h`` of ``W_O`` is the same
operation, so :func:`gate_heads` applies the gates to a copy of the parameters and works for every mixer
whose output projection has a head axis (softmax attention's ``out``, the linear mixers' ``o_proj``); gates
of 0 are head ablations. The model's own parameters are never trained.

Fitting (:func:`gate_fitter`) minimises ``NLL(G) − λ·mean(clip(θ, −c, c))`` (the authors' trainer: ``c = 4``,
``|λ| = 0.1``, Adam at learning rate 1, gradient-norm clip 1, ``G`` initialised uniform in (0, 1); the NLL is
each sequence's mean over its target tokens, averaged over the batch). :func:`chg` runs the three stages: a
fit with ``λ = 0``, then from it ``λ > 0`` (retention pressure, ``G⁺``) and ``λ < 0`` (removal pressure,
``G⁻``). :func:`taxonomy` reads the two masks [our reading of the paper, cut at 0.5]:

* **facilitating**: kept despite removal pressure (``G⁻ ≥ 0.5``, and ``G⁺ ≥ 0.5``);
* **interfering**: removed despite retention pressure (``G⁺ < 0.5``, and ``G⁻ < 0.5``);
* **irrelevant**: follows the regulariser either way (``G⁺ ≥ 0.5``, ``G⁻ < 0.5``);
* **ambiguous**: the remaining, contradictory case (``G⁺ < 0.5 ≤ G⁻``).

:func:`causal_score` ``G⁺ + G⁻ − 1`` orders the classes (facilitating ≈ +1, irrelevant ≈ 0, interfering ≈ −1);
:func:`ablation_effects` measures what the taxonomy predicts: the loss change when each head alone is removed.

Contrastive CHG (:func:`contrastive_chg`; the authors' contrastive trainer) fits one mask that keeps the
positive set and forgets the negative one: ``mean_i[NLL⁺_i + max(sg(NLL⁺_i) − NLL⁻_i, −max_diff)] −
λ·mean(clip(θ))`` over paired rows ``i`` (``λ = 0.1``, ``max_diff = 5``: the forget term stops pushing once a
negative row's NLL exceeds its positive partner's by 5 nats; Adam with the learning rate falling linearly from
0.1 to 0.01).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gated_jax.models.lm import DecoderLM

TAXONOMY = ("facilitating", "interfering", "irrelevant", "ambiguous")
REG_CLIP = 4.0  # c: the regulariser sees the gate logits clipped to [-c, c]
_OUTPUT_PROJECTIONS = ("out", "o_proj")

Batch = Mapping[str, np.ndarray]


def _output_projection(layer: Mapping[str, Any], layer_name: str) -> str:
  mixer = layer.get("mixer", {})
  for name in _OUTPUT_PROJECTIONS:
    if name in mixer and np.ndim(mixer[name]["kernel"]) == 3:
      return name
  raise ValueError(f"params: {layer_name}/mixer has no output projection with a head axis (looked for "
                   f"{', '.join(_OUTPUT_PROJECTIONS)} with a (heads, head_dim, d_model) kernel)")


def _layers(params: Mapping[str, Any]) -> list[str]:
  names = sorted((k for k in params if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
  if not names:
    raise ValueError("params: got no layer_<i> entries; allowed: DecoderLM parameters")
  return names


def head_shape(params: Mapping[str, Any]) -> tuple[int, int]:
  """``(num_layers, num_heads)`` of a ``DecoderLM``'s (unboxed) parameters."""
  params = flax.core.meta.unbox(params)
  layers = _layers(params)
  heads = {np.shape(params[n]["mixer"][_output_projection(params[n], n)]["kernel"])[0] for n in layers}
  if len(heads) != 1:
    raise ValueError(f"params: layers have different head counts {sorted(heads)}; allowed: one head count")
  return len(layers), heads.pop()


def gate_heads(params: Mapping[str, Any], gates_LH: jax.Array) -> Any:
  """A copy of ``params`` whose output projection of layer ``l`` has head ``h`` scaled by ``gates_LH[l, h]``."""
  params = flax.core.meta.unbox(params)
  shape = head_shape(params)
  if tuple(gates_LH.shape) != shape:
    raise ValueError(f"gates_LH: got shape {tuple(gates_LH.shape)}; allowed: (num_layers, num_heads) = {shape}")
  params = flax.core.unfreeze(params)
  for l, name in enumerate(_layers(params)):
    proj = _output_projection(params[name], name)
    kernel = params[name]["mixer"][proj]["kernel"]
    params[name]["mixer"] = {**params[name]["mixer"],
                             proj: {**params[name]["mixer"][proj],
                                    "kernel": kernel * gates_LH[l].astype(kernel.dtype)[:, None, None]}}
  return params


def sequence_nll(model: DecoderLM, params: Any, batch: Batch, gates_LH: jax.Array) -> jax.Array:
  """Per sequence ``(B,)``: the mean cross-entropy over its target tokens (``weights > 0``) with the heads
  gated; rows without targets give NaN."""
  extra = {k: batch[k] for k in ("segment_ids", "positions") if k in batch}
  logits = model.apply({"params": gate_heads(params, gates_LH)}, batch["inputs"], **extra)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
  w = jnp.asarray(batch["weights"], jnp.float32)
  return jnp.sum(ce * w, -1) / jnp.where(jnp.sum(w, -1) > 0, jnp.sum(w, -1), jnp.nan)


def mean_nll(model: DecoderLM, params: Any, batch: Batch, gates_LH: jax.Array) -> jax.Array:
  """The batch mean of :func:`sequence_nll` over rows with targets."""
  return jnp.nanmean(sequence_nll(model, params, batch, gates_LH))


mean_nll_jit = jax.jit(mean_nll, static_argnums=0)  # the model is static: one compilation per model and shapes


def clipped_logit_mean(logits_LH: jax.Array, clip: float) -> jax.Array:
  """``mean(clip(θ, −c, c))``: the regulariser's pull on the gate logits."""
  return jnp.mean(jnp.clip(logits_LH, -clip, clip))


@dataclasses.dataclass(frozen=True)
class FitSettings:
  """Optimiser settings of one CHG stage (defaults: the authors' trainer).

  Attributes:
    steps: gate updates.
    lr: Adam learning rate at the start.
    lr_end: learning rate at the end (linear decay); None: constant.
    grad_clip: global gradient-norm clip.
  """
  steps: int = 500
  lr: float = 1.0
  lr_end: float | None = None
  grad_clip: float = 1.0

  def optimizer(self) -> optax.GradientTransformation:
    if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
      raise ValueError(f"steps: got {self.steps!r}; allowed: a positive int")
    lr = self.lr if self.lr_end is None else optax.linear_schedule(self.lr, self.lr_end, self.steps)
    return optax.chain(optax.clip_by_global_norm(self.grad_clip), optax.adam(lr))


def gate_fitter(objective: Callable[..., jax.Array], settings: FitSettings
                ) -> Callable[..., jax.Array]:
  """``fit(logits, batches, *args) -> logits``: ``settings.steps`` Adam updates of the gate logits minimising
  ``objective(logits, batch, *args)`` (``args``, e.g. the frozen parameters and the regulariser weight, are
  traced: one compilation serves every call)."""
  tx = settings.optimizer()

  @jax.jit
  def step(logits, opt_state, batch, *args):
    grads = jax.grad(objective)(logits, batch, *args)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(logits, updates), opt_state

  def fit(logits_LH: jax.Array, batches: Iterator[Any], *args: Any) -> jax.Array:
    opt_state = tx.init(logits_LH)
    for _ in range(settings.steps):
      logits_LH, opt_state = step(logits_LH, opt_state, dict(next(batches)), *args)
    return logits_LH
  return fit


@dataclasses.dataclass(frozen=True)
class CHGResult:
  """Gate logits of the three stages, ``(num_layers, num_heads)`` each."""
  fit: np.ndarray
  plus: np.ndarray
  minus: np.ndarray

  @property
  def g_plus(self) -> np.ndarray:
    return np.asarray(jax.nn.sigmoid(self.plus))

  @property
  def g_minus(self) -> np.ndarray:
    return np.asarray(jax.nn.sigmoid(self.minus))


def initial_logits(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """``logit(U)``, ``U ~ Uniform(0, 1)`` per gate (the authors' initialisation)."""
  return jax.scipy.special.logit(jax.random.uniform(key, shape, jnp.float32, 1e-3, 1.0 - 1e-3))


def chg(model: DecoderLM, params: Any, batches: Iterator[Batch], *, key: jax.Array, steps: int = 500,
        reg_steps: int | None = None, reg_weight: float = 0.1, lr: float = 1.0) -> CHGResult:
  """The three CHG stages on ``model`` with frozen ``params`` (module docstring): ``steps`` updates without
  the regulariser, then ``reg_steps`` (default ``steps``) each with ``+reg_weight`` and ``-reg_weight``."""
  if not reg_weight > 0:
    raise ValueError(f"reg_weight: got {reg_weight!r}; allowed: a positive number (|λ|)")
  params = flax.core.meta.unbox(params)

  def objective(logits, batch, params, weight):
    return mean_nll(model, params, batch, jax.nn.sigmoid(logits)) - weight * clipped_logit_mean(logits, REG_CLIP)

  start = initial_logits(key, head_shape(params))
  fitter = gate_fitter(objective, FitSettings(steps=steps, lr=lr))
  fitted = fitter(start, batches, params, jnp.float32(0.0))
  regularised = fitter if reg_steps in (None, steps) else gate_fitter(objective, FitSettings(steps=reg_steps, lr=lr))
  plus = regularised(fitted, batches, params, jnp.float32(reg_weight))
  minus = regularised(fitted, batches, params, jnp.float32(-reg_weight))
  return CHGResult(np.asarray(fitted), np.asarray(plus), np.asarray(minus))


def taxonomy(g_plus: np.ndarray, g_minus: np.ndarray, threshold: float = 0.5) -> np.ndarray:
  """Per head, one of :data:`TAXONOMY` from the retention (``G⁺``) and removal (``G⁻``) masks."""
  kept_plus, kept_minus = np.asarray(g_plus) >= threshold, np.asarray(g_minus) >= threshold
  return np.where(kept_minus, np.where(kept_plus, "facilitating", "ambiguous"),
                  np.where(kept_plus, "irrelevant", "interfering"))


def causal_score(g_plus: np.ndarray, g_minus: np.ndarray) -> np.ndarray:
  """``G⁺ + G⁻ − 1``: +1 facilitating, 0 irrelevant, −1 interfering."""
  return np.asarray(g_plus) + np.asarray(g_minus) - 1.0


def ablation_effects(model: DecoderLM, params: Any, batches: Iterable[Batch]) -> tuple[float, np.ndarray]:
  """``(loss with every head, Δloss (num_layers, num_heads))``: the mean NLL over ``batches`` with head
  ``(l, h)`` alone removed, minus the full model's."""
  params = flax.core.meta.unbox(params)
  shape = head_shape(params)
  batches = [dict(b) for b in batches]

  def total(gates):
    return float(np.mean([mean_nll_jit(model, params, b, gates) for b in batches]))
  base = total(jnp.ones(shape))
  delta = np.zeros(shape)
  for l in range(shape[0]):
    for h in range(shape[1]):
      delta[l, h] = total(jnp.ones(shape).at[l, h].set(0.0)) - base
  return base, delta


def contrastive_chg(model: DecoderLM, params: Any, positive: Iterator[Batch], negative: Iterator[Batch], *,
                    key: jax.Array, steps: int = 500, lr: float = 0.1, lr_end: float | None = 0.01,
                    reg_weight: float = 0.1, max_diff: float = 5.0) -> np.ndarray:
  """Gate logits of one mask that retains ``positive`` and forgets ``negative`` (module docstring)."""
  if not max_diff > 0:
    raise ValueError(f"max_diff: got {max_diff!r}; allowed: a positive number")
  params = flax.core.meta.unbox(params)

  def objective(logits, pair, params):
    gates = jax.nn.sigmoid(logits)
    nll_pos = sequence_nll(model, params, pair["positive"], gates)
    nll_neg = sequence_nll(model, params, pair["negative"], gates)
    forget = jnp.maximum(jax.lax.stop_gradient(nll_pos) - nll_neg, -max_diff)  # row i of each set paired
    return jnp.nanmean(nll_pos) + jnp.nanmean(forget) - reg_weight * clipped_logit_mean(logits, REG_CLIP)

  pairs = ({"positive": dict(p), "negative": dict(n)} for p, n in zip(positive, negative))
  start = initial_logits(key, head_shape(params))
  fit = gate_fitter(objective, FitSettings(steps=steps, lr=lr, lr_end=lr_end))
  return np.asarray(fit(start, pairs, params))


__all__ = ["CHGResult", "FitSettings", "TAXONOMY", "ablation_effects", "causal_score", "chg", "contrastive_chg",
           "gate_fitter", "gate_heads", "head_shape", "initial_logits", "mean_nll", "mean_nll_jit", "sequence_nll", "taxonomy"]
