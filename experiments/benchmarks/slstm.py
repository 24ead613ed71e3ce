"""Benchmark: forward and forward+backward time, compile time and compiled memory of ``pallas_kernels.slstm``:
the ``reference`` scan (JAX's derivative of a ``lax.scan``) against the ``xla`` custom-VJP scan at several
loop unroll factors (``pallas_kernels.slstm.xla.UNROLL``, set here per case; the library default is marked).

* Shapes: ``table`` (B=64, H=4, D=16: the state-tracking table's models) and ``lm`` (B=8, H=4, D=64: the
  xLSTM paper's 4 heads at d_model 256), each at two lengths.
* Time: other processes may share the machine, so every implementation is timed once per round, in turn, for
  ``--rounds`` rounds; the table shows the median over rounds and each ``xla`` / ``reference`` ratio is the
  median of the per-round ratios (times from the same round). Compile time is the wall time of
  ``jit(...).lower(...).compile()`` of the fwd+bwd program.
* Memory: XLA's compiled ``memory_analysis()`` of the fwd+bwd program, temp + output bytes.

Run (writes ``experiments/benchmarks/results/slstm_<platform>[_quick].{json,md}``):

    python -m experiments.benchmarks.slstm [--quick] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp

import pallas_kernels
from experiments.benchmarks.machine import device_info
from pallas_kernels.slstm import xla as slstm_xla

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
SETTINGS = {"table": dict(batch=64, heads=4, dim=16, seq_lens=(64, 256)),
            "lm": dict(batch=8, heads=4, dim=64, seq_lens=(256, 1024))}
QUICK = {"table": dict(batch=8, heads=2, dim=8, seq_lens=(32,))}
UNROLLS = (1, 2, 4, 8)


def make_inputs(batch: int, seq: int, heads: int, dim: int):
  keys = jax.random.split(jax.random.key(0), 5)
  gates = tuple(jax.random.normal(k, (batch, seq, heads, dim)) for k in keys[:4])
  return gates, 0.3 * jax.random.normal(keys[4], (heads, dim, 4, dim))


def _programs(implementation: str, unroll: int, gates, kernel):
  """Compiled forward and fwd+bwd programs (``UNROLL`` is read while tracing) and the compile seconds."""
  slstm_xla.UNROLL = unroll

  def loss(gates, kernel):
    h = pallas_kernels.slstm(*gates, kernel, implementation=implementation)
    return jnp.sum(h * jnp.cos(jnp.arange(h.shape[-1], dtype=h.dtype)))

  forward = jax.jit(loss).lower(gates, kernel).compile()
  start = time.perf_counter()
  both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(gates, kernel).compile()
  compile_s = time.perf_counter() - start
  stats = both.memory_analysis()
  memory = None if stats is None else int(stats.temp_size_in_bytes + stats.output_size_in_bytes)
  return forward, both, compile_s, memory


def _timed(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def bench_setting(name: str, dims: dict, seq: int, rounds: int, log=print) -> list[dict]:
  gates, kernel = make_inputs(dims["batch"], seq, dims["heads"], dims["dim"])
  default_unroll = slstm_xla.UNROLL
  variants = [("reference", 1)] + [("xla", u) for u in UNROLLS]
  programs = {v: _programs(*v, gates, kernel) for v in variants}
  slstm_xla.UNROLL = default_unroll
  times = {v: {"fwd": [], "fwd_bwd": []} for v in variants}
  for v, (forward, both, _, _) in programs.items():  # warm-up
    jax.block_until_ready((forward(gates, kernel), both(gates, kernel)))
  for _ in range(rounds):
    for v, (forward, both, _, _) in programs.items():
      times[v]["fwd"].append(_timed(lambda: forward(gates, kernel)))
      times[v]["fwd_bwd"].append(_timed(lambda: both(gates, kernel)))
  rows = []
  ref = times[("reference", 1)]
  for (impl, unroll), t in times.items():
    row = {"setting": name, **{k: dims[k] for k in ("batch", "heads", "dim")}, "seq_len": seq,
           "implementation": impl, "unroll": unroll if impl == "xla" else None,
           "default": impl == "xla" and unroll == default_unroll,
           "fwd_ms": 1e3 * statistics.median(t["fwd"]), "fwd_bwd_ms": 1e3 * statistics.median(t["fwd_bwd"]),
           "speedup_fwd": statistics.median(r / x for r, x in zip(ref["fwd"], t["fwd"])),
           "speedup_fwd_bwd": statistics.median(r / x for r, x in zip(ref["fwd_bwd"], t["fwd_bwd"])),
           "compile_s": programs[(impl, unroll)][2], "memory_bytes": programs[(impl, unroll)][3]}
    rows.append(row)
    log(f"{name:6s} T={seq:5d} {impl:9s} unroll={str(row['unroll']):4s} fwd {row['fwd_ms']:8.2f} ms  fwd+bwd "
        f"{row['fwd_bwd_ms']:8.2f} ms  x{row['speedup_fwd_bwd']:.2f} vs reference  compile {row['compile_s']:.1f} s")
  return rows


def to_markdown(result: dict) -> str:
  info = result["device"]
  lines = ["# sLSTM recurrence benchmark\n",
           f"Device: platform `{info['platform']}`, device_kind `{info['device_kind']}`, CPU "
           f"`{info.get('cpu_model', 'unknown')}`, {info['cpu_count']} CPU cores, jax {info['jax']}. "
           f"{result['rounds']} interleaved rounds; times are medians over rounds, speed-ups the median of "
           "per-round ratios against `reference` (fwd+bwd); memory is XLA's compiled fwd+bwd temp+output bytes; "
           "`*` marks the library default unroll.\n"]
  lines += [f"- Note: {note}" for note in result.get("notes", [])]
  lines += ["", "| setting | B, H, D | T | implementation | fwd ms | fwd+bwd ms | fwd speed-up | fwd+bwd speed-up "
            "| compile s | memory MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    name = r["implementation"] + (f" unroll {r['unroll']}{'*' if r['default'] else ''}" if r["unroll"] else "")
    memory = "n/a" if r["memory_bytes"] is None else f"{r['memory_bytes'] / 2**20:.1f}"
    lines.append(f"| {r['setting']} | {r['batch']}, {r['heads']}, {r['dim']} | {r['seq_len']} | {name} | "
                 f"{r['fwd_ms']:.2f} | {r['fwd_bwd_ms']:.2f} | {r['speedup_fwd']:.2f}x | {r['speedup_fwd_bwd']:.2f}x | "
                 f"{r['compile_s']:.1f} | {memory} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="one tiny shape (a smoke test)")
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--note", action="append", default=[], help="a line for the results' notes")
  args = parser.parse_args(argv)
  info = device_info()
  rows = []
  for name, dims in (QUICK if args.quick else SETTINGS).items():
    for seq in dims["seq_lens"]:
      rows += bench_setting(name, dims, seq, args.rounds)
  result = {"device": info, "rounds": args.rounds, "rows": rows, "notes": args.note}
  stem = f"slstm_{info['platform']}{'_quick' if args.quick else ''}"
  RESULTS_DIR.mkdir(parents=True, exist_ok=True)
  (RESULTS_DIR / f"{stem}.json").write_text(json.dumps(result, indent=1))
  (RESULTS_DIR / f"{stem}.md").write_text(to_markdown(result))
  print(to_markdown(result))


if __name__ == "__main__":
  main()
