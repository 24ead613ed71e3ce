"""Numerics study: what storing the chunk-boundary states of the chunked linear-attention ops in bfloat16 costs
in accuracy (the Pallas kernels' ``Config(states_dtype="bfloat16")``; docs/linear_attention_kernels.md, "Dtype
policy").

The chunked ops keep the state entering every chunk, ``(N, B, H, V, K)`` float32, from their forward for the
outputs and the backward (docs/linear_attention_kernels.md). Here the ``xla`` backend runs as shipped, and again
keeping those states in bfloat16 (``xla.backend(states_dtype="bfloat16")``: the outputs and the backward read
the rounded states; the state recurrence itself and the returned final state stay float32, as a kernel
accumulating in float32 would keep them). Both are compared with
``reference`` (the token-by-token float32 scan) on the same bfloat16 inputs, for the output, the final state and
the gradient of every input, as relative RMS errors (flash-linear-attention's test metric;
``pallas_kernels.selftest.relative_error``). The library's bfloat16 test tolerances are 5e-3 (values) and 2e-2
(gate gradients).

Run (writes ``experiments/benchmarks/results/linear_attention_state_dtype.{json,md}``):

    python -m experiments.benchmarks.linear_attention_state_dtype [--quick]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from experiments.benchmarks.machine import device_info
from pallas_kernels.linear_attention import _chunked
from pallas_kernels.linear_attention import xla as linear_xla
from pallas_kernels.selftest import relative_error

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
TOLERANCES = {"values": 5e-3, "gates": 2e-2}
CASES = ("gla_channel", "gla_head", "delta_rule")


BF16_STATES = linear_xla.backend(states_dtype="bfloat16")


def make_inputs(case: str, seq: int, heads: int, dim: int, seed: int = 0) -> dict:
  """bfloat16 q, k, v, log decays (GLA-like gates) and, for the delta rule, unit keys and beta in (0, 1)."""
  ks = jax.random.split(jax.random.key(seed), 5)
  shape = (1, seq, heads, dim)
  q, k, v = (jax.random.normal(key, shape) for key in ks[:3])
  if case == "delta_rule":
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  decay_shape = shape if case == "gla_channel" else shape[:3]
  args = {"q": q, "k": k, "v": v, "log_decay": jax.nn.log_sigmoid(jax.random.normal(ks[3], decay_shape)) / 16}
  if case == "delta_rule":
    args["beta"] = jax.nn.sigmoid(jax.random.normal(ks[4], shape[:3]))
  return {name: x.astype(jnp.bfloat16) for name, x in args.items()}


CHUNK = 64


def _call(implementation, args):
  """``(o, final_state)`` of the case's op at chunk :data:`CHUNK`; ``implementation`` a dispatch name or a
  ``_chunked.Backend``."""
  args = dict(args)
  if isinstance(implementation, str):
    op = pallas_kernels.delta_rule if "beta" in args else pallas_kernels.linear_attention
    positional = [args.pop(n) for n in ("q", "k", "v", "beta") if n in args]
    return op(*positional, **args, return_final_state=True, implementation=implementation, chunk_size=CHUNK)
  log_decay = args.pop("log_decay")
  canonical = dict(scale=args["q"].shape[-1] ** -0.5, initial_state=None, segment_ids=None, chunk_size=CHUNK,
                   return_final_state=True)
  if "beta" in args:
    return _chunked.delta_rule(implementation, args["q"], args["k"], args["v"], args["beta"], log_decay,
                               **canonical)
  return _chunked.linear_attention(implementation, args["q"], args["k"], args["v"], log_decay, **canonical)


def outputs_and_grads(implementation, args) -> dict[str, np.ndarray]:
  """``o``, ``final_state`` and ``d<input>`` for fixed random cotangents, as float32 numpy arrays."""
  names = list(args)
  o_shape = args["q"].shape[:3] + args["v"].shape[-1:]
  d_o = jax.random.normal(jax.random.key(7), o_shape)
  d_final = jax.random.normal(jax.random.key(8), (o_shape[0], o_shape[2], args["q"].shape[-1], o_shape[-1]))

  def loss(*xs):
    o, final = _call(implementation, dict(zip(names, xs)))
    return jnp.sum(o.astype(jnp.float32) * d_o) + jnp.sum(final * d_final), (o, final)

  (_, (o, final)), grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(names))), has_aux=True))(
      *args.values())
  out = {"o": o, "final_state": final, **{f"d{n}": g for n, g in zip(names, grads)}}
  return {name: np.asarray(x, np.float32) for name, x in out.items()}


def measure(seq: int, heads: int, dim: int, cases: tuple[str, ...] = CASES) -> list[dict]:
  """One row per (case, stored-state dtype): ``{"case", "states", "errors": {name: relative RMS}}``."""
  rows = []
  for case in cases:
    args = make_inputs(case, seq, heads, dim)
    want = outputs_and_grads("reference", args)
    for label, implementation in (("float32 states", "xla"), ("bfloat16 states", BF16_STATES)):
      got = outputs_and_grads(implementation, args)
      rows.append({"case": case, "states": label, "errors": {n: relative_error(got[n], want[n]) for n in want}})
  return rows


def _device(info: dict) -> str:
  return (f"platform `{info['platform']}`, CPU {info['cpu_model']}, {info['cpu_count']} cores, "
          f"jax {info['jax']}")


def render(result: dict) -> str:
  names = sorted({n for row in result["rows"] for n in row["errors"]}, key=lambda n: (n != "o", n))
  lines = ["# Linear attention: bfloat16 stored chunk states", "",
           f"Device: {_device(result['device'])}. Shapes: B=1, T={result['seq']}, H={result['heads']}, "
           f"K=V={result['dim']}, chunk {CHUNK}, bfloat16 inputs. Relative RMS error against `reference` "
           f"(float32 token-by-token scan on the same inputs); tolerances of the bfloat16 tests: "
           f"{TOLERANCES['values']:g} (values), {TOLERANCES['gates']:g} (gate gradients).", "",
           "| case | stored states | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
  for row in result["rows"]:
    cells = [f"{row['errors'][n]:.1e}" if n in row["errors"] else "–" for n in names]
    lines.append(f"| {row['case']} | {row['states']} | " + " | ".join(cells) + " |")
  return "\n".join(lines + [""])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="T=128, H=2, K=V=16")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR, help="results directory")
  args = parser.parse_args()
  seq, heads, dim = (128, 2, 16) if args.quick else (2048, 4, 64)
  result = {"device": device_info(), "seq": seq, "heads": heads, "dim": dim, "rows": measure(seq, heads, dim)}
  args.out.mkdir(parents=True, exist_ok=True)
  stem = args.out / ("linear_attention_state_dtype" + ("_quick" if args.quick else ""))
  stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
  stem.with_suffix(".md").write_text(render(result))
  print(render(result))


if __name__ == "__main__":
  main()
