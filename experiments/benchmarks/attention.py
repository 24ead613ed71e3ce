"""Benchmark: forward and forward+backward time, compiled memory and throughput of every attention implementation.

Times ``pallas_kernels.attention`` per implementation that runs on this device (``reference``, ``xla``, the
auto choice; ``pallas_tpu`` / ``pallas_triton`` compiled, only on their hardware) beside
``jax.nn.dot_product_attention`` with ``implementation="xla"`` (and ``"cudnn"`` on a GPU, with ``is_causal`` /
``local_window_size``, never a dense mask), at B = 1, H = 8, D = 128, T = S from 1K to 16K, causal and
causal with a 1K sliding window, for the softmax, sigmoid, softpick and SSMax normalizers (jax's attention is
softmax only and appears beside each). float32 on a CPU, bfloat16 on a GPU or TPU.

* Time: ``jax.jit`` of a scalar loss of the output (a fixed cotangent pattern) and of its ``value_and_grad``
  w.r.t. q, k, v; one warm-up call (compilation), then the median of ``--repeats`` calls.
* Memory: XLA's compiled ``memory_analysis()`` of the forward+backward program, temp + output bytes.
* Throughput: useful FLOPs per second, ``4 D`` per visible (query, key) pair and head for the forward (the
  two matmuls) and 3.5x that for forward+backward (FlashAttention-2's count: the backward has five matmuls,
  one of them the recomputed scores), against a measured dense matmul peak of the same dtype on this device.
* Caps: the materialised implementations (``reference``, jax's ``xla``) keep ``(H, T, S)`` float32 arrays and
  are skipped above ``CAPS``; on a CPU the non-softmax normalizers stop at 8K (minutes per call).
* Ratio runs: after the sweep, auto and jax's ``xla`` at causal softmax T = 4096 are timed ``--ratio-runs``
  more times back to back; each time and memory ratio uses one run's numbers (other processes may share the
  machine). Short runs: auto against the materialised paths at T = 128..512 (a single key block).
* ``--sweep-blocks``: the blockwise implementations at the ratio setting over a grid of tile sizes.

Run (writes ``experiments/benchmarks/results/attention_<platform>[_quick].{json,md}``):

    python -m experiments.benchmarks.attention [--quick] [--seq-lens 1024,4096] [--repeats 3] [--ratio-runs 2]
        [--sweep-blocks]
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

import pallas_kernels
from pallas_kernels.attention import BlockSizes, attention_op, xla
from experiments.benchmarks.machine import device_info, matmul_peak, positive_ints, time_call

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
SEQ_LENS = (1024, 2048, 4096, 8192, 16384)
QUICK_SEQ_LENS = (256, 512)
SHORT_SEQ_LENS = (128, 256, 512)
SHAPE = dict(batch=1, heads=8, dim=128)
NORMALIZERS = ("softmax", "sigmoid", "softpick", "ssmax")
WINDOW = 1024
MASKS = {"causal": None, f"window_{WINDOW}": WINDOW}  # name -> sliding window (None: plain causal)
DTYPES = {"cpu": jnp.float32, "gpu": jnp.bfloat16, "tpu": jnp.bfloat16}
BASELINES = {"cpu": ("jax_xla",), "gpu": ("jax_xla", "jax_cudnn"), "tpu": ("jax_xla",)}
_PALLAS_PLATFORM = {"pallas_tpu": "tpu", "pallas_triton": "gpu"}
# Largest T per (platform, implementation[, normalizer]); combos not listed are uncapped.
CAPS = {"cpu": {"reference": 4096, "jax_xla": 4096, ("xla", "sigmoid"): 8192, ("xla", "softpick"): 8192,
                ("xla", "ssmax"): 8192, ("auto", "sigmoid"): 8192, ("auto", "softpick"): 8192,
                ("auto", "ssmax"): 8192},
        "gpu": {"reference": 4096}, "tpu": {"reference": 4096}}
RATIO = dict(seq_len=4096, normalizer="softmax", mask="causal")
SWEEP_BLOCKS = ((256, 256), (256, 512), (512, 512), (512, 1024), (1024, 1024))


def implementations_here(backend: str) -> list[str]:
  """``auto``, the registered implementations that run on ``backend``, then jax's baselines."""
  names = [n for n in attention_op.implementations if _PALLAS_PLATFORM.get(n, backend) == backend]
  return ["auto", *names, *BASELINES.get(backend, ("jax_xla",))]


