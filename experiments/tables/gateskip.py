"""GateSkip (Laitenberger et al. 2025, arXiv 2510.13876) and skip-the-middle (Lawson & Aitchison 2025,
arXiv 2506.21103) on the embedded byte corpus: validation loss against the fraction of residual-branch compute
skipped.

    python -m experiments reproduce gateskip [--scale tiny|small|paper] [--seeds N]

Variants (every other setting shared):

* ``dense L4`` / ``dense L3`` / ``dense L2``: plain pre-norm models of 4, 3 and 2 layers (compute 1, 0.75,
  0.5 of the 4-layer stack): the dense baselines of equal compute;
* ``gateskip L4``: GateSkip's vector gate on every branch of the 4-layer model, its L2 sparsity regulariser
  (``λ_s = 1``, the released runs' weight) and training-time skipping rising 0 → 20 % over the middle half of
  training. The model is evaluated at budgets of 10-50 % in two ways: *gate-ranked* (each module skips the
  tokens whose importance is at or below a threshold calibrated to the budget on 4 training batches; causal,
  so the same rule decodes; tied importances skip together, so the achieved fraction can differ from the
  budget) and *random* (each eligible token skips each module with probability equal to the budget). The
  paper fine-tunes pretrained Llama models; here the gates are trained from scratch with the model (one run
  instead of pretraining plus fine-tuning);
* ``skip-middle L4``: the symmetric middle-span router with key-axis masking in attention and mean-gate
  targets 1.0 (outer) → 0.5 (inner) held by a squared penalty (the paper uses a proportional controller). The
  paper's model uses sandwich (peri-LN) branch norms (``DecoderLM(branch_post_norm=True)``); here every
  variant is pre-norm so that the rows differ only in what they skip.

Compute is the fraction of (token, branch) evaluations executed, relative to the 4-layer dense model
(embedding and logits left out; skipping is a mask here, so these are estimates of what a compacting
implementation would save, as the paper's own FLOP counts are). ``summary`` writes ``loss_vs_compute.png``:
every variant's (compute, loss) points, with the dense frontier.

Claims (judged on our means): (a) gate-ranked skipping loses less than half as much validation loss as random
skipping at every budget, comparing at the fraction gate-ranked skipping actually reached (random's losses
interpolated there; the reference experiment's "gate-ranked ≫ random"); (b) at the 20 % budget, GateSkip
keeps ≥ 90 % of its full-compute next-byte accuracy (the abstract: "save up to 15% compute while retaining
over 90% of baseline accuracy"); (c) skip-the-middle does not beat the dense models of equal compute
(its loss is not below the dense frontier interpolated at its compute: the paper's negative result); (d) the
first position gets near-maximal importance (above 90 % of the tokens of its sequence, mean over modules; the
abstract's "BOS tokens act as anchors" — our windows start at an arbitrary byte, not a BOS).

Scales:

* ``tiny`` (default; 2 seeds, 9.4 minutes measured on an idle 2-core machine with an empty compilation cache):
  d_model 64, 4 heads, SwiGLU 256, sequence 128, batch 16, 400 AdamW steps at 3e-3, 8 validation batches, 4
  calibration batches.
* ``small`` (one accelerator, about an hour): d_model 384, 6 heads, sequence 512, batch 32, 3000 steps in
  bfloat16; 8-layer models (dense L8/L6/L4 replace L4/L3/L2, as the paper's 8-layer CPU setting).
* ``paper``: GateSkip's released setting is a fine-tune of Llama-3.2-1B (lr 3e-6, 6,800 steps, budget
  0 → 20 %); skip-the-middle's is a 12-layer d=768 model on FineWeb. The ``paper`` scale here trains a
  12-layer d=768 model (dense L12/L9/L6) on the stdlib corpus with the skip-middle paper's width; point
  ``data.name`` at a real corpus for meaningful numbers.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import traverse_util

from experiments.configs import lm
from experiments.tables import common
from experiments.tables.common import Claim, Metric, Table
from gated_jax.data import pipeline
from gated_jax.layers.collections import LAYER_METRICS
from gated_jax.models import gateskip
from gated_jax.train import step as train_step
from gated_jax.train import train

BUDGETS = (0.1, 0.2, 0.3, 0.5)
_GATESKIP = {"train_budget": 0.2}
_SKIP_MIDDLE = {"outer_target": 1.0, "inner_target": 0.5, "router_stddev": 0.02}
_AUX_WEIGHTS = {"train.aux_loss_weights": {"gateskip_sparsity": 1.0, "skip_middle_sparsity": 1.0}}


def _pct(budget: float) -> str:
  return f"{round(100 * budget)}"


def base_config() -> ml_collections.ConfigDict:
  """The tiny LM config plus the GateSkip / skip-middle model fields and the evaluation group."""
  config = lm.get_config("tiny")
  with config.ignore_type():
    config.model.update(gateskip=None, skip_middle=None, branch_post_norm=False,
                        mixer_kwargs={"gate_position": "none"})
  config.skip_eval = ml_collections.ConfigDict({"budgets": BUDGETS, "calibration_batches": 4, "depth": 4})
  return config


def _variants(depth: int) -> dict[str, dict[str, Any]]:
  """Variant -> overrides; ``depth`` is the gated models' layer count (the 'L4' of the names)."""
  three_quarters, half = 3 * depth // 4, depth // 2
  return {
      "dense L4": {"model.num_layers": depth},
      "dense L3": {"model.num_layers": three_quarters},
      "dense L2": {"model.num_layers": half},
      "gateskip L4": {"model.num_layers": depth, "model.gateskip": _GATESKIP, **_AUX_WEIGHTS},
      "skip-middle L4": {"model.num_layers": depth, "model.skip_middle": _SKIP_MIDDLE, **_AUX_WEIGHTS},
  }


