"""Shared machinery of the one-command paper tables (docs/architecture.md, "Experiments").

A table module declares one ``Table``: the paper and its claims, the grid of runs (variant -> config
overrides, plus per-scale overrides of the base config), the metrics, the paper's reported numbers and a
judge per claim. ``reproduce`` runs every (variant, seed) — an LM trained by ``gated_jax.train.train``, or the
table's own ``runner`` (classifiers, synthetic estimators) — and writes ``<out>/<name>/``:

* ``runs.jsonl``: one line per run (variant, seed, config, final metrics, history, wall time);
* ``table.csv`` and ``table.md``: per variant the mean (± std over seeds) of every metric, the paper's
  numbers beside them, and per claim its verdict (below), with the seed count and the wall time;
* ``plot.png``: what the verdicts rest on — the table's main metric per variant (every seed, mean ± std) and
  the smoothed training curves drawn relative to the baseline variant.

Verdicts mean something only against the seed spread, so each claim is judged on every seed's runs separately
as well as on the means: "held" / "did not hold" when every seed agrees, "not resolved at this scale (held in
k of n seeds)" when they do not, and a single seed says that its spread was not measured.

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
Runner = Callable[[ml_collections.ConfigDict, pathlib.Path], Mapping[str, Any]]

HELD, NOT_HELD, NOT_RESOLVED, NOT_JUDGED = "held", "did not hold", "not resolved at this scale", "not judged"


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
    runner: ``(config, workdir) -> {"metrics": {...}, "history": [{"step": ..., ...}, ...]}`` for tables that
      are not a language model trained by ``gated_jax.train.train`` (the default runner).
    default_seeds: seeds per variant when ``--seeds`` is not given (the largest count that fits the budget).
    plot_metric: the metric drawn per variant in ``plot.png`` (default: the first of ``metrics``).
    curve_key: the history entry drawn as training curves (default ``"loss"``).
    baseline: the variant the curves are drawn relative to (default: the first variant run).
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
  runner: Runner | None = None
  default_seeds: int = 1
  plot_metric: str | None = None
  curve_key: str = "loss"
  baseline: str | None = None

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


def train_lm(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict[str, Any]:
  """The default runner: ``gated_jax.train.train``; final eval metrics plus the parameter count."""
  from gated_jax.train import train  # pylint: disable=import-outside-toplevel

  result = train(config, workdir=str(workdir))
  metrics = {**{k: float(v) for k, v in result.eval.items()}, "num_params": int(result.num_params)}
  return {"metrics": metrics, "history": result.history}


def run_one(table: Table, scale: str, variant: str, seed: int, workdir: pathlib.Path) -> dict[str, Any]:
  """Runs one (variant, seed) with the table's runner and returns its runs.jsonl record."""
  config = table.config(scale, variant, seed)
  shutil.rmtree(workdir, ignore_errors=True)  # a fresh run, never a resume of a stale checkpoint
  start = time.perf_counter()
  result = (table.runner or train_lm)(config, workdir)
  return {"variant": variant, "seed": seed, "config": _jsonable(config.to_dict()),
          "metrics": {k: float(v) for k, v in result["metrics"].items()},
          "history": _jsonable(result.get("history", [])), "wall_s": time.perf_counter() - start}


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


