"""Shared machinery of the one-command paper tables (DESIGN.md, "Experiments").

A table module declares one ``Table``: the paper and its claims, the grid of runs (variant -> config
overrides, plus per-scale overrides of the base LM config), the metrics, the paper's reported numbers and a
judge per claim. ``reproduce`` trains every (variant, seed) with ``gated_jax.train.train`` and writes
``<out>/<name>/``:

* ``runs.jsonl``: one line per run (variant, seed, config, final metrics, history, wall time);
* ``table.csv`` and ``table.md``: per variant the mean (± std over seeds) of every metric, the paper's
  numbers beside them, and per claim "held" / "did not hold" at this scale;
* ``plot.png``: training-loss curves (mean over seeds) per variant.

Overrides are dotted config paths, e.g. ``{"model.mixer_kwargs": {"gate_position": "G1"}, "train.steps": 300}``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

SCALES = ("tiny", "small", "paper")
HIDDEN_SCALES = ("micro",)  # a seconds-long smoke scale for tests: a couple of variants, a few steps

Means = Mapping[str, Mapping[str, float]]  # variant -> metric key -> mean over seeds


@dataclasses.dataclass(frozen=True)
class Metric:
  """A column of our results: ``key`` in a run's final metrics, shown as ``label`` with ``fmt``."""
  key: str
  label: str
  fmt: str = ".3f"


@dataclasses.dataclass(frozen=True)
class Claim:
  """A claim of the paper and its judge on the per-variant means (True: held at this scale)."""
  name: str
  text: str
  variants: tuple[str, ...]
  judge: Callable[[Means], bool]


@dataclasses.dataclass(frozen=True)
class Table:
  """A reproducible paper table.

  Attributes:
    name: registry name (``python -m experiments reproduce NAME``).
    paper: citation of the paper and the table(s) reproduced.
    variants: variant -> config overrides (dotted paths), in display order.
    scales: scale -> config overrides on top of the base config; ``tiny``, ``small``, ``paper`` and the
      hidden ``micro``.
    metrics: our columns.
    paper_columns: the paper's columns, keys of ``paper_numbers[variant]``.
    paper_numbers: variant -> paper column -> reported value (missing cells are left blank).
    claims: the claims judged on our means.
    base_config: scale -> base ConfigDict (default: ``experiments.configs.lm.get_config("tiny")``).
    micro_variants: the variants run at ``micro`` scale (default: the first two).
    summary: optional extra outputs written after the table from ``<out>/<name>/`` (e.g. MQAR's accuracy
      vs state size); returns markdown that ``reproduce`` prints after the table.
  """
  name: str
  paper: str
  variants: Mapping[str, Mapping[str, Any]]
  scales: Mapping[str, Mapping[str, Any]]
  metrics: tuple[Metric, ...]
  paper_columns: tuple[str, ...]
  paper_numbers: Mapping[str, Mapping[str, float]]
  claims: tuple[Claim, ...]
  base_config: Callable[[], ml_collections.ConfigDict] | None = None
  micro_variants: tuple[str, ...] = ()
  summary: Callable[[pathlib.Path], str] | None = None

  def config(self, scale: str, variant: str, seed: int = 0) -> ml_collections.ConfigDict:
    """The full config of one run: base, then the scale's overrides, then the variant's, then the seed."""
    if scale not in self.scales:
      raise ValueError(f"scale: got {scale!r}; allowed: {', '.join(self.scales)}")
    if variant not in self.variants:
      raise ValueError(f"variant: got {variant!r}; allowed: {', '.join(self.variants)}")
    config = self.base_config() if self.base_config is not None else default_base_config()
    config = apply_overrides(config, self.scales[scale])
    config = apply_overrides(config, self.variants[variant])
    config.seed = int(config.get("seed", 0)) + seed
    return config

  def run_variants(self, scale: str) -> tuple[str, ...]:
    if scale in HIDDEN_SCALES:
      return self.micro_variants or tuple(self.variants)[:2]
    return tuple(self.variants)


def default_base_config() -> ml_collections.ConfigDict:
  """The trainer's tiny LM config (``experiments/configs/lm.py``), or the contract's fields until it exists."""
  try:
    from experiments.configs import lm  # pylint: disable=import-outside-toplevel
  except ImportError:
    return _contract_lm_config()
  return lm.get_config("tiny")


