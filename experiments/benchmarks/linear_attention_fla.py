"""Benchmark: the linear-attention ops beside flash-linear-attention's Triton kernels, on identical inputs.

On a GPU, times our implementations of ``pallas_kernels.linear_attention`` and ``pallas_kernels.delta_rule``
(``xla`` and ``pallas_triton``) against the chunked kernels of flash-linear-attention (fla, PyTorch + Triton;
the ``fla-core`` wheel) for the same three cases as ``experiments/benchmarks/linear_attention.py``:

* ``linear_attention_channel`` (GLA, arXiv 2312.06635 eq. 1): ``linear_attention`` with a log decay
  ``(B, T, H, K)``, against ``fla.ops.gla.chunk_gla``;
* ``linear_attention_head`` (the RetNet / Mamba-2 form): ``linear_attention`` with a log decay ``(B, T, H)``,
  against ``fla.ops.simple_gla.chunk_simple_gla``;
* ``delta_rule`` (Gated DeltaNet, arXiv 2412.06464 eq. 10): ``delta_rule`` with a log decay ``(B, T, H)``,
  against ``fla.ops.gated_delta_rule.chunk_gated_delta_rule``.

The two libraries share every convention the comparison needs: ``(B, T, H, D)`` inputs, natural-log decays
applied before the write, the state ``(B, H, K, V)``, the query scale ``K ** -0.5`` and, for the delta rule,
``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``; so the same arrays go to both. (Checked
on a CPU against fla 0.6.0's token-by-token ``naive_recurrent_gla`` / ``naive_recurrent_gated_delta_rule``:
outputs and final states agreed with ``reference`` and ``xla`` to 2e-6 in float32.)

* Inputs: ``linear_attention.make_inputs`` (GLA-style decays, unit keys and sigmoid betas for the delta rule),
  q, k, v and beta cast to ``--dtype`` (bfloat16 by default), log decays float32; each library gets the same
  values. Default shape B = 4, H = 8 (32 heads in all), K = V = 128, T = 2K..16K.
* Time: forward, and forward+backward through a fixed random output cotangent (the gradient of every input);
  JAX: ``jax.jit``, one warm-up, median of ``--repeats`` calls (``block_until_ready``); PyTorch: two warm-ups
  (fla autotunes its kernels on the first calls), median of ``--repeats`` calls between
  ``torch.cuda.synchronize()``.
* Throughput: TFLOP/s of the chunked form's nominal count (``linear_attention.chunked_flops``: four matmuls
  per chunk, x3 with the backward; the delta rule's WY work is not counted), the same count for both
  libraries, so the speed ratio ``fla ms / ours ms`` (>= 1: ours is at least as fast) is the time ratio.
* Agreement: the relative RMS difference of each implementation's output and input gradients from fla's,
  worst over the tensors (bfloat16 results of two different chunked schemes differ at about 1e-2).

fla is imported lazily; where it is missing (a CPU, or a GPU without the wheel) its rows say so and only our
implementations are timed. On the GPU machine, with fla's wheel in ``.whl/`` (``pip download --no-deps
fla-core==0.6.0``; it needs only torch, triton and einops), see ``experiments/benchmarks/gpu_session.sh``.
Run with ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` so that JAX and PyTorch share the GPU's memory:

    python -m experiments.benchmarks.linear_attention_fla [--seq-lens 2048,16384] [--repeats 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from experiments.benchmarks.linear_attention import CASES, chunked_flops, make_inputs
from experiments.benchmarks.machine import device_info, positive_ints, time_call

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
SEQ_LENS = (2048, 4096, 8192, 16384)
SHAPE = dict(batch=4, heads=8, dim=128)
FLA_OPS = {"linear_attention_channel": "fla.ops.gla:chunk_gla",
           "linear_attention_head": "fla.ops.simple_gla:chunk_simple_gla",
           "delta_rule": "fla.ops.gated_delta_rule:chunk_gated_delta_rule"}
OURS = {"gpu": ("xla", "pallas_triton"), "cpu": ("xla",), "tpu": ("xla", "pallas_tpu")}
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
_GRAD_NAMES = ("q", "k", "v", "log_decay", "beta")  # fla's names: g for log_decay


def case_inputs(case: str, batch: int, seq: int, heads: int, dim: int, dtype) -> dict[str, np.ndarray]:
  """The case's inputs as numpy arrays: q, k, v (and beta) in ``dtype``'s values, log decays float32, plus
  ``do``, the output cotangent."""
  inputs = make_inputs(case, batch, seq, heads, dim)
  inputs = {n: x.astype(jnp.float32 if n == "log_decay" else dtype) for n, x in inputs.items()}
  inputs["do"] = jax.random.normal(jax.random.key(7), (batch, seq, heads, dim), jnp.float32).astype(dtype)
  return {n: np.asarray(x) for n, x in inputs.items()}


def ours(case: str, implementation: str, arrays: dict[str, np.ndarray]):
  """``(forward, forward_backward)`` of our op: ``forward() -> o``, ``forward_backward() -> grads`` (a dict
  keyed like the inputs)."""
  op = CASES[case][0]
  public = getattr(pallas_kernels, op)
  inputs = {n: jnp.asarray(x) for n, x in arrays.items() if n != "do"}
  do = jnp.asarray(arrays["do"])

  def forward(inputs):
    rest = dict(inputs)
    args = [rest.pop(n) for n in ("q", "k", "v")] + ([rest.pop("beta")] if op == "delta_rule" else [])
    return public(*args, **rest, implementation=implementation)

  fwd = jax.jit(forward)
  fwd_bwd = jax.jit(lambda inputs: jax.vjp(forward, inputs)[1](do)[0])
  return lambda: fwd(inputs), lambda: fwd_bwd(inputs)


def load_fla(case: str) -> Callable:
  """fla's chunked op for ``case``; raises ``ImportError`` with what to install when fla is missing."""
  module, name = FLA_OPS[case].split(":")
  try:
    return getattr(importlib.import_module(module), name)
  except ImportError as e:
    raise ImportError(f"{module}.{name} is unavailable ({e}); install the fla-core wheel (with torch and "
                      "triton) to compare against it") from e


