"""Benchmark: forward and forward+backward time and compiled memory of every linear-attention implementation.

Times ``pallas_kernels.linear_attention`` (GLA form, per-key-channel decay; arXiv 2312.06635 eq. 1) and
``pallas_kernels.delta_rule`` (Gated DeltaNet form, per-head decay, L2-normalised keys; arXiv 2412.06464
eq. 10) for each registered implementation that runs on this device (``reference`` token scan,
``parallel`` quadratic form, ``xla`` chunked form; ``pallas_tpu`` / ``pallas_triton`` only on a TPU / GPU), at
B = 1 and T = 1K..32K, in two head settings: H = 8, K = V = 128 (fla's benchmark shape) and H = 2,
K = V = 32 (a Zoology-sized model).

* Time: ``jax.jit`` of the forward (``o.sum()``-style loss) and of ``jax.value_and_grad`` w.r.t. every input;
  one warm-up call (compilation), then the median of ``--repeats`` calls, each ``block_until_ready``.
* Memory: XLA's compiled ``memory_analysis()`` of the forward+backward program, temp + output bytes
  (buffer assignment: deterministic, independent of other processes; excludes the arguments).
* Caps: the token scan and the quadratic form become impractical at long T (the scan's backward keeps T
  states of H x K x V floats, 4.8 GiB at T=4K; the quadratic form's (H, T, T[, K]) pairwise decays outgrow
  memory); combos above ``CAPS`` for the platform are skipped and listed as such in the output.

Run (writes ``experiments/benchmarks/results/linear_attention_<platform>[_quick].{json,md}``):

    python -m experiments.benchmarks.linear_attention [--quick] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels.linear_attention import delta_rule_op, linear_attention_op

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
SEQ_LENS = (1024, 2048, 4096, 8192, 16384, 32768)
QUICK_SEQ_LENS = (1024, 2048)
SETTINGS = {"H8_D128": dict(batch=1, heads=8, dim=128), "H2_D32": dict(batch=1, heads=2, dim=32)}
# Largest T per (platform, implementation[, op, setting]); combos not listed are uncapped. The parallel form of
# per-channel-decay linear attention materialises (H, T, T, K) pairwise decays: 4 GiB per buffer at H=8, K=128,
# T=1K, so it is skipped outright there on a CPU.
CAPS = {"cpu": {"reference": 4096, "parallel": 2048, ("parallel", "linear_attention", "H8_D128"): 0},
        "gpu": {"reference": 4096, "parallel": 8192}, "tpu": {"reference": 4096, "parallel": 8192}}
OPS = {"linear_attention": linear_attention_op, "delta_rule": delta_rule_op}
_PALLAS_PLATFORM = {"pallas_tpu": "tpu", "pallas_triton": "gpu"}


def device_info() -> dict[str, object]:
  """The device the numbers belong to."""
  device = jax.devices()[0]
  return {"platform": device.platform, "device_kind": device.device_kind, "num_devices": jax.device_count(),
          "cpu_count": os.cpu_count(), "machine": platform.machine(), "jax": jax.__version__}


def make_inputs(op: str, batch: int, seq: int, heads: int, dim: int, dtype=jnp.float32) -> dict[str, jax.Array]:
  """Random inputs with realistic gates: GLA-style per-channel log decays, sigmoid betas, unit keys."""
  keys = jax.random.split(jax.random.key(0), 5)
  shape = (batch, seq, heads, dim)
  q, k, v = (jax.random.normal(key, shape, dtype) for key in keys[:3])
  if op == "linear_attention":
    log_decay = jax.nn.log_sigmoid(jax.random.normal(keys[3], shape)) / 16
    return dict(q=q, k=k, v=v, log_decay=log_decay)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  log_decay = jax.nn.log_sigmoid(jax.random.normal(keys[3], shape[:3]) + 4.0)
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], shape[:3]))
  return dict(q=q, k=k, v=v, beta=beta, log_decay=log_decay)


def loss_fn(op: str, implementation: str) -> Callable[..., jax.Array]:
  """Scalar loss of the op's output (a fixed random cotangent, so the backward pass is a full one)."""
  public = getattr(pallas_kernels, op)

  def loss(inputs):
    inputs = dict(inputs)
    args = [inputs.pop(n) for n in ("q", "k", "v")] + ([inputs.pop("beta")] if op == "delta_rule" else [])
    o = public(*args, **inputs, implementation=implementation)
    return jnp.sum(o * jnp.cos(jnp.arange(o.shape[-1], dtype=o.dtype)))

  return loss


