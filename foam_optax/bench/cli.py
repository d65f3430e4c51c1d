"""`foam-bench`: side-by-side benchmark of FOAM, Shampoo, SOAP, ASGO, DASGO,
Muon and AdamW.

Writes to ``--out``: ``results.json`` (structure in BENCHMARKS.md), ``table.md``
and PNG plots; prints the Markdown table. ``--update-docs`` also rewrites the
marked block of ./BENCHMARKS.md and copies the plots to ./docs/figures/.
``--suite scale`` runs the FOAM paper's claims on a larger workload instead
(`foam_optax.bench.scale`), with its own block in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import shlex
import sys
import time

import jax

try:
  from tqdm import tqdm
  from foam_optax.bench import optimizers, report, runner, scale, workloads
except ImportError as error:
  # The benchmark's own dependencies (flax, scikit-learn, matplotlib, tqdm)
  # are an extra, not part of the library's.
  raise SystemExit(
      f"foam-bench needs the optional dependencies of foam_optax[bench] "
      f"(missing: {error.name}). Install them with: "
      f"pip install 'foam_optax[bench]'") from error

QUICK = dict(workloads=("quadratic_k1e2", "digits_mlp"),
             optimizers=("adamw", "shampoo_f20", "foam"), seeds=2, steps=40)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="foam-bench", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--suite", choices=("default", "scale"),
                      default="default",
                      help="'scale': the FOAM paper's claims on a Transformer "
                           "with 512-wide factors, 1000 steps (about 30 min on "
                           "2 CPU cores; with --quick a smoke run of under a "
                           "minute); it ignores --workloads, --optimizers, "
                           "--seeds, --steps and --sweep-steps")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run (about a minute): "
                           f"{', '.join(QUICK['workloads'])}; "
                           f"{', '.join(QUICK['optimizers'])}; "
                           f"{QUICK['seeds']} seeds, {QUICK['steps']} steps")
  parser.add_argument("--workloads", nargs="+", choices=list(workloads.WORKLOADS),
                      help="default: all")
  parser.add_argument("--optimizers", nargs="+",
                      help="default: " + " ".join(optimizers.DEFAULT_OPTIMIZERS)
                      + " (available: adds distributed_shampoo_f20 when "
                        "precondition-opt is installed)")
  parser.add_argument("--seeds", type=int, help="seeds per run (default 3)")
  parser.add_argument("--steps", type=int,
                      help="training steps for every workload (default: "
                           "each workload's own, 150-200)")
  parser.add_argument("--sweep-steps", type=int,
                      help="steps of each learning-rate sweep run "
                           "(default: a third of --steps)")
  parser.add_argument("--out", help="output directory (default bench_out, "
                                     "or bench_scale_out for --suite scale)")
  parser.add_argument("--update-docs", action="store_true",
                      help="rewrite the bench block of ./BENCHMARKS.md and "
                           "copy plots to ./docs/figures/")
  parser.add_argument("--no-progress", action="store_true",
                      help="no progress bar")
  args = parser.parse_args(argv)
  if args.out is None:
    args.out = "bench_scale_out" if args.suite == "scale" else "bench_out"
  defaults = QUICK if args.quick else dict(
      workloads=tuple(workloads.WORKLOADS),
      optimizers=optimizers.DEFAULT_OPTIMIZERS, seeds=3, steps=None)
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  return args


def machine() -> dict:
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(),
          "devices": [str(d) for d in jax.devices()],
          "python": platform.python_version(), "jax": jax.__version__}


def _json_safe(value):
  """Non-finite floats become None (strict JSON)."""
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def run(args: argparse.Namespace) -> dict:
  """Runs the benchmark and writes the outputs; returns the raw results."""
  if args.suite == "scale":
    return run_scale(args)
  specs = optimizers.optimizer_specs()
  unknown = [name for name in args.optimizers if name not in specs]
  if unknown:
    raise SystemExit(f"unknown or unavailable optimizers: {unknown}; "
                     f"available: {list(specs)}")
  names = ["adamw"] + [n for n in args.optimizers if n != "adamw"]
  seeds = list(range(args.seeds))
  built = {w: workloads.WORKLOADS[w](**({"steps": args.steps} if args.steps else {}))
           for w in args.workloads}
  sweep_steps = {w: args.sweep_steps or max(10, wl.steps // 3)
                 for w, wl in built.items()}
  total = sum(runner.units_of_work(len(seeds), wl.steps, sweep_steps[w],
                                   len(specs[n].lr_grid))
              for w, wl in built.items() for n in names)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  started = time.perf_counter()
  raw = {"meta": {"command": "foam-bench " + shlex.join(sys.argv[1:]),
                  "date": datetime.datetime.now().isoformat(timespec="seconds"),
                  "machine": machine(), "seeds": seeds},
         "workloads": {}}
  with tqdm(total=total, unit="step", disable=args.no_progress,
            file=sys.stderr) as bar:
    for w, wl in built.items():
      results = {}
      for name in names:
        bar.set_description(f"{w} {name}")
        results[name] = runner.benchmark_pair(
            wl, specs[name], seeds, wl.steps, sweep_steps[w], bar.update)
      target = report.summarize(results["adamw"], math.inf)["final_train_loss"]
      raw["workloads"][w] = {
          "description": wl.description, "steps": wl.steps,
          "sweep_steps": sweep_steps[w], "target_train_loss": target,
          "results": results,
          "summary": {n: report.summarize(r, target) for n, r in results.items()}}
  summaries = {w: d["summary"] for w, d in raw["workloads"].items()}
  raw["targets"] = report.targets(summaries)
  raw["meta"]["total_seconds"] = time.perf_counter() - started
  raw = _json_safe(raw)
  (out / "results.json").write_text(json.dumps(raw))
  table = report.markdown(
      summaries, raw["targets"],
      {w: d["description"] for w, d in raw["workloads"].items()})
  (out / "table.md").write_text(table)
  figures = report.plot(raw, out)
  if args.update_docs:
    report.update_benchmarks_md(
        pathlib.Path("BENCHMARKS.md"), docs_block(raw, table, figures),
        figures, pathlib.Path("docs/figures"))
  print(table)
  print(f"total {raw['meta']['total_seconds']:.0f} s; outputs in {out}/")
  return raw


def _block(title: str, meta: dict, totals: str, table: str, figures) -> str:
  """A BENCHMARKS.md block: title, command and machine, `totals`, the
  table and the plots."""
  m = meta["machine"]
  lines = [
      title, "",
      f"Output of `{meta['command']}` on {meta['date'][:10]}: "
      f"{m['processor'] or m['platform']}, {m['cpu_count']} CPU cores, "
      f"devices {', '.join(m['devices'])}, JAX {m['jax']}; {totals}", "",
      table, "", "#### Plots", ""]
  lines += [f"![{f.stem}](docs/figures/{f.name})" for f in figures]
  return "\n".join(lines)


def docs_block(raw: dict, table: str, figures) -> str:
  """The BENCHMARKS.md block: command, machine, table and figures."""
  meta = raw["meta"]
  return _block(
      "## Optimizer comparison (`foam-bench`)", meta,
      f"total {meta['total_seconds'] / 60:.1f} min. Figures are means ± std "
      f"over seeds {meta['seeds']}.", table, figures)


def run_scale(args: argparse.Namespace) -> dict:
  """Runs the scale suite and writes its outputs; returns the raw results."""
  cfg = scale.QUICK if args.quick else scale.FULL
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  started = time.perf_counter()
  meta = {"command": "foam-bench " + shlex.join(sys.argv[1:]),
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "machine": machine(), "seeds": [0]}
  with tqdm(total=scale.units_of_work(cfg), unit="step",
            disable=args.no_progress, file=sys.stderr) as bar:
    raw = {"meta": meta, **scale.run_suite(cfg, bar.update)}
  raw["meta"]["total_seconds"] = time.perf_counter() - started
  raw = _json_safe(raw)
  (out / "results.json").write_text(json.dumps(raw))
  table = scale.markdown(raw)
  (out / "table.md").write_text(table)
  figures = scale.plot(raw, out)
  if args.update_docs:
    report.update_benchmarks_md(
        pathlib.Path("BENCHMARKS.md"), scale_docs_block(raw, table, figures),
        figures, pathlib.Path("docs/figures"),
        markers=(scale.START_MARKER, scale.END_MARKER))
  print(table)
  print(f"total {raw['meta']['total_seconds']:.0f} s; outputs in {out}/")
  return raw


def scale_docs_block(raw: dict, table: str, figures) -> str:
  """The scale suite's BENCHMARKS.md block."""
  meta = raw["meta"]
  return _block(
      "## The FOAM paper's claims at scale (`foam-bench --suite scale`)",
      meta, f"total {meta['total_seconds'] / 60:.1f} min (compilation "
      f"{raw['compile_seconds'] / 60:.1f} min of it).", table, figures)


def main(argv=None) -> None:
  run(parse_args(argv))


if __name__ == "__main__":
  main()