def _contract_lm_config() -> ml_collections.ConfigDict:
  """The config groups and fields of the trainer contract (helper brief, "Training"), tiny values."""
  return ml_collections.ConfigDict({
      "seed": 0,
      "model": {"vocab_size": 256, "d_model": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": None,
                "head_dim": None, "mixer": "gated_attention", "mixer_kwargs": {}, "mlp": "swiglu",
                "mlp_hidden_dim": None, "tie_embeddings": True, "dtype": "float32", "max_len": 128},
      "data": {"name": "stdlib_bytes", "seq_len": 128, "batch_size": 16},
      "optim": {"lr": 3e-3, "warmup_steps": 30, "weight_decay": 0.1, "b1": 0.9, "b2": 0.95, "clip_norm": 1.0,
                "schedule": "warmup_cosine", "min_lr_ratio": 0.1},
      "train": {"steps": 300, "eval_every": 300, "eval_batches": 8, "log_every": 10, "checkpoint_every": 300,
                "max_to_keep": 1, "grad_accum": 1, "compute_dtype": "float32", "mode": "jit", "diagnostics": True},
      "mesh": {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1},
      "workdir": "",
  })


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of ``config`` with each dotted ``path -> value`` set (ValueError on an unknown path)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for path, value in overrides.items():
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
      if part not in node:
        raise ValueError(f"override {path!r}: no config group {part!r}; known: {', '.join(node.keys())}")
      node = node[part]
    if leaf not in node:
      raise ValueError(f"override {path!r}: unknown field {leaf!r}; known: {', '.join(node.keys())}")
    with node.ignore_type():
      node[leaf] = value
  return config


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
    return np.asarray(value).tolist()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return str(value)


def run_one(table: Table, scale: str, variant: str, seed: int, workdir: pathlib.Path) -> dict[str, Any]:
  """Trains one (variant, seed) and returns its runs.jsonl record."""
  from gated_jax.train import train  # pylint: disable=import-outside-toplevel

  config = table.config(scale, variant, seed)
  shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resume of a stale checkpoint
  start = time.perf_counter()
  result = train(config, workdir=str(workdir))
  metrics = {**{k: float(v) for k, v in result.eval.items()}, "num_params": int(result.num_params)}
  return {"variant": variant, "seed": seed, "config": _jsonable(config.to_dict()), "metrics": metrics,
          "history": _jsonable(result.history), "wall_s": time.perf_counter() - start}


def aggregate(runs: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, tuple[float, float]]]:
  """variant -> metric key -> (mean, std over seeds); metrics a run lacks are skipped."""
  grouped: dict[str, list[Mapping[str, float]]] = {}
  for run in runs:
    grouped.setdefault(run["variant"], []).append(run["metrics"])
  stats = {}
  for variant, metric_list in grouped.items():
    stats[variant] = {}
    for key in keys:
      values = [m[key] for m in metric_list if key in m]
      if values:
        stats[variant][key] = (float(np.mean(values)), float(np.std(values)))
  return stats


def judge(table: Table, stats: Mapping[str, Mapping[str, tuple[float, float]]]) -> dict[str, str]:
  """claim name -> "held" / "did not hold" / "not judged (missing: ...)"."""
  means = {v: {k: mean for k, (mean, _) in m.items()} for v, m in stats.items()}
  verdicts = {}
  for claim in table.claims:
    missing = [v for v in claim.variants if v not in means]
    if missing:
      verdicts[claim.name] = f"not judged (missing: {', '.join(missing)})"
    else:
      try:
        verdicts[claim.name] = "held" if claim.judge(means) else "did not hold"
      except KeyError as e:  # a metric the judge needs was not reported
        verdicts[claim.name] = f"not judged (missing metric {e})"
  return verdicts


def _cell(stat: tuple[float, float] | None, fmt: str, seeds: int) -> str:
  if stat is None or not math.isfinite(stat[0]):
    return "–"
  return f"{stat[0]:{fmt}} ± {stat[1]:{fmt}}" if seeds > 1 else f"{stat[0]:{fmt}}"


