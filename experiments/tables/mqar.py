"""Zoology MQAR (Arora et al., arXiv 2312.04927, Figure 2; the recall-vs-state plot of the Zoology README):
multi-query associative recall accuracy of 2-layer, MLP-free models vs width and recurrent-state size.

    python -m experiments reproduce mqar [--scale tiny|small|paper] [--seeds N]

writes the run grid (table.md, table.csv, runs.jsonl, plot.png, claims) and the best-over-lr summary
(summary.md and accuracy_vs_state.png: accuracy vs width and vs recurrent-state size, and the training
accuracy curves).

Every model is built as Zoology builds it: a BaseConv layer, then the mixer (``experiments/configs/mqar.py``),
except the gated-convolution baselines, which Zoology runs alone (the mixer in both layers): ``base_conv``
(BaseConv), ``hyena`` (order-2 Hyena, arXiv 2302.10866), ``h3`` (arXiv 2212.14052, state size = sequence
length and head dim 2 as in Zoology's Figure 2 config) and ``gated_conv`` (Dauphin et al.'s GLU convolution,
arXiv 1612.08083, kernel 4). Mixers, each with its fla layer's own expansions and Zoology's settings:
softmax ``attention`` (1 head, no positional encoding), ``linear_attention`` (2 heads, expand 1), ``gla``
(2 heads, expand_k 0.5), ``deltanet`` (2 heads, short conv, no output gate), ``gated_deltanet`` (2 heads
of d/2, expand_v 2, no output gate). Their recurrent states at width d are d²/4 (GLA), d²/2 (linear
attention, DeltaNet) and d² (Gated DeltaNet) floats, so the orderings are judged at equal state size, along
the accuracy-vs-state curves. Each variant (mixer, task, width) trains its learning rates together
(``_lr_sweep``) and reports the best final validation accuracy over them, as Zoology does; the seeds give
the spread.

Claims (judged per seed and on the means, ``experiments/tables/common.py``):
(a) attention solves MQAR: best accuracy ≥ 0.95 at every width ≥ 64 (Zoology: ≈ 1.0);
(b) attention ≥ every recurrent mixer at every width;
(c) at equal recurrent-state size, Gated DeltaNet and DeltaNet ≥ GLA ≥ linear attention (Zoology's README
    plot; piecewise-linear in log state between measured widths, at every state size both curves cover);
(d) accuracy rises with state size: for every recurrent mixer, a wider model is at least as accurate
    (within 0.02, the saturation at 1.0);
(e) gated convolutions fall below attention at equal width (Zoology §3 and Figure 2: they need a width that
    grows with the number of key-value pairs): every gated convolution more than 0.02 below attention.

State size is the bytes of the mixer layers' float32 recurrent state (attention: its KV cache at the
sequence length; short-conv windows excluded), batch 1, as Zoology's ``state_size`` × 4. Hyena and H3
decode from a cache of their long convolutions' inputs over the sequence, counted like attention's KV
cache: Hyena ``L d`` floats per layer (Zoology's ``state_size``), H3 ``3 L d`` (``k`` and the ``k v^T``
products at head dim 2). BaseConv and the GLU conv keep only short-conv windows, so their state is 0 here.
The ``tiny`` scale runs the added gated convolutions (``mqar_config.CONV_ROWS``) at width 64 and one learning
rate only (the config's docstring says why).
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
import numpy as np

from experiments.configs import mqar as mqar_config
from experiments.tables import _lr_sweep, common
from experiments.tables.common import Claim, Metric, Table
from gated_jax.data import mqar as mqar_data


def _hybrid(mixer: str, kwargs: Mapping[str, Any], heads: int) -> dict[str, Any]:
  """Zoology's model: BaseConv, then the mixer."""
  return {"model.mixer": ("base_conv", mixer), "model.mixer_kwargs": ({}, dict(kwargs)), "model.num_heads": heads}


