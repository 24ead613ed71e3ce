"""Benchmark: forward and forward+backward time and compiled memory of every ``spiking_scan`` implementation.

Times ``pallas_kernels.spiking_scan`` for B·N neurons from 1K to 1M and T from 16 to 1024 (B = 8, N = M / 8),
in two cases: LIF with a subtract reset (atan surrogate, detached reset; the general sequential recurrence)
and the reset-free leaky integrator (``reset="none"``, a linear recurrence). Implementations: every registered
one that runs on this device (``reference``: ``lax.scan`` differentiated by autodiff; ``xla``: scan with the
hand-written backward-through-time scan; ``pallas_tpu`` / ``pallas_triton`` only on a TPU / GPU) plus, for the
reset-free case, ``xla`` forced onto its associative-scan form (``xla[assoc]``, the accelerator path) so its
cost on this device is on record.

* Time: ``jax.jit`` of the forward (a weighted sum of the spikes) and of its ``jax.value_and_grad`` w.r.t.
  the currents, β and θ; one warm-up call, then the fastest of at least ``--repeats`` calls (more, up to 50,
  while they take under half a second in all): the least disturbed by other processes on a shared machine.
* Memory: XLA's compiled ``memory_analysis()`` of the forward+backward program (temp + output bytes).
* Cap: on a CPU, grid points with more than ``MAX_ELEMENTS`` = 2^26 neuron-steps are skipped (each float32
  ``(B, T, N)`` array is then 256 MiB and a backward holds several), and listed as skipped.

Run (writes ``experiments/benchmarks/results/spiking_<platform>[_quick].{json,md}``):

    python -m experiments.benchmarks.spiking [--quick] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import pathlib
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

import pallas_kernels
from experiments.benchmarks.machine import device_info
from pallas_kernels.spiking_scan import spiking_scan_op

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
NEURONS = (1024, 16384, 262144, 1048576)
SEQ_LENS = (16, 64, 256, 1024)
QUICK_NEURONS, QUICK_SEQ_LENS = (1024, 16384), (16, 64)
BATCH = 8
MAX_ELEMENTS = {"cpu": 2 ** 26}
CASES = {"lif_subtract": dict(reset="subtract", surrogate="atan"), "no_reset": dict(reset="none", surrogate="atan")}
_PALLAS_PLATFORM = {"pallas_tpu": "tpu", "pallas_triton": "gpu"}


@contextlib.contextmanager
def _associative_everywhere() -> Iterator[None]:
  xla = importlib.import_module("pallas_kernels.spiking_scan.xla")
  saved = xla.ASSOCIATIVE_BACKENDS
  xla.ASSOCIATIVE_BACKENDS = ("cpu", "gpu", "tpu")
  try:
    yield
  finally:
    xla.ASSOCIATIVE_BACKENDS = saved


def make_inputs(neurons: int, seq: int) -> dict[str, jax.Array]:
  """Currents around threshold (spike rate ~0.3), per-neuron β in [0.8, 0.99], θ = 1."""
  k1, k2 = jax.random.split(jax.random.key(0))
  n = neurons // BATCH
  return {"current": 0.5 * jax.random.normal(k1, (BATCH, seq, n)) + 0.25,
          "beta": jax.random.uniform(k2, (n,), minval=0.8, maxval=0.99), "threshold": jnp.ones((n,))}


def loss_fn(case: str, implementation: str) -> Callable[[dict[str, jax.Array]], jax.Array]:
  def loss(inputs):
    spikes = pallas_kernels.spiking_scan(inputs["current"], beta=inputs["beta"], threshold=inputs["threshold"],
                                         implementation=implementation, **CASES[case])
    return jnp.sum(spikes * jnp.cos(jnp.arange(spikes.shape[-1], dtype=spikes.dtype)))
  return loss


def fastest_call(fn: Callable[[], object], repeats: int, budget_s: float = 0.5, most: int = 50) -> float:
  """Seconds of the fastest call after one warm-up call: at least ``repeats`` calls, more (up to ``most``)
  while they have taken less than ``budget_s`` in all, so that short calls get many tries."""
  jax.block_until_ready(fn())
  best, spent, calls = float("inf"), 0.0, 0
  while calls < repeats or (spent < budget_s and calls < most):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    elapsed = time.perf_counter() - start
    best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
  return best


def bench_one(case: str, implementation: str, inputs: dict[str, jax.Array], repeats: int) -> dict[str, object]:
  """Times forward and forward+backward (and reads the compiled memory) of one implementation."""
  impl, assoc = (implementation.removesuffix("[assoc]"), implementation.endswith("[assoc]"))
  with _associative_everywhere() if assoc else contextlib.nullcontext():
    fwd = jax.jit(loss_fn(case, impl)).lower(inputs).compile()
    both = jax.jit(jax.value_and_grad(loss_fn(case, impl))).lower(inputs).compile()
  stats = both.memory_analysis()
  memory = None if stats is None else int(stats.temp_size_in_bytes + stats.output_size_in_bytes)
  return {"fwd_ms": 1e3 * fastest_call(lambda: fwd(inputs), repeats),
          "fwd_bwd_ms": 1e3 * fastest_call(lambda: both(inputs), repeats), "memory_bytes": memory}


def implementations_here(case: str, backend: str) -> list[str]:
  names = [n for n in spiking_scan_op.implementations if _PALLAS_PLATFORM.get(n, backend) == backend]
  return names + (["xla[assoc]"] if case == "no_reset" and backend == "cpu" else [])


def run(neurons: tuple[int, ...], seq_lens: tuple[int, ...], repeats: int, log: Callable[[str], None] = print,
        on_row: Callable[[dict[str, object]], None] | None = None) -> dict[str, object]:
  """The whole grid, smallest first; ``on_row`` gets the partial result after every row."""
  info = device_info()
  backend = str(info["platform"])
  cap = MAX_ELEMENTS.get(backend)
  rows = []
  for count in neurons:
    for seq in seq_lens:
      inputs = None if cap is not None and count * seq > cap else make_inputs(count, seq)
      for case in CASES:
        for impl in implementations_here(case, backend):
          row = {"case": case, "neurons": count, "batch": BATCH, "seq_len": seq, "implementation": impl}
          if inputs is None:
            row["status"] = f"skipped: B*N*T > 2^{cap.bit_length() - 1} on {backend}"
          else:
            try:
              row.update(bench_one(case, impl, inputs, repeats), status="ok")
            except Exception as e:  # pylint: disable=broad-except  (one broken combo must not end the sweep)
              row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
          rows.append(row)
          log(_row_line(row))
          if on_row is not None:
            on_row({"device": info, "repeats": repeats, "rows": list(rows)})
  return {"device": info, "repeats": repeats, "rows": rows}


def _row_line(row: dict[str, object]) -> str:
  head = f"{row['case']:13s} M={row['neurons']:8d} T={row['seq_len']:5d} {row['implementation']:12s}"
  if row["status"] != "ok":
    return f"{head} {row['status']}"
  memory = "n/a" if row["memory_bytes"] is None else f"{row['memory_bytes'] / 2 ** 20:9.1f} MiB"
  return f"{head} fwd {row['fwd_ms']:10.2f} ms  fwd+bwd {row['fwd_bwd_ms']:10.2f} ms  mem {memory}"


SUMMARY_ELEMENTS = 2 ** 22  # the summary uses points with at least this many neuron-steps (timing noise aside)


def _ratios(rows, numerator: str, denominator: str, case: str) -> list[float]:
  """fwd+bwd time ratios ``numerator / denominator`` at the large grid points of ``case``, from one run."""
  by_point: dict[tuple, dict[str, float]] = {}
  for r in rows:
    if r["case"] == case and r["status"] == "ok" and r["neurons"] * r["seq_len"] >= SUMMARY_ELEMENTS:
      by_point.setdefault((r["neurons"], r["seq_len"]), {})[r["implementation"]] = r["fwd_bwd_ms"]
  return [t[numerator] / t[denominator] for t in by_point.values() if numerator in t and denominator in t]


def summary(rows) -> list[str]:
  """Headline lines: reference / xla and xla[assoc] / xla fwd+bwd ratios at the large grid points."""
  lines = [f"\n## Summary (fwd+bwd, grid points with >= 2^{SUMMARY_ELEMENTS.bit_length() - 1} neuron-steps)\n"]
  for case in CASES:
    for numerator in ("reference", "xla[assoc]"):
      ratios = _ratios(rows, numerator, "xla", case)
      if ratios:
        lines.append(f"- {case}: {numerator} / xla = {min(ratios):.2f}x to {max(ratios):.2f}x over "
                     f"{len(ratios)} points.")
  return lines


def to_markdown(result: dict[str, object], notes: list[str] = ()) -> str:
  """One table per case: rows (M, T), columns fwd+bwd ms and MiB per implementation, and the reference/xla
  fwd+bwd ratio measured in the same run."""
  info = result["device"]
  lines = ["# spiking_scan benchmark\n",
           f"Device: platform `{info['platform']}`, device_kind `{info['device_kind']}`, CPU "
           f"`{info.get('cpu_model', 'unknown')}`, {info['cpu_count']} CPU cores, jax {info['jax']}. Fastest of "
           f"at least {result['repeats']} calls (up to 50 within 0.5 s) after a warm-up; B = {BATCH}, N = M / B; "
           "memory is XLA's compiled fwd+bwd temp+output bytes.\n"]
  lines += [f"- {note}" for note in notes]
  rows = result["rows"]
  lines += summary(rows)
  for case in CASES:
    sub = [r for r in rows if r["case"] == case]
    impls = list(dict.fromkeys(r["implementation"] for r in sub))
    lines += [f"\n## {case} ({CASES[case]})\n",
              "| M = B·N | T | " + " | ".join(f"{i} fwd ms | {i} fwd+bwd ms | {i} MiB" for i in impls)
              + " | reference / xla fwd+bwd |", "|---|---|" + "---|" * (3 * len(impls) + 1)]
    for count, seq in dict.fromkeys((r["neurons"], r["seq_len"]) for r in sub):
      cells, by_impl = [], {}
      for impl in impls:
        r = next((r for r in sub if (r["neurons"], r["seq_len"], r["implementation"]) == (count, seq, impl)),
                 {"status": "not run"})
        by_impl[impl] = r
        if r["status"] == "ok":
          mem = "n/a" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2 ** 20:.1f}"
          cells += [f"{r['fwd_ms']:.2f}", f"{r['fwd_bwd_ms']:.2f}", mem]
        else:
          cells += [r["status"].split(":")[0].replace("skipped", "skip")] * 3
      ref, xla = by_impl.get("reference", {}), by_impl.get("xla", {})
      ratio = (f"{ref['fwd_bwd_ms'] / xla['fwd_bwd_ms']:.2f}x" if ref.get("status") == xla.get("status") == "ok"
               else "–")
      lines.append(f"| {count} | {seq} | " + " | ".join(cells) + f" | {ratio} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help=f"M in {QUICK_NEURONS}, T in {QUICK_SEQ_LENS}")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per combination")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR, help="results directory")
  parser.add_argument("--note", action="append", default=[], help="a line for the markdown (run conditions)")
  args = parser.parse_args(argv)
  platform = device_info()["platform"]
  stem = args.out / f"spiking_{platform}{'_quick' if args.quick else ''}"
  args.out.mkdir(parents=True, exist_ok=True)

  def write(result):
    stem.with_suffix(".json").write_text(json.dumps({**result, "notes": args.note}, indent=1))
    stem.with_suffix(".md").write_text(to_markdown(result, args.note))

  neurons, seq_lens = (QUICK_NEURONS, QUICK_SEQ_LENS) if args.quick else (NEURONS, SEQ_LENS)
  write(run(neurons, seq_lens, args.repeats, on_row=write))
  print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
  main()
