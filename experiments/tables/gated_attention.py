"""Gated Attention for LLMs (Qiu et al. 2025, arXiv 2505.06708): Table 1 (gate position, granularity,
activation) and Table 4 (mean gate, massive activations, attention sink), on the embedded byte corpus.

    python -m experiments reproduce gated_attention [--scale tiny|small|paper] [--seeds N]

Variants (the ``gated_attention`` mixer's gate fields; every other setting is shared):

* ``baseline``: no gate (row 1); ``G1``: elementwise sigmoid gate on the SDPA output (row 5);
  ``G1-headwise``: one score per head (row 10); ``G2``/``G3``/``G4``: elementwise gates on the value / key /
  query projections (rows 6-8); ``G5``: on the output of W_O (row 9); ``G1-SiLU``: multiplicative SiLU
  (row 15); ``G1-additive``: ``Y + SiLU(X W)`` (row 14).

Metrics: validation loss (nats per byte; the paper reports PPL on its own corpora, so compare orderings, not
values), sink rate and first-token attention (F-Attn), M-Act (mean over layers of the largest |hidden
state|), mean gate score, parameter count.

Claims judged on our means: (a) G1 lowers validation loss and the attention sink (first-token attention lower,
sink rate not higher) against the baseline; (b) G1 beats G3, G4 and G5 in validation loss; (c) the sigmoid gate
beats SiLU (G1 vs G1-SiLU, validation loss).

Scales:

* ``tiny`` (default; 2 seeds, about 15 CPU-minutes for the nine variants — one seed of one variant measured at
  52 CPU-seconds — so ≤ 20 minutes on 2 CPU cores): 2 layers, d_model 64, 4 heads of 16, SwiGLU 256, sequence
  128 bytes, batch 16, 300 AdamW steps at 3e-3 with warmup-cosine.
* ``small`` (one accelerator, about an hour for the grid): 6 layers, d_model 384, 6 heads of 64, SwiGLU 1536,
  sequence 512, batch 32, 3000 steps at 2e-3 in bfloat16 (~4 passes over the 11 MB corpus).
* ``paper``: a dense proxy of the paper's 15A2B MoE (Table 7: 24 layers, hidden 2048, 32 query / 4 KV heads
  of 128, untied embeddings; the dense SwiGLU width 6144 equals the 8 active experts of 768) with the paper's
  schedule (max LR 2e-3, 1k warmup, cosine to 3e-5, batch 1024, sequence 4096, 100k steps). Runnable on a
  pod; the stdlib corpus is far too small for it, so point ``data.name`` at a real corpus.
"""

from experiments.tables.common import Claim, Metric, Table

def _gate(position: str = "none", granularity: str = "elementwise", activation: str = "sigmoid",
          mode: str = "multiplicative") -> dict:
  return {"model.mixer_kwargs": {"gate_position": position, "granularity": granularity,
                                 "gate_activation": activation, "gate_mode": mode}}


VARIANTS = {
    "baseline": _gate(),
    "G1": _gate("G1"),
    "G1-headwise": _gate("G1", granularity="headwise"),
    "G2": _gate("G2"),
    "G3": _gate("G3"),
    "G4": _gate("G4"),
    "G5": _gate("G5"),
    "G1-SiLU": _gate("G1", activation="silu"),
    "G1-additive": _gate("G1", activation="silu", mode="additive"),
}

_SHARED = {"model.mixer": "gated_attention", "model.mlp": "swiglu", "data.name": "stdlib_bytes",
           "model.vocab_size": 256, "optim.schedule": "warmup_cosine", "train.diagnostics": True}