def fla(case: str, arrays: dict[str, np.ndarray], device: str = "cuda"):
  """``(forward, forward_backward)`` of fla's op on torch copies of ``arrays`` (see :func:`ours`)."""
  op = load_fla(case)
  import torch  # pylint: disable=import-outside-toplevel  (fla's dependency: present once fla loaded)
  dtype = {np.dtype(jnp.bfloat16): torch.bfloat16, np.dtype(np.float32): torch.float32}
  tensors = {n: torch.from_numpy(np.asarray(x, np.float32)).to(device=device, dtype=dtype[x.dtype])
             for n, x in arrays.items()}
  do = tensors.pop("do")
  for x in tensors.values():
    x.requires_grad_(True)
  kwargs = {{"log_decay": "g"}.get(n, n): x for n, x in tensors.items()}
  names = list(tensors)

  def forward_backward():
    return dict(zip(names, torch.autograd.grad(op(**kwargs)[0], [tensors[n] for n in names], do)))

  def forward():
    with torch.no_grad():
      return op(**kwargs)[0]

  return forward, forward_backward


def time_torch(fn: Callable[[], object], repeats: int) -> float:
  """Median wall time (seconds) of ``repeats`` calls after two warm-ups, synchronising the GPU (if any)."""
  import torch  # pylint: disable=import-outside-toplevel
  sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
  for _ in range(2):
    fn()
  sync()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    sync()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _numpy(x) -> np.ndarray:
  if hasattr(x, "detach"):  # a torch tensor
    return x.detach().float().cpu().numpy()
  return np.asarray(x, np.float32)


