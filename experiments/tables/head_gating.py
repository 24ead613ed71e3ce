"""Causal head gating (Nam et al. 2025, arXiv 2505.13737) on a trained tiny byte LM and on an MQAR model: the
head taxonomy and how well it predicts the effect of removing each head.

    python -m experiments reproduce head_gating [--scale tiny|small|paper] [--seeds N]

Each variant trains its model (``gated_jax.train.train``), freezes it, and runs ``gated_jax.models.head_gating``
(per-head ``G⁺``, ``G⁻``, labels and ``Δ`` go to ``runs/<scale>/<variant>/seed<n>/heads.json``):

* ``lm``: a 2-layer, 4-head softmax-attention byte LM on the stdlib corpus (``experiments/configs/lm.py``);
  CHG on training batches, ablations on the validation batches. Contrastive CHG retains the corpus and
  forgets an induction task (random 20-byte strings repeated; loss on the repeats), and we report how much
  the contrastive mask raises each set's NLL.
* ``mqar``: the MQAR task of ``experiments/configs/mqar.py`` (2 MLP-free layers, sequence 64, 8 pairs) with
  both layers softmax attention (the MQAR table's model puts a BaseConv first, which has no heads to gate)
  and 4 heads of 16 instead of 1, so that heads can be told apart; loss on the query positions only.

CHG runs the authors' three stages (λ = 0, then ±0.1 from the λ = 0 fit; Adam at learning rate 1, gradient
clip 1, logits clipped at ±4 in the regulariser) and labels every head facilitating / interfering / irrelevant
/ ambiguous from ``G⁺`` and ``G⁻`` (``gated_jax.models.head_gating.taxonomy``). The ablation check removes each
head alone (gate 0) and measures the validation-loss change ``Δ``. Metrics: head counts per class, mean ``Δ``
per class, and the Spearman rank correlation between ``Δ`` and the causal score ``G⁺ + G⁻ − 1``.

Claims (from the paper's ablation validation; judged on both models): (a) the causal score ranks heads by
their ablation effect (Spearman > 0); (b) removing a facilitating head raises the loss (mean ``Δ`` > 0);
(c) removing an irrelevant head changes the loss less than removing a facilitating one (not judged when a
model has no irrelevant head); (d) the contrastive mask raises the forgotten set's NLL more than the retained
set's (LM).

Scales:

* ``tiny`` (default; 3.0 minutes measured on an idle 2-core machine): LM d_model 64, 4 heads, sequence 128, batch
  16, 300 training steps; MQAR as ``experiments/configs/mqar.py:tiny`` at width 64; 150 CHG updates per stage on
  batches of 16, ablations on 8 validation batches.
* ``small`` (one accelerator): 6-layer d_model 384 LM (6 heads), 3000 training steps; MQAR at width 128 with
  8 heads; 500 CHG updates per stage (the authors' example count) on batches of 32.
* ``paper``: the authors fit Llama-3 models (3.2-1B to 3.1-70B) with 500 updates per stage, batch 32; here a
  12-layer d=768 LM on the stdlib corpus with the same CHG settings (point ``data.name`` at a real corpus).
"""

from __future__ import annotations

import itertools
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.configs import lm
from experiments.configs import mqar as mqar_config
from experiments.tables import common
from experiments.tables.common import Claim, Metric, Table
from gated_jax.data import pipeline
from gated_jax.models import head_gating
from gated_jax.train import step as train_step
from gated_jax.train import train

VARIANTS = ("lm", "mqar")
INDUCTION_PERIOD = 20  # the repeated random string of the contrastive negative set


def _chg_group(steps, batches, contrastive_steps):
  return {"chg.steps": steps, "chg.eval_batches": batches, "chg.contrastive_steps": contrastive_steps}


