"""Benchmark: the decoding steps of linear attention against the memory roofline.

A decoding step (``pallas_kernels.linear_attention_step``, ``pallas_kernels.delta_rule_step``) reads the float32
state ``(B, H, K, V)`` and writes the next one: at least ``2 * 4 B H K V`` bytes per token, with ``O(K V)`` work
per head. Whether a fused kernel can pay (issue #8's "a fused Pallas step where it pays") depends on how far the
``xla`` step is from that least traffic: a step that reads the state twice or writes it in two passes runs at a
fraction of the memory bandwidth.

For the three cases of ``experiments/benchmarks/linear_attention.py`` (per-head decay, per-key-channel decay,
the gated delta rule) at H = 8, K = V = 128 and several batch sizes, this times a decoding loop of
``--tokens`` steps (one ``lax.scan`` under ``jax.jit``, the state in its carry, as a generation loop holds it;
one warm-up, median of ``--repeats``) per implementation, and reports the time per token, the bandwidth it
implies for the least traffic, and that bandwidth as a share of a measured copy bandwidth (``x + 1`` in place
over a 256 MiB float32 array: read once, written once) on the same device.

Run (writes ``experiments/benchmarks/results/linear_attention_step_<platform>.{json,md}``):

    python -m experiments.benchmarks.linear_attention_step [--batches 1,8,64] [--tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

import pallas_kernels
from experiments.benchmarks.linear_attention import CASES
from experiments.benchmarks.machine import device_info, positive_ints, time_call

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
HEADS, DIM = 8, 128
IMPLEMENTATIONS = ("reference", "xla")


def copy_bandwidth(repeats: int, mib: int = 256) -> float:
  """Measured GB/s of ``x + 1`` over ``mib`` MiB of float32 in place (the buffer donated, as a decoding loop's
  state stays in place: a fresh output would measure the allocator's page faults), bytes read plus written."""
  add = jax.jit(lambda x: x + 1, donate_argnums=0)
  buffer = [jnp.zeros((mib * 2**18,), jnp.float32)]

  def call():
    buffer[0] = add(buffer[0])
    return buffer[0]

  return 2 * mib * 2**20 / time_call(call, repeats) / 1e9


def decode_loop(case: str, implementation: str, batch: int, tokens: int) -> tuple[Callable, tuple]:
  """``(compiled loop, arguments)``: ``tokens`` decoding steps of ``case`` from a random state; the loop returns
  the last state and the outputs' sum (so no step is dead code)."""
  op, decay = CASES[case]
  keys = jax.random.split(jax.random.key(0), 6)
  shape = (tokens, batch, HEADS, DIM)
  q, k, v = (jax.random.normal(key, shape, jnp.float32) for key in keys[:3])
  g = jax.nn.log_sigmoid(jax.random.normal(keys[3], shape if decay == "channel" else shape[:3]))
  beta = jax.nn.sigmoid(jax.random.normal(keys[4], shape[:3]))
  state = jax.random.normal(keys[5], (batch, HEADS, DIM, DIM), jnp.float32)
  if op == "delta_rule":
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)

  def step(state, xs):
    q, k, v, g, beta = xs
    if op == "delta_rule":
      o, state = pallas_kernels.delta_rule_step(q, k, v, beta, state, log_decay=g, implementation=implementation)
    else:
      o, state = pallas_kernels.linear_attention_step(q, k, v, state, log_decay=g, implementation=implementation)
    return state, jnp.sum(o)

  def loop(state, xs):
    state, sums = jax.lax.scan(step, state, xs)
    return state, jnp.sum(sums)

  args = (state, (q, k, v, g, beta))
  return jax.jit(loop).lower(*args).compile(), args


def run(batches: Sequence[int], tokens: int, repeats: int, log: Callable[[str], None] = print,
        on_row: Callable[[dict], None] | None = None) -> dict[str, object]:
  result = {"device": device_info(), "tokens": tokens, "repeats": repeats, "heads": HEADS, "dim": DIM,
            "copy_gbps": copy_bandwidth(repeats), "rows": []}
  log(f"copy bandwidth {result['copy_gbps']:.1f} GB/s")
  for batch in batches:
    least_bytes = 2 * 4 * batch * HEADS * DIM * DIM
    for case in CASES:
      for implementation in IMPLEMENTATIONS:
        loop, args = decode_loop(case, implementation, batch, tokens)
        us = 1e6 * time_call(lambda: loop(*args), repeats) / tokens
        row = {"case": case, "batch": batch, "implementation": implementation, "us_per_token": us,
               "least_mib_per_token": least_bytes / 2**20, "gbps": least_bytes / us / 1e3}
        row["roofline_share"] = row["gbps"] / result["copy_gbps"]
        result["rows"].append(row)
        log(f"{case:24s} B={batch:4d} {implementation:9s} {us:10.1f} us/token  {row['gbps']:7.1f} GB/s "
            f"({row['roofline_share']:.0%} of copy)")
        if on_row is not None:
          on_row(result)
  return result


def to_markdown(result: dict[str, object]) -> str:
  info = result["device"]
  lines = ["# Linear-attention decoding steps against the memory roofline\n",
           f"Device: platform `{info['platform']}`, device_kind `{info['device_kind']}`, CPU "
           f"`{info.get('cpu_model', 'unknown')}`, {info['cpu_count']} CPU cores, jax {info['jax']}. "
           f"H={result['heads']}, K=V={result['dim']}, float32 state; a jitted scan of {result['tokens']} steps, "
           f"median of {result['repeats']} after a warm-up. GB/s: the least traffic (the state read and written "
           f"once) per token over the time per token; copy bandwidth measured in the same run: "
           f"{result['copy_gbps']:.1f} GB/s.\n"]
  lines += [f"- Note: {note}" for note in result.get("notes", [])]
  lines += ["", "| case | B | implementation | us per token | least MiB per token | GB/s | share of copy |",
            "|---|---|---|---|---|---|---|"]
  lines += [f"| {r['case']} | {r['batch']} | {r['implementation']} | {r['us_per_token']:.1f} | "
            f"{r['least_mib_per_token']:.1f} | {r['gbps']:.1f} | {r['roofline_share']:.0%} |" for r in result["rows"]]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=positive_ints, default=(1, 8, 64), help="batch sizes (default 1,8,64)")
  parser.add_argument("--tokens", type=lambda text: positive_ints(text)[0], default=64)
  parser.add_argument("--repeats", type=lambda text: positive_ints(text)[0], default=5)
  parser.add_argument("--note", action="append", default=[], help="a line for the markdown (run conditions)")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR, help="results directory")
  args = parser.parse_args(argv)
  stem = f"linear_attention_step_{device_info()['platform']}"
  args.out.mkdir(parents=True, exist_ok=True)

  def write(result: dict[str, object]) -> None:
    result = {**result, "notes": list(args.note)}
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(result))

  write(run(args.batches, args.tokens, args.repeats, on_row=write))
  print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
  main()