def time_call(fn: Callable[[], object], repeats: int) -> float:
  """Median wall time (seconds) of ``repeats`` calls after one warm-up call."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_one(op: str, implementation: str, inputs: dict[str, jax.Array], repeats: int) -> dict[str, object]:
  """Times forward and forward+backward of one implementation on one input set."""
  loss = loss_fn(op, implementation)
  fwd = jax.jit(loss)
  fwd_bwd = jax.jit(jax.value_and_grad(loss))
  compiled = fwd_bwd.lower(inputs).compile()
  stats = compiled.memory_analysis()
  memory = None if stats is None else int(stats.temp_size_in_bytes + stats.output_size_in_bytes)
  return {"fwd_ms": 1e3 * time_call(lambda: fwd(inputs), repeats),
          "fwd_bwd_ms": 1e3 * time_call(lambda: compiled(inputs), repeats), "memory_bytes": memory}


def implementations_here(op: str, backend: str) -> list[str]:
  """Registered implementations that can run on ``backend`` (Pallas kernels only on their hardware)."""
  return [name for name in OPS[op].implementations
          if _PALLAS_PLATFORM.get(name, backend) == backend]


def run(seq_lens: tuple[int, ...], repeats: int, log: Callable[[str], None] = print,
        on_row: Callable[[dict[str, object]], None] | None = None) -> dict[str, object]:
  """Runs the whole grid; returns ``{"device": ..., "rows": [...]}`` (one row per op/setting/impl/T).
  ``on_row`` receives the partial result after every row (the CLI writes it, so a long sweep keeps what it
  measured)."""
  info = device_info()
  backend = str(info["platform"])
  caps = CAPS.get(backend, {})
  rows = []
  for seq in seq_lens:  # shortest first, so an interrupted sweep still covers every op and setting
    for op in OPS:
      for setting, dims in SETTINGS.items():
        inputs = make_inputs(op, dims["batch"], seq, dims["heads"], dims["dim"])
        for impl in implementations_here(op, backend):
          row = {"op": op, "setting": setting, **dims, "seq_len": seq, "implementation": impl}
          cap = caps.get((impl, op, setting), caps.get(impl, seq))
          if seq > cap:
            row["status"] = f"skipped: T > {cap} is impractical for {impl} ({op}, {setting}) on {backend}"
          else:
            try:
              row.update(bench_one(op, impl, inputs, repeats), status="ok")
            except NotImplementedError as e:
              row["status"] = f"unsupported: {e}"
            except Exception as e:  # pylint: disable=broad-except  (one broken combo must not end the sweep)
              row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
          rows.append(row)
          log(_row_line(row))
          if on_row is not None:
            on_row(_result(info, repeats, rows))
  return _result(info, repeats, rows)


def _result(info: dict[str, object], repeats: int, rows: list[dict[str, object]]) -> dict[str, object]:
  return {"device": info, "repeats": repeats, "memory_metric": "compiled fwd+bwd temp+output bytes",
          "rows": list(rows)}


def _row_line(row: dict[str, object]) -> str:
  head = f"{row['op']:16s} {row['setting']:8s} T={row['seq_len']:6d} {row['implementation']:14s}"
  if row["status"] != "ok":
    return f"{head} {row['status']}"
  memory = "n/a" if row["memory_bytes"] is None else f"{row['memory_bytes'] / 2**20:9.1f} MiB"
  return f"{head} fwd {row['fwd_ms']:10.2f} ms  fwd+bwd {row['fwd_bwd_ms']:10.2f} ms  mem {memory}"


def to_markdown(result: dict[str, object]) -> str:
  """A table per (op, setting): rows T, columns fwd+bwd ms / memory MiB per implementation."""
  info = result["device"]
  lines = [f"# Linear-attention benchmark\n",
           f"Device: platform `{info['platform']}`, device_kind `{info['device_kind']}`, "
           f"{info['num_devices']} device(s), {info['cpu_count']} CPU cores, jax {info['jax']}. "
           f"Median of {result['repeats']} calls after a warm-up; memory is XLA's compiled fwd+bwd "
           f"temp+output bytes. `skip` = above the cap for that implementation on this platform "
           f"(impractical), `n/i` = not implemented for these arguments, `error` = the implementation failed (see the JSON).\n"]
  rows = result["rows"]
  for op in OPS:
    for setting in SETTINGS:
      sub = [r for r in rows if r["op"] == op and r["setting"] == setting]
      if not sub:
        continue
      impls = list(dict.fromkeys(r["implementation"] for r in sub))
      lines.append(f"\n## {op}, {setting} (B=1)\n")
      lines.append("| T | " + " | ".join(f"{i} fwd ms | {i} fwd+bwd ms | {i} MiB" for i in impls) + " |")
      lines.append("|---|" + "---|" * (3 * len(impls)))
      for seq in sorted({r["seq_len"] for r in sub}):
        cells = []
        for impl in impls:
          r = next((r for r in sub if r["seq_len"] == seq and r["implementation"] == impl),
                   {"status": "not run"})
          if r["status"] == "ok":
            mem = "n/a" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.1f}"
            cells += [f"{r['fwd_ms']:.2f}", f"{r['fwd_bwd_ms']:.2f}", mem]
          else:
            cells += [r["status"].split(":")[0].replace("skipped", "skip").replace("unsupported", "n/i")] * 3
        lines.append(f"| {seq} | " + " | ".join(cells) + " |")
  skipped = sorted({r["status"] for r in rows if r["status"].startswith("skipped")})
  if skipped:
    lines.append("\nSkipped: " + "; ".join(skipped) + ".")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help=f"only T in {QUICK_SEQ_LENS}, 2 repeats")
  parser.add_argument("--repeats", type=int, default=None, help="timed calls per combo (default 5, quick 2)")
  parser.add_argument("--max-seq-len", type=int, default=max(SEQ_LENS), help="longest T to run")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR, help="results directory")
  args = parser.parse_args(argv)
  repeats = args.repeats or (2 if args.quick else 5)
  if repeats <= 0:
    raise ValueError(f"--repeats: expected a positive int, got {repeats}")
  seq_lens = tuple(t for t in (QUICK_SEQ_LENS if args.quick else SEQ_LENS) if t <= args.max_seq_len)
  if not seq_lens:
    raise ValueError(f"--max-seq-len: got {args.max_seq_len}; allowed: at least {min(SEQ_LENS)}")
  stem = f"linear_attention_{device_info()['platform']}" + ("_quick" if args.quick else "")
  args.out.mkdir(parents=True, exist_ok=True)

  def write(result: dict[str, object]) -> None:
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(result))

  write(run(seq_lens, repeats, on_row=write))
  print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
  main()