def rows(table: Table, stats: Mapping[str, Mapping[str, tuple[float, float]]], seeds: int) -> list[list[str]]:
  """Header then one row per run variant: our metrics, then the paper's numbers."""
  header = ["variant"] + [m.label for m in table.metrics] + [f"paper {c}" for c in table.paper_columns]
  body = []
  for variant in (v for v in table.variants if v in stats):
    ours = [_cell(stats[variant].get(m.key), m.fmt, seeds) for m in table.metrics]
    paper = table.paper_numbers.get(variant, {})
    body.append([variant] + ours + [f"{paper[c]:g}" if c in paper else "–" for c in table.paper_columns])
  return [header] + body


def markdown(table: Table, scale: str, seeds: int, grid: list[list[str]], verdicts: Mapping[str, str]) -> str:
  lines = [f"# {table.name} ({scale} scale, {seeds} seed{'s' if seeds > 1 else ''})", "", table.paper, "",
           "| " + " | ".join(grid[0]) + " |", "|" + "---|" * len(grid[0])]
  lines += ["| " + " | ".join(row) + " |" for row in grid[1:]]
  lines += ["", "## Claims", ""]
  lines += [f"- **{c.name}** {c.text}: **{verdicts[c.name]}** at this scale" for c in table.claims]
  return "\n".join(lines) + "\n"


def plot(runs: Sequence[Mapping[str, Any]], path: pathlib.Path, title: str) -> None:
  """Training loss against step, mean over seeds, one line per variant."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  curves: dict[str, dict[int, list[float]]] = {}
  for run in runs:
    for entry in run["history"]:
      if "loss" in entry and "step" in entry:
        curves.setdefault(run["variant"], {}).setdefault(int(entry["step"]), []).append(float(entry["loss"]))
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for variant, by_step in curves.items():
    steps = sorted(by_step)
    ax.plot(steps, [np.mean(by_step[s]) for s in steps], label=variant)
  ax.set(xlabel="step", ylabel="training loss", title=title)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_results(table: Table, scale: str, seeds: int, runs: Sequence[Mapping[str, Any]],
                  out_dir: pathlib.Path) -> str:
  """Writes table.md, table.csv, runs.jsonl and plot.png into ``out_dir``; returns the markdown table."""
  out_dir.mkdir(parents=True, exist_ok=True)
  stats = aggregate(runs, [m.key for m in table.metrics])
  verdicts = judge(table, stats)
  grid = rows(table, stats, seeds)
  with open(out_dir / "runs.jsonl", "w") as f:
    for run in runs:
      f.write(json.dumps(run) + "\n")
  with open(out_dir / "table.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["variant"] + [f"{m.key}_{s}" for m in table.metrics for s in ("mean", "std")]
                    + [f"paper_{c}" for c in table.paper_columns])
    for variant in (v for v in table.variants if v in stats):
      ours = [x for m in table.metrics for x in stats[variant].get(m.key, (float("nan"), float("nan")))]
      paper = table.paper_numbers.get(variant, {})
      writer.writerow([variant] + ours + [paper.get(c, "") for c in table.paper_columns])
    for claim in table.claims:
      writer.writerow([f"claim:{claim.name}", verdicts[claim.name]])
  text = markdown(table, scale, seeds, grid, verdicts)
  (out_dir / "table.md").write_text(text)
  plot(runs, out_dir / "plot.png", f"{table.name} ({scale})")
  return text


def reproduce(table: Table, *, scale: str = "tiny", seeds: int = 1, out: str | pathlib.Path = "results",
              log: Callable[[str], None] = print) -> str:
  """Runs ``table``'s grid at ``scale`` for ``seeds`` seeds, writes ``<out>/<name>/`` and returns table.md."""
  if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
    raise ValueError(f"seeds: got {seeds!r}; allowed: a positive int")
  if scale not in table.scales:
    raise ValueError(f"scale: got {scale!r}; allowed: {', '.join(s for s in table.scales if s in SCALES)}")
  out_dir = pathlib.Path(out) / table.name
  runs = []
  for variant in table.run_variants(scale):
    for seed in range(seeds):
      run = run_one(table, scale, variant, seed, out_dir / "runs" / scale / variant / f"seed{seed}")
      loss = run["metrics"].get("loss", float("nan"))
      log(f"[{table.name}] {variant} seed {seed}: val loss {loss:.4f} ({run['wall_s']:.1f} s)")
      runs.append(run)
  text = write_results(table, scale, seeds, runs, out_dir)
  if table.summary is not None:
    text += "\n" + table.summary(out_dir)
  log(text)
  return text