def _lm_scale(d_model, layers, heads, mlp, seq, batch, steps, lr, warmup, chg_steps, chg_batches, dtype="float32"):
  return {"model.d_model": d_model, "model.num_layers": layers, "model.num_heads": heads,
          "model.mlp_hidden_dim": mlp, "model.max_len": seq, "data.seq_len": seq, "data.batch_size": batch,
          "train.steps": steps, "train.eval_every": steps, "train.checkpoint_every": steps,
          "train.log_every": max(1, steps // 50), "train.eval_batches": chg_batches, "train.compute_dtype": dtype,
          "optim.lr": lr, "optim.warmup_steps": warmup, **_chg_group(chg_steps, chg_batches, chg_steps)}


def _mqar_scale(d_model, heads, chg_steps, chg_batches):
  return {"model.d_model": d_model, "model.num_heads": heads, **_chg_group(chg_steps, chg_batches, 0)}


SCALES = {
    "micro": {"lm": _lm_scale(16, 2, 2, 32, 16, 4, 3, 1e-3, 1, 2, 1), "mqar": _mqar_scale(16, 2, 2, 1)},
    "tiny": {"lm": _lm_scale(64, 2, 4, 256, 128, 16, 300, 3e-3, 30, 150, 8), "mqar": _mqar_scale(64, 4, 150, 8)},
    "small": {"lm": _lm_scale(384, 6, 6, 1536, 512, 32, 3000, 2e-3, 300, 500, 16, "bfloat16"),
              "mqar": _mqar_scale(128, 8, 500, 16)},
    "paper": {"lm": _lm_scale(768, 12, 12, 3072, 1024, 32, 20000, 6e-4, 1000, 500, 32, "bfloat16"),
              "mqar": _mqar_scale(512, 8, 500, 32)},
}
_MQAR_SCALE = {"micro": "micro", "tiny": "tiny", "small": "small", "paper": "paper"}


def base_config(variant: str, scale: str) -> ml_collections.ConfigDict:
  """The variant's training config (plain softmax attention) plus the ``chg`` group."""
  if variant == "lm":
    config = lm.get_config("tiny")
    config.train.diagnostics = False
  else:
    config = mqar_config.get_config(_MQAR_SCALE[scale])
  with config.ignore_type():
    config.model.mixer = "gated_attention"
    config.model.mixer_kwargs = {"gate_position": "none"}
  config.chg = ml_collections.ConfigDict({"steps": 150, "eval_batches": 8, "contrastive_steps": 150,
                                          "reg_weight": 0.1, "lr": 1.0})
  return config


class HeadGatingTable(Table):
  """The generic table with one base config per variant (the LM config or the MQAR config)."""

  def config(self, scale: str, variant: str, seed: int = 0) -> ml_collections.ConfigDict:
    if scale not in self.scales:
      raise ValueError(f"scale: got {scale!r}; allowed: {', '.join(self.scales)}")
    if variant not in self.variants:
      raise ValueError(f"variant: got {variant!r}; allowed: {', '.join(self.variants)}")
    config = common.apply_overrides(base_config(variant, scale), self.scales[scale][variant])
    config.seed = int(config.seed) + seed
    return config


def induction_batches(batch_size: int, seq_len: int, seed: int):
  """Endless batches of a random printable string of ``INDUCTION_PERIOD`` bytes (at most half the sequence)
  repeated to ``seq_len + 1`` bytes; the targets that repeat an earlier byte carry the loss."""
  rng = np.random.default_rng(seed)
  period = min(INDUCTION_PERIOD, seq_len // 2)
  weights = (np.arange(seq_len) + 1 >= period).astype(np.float32)
  while True:
    strings = rng.integers(32, 127, (batch_size, period))
    tokens = np.tile(strings, (1, seq_len // period + 2))[:, :seq_len + 1].astype(np.int32)
    yield {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.broadcast_to(weights, tokens[:, 1:].shape)}


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
  rank = lambda a: np.argsort(np.argsort(a, kind="stable"), kind="stable").astype(np.float64)
  rx, ry = rank(np.ravel(x)), rank(np.ravel(y))
  if rx.std() == 0 or ry.std() == 0:
    return float("nan")
  return float(np.corrcoef(rx, ry)[0, 1])


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
  """Trains the model, fits CHG, labels the heads and measures every single-head ablation."""
  result = train(config, workdir=str(workdir))
  model, params = train_step.make_model(config), result.params
  key = jax.random.PRNGKey(config.seed)
  fit_data = pipeline.train_iterator(config.data, seed=config.seed + 1)
  held_out = pipeline.eval_batches(config.data, num_batches=config.chg.eval_batches)
  gates = head_gating.chg(model, params, fit_data, key=key, steps=config.chg.steps, reg_weight=config.chg.reg_weight,
                          lr=config.chg.lr)
  labels = head_gating.taxonomy(gates.g_plus, gates.g_minus)
  base, delta = head_gating.ablation_effects(model, params, held_out)
  metrics = {"loss": float(result.eval["loss"]), "accuracy": float(result.eval["accuracy"]), "ablation_base": base,
             "rank_corr": _spearman(head_gating.causal_score(gates.g_plus, gates.g_minus), delta),
             "num_heads": float(delta.size)}
  for label in head_gating.TAXONOMY:
    metrics[f"n_{label}"] = float(np.sum(labels == label))
    if np.any(labels == label):
      metrics[f"delta_{label}"] = float(np.mean(delta[labels == label]))
  if config.chg.contrastive_steps:
    metrics.update(_contrastive(config, model, params, fit_data, held_out, key))
  details = {"g_plus": gates.g_plus.tolist(), "g_minus": gates.g_minus.tolist(), "delta": delta.tolist(),
             "labels": labels.tolist()}
  (workdir / "heads.json").write_text(json.dumps(details))
  return {"metrics": metrics, "history": result.history}


def _contrastive(config, model, params, fit_data, held_out, key) -> dict[str, float]:
  """Contrastive CHG retaining the corpus and forgetting induction; NLL change of each set under the mask."""
  negative_fit = induction_batches(config.data.batch_size, config.data.seq_len, config.seed + 2)
  logits = head_gating.contrastive_chg(model, params, fit_data, negative_fit, key=jax.random.fold_in(key, 1),
                                       steps=config.chg.contrastive_steps)
  mask, ones = jax.nn.sigmoid(jnp.asarray(logits)), jnp.ones(logits.shape)
  negative = list(itertools.islice(induction_batches(config.data.batch_size, config.data.seq_len, 10**6),
                                   len(held_out)))

  def nll(batches, gates):
    return float(np.mean([head_gating.mean_nll_jit(model, params, dict(b), gates) for b in batches]))
  return {"induction_nll": nll(negative, ones), "contrastive_pos_delta": nll(held_out, mask) - nll(held_out, ones),
          "contrastive_neg_delta": nll(negative, mask) - nll(negative, ones),
          "contrastive_mask_mean": float(jnp.mean(mask))}


def _both(fn):
  return lambda m: all(fn(m[v]) for v in VARIANTS)


METRICS = (
    Metric("loss", "val loss", ".4f"),
    Metric("accuracy", "accuracy", ".3f"),
    Metric("n_facilitating", "facilitating", ".1f"),
    Metric("n_interfering", "interfering", ".1f"),
    Metric("n_irrelevant", "irrelevant", ".1f"),
    Metric("n_ambiguous", "ambiguous", ".1f"),
    Metric("delta_facilitating", "Δ facil.", ".4f"),
    Metric("delta_interfering", "Δ interf.", ".4f"),
    Metric("delta_irrelevant", "Δ irrel.", ".4f"),
    Metric("rank_corr", "Spearman(score, Δ)", ".2f"),
    Metric("contrastive_pos_delta", "CCHG Δ retained", ".4f"),
    Metric("contrastive_neg_delta", "CCHG Δ forgotten", ".4f"),
)

CLAIMS = (
    Claim("a", "the causal score G+ + G- - 1 ranks heads by their ablation effect (Spearman > 0), LM and MQAR",
          VARIANTS, _both(lambda m: m["rank_corr"] > 0)),
    Claim("b", "removing a facilitating head raises the loss (mean Δ > 0), LM and MQAR", VARIANTS,
          _both(lambda m: m["delta_facilitating"] > 0)),
    Claim("c", "removing an irrelevant head changes the loss less than removing a facilitating one", VARIANTS,
          _both(lambda m: abs(m["delta_irrelevant"]) < m["delta_facilitating"])),
    Claim("d", "the contrastive mask raises the forgotten (induction) NLL more than the retained (corpus) NLL",
          ("lm",), lambda m: m["lm"]["contrastive_neg_delta"] > m["lm"]["contrastive_pos_delta"]),
)

TABLE = HeadGatingTable(
    name="head_gating",
    paper=("Causal Head Gating (Nam, Conklin, Yang, Griffiths, Cohen & Leslie 2025, arXiv 2505.13737): taxonomy "
           "and ablation validation"),
    variants={v: {} for v in VARIANTS},
    scales=SCALES,
    metrics=METRICS,
    paper_columns=(),
    paper_numbers={},
    claims=CLAIMS,
    micro_variants=("lm",),
    runner=run,
    default_seeds=2,
    plot_metric="rank_corr",
)