def relative_rms(result, baseline) -> float:
  """Worst relative RMS difference over the output (an array) or the gradients (a dict) of two runs."""
  if not isinstance(result, dict):
    result, baseline = {"o": result}, {"o": baseline}
  worst = 0.0
  for name in result:
    a, b = _numpy(result[name]), _numpy(baseline[name])
    worst = max(worst, float(np.sqrt(np.mean((a - b) ** 2)) / max(np.sqrt(np.mean(b ** 2)), 1e-30)))
  return worst


def bench_case(case: str, seq: int, shape: dict[str, int], dtype, implementations: Sequence[str], repeats: int,
               fla_device: str = "cuda") -> list[dict[str, object]]:
  """Rows for one case and length: fla first (or its reason for not running), then ours."""
  arrays = case_inputs(case, shape["batch"], seq, shape["heads"], shape["dim"], dtype)
  flops = {"fwd": chunked_flops(seq, shape["batch"] * shape["heads"], shape["dim"], backward=False),
           "fwd_bwd": chunked_flops(seq, shape["batch"] * shape["heads"], shape["dim"], backward=True)}
  base = {"case": case, "seq_len": seq, **shape, "dtype": jnp.dtype(dtype).name}
  rows, fla_results = [], None
  try:
    fns = fla(case, arrays, fla_device)
    row = {**base, "implementation": "fla", "status": "ok"}
    for (part, fn) in zip(flops, fns):
      row[f"{part}_ms"] = 1e3 * time_torch(fn, repeats)
    fla_results = tuple(fn() for fn in fns)
  except ImportError as e:
    row = {**base, "implementation": "fla", "status": f"unavailable: {e}"}
  rows.append(row)
  for impl in implementations:
    row = {**base, "implementation": impl, "status": "ok"}
    try:
      fns = ours(case, impl, arrays)
      for (part, fn) in zip(flops, fns):
        row[f"{part}_ms"] = 1e3 * time_call(fn, repeats)
      if fla_results is not None:
        row["rel_rms_vs_fla"] = {part: relative_rms(fn(), ref) for part, fn, ref in zip(flops, fns, fla_results)}
    except NotImplementedError as e:
      row["status"] = f"unsupported: {e}"
    except Exception as e:  # pylint: disable=broad-except  (one broken kernel must not end the run)
      row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    rows.append(row)
  for row in rows:
    if row["status"] == "ok":
      row.update({f"{part}_tflops": flops[part] / row[f"{part}_ms"] / 1e9 for part in flops})
  return rows


def run(seq_lens: Sequence[int], shape: dict[str, int], dtype, repeats: int, implementations: Sequence[str],
        log: Callable[[str], None] = print, on_row: Callable[[dict], None] | None = None,
        fla_device: str = "cuda") -> dict[str, object]:
  """Every case at every length; ``on_row`` receives the partial result after each (case, length)."""
  result = {"device": device_info(), "repeats": repeats, "rows": []}
  for seq in seq_lens:
    for case in FLA_OPS:
      for row in bench_case(case, seq, shape, dtype, implementations, repeats, fla_device):
        result["rows"].append(row)
        log(_row_line(row))
      if on_row is not None:
        on_row(result)
  return result


def _row_line(row: dict[str, object]) -> str:
  head = f"{row['case']:24s} T={row['seq_len']:6d} {row['implementation']:14s}"
  if row["status"] != "ok":
    return f"{head} {row['status']}"
  return (f"{head} fwd {row['fwd_ms']:8.2f} ms ({row['fwd_tflops']:6.1f} TFLOP/s)  fwd+bwd "
          f"{row['fwd_bwd_ms']:8.2f} ms ({row['fwd_bwd_tflops']:6.1f} TFLOP/s)")