def _means(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
  """variant -> metric -> mean over the given runs."""
  stats = aggregate(runs, sorted({k for r in runs for k in r["metrics"]}))
  return {v: {k: mean for k, (mean, _) in m.items()} for v, m in stats.items()}


def _judge_once(claim: Claim, means: Means) -> bool | str:
  """True / False, or the reason it could not be judged."""
  missing = [v for v in claim.variants if v not in means]
  if missing:
    return f"missing: {', '.join(missing)}"
  try:
    return bool(claim.judge(means))
  except KeyError as e:  # a metric the judge needs was not reported
    return f"missing metric {e}"


def judge(table: Table, runs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
  """claim name -> verdict, judged on the means over seeds and on each seed alone (module docstring)."""
  seeds = sorted({r["seed"] for r in runs})
  verdicts = {}
  for claim in table.claims:
    overall = _judge_once(claim, _means(runs))
    if isinstance(overall, str):
      verdicts[claim.name] = f"{NOT_JUDGED} ({overall})"
      continue
    per_seed = [_judge_once(claim, _means([r for r in runs if r["seed"] == s])) for s in seeds]
    judged = [v for v in per_seed if isinstance(v, bool)]  # seeds that ran every variant the claim needs
    held = sum(judged)
    if len(judged) <= 1:
      unjudged = "" if len(seeds) <= 1 else \
          f"; {len(seeds) - len(judged)} of {len(seeds)} seeds lack a variant or metric it needs"
      verdicts[claim.name] = f"{HELD if overall else NOT_HELD} (1 seed: spread not measured{unjudged})"
    elif held in (0, len(judged)) and bool(held) == overall:
      verdicts[claim.name] = f"{HELD if overall else NOT_HELD} (all {len(judged)} seeds)"
    else:
      verdicts[claim.name] = f"{NOT_RESOLVED} (held in {held} of {len(judged)} seeds)"
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


def _verdict_markdown(verdict: str) -> str:
  status, _, detail = verdict.partition(" (")
  return f"**{status}**" + (f" ({detail}" if detail else "")


def markdown(table: Table, scale: str, seeds: int, grid: list[list[str]], verdicts: Mapping[str, str],
             wall_s: float | None = None) -> str:
  took = f", {wall_s / 60:.1f} min" if wall_s is not None else ""
  lines = [f"# {table.name} ({scale} scale, {seeds} seed{'s' if seeds > 1 else ''}{took})", "", table.paper, "",
           "| " + " | ".join(grid[0]) + " |", "|" + "---|" * len(grid[0])]
  lines += ["| " + " | ".join(row) + " |" for row in grid[1:]]
  lines += ["", "## Claims", ""]
  lines += [f"- **{c.name}** {c.text}: {_verdict_markdown(verdicts[c.name])}" for c in table.claims]
  return "\n".join(lines) + "\n"


def _smooth(values: Sequence[float], span: int) -> np.ndarray:
  """Exponential moving average with bias correction (span ~ number of points averaged)."""
  alpha, out, avg, norm = 2.0 / (span + 1.0), [], 0.0, 0.0
  for v in values:
    avg, norm = (1 - alpha) * avg + alpha * v, (1 - alpha) * norm + alpha
    out.append(avg / norm)
  return np.asarray(out)


def _curves(runs: Sequence[Mapping[str, Any]], key: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """variant -> (steps, mean over seeds of ``key``) on the steps every seed logged."""
  by_variant: dict[str, dict[int, list[float]]] = {}
  for run in runs:
    for entry in run["history"]:
      if key in entry and "step" in entry:
        by_variant.setdefault(run["variant"], {}).setdefault(int(entry["step"]), []).append(float(entry[key]))
  return {v: (np.array(sorted(d)), np.array([np.mean(d[s]) for s in sorted(d)])) for v, d in by_variant.items()}


def plot(table: Table, runs: Sequence[Mapping[str, Any]], path: pathlib.Path, title: str) -> None:
  """Left: ``plot_metric`` per variant (each seed a dot, mean ± std a bar). Right: the ``curve_key`` curves,
  smoothed, minus the baseline's (the baseline is the zero line), so small differences are visible."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  variants = [v for v in dict.fromkeys(r["variant"] for r in runs)]
  metric = table.plot_metric or (table.metrics[0].key if table.metrics else "loss")
  curves = _curves(runs, table.curve_key)
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(3.5, 0.35 * len(variants) + 1.5)),
                                    gridspec_kw={"width_ratios": (1, 1.3)})
  for y, variant in enumerate(variants):
    values = [r["metrics"][metric] for r in runs if r["variant"] == variant and metric in r["metrics"]]
    if values:
      left.errorbar(np.mean(values), y, xerr=np.std(values), fmt="o", color="k", capsize=3)
      left.scatter(values, [y] * len(values), s=12, alpha=0.5)
  left.set(yticks=range(len(variants)), yticklabels=variants, xlabel=f"{metric} (mean ± std over seeds)",
           title=title)
  left.invert_yaxis()
  baseline = table.baseline if table.baseline in curves else next(iter(curves), None)
  if baseline is not None:
    base_steps, base = curves[baseline]
    for variant, (steps, values) in curves.items():
      span = max(1, len(steps) // 10)
      diff = _smooth(values, span) - np.interp(steps, base_steps, _smooth(base, span))
      right.plot(steps, diff, label=variant, lw=2.0 if variant == baseline else 1.2)
    right.axhline(0.0, color="k", lw=0.8)
    right.set(xlabel="step", ylabel=f"{table.curve_key} − {baseline} (smoothed)",
              title=f"training {table.curve_key} relative to {baseline}")
    right.legend(fontsize=7, ncol=2)
  else:
    right.set_axis_off()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def read_runs(out_dir: str | pathlib.Path) -> list[dict[str, Any]]:
  """The records of ``<out_dir>/runs.jsonl`` (one per (variant, seed), as ``write_results`` wrote them)."""
  return [json.loads(line) for line in (pathlib.Path(out_dir) / "runs.jsonl").read_text().splitlines() if line]


def write_results(table: Table, scale: str, seeds: int, runs: Sequence[Mapping[str, Any]],
                  out_dir: pathlib.Path, wall_s: float | None = None) -> str:
  """Writes table.md, table.csv, runs.jsonl and plot.png into ``out_dir``; returns the markdown table."""
  out_dir.mkdir(parents=True, exist_ok=True)
  stats = aggregate(runs, [m.key for m in table.metrics])
  verdicts = judge(table, runs)
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
  text = markdown(table, scale, seeds, grid, verdicts, wall_s)
  (out_dir / "table.md").write_text(text)
  plot(table, runs, out_dir / "plot.png", f"{table.name} ({scale})")
  return text


def reproduce(table: Table, *, scale: str = "tiny", seeds: int | None = None, out: str | pathlib.Path = "results",
              log: Callable[[str], None] = print) -> str:
  """Runs ``table``'s grid at ``scale`` for ``seeds`` seeds (default ``table.default_seeds``), writes
  ``<out>/<name>/`` and returns table.md."""
  seeds = table.default_seeds if seeds is None else seeds
  if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
    raise ValueError(f"seeds: got {seeds!r}; allowed: a positive int")
  if scale not in table.scales:
    raise ValueError(f"scale: got {scale!r}; allowed: {', '.join(s for s in table.scales if s in SCALES)}")
  out_dir = pathlib.Path(out) / table.name
  runs = []
  start = time.perf_counter()
  for variant in table.run_variants(scale):
    for seed in range(seeds):
      run = run_one(table, scale, variant, seed, out_dir / "runs" / scale / variant / f"seed{seed}")
      key = table.plot_metric or (table.metrics[0].key if table.metrics else "loss")
      value = run["metrics"].get(key, float("nan"))
      log(f"[{table.name}] {variant} seed {seed}: {key} {value:.4f} ({run['wall_s']:.1f} s)")
      runs.append(run)
  text = write_results(table, scale, seeds, runs, out_dir, time.perf_counter() - start)
  if table.summary is not None:
    text += "\n" + table.summary(out_dir)
  log(text)
  return text


def write_summary(chosen: Sequence[Table], texts: Sequence[str], out: str | pathlib.Path) -> str:
  """``<out>/summary.md``: each table's heading line (scale, seeds, wall time) and its claims, as reproduced."""
  lines = ["# Reproduced tables", ""]
  for table, text in zip(chosen, texts, strict=True):
    heading, claims = text.splitlines()[0].lstrip("# "), text.split("## Claims", 1)[-1].strip()
    lines += [f"## {heading}", "", table.paper, "", claims, ""]
  summary = "\n".join(lines)
  (pathlib.Path(out) / "summary.md").write_text(summary)
  return summary
