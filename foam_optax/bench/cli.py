"""`foam-bench`: runs a benchmark suite (default: FOAM, Shampoo, SOAP,
Muon and AdamW side by side).

Writes to ``--out``: ``results.json`` (structure in BENCHMARKS.md), ``table.md``
and PNG plots; prints the Markdown table. ``--update-docs`` also rewrites the
suite's marked block of ./BENCHMARKS.md and copies the plots to
./docs/figures/. ``--suite`` picks the suite (`SUITES`; each is one module of
`foam_optax.bench`), ``--quick`` its smoke run; the options under a suite's
name below apply to that suite only.
"""

from __future__ import annotations

import argparse
import pathlib

try:
  from foam_optax.bench import bias, comparison, cost, harness, scale
  from foam_optax.bench import stability, threads, transfer
except ImportError as error:
  # The benchmark's own dependencies (flax, scikit-learn, matplotlib, tqdm)
  # are an extra, not part of the library's.
  raise SystemExit(
      f"foam-bench needs the optional dependencies of foam_optax[bench] "
      f"(missing: {error.name}). Install them with: "
      f"pip install 'foam_optax[bench]'") from error

# The suites by name: a new suite is a module with its `SUITE` and one line
# here.
SUITES: dict[str, harness.Suite] = {
    "default": comparison.SUITE,
    "scale": scale.SUITE,
    "stability": stability.SUITE,
    "transfer": transfer.SUITE,
    "bias": bias.SUITE,
    "cost": cost.SUITE,
}


def parser() -> argparse.ArgumentParser:
  """The command line: the common options, then each suite's own."""
  result = argparse.ArgumentParser(
      prog="foam-bench", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  result.add_argument(
      "--suite", choices=list(SUITES), default="default",
      help="; ".join(f"'{name}': {suite.help}"
                     for name, suite in SUITES.items()))
  presets = sorted({p for suite in SUITES.values() for p in suite.presets})
  result.add_argument(
      "--preset", choices=presets, default="full",
      help="the suite's configuration: 'full' (default), 'quick' (a smoke "
           "run of seconds to a minute) or one the suite defines: "
      + "; ".join(f"{name}: {', '.join(suite.presets)}"
                  for name, suite in SUITES.items()))
  result.add_argument("--quick", action="store_const", const="quick",
                      dest="preset", help="same as --preset quick")
  result.add_argument("--out", help="output directory (default: the "
                      "suite's, e.g. bench_out, bench_scale_out)")
  result.add_argument("--update-docs", action="store_true",
                      help="rewrite the suite's block of ./BENCHMARKS.md and "
                           "copy its plots to ./docs/figures/")
  result.add_argument("--no-progress", action="store_true",
                      help="no progress bar")
  added = set()
  for name, suite in SUITES.items():
    group = result.add_argument_group(f"--suite {name}")
    for option in suite.options:
      if option.flags not in added:
        group.add_argument(*option.flags, dest=_dest(option), default=None,
                           **option.kwargs)
        added.add(option.flags)
  return result


def _dest(option: harness.Option) -> str:
  return option.flags[0].lstrip("-").replace("-", "_")


def parse_args(argv=None) -> tuple[harness.Suite, object, argparse.Namespace]:
  """(suite, its config, the parsed arguments); an option of another suite
  or a preset the suite lacks is an error."""
  args_parser = parser()
  args = args_parser.parse_args(argv)
  suite = SUITES[args.suite]
  own = {option.flags: option for option in suite.options}
  fields = {}
  for other in SUITES.values():
    for option in other.options:
      value = getattr(args, _dest(option))
      if value is None:
        continue
      if option.flags not in own:
        args_parser.error(f"{option.flags[0]} is not an option of --suite "
                          f"{args.suite}")
      fields[own[option.flags].field] = value
  if args.preset not in suite.presets:
    args_parser.error(f"--suite {args.suite} has no preset {args.preset!r} "
                      f"(its presets: {', '.join(suite.presets)})")
  if args.out is None:
    args.out = suite.out
  return suite, suite.configure(args.preset, **fields), args


def main(argv=None) -> None:
  """Runs the suite the command line names.

  Sets ``OPENBLAS_NUM_THREADS=1`` first unless the environment sets it
  (`threads.limit_openblas`), before anything loads SciPy's OpenBLAS."""
  openblas = threads.limit_openblas()
  suite, config, args = parse_args(argv)
  harness.run(suite, config, pathlib.Path(args.out),
              update_docs=args.update_docs, progress=not args.no_progress,
              openblas=openblas)


if __name__ == "__main__":
  main()
