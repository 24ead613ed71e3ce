"""Benchmark: the mixture-of-experts layer and its grouped matmul, forward+backward time and compiled memory, and
an MoE LM training step on 1 and 8 (simulated) devices.

Three parts, all in one run (``--parts``):

* ``gmm``: :func:`pallas_kernels.grouped_matmul` at an MoE shape (rows = tokens × k, 8 groups of uneven size),
  forward+backward of ``sum(out²)`` for ``reference`` (masked dense), ``xla`` (on a CPU the block-sparse product;
  on GPU/TPU ``jax.lax.ragged_dot``) and ``ragged_dot`` (``jax.lax.ragged_dot`` itself, which XLA:CPU lowers to
  a masked dense product), plus the Pallas kernels where they run compiled (``pallas_tpu`` on a TPU,
  ``pallas_triton`` on a GPU; interpret-mode timings on a CPU mean nothing, so they are not run there).
* ``layer``: ``MLPS["moe"]`` (8 experts, top-2 softmax) forward+backward with ``dropless`` dispatch (each
  registered grouped-matmul implementation above) and ``capacity`` dispatch (factor 1.25), against the dense
  SwiGLU with the same active parameters (width 2 × expert width).
* ``train``: ``experiments/configs/moe.py``'s LM trained by ``gated_jax.train.train`` (the real loop) on one
  device, on 8 simulated CPU devices as ``expert=8`` (experts sharded, batch over ``expert``) and as
  ``data=8`` (experts replicated), each in its own subprocess; median tokens/s over the logged intervals after
  the first (compilation). Simulated devices share the host's cores: this measures partitioning overhead, not
  a speedup.

Times are the median of ``--repeats`` jitted calls after one warm-up; memory is XLA's compiled estimate
(``memory_analysis()``: arguments + outputs + temporaries). Writes ``<out>/moe_<platform>.{json,md}``:

    python -m experiments.benchmarks.moe [--parts gmm,layer,train] [--repeats 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from experiments.benchmarks.machine import device_info

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
PARTS = ("gmm", "layer", "train")
# tokens (batch × seq), d_model, expert hidden width, experts, k
SHAPES = {"cpu": dict(batch=8, seq=512, d_model=256, hidden=512, experts=8, k=2),
          "accelerator": dict(batch=16, seq=2048, d_model=1024, hidden=2048, experts=8, k=2)}
TRAIN_LAYOUTS = {"single": ({"data": 1}, 1), "expert8": ({"expert": 8}, 8), "data8": ({"data": 8}, 8)}


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
  import jax  # pylint: disable=import-outside-toplevel
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def _memory(compiled) -> int | None:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes)


def _measure(fn, args, repeats: int) -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  compiled = jax.jit(fn).lower(*args).compile()
  median, times = _time(lambda: compiled(*args), repeats)
  return {"ms": 1e3 * median, "ms_all": [1e3 * t for t in times], "memory_bytes": _memory(compiled),
          "status": "ok"}


def _gmm_implementations(platform: str) -> dict[str, Callable]:
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from pallas_kernels.grouped_matmul import grouped_matmul, xla  # pylint: disable=import-outside-toplevel

  impls = {name: (lambda name: lambda l, r, g: grouped_matmul(l, r, g, implementation=name))(name)
           for name in ("reference", "xla")}
  impls["ragged_dot"] = lambda l, r, g: xla.ragged(l, r, g).astype(jnp.float32)
  if platform == "tpu":
    impls["pallas_tpu"] = lambda l, r, g: grouped_matmul(l, r, g, implementation="pallas_tpu")
  if platform == "gpu":
    impls["pallas_triton"] = lambda l, r, g: grouped_matmul(l, r, g, implementation="pallas_triton")
  return impls


def gmm_part(shape: dict[str, int], platform: str, dtype: str, repeats: int) -> list[dict[str, Any]]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  rows, k, n, groups = shape["batch"] * shape["seq"] * shape["k"], shape["d_model"], shape["hidden"], shape["experts"]
  share = np.random.default_rng(0).dirichlet(np.full(groups, 4.0))
  sizes = np.floor(share * rows).astype(np.int32)
  sizes[-1] += rows - sizes.sum()
  lhs = jax.random.normal(jax.random.PRNGKey(0), (rows, k), jnp.dtype(dtype))
  rhs = jax.random.normal(jax.random.PRNGKey(1), (groups, k, n), jnp.dtype(dtype)) / k ** 0.5
  group_sizes = jnp.asarray(sizes)
  records = []
  for name, impl in _gmm_implementations(platform).items():
    def loss(l, r, g, impl=impl):
      return jnp.sum(jnp.square(impl(l, r, g).astype(jnp.float32)))
    fn = jax.value_and_grad(loss, argnums=(0, 1))
    try:
      record = _measure(fn, (lhs, rhs, group_sizes), repeats)
    except Exception as e:  # pylint: disable=broad-except  (a failing implementation is a row, not a crash)
      record = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    records.append({"part": "gmm", "case": name, "rows": rows, "k": k, "n": n, "groups": groups,
                    "group_sizes": sizes.tolist(), "flops": 6 * rows * k * n, **record})
    print(f"gmm {name:14s} {record.get('ms', float('nan')):9.2f} ms {record['status']}")
  return records


def layer_part(shape: dict[str, int], platform: str, dtype: str, repeats: int) -> list[dict[str, Any]]:
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from gated_jax.layers import MLPS  # pylint: disable=import-outside-toplevel

  x = jax.random.normal(jax.random.PRNGKey(0), (shape["batch"], shape["seq"], shape["d_model"]), jnp.dtype(dtype))
  moe = dict(d_model=shape["d_model"], hidden_dim=shape["hidden"], num_experts=shape["experts"], k=shape["k"],
             router_kwargs={"renormalize": True}, dtype=jnp.dtype(dtype))
  cases = {"dense (equal active)": MLPS.get("swiglu")(d_model=shape["d_model"], hidden_dim=shape["k"] * shape["hidden"],
                                                      dtype=jnp.dtype(dtype)),
           "capacity 1.25": MLPS.get("moe")(**moe, dispatch="capacity", capacity_factor=1.25)}
  cases |= {f"dropless {name}": MLPS.get("moe")(**moe, gmm_implementation=name)
            for name in _gmm_implementations(platform) if name != "ragged_dot"}
  records = []
  for name, layer in cases.items():
    params = nn.meta.unbox(jax.jit(layer.init)(jax.random.PRNGKey(1), x))

    def loss(p, x, layer=layer):
      return jnp.sum(jnp.square(layer.apply(p, x).astype(jnp.float32)))
    fn = jax.value_and_grad(loss, argnums=(0, 1))
    try:
      record = _measure(fn, (params, x), repeats)
    except Exception as e:  # pylint: disable=broad-except
      record = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    records.append({"part": "layer", "case": name, **record})
    print(f"layer {name:22s} {record.get('ms', float('nan')):9.2f} ms {record['status']}")
  return records


def train_case(layout: str, steps_per_interval: int, intervals: int) -> dict[str, Any]:
  """One training run of the MoE LM in this process (``TRAIN_LAYOUTS[layout]``)."""
  import jax  # pylint: disable=import-outside-toplevel
  from experiments.configs import moe  # pylint: disable=import-outside-toplevel
  from experiments.tables.common import apply_overrides  # pylint: disable=import-outside-toplevel
  from gated_jax.train import train  # pylint: disable=import-outside-toplevel

  mesh, _ = TRAIN_LAYOUTS[layout]
  steps = steps_per_interval * (intervals + 1)
  config = apply_overrides(moe.get_config("tiny"), {
      "data.batch_size": 16, "train.steps": steps, "optim.warmup_steps": 0,
      "train.log_every": steps_per_interval, "train.eval_every": steps,
      "train.eval_batches": 1, "train.checkpoint_every": steps, "train.diagnostics": False, "train.progress": False,
      "train.tensorboard": False, "mesh.data": 1, **{f"mesh.{a}": s for a, s in mesh.items()}})
  result = train(config, workdir=None)
  rates = [h["tokens_per_s"] for h in result.history[1:]]
  return {"part": "train", "case": layout, "mesh": mesh, "devices": jax.device_count(),
          "tokens_per_s": statistics.median(rates), "tokens_per_s_all": rates, "num_params": result.num_params,
          "final_loss": result.history[-1]["loss"], "status": "ok"}


def train_part(platform: str, steps_per_interval: int, intervals: int) -> list[dict[str, Any]]:
  records = []
  for layout, (_, devices) in TRAIN_LAYOUTS.items():
    env = dict(os.environ)
    if devices > 1:
      if platform != "cpu":
        records.append({"part": "train", "case": layout, "status": "skipped: simulated devices are CPU only"})
        continue
      env |= {"JAX_NUM_CPU_DEVICES": str(devices), "JAX_PLATFORMS": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
      out = pathlib.Path(tmp) / "record.json"
      proc = subprocess.run([sys.executable, "-m", "experiments.benchmarks.moe", "--train-case", layout,
                             "--steps-per-interval", str(steps_per_interval), "--intervals", str(intervals),
                             "--case-out", str(out)], env=env, capture_output=True, text=True, check=False,
                            cwd=pathlib.Path(__file__).resolve().parents[2])
      if proc.returncode or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        record = {"part": "train", "case": layout, "status": f"error (rc {proc.returncode}): {tail[0][:300]}"}
      else:
        record = json.loads(out.read_text())
    records.append(record)
    print(f"train {layout:8s} {record.get('tokens_per_s', float('nan')):10.0f} tok/s {record['status']}")
  return records


def _mb(record: dict[str, Any]) -> str:
  return "n/a" if record.get("memory_bytes") is None else f"{record['memory_bytes'] / 2 ** 20:.1f}"


def to_markdown(result: dict[str, Any]) -> str:
  info, shape = result["device"], result["shape"]
  lines = ["# MoE benchmark\n",
           f"Device: {info['num_devices']} x `{info['device_kind']}` ({info['platform']}); CPU {info['cpu_model']}, "
           f"{info['cpu_count']} cores; jax {info['jax']}. Command: `{result['command']}`. Times: median of "
           f"{result['repeats']} jitted forward+backward calls after a warm-up; memory: XLA's compiled estimate "
           f"(arguments + outputs + temporaries).\n", result["note"] + "\n"]
  records = result["records"]
  gmm = [r for r in records if r["part"] == "gmm"]
  if gmm:
    g = gmm[0]
    lines += [f"\n## grouped_matmul: ({g['rows']}, {g['k']}) x ({g['groups']}, {g['k']}, {g['n']}), group sizes "
              f"{g['group_sizes']}, {shape['dtype']}\n", "| implementation | fwd+bwd ms | GFLOP/s | memory MB | "
              "time / xla |", "|---|---|---|---|---|"]
    base = next((r["ms"] for r in gmm if r["case"] == "xla" and r["status"] == "ok"), float("nan"))
    for r in gmm:
      if r["status"] != "ok":
        lines.append(f"| {r['case']} | {r['status']} | | | |")
        continue
      lines.append(f"| {r['case']} | {r['ms']:.2f} | {r['flops'] / r['ms'] / 1e6:.1f} | {_mb(r)} | "
                   f"{r['ms'] / base:.2f} |")
  layer = [r for r in records if r["part"] == "layer"]
  if layer:
    lines += [f"\n## MoE layer: batch {shape['batch']} x seq {shape['seq']}, d_model {shape['d_model']}, "
              f"{shape['experts']} experts of {shape['hidden']}, top-{shape['k']}, {shape['dtype']}\n",
              "| case | fwd+bwd ms | memory MB | time / dense |", "|---|---|---|---|"]
    base = next((r["ms"] for r in layer if r["case"].startswith("dense") and r["status"] == "ok"), float("nan"))
    for r in layer:
      if r["status"] != "ok":
        lines.append(f"| {r['case']} | {r['status']} | | |")
        continue
      lines.append(f"| {r['case']} | {r['ms']:.2f} | {_mb(r)} | {r['ms'] / base:.2f} |")
  train = [r for r in records if r["part"] == "train"]
  if train:
    lines += ["\n## MoE LM training step (`experiments/configs/moe.py:tiny`, batch 16)\n",
              "| layout | mesh | tokens/s (median) | all intervals |", "|---|---|---|---|"]
    for r in train:
      if r["status"] != "ok":
        lines.append(f"| {r['case']} | | {r['status']} | |")
        continue
      lines.append(f"| {r['case']} | {r['mesh']} | {r['tokens_per_s']:.0f} | "
                   f"{', '.join(f'{t:.0f}' for t in r['tokens_per_s_all'])} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--steps-per-interval", type=int, default=5)
  parser.add_argument("--intervals", type=int, default=3)
  parser.add_argument("--note", default="", help="conditions to record in the md (e.g. other jobs running)")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR)
  parser.add_argument("--train-case", help=argparse.SUPPRESS)
  parser.add_argument("--case-out", type=pathlib.Path, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.train_case:
    args.case_out.write_text(json.dumps(train_case(args.train_case, args.steps_per_interval, args.intervals)))
    return
  parts = [p for p in args.parts.split(",") if p]
  if not parts or set(parts) - set(PARTS):
    raise ValueError(f"--parts: got {args.parts!r}; allowed: a comma-separated subset of {', '.join(PARTS)}")
  for name in ("repeats", "steps_per_interval", "intervals"):
    if getattr(args, name) <= 0:
      raise ValueError(f"--{name.replace('_', '-')}: got {getattr(args, name)}; allowed: a positive int")
  info = device_info()
  platform = "gpu" if info["platform"] in ("cuda", "rocm", "gpu") else info["platform"]
  shape = dict(SHAPES["cpu" if platform == "cpu" else "accelerator"])
  shape["dtype"] = "float32" if platform == "cpu" else "bfloat16"
  records = []
  if "gmm" in parts:
    records += gmm_part(shape, platform, shape["dtype"], args.repeats)
  if "layer" in parts:
    records += layer_part(shape, platform, shape["dtype"], args.repeats)
  if "train" in parts:
    records += train_part(platform, args.steps_per_interval, args.intervals)
  command = "python -m experiments.benchmarks.moe " + " ".join(argv if argv is not None else sys.argv[1:])
  result = {"device": info, "shape": shape, "repeats": args.repeats, "command": command.strip(),
            "note": args.note, "records": records}
  args.out.mkdir(parents=True, exist_ok=True)
  stem = f"moe_{info['platform']}"
  (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
  (args.out / f"{stem}.md").write_text(to_markdown(result))
  print(to_markdown(result))


if __name__ == "__main__":
  main()
