"""Benchmark: step time, tokens/s and MFU of the LM training step, per mixer, size and parallel layout.

Mixers (``--mixers``): ``gated_attention`` runs two variants, the softmax-attention baseline
(``gate_position="none"``) and the paper's G1 gate (elementwise sigmoid on the SDPA output, Qiu et al., Gated
Attention, arXiv 2505.06708 eq. 5); ``gla`` is gated linear attention (Yang et al., arXiv 2312.06635 eq. 3-4).
Every case trains ``experiments/configs/lm.py``'s LM through ``gated_jax.train.train`` (the real loop: data
pipeline, host transfer, jitted step, metric fetch), with the shapes of ``SHAPES``:

* ``--shapes cpu`` (default on a CPU): ``small`` = d_model 128, 4 layers, T 256, batch 8; ``medium`` =
  d_model 256, 6 layers, T 512, batch 8; float32.
* ``--shapes accelerator`` (default on a GPU/TPU): ``lm.py``'s ``small`` (d_model 384, 6 layers, T 512, batch
  32) and ``medium`` (d_model 768, 12 layers, T 1024, batch 64, the GPT-2-small shape); bfloat16 compute.

Layouts (``--layouts``): ``single`` (one device, jit), ``data8`` (jit, mesh data=8), ``dp2_fsdp2_tp2`` (jit,
mesh data=2, fsdp=2, tensor=2) and ``pmap8`` (``train.mode="pmap"`` over 8 devices). Each case runs in its own
subprocess; on a CPU the 8-device layouts get 8 *simulated* devices (``JAX_NUM_CPU_DEVICES=8``) that share the
host's cores, so they measure partitioning overhead, not speedup. On an accelerator host they need exactly 8
devices and are skipped otherwise.

Timing: ``train.steps = log_every * (intervals + 1)``; the loop logs tokens/s over each interval of
``log_every`` steps; the first interval (compilation) is dropped and the median of the others is reported
(step ms = tokens per step / tokens/s). MFU = PaLM model FLOPs per token (``gated_jax.train.flops``,
arXiv 2204.02311 App. B) x tokens/s / peak. The peak is the data-sheet figure where
``gated_jax.train.flops.PEAK_FLOPS`` knows the device; otherwise (a CPU) it is measured once: the best of
several jitted ``N x N`` matmuls in the compute dtype (2 N^3 FLOPs each). Simulated CPU devices share that
host peak, so each gets ``peak / devices`` and MFU is relative to the whole host.

Run (writes ``<out>/train_step_<platform>.{json,md}``; ``_<shapes>`` is appended for non-default shapes):

    python -m experiments.benchmarks.train_step [--sizes small,medium] [--mixers gated_attention,gla]
        [--layouts single,data8,dp2_fsdp2_tp2,pmap8] [--shapes cpu|accelerator] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

from experiments.benchmarks.machine import device_info

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
SIMULATED_DEVICES = 8

_CPU_SHAPE_FIELDS = ("d_model", "num_layers", "num_heads", "mlp_hidden_dim", "seq_len", "batch_size",
                     "compute_dtype")
SHAPES: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        "small": dict(zip(_CPU_SHAPE_FIELDS, (128, 4, 4, 512, 256, 8, "float32"))),
        "medium": dict(zip(_CPU_SHAPE_FIELDS, (256, 6, 4, 1024, 512, 8, "float32"))),
    },
    "accelerator": {},  # filled from lm.SIZES below (lm.py is the source of truth for those shapes)
}
# variant -> (registered mixer, mixer_kwargs); --mixers names the mixer, each expands to its variants.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "softmax": ("gated_attention", {"gate_position": "none"}),
    "gated_g1": ("gated_attention", {"gate_position": "G1"}),
    "gla": ("gla", {}),
}
# layout -> (train.mode, mesh, devices)
LAYOUTS: dict[str, tuple[str, dict[str, int], int]] = {
    "single": ("jit", {"data": 1}, 1),
    "data8": ("jit", {"data": 8}, SIMULATED_DEVICES),
    "dp2_fsdp2_tp2": ("jit", {"data": 2, "fsdp": 2, "tensor": 2}, SIMULATED_DEVICES),
    "pmap8": ("pmap", {"data": -1}, SIMULATED_DEVICES),
}
RECORD_KEYS = ("size", "variant", "mixer", "mixer_kwargs", "layout", "mode", "mesh", "devices", "shape",
               "num_params", "flops_per_token", "peak_flops_per_device", "step_ms", "step_ms_intervals",
               "tokens_per_s", "mfu", "status")


def _accelerator_shapes() -> dict[str, dict[str, Any]]:
  from experiments.configs import lm  # pylint: disable=import-outside-toplevel
  shapes = {}
  for size in ("small", "medium"):
    d_model, layers, heads, mlp, seq, batch, *_, dtype = lm.SIZES[size]
    shapes[size] = dict(zip(_CPU_SHAPE_FIELDS, (d_model, layers, heads, mlp, seq, batch, dtype)))
  return shapes


SHAPES["accelerator"] = _accelerator_shapes()


@dataclasses.dataclass(frozen=True)
class Case:
  """One measurement: a variant of ``VARIANTS`` at ``shape`` (``SHAPES`` fields) in a layout of ``LAYOUTS``."""
  size: str
  shape: Mapping[str, Any]
  variant: str
  layout: str
  log_every: int = 5
  intervals: int = 3
  peak_flops: float = 0.0  # per host (CPU) or per device (accelerator); 0: the data sheet's


def _choices(arg: str, text: str, allowed: Mapping[str, Any] | tuple[str, ...]) -> list[str]:
  names = [n for n in text.split(",") if n]
  bad = [n for n in names if n not in allowed]
  if bad or not names:
    raise ValueError(f"{arg}: got {text!r}; allowed: a comma-separated subset of {', '.join(allowed)}")
  return names


def measure_peak_flops(dtype: str = "float32", n: int = 2048, repeats: int = 10) -> float:
  """Achievable FLOP/s of one ``n x n`` jitted matmul in ``dtype`` on device 0 (best of ``repeats``)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  a, b = (jax.random.normal(k, (n, n), jnp.dtype(dtype)) for k in jax.random.split(jax.random.key(0)))
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def case_config(case: Case, num_devices: int) -> Any:
  """The ``lm.py`` config of ``case`` (no checkpoints, no diagnostics, one eval batch)."""
  from experiments.configs import lm  # pylint: disable=import-outside-toplevel
  from experiments.tables.common import apply_overrides  # pylint: disable=import-outside-toplevel
  mixer, mixer_kwargs = VARIANTS[case.variant]
  mode, mesh, _ = LAYOUTS[case.layout]
  shape = case.shape
  steps = case.log_every * (case.intervals + 1)
  cpu_peak = case.peak_flops / num_devices  # simulated devices share the host's cores
  overrides = {
      "model.d_model": shape["d_model"], "model.num_layers": shape["num_layers"],
      "model.num_heads": shape["num_heads"], "model.mlp_hidden_dim": shape["mlp_hidden_dim"],
      "model.max_len": shape["seq_len"], "model.mixer": mixer, "model.mixer_kwargs": dict(mixer_kwargs),
      "data.seq_len": shape["seq_len"], "data.batch_size": shape["batch_size"],
      "data.corpus_bytes": max(200_000, 4 * shape["seq_len"] * shape["batch_size"] * steps),
      "optim.warmup_steps": 1, "train.steps": steps, "train.log_every": case.log_every, "train.eval_every": steps,
      "train.eval_batches": 1, "train.checkpoint_every": steps, "train.diagnostics": False,
      "train.progress": False, "train.tensorboard": False, "train.compute_dtype": shape["compute_dtype"],
      "train.mode": mode, "train.peak_flops": cpu_peak if _platform() == "cpu" else case.peak_flops,
      "mesh.data": 1, **{f"mesh.{axis}": size for axis, size in mesh.items()},
  }
  return apply_overrides(lm.get_config("small"), overrides)