def _scale(d_model, layers, heads, kv_heads, head_dim, mlp, seq, batch, steps, lr, warmup, min_lr_ratio,
           eval_batches, dtype="float32", tie=True):
  return {**_SHARED, "model.d_model": d_model, "model.num_layers": layers, "model.num_heads": heads,
          "model.num_kv_heads": kv_heads, "model.head_dim": head_dim, "model.mlp_hidden_dim": mlp,
          "model.tie_embeddings": tie, "model.max_len": seq, "data.seq_len": seq, "data.batch_size": batch,
          "train.steps": steps, "train.eval_every": steps, "train.eval_batches": eval_batches,
          "train.log_every": max(1, steps // 50), "train.checkpoint_every": steps,
          "train.compute_dtype": dtype, "optim.lr": lr, "optim.warmup_steps": warmup,
          "optim.min_lr_ratio": min_lr_ratio}


SCALES = {
    "micro": _scale(32, 1, 2, 2, 16, 64, 32, 4, 5, 1e-3, 1, 0.1, 1),
    "tiny": _scale(64, 2, 4, 4, 16, 256, 128, 16, 300, 3e-3, 30, 0.1, 8),
    "small": _scale(384, 6, 6, 6, 64, 1536, 512, 32, 3000, 2e-3, 300, 0.015, 32, dtype="bfloat16"),
    "paper": _scale(2048, 24, 32, 4, 128, 6144, 4096, 1024, 100_000, 2e-3, 1000, 0.015, 64,
                    dtype="bfloat16", tie=False),
}

METRICS = (
    Metric("loss", "val loss", ".4f"),
    Metric("sink_rate", "sink rate", ".2f"),
    Metric("first_token_attention", "F-Attn", ".3f"),
    Metric("max_activation", "M-Act", ".3g"),
    Metric("gate_mean", "mean gate", ".3f"),
    Metric("num_params", "params", ".0f"),
)

# Table 1 (Avg PPL) and Table 4 (mean gate, M-Act, F-Attn) of the paper, 15A2B MoE, 400B tokens.
PAPER_NUMBERS = {
    "baseline": {"PPL": 6.026, "M-Act": 1053, "F-Attn": 0.467},
    "G1": {"PPL": 5.761, "mean gate": 0.116, "M-Act": 94, "F-Attn": 0.048},
    "G1-headwise": {"PPL": 5.792, "mean gate": 0.172, "M-Act": 98, "F-Attn": 0.073},
    "G2": {"PPL": 5.820, "mean gate": 0.221, "M-Act": 125, "F-Attn": 0.297},
    "G3": {"PPL": 6.016},
    "G4": {"PPL": 5.981},
    "G5": {"PPL": 6.017},
    "G1-SiLU": {"PPL": 5.822},
    "G1-additive": {"PPL": 5.821},
}

CLAIMS = (
    Claim("a", "G1 lowers validation loss and the attention sink vs the baseline", ("baseline", "G1"),
          lambda m: (m["G1"]["loss"] < m["baseline"]["loss"]
                     and m["G1"]["first_token_attention"] < m["baseline"]["first_token_attention"]
                     and m["G1"]["sink_rate"] <= m["baseline"]["sink_rate"])),
    Claim("b", "G1 beats G3, G4 and G5 in validation loss", ("G1", "G3", "G4", "G5"),
          lambda m: m["G1"]["loss"] < min(m[v]["loss"] for v in ("G3", "G4", "G5"))),
    Claim("c", "a sigmoid gate beats SiLU (G1 vs G1-SiLU, validation loss)", ("G1", "G1-SiLU"),
          lambda m: m["G1"]["loss"] < m["G1-SiLU"]["loss"]),
)

TABLE = Table(
    name="gated_attention",
    paper="Gated Attention for LLMs (Qiu et al. 2025, arXiv 2505.06708), Tables 1 and 4",
    variants=VARIANTS,
    scales=SCALES,
    metrics=METRICS,
    paper_columns=("PPL", "mean gate", "M-Act", "F-Attn"),
    paper_numbers=PAPER_NUMBERS,
    claims=CLAIMS,
    micro_variants=("baseline", "G1"),
    default_seeds=2,
)
