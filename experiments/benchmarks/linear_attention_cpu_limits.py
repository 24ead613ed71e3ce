"""Benchmark: what limits the ``xla`` linear-attention path on a CPU (docs/linear_attention_kernels.md, "The CPU
path").

* ``dots``: the batched float32 matmuls of a 64-row chunk, for one chunk of 8 heads (what a group of one chunk
  runs) and for all 64 chunks at once, and of larger chunks, against one large matmul: GFLOP/s and the fresh
  memory each call touches (its output, when that is past glibc's ``mmap`` threshold).
* ``forms``: forward+backward of per-channel-decay GLA (T=4096, B=1, GLA-like gates) with the intra-chunk scores
  as shipped (one ``lax.cond`` between the mild and the exact form), with the mild form alone and with the exact
  secondary-chunk form alone (``xla._with_form`` replaced for the measurement; the mild form alone is not exact
  for large decay spans, so it is not an option of the library).
* ``chunks``: forward+backward of the three cases at chunk lengths 32 and 64 (the default chunk follows
  the head size: ``pallas_kernels.linear_attention.default_chunk_size``).
* ``groups``: forward+backward of the three cases with the chunks in groups as shipped (``xla.GROUP_BYTES``,
  ``xla.WHOLE_BYTES``) and in one group (all chunks at once), with the fresh memory the kernel hands the
  process per call (minor page faults) and the CPU seconds it spends (``machine.call_cost``).

Times are medians of ``--repeats`` calls after a warm-up; the rounds alternate the forms, so a load change on a
shared machine touches them alike.

Run (writes ``experiments/benchmarks/results/linear_attention_cpu_limits[_TAG].{json,md}``; the allocator's
environment variables, ``GLIBC_TUNABLES`` and ``MALLOC_*``, are recorded with the device):

    python -m experiments.benchmarks.linear_attention_cpu_limits [--repeats 20] [--rounds 2] [--tag TAG]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
from unittest import mock

import jax
import jax.numpy as jnp

from experiments.benchmarks.linear_attention import compile_fwd_bwd, make_inputs
from experiments.benchmarks.machine import call_cost, device_info, time_call
from pallas_kernels.linear_attention import xla as linear_xla

RESULTS_DIR = pathlib.Path(__file__).parent / "results"
# (batch, rows, contraction, columns): a chunk's rows against its state and the scores' A v, for one chunk of 8
# heads and for 64 chunks; larger chunks; the peak.
DOT_SHAPES = ((8, 64, 128, 128), (512, 64, 128, 128), (8, 64, 64, 128), (512, 64, 64, 128), (256, 128, 128, 128),
              (128, 256, 128, 128), (1, 4096, 1024, 1024))
SETTINGS = {"H2_D32": (2, 32), "H8_D128": (8, 128)}


def dot_cost(batch: int, rows: int, inner: int, cols: int, repeats: int) -> dict[str, float]:
  """GFLOP/s and fresh MiB per call of a float32 ``HIGHEST``-precision batched matmul."""
  a = jax.random.normal(jax.random.key(0), (batch, rows, inner))
  b = jax.random.normal(jax.random.key(1), (batch, inner, cols))
  fn = jax.jit(lambda a, b: jnp.einsum("bmk,bkn->bmn", a, b, precision=jax.lax.Precision.HIGHEST))
  cost = call_cost(lambda: fn(a, b), repeats)
  return {"gflops": 2.0 * batch * rows * inner * cols / cost["ms"] / 1e6, "fresh_mib": cost["fresh_mib"]}


def _only(form: str):
  """A ``_with_form`` that always takes one form of the per-channel scores (``"mild"`` or ``"exact"``)."""
  def with_form(plan, G, run):
    del G
    return run(form, plan.options.exact_group_bytes if form == "exact" else plan.options.group_bytes)
  return with_form


def _alternate(compiled: dict, inputs, rounds: int, repeats: int, measure=None) -> dict[str, list]:
  """``{name: [measure per round]}``: the compiled programs in turn, round after round (default: ms)."""
  measure = measure or (lambda fn, n: 1e3 * time_call(fn, n))
  out: dict[str, list] = {name: [] for name in compiled}
  for _ in range(rounds):
    for name, fn in compiled.items():
      out[name].append(measure(lambda fn=fn: fn(inputs), repeats))
  return out


def form_times(setting: str, rounds: int, repeats: int) -> dict[str, list[float]]:
  """Forward+backward ms per round of the shipped per-channel form choice and of each form alone."""
  heads, dim = SETTINGS[setting]
  inputs = make_inputs("linear_attention_channel", 1, 4096, heads, dim)
  compiled = {"shipped (lax.cond)": compile_fwd_bwd("linear_attention", "xla", inputs)}
  for form in ("mild", "exact"):
    with mock.patch.object(linear_xla, "_with_form", _only(form)):
      compiled[f"{form} form alone"] = compile_fwd_bwd("linear_attention", "xla", inputs)
  return _alternate(compiled, inputs, rounds, repeats)


CASES = ("linear_attention_head", "linear_attention_channel", "delta_rule")
CHUNKS = (32, 64)


def _op(case: str) -> str:
  return "delta_rule" if case == "delta_rule" else "linear_attention"


def chunk_times(setting: str, rounds: int, repeats: int) -> dict[str, dict[str, list[float]]]:
  """``{case: {chunk: [ms per round]}}``: forward+backward at each of :data:`CHUNKS`."""
  heads, dim = SETTINGS[setting]
  out = {}
  for case in CASES:
    inputs = make_inputs(case, 1, 4096, heads, dim)
    compiled = {str(c): compile_fwd_bwd(_op(case), "xla", inputs, chunk_size=c) for c in CHUNKS}
    out[case] = _alternate(compiled, inputs, rounds, repeats)
  return out


def group_costs(setting: str, rounds: int, repeats: int) -> dict[str, dict[str, list[dict[str, float]]]]:
  """``{case: {variant: [call_cost per round]}}``: forward+backward with chunk groups as shipped and with all
  chunks in one group."""
  heads, dim = SETTINGS[setting]
  out = {}
  for case in CASES:
    inputs = make_inputs(case, 1, 4096, heads, dim)
    compiled = {"chunk groups (shipped)": compile_fwd_bwd(_op(case), "xla", inputs)}
    with mock.patch.object(linear_xla, "GROUP_BYTES", None), mock.patch.object(linear_xla, "EXACT_GROUP_BYTES", None):
      compiled["one group"] = compile_fwd_bwd(_op(case), "xla", inputs)
    out[case] = _alternate(compiled, inputs, rounds, repeats, call_cost)
  return out


def _per_round(values, fmt: str = "{:.1f}") -> str:
  return " / ".join(fmt.format(v) for v in values)


def render(result: dict) -> str:
  info = result["device"]
  env = ", ".join(f"`{k}={v}`" for k, v in result.get("allocator_env", {}).items()) or "defaults"
  lines = ["# Linear attention on a CPU: the dot ceiling, the per-channel forms, the chunk groups", "",
           f"Device: platform `{info['platform']}`, CPU {info['cpu_model']}, {info['cpu_count']} cores, "
           f"jax {info['jax']}; allocator environment: {env}. Medians of {result['repeats']} calls after a "
           "warm-up."]
  lines += [f"- Note: {note}" for note in result.get("notes", [])]
  lines += ["", "## Batched float32 matmuls", "", "| batch | rows x inner x cols | GFLOP/s | fresh MiB per call |",
            "|---|---|---|---|"]
  for (batch, rows, inner, cols), cost in zip(result["dot_shapes"], result["dots"]):
    lines.append(f"| {batch} | {rows} x {inner} x {cols} | {cost['gflops']:.1f} | {cost['fresh_mib']:.0f} |")
  lines += ["", "## Per-channel GLA forward+backward, T=4096, B=1 (ms, one column per round)", "",
            "| setting | form | ms |", "|---|---|---|"]
  for setting, times in result["forms"].items():
    for name, values in times.items():
      lines.append(f"| {setting} | {name} | {_per_round(values)} |")
  lines += ["", "## Chunk length: forward+backward, T=4096, B=1 (ms, one value per round)", "",
            "| setting | case | chunk | ms |", "|---|---|---|---|"]
  for setting, cases in result.get("chunks", {}).items():
    for case, times in cases.items():
      for chunk, values in times.items():
        lines.append(f"| {setting} | {case} | {chunk} | {_per_round(values)} |")
  lines += ["", "## Chunk groups: forward+backward, T=4096, B=1, per call (one value per round)", "",
            "| setting | case | passes | ms | fresh MiB | system CPU-s | user CPU-s |", "|---|---|---|---|---|---|---|"]
  for setting, cases in result.get("groups", {}).items():
    for case, variants in cases.items():
      for name, rounds in variants.items():
        cells = [_per_round((r[key] for r in rounds), fmt)
                 for key, fmt in (("ms", "{:.1f}"), ("fresh_mib", "{:.0f}"), ("sys_s", "{:.3f}"), ("user_s", "{:.3f}"))]
        lines.append(f"| {setting} | {case} | {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines + [""])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=20, help="timed calls per measurement")
  parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the per-channel forms")
  parser.add_argument("--note", action="append", default=[], help="a line for the markdown (run conditions)")
  parser.add_argument("--out", type=pathlib.Path, default=RESULTS_DIR, help="results directory")
  parser.add_argument("--tag", default="", help="suffix of the results files' names (e.g. a run condition)")
  args = parser.parse_args()
  allocator_env = {k: v for k, v in sorted(os.environ.items()) if k == "GLIBC_TUNABLES" or k.startswith("MALLOC_")}
  result = {"device": device_info(), "allocator_env": allocator_env, "repeats": args.repeats, "notes": args.note,
            "dot_shapes": DOT_SHAPES, "dots": [dot_cost(*shape, args.repeats) for shape in DOT_SHAPES],
            "forms": {setting: form_times(setting, args.rounds, args.repeats) for setting in SETTINGS},
            "chunks": {setting: chunk_times(setting, args.rounds, args.repeats) for setting in SETTINGS},
            "groups": {setting: group_costs(setting, args.rounds, args.repeats) for setting in SETTINGS}}
  args.out.mkdir(parents=True, exist_ok=True)
  stem = args.out / ("linear_attention_cpu_limits" + (f"_{args.tag}" if args.tag else ""))
  stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
  stem.with_suffix(".md").write_text(render(result))
  print(render(result))


if __name__ == "__main__":
  main()