def _platform() -> str:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.devices()[0].platform


def run_case(case: Case) -> dict[str, Any]:
  """Trains ``case`` in this process and returns its record (``RECORD_KEYS``)."""
  import jax  # pylint: disable=import-outside-toplevel
  from gated_jax.train import train  # pylint: disable=import-outside-toplevel
  from gated_jax.train.flops import model_flops_per_token, peak_flops_per_device  # pylint: disable=import-outside-toplevel
  mode, mesh, devices = LAYOUTS[case.layout]
  config = case_config(case, jax.device_count())
  result = train(config, workdir=None)
  rates = [h["tokens_per_s"] for h in result.history[1:]]  # the first interval holds the compilation
  tokens_per_step = case.shape["batch_size"] * case.shape["seq_len"]
  tokens_per_s = statistics.median(rates)
  flops_per_token = model_flops_per_token(result.params, config.model, config.data.seq_len)
  peak = peak_flops_per_device(jax.devices()[0], config.train.peak_flops)
  mfus = [h["mfu"] for h in result.history[1:] if "mfu" in h]
  mixer, mixer_kwargs = VARIANTS[case.variant]
  return {"size": case.size, "variant": case.variant, "mixer": mixer, "mixer_kwargs": mixer_kwargs,
          "layout": case.layout, "mode": mode, "mesh": mesh, "devices": jax.device_count(),
          "shape": dict(case.shape), "num_params": result.num_params, "flops_per_token": flops_per_token,
          "peak_flops_per_device": peak, "step_ms": 1e3 * tokens_per_step / tokens_per_s,
          "step_ms_intervals": [1e3 * tokens_per_step / r for r in rates], "tokens_per_s": tokens_per_s,
          "mfu": statistics.median(mfus) if mfus else None, "status": "ok"}