def _alone(mixer: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """Zoology's gated-convolution models: the mixer in both layers."""
  return {"model.mixer": mixer, "model.mixer_kwargs": dict(kwargs), "model.num_heads": 1}


_CHUNK = 16  # the chunked ops' chunk length: the fastest on a CPU at these lengths (same numbers)
MIXERS = {
    "attention": _hybrid("gated_attention", mqar_config.ATTENTION_KWARGS, 1),
    "base_conv": _alone("base_conv", {}),
    "hyena": _alone("hyena", {}),
    "h3": _alone("h3", {"head_dim": 2, "state_size": None}),  # Zoology's Figure 2: d_state = L, head_dim 2
    "gated_conv": _alone("gated_conv", {"gate": "glu"}),
    "linear_attention": _hybrid("linear_attention", {"chunk_size": _CHUNK}, 2),
    "gla": _hybrid("gla", {"chunk_size": _CHUNK}, 2),
    "deltanet": _hybrid("deltanet", {"chunk_size": _CHUNK}, 2),
    "gated_deltanet": _hybrid("gated_deltanet", {"output_gate": "none", "chunk_size": _CHUNK}, 2),
}
RECURRENT = ("linear_attention", "gla", "deltanet", "gated_deltanet")
GATED_CONVS = ("base_conv", *mqar_config.CONV_ROWS)
MICRO_MIXERS = ("attention", "gla")
SATURATION = 0.02  # (d): accuracies this close count as equal (curves saturating at 1.0)

# Zoology's published numbers [approx, read off figures].
PAPER_COLUMNS = ("Zoology acc",)
PAPER_ATTENTION = 1.0  # Figure 2: "attention is ≈1.0 at every d and L"
PAPER_STATE_CURVES = {  # README "Recall-Memory Tradeoff" (state bytes, accuracy) at d_model 64, 128, 256
    "gla": ((5e3, 0.53), (1.8e4, 0.77), (7e4, 0.95)),
    "deltanet": ((9e3, 0.79), (3.5e4, 0.96), (1.3e5, 0.995)),
    "gated_deltanet": ((1.7e4, 0.89), (6.6e4, 0.99), (2.6e5, 0.995)),
}
_PAPER_WIDTHS = (64, 128, 256)


@dataclasses.dataclass(frozen=True)
class Point:
  """One variant of the grid (its learning rates are trained together)."""
  mixer: str
  seq_len: int
  num_kv_pairs: int
  d_model: int

  @property
  def name(self) -> str:
    return f"{self.mixer} L{self.seq_len}/kv{self.num_kv_pairs} d{self.d_model}"


def grid(scale: str) -> tuple[Point, ...]:
  """The variants of ``scale`` (``micro``: two mixers)."""
  sweep = mqar_config.SWEEPS[scale]
  mixers = MICRO_MIXERS if scale in common.HIDDEN_SCALES else tuple(MIXERS)
  return tuple(Point(m, seq, kv, d) for m in mixers for seq, kv in sweep.tasks for d in sweep.widths_of(m))


_POINTS = {p.name: p for s in mqar_config.SWEEPS.values()
           for p in (Point(m, *task, d) for m in MIXERS for task in s.tasks for d in s.widths)}


def best_over_lr(means: common.Means, key: str = "accuracy") -> dict[tuple[str, int, int], float]:
  """``(mixer, seq_len, d_model) -> metric`` of the variants present (``accuracy`` is already the best over
  learning rates of each run)."""
  return {(p.mixer, p.seq_len, p.d_model): means[name][key] for name, p in _POINTS.items()
          if name in means and key in means[name]}


def _attention_solves(means: common.Means) -> bool:
  scores = [acc for (mixer, _, d), acc in best_over_lr(means).items() if mixer == "attention" and d >= 64]
  if not scores:
    raise KeyError("accuracy of attention at d_model >= 64")
  return min(scores) >= 0.95


def _beside_attention(means: common.Means, mixers: Sequence[str]) -> list[tuple[float, float]]:
  """``(attention, other)`` best accuracies of every ``mixers`` entry at a task and width attention also ran."""
  best = best_over_lr(means)
  pairs = [(acc, best[(m, seq, d)]) for (m0, seq, d), acc in best.items() if m0 == "attention"
           for m in mixers if (m, seq, d) in best]
  if not pairs:
    raise KeyError(f"accuracy of attention and one of {', '.join(mixers)} at a shared width")
  return pairs


def _attention_above_recurrent(means: common.Means) -> bool:
  return all(attention >= other for attention, other in _beside_attention(means, RECURRENT))


def state_curve(means: common.Means, mixer: str, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """``(log state bytes, accuracy)`` of ``mixer`` at ``seq_len``, sorted by state."""
  rows = sorted((means[n]["state_bytes"], means[n]["accuracy"]) for n, p in _POINTS.items()
                if p.mixer == mixer and p.seq_len == seq_len and n in means and "state_bytes" in means[n])
  return np.log(np.array([r[0] for r in rows])), np.array([r[1] for r in rows])


def at_least_at_equal_state(means: common.Means, upper: str, lower: str) -> bool:
  """``upper``'s accuracy ≥ ``lower``'s at every state size where both curves have measurements around it
  (both piecewise-linear in log state; evaluated at every measured state size in the overlap)."""
  judged = False
  for seq_len in sorted({p.seq_len for n, p in _POINTS.items() if n in means}):
    (xu, yu), (xl, yl) = state_curve(means, upper, seq_len), state_curve(means, lower, seq_len)
    if len(xu) == 0 or len(xl) == 0:
      continue
    low, high = max(xu[0], xl[0]), min(xu[-1], xl[-1])
    xs = [x for x in np.concatenate([xu, xl]) if low - 1e-9 <= x <= high + 1e-9]
    judged |= bool(xs)
    if any(np.interp(x, xu, yu) < np.interp(x, xl, yl) for x in xs):
      return False
  if not judged:
    raise KeyError(f"accuracy of {upper} and {lower} at overlapping state sizes")
  return True


def _convs_below_attention(means: common.Means) -> bool:
  return all(attention > conv + SATURATION for attention, conv in _beside_attention(means, GATED_CONVS))


def _delta_above_gla_above_linear(means: common.Means) -> bool:
  return (at_least_at_equal_state(means, "gated_deltanet", "gla") and at_least_at_equal_state(means, "deltanet", "gla")
          and at_least_at_equal_state(means, "gla", "linear_attention"))


def _rises_with_state(means: common.Means) -> bool:
  judged = False
  for mixer in RECURRENT:
    for seq_len in sorted({p.seq_len for p in _POINTS.values()}):
      _, accuracy = state_curve(means, mixer, seq_len)
      judged |= len(accuracy) > 1
      if np.any(np.diff(accuracy) < -SATURATION):
        return False
  if not judged:
    raise KeyError("accuracy of a recurrent mixer at two widths")
  return True


def _paper_numbers() -> dict[str, dict[str, float]]:
  numbers = {}
  for name, p in _POINTS.items():
    if p.mixer == "attention":
      numbers[name] = {PAPER_COLUMNS[0]: PAPER_ATTENTION}
    elif p.mixer in PAPER_STATE_CURVES and p.d_model in _PAPER_WIDTHS:
      numbers[name] = {PAPER_COLUMNS[0]: PAPER_STATE_CURVES[p.mixer][_PAPER_WIDTHS.index(p.d_model)][1]}
  return numbers


def run_point(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
  """The table's runner: every learning rate of ``config.optim.lr_sweep`` on fresh MQAR data of
  ``config.seed``; metrics are those of the best learning rate (by final validation accuracy)."""
  del workdir  # nothing is checkpointed: a run takes seconds
  task = mqar_data.config_from_data(config.data)
  train = mqar_data.generate(task, int(config.data.num_train_examples), seed=[config.seed, 0])
  evaluation = mqar_data.generate(task, int(config.data.num_eval_examples), seed=[config.seed, 1])
  lrs = tuple(config.optim.lr_sweep)
  result = _lr_sweep.train_lr_sweep(config, lrs, train, evaluation, log_every=int(config.train.log_every))
  accuracies = [r["accuracy"] for r in result["eval"]]
  best = int(np.argmax(accuracies))
  metrics = {"accuracy": accuracies[best], "loss": result["eval"][best]["loss"], "best_lr": lrs[best],
             "num_params": result["num_params"], "state_bytes": state_bytes(config.model),
             **{f"accuracy_lr{lr:g}": a for lr, a in zip(lrs, accuracies)}}
  history = [{"step": h["step"], "loss": h["loss"][best], "accuracy": h["accuracy"][best]}
             for h in result["history"]]
  return {"metrics": metrics, "history": history}


class MQARTable(Table):
  """The generic table with a scale-dependent grid: variants are the (mixer, task, width) points."""

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
    sweep = mqar_config.SWEEPS[scale]
    config = mqar_config.get_config(scale)
    lrs = sweep.lrs_of(point.mixer)
    overrides = mqar_config.run_overrides(sweep, point.seq_len, point.num_kv_pairs, point.d_model, lrs[0])
    config = common.apply_overrides(config, {**overrides, **MIXERS[point.mixer], "optim.lr_sweep": lrs})
    config.seed = int(config.get("seed", 0)) + seed
    return config


TABLE = MQARTable(
    name="mqar",
    paper="Zoology (Arora et al., ICLR 2024, arXiv 2312.04927), Figure 2 and the README recall-vs-state plot: "
          "MQAR accuracy of 2-layer MLP-free models (BaseConv + mixer), best over learning rates.",
    variants={name: MIXERS[p.mixer] for name, p in _POINTS.items()},
    scales={scale: {} for scale in mqar_config.SWEEPS},
    metrics=(Metric("accuracy", "accuracy (best lr)", ".3f"), Metric("loss", "val loss", ".3f"),
             Metric("best_lr", "best lr", ".0e"), Metric("state_bytes", "state bytes", ".0f"),
             Metric("num_params", "params", ".0f")),
    paper_columns=PAPER_COLUMNS,
    paper_numbers=_paper_numbers(),
    claims=(
        Claim("attention", "attention solves MQAR: best accuracy ≥ 0.95 at every width ≥ 64 (Zoology ≈ 1.0)", (),
              _attention_solves),
        Claim("attention>recurrent", "attention ≥ every recurrent mixer at every width", (),
              _attention_above_recurrent),
        Claim("delta>gla>linear", "at equal recurrent-state size, Gated DeltaNet and DeltaNet ≥ GLA ≥ linear "
              "attention", (), _delta_above_gla_above_linear),
        Claim("state", f"accuracy rises with state size for every recurrent mixer (within {SATURATION})", (),
              _rises_with_state),
        Claim("convs<attention", f"gated convolutions (BaseConv, Hyena, H3, GLU conv) are more than {SATURATION} "
              "below attention at every width both ran (Zoology §3)", (), _convs_below_attention),
    ),
    micro_variants=tuple(p.name for p in grid("micro")),
    summary=lambda out_dir: write_summary(out_dir),  # pylint: disable=unnecessary-lambda (defined below)
    runner=run_point,
    default_seeds=3,
    curve_key="accuracy",
    baseline=grid("tiny")[0].name,
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
  layer_mixers = [name for name, _ in model.layer_specs()]
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes.get("cache", {}))[0]:
    names = [getattr(k, "key", "") for k in path]
    is_state = "window" not in names and jnp.issubdtype(leaf.dtype, jnp.floating)
    if is_state and layer_mixers[int(names[0].removeprefix("layer_"))] != "base_conv":
      total += leaf.size * leaf.dtype.itemsize
  return total


def state_bytes(model_config: Mapping[str, Any]) -> int:
  """Bytes of the recurrent state of the model's mixer layers (attention: the KV cache at ``max_len``),
  batch 1: float cache leaves, without the BaseConv layers and the short-conv windows."""
  plain = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  return _state_bytes_cached(json.dumps(plain, sort_keys=True, default=list))


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per (mixer, task, width): the best-over-lr accuracy of every seed, their mean and std, the state size
  and the best learning rate of each seed."""
  grouped: dict[tuple[str, int, int], list[Mapping[str, Any]]] = {}
  for run in runs:
    point = _POINTS[run["variant"]]
    grouped.setdefault((point.mixer, point.seq_len, point.d_model), []).append(run)
  rows = []
  for (mixer, seq_len, d_model), group in grouped.items():
    accuracies = [r["metrics"]["accuracy"] for r in group]
    rows.append({"mixer": mixer, "seq_len": seq_len, "num_kv_pairs": _POINTS[group[0]["variant"]].num_kv_pairs,
                 "d_model": d_model, "state_bytes": int(group[0]["metrics"]["state_bytes"]),
                 "accuracies": accuracies, "accuracy": float(np.mean(accuracies)),
                 "accuracy_std": float(np.std(accuracies)), "best_lrs": [r["metrics"]["best_lr"] for r in group]})
  return sorted(rows, key=lambda r: (list(MIXERS).index(r["mixer"]), r["seq_len"], r["d_model"]))


def _paper_reading(mixer: str, d_model: int) -> str:
  if mixer == "attention":
    return f"≈{PAPER_ATTENTION:g}"
  if mixer not in PAPER_STATE_CURVES or d_model not in _PAPER_WIDTHS:
    return "–"
  size, accuracy = PAPER_STATE_CURVES[mixer][_PAPER_WIDTHS.index(d_model)]
  return f"≈{accuracy:g} (state ≈{size:.2g})"


def write_summary(out_dir: pathlib.Path) -> str:
  """Writes ``summary.md`` and ``accuracy_vs_state.png`` from ``out_dir/runs.jsonl``; returns the markdown."""
  runs = common.read_runs(out_dir)
  rows = summarize(runs)
  lines = ["# MQAR: best accuracy over learning rates vs width and recurrent-state size", "",
           "Mean ± std over seeds of each seed's best-over-lr validation accuracy (the seeds' values and best "
           "learning rates in brackets). State = bytes of the mixer's float32 recurrent state (attention: KV "
           "cache), batch 1. Zoology: Figure 2 (attention) and the README recall-vs-state plot (d_model 64, "
           "128, 256 trained on Zoology's MQAR mixture up to 256 tokens / 64 pairs and tested up to 1024 / 256, "
           "a harder task than ours) [approximate readings].", "",
           "| mixer | L / pairs | d_model | state bytes | accuracy | per seed (best lr) | Zoology |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    seeds = ", ".join(f"{a:.3f} ({lr:g})" for a, lr in zip(r["accuracies"], r["best_lrs"]))
    lines.append(f"| {r['mixer']} | {r['seq_len']} / {r['num_kv_pairs']} | {r['d_model']} | {r['state_bytes']} | "
                 f"{r['accuracy']:.3f} ± {r['accuracy_std']:.3f} | {seeds} | "
                 f"{_paper_reading(r['mixer'], r['d_model'])} |")
  text = "\n".join(lines) + "\n"
  (out_dir / "summary.md").write_text(text)
  _plot_state(rows, runs, out_dir / "accuracy_vs_state.png")
  return text


def _plot_state(rows: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]], path: pathlib.Path) -> None:
  """Accuracy vs width and vs state (mean ± std over seeds), and each mixer's training accuracy curve at its
  best learning rate (mean over seeds) at the middle width."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for mixer in dict.fromkeys(r["mixer"] for r in rows):
    for seq in sorted({r["seq_len"] for r in rows if r["mixer"] == mixer}):
      sub = [r for r in rows if r["mixer"] == mixer and r["seq_len"] == seq]
      for axis, key in ((axes[0], "d_model"), (axes[1], "state_bytes")):
        axis.errorbar([r[key] for r in sub], [r["accuracy"] for r in sub], yerr=[r["accuracy_std"] for r in sub],
                      fmt="o-", capsize=3, label=f"{mixer} L{seq}")
  widths = sorted({r["d_model"] for r in rows})
  middle = widths[len(widths) // 2]
  for mixer in dict.fromkeys(r["mixer"] for r in rows):
    curves = [run["history"] for run in runs if _POINTS[run["variant"]].mixer == mixer
              and _POINTS[run["variant"]].d_model == middle and run["history"]]
    if curves:
      steps = [h["step"] for h in curves[0]]
      mean = np.mean([[h["accuracy"] for h in c[:len(steps)]] for c in curves], axis=0)
      axes[2].plot(steps, mean, label=mixer)
  axes[0].set(xlabel="d_model", ylabel="MQAR accuracy (best over lr)", xscale="log")
  axes[1].set(xlabel="recurrent state bytes", ylabel="MQAR accuracy (best over lr)", xscale="log")
  axes[2].set(xlabel="step", ylabel=f"training accuracy at d_model {middle} (best lr)")
  axes[1].legend(fontsize=7)
  axes[2].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="Zoology MQAR table with the best-over-lr summary")
  parser.add_argument("--scale", default="tiny", choices=tuple(mqar_config.SWEEPS))
  parser.add_argument("--out", default="results")
  parser.add_argument("--seeds", type=int, default=None)
  args = parser.parse_args(argv)
  common.reproduce(TABLE, scale=args.scale, seeds=args.seeds, out=args.out)


if __name__ == "__main__":
  main()
