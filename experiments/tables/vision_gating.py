"""Gated vision attention on scikit-learn's digits: ConViT's sample efficiency (d'Ascoli et al. arXiv
2103.10697 §4.1, Table 2) and the Gated-SwinRMT ordering (Maity et al. arXiv 2604.06014, abstract), with
ViT and ViG (Liao et al. arXiv 2405.18425) beside them.

    python -m experiments reproduce vision_gating [--scale tiny|small|paper] [--seeds N]

Data (``gated_jax.data.digit_images``): the 8x8 digits as a 4x4 grid of 2x2-pixel patches (16 tokens), a fixed
stratified 80/20 split; each model trains on a class-balanced 10%, 25% or 100% of the training split (144,
359 or 1,437 images) for the same number of steps, and is scored on the whole test split (360 images).

Models (``gated_jax.models.VisionClassifier``: patch embedding, 6 pre-norm blocks of mixer + GELU MLP, d_model
48, 4 heads, mean pooling): ``vit`` (learned position embedding), ``convit`` (4 GPSA blocks with locality
initialisation, then 2 attention blocks; position embedding as ConViT), ``vig`` (bidirectional GLA with the
3x3 conv and the 2-D locality gate), ``swin_rmt`` (the RMT baseline: window retention with Manhattan decay and
LCE), ``gated_swin_rmt_retention`` (+ G1 gate) and ``gated_swin_rmt_swat`` (sigmoid attention, balanced
ALiBi, decay, SwiGLU values); the Swin-RMT models use 2x2 windows shifted by one patch on odd blocks and no
position embedding (their decay carries position). No data augmentation, no class token, no distillation.

Claims, judged on test accuracy:

* ``convit_sample_efficiency``: ConViT beats ViT by more at 10% of the data than at 100% ("much improved
  sample efficiency", the gap growing as data shrink: Table 2), and beats it at 10%.
* ``swinrmt_ordering``: on the full data, Gated-SwinRMT-SWAT > Gated-SwinRMT-Retention > the RMT baseline
  (Mini-ImageNet: 80.22 > 78.20 > 73.74).
* ``swinrmt_small_maps``: on small feature maps the advantage of the gated variants over RMT is small (CIFAR-10:
  +0.56 pp instead of +6.48 pp): the best gated variant is within 1 point of RMT on the full data. Our map is
  4x4 patches, smaller than CIFAR-10's.

Paper column: top-1 accuracy. ``vit``/``convit`` rows: DeiT-S / ConViT-S on class-balanced ImageNet subsets
(ConViT Table 2 as we recall it: 10%: 48.0 / 59.6, 100%: 79.9 / 81.4 — not re-checked against the paper in
this session); Swin-RMT rows: Mini-ImageNet, full data (abstract). Different datasets and scales: compare
orderings and gaps, not values.

Scales: ``tiny`` (default; 3 seeds; 17.1 minutes measured on an idle 2-core machine with an empty compilation
cache): the above, 300 AdamW steps of batch 64 at 1e-3 (warmup-cosine). ``small`` (an accelerator): 64 pixel tokens
(patch 1, 8x8 grid, 4x4 windows), d_model 96, 3,000 steps, 5 seeds. ``paper``: the papers train 300 epochs on
ImageNet-scale data with DeiT augmentation; not reproducible on the digits — ``paper`` runs the ``small`` grid for
20,000 steps with 10 seeds.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import ml_collections
import numpy as np

from experiments.tables.common import Claim, Metric, Table

FRACTIONS = {"10%": 0.1, "25%": 0.25, "100%": 1.0}
_SWIN = {"model.position_embedding": False, "model.mixer_kwargs": {"window": 2}}
MODELS: dict[str, dict[str, Any]] = {
    "vit": {"model.mixer": "vit"},
    "convit": {"model.mixer": ("convit",) * 4 + ("vit",) * 2},
    "vig": {"model.mixer": "vig"},
    "swin_rmt": {"model.mixer": "swin_rmt", **_SWIN},
    "gated_swin_rmt_retention": {"model.mixer": "gated_swin_rmt_retention", **_SWIN},
    "gated_swin_rmt_swat": {"model.mixer": "gated_swin_rmt_swat", **_SWIN},
}
PAPER_COLUMNS = ("paper top-1",)
PAPER_NUMBERS = {"vit@10%": 48.0, "convit@10%": 59.6, "vit@100%": 79.9, "convit@100%": 81.4,
                 "swin_rmt@100%": 73.74, "gated_swin_rmt_retention@100%": 78.20, "gated_swin_rmt_swat@100%": 80.22}


def variant(model: str, fraction: str) -> str:
  return f"{model}@{fraction}"


def base_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "seed": 0,
      "model": {"image_size": (8, 8), "patch_size": 2, "num_classes": 10, "d_model": 48, "num_layers": 6,
                "num_heads": 4, "mixer": "vit", "mixer_kwargs": {}, "mlp": "gelu", "mlp_hidden_dim": 192,
                "position_embedding": True},
      "data": {"fraction": 1.0, "batch_size": 64},
      "optim": {"lr": 1e-3, "warmup_steps": 20, "schedule": "warmup_cosine", "min_lr_ratio": 0.1, "b1": 0.9,
                "b2": 0.999, "eps": 1e-8, "weight_decay": 0.05, "clip_norm": 1.0},
      "train": {"steps": 300, "log_every": 20},
  })


@functools.lru_cache(maxsize=4)
def _compiled(model_json: str, optim_json: str, steps: int):
  """``(model, init, train_step, predict)`` for one model/optimizer/length: every (fraction, seed) run of a
  model reuses the same compiled functions."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from gated_jax.models import VisionClassifier  # pylint: disable=import-outside-toplevel
  from gated_jax.train import optim  # pylint: disable=import-outside-toplevel

  fields = json.loads(model_json)
  fields["image_size"] = tuple(fields["image_size"])
  if isinstance(fields["mixer"], list):
    fields["mixer"] = tuple(fields["mixer"])
  model = VisionClassifier(**fields)
  optim_config = ml_collections.ConfigDict(json.loads(optim_json))
  tx = optim.make_optimizer(optim_config, steps)

  def init(key, images):
    params = nn.unbox(model.init(key, images)["params"])
    return params, tx.init(params)

  def loss_fn(params, images, labels):
    logits = model.apply({"params": params}, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits.argmax(-1) == labels).mean()

  @jax.jit
  def train_step(params, opt_state, images, labels):
    (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, images, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, accuracy

  predict = jax.jit(lambda params, images: model.apply({"params": params}, images).argmax(-1))
  return model, jax.jit(init), train_step, predict


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
  """Trains the classifier of ``config`` on its fraction of the digits and scores it on the test split."""
  del workdir
  import jax  # pylint: disable=import-outside-toplevel

  from gated_jax.data import digit_images  # pylint: disable=import-outside-toplevel

  train_x, train_y, test_x, test_y = digit_images.split()
  subset = digit_images.balanced_subset(train_y, config.data.fraction, config.seed)
  batch, steps = config.data.batch_size, config.train.steps
  model_json = json.dumps(config.model.to_dict(), sort_keys=True, default=list)
  _, init, train_step, predict = _compiled(model_json, json.dumps(config.optim.to_dict(), sort_keys=True), steps)
  params, opt_state = init(jax.random.key(config.seed), train_x[:1])
  rng = np.random.default_rng([config.seed, 1])
  order = np.concatenate([rng.permutation(subset) for _ in range(-(-steps * batch // len(subset)))])
  history = []
  for i in range(steps):
    idx = order[i * batch:(i + 1) * batch]
    params, opt_state, loss, accuracy = train_step(params, opt_state, train_x[idx], train_y[idx])
    if (i + 1) % config.train.log_every == 0 or i + 1 == steps:
      history.append({"step": i + 1, "loss": float(loss), "accuracy": float(accuracy)})
  test_accuracy = float(np.mean(np.asarray(predict(params, test_x)) == test_y))
  return {"metrics": {"accuracy": 100.0 * test_accuracy, "train_accuracy": 100.0 * history[-1]["accuracy"],
                      "train_examples": len(subset),
                      "num_params": sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))},
          "history": history}


def _acc(means, model: str, fraction: str) -> float:
  return means[variant(model, fraction)]["accuracy"]


def _convit_claim(means) -> bool:
  gap = {f: _acc(means, "convit", f) - _acc(means, "vit", f) for f in ("10%", "100%")}
  return gap["10%"] > 0 and gap["10%"] > gap["100%"]


def _ordering_claim(means) -> bool:
  return (_acc(means, "gated_swin_rmt_swat", "100%") > _acc(means, "gated_swin_rmt_retention", "100%")
          > _acc(means, "swin_rmt", "100%"))


def _small_map_claim(means) -> bool:
  best = max(_acc(means, m, "100%") for m in ("gated_swin_rmt_swat", "gated_swin_rmt_retention"))
  return abs(best - _acc(means, "swin_rmt", "100%")) <= 1.0


_MICRO = {"model.d_model": 8, "model.num_layers": 1, "model.num_heads": 4, "model.mlp_hidden_dim": 16,
          "data.batch_size": 8, "train.steps": 2, "train.log_every": 1, "optim.warmup_steps": 1}
_SMALL = {"model.patch_size": 1, "model.d_model": 96, "data.batch_size": 128, "train.steps": 3000,
          "train.log_every": 100, "optim.warmup_steps": 200}
TABLE = Table(
    name="vision_gating",
    paper="ConViT (d'Ascoli et al., arXiv 2103.10697) Table 2: sample efficiency; Gated-SwinRMT (Maity et al., "
          "arXiv 2604.06014) abstract: SWAT > Retention > RMT; ViG (arXiv 2405.18425). Digits, 10/25/100% of the "
          "training split.",
    variants={variant(m, f): {**MODELS[m], "data.fraction": value} for m in MODELS for f, value in FRACTIONS.items()},
    scales={"micro": _MICRO, "tiny": {}, "small": _SMALL, "paper": {**_SMALL, "train.steps": 20_000}},
    metrics=(Metric("accuracy", "test acc %", ".1f"), Metric("train_accuracy", "train acc %", ".1f"),
             Metric("train_examples", "train images", ".0f"), Metric("num_params", "params", ".0f")),
    paper_columns=PAPER_COLUMNS,
    paper_numbers={name: {PAPER_COLUMNS[0]: value} for name, value in PAPER_NUMBERS.items()},
    claims=(
        Claim("convit_sample_efficiency", "ConViT beats ViT at 10% of the data, by more than at 100%",
              tuple(variant(m, f) for m in ("vit", "convit") for f in ("10%", "100%")), _convit_claim),
        Claim("swinrmt_ordering", "Gated-SwinRMT-SWAT > Gated-SwinRMT-Retention > RMT baseline (100% data)",
              tuple(variant(m, "100%") for m in ("gated_swin_rmt_swat", "gated_swin_rmt_retention", "swin_rmt")),
              _ordering_claim),
        Claim("swinrmt_small_maps", "on small maps the gated variants are within 1 point of RMT (100% data)",
              tuple(variant(m, "100%") for m in ("gated_swin_rmt_swat", "gated_swin_rmt_retention", "swin_rmt")),
              _small_map_claim),
    ),
    base_config=base_config,
    micro_variants=(variant("convit", "10%"),),
    runner=run,
    default_seeds=3,
    plot_metric="accuracy",
    curve_key="loss",
    baseline=variant("vit", "100%"),
)
