"""Benchmark: where one linear-attention implementation's forward+backward spends its time, instruction by
instruction, from a ``jax.profiler`` trace.

The program is ``linear_attention.compile_fwd_bwd`` (``jax.value_and_grad`` w.r.t. every input) on
``linear_attention.make_inputs``. Its trace has one event per executed instruction of the compiled program,
named as in the compiled HLO. Each instruction's time is summed over ``--calls`` traced calls and divided by
their number. The compiled HLO text gives each instruction its kind: "dot" (a ``dot`` or a fusion whose
computation holds one), "container" (``while``, ``conditional``, ``call``: left out of the sums and the
table, since whether their events span their bodies depends on the runtime) or "other" (elementwise passes,
copies, reductions). On a CPU, XLA's thunk
runtime may run independent instructions on both cores at once, so the instructions' sum can exceed the wall
time of a call, which is reported beside it (median of ``--repeats`` untraced calls).

Run (writes ``experiments/benchmarks/results/linear_attention_profile_<platform>_<case>_<setting>.{json,md}``):

    python -m experiments.benchmarks.linear_attention_profile [--case linear_attention_channel] [--setting H8_D128]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import tempfile

import jax

from experiments.benchmarks.linear_attention import CASES, SETTINGS, compile_fwd_bwd, make_inputs
from experiments.benchmarks.machine import device_info, time_call

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
CONTAINERS = ("while", "conditional", "call")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?[\s)}]([a-z][a-z0-9\-]*)\((.*)$")
_COMPUTATION = re.compile(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", re.M | re.S)


def instruction_kinds(hlo_text: str) -> dict[str, str]:
  """Instruction name -> "dot", "container" or "other", from a compiled module's HLO text."""
  bodies = {name: body for name, body in _COMPUTATION.findall(hlo_text)}
  kinds = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, opcode, rest = match.groups()
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    if opcode == "dot" or (opcode == "fusion" and called and " dot(" in bodies.get(called.group(1), "")):
      kinds[name] = "dot"
    else:
      kinds[name] = "container" if opcode in CONTAINERS else "other"
  return kinds


def instruction_times(trace_dir: pathlib.Path, kinds: dict[str, str], calls: int) -> dict[str, dict]:
  """Instruction name -> ``{"kind", "ms", "count"}`` per call, from the trace a ``jax.profiler`` run wrote into
  ``trace_dir`` (events of names that are not instructions of the program, such as runtime spans, are left
  out)."""
  path = max(trace_dir.glob("plugins/profile/*/*.trace.json.gz"))
  events = json.loads(gzip.open(path).read())["traceEvents"]
  micros, count = collections.Counter(), collections.Counter()
  for event in events:
    if event.get("ph") == "X" and event.get("name") in kinds:
      micros[event["name"]] += event["dur"]
      count[event["name"]] += 1
  return {name: {"kind": kinds[name], "ms": micros[name] / calls / 1e3, "count": count[name] / calls}
          for name in micros}


def profile(case: str, setting: str, seq: int, calls: int, repeats: int) -> dict:
  """The profile of one case (``linear_attention.CASES``) at one setting (``linear_attention.SETTINGS``)."""
  inputs = make_inputs(case, seq=seq, **SETTINGS[setting])
  compiled = compile_fwd_bwd(CASES[case][0], "xla", inputs)
  wall_ms = 1e3 * time_call(lambda: compiled(inputs), repeats)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(calls):
        jax.block_until_ready(compiled(inputs))
    times = instruction_times(pathlib.Path(trace_dir), instruction_kinds(compiled.as_text()), calls)
  totals = collections.Counter()
  for entry in times.values():
    totals[entry["kind"]] += entry["ms"]
  return {"case": case, "setting": setting, "seq_len": seq, "calls": calls, "wall_ms": wall_ms,
          "dot_ms": totals["dot"], "other_ms": totals["other"], "instructions": times}


def render(result: dict, top: int) -> str:
  r = result
  summed = r["dot_ms"] + r["other_ms"]
  lines = [f"# Where `xla` spends forward+backward: {r['case']}, {r['setting']}, T={r['seq_len']}", "",
           f"Device: {r['device']['platform']}, {r['device'].get('cpu_model')}, {r['device'].get('cpu_count')} "
           f"cores, jax {r['device'].get('jax')}. Per call, over {r['calls']} traced calls.", "",
           f"- Wall time of a call (median, untraced): {r['wall_ms']:.1f} ms.",
           f"- Instructions' sum: {summed:.1f} ms (can exceed the wall time: instructions may overlap).",
           f"- Dots: {r['dot_ms']:.1f} ms ({r['dot_ms'] / summed:.0%}); other instructions: {r['other_ms']:.1f} ms "
           f"({r['other_ms'] / summed:.0%})."] + [f"- Note: {n}" for n in r.get("notes", [])]
  lines += ["", f"## The {top} longest instructions", "", "| instruction | kind | runs per call | ms per call |",
            "|---|---|---|---|"]
  ranked = sorted((e for e in r["instructions"].items() if e[1]["kind"] != "container"), key=lambda e: -e[1]["ms"])
  lines += [f"| {name} | {e['kind']} | {e['count']:g} | {e['ms']:.2f} |" for name, e in ranked[:top]]
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--case", choices=sorted(CASES), default="linear_attention_channel")
  parser.add_argument("--setting", choices=sorted(SETTINGS), default="H8_D128")
  parser.add_argument("--seq-len", type=int, default=4096)
  parser.add_argument("--calls", type=int, default=3, help="traced calls")
  parser.add_argument("--repeats", type=int, default=10, help="untraced calls timed for the wall time")
  parser.add_argument("--top", type=int, default=30, help="instructions listed")
  parser.add_argument("--note", action="append", default=[], help="a line for the markdown (run conditions)")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR, help="results directory")
  args = parser.parse_args(argv)
  for name in ("seq_len", "calls", "repeats", "top"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')}: got {getattr(args, name)}; allowed: a positive int")
  result = {"device": device_info(), "notes": args.note,
            **profile(args.case, args.setting, args.seq_len, args.calls, args.repeats)}
  args.out.mkdir(parents=True, exist_ok=True)
  stem = args.out / f"linear_attention_profile_{result['device']['platform']}_{args.case}_{args.setting}"
  stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
  stem.with_suffix(".md").write_text(render(result, args.top))
  print(render(result, args.top))


if __name__ == "__main__":
  main()