def _scale(d_model, heads, mlp, seq, batch, steps, lr, warmup, eval_batches, depth, budgets=BUDGETS,
           calibration_batches=4, dtype="float32"):
  return {"model.d_model": d_model, "model.num_heads": heads, "model.mlp_hidden_dim": mlp, "model.max_len": seq,
          "data.seq_len": seq, "data.batch_size": batch, "train.steps": steps, "train.eval_every": steps,
          "train.checkpoint_every": steps, "train.eval_batches": eval_batches, "train.log_every": max(1, steps // 50),
          "train.compute_dtype": dtype, "train.diagnostics": False, "optim.lr": lr, "optim.warmup_steps": warmup,
          "skip_eval.budgets": budgets, "skip_eval.calibration_batches": calibration_batches,
          "skip_eval.depth": depth}


SCALES = {
    "micro": _scale(16, 2, 32, 16, 4, 4, 1e-3, 1, 1, 2, budgets=(0.5,), calibration_batches=1),
    "tiny": _scale(64, 4, 256, 128, 16, 400, 3e-3, 30, 8, 4),
    "small": _scale(384, 6, 1536, 512, 32, 3000, 2e-3, 300, 32, 8, dtype="bfloat16"),
    "paper": _scale(768, 12, 3072, 1024, 64, 20000, 6e-4, 1000, 64, 12, dtype="bfloat16"),
}


class SkipTable(Table):
  """The generic table whose variant overrides depend on the scale's depth (``skip_eval.depth``)."""

  def config(self, scale: str, variant: str, seed: int = 0) -> ml_collections.ConfigDict:
    if scale not in self.scales:
      raise ValueError(f"scale: got {scale!r}; allowed: {', '.join(self.scales)}")
    if variant not in self.variants:
      raise ValueError(f"variant: got {variant!r}; allowed: {', '.join(self.variants)}")
    config = common.apply_overrides(base_config(), self.scales[scale])
    config = common.apply_overrides(config, _variants(config.skip_eval.depth)[variant])
    if config.model.gateskip is not None:  # training-time budget 0 -> 20 % over the middle half of training
      steps = config.train.steps
      config.model.gateskip.update(budget_start=steps // 4, budget_steps=max(1, steps // 2))
    config.seed = int(config.seed) + seed
    return config


def _mean_of(sown: Any, suffix: str) -> jax.Array:
  """Mean over gated modules of a sown scalar (0 when no module sowed it)."""
  values = [v[0] for k, v in traverse_util.flatten_dict(sown, sep="/").items() if k.endswith(suffix)]
  return sum(values) / len(values) if values else 0.0


def evaluate(model: Any, params: Any, batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """Validation ``loss``, ``accuracy``, ``skipped`` (fraction of branch evaluations skipped) and
  ``first_token_rank`` (mean over modules and sequences of the fraction of tokens less important than the
  first)."""
  @jax.jit
  def sums(params, batch):
    logits, sown = model.apply({"params": params}, batch["inputs"], mutable=[LAYER_METRICS, "intermediates"])
    ce, correct, weight = train_step.weighted_sums(logits, batch)
    return (ce, correct, weight, _mean_of(sown.get(LAYER_METRICS, {}), "gateskip_skipped"),
            _mean_of(sown.get("intermediates", {}), "first_token_rank"))
  totals = np.sum([np.asarray(sums(params, b), np.float64) for b in batches], axis=0)
  weight = max(totals[2], 1.0)
  return {"loss": totals[0] / weight, "accuracy": totals[1] / weight, "skipped": totals[3] / len(batches),
          "first_token_rank": totals[4] / len(batches)}


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
  """Trains the variant (``gated_jax.train.train``), then measures its loss at its compute; a GateSkip model
  also at every budget, gate-ranked and random."""
  result = train(config, workdir=str(workdir))
  metrics = {**{k: float(v) for k, v in result.eval.items()}, "num_params": float(result.num_params)}
  if config.model.skip_middle is not None:
    metrics["compute"] = metrics["skip_middle_active"]
  elif config.model.gateskip is None:
    metrics["compute"] = config.model.num_layers / config.skip_eval.depth
  else:
    metrics.update(budget_sweep(config, result.params), compute=1.0)
  return {"metrics": metrics, "history": result.history}


def budget_sweep(config: ml_collections.ConfigDict, params: Any) -> dict[str, float]:
  """GateSkip at each budget, gate-ranked (calibrated thresholds) and random, plus the first-token rank."""
  model = train_step.make_model(config)
  batches = pipeline.eval_batches(config.data, num_batches=config.train.eval_batches)
  iterator = pipeline.train_iterator(config.data, seed=config.seed + 1)
  calibration = [next(iterator) for _ in range(config.skip_eval.calibration_batches)]
  metrics = {}
  for budget in config.skip_eval.budgets:
    thresholds = gateskip.calibrate_thresholds(model, params, calibration, budget)
    gated = evaluate(gateskip.with_skip_rule(model, "threshold", thresholds=thresholds), params, batches)
    random = evaluate(gateskip.with_skip_rule(model, "random", budget=budget), params, batches)
    pct = _pct(budget)
    metrics["first_token_rank"] = gated["first_token_rank"]  # a property of the gates, not of the rule
    metrics.update({f"loss_gate_{pct}": gated["loss"], f"acc_gate_{pct}": gated["accuracy"],
                    f"skipped_gate_{pct}": gated["skipped"], f"loss_random_{pct}": random["loss"],
                    f"skipped_random_{pct}": random["skipped"]})
  return metrics


def _dense_frontier(means: common.Means, compute: float) -> float:
  """The dense models' loss linearly interpolated at ``compute`` (KeyError without dense runs)."""
  points = sorted((means[v]["compute"], means[v]["loss"]) for v in ("dense L2", "dense L3", "dense L4"))
  xs, ys = zip(*points)
  return float(np.interp(compute, xs, ys))


def _gate_beats_random(means: common.Means) -> bool:
  """At each budget: gate-ranked loss increase < half the random one at the fraction gate-ranked reached."""
  gs = means["gateskip L4"]
  budgets = [_pct(b) for b in BUDGETS if f"loss_gate_{_pct(b)}" in gs]
  if not budgets:
    raise KeyError("loss_gate_*")
  random = sorted([(0.0, gs["loss"])] + [(gs[f"skipped_random_{b}"], gs[f"loss_random_{b}"]) for b in budgets])
  xs, ys = zip(*random)
  return all(gs[f"loss_gate_{b}"] - gs["loss"] < 0.5 * (np.interp(gs[f"skipped_gate_{b}"], xs, ys) - gs["loss"])
             for b in budgets)


METRICS = (
    Metric("loss", "val loss", ".4f"),
    Metric("compute", "compute", ".2f"),
    *(m for b in BUDGETS for m in (Metric(f"loss_gate_{_pct(b)}", f"gate@{_pct(b)}%", ".4f"),
                                   Metric(f"loss_random_{_pct(b)}", f"random@{_pct(b)}%", ".4f"))),
    Metric("accuracy", "accuracy", ".3f"),
    Metric("acc_gate_20", "acc gate@20%", ".3f"),
    Metric("first_token_rank", "pos-0 rank", ".2f"),
    Metric("num_params", "params", ".0f"),
)

CLAIMS = (
    Claim("a", "gate-ranked skipping loses less than half the validation loss random skipping loses at the same "
          "skipped fraction, at every budget", ("gateskip L4",), _gate_beats_random),
    Claim("b", "at the 20% budget, GateSkip keeps >= 90% of its full-compute accuracy", ("gateskip L4",),
          lambda m: m["gateskip L4"]["acc_gate_20"] >= 0.9 * m["gateskip L4"]["accuracy"]),
    Claim("c", "skip-the-middle does not beat dense models of equal compute (negative result)",
          ("skip-middle L4", "dense L2", "dense L3", "dense L4"),
          lambda m: m["skip-middle L4"]["loss"] >= _dense_frontier(m, m["skip-middle L4"]["compute"])),
    Claim("d", "the first position's importance is above 90% of its sequence's tokens", ("gateskip L4",),
          lambda m: m["gateskip L4"]["first_token_rank"] >= 0.9),
)

# GateSkip abstract: up to 15% compute saved while retaining > 90% of baseline accuracy (long-form reasoning).
PAPER_NUMBERS = {"gateskip L4": {"saved at >=90% acc": 0.15}}


def write_summary(out_dir: pathlib.Path) -> str:
  """``loss_vs_compute.png`` and its markdown: every variant's (compute, loss) points from ``runs.jsonl``."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  runs = common.read_runs(out_dir)
  means = {v: {k: x for k, (x, _) in m.items()} for v, m in common.aggregate(
      runs, sorted({k for r in runs for k in r["metrics"]})).items()}
  curves: dict[str, list[tuple[float, float]]] = {}
  for variant, m in means.items():
    if variant.startswith("dense"):
      curves.setdefault("dense", []).append((m["compute"], m["loss"]))
    elif variant.startswith("skip-middle"):
      curves["skip-middle"] = [(m["compute"], m["loss"])]
    else:
      for rule in ("gate", "random"):
        points = [(1.0 - m[f"skipped_{rule}_{_pct(b)}"], m[f"loss_{rule}_{_pct(b)}"]) for b in BUDGETS
                  if f"loss_{rule}_{_pct(b)}" in m]
        curves[f"gateskip {rule}-ranked" if rule == "gate" else "gateskip random"] = [(1.0, m["loss"])] + points
  fig, ax = plt.subplots(figsize=(6, 4))
  lines = ["## Validation loss vs compute", "", "| series | (compute, val loss) |", "|---|---|"]
  for name, points in curves.items():
    points = sorted(points)
    ax.plot(*zip(*points), "o-" if len(points) > 1 else "s", label=name)
    lines.append(f"| {name} | " + ", ".join(f"({c:.2f}, {loss:.4f})" for c, loss in points) + " |")
  ax.set(xlabel="fraction of branch compute executed", ylabel="validation loss (nats/byte)",
         title="GateSkip and skip-the-middle vs dense depth")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out_dir / "loss_vs_compute.png", dpi=120)
  plt.close(fig)
  return "\n".join(lines) + "\n"


TABLE = SkipTable(
    name="gateskip",
    paper=("GateSkip (Laitenberger et al. 2025, arXiv 2510.13876) and Learning to Skip the Middle Layers of "
           "Transformers (Lawson & Aitchison 2025, arXiv 2506.21103)"),
    variants=_variants(4),
    scales=SCALES,
    metrics=METRICS,
    paper_columns=("saved at >=90% acc",),
    paper_numbers=PAPER_NUMBERS,
    claims=CLAIMS,
    micro_variants=("gateskip L4", "skip-middle L4"),
    summary=write_summary,
    runner=run,
    default_seeds=2,
    baseline="dense L4",
)
