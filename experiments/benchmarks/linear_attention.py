"""Benchmark: forward and forward+backward time and compiled memory of every linear-attention implementation.

Times ``pallas_kernels.linear_attention`` with a scalar per-head decay (simple GLA / RetNet / Mamba-2 form)
and with a per-key-channel decay (GLA; arXiv 2312.06635 eq. 1), and ``pallas_kernels.delta_rule`` (Gated
DeltaNet form, per-head decay, L2-normalised keys; arXiv 2412.06464 eq. 10) for each registered implementation
that runs on this device (``reference`` token scan, ``parallel`` quadratic form, ``xla`` chunked form;
``pallas_tpu`` / ``pallas_triton`` only on a TPU / GPU), at B = 1 and T = 1K..32K, in two head settings:
H = 8, K = V = 128 (fla's benchmark shape) and H = 2, K = V = 32 (a Zoology-sized model).

* Time: ``jax.jit`` of the forward (``o.sum()``-style loss) and of ``jax.value_and_grad`` w.r.t. every input;
  one warm-up call (compilation), then the median of ``--repeats`` calls, each ``block_until_ready``.
* Memory: XLA's compiled ``memory_analysis()`` of the forward+backward program, temp + output bytes
  (buffer assignment: deterministic, independent of other processes; excludes the arguments).
* Caps: the token scan and the quadratic form become impractical at long T (the scan's backward keeps T
  states of H x K x V floats, 4.8 GiB at T=4K for H=8, K=V=128; the quadratic form's (H, T, T[, K]) pairwise
  terms outgrow memory); combos above ``CAPS`` for the platform are skipped and listed as such in the output.
* Ratio check: other processes may share the CPU, so after the sweep the fwd+bwd time of ``xla`` and
  ``reference`` at ``RATIO_SEQ_LEN`` is measured ``--ratio-runs`` more times, back to back (every case, both
  settings); each ratio is computed within one run. ``--ratio-only`` skips the sweep.
* Throughput: ``xla``'s fwd+bwd GFLOP/s in the ratio runs, counting the chunked form's four matmuls at the
  default chunk ``C`` (64; 32 at K = V = 32) (``2 C (K + V) + 4 K V`` FLOPs per token and head forward: scores
  and intra-chunk outputs, the state's read and its update) and 3x that for fwd+bwd, against a dense float32
  matmul peak measured in the same run. The delta rule's extra work (the WY representation's triangular solve)
  is not counted, so its figure understates the work done.

Run (writes ``experiments/benchmarks/results/linear_attention_<platform>[_quick].{json,md}``):

    python -m experiments.benchmarks.linear_attention [--quick] [--repeats 5] [--ratio-runs 2] [--ratio-only]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels.linear_attention import default_chunk_size, delta_rule_op, linear_attention_op
from experiments.benchmarks.machine import device_info, matmul_peak, time_call

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
SEQ_LENS = (1024, 2048, 4096, 8192, 16384, 32768)
QUICK_SEQ_LENS = (1024, 2048)
SETTINGS = {"H8_D128": dict(batch=1, heads=8, dim=128), "H2_D32": dict(batch=1, heads=2, dim=32)}
# Benchmarked cases: name -> (public op, log-decay form).
CASES = {"linear_attention_head": ("linear_attention", "head"),
         "linear_attention_channel": ("linear_attention", "channel"),
         "delta_rule": ("delta_rule", "head")}
# Largest T per (platform, implementation[, case, setting]); combos not listed are uncapped. On a CPU: the
# reference scan at H=8, K=V=128 keeps 4.8 GiB of states per 4K steps for its backward (T=8K would need ~10 GiB
# of a shared 23 GiB machine and ~1 min per call); the parallel form is quadratic in T (the delta rule's
# T x T inverse also costs O(T^3)); per-channel-decay parallel linear attention materialises (H, T, T, K)
# pairwise decays, 4 GiB per buffer at H=8, K=128, T=1K, so it is skipped outright there.
CAPS = {"cpu": {("reference", "linear_attention_head", "H8_D128"): 4096,
                ("reference", "linear_attention_channel", "H8_D128"): 2048,
                ("reference", "delta_rule", "H8_D128"): 4096,
                "parallel": 4096, ("parallel", "linear_attention_head", "H8_D128"): 2048,
                ("parallel", "delta_rule", "H8_D128"): 2048,
                ("parallel", "linear_attention_channel", "H8_D128"): 0,
                ("parallel", "linear_attention_channel", "H2_D32"): 1024},
        "gpu": {"reference": 4096, "parallel": 8192}, "tpu": {"reference": 4096, "parallel": 8192}}
OPS = {"linear_attention": linear_attention_op, "delta_rule": delta_rule_op}
RATIO_SEQ_LEN = 4096
_PALLAS_PLATFORM = {"pallas_tpu": "tpu", "pallas_triton": "gpu"}


def make_inputs(case: str, batch: int, seq: int, heads: int, dim: int, dtype=jnp.float32) -> dict[str, jax.Array]:
  """Random inputs with realistic gates: GLA-style log decays (per head or per key channel), sigmoid betas,
  unit keys for the delta rule."""
  op, decay = CASES[case]
  keys = jax.random.split(jax.random.key(0), 5)
  shape = (batch, seq, heads, dim)
  q, k, v = (jax.random.normal(key, shape, dtype) for key in keys[:3])
  if op == "linear_attention":
    decay_shape = shape if decay == "channel" else shape[:3]
    log_decay = jax.nn.log_sigmoid(jax.random.normal(keys[3], decay_shape)) / 16
    return dict(q=q, k=k, v=v, log_decay=log_decay)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  log_decay = jax.nn.log_sigmoid(jax.random.normal(keys[3], shape[:3]) + 4.0)
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], shape[:3]))
  return dict(q=q, k=k, v=v, beta=beta, log_decay=log_decay)


def loss_fn(op: str, implementation: str, **op_kwargs) -> Callable[..., jax.Array]:
  """Scalar loss of the op's output (a fixed cotangent that varies over the value channels, so the backward pass
  is a full one); ``op_kwargs``: static arguments of the op (e.g. ``chunk_size``). The cotangent's values are a
  constant: computed inside the program, ``cos`` would run once per output element (XLA fuses it into the
  broadcast), about 20 ms per call at T=4096, H=8, V=128 on the 2-core CPU, which is not the op's work."""
  public = getattr(pallas_kernels, op)

  def loss(inputs):
    inputs = dict(inputs)
    args = [inputs.pop(n) for n in ("q", "k", "v")] + ([inputs.pop("beta")] if op == "delta_rule" else [])
    o = public(*args, **inputs, implementation=implementation, **op_kwargs)
    return jnp.sum(o * np.cos(np.arange(o.shape[-1])).astype(o.dtype))

  return loss


