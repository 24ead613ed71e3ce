"""Zoology MQAR (Arora et al., arXiv 2312.04927, Figure 2; recall-vs-state plot of the Zoology README):
multi-query associative recall accuracy of 2-layer, MLP-free models vs width and recurrent-state size.

    python -m experiments reproduce mqar [--scale tiny|small|paper]

writes the run grid (table.md, table.csv, runs.jsonl, plot.png, claims) and the best-over-lr summary
(summary.md and accuracy_vs_state.png: accuracy vs width and vs recurrent-state size).

Mixers: softmax attention (``gated_attention`` without gate, 1 head as in Zoology), ``linear_attention``,
``retnet``, ``gla``, ``mlstm``, ``deltanet``, ``gated_deltanet``, ``gsa`` (2 heads, as the Based repro's
GLA/DeltaNet/GDN) and a hybrid ``gla+swa`` (GLA then sliding-window attention of 16 tokens). The kernelised
mixers use ``expand_k = expand_v = 1`` (fla's defaults halve GLA/mLSTM keys and double RetNet/GDN values), so
at equal width their states are equal (``heads × (d/heads)²`` floats, plus the delta rules' short-conv state);
GSA gets ``m = d / heads / 2`` slots so that its two ``(d/heads) × m`` states match (fla's default is 64). Every
(mixer, task, width, learning rate) is one run; as in Zoology the reported number is the best validation
accuracy over learning rates. State size is the bytes of a layer's decode cache at the model's dims (the
recurrent state; attention's KV cache at the sequence length), from ``model.init(..., decode=True)``.

Claims judged on the best-over-lr accuracies: (a) attention is near 1.0 (≥ 0.9) at every task and width;
(b) at equal width (hence equal state, see above), the delta rule (DeltaNet and
Gated DeltaNet) is at least GLA, which is at least plain linear attention.

Scales (grids in ``experiments/configs/mqar.py``): ``tiny`` L=64, 4 pairs, vocab 256 (not 8192), widths
{32, 64}, lr 3e-3 only, 300 steps of batch 32, meant for 2 CPU cores in ≤ 20 minutes; ``small`` L=128, 8 pairs,
vocab 8192, widths {64, 128, 256}, Zoology's 4 learning rates, 16 epochs (one accelerator); ``paper`` Zoology's
Figure 2 grid: (L, pairs) ∈ {(64, 4), (128, 8), (256, 16), (512, 64)}, widths {64, 128, 256, 512}, 4
learning rates, 64 epochs of 100k examples.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from experiments.configs import mqar as mqar_config
from experiments.tables import common
from experiments.tables.common import Claim, Metric, Table

_ATTENTION = {"gate_position": "none"}
_SQUARE = {"expand_k": 1.0, "expand_v": 1.0}  # state heads x (d/H)^2 for every kernelised mixer
MIXERS = {
    "attention": {"model.mixer": "gated_attention", "model.mixer_kwargs": _ATTENTION, "model.num_heads": 1},
    **{name: {"model.mixer": name, "model.mixer_kwargs": _SQUARE, "model.num_heads": 2}
       for name in ("linear_attention", "retnet", "gla", "mlstm", "deltanet", "gated_deltanet")},
    "gsa": {"model.mixer": "gsa", "model.mixer_kwargs": {}, "model.num_heads": 2},
    "gla+swa": {"model.mixer": ("gla", "gated_attention"),
                "model.mixer_kwargs": (_SQUARE, {**_ATTENTION, "window": 16}), "model.num_heads": 2},
}
MICRO_MIXERS = ("attention", "gla")

# Zoology's published numbers [approx, read off figures] (reference/linear_attention.md §9.4).
PAPER_COLUMNS = ("acc (Fig. 2)",)
PAPER_ATTENTION = 1.0  # "Attention is ≈1.0 at every d and L"
PAPER_STATE_CURVES = {  # Zoology README "Recall-Memory Tradeoff": (state size, accuracy)
    "gla": ((5e3, 0.53), (1.8e4, 0.77), (7e4, 0.95)),
    "deltanet": ((9e3, 0.79), (3.5e4, 0.96), (1.3e5, 0.995)),
    "gated_deltanet": ((1.7e4, 0.89), (6.6e4, 0.99), (2.6e5, 0.995)),
}


@dataclasses.dataclass(frozen=True)
class Point:
  """One run of the grid."""
  mixer: str
  seq_len: int
  num_kv_pairs: int
  d_model: int
  lr: float

  @property
  def name(self) -> str:
    return f"{self.mixer} L{self.seq_len}/kv{self.num_kv_pairs} d{self.d_model} lr{self.lr:g}"


def grid(scale: str) -> tuple[Point, ...]:
  """The runs of ``scale`` (``micro``: two mixers, one width and lr)."""
  sweep = mqar_config.SWEEPS[scale]
  mixers = MICRO_MIXERS if scale in common.HIDDEN_SCALES else tuple(MIXERS)
  return tuple(Point(m, seq, kv, d, lr) for m in mixers for seq, kv in sweep.tasks for d in sweep.widths
               for lr in sweep.lrs)


def _all_points() -> dict[str, Point]:
  sweeps = mqar_config.SWEEPS.values()
  return {p.name: p for s in sweeps for p in (Point(m, *task, d, lr) for m in MIXERS for task in s.tasks
                                               for d in s.widths for lr in s.lrs)}


_POINTS = _all_points()  # every scale's grid: variant name -> point


def best_over_lr(means: common.Means, key: str = "accuracy") -> dict[tuple[str, int, int], float]:
  """``(mixer, seq_len, d_model) -> best mean accuracy over learning rates`` of the runs present."""
  best: dict[tuple[str, int, int], float] = {}
  for name, metrics in means.items():
    point = _POINTS.get(name)
    if point is not None and key in metrics:
      k = (point.mixer, point.seq_len, point.d_model)
      best[k] = max(best.get(k, float("-inf")), metrics[key])
  return best


def _attention_near_one(means: common.Means) -> bool:
  scores = [acc for (mixer, _, _), acc in best_over_lr(means).items() if mixer == "attention"]
  if not scores:
    raise KeyError("accuracy of attention")
  return min(scores) >= 0.9


def _delta_above_gla_above_linear(means: common.Means) -> bool:
  best = best_over_lr(means)
  mixers = ("deltanet", "gated_deltanet", "gla", "linear_attention")
  points = {(seq, d) for (m, seq, d) in best if m == "gla"}
  points = [p for p in points if all((m, *p) in best for m in mixers)]
  if not points:
    raise KeyError("accuracy of deltanet, gated_deltanet, gla and linear_attention at a shared width")
  return all(min(best[("deltanet", *p)], best[("gated_deltanet", *p)]) >= best[("gla", *p)]
             >= best[("linear_attention", *p)] for p in points)


class MQARTable(Table):
  """The generic table with a scale-dependent grid: variants are the (mixer, task, width, lr) points."""

  def run_variants(self, scale: str) -> tuple[str, ...]:
    if scale not in self.scales:
      raise ValueError(f"scale: got {scale!r}; allowed: {', '.join(self.scales)}")
    return tuple(p.name for p in grid(scale))

  def config(self, scale: str, variant: str, seed: int = 0) -> ml_collections.ConfigDict:
    if scale not in self.scales:
      raise ValueError(f"scale: got {scale!r}; allowed: {', '.join(self.scales)}")
    if variant not in _POINTS:
      raise ValueError(f"variant: got {variant!r}; allowed: names like {grid('tiny')[0].name!r}")
    point = _POINTS[variant]
    config = mqar_config.get_config(scale)
    overrides = mqar_config.run_overrides(mqar_config.SWEEPS[scale], point.seq_len, point.num_kv_pairs,
                                          point.d_model, point.lr)
    config = common.apply_overrides(config, {**overrides, **MIXERS[point.mixer]})
    if point.mixer == "gsa":  # m = head_dim / 2 slots: state 2 * head_dim * m = head_dim^2, as the others
      config.model.mixer_kwargs = {"num_slots": max(1, point.d_model // config.model.num_heads // 2)}
    config.seed = int(config.get("seed", 0)) + seed
    return config


TABLE = MQARTable(
    name="mqar",
    paper="Zoology (Arora et al., ICLR 2024, arXiv 2312.04927), Figure 2 and the README recall-vs-state plot: "
          "MQAR accuracy of 2-layer MLP-free models (best over learning rates).",
    variants={name: MIXERS[p.mixer] for name, p in _POINTS.items()},
    scales={scale: {} for scale in mqar_config.SWEEPS},
    metrics=(Metric("accuracy", "accuracy", ".3f"), Metric("loss", "val loss", ".3f"),
             Metric("num_params", "params", ".0f")),
    paper_columns=PAPER_COLUMNS,
    paper_numbers={name: {PAPER_COLUMNS[0]: PAPER_ATTENTION} for name, p in _POINTS.items()
                   if p.mixer == "attention"},
    claims=(
        Claim("attention", "attention solves MQAR (best accuracy ≥ 0.9, paper ≈ 1.0) at every task and width",
              (), _attention_near_one),
        Claim("delta>gla>linear", "at equal width and state size, DeltaNet and Gated DeltaNet ≥ GLA ≥ linear "
              "attention (best accuracy over lr, every task and width)", (), _delta_above_gla_above_linear),
    ),
    micro_variants=tuple(p.name for p in grid("micro")),
    summary=lambda out_dir: write_summary(out_dir),  # pylint: disable=unnecessary-lambda (defined below)
)


@functools.lru_cache(maxsize=None)
def _state_bytes_cached(model_json: str) -> int:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from gated_jax.models import lm_from_config  # pylint: disable=import-outside-toplevel

  model_config = ml_collections.ConfigDict(json.loads(model_json))
  model = lm_from_config(model_config)
  tokens = jax.ShapeDtypeStruct((1, model_config.max_len), jnp.int32)
  shapes = jax.eval_shape(lambda t: model.init(jax.random.key(0), t, decode=True), tokens)
  leaves = jax.tree.leaves(shapes.get("cache", {}))
  total = sum(x.size * x.dtype.itemsize for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))
  return total // model_config.num_layers


def state_bytes(model_config: Mapping[str, Any]) -> int:
  """Bytes of one layer's decode cache (recurrent state, or KV cache at ``max_len``), batch 1, mean over
  layers (float leaves only; the cache index is not state)."""
  return _state_bytes_cached(json.dumps(dict(model_config), sort_keys=True, default=list))


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Best-over-lr accuracy per (mixer, task, width) with the state size and the best lr."""
  best: dict[tuple[str, int, int], dict[str, Any]] = {}
  for run in runs:
    point = _POINTS[run["variant"]]
    key = (point.mixer, point.seq_len, point.d_model)
    accuracy = run["metrics"].get("accuracy", float("nan"))
    if key not in best or accuracy > best[key]["accuracy"]:
      best[key] = {"mixer": point.mixer, "seq_len": point.seq_len, "num_kv_pairs": point.num_kv_pairs,
                   "d_model": point.d_model, "best_lr": point.lr, "accuracy": accuracy,
                   "state_bytes": state_bytes(run["config"]["model"])}
  return sorted(best.values(), key=lambda r: (list(MIXERS).index(r["mixer"]), r["seq_len"], r["d_model"]))