def make_inputs(seq: int, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  keys = jax.random.split(jax.random.key(0), 3)
  shape = (SHAPE["batch"], seq, SHAPE["heads"], SHAPE["dim"])
  return tuple(jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys)


def attend_fn(implementation: str, normalizer: str, window: int | None,
              block_sizes: BlockSizes | None = None) -> Callable[..., jax.Array]:
  """``(q, k, v) -> o``: our op by implementation name (``auto`` = None), or jax's ``dot_product_attention``."""
  if implementation.startswith("jax_"):
    local = None if window is None else (window - 1, 0)
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local,
                                                        implementation=implementation[4:])
  name = None if implementation == "auto" else implementation
  return lambda q, k, v: pallas_kernels.attention(q, k, v, normalizer=normalizer, causal=True, window=window,
                                                  block_sizes=block_sizes, implementation=name)


def loss_of(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  def loss(q, k, v):
    o = fn(q, k, v).astype(jnp.float32)
    return jnp.sum(o * jnp.cos(jnp.arange(o.shape[-1], dtype=jnp.float32)))
  return loss


def visible_pairs(seq: int, window: int | None) -> int:
  """(query, key) pairs a causal (windowed) mask keeps at T = S = ``seq``."""
  if window is None or window >= seq:
    return seq * (seq + 1) // 2
  return window * (window + 1) // 2 + (seq - window) * window


def useful_flops(seq: int, window: int | None, *, backward: bool) -> float:
  forward = 4.0 * SHAPE["batch"] * SHAPE["heads"] * SHAPE["dim"] * visible_pairs(seq, window)
  return forward * (3.5 if backward else 1.0)


def bench_one(fn: Callable[..., jax.Array], inputs, repeats: int, seq: int, window: int | None) -> dict:
  loss = loss_of(fn)
  forward = jax.jit(loss).lower(*inputs).compile()
  both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*inputs).compile()
  stats = both.memory_analysis()
  memory = None if stats is None else int(stats.temp_size_in_bytes + stats.output_size_in_bytes)
  fwd_s, both_s = time_call(lambda: forward(*inputs), repeats), time_call(lambda: both(*inputs), repeats)
  return {"fwd_ms": 1e3 * fwd_s, "fwd_bwd_ms": 1e3 * both_s, "memory_bytes": memory,
          "fwd_gflops": useful_flops(seq, window, backward=False) / fwd_s / 1e9,
          "fwd_bwd_gflops": useful_flops(seq, window, backward=True) / both_s / 1e9}


def _cap(caps: dict, implementation: str, normalizer: str, seq: int) -> int:
  return caps.get((implementation, normalizer), caps.get(implementation, seq))


def _measure(row: dict, fn, inputs, repeats: int, seq: int, window: int | None) -> dict:
  try:
    row.update(bench_one(fn, inputs, repeats, seq, window), status="ok")
  except NotImplementedError as e:
    row["status"] = f"unsupported: {str(e).splitlines()[0][:200]}"
  except Exception as e:  # pylint: disable=broad-except  (one broken combo must not end the sweep)
    row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
  return row


def run(seq_lens, repeats: int, log: Callable[[str], None] = print, on_row=None) -> dict:
  """The sweep: one row per (T, mask, normalizer, implementation); jax's baselines only for softmax."""
  info = device_info()
  backend = str(info["platform"])
  dtype = DTYPES.get(backend, jnp.float32)
  result = {"device": info, "dtype": jnp.dtype(dtype).name, "repeats": repeats, "shape": SHAPE,
            "memory_metric": "compiled fwd+bwd temp+output bytes",
            "matmul_peak_gflops": matmul_peak(dtype), "rows": [], "ratio_runs": [], "short_runs": [],
            "block_sweep": []}
  log(f"dense {jnp.dtype(dtype).name} matmul peak: {result['matmul_peak_gflops']:.1f} GFLOP/s")
  for seq in seq_lens:  # shortest first: an interrupted sweep still covers every case
    inputs = make_inputs(seq, dtype)
    for mask, window in MASKS.items():
      for normalizer in NORMALIZERS:
        for impl in implementations_here(backend):
          if impl.startswith("jax_") and normalizer != "softmax":
            continue
          row = {"seq_len": seq, "mask": mask, "normalizer": normalizer, "implementation": impl}
          cap = _cap(CAPS.get(backend, {}), impl, normalizer, seq)
          if seq > cap:
            row["status"] = f"skipped: T > {cap} on {backend} (materialised or minutes per call)"
          else:
            _measure(row, attend_fn(impl, normalizer, window), inputs, repeats, seq, window)
          result["rows"].append(row)
          log(_row_line(row))
          if on_row is not None:
            on_row(result)
  return result