def compile_fwd_bwd(op: str, implementation: str, inputs: dict[str, jax.Array], **op_kwargs):
  """The compiled ``jax.value_and_grad`` of the loss w.r.t. every input."""
  return jax.jit(jax.value_and_grad(loss_fn(op, implementation, **op_kwargs))).lower(inputs).compile()


def bench_one(op: str, implementation: str, inputs: dict[str, jax.Array], repeats: int) -> dict[str, object]:
  """Times forward and forward+backward of one implementation on one input set."""
  fwd = jax.jit(loss_fn(op, implementation))
  compiled = compile_fwd_bwd(op, implementation, inputs)
  stats = compiled.memory_analysis()
  memory = None if stats is None else int(stats.temp_size_in_bytes + stats.output_size_in_bytes)
  return {"fwd_ms": 1e3 * time_call(lambda: fwd(inputs), repeats),
          "fwd_bwd_ms": 1e3 * time_call(lambda: compiled(inputs), repeats), "memory_bytes": memory}


def chunked_flops(seq: int, heads: int, dim: int, *, backward: bool) -> float:
  """FLOPs of the chunked form's four matmuls at the default chunk (K = V = ``dim``; B = 1), x3 with the
  backward."""
  per_token = 2 * default_chunk_size(seq, dim, dim) * (dim + dim) + 4 * dim * dim
  return per_token * seq * heads * (3.0 if backward else 1.0)


