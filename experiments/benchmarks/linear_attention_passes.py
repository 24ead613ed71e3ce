"""Benchmark: the time of each pass of the Pallas linear-attention kernels, to see where an op's time goes.

``pallas_kernels.linear_attention`` and ``pallas_kernels.delta_rule`` run as chunked passes
(``pallas_kernels/linear_attention/_chunked.py``): gated linear attention as ``states`` and ``output`` forward,
``state_grads`` and ``grads`` backward (which recomputes ``states``); the delta rule as ``prepare``, ``states``
and ``output`` forward, ``state_grads`` and ``grads`` backward (which recomputes ``prepare`` and ``states``).
This times each pass alone (``jax.jit``, one warm-up, median of ``--repeats`` calls) on the inputs the op gives
it, for the cases of ``experiments/benchmarks/linear_attention.py`` at one shape, next to the op's own forward
and forward+backward; the passes a call runs add up to about the op's time, so their shares say which kernel to
work on. The inputs are the op's (``linear_attention_fla.case_inputs``), put in kernel layout by the op's own
wrapper code; the intermediates (chunk states, ``w``, ``u``, ``delta``, their cotangents) are what the earlier
passes return.

On a CPU the Pallas kernels run only in interpret mode (``--interpret``; the times mean nothing there, the run
checks the harness). Run (writes ``experiments/benchmarks/results/linear_attention_passes_<platform>.{json,md}``):

    python -m experiments.benchmarks.linear_attention_passes [--implementation pallas_triton] [--seq-len 8192]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

import pallas_kernels
from experiments.benchmarks.linear_attention import CASES
from experiments.benchmarks.linear_attention_fla import DTYPES, case_inputs, ours
from experiments.benchmarks.machine import device_info, positive_ints, time_call
from pallas_kernels.linear_attention import _chunked, _pallas

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
PLATFORMS = {"pallas_triton": "gpu", "pallas_tpu": "tpu"}
# The passes one forward+backward call runs, in order (the backward recomputes the forward's intermediates).
CALLED = {"linear_attention": ("states", "output", "state_grads", "states", "grads"),
          "delta_rule": ("prepare", "states", "output", "state_grads", "prepare", "states", "grads")}


def kernel_layout(case: str, implementation: str, arrays: dict, chunk: int):
  """``(backend, plan, inputs)``: the op's inputs in kernel layout as its wrapper builds them (``inputs``: q, k,
  v, [beta,] G, h0 and the output cotangent ``do``)."""
  op = CASES[case][0]
  platform = importlib.import_module(f"pallas_kernels.linear_attention.{PLATFORMS[implementation]}").PLATFORM
  backend = _pallas.backend(platform)
  x = {n: jnp.asarray(a) for n, a in arrays.items()}
  # pylint: disable=protected-access  (the wrapper's own steps, so the passes see what the op gives them)
  plan = _chunked._plan(backend, x["q"], x["log_decay"], x["q"].shape[-1] ** -0.5, chunk)
  layout = _chunked._Layout(backend, plan.chunk, x["q"], x["v"])
  G = _chunked._log_decays(x["log_decay"], None, x["q"].shape[:3], plan.chunk, layout.padded, cumulative=True)
  inputs = {"q": layout.rows(x["q"], layout.kp), "k": layout.rows(x["k"], layout.kp),
            "v": layout.rows(x["v"], layout.vp), "G": G, "h0": layout.state_in(None),
            "do": layout.rows(x["do"], layout.vp)}
  if op == "delta_rule":
    inputs["beta"] = layout.rows(x["beta"][..., None])
  return platform, plan, inputs


def pass_calls(op: str, platform, plan, x: dict) -> dict[str, Callable[[], object]]:
  """Each pass as a compiled call on its inputs (the intermediates computed once, by the earlier passes)."""
  passes = {name: functools.partial(getattr(_pallas, f"_{'gla' if op == 'linear_attention' else 'delta'}_{name}"),
                                    platform)
            for name in dict.fromkeys(CALLED[op])}
  run = lambda name, *args: jax.jit(lambda *a: passes[name](*a, plan))(*args)
  calls, dh_final = {}, jnp.zeros_like(x["h0"])
  if op == "linear_attention":
    h_all, _ = run("states", x["k"], x["v"], x["G"], x["h0"])
    dS_all, _ = run("state_grads", x["q"], x["G"], x["do"], dh_final)
    args = {"states": (x["k"], x["v"], x["G"], x["h0"]), "output": (x["q"], x["k"], x["v"], x["G"], h_all),
            "state_grads": (x["q"], x["G"], x["do"], dh_final),
            "grads": (x["q"], x["k"], x["v"], x["G"], h_all, dS_all, x["do"])}
  else:
    w, u = run("prepare", x["k"], x["v"], x["beta"], x["G"])
    h_all, delta, _ = run("states", x["k"], w, u, x["G"], x["h0"])
    dS_all, d_delta, _ = run("state_grads", x["q"], x["k"], w, x["G"], x["do"], dh_final)
    args = {"prepare": (x["k"], x["v"], x["beta"], x["G"]), "states": (x["k"], w, u, x["G"], x["h0"]),
            "output": (x["q"], x["k"], x["G"], delta, h_all),
            "state_grads": (x["q"], x["k"], w, x["G"], x["do"], dh_final),
            "grads": (x["q"], x["k"], x["v"], x["beta"], x["G"], h_all, delta, d_delta, dS_all, x["do"])}
  for name, call_args in args.items():
    compiled = jax.jit(lambda *a, name=name: passes[name](*a, plan)).lower(*call_args).compile()
    calls[name] = functools.partial(compiled, *call_args)
  return calls


def run(implementation: str, seq: int, shape: dict[str, int], dtype, repeats: int, chunk: int,
        log: Callable[[str], None] = print, on_case: Callable[[dict], None] | None = None) -> dict[str, object]:
  """Per case: each pass's ms, the sum over the passes a forward+backward call runs, and the op's times;
  ``on_case`` gets the partial result after each case."""
  result = {"device": device_info(), "implementation": implementation, "seq_len": seq, **shape,
            "dtype": jnp.dtype(dtype).name, "chunk": chunk, "repeats": repeats, "cases": {}}
  for case, (op, _) in CASES.items():
    arrays = case_inputs(case, shape["batch"], seq, shape["heads"], shape["dim"], dtype)
    platform, plan, x = kernel_layout(case, implementation, arrays, chunk)
    passes = {name: 1e3 * time_call(call, repeats) for name, call in pass_calls(op, platform, plan, x).items()}
    fwd, fwd_bwd = (1e3 * time_call(fn, repeats) for fn in ours(case, implementation, arrays))
    entry = {"passes_ms": passes, "called_sum_ms": sum(passes[name] for name in CALLED[op]),
             "op_fwd_ms": fwd, "op_fwd_bwd_ms": fwd_bwd}
    result["cases"][case] = entry
    log(f"{case}: " + ", ".join(f"{n} {ms:.2f}" for n, ms in passes.items())
        + f"; passes of fwd+bwd {entry['called_sum_ms']:.2f} ms, op fwd {fwd:.2f} / fwd+bwd {fwd_bwd:.2f} ms")
    if on_case is not None:
      on_case(result)
  return result


def to_markdown(result: dict[str, object]) -> str:
  """One table per case: each pass's time and its share of the forward+backward call's passes."""
  info = result["device"]
  lines = [f"# Pallas linear-attention passes: {result['implementation']}\n",
           f"Device: platform `{info['platform']}`, device_kind `{info['device_kind']}`, jax {info['jax']}. "
           f"B={result['batch']}, H={result['heads']}, K=V={result['dim']}, T={result['seq_len']}, "
           f"{result['dtype']}, chunk {result['chunk']}; median of {result['repeats']} calls after a warm-up. "
           "Calls per fwd+bwd: how often one forward+backward of the op runs the pass (the backward recomputes "
           "the forward's intermediates).\n"]
  lines += [f"- Note: {note}" for note in result.get("notes", [])]
  for case, entry in result["cases"].items():
    op = CASES[case][0]
    called = CALLED[op]
    lines += [f"\n## {case}\n", "| pass | ms | calls per fwd+bwd | share of fwd+bwd |", "|---|---|---|---|"]
    for name, ms in entry["passes_ms"].items():
      count = called.count(name)
      lines.append(f"| {name} | {ms:.2f} | {count} | {count * ms / entry['called_sum_ms']:.0%} |")
    lines.append(f"\nPasses of one fwd+bwd: {entry['called_sum_ms']:.2f} ms; the op: forward "
                 f"{entry['op_fwd_ms']:.2f} ms, forward+backward {entry['op_fwd_bwd_ms']:.2f} ms.")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--implementation", choices=tuple(PLATFORMS), default=None,
                      help="default: the Pallas kernels of this platform")
  parser.add_argument("--seq-len", type=lambda text: positive_ints(text)[0], default=8192)
  parser.add_argument("--shape", type=positive_ints, default=(4, 8, 128), help="B,H,D (default 4,8,128)")
  parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
  parser.add_argument("--chunk", type=int, choices=_pallas.SUPPORTED_CHUNKS, default=64)
  parser.add_argument("--repeats", type=lambda text: positive_ints(text)[0], default=10)
  parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (checks the harness)")
  parser.add_argument("--note", action="append", default=[], help="a line for the markdown (run conditions)")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR, help="results directory")
  args = parser.parse_args(argv)
  if len(args.shape) != 3:
    parser.error(f"--shape: expected B,H,D, got {args.shape}")
  platform = str(device_info()["platform"])
  implementation = args.implementation or {v: k for k, v in PLATFORMS.items()}.get(platform)
  if implementation is None or not (args.interpret or PLATFORMS[implementation] == platform):
    parser.error(f"--implementation: {implementation or 'none'} does not run compiled on {platform}; allowed: "
                 f"{', '.join(PLATFORMS)} on its platform, or any of them with --interpret")
  stem = f"linear_attention_passes_{platform}" + ("_interpret" if args.interpret else "")
  args.out.mkdir(parents=True, exist_ok=True)

  def write(result: dict[str, object]) -> None:
    result = {**result, "notes": list(args.note) + (["interpret mode: the times mean nothing"]
                                                    if args.interpret else [])}
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(to_markdown(result))

  with pallas_kernels.interpret(args.interpret):
    write(run(implementation, args.seq_len, dict(zip(("batch", "heads", "dim"), args.shape)),
              DTYPES[args.dtype], args.repeats, args.chunk, on_case=write))
  print(f"wrote {args.out / stem}.json and .md")


if __name__ == "__main__":
  main()
