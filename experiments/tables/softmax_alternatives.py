"""Softmax alternatives in attention, side by side: one byte-level LM per attention-score normalizer, same model,
data and budget, judged on the claims of each normalizer's paper.

    python -m experiments reproduce softmax_alternatives [--scale tiny|small|paper] [--seeds N]

Rows (``gated_attention`` mixer fields; everything else shared): ``softmax``; ``sigmoid`` with ``b = -log n``
(n the training length; arXiv 2409.04431 §3); ``softpick`` (arXiv 2504.20966 eq. 2); ``ssmax`` with a learned
``s`` per head (arXiv 2501.19399 eq. 2); ``stablemax`` (arXiv 2501.04697); ``rela`` — ReLU weights plus the
per-head RMSNorm of the output that ReLA needs to train (Zhang et al., EMNLP 2021; their norm is gated and
spans all heads: ours is the layer's ``sdpa_norm``); ``selective`` (position temperature, Zhang et al.,
NeurIPS 2024); ``clipped_softmax`` (γ = -0.025, arXiv 2306.12929 eq. 4); ``self_adjust`` (``x·softmax(x)``,
arXiv 2502.18277); ``softmax+G1`` (softmax with the elementwise sigmoid output gate, arXiv 2505.06708);
``lssa`` (softplus attention with the ``log d · log n`` length scale on cosine logits, arXiv 2501.13428 §3),
also evaluated with LSSAR's re-weighting (p = 15) switched on at inference; ``adaptive_temperature`` (softmax
with the entropy-set inverse temperature of arXiv 2410.01104, on in training and evaluation: it has no
gradient); ``entmax`` (α-entmax with α learned per head and layer, arXiv 1909.00015). Sinkhorn attention
(arXiv 2110.11773) is not a row: its column sums mix the queries, so in a causal LM a token would see the
scores of later ones (the op refuses ``causal=True``).

Adding a normalizer is one entry of ``VARIANTS`` (``_row(normalizer, **layer_fields)``): every metric below is
read from the layer's sown attention weights (``GatedAttention`` with the ``attention_weights`` collection
mutable, computed through the same ``pallas_kernels.attention`` call the model trains with), so a new row needs
no code of its own.

Metrics: validation loss (nats/byte) at the training length ``T`` and at 2T, 4T and 8T (length extrapolation:
the trained weights applied to longer windows of held-out text, same number of tokens; RoPE, sigmoid's bias and
SSMax's ``s`` stay as trained), and for ``lssa`` the same with the re-weighting on ("LSSAR"); attention
entropy (nats, each causal row renormalised to sum 1 — sigmoid, ReLA, softpick and clipped rows need not —
mean over rows, heads and layers of the first validation sequence) at T
and at 4T; the fraction of exactly-zero weights among the causally visible ones (same sequence, at T);
first-token attention and sink rate (share of heads whose mean weight on token 0 exceeds 0.3, Gu et al. arXiv
2410.10781, as Softpick's Table 2); the largest |hidden state| (M-Act) and the hidden-state kurtosis
(``gated_jax.train.metrics``; these four on the first validation batch, as the trainer's diagnostics); for
``entmax`` the learned α (mean, min, max over heads and layers; each head's value is in ``runs.jsonl`` as
``alpha_l{layer}_h{head}``).

Claims judged per seed and on the means: (a) SSMax extrapolates better than softmax (lower loss at 4T);
(b) softpick gives exact zeros and no sink, with a loss within 2% of softmax's; (c) sigmoid with b = -log n
matches softmax's loss (within 2%); (d) clipped softmax lowers the outliers (M-Act and kurtosis) against
softmax; (e) the G1 gate lowers them too; (f) LSSAR's re-weighting lowers LSSA's loss at 8T (arXiv 2501.13428:
nearly flat loss far past the training length); (g) adaptive temperature sharpens attention out of distribution
(lower entropy at 4T than softmax, arXiv 2410.01104); (h) learned α spreads across heads (max - min > 0.1)
and gives exact zeros, with a loss within 2% of softmax (arXiv 1909.00015's claims).

Scales:

* ``tiny`` (default; 2 CPU cores, ≤ 20 minutes for 13 rows × 2 seeds: about 40 s per run, 80 s for ``entmax``,
  whose bisection runs in the reference implementation): 2 layers, d_model 64, 4 heads of 16,
  SwiGLU 256, T = 64 bytes, batch 16, 400 AdamW steps at 3e-3, warmup-cosine.
* ``small`` (one accelerator): 6 layers, d_model 384, 6 heads of 64, T = 512, batch 32, 3000 steps, bfloat16.
* ``paper``: Softpick's 340M setting (24 layers, d_model 1024, 16 heads, T = 4096, batch 128, 100k steps at
  3e-4); point ``data.name`` at a real corpus.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.tables.common import Claim, Metric, Table
from gated_jax.data import pipeline
from gated_jax.layers.attention import ATTENTION_WEIGHTS, ENTMAX_ALPHA, entmax_alpha
from gated_jax.train import metrics as train_metrics
from gated_jax.train import step, train

EXTRAPOLATION = (2, 4, 8)  # evaluated lengths, as multiples of the training length
LOSS_TOLERANCE = 0.02  # "close to" / "matches": within 2% of softmax's validation loss


def _row(normalizer: str, gate: str = "none", **layer_fields: Any) -> dict[str, Any]:
  return {"model.mixer_kwargs": {"normalizer": normalizer, "gate_position": gate, **layer_fields}}


VARIANTS = {
    "softmax": _row("softmax"),
    "sigmoid": _row("sigmoid"),
    "softpick": _row("softpick"),
    "ssmax": _row("ssmax"),
    "stablemax": _row("stablemax"),
    "rela": _row("relu", sdpa_norm=True),
    "selective": _row("selective"),
    "clipped_softmax": _row("clipped_softmax"),
    "self_adjust": _row("self_adjust"),
    "softmax+G1": _row("softmax", gate="G1"),
    "lssa": _row("lssa"),
    "adaptive_temperature": _row("adaptive_temperature"),
    "entmax": _row("entmax", implementation="reference"),  # bisection over the row: reference only
}

_SHARED = {"model.mixer": "gated_attention", "model.mlp": "swiglu", "data.name": "stdlib_bytes",
           "model.vocab_size": 256, "optim.schedule": "warmup_cosine", "train.diagnostics": True}


def _scale(d_model, layers, heads, mlp, seq, batch, steps, lr, warmup, eval_batches, dtype="float32"):
  return {**_SHARED, "model.d_model": d_model, "model.num_layers": layers, "model.num_heads": heads,
          "model.mlp_hidden_dim": mlp, "model.max_len": seq, "data.seq_len": seq, "data.batch_size": batch,
          "train.steps": steps, "train.eval_every": steps, "train.eval_batches": eval_batches,
          "train.log_every": max(1, steps // 50), "train.checkpoint_every": steps, "train.compute_dtype": dtype,
          "optim.lr": lr, "optim.warmup_steps": warmup}


SCALES = {
    "micro": {**_scale(32, 1, 2, 64, 16, 4, 4, 1e-3, 1, 1), "data.corpus_bytes": 200_000},
    "tiny": _scale(64, 2, 4, 256, 64, 16, 400, 3e-3, 40, 4),
    "small": _scale(384, 6, 6, 1536, 512, 32, 3000, 2e-3, 300, 16, dtype="bfloat16"),
    "paper": _scale(1024, 24, 16, 4096, 4096, 128, 100_000, 3e-4, 1000, 32, dtype="bfloat16"),
}

ROW_METRICS = ("loss_2x_reweighted", "loss_4x_reweighted", "loss_8x_reweighted", "alpha_mean", "alpha_min",
               "alpha_max")  # reported by the lssa / entmax rows only

METRICS = (
    Metric("loss", "val loss T", ".4f"),
    Metric("loss_2x", "val loss 2T", ".4f"),
    Metric("loss_4x", "val loss 4T", ".4f"),
    Metric("loss_8x", "val loss 8T", ".4f"),
    Metric("loss_2x_reweighted", "LSSAR 2T", ".4f"),
    Metric("loss_4x_reweighted", "LSSAR 4T", ".4f"),
    Metric("loss_8x_reweighted", "LSSAR 8T", ".4f"),
    Metric("entropy", "entropy T", ".2f"),
    Metric("entropy_4x", "entropy 4T", ".2f"),
    Metric("zero_fraction", "exact zeros", ".3f"),
    Metric("first_token_attention", "F-Attn", ".3f"),
    Metric("sink_rate", "sink rate", ".2f"),
    Metric("max_activation", "M-Act", ".3g"),
    Metric("kurtosis", "kurtosis", ".3g"),
    Metric("alpha_mean", "α mean", ".3f"),
    Metric("alpha_min", "α min", ".3f"),
    Metric("alpha_max", "α max", ".3f"),
)

# Softpick's Table 3 (340M, 10k steps; sink rate at 0.3 and zeros as fractions) and Bondarenko et al.'s Table 2
# (BERT: max ∞-norm and kurtosis; their "gated" row is a per-head gate, not G1, so it is not shown).
PAPER_COLUMNS = ("sink (Softpick T3)", "kurtosis (Softpick T3)", "zeros (Softpick T3)", "∞-norm (BERT)",
                 "kurtosis (BERT)")
PAPER_NUMBERS = {
    "softmax": {"sink (Softpick T3)": 0.3489, "kurtosis (Softpick T3)": 6452.72, "zeros (Softpick T3)": 0.0016,
                "∞-norm (BERT)": 735, "kurtosis (BERT)": 3076},
    "softpick": {"sink (Softpick T3)": 0.0, "kurtosis (Softpick T3)": 281.57, "zeros (Softpick T3)": 0.9274},
    "softmax+G1": {"sink (Softpick T3)": 0.02, "kurtosis (Softpick T3)": 135.62, "zeros (Softpick T3)": 0.0073},
    "clipped_softmax": {"∞-norm (BERT)": 21.5, "kurtosis (BERT)": 80},
}


def _within(m, variant: str, tolerance: float = LOSS_TOLERANCE) -> bool:
  return m[variant]["loss"] <= (1 + tolerance) * m["softmax"]["loss"]


def _fewer_outliers(variant: str):
  return lambda m: (m[variant]["max_activation"] < m["softmax"]["max_activation"]
                    and m[variant]["kurtosis"] < m["softmax"]["kurtosis"])


CLAIMS = (
    Claim("ssmax", "SSMax extrapolates better than softmax (lower validation loss at 4T)", ("softmax", "ssmax"),
          lambda m: m["ssmax"]["loss_4x"] < m["softmax"]["loss_4x"]),
    Claim("softpick", "softpick gives exact zeros and no attention sink, with a loss within 2% of softmax",
          ("softmax", "softpick"), lambda m: (m["softpick"]["zero_fraction"] > 0 and m["softpick"]["sink_rate"] == 0
                                              and _within(m, "softpick"))),
    Claim("sigmoid", "sigmoid attention with b = -log n matches softmax's loss (within 2%)", ("softmax", "sigmoid"),
          lambda m: abs(m["sigmoid"]["loss"] - m["softmax"]["loss"]) <= LOSS_TOLERANCE * m["softmax"]["loss"]),
    Claim("clipped", "clipped softmax lowers the outliers (M-Act and kurtosis) against softmax",
          ("softmax", "clipped_softmax"), _fewer_outliers("clipped_softmax")),
    Claim("gate", "the G1 output gate lowers the outliers (M-Act and kurtosis) against softmax",
          ("softmax", "softmax+G1"), _fewer_outliers("softmax+G1")),
    Claim("lssar", "LSSAR's re-weighting lowers LSSA's validation loss at 8T", ("lssa",),
          lambda m: m["lssa"]["loss_8x_reweighted"] < m["lssa"]["loss_8x"]),
    Claim("adaptive", "adaptive temperature gives lower attention entropy at 4T than softmax",
          ("softmax", "adaptive_temperature"),
          lambda m: m["adaptive_temperature"]["entropy_4x"] < m["softmax"]["entropy_4x"]),
    Claim("entmax", "learned α spreads across heads (max - min > 0.1), gives exact zeros, loss within 2% of softmax",
          ("softmax", "entmax"), lambda m: (m["entmax"]["alpha_max"] - m["entmax"]["alpha_min"] > 0.1
                                            and m["entmax"]["zero_fraction"] > 0 and _within(m, "entmax"))),
)


def attention_statistics(weights: Sequence[np.ndarray]) -> dict[str, float]:
  """Entropy (nats, rows renormalised to sum 1; all-zero rows skipped) and the fraction of exactly-zero weights
  among the causally visible ones, averaged over layers, from per-layer ``(B, T, H, T)`` causal weights."""
  entropies, zeros = [], []
  for p in weights:
    p = np.asarray(p, np.float64)
    visible = np.tril(np.ones(p.shape[1:2] * 2, bool))[None, :, None, :]  # (1, T, 1, S): key j <= query i
    zeros.append(float(np.sum((p == 0) & visible) / (np.sum(visible) * p.shape[0] * p.shape[2])))
    total = p.sum(-1, keepdims=True)
    q = np.divide(p, total, out=np.zeros_like(p), where=total > 0)
    row_entropy = -np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0), axis=-1)
    entropies.append(float(row_entropy[total[..., 0] > 0].mean()))
  return {"entropy": float(np.mean(entropies)), "zero_fraction": float(np.mean(zeros))}


def _longer(config: ml_collections.ConfigDict, factor: int) -> ml_collections.ConfigDict:
  """The data config at ``factor`` times the training length with as many tokens per batch (at least 1 row)."""
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.seq_len = config.data.seq_len * factor
  data.batch_size = max(1, config.data.batch_size // factor)
  return data


def _loss_at(model, params, data: ml_collections.ConfigDict, num_batches: int) -> float:
  """Validation loss (nats/byte) of the first ``num_batches`` batches of ``data``."""
  @jax.jit
  def sums(params, batch):
    loss, _, weight = step.weighted_sums(model.apply({"params": params}, batch["inputs"]), batch)
    return jnp.stack([loss, weight])

  batches = pipeline.eval_batches(data, num_batches=num_batches)
  loss, weight = np.sum([np.asarray(sums(params, batch)) for batch in batches], axis=0)
  return float(loss / max(weight, 1.0))


def _statistics_at(model, params, data: ml_collections.ConfigDict) -> dict[str, float]:
  """``attention_statistics`` of the first validation sequence of ``data`` (one row: O(T²) memory per head)."""
  inputs = pipeline.eval_batches(data, num_batches=1)[0]["inputs"][:1]
  _, state = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=[ATTENTION_WEIGHTS]))(params, inputs)
  return attention_statistics(train_metrics.collect(state[ATTENTION_WEIGHTS], "weights"))


def run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
  """The table's runner: ``gated_jax.train.train`` (validation loss, sink and activation diagnostics at T),
  then the trained parameters' validation loss at 2T, 4T and 8T (and with LSSAR for ``lssa``), attention
  statistics at T and 4T, and the learned α of ``entmax``."""
  result = train(config, workdir=str(workdir))
  metrics = {**{k: float(v) for k, v in result.eval.items()}, "num_params": int(result.num_params)}
  model, params = step.make_model(config), result.params
  metrics.update(_statistics_at(model, params, config.data))
  for factor in EXTRAPOLATION:
    metrics[f"loss_{factor}x"] = _loss_at(model, params, _longer(config, factor), config.train.eval_batches)
  metrics["entropy_4x"] = _statistics_at(model, params, _longer(config, 4))["entropy"]
  normalizer = config.model.mixer_kwargs["normalizer"]
  if normalizer == "lssa":  # the same parameters with LSSAR's re-weighting switched on
    reweighted = step.make_model(_with_mixer_fields(config, normalizer="lssar", implementation="reference"))
    for factor in EXTRAPOLATION:
      metrics[f"loss_{factor}x_reweighted"] = _loss_at(reweighted, params, _longer(config, factor),
                                                       config.train.eval_batches)
  if normalizer == "entmax":
    metrics.update(learned_alpha(params))
  return {"metrics": metrics, "history": result.history}


def _with_mixer_fields(config: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.mixer_kwargs = {**dict(config.model.mixer_kwargs), **fields}
  return config


def learned_alpha(params) -> dict[str, float]:
  """α of every entmax layer and head (``alpha_l{layer}_h{head}``, layers in parameter order) with their mean,
  min and max."""
  found = [(jax.tree_util.keystr(path), leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
           if ENTMAX_ALPHA in jax.tree_util.keystr(path)]
  alphas = [np.asarray(entmax_alpha(jnp.asarray(leaf))) for _, leaf in sorted(found, key=lambda item: item[0])]
  if not alphas:
    raise ValueError(f"params: no {ENTMAX_ALPHA!r} parameter; allowed: a model with normalizer='entmax'")
  values = {f"alpha_l{layer}_h{head}": float(a) for layer, alpha_H in enumerate(alphas)
            for head, a in enumerate(alpha_H)}
  every = np.concatenate(alphas)
  return {**values, "alpha_mean": float(every.mean()), "alpha_min": float(every.min()),
          "alpha_max": float(every.max())}


TABLE = Table(
    name="softmax_alternatives",
    paper=("Softmax alternatives in attention: sigmoid (arXiv 2409.04431), softpick (arXiv 2504.20966), SSMax "
           "(arXiv 2501.19399), StableMax (arXiv 2501.04697), ReLA (EMNLP 2021), selective (NeurIPS 2024), "
           "clipped softmax (arXiv 2306.12929), self-adjust (arXiv 2502.18277), G1 gate (arXiv 2505.06708), "
           "LSSA/LSSAR (arXiv 2501.13428), adaptive temperature (arXiv 2410.01104), learned-α entmax "
           "(arXiv 1909.00015)"),
    variants=VARIANTS,
    scales=SCALES,
    metrics=METRICS,
    paper_columns=PAPER_COLUMNS,
    paper_numbers=PAPER_NUMBERS,
    claims=CLAIMS,
    micro_variants=("softpick",),
    runner=run,
    default_seeds=2,
    plot_metric="loss",
    baseline="softmax",
)