def ratio_runs(runs: int, repeats: int, log: Callable[[str], None] = print) -> list[dict[str, object]]:
  """``runs`` back-to-back measurements of the fwd+bwd time of ``reference`` and ``xla`` at
  ``RATIO_SEQ_LEN`` (every case and setting); each ratio uses times from the same run."""
  out = []
  for case, (op, _) in CASES.items():
    for setting, dims in SETTINGS.items():
      inputs = make_inputs(case, dims["batch"], RATIO_SEQ_LEN, dims["heads"], dims["dim"])
      compiled = {impl: compile_fwd_bwd(op, impl, inputs) for impl in ("reference", "xla")}
      flops = chunked_flops(RATIO_SEQ_LEN, dims["heads"], dims["dim"], backward=True)
      for run_index in range(runs):
        ms = {impl: 1e3 * time_call(lambda f=f: f(inputs), repeats) for impl, f in compiled.items()}
        row = {"case": case, "setting": setting, "seq_len": RATIO_SEQ_LEN, "run": run_index + 1,
               "reference_fwd_bwd_ms": ms["reference"], "xla_fwd_bwd_ms": ms["xla"],
               "ratio": ms["reference"] / ms["xla"], "xla_fwd_bwd_gflops": flops / ms["xla"] / 1e6}
        out.append(row)
        log(f"ratio run {row['run']} {case} {setting}: reference {ms['reference']:.1f} ms / xla "
            f"{ms['xla']:.1f} ms = {row['ratio']:.2f}x, xla {row['xla_fwd_bwd_gflops']:.1f} GFLOP/s")
  return out


def implementations_here(op: str, backend: str) -> list[str]:
  """Registered implementations that can run on ``backend`` (Pallas kernels only on their hardware)."""
  return [name for name in OPS[op].implementations
          if _PALLAS_PLATFORM.get(name, backend) == backend]


def run(seq_lens: tuple[int, ...], repeats: int, log: Callable[[str], None] = print,
        on_row: Callable[[dict[str, object]], None] | None = None) -> dict[str, object]:
  """Runs the whole grid; returns ``{"device": ..., "rows": [...]}`` (one row per case/setting/impl/T).
  ``on_row`` receives the partial result after every row (the CLI writes it, so a long sweep keeps what it
  measured)."""
  info = device_info()
  backend = str(info["platform"])
  caps = CAPS.get(backend, {})
  rows = []
  for seq in seq_lens:  # shortest first, so an interrupted sweep still covers every case and setting
    for case, (op, _) in CASES.items():
      for setting, dims in SETTINGS.items():
        inputs = make_inputs(case, dims["batch"], seq, dims["heads"], dims["dim"])
        for impl in implementations_here(op, backend):
          row = {"case": case, "op": op, "setting": setting, **dims, "seq_len": seq, "implementation": impl}
          cap = caps.get((impl, case, setting), caps.get(impl, seq))
          if seq > cap:
            row["status"] = f"skipped: T > {cap} is impractical for {impl} ({case}, {setting}) on {backend}"
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
          "rows": list(rows), "ratio_runs": []}


def _row_line(row: dict[str, object]) -> str:
  head = f"{row['case']:24s} {row['setting']:8s} T={row['seq_len']:6d} {row['implementation']:14s}"
  if row["status"] != "ok":
    return f"{head} {row['status']}"
  memory = "n/a" if row["memory_bytes"] is None else f"{row['memory_bytes'] / 2**20:9.1f} MiB"
  return f"{head} fwd {row['fwd_ms']:10.2f} ms  fwd+bwd {row['fwd_bwd_ms']:10.2f} ms  mem {memory}"