def to_markdown(result: dict[str, object]) -> str:
  """One table per case: per T and implementation, times, TFLOP/s, speed against fla and the agreement."""
  info = result["device"]
  rows = result["rows"]
  lines = ["# Linear attention beside flash-linear-attention\n",
           f"Device: platform `{info['platform']}`, device_kind `{info['device_kind']}`, jax {info['jax']}"
           + (f", {result['fla_version']}" if result.get("fla_version") else "") + ". "
           f"Median of {result['repeats']} calls after warm-up. Speed = fla ms / ours ms (>= 1: ours at least "
           "as fast). Agreement: worst relative RMS difference from fla's output (fwd) and input gradients "
           "(fwd+bwd). TFLOP/s: the chunked form's nominal count, the same for both libraries.\n"]
  lines += [f"- Note: {note}" for note in result.get("notes", [])]
  for case in FLA_OPS:
    sub = [r for r in rows if r["case"] == case]
    if not sub:
      continue
    r0 = sub[0]
    lines += [f"\n## {case} ({FLA_OPS[case].replace(':', '.')}), B={r0['batch']}, H={r0['heads']}, "
              f"K=V={r0['dim']}, {r0['dtype']}\n",
              "| T | implementation | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | speed fwd | "
              "speed fwd+bwd | agreement fwd | agreement fwd+bwd |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sub:
      if r["status"] != "ok":
        lines.append(f"| {r['seq_len']} | {r['implementation']} | {r['status']} |" + " |" * 7)
        continue
      ref = next((x for x in sub if x["seq_len"] == r["seq_len"] and x["implementation"] == "fla"
                  and x["status"] == "ok"), None)
      speed = [f"{ref[f'{p}_ms'] / r[f'{p}_ms']:.2f}x" if ref else "n/a" for p in ("fwd", "fwd_bwd")]
      agree = [f"{r['rel_rms_vs_fla'][p]:.1e}" if "rel_rms_vs_fla" in r else "-" for p in ("fwd", "fwd_bwd")]
      lines.append(f"| {r['seq_len']} | {r['implementation']} | {r['fwd_ms']:.2f} | {r['fwd_tflops']:.1f} | "
                   f"{r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_tflops']:.1f} | {' | '.join(speed)} | "
                   f"{' | '.join(agree)} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq-lens", type=positive_ints, default=SEQ_LENS, help=f"T values (default {SEQ_LENS})")
  parser.add_argument("--shape", type=positive_ints, default=tuple(SHAPE.values()),
                      help="B,H,D (default 4,8,128: 32 heads, K = V = 128)")
  parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
  parser.add_argument("--repeats", type=lambda text: positive_ints(text)[0], default=10)
  parser.add_argument("--implementations", type=lambda text: tuple(text.split(",")), default=None,
                      help="ours, comma-separated (default: " + "; ".join(f"{k}: {','.join(v)}"
                                                                          for k, v in OURS.items()) + ")")
  parser.add_argument("--note", action="append", default=[], help="a line for the markdown (run conditions)")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR, help="results directory")
  args = parser.parse_args(argv)
  if len(args.shape) != 3:
    parser.error(f"--shape: expected B,H,D, got {args.shape}")
  info = device_info()
  implementations = args.implementations or OURS.get(str(info["platform"]), ("xla",))
  shape = dict(zip(SHAPE, args.shape))
  stem = f"linear_attention_fla_{info['platform']}"
  args.out.mkdir(parents=True, exist_ok=True)

  def write(result: dict[str, object]) -> None:
    result = {**result, "notes": list(args.note), "fla_version": _fla_version()}
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(result))

  write(run(args.seq_lens, shape, DTYPES[args.dtype], args.repeats, implementations, on_row=write))
  print(f"wrote {args.out / stem}.json and .md")


def _fla_version() -> str | None:
  try:
    from importlib.metadata import version  # pylint: disable=import-outside-toplevel
    return f"fla-core {version('fla-core')}"
  except Exception:  # pylint: disable=broad-except  (not installed)
    return None


if __name__ == "__main__":
  main()
