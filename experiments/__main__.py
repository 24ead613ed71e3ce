"""One-command paper tables.

    python -m experiments list
    python -m experiments reproduce NAME [--scale tiny|small|paper] [--out results] [--seeds N]
    python -m experiments reproduce all [--scale tiny]

``tiny`` (default) runs on a 2-core CPU in minutes, ``small`` wants a GPU/TPU for about an hour, ``paper`` is
the paper's configuration. Results go to ``<out>/NAME/`` (table.md, table.csv, runs.jsonl, plot.png); ``all``
runs every table in turn and writes ``<out>/summary.md`` (each table's wall time and verdicts). ``--seeds``
defaults to each table's own count.

Compiled programs are kept in JAX's persistent compilation cache (``--compilation-cache``; default
``$JAX_COMPILATION_CACHE_DIR`` or ``~/.cache/gated_jax/jax_compilation_cache``): the second and later seeds of
a variant, and variants that differ only in data, reuse the programs compiled for the first (those that took
over a second to compile) — on a CPU, compilation is most of a tiny run's time. The runtimes the README quotes
were measured with an empty cache.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
from collections.abc import Sequence

from experiments import tables
from experiments.tables import common


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  sub.add_parser("list", help="list the reproducible tables and their papers")
  rep = sub.add_parser("reproduce", help="train a table's grid and compare with the paper")
  rep.add_argument("name", help="table name (see `list`), or `all`")
  rep.add_argument("--scale", default="tiny", choices=common.SCALES + common.HIDDEN_SCALES,
                   metavar="{" + "|".join(common.SCALES) + "}", help="model/data scale (default: tiny)")
  rep.add_argument("--out", default="results", help="results directory (default: results)")
  rep.add_argument("--seeds", type=int, default=None, help="seeds per variant (default: the table's own)")
  rep.add_argument("--compilation-cache", default=os.environ.get("JAX_COMPILATION_CACHE_DIR", str(_DEFAULT_CACHE)),
                   help="directory of JAX's persistent compilation cache, or `off` (default: %(default)s)")
  return parser


_DEFAULT_CACHE = pathlib.Path.home() / ".cache" / "gated_jax" / "jax_compilation_cache"


def _use_compilation_cache(directory: str) -> None:
  """Points JAX's persistent compilation cache at ``directory`` (``off``: leaves it disabled)."""
  if directory == "off":
    return
  import jax  # pylint: disable=import-outside-toplevel

  jax.config.update("jax_compilation_cache_dir", directory)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  if args.command == "list":
    for name in tables.names():
      print(f"{name}: {tables.get(name).paper}")
    return 0
  try:
    chosen = [tables.get(n) for n in (tables.names() if args.name == "all" else (args.name,))]
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  _use_compilation_cache(args.compilation_cache)
  texts = [common.reproduce(table, scale=args.scale, seeds=args.seeds, out=args.out) for table in chosen]
  if args.name == "all":
    summary = common.write_summary(chosen, texts, args.out)
    print(summary)
  return 0


if __name__ == "__main__":
  sys.exit(main())