def memory_growth(rows: list[dict[str, object]]) -> float | None:
  """Least-squares slope of log(memory) against log(T) over ``rows`` (1 = linear, 2 = quadratic)."""
  points = [(math.log(r["seq_len"]), math.log(r["memory_bytes"])) for r in rows
            if r["status"] == "ok" and r["memory_bytes"]]
  if len(points) < 2:
    return None
  mean_x = sum(x for x, _ in points) / len(points)
  mean_y = sum(y for _, y in points) / len(points)
  return (sum((x - mean_x) * (y - mean_y) for x, y in points)
          / sum((x - mean_x) ** 2 for x, _ in points))


def _summary(result: dict[str, object]) -> list[str]:
  """Headline lines: the T=RATIO_SEQ_LEN fwd+bwd ratios and GFLOP/s, the memory growth of xla / parallel."""
  lines = ["\n## Summary\n"]
  peak = result.get("matmul_peak_gflops")
  for case in CASES:
    for setting in SETTINGS:
      runs = [r for r in result.get("ratio_runs", []) if (r["case"], r["setting"]) == (case, setting)]
      if runs:
        ratios = " / ".join(f"{r['ratio']:.1f}x" for r in runs)
        line = (f"- {case}, {setting}, T={RATIO_SEQ_LEN}: xla fwd+bwd is faster than reference by {ratios} "
                "(one ratio per run)")
        rates = [r["xla_fwd_bwd_gflops"] for r in runs if "xla_fwd_bwd_gflops" in r]  # absent in older files
        if rates:
          line += f"; xla {' / '.join(f'{x:.1f}' for x in rates)} GFLOP/s"
          line += f" = {max(rates) / peak:.0%} of the peak at best" if peak else ""
        lines.append(line + ".")
  if peak:
    lines.append(f"- Dense float32 matmul peak measured in the same run: {peak:.1f} GFLOP/s.")
  for impl, expect in (("xla", "linear"), ("parallel", "quadratic")):
    slopes = [memory_growth([r for r in result["rows"] if (r["case"], r["setting"], r["implementation"])
                             == (case, setting, impl)]) for case in CASES for setting in SETTINGS]
    slopes = [x for x in slopes if x is not None]
    if slopes:
      lines.append(f"- {impl} fwd+bwd memory grows as T^p with p in [{min(slopes):.2f}, {max(slopes):.2f}] "
                   f"over the cases measured (expected: {expect}).")
  return lines