def _paper_reading(mixer: str, state: int) -> str:
  if mixer == "attention":
    return f"≈{PAPER_ATTENTION:g}"
  curve = PAPER_STATE_CURVES.get(mixer)
  if not curve:
    return "–"
  size, acc = min(curve, key=lambda c: abs(c[0] - state) / c[0])
  return f"≈{acc:g} at {size:.2g}"


def write_summary(out_dir: pathlib.Path) -> str:
  """Writes ``summary.md`` and ``accuracy_vs_state.png`` from ``out_dir/runs.jsonl``; returns the markdown."""
  runs = [json.loads(line) for line in (out_dir / "runs.jsonl").read_text().splitlines() if line]
  rows = summarize(runs)
  lines = ["# MQAR: best accuracy over learning rates vs width and recurrent-state size", "",
           "State = bytes of one layer's decode cache (batch 1). Paper: Zoology Figure 2 (attention) and the "
           "README recall-vs-state plot (GLA / DeltaNet / Gated DeltaNet; nearest state size shown, the plot's "
           "state unit is not stated) [approximate readings].", "",
           "| mixer | L / pairs | d_model | state bytes | best lr | accuracy | paper |", "|---|---|---|---|---|---|---|"]
  lines += [f"| {r['mixer']} | {r['seq_len']} / {r['num_kv_pairs']} | {r['d_model']} | {r['state_bytes']} | "
            f"{r['best_lr']:g} | {r['accuracy']:.3f} | {_paper_reading(r['mixer'], r['state_bytes'])} |"
            for r in rows]
  text = "\n".join(lines) + "\n"
  (out_dir / "summary.md").write_text(text)
  _plot_state(rows, out_dir / "accuracy_vs_state.png")
  return text


def _plot_state(rows: Sequence[Mapping[str, Any]], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
  for mixer in dict.fromkeys(r["mixer"] for r in rows):
    for seq in sorted({r["seq_len"] for r in rows if r["mixer"] == mixer}):
      sub = [r for r in rows if r["mixer"] == mixer and r["seq_len"] == seq]
      label = f"{mixer} L{seq}"
      axes[0].plot([r["d_model"] for r in sub], [r["accuracy"] for r in sub], "o-", label=label)
      axes[1].plot([r["state_bytes"] for r in sub], [r["accuracy"] for r in sub], "o-", label=label)
  axes[0].set(xlabel="d_model", ylabel="MQAR accuracy (best over lr)", xscale="log")
  axes[1].set(xlabel="state bytes per layer", ylabel="MQAR accuracy (best over lr)", xscale="log")
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Zoology MQAR table with the best-over-lr summary")
  parser.add_argument("--scale", default="tiny", choices=tuple(mqar_config.SWEEPS))
  parser.add_argument("--out", default="results")
  parser.add_argument("--seeds", type=int, default=1)
  args = parser.parse_args(argv)
  common.reproduce(TABLE, scale=args.scale, seeds=args.seeds, out=args.out)


if __name__ == "__main__":
  main()