def ratio_runs(runs: int, repeats: int, log: Callable[[str], None] = print) -> list[dict]:
  """Auto against jax's ``xla`` at the ratio setting, ``runs`` times back to back (each ratio from one run)."""
  backend = device_info()["platform"]
  inputs = make_inputs(RATIO["seq_len"], DTYPES.get(backend, jnp.float32))
  window = MASKS[RATIO["mask"]]
  out = []
  for index in range(runs):
    row = {"run": index + 1, **RATIO}
    for impl in ("auto", "jax_xla"):
      row[impl] = bench_one(attend_fn(impl, RATIO["normalizer"], window), inputs, repeats, RATIO["seq_len"], window)
    row["time_ratio"] = row["auto"]["fwd_bwd_ms"] / row["jax_xla"]["fwd_bwd_ms"]
    row["memory_ratio"] = row["auto"]["memory_bytes"] / row["jax_xla"]["memory_bytes"]
    out.append(row)
    log(f"ratio run {row['run']}: auto {row['auto']['fwd_bwd_ms']:.0f} ms / jax xla "
        f"{row['jax_xla']['fwd_bwd_ms']:.0f} ms = {row['time_ratio']:.2f}x time, {row['memory_ratio']:.3f}x memory")
  return out


def short_runs(repeats: int, log: Callable[[str], None] = print) -> list[dict]:
  """Causal softmax at short T (one or two key blocks): auto against the materialised ``reference`` and jax's
  xla."""
  backend = device_info()["platform"]
  out = []
  for seq in SHORT_SEQ_LENS:
    inputs = make_inputs(seq, DTYPES.get(backend, jnp.float32))
    for impl in ("auto", "reference", "jax_xla"):
      row = _measure({"seq_len": seq, "implementation": impl}, attend_fn(impl, "softmax", None), inputs, repeats,
                     seq, None)
      out.append(row)
      log(f"short T={seq} {impl}: " + (f"fwd {row['fwd_ms']:.2f} ms fwd+bwd {row['fwd_bwd_ms']:.2f} ms"
                                         if row["status"] == "ok" else row["status"]))
  return out


def block_sweep(repeats: int, log: Callable[[str], None] = print) -> list[dict]:
  """The blockwise implementations running here at the ratio setting, over ``SWEEP_BLOCKS`` (fwd = bwd tiles)."""
  backend = device_info()["platform"]
  inputs = make_inputs(RATIO["seq_len"], DTYPES.get(backend, jnp.float32))
  window = MASKS[RATIO["mask"]]
  out = []
  for impl in [n for n in implementations_here(backend) if n in ("xla", "pallas_tpu", "pallas_triton")]:
    for block_q, block_kv in SWEEP_BLOCKS:
      blocks = BlockSizes(block_q, block_kv, block_q, block_kv)
      row = _measure({"implementation": impl, "block_q": block_q, "block_kv": block_kv, **RATIO},
                     attend_fn(impl, RATIO["normalizer"], window, blocks), inputs, repeats, RATIO["seq_len"], window)
      out.append(row)
      log(f"blocks {impl} q={block_q} kv={block_kv}: " + (f"fwd+bwd {row['fwd_bwd_ms']:.0f} ms"
                                                             if row["status"] == "ok" else row["status"]))
  return out