def to_markdown(result: dict[str, object]) -> str:
  """A table per (case, setting): rows T, columns fwd / fwd+bwd ms / memory MiB per implementation; the
  ratio runs; the memory growth exponent per implementation."""
  info = result["device"]
  lines = ["# Linear-attention benchmark\n",
           f"Device: platform `{info['platform']}`, device_kind `{info['device_kind']}`, CPU "
           f"`{info.get('cpu_model', 'unknown')}`, {info['num_devices']} device(s), {info['cpu_count']} CPU "
           f"cores, jax {info['jax']}. "
           f"Median of {result['repeats']} calls after a warm-up; memory is XLA's compiled fwd+bwd "
           f"temp+output bytes. `skip` = above the cap for that implementation on this platform "
           f"(impractical), `n/i` = not implemented for these arguments, `error` = the implementation failed "
           "(see the JSON).\n"]
  rows = result["rows"]
  lines += _summary(result)
  lines += [f"- Note: {note}" for note in result.get("notes", [])]
  if result.get("ratio_runs"):
    lines.append(f"\n## fwd+bwd ratio reference / xla at T={RATIO_SEQ_LEN} (B=1)\n")
    lines.append("Measured back to back; each ratio uses times from one run.\n")
    lines.append("| case | setting | run | reference fwd+bwd ms | xla fwd+bwd ms | ratio | xla GFLOP/s |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in result["ratio_runs"]:
      lines.append(f"| {r['case']} | {r['setting']} | {r['run']} | {r['reference_fwd_bwd_ms']:.1f} | "
                   f"{r['xla_fwd_bwd_ms']:.1f} | {r['ratio']:.2f}x | "
                   f"{r.get('xla_fwd_bwd_gflops', float('nan')):.1f} |")
  growth = []
  for case in CASES:
    for setting in SETTINGS:
      for impl in dict.fromkeys(r["implementation"] for r in rows):
        sub = [r for r in rows if r["case"] == case and r["setting"] == setting and r["implementation"] == impl]
        slope = memory_growth(sub)
        if slope is not None:
          ts = sorted(r["seq_len"] for r in sub if r["status"] == "ok")
          growth.append(f"| {case} | {setting} | {impl} | {ts[0]}-{ts[-1]} | {slope:.2f} |")
  if growth:
    lines.append("\n## Memory growth\n")
    lines.append("Exponent p of compiled fwd+bwd memory ~ T^p (least squares over the measured T; 1 = linear, "
                 "2 = quadratic).\n")
    lines += ["| case | setting | implementation | T range | p |", "|---|---|---|---|---|"] + growth
  for case in CASES:
    for setting in SETTINGS:
      sub = [r for r in rows if r["case"] == case and r["setting"] == setting]
      if not sub:
        continue
      impls = list(dict.fromkeys(r["implementation"] for r in sub))
      lines.append(f"\n## {case}, {setting} (B=1)\n")
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
  parser.add_argument("--ratio-runs", type=int, default=2,
                      help=f"back-to-back reference/xla fwd+bwd measurements at T={RATIO_SEQ_LEN} (0: none)")
  parser.add_argument("--ratio-only", action="store_true", help="skip the sweep: only the ratio runs")
  parser.add_argument("--note", action="append", default=[], help="a line for the markdown (run conditions)")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR, help="results directory")
  parser.add_argument("--render", type=pathlib.Path, default=None,
                      help="only rewrite the .md next to this results .json (no measurement; renders its "
                           "optional 'notes' list of strings too)")
  args = parser.parse_args(argv)
  if args.render is not None:
    args.render.with_suffix(".md").write_text(to_markdown(json.loads(args.render.read_text())))
    return
  repeats = args.repeats or (2 if args.quick else 5)
  if repeats <= 0:
    raise ValueError(f"--repeats: expected a positive int, got {repeats}")
  if args.ratio_runs < 0:
    raise ValueError(f"--ratio-runs: expected an int >= 0, got {args.ratio_runs}")
  seq_lens = tuple(t for t in (QUICK_SEQ_LENS if args.quick else SEQ_LENS) if t <= args.max_seq_len)
  if not seq_lens:
    raise ValueError(f"--max-seq-len: got {args.max_seq_len}; allowed: at least {min(SEQ_LENS)}")
  stem = (f"linear_attention_{device_info()['platform']}" + ("_quick" if args.quick else "")
          + ("_ratios" if args.ratio_only else ""))
  args.out.mkdir(parents=True, exist_ok=True)

  def write(result: dict[str, object]) -> None:
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(result))

  if args.ratio_only and not args.ratio_runs:
    raise ValueError("--ratio-only: needs --ratio-runs >= 1")
  result = (_result(device_info(), repeats, []) if args.ratio_only else run(seq_lens, repeats, on_row=write))
  result["notes"] = list(args.note)
  write(result)
  if args.ratio_runs:
    result["matmul_peak_gflops"] = matmul_peak(jnp.float32)
    result["ratio_runs"] = ratio_runs(args.ratio_runs, repeats)
    write(result)
  print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
  main()
