"""Checks every Pallas kernel on this machine against its op's ``reference``: the first command to run on a new
GPU or TPU.

    python -m pallas_kernels.selftest                 # compiled, every Pallas kernel this backend runs
    python -m pallas_kernels.selftest --interpret     # interpret mode (any backend, e.g. a CPU)
    python -m pallas_kernels.selftest --op attention --json out.json

For each case (small shapes, forward and backward) and each Pallas implementation of its op it prints one row:
the relative L2 error of the outputs and of the input gradients against ``implementation="reference"``, the
time of one compiled forward+backward, and PASS / FAIL (error above the case's tolerance) / SKIP (the kernel
raised ``NotImplementedError``, or does not run on this backend) / ERROR (any other exception, with its
message). The exit status is 1 when a row FAILs or ERRORs.

Cases live beside each op, in ``pallas_kernels/<op>/selftest_cases.py`` (a ``CASES`` tuple of :class:`Case`);
``CASE_MODULES`` lists them.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import dispatch

CASE_MODULES = (
    "pallas_kernels.attention.selftest_cases",
    "pallas_kernels.linear_attention.selftest_cases",
    "pallas_kernels.grouped_matmul.selftest_cases",
    "pallas_kernels.spiking_scan.selftest_cases",
)


@dataclasses.dataclass(frozen=True)
class Case:
  """One self-test case of an op.

  Attributes:
    op: the op's name (``dispatch.registered_ops()``).
    name: what the case exercises, e.g. ``"causal softmax GQA bf16 T=200"``.
    fn: ``fn(*inputs, implementation=name)`` -> an array or a tuple of arrays.
    make_inputs: ``key -> tuple of arrays`` (the positional inputs of ``fn``).
    grad_argnums: which inputs to differentiate (through a random cotangent on every output).
    tolerance: largest allowed relative L2 error of each output and each gradient against ``reference``.
  """
  op: str
  name: str
  fn: Callable[..., Any]
  make_inputs: Callable[[jax.Array], tuple[jax.Array, ...]]
  grad_argnums: tuple[int, ...] = ()
  tolerance: float = 1e-4


@dataclasses.dataclass
class Row:
  op: str
  case: str
  implementation: str
  status: str
  forward_error: float | None = None
  gradient_error: float | None = None
  seconds: float | None = None
  message: str = ""


def relative_error(x: Any, reference: Any) -> float:
  """Largest relative L2 error over the leaves: ``|x - ref| / max(|ref|, tiny)``, in float64."""
  errors = []
  for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(reference), strict=True):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
      return float("inf")
    errors.append(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)))
  return max(errors, default=0.0)


def _forward_and_grads(case: Case, implementation: str, inputs: tuple[jax.Array, ...], key: jax.Array):
  def run(*diff):
    full = list(inputs)
    for i, x in zip(case.grad_argnums, diff):
      full[i] = x
    return case.fn(*full, implementation=implementation)

  @jax.jit
  def both(*diff):
    out, vjp = jax.vjp(run, *diff)
    leaves, treedef = jax.tree.flatten(out)
    keys = jax.random.split(key, len(leaves))
    cotangent = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
                                             for k, x in zip(keys, leaves)])
    return out, vjp(cotangent)

  diff = tuple(inputs[i] for i in case.grad_argnums)
  result = jax.block_until_ready(both(*diff))
  start = time.perf_counter()
  jax.block_until_ready(both(*diff))
  return result, time.perf_counter() - start


def check(case: Case, implementation: str, *, seed: int = 0) -> Row:
  """Runs ``case`` with ``implementation`` and with ``reference``; one result row."""
  row = Row(case.op, case.name, implementation, "PASS")
  key_inputs, key_cotangent = jax.random.split(jax.random.PRNGKey(seed))
  inputs = case.make_inputs(key_inputs)
  try:
    (out, grads), row.seconds = _forward_and_grads(case, implementation, inputs, key_cotangent)
  except NotImplementedError as e:
    row.status, row.message = "SKIP", str(e).splitlines()[0][:200]
    return row
  except Exception as e:  # pylint: disable=broad-except  (reported, not raised: the table is the output)
    row.status, row.message = "ERROR", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return row
  (ref_out, ref_grads), _ = _forward_and_grads(case, "reference", inputs, key_cotangent)
  row.forward_error = relative_error(out, ref_out)
  row.gradient_error = relative_error(grads, ref_grads) if case.grad_argnums else 0.0
  if not (row.forward_error <= case.tolerance and row.gradient_error <= case.tolerance):
    row.status = "FAIL"
    row.message = f"tolerance {case.tolerance:g}"
  return row


def cases(ops: Sequence[str] | None = None) -> tuple[Case, ...]:
  """Every registered case, optionally only those of ``ops``."""
  found = []
  for module in CASE_MODULES:
    found.extend(importlib.import_module(module).CASES)
  if ops:
    known = sorted({c.op for c in found})
    unknown = sorted(set(ops) - set(known))
    if unknown:
      raise ValueError(f"op: got {unknown}; allowed: {', '.join(known)}")
    found = [c for c in found if c.op in ops]
  return tuple(found)


def pallas_implementations(op_name: str) -> tuple[str, ...]:
  ops = {op.name: op for op in dispatch.registered_ops()}
  return tuple(ops[op_name].validated())


def run(ops: Sequence[str] | None = None, *, interpret: bool = False,
        implementations: Sequence[str] | None = None,
        on_row: Callable[[list[Row]], None] | None = None) -> list[Row]:
  """Checks every Pallas implementation of every case (only those that run on this backend unless
  ``interpret``); ``implementations`` narrows the kernels checked; ``on_row`` gets the rows so far after each
  (a run cut short keeps what it checked)."""
  rows = []
  with dispatch.interpret(interpret):
    for case in cases(ops):
      for name in pallas_implementations(case.op):
        if implementations and name not in implementations:
          continue
        rows.append(check(case, name))
        if on_row is not None:
          on_row(rows)
  return rows


def format_table(rows: Sequence[Row]) -> str:
  header = ("op", "case", "implementation", "status", "fwd err", "grad err", "ms", "note")
  body = [(r.op, r.case, r.implementation, r.status,
           "" if r.forward_error is None else f"{r.forward_error:.1e}",
           "" if r.gradient_error is None else f"{r.gradient_error:.1e}",
           "" if r.seconds is None else f"{1e3 * r.seconds:.2f}", r.message) for r in rows]
  widths = [max(len(str(x)) for x in column) for column in zip(header, *body)]
  lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in (header, *body)]
  return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def device_description() -> str:
  device = jax.devices()[0]
  return f"{device.platform}:{getattr(device, 'device_kind', '?')} (jax {jax.__version__})"


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m pallas_kernels.selftest", description=__doc__.split("\n\n")[0])
  parser.add_argument("--interpret", action="store_true", help="run the kernels in interpret mode")
  parser.add_argument("--op", action="append", help="only this op (repeatable)")
  parser.add_argument("--implementation", action="append", help="only this kernel (repeatable)")
  parser.add_argument("--json", help="also write the rows to this file")
  args = parser.parse_args(argv)
  mode = " in interpret mode" if args.interpret else ", compiled"
  print(f"pallas_kernels self-test on {device_description()}{mode}", flush=True)

  def write(rows: list[Row]) -> None:
    if args.json:
      with open(args.json, "w") as f:
        json.dump({"device": device_description(), "interpret": args.interpret,
                   "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1)

  def progress(rows: list[Row]) -> None:
    print(f"  {rows[-1].op} / {rows[-1].case} / {rows[-1].implementation}: {rows[-1].status}", flush=True)
    write(rows)

  rows = run(args.op, interpret=args.interpret, implementations=args.implementation, on_row=progress)
  write(rows)
  print(f"\n{format_table(rows)}")
  counts = {s: sum(r.status == s for r in rows) for s in ("PASS", "FAIL", "SKIP", "ERROR")}
  print("\n" + ", ".join(f"{n} {s}" for s, n in counts.items()))
  return 1 if counts["FAIL"] or counts["ERROR"] else 0


if __name__ == "__main__":
  sys.exit(main())