def _row_line(row: dict) -> str:
  head = f"T={row['seq_len']:6d} {row['mask']:12s} {row['normalizer']:9s} {row['implementation']:14s}"
  if row["status"] != "ok":
    return f"{head} {row['status']}"
  memory = "n/a" if row["memory_bytes"] is None else f"{row['memory_bytes'] / 2**20:9.1f} MiB"
  return (f"{head} fwd {row['fwd_ms']:10.2f} ms  fwd+bwd {row['fwd_bwd_ms']:10.2f} ms  mem {memory}  "
          f"{row['fwd_bwd_gflops']:.1f} GFLOP/s")


def _ok(rows, **match) -> dict | None:
  return next((r for r in rows if r["status"] == "ok" and all(r.get(k) == v for k, v in match.items())), None)


def _summary(result: dict) -> list[str]:
  lines = ["\n## Summary\n"]
  peak = result["matmul_peak_gflops"]
  for r in result.get("ratio_runs", []):
    lines.append(f"- Ratio run {r['run']}, causal softmax T={r['seq_len']} fwd+bwd: auto {r['auto']['fwd_bwd_ms']:.0f} "
                 f"ms vs jax.nn.dot_product_attention(implementation=\"xla\") {r['jax_xla']['fwd_bwd_ms']:.0f} ms: "
                 f"**{r['time_ratio']:.2f}x time** (goal <= 0.4x), **{r['memory_ratio']:.3f}x compiled memory** "
                 f"(goal <= 0.25x).")
  auto = _ok(result["rows"], implementation="auto", **{k: RATIO[k] for k in ("seq_len", "normalizer", "mask")})
  if auto:
    lines.append(f"- Auto at the ratio setting: {auto['fwd_gflops']:.1f} GFLOP/s forward, "
                 f"{auto['fwd_bwd_gflops']:.1f} GFLOP/s forward+backward (useful FLOPs), "
                 f"{100 * auto['fwd_bwd_gflops'] / peak:.0f}% of the measured {result['dtype']} matmul peak "
                 f"({peak:.1f} GFLOP/s).")
  for seq in SHORT_SEQ_LENS:
    by = {r["implementation"]: r for r in result.get("short_runs", []) if r["seq_len"] == seq and r["status"] == "ok"}
    if "auto" in by and len(by) > 1:
      fastest = min((r["fwd_bwd_ms"], name) for name, r in by.items() if name != "auto")
      blocks = -(-seq // xla.DEFAULT_BLOCKS[result["device"]["platform"]].kv)
      lines.append(f"- Short T={seq} ({blocks} key block{'s' * (blocks > 1)} of the default tile) fwd+bwd: auto "
                   f"{by['auto']['fwd_bwd_ms']:.2f} ms, fastest "
                   f"materialised {fastest[1]} {fastest[0]:.2f} ms ({by['auto']['fwd_bwd_ms'] / fastest[0]:.2f}x).")
  for seq in sorted({r["seq_len"] for r in result["rows"]}):
    triton = {n: _ok(result["rows"], implementation="pallas_triton", normalizer=n, mask="causal", seq_len=seq)
              for n in ("softmax", "sigmoid")}
    cudnn = _ok(result["rows"], implementation="jax_cudnn", normalizer="softmax", mask="causal", seq_len=seq)
    if triton["softmax"] and cudnn:
      lines.append(f"- T={seq} causal forward: Triton softmax / cuDNN speed = "
                   f"{cudnn['fwd_ms'] / triton['softmax']['fwd_ms']:.2f} (goal >= 0.6).")
    if triton["softmax"] and triton["sigmoid"]:
      lines.append(f"- T={seq} causal forward: Triton sigmoid is "
                   f"{100 * (triton['softmax']['fwd_ms'] / triton['sigmoid']['fwd_ms'] - 1):.0f}% faster than Triton "
                   "softmax (goal >= 10%).")
  return lines


def to_markdown(result: dict) -> str:
  info = result["device"]
  lines = ["# Attention benchmark\n",
           f"Device: platform `{info['platform']}`, device_kind `{info['device_kind']}`, CPU "
           f"`{info.get('cpu_model', 'unknown')}`, {info['num_devices']} device(s), {info['cpu_count']} CPU cores, "
           f"jax {info['jax']}. B={SHAPE['batch']}, H={SHAPE['heads']}, D={SHAPE['dim']}, T=S, {result['dtype']}. "
           f"Median of {result['repeats']} calls after a warm-up; memory is XLA's compiled fwd+bwd temp+output "
           f"bytes; GFLOP/s count useful FLOPs (visible pairs only). `skip` = above the cap on this platform, "
           f"`n/i` = not implemented for these arguments, `error` = failed (see the JSON).\n"]
  lines += _summary(result)
  lines += [f"- Note: {note}" for note in result.get("notes", [])]
  rows = result["rows"]
  for mask in MASKS:
    for normalizer in NORMALIZERS:
      sub = [r for r in rows if r["mask"] == mask and r["normalizer"] == normalizer]
      if not sub:
        continue
      impls = list(dict.fromkeys(r["implementation"] for r in sub))
      lines.append(f"\n## {normalizer}, {mask}\n")
      lines.append("| T | " + " | ".join(f"{i} fwd ms | {i} fwd+bwd ms | {i} MiB | {i} GFLOP/s" for i in impls) + " |")
      lines.append("|---|" + "---|" * (4 * len(impls)))
      for seq in sorted({r["seq_len"] for r in sub}):
        cells = []
        for impl in impls:
          r = next((r for r in sub if r["seq_len"] == seq and r["implementation"] == impl), {"status": "not run"})
          if r["status"] == "ok":
            mem = "n/a" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.1f}"
            cells += [f"{r['fwd_ms']:.1f}", f"{r['fwd_bwd_ms']:.1f}", mem, f"{r['fwd_bwd_gflops']:.1f}"]
          else:
            cells += [r["status"].split(":")[0].replace("skipped", "skip").replace("unsupported", "n/i")] * 4
        lines.append(f"| {seq} | " + " | ".join(cells) + " |")
  if result.get("short_runs"):
    lines += [f"\n## Short sequences (causal softmax, T <= {max(SHORT_SEQ_LENS)})\n",
              "| T | implementation | fwd ms | fwd+bwd ms |", "|---|---|---|---|"]
    lines += [f"| {r['seq_len']} | {r['implementation']} | {r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} |"
              for r in result["short_runs"] if r["status"] == "ok"]
  if result.get("block_sweep"):
    lines += [f"\n## Tile sweep (causal softmax T={RATIO['seq_len']})\n", "| implementation | block q | block kv | "
              "fwd ms | fwd+bwd ms | MiB |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['implementation']} | {r['block_q']} | {r['block_kv']} | {r['fwd_ms']:.0f} | "
              f"{r['fwd_bwd_ms']:.0f} | {r['memory_bytes'] / 2**20:.1f} |"
              for r in result["block_sweep"] if r["status"] == "ok"]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help=f"T in {QUICK_SEQ_LENS}, 2 repeats, sweep only")
  parser.add_argument("--seq-lens", type=positive_ints, default=None, help=f"T values (default {SEQ_LENS})")
  parser.add_argument("--repeats", type=lambda text: positive_ints(text)[0], default=None,
                      help="timed calls per combo (default 3, quick 2)")
  parser.add_argument("--ratio-runs", type=int, default=2, choices=range(0, 11),
                      help=f"back-to-back auto / jax xla runs at {RATIO}")
  parser.add_argument("--sweep-blocks", action="store_true", help=f"also time the tiles {SWEEP_BLOCKS}")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR, help="results directory")
  parser.add_argument("--render", type=pathlib.Path, default=None,
                      help="rewrite the .md of this results .json (with its optional 'notes') and exit")
  args = parser.parse_args(argv)
  if args.render is not None:
    args.render.with_suffix(".md").write_text(to_markdown(json.loads(args.render.read_text())))
    return
  repeats = args.repeats or (2 if args.quick else 3)
  seq_lens = args.seq_lens or (QUICK_SEQ_LENS if args.quick else SEQ_LENS)
  stem = f"attention_{device_info()['platform']}" + ("_quick" if args.quick else "")
  args.out.mkdir(parents=True, exist_ok=True)

  def write(result: dict) -> None:
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(result))

  result = run(seq_lens, repeats, on_row=write)
  if not args.quick:
    result["short_runs"] = short_runs(repeats)
    write(result)
    if args.ratio_runs:
      result["ratio_runs"] = ratio_runs(args.ratio_runs, repeats)
      write(result)
    if args.sweep_blocks:
      result["block_sweep"] = block_sweep(repeats)
      write(result)
  print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
  main()