def _subprocess_env(devices: int, platform_name: str) -> dict[str, str]:
  env = dict(os.environ)
  if platform_name == "cpu" and devices > 1:
    env["JAX_NUM_CPU_DEVICES"] = str(devices)
    env["JAX_PLATFORMS"] = "cpu"
  return env


def run_in_subprocess(case: Case, platform_name: str, timeout_s: float | None = None) -> dict[str, Any]:
  """``run_case`` in a fresh interpreter (simulated CPU devices where the layout needs them)."""
  _, _, devices = LAYOUTS[case.layout]
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "record.json"
    cmd = [sys.executable, "-m", "experiments.benchmarks.train_step", "--case", json.dumps(dataclasses.asdict(case)),
           "--case-out", str(out)]
    proc = subprocess.run(cmd, env=_subprocess_env(devices, platform_name), capture_output=True, text=True,
                          timeout=timeout_s, cwd=pathlib.Path(__file__).resolve().parents[2], check=False)
    if proc.returncode != 0 or not out.exists():
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
      return {**_case_fields(case), "status": f"error (rc {proc.returncode}): {tail[0][:300]}"}
    return json.loads(out.read_text())


def _case_fields(case: Case) -> dict[str, Any]:
  mixer, mixer_kwargs = VARIANTS[case.variant]
  mode, mesh, devices = LAYOUTS[case.layout]
  return {"size": case.size, "variant": case.variant, "mixer": mixer, "mixer_kwargs": mixer_kwargs,
          "layout": case.layout, "mode": mode, "mesh": mesh, "devices": devices, "shape": dict(case.shape)}


def run(cases: list[Case], info: Mapping[str, Any], log: Callable[[str], None] = print,
        on_record: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
  """Runs every case in a subprocess (8-device layouts skipped on an accelerator host without 8 devices)."""
  records = []
  for case in cases:
    devices = LAYOUTS[case.layout][2]
    if info["platform"] != "cpu" and devices != 1 and info["num_devices"] != devices:
      record = {**_case_fields(case),
                "status": f"skipped: needs {devices} devices, this host has {info['num_devices']}"}
    else:
      record = run_in_subprocess(case, str(info["platform"]))
    records.append(record)
    log(_line(record))
    if on_record is not None:
      on_record(records)
  return records


def _line(r: Mapping[str, Any]) -> str:
  head = f"{r['size']:6s} {r['variant']:9s} {r['layout']:14s}"
  if r["status"] != "ok":
    return f"{head} {r['status']}"
  mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.2f}%"
  return f"{head} {r['step_ms']:9.1f} ms/step {r['tokens_per_s']:10.0f} tok/s  MFU {mfu}"


def to_markdown(result: Mapping[str, Any]) -> str:
  """Tables per size (rows variant x layout) plus same-run ratios to the single-device softmax baseline."""
  info, peak = result["device"], result["peak"]
  lines = ["# LM training-step benchmark\n",
           f"Device: {info['num_devices']} x `{info['device_kind']}` ({info['platform']}); CPU {info['cpu_model']}, "
           f"{info['cpu_count']} cores; jax {info['jax']}. Shapes: `{result['shapes']}`. Timing: "
           f"`train.log_every={result['log_every']}`, {result['intervals']} measured intervals after a dropped "
           f"first (compilation) interval; median reported; step time includes the loop's data fetch, host "
           f"transfer and metric fetch. Command: `{result['command']}`.\n",
           f"Peak for MFU: {peak['flops'] / 1e9:.1f} GFLOP/s per {peak['per']} ({peak['source']}). "
           f"MFU = PaLM model FLOPs/token (App. B; linear-attention state products not counted) x tokens/s / "
           f"peak.\n"]
  if info["platform"] == "cpu":
    lines.append(f"The 8-device layouts run on {SIMULATED_DEVICES} simulated CPU devices (`JAX_NUM_CPU_DEVICES="
                 f"{SIMULATED_DEVICES}`) sharing these {info['cpu_count']} cores: they measure the overhead of "
                 f"partitioning and collectives, not a speedup, and their MFU is relative to the whole host. "
                 f"The machine was shared with other agents' jobs while this ran, so absolute numbers are noisy; "
                 f"compare within this file (one run).\n")
  records = result["records"]
  for size in dict.fromkeys(r["size"] for r in records):
    sub = [r for r in records if r["size"] == size]
    shape = sub[0]["shape"]
    lines.append(f"\n## {size}: d_model {shape['d_model']}, {shape['num_layers']} layers, {shape['num_heads']} "
                 f"heads, MLP {shape['mlp_hidden_dim']}, T {shape['seq_len']}, batch {shape['batch_size']}, "
                 f"{shape['compute_dtype']}\n")
    base = next((r for r in sub if r["variant"] == "softmax" and r["layout"] == "single" and r["status"] == "ok"),
                None)
    lines.append("| variant | layout | params | step ms | tokens/s | MFU | step time / softmax single |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in sub:
      if r["status"] != "ok":
        lines.append(f"| {r['variant']} | {r['layout']} | | {r['status']} | | | |")
        continue
      mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.2f}%"
      ratio = f"{r['step_ms'] / base['step_ms']:.2f}" if base else "n/a"
      lines.append(f"| {r['variant']} | {r['layout']} | {r['num_params'] / 1e6:.2f}M | {r['step_ms']:.1f} | "
                   f"{r['tokens_per_s']:.0f} | {mfu} | {ratio} |")
  done = {(r["size"], r["variant"], r["layout"]) for r in records}
  missing = [" ".join(c) for c in map(tuple, result["planned"]) if c not in done]
  if missing:
    lines.append(f"\nNot run (the sweep was stopped before them): {'; '.join(missing)}.")
  lines.append("\nVariants: " + "; ".join(f"`{v}` = `{m}` {k or ''}" for v, (m, k) in VARIANTS.items()) + ". "
               "Layouts: " + "; ".join(f"`{n}` = {mode} mesh {mesh}" for n, (mode, mesh, _) in LAYOUTS.items()) + ".")
  return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="small,medium", help="comma-separated: small, medium")
  parser.add_argument("--mixers", default="gated_attention,gla", help="comma-separated: gated_attention, gla")
  parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated: {', '.join(LAYOUTS)}")
  parser.add_argument("--shapes", default=None, help="cpu or accelerator (default: by platform)")
  parser.add_argument("--log-every", type=int, default=5, help="steps per timed interval")
  parser.add_argument("--intervals", type=int, default=3, help="measured intervals (after one dropped)")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR, help="results directory")
  parser.add_argument("--case", help=argparse.SUPPRESS)  # worker mode: one Case as JSON
  parser.add_argument("--case-out", type=pathlib.Path, help=argparse.SUPPRESS)
  return parser


def main(argv: list[str] | None = None) -> None:
  args = _parser().parse_args(argv)
  if args.case:
    args.case_out.write_text(json.dumps(run_case(Case(**json.loads(args.case)))))
    return
  for name in ("log_every", "intervals"):
    if getattr(args, name) <= 0:
      raise ValueError(f"--{name.replace('_', '-')}: got {getattr(args, name)}; allowed: a positive int")
  sizes = _choices("--sizes", args.sizes, ("small", "medium"))
  mixers = _choices("--mixers", args.mixers, tuple(dict.fromkeys(m for m, _ in VARIANTS.values())))
  layouts = _choices("--layouts", args.layouts, LAYOUTS)
  info = device_info()
  default_shapes = "cpu" if info["platform"] == "cpu" else "accelerator"
  shapes = args.shapes or default_shapes
  if shapes not in SHAPES:
    raise ValueError(f"--shapes: got {shapes!r}; allowed: {', '.join(SHAPES)}")
  from gated_jax.train.flops import peak_flops_per_device  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  sheet = peak_flops_per_device(jax.devices()[0])
  if sheet:
    peak = {"flops": sheet, "per": "device", "source": "data sheet, dense bf16"}
  else:
    dtype = SHAPES[shapes][sizes[0]]["compute_dtype"]
    peak = {"flops": measure_peak_flops(dtype), "per": "host" if info["platform"] == "cpu" else "device",
            "source": f"measured: best of 10 jitted 2048x2048 {dtype} matmuls, 2 N^3 FLOPs each"}
  print(f"peak {peak['flops'] / 1e9:.1f} GFLOP/s ({peak['source']})")
  variants = [v for v, (m, _) in VARIANTS.items() if m in mixers]
  cases = [Case(size, SHAPES[shapes][size], variant, layout, args.log_every, args.intervals,
                0.0 if sheet else peak["flops"])
           for size in sizes for variant in variants for layout in layouts]
  stem = f"train_step_{info['platform']}" + ("" if shapes == default_shapes else f"_{shapes}")
  args.out.mkdir(parents=True, exist_ok=True)
  command = "python -m experiments.benchmarks.train_step " + " ".join(argv if argv is not None else sys.argv[1:])

  def write(records: list[dict[str, Any]]) -> None:
    result = {"device": info, "peak": peak, "shapes": shapes, "log_every": args.log_every,
              "intervals": args.intervals, "command": command.strip(),
              "planned": [[c.size, c.variant, c.layout] for c in cases], "records": records}
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(result))

  run(cases, info, on_record=write)
  print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
  main()
