"""`foam-bench`: side-by-side benchmark of FOAM, Shampoo, SOAP, ASGO, DASGO,
Muon and AdamW.

Writes to ``--out``: ``results.json`` (structure in BENCHMARKS.md), ``table.md``
and PNG plots; prints the Markdown table. ``--update-docs`` also rewrites the
marked block of ./BENCHMARKS.md and copies the plots to ./docs/figures/.
Other suites run instead with ``--suite``, each with its own module and its
own block in BENCHMARKS.md: ``scale`` the FOAM paper's claims on a larger
workload (`foam_optax.bench.scale`), ``stability`` the workloads where a stale
preconditioner destabilises training (`foam_optax.bench.stability`),
``transfer`` learning-rate sweeps across widths with and without μP
(`foam_optax.bench.transfer`), ``bias`` each bias-corrected optimizer against
its uncorrected self (`foam_optax.bench.bias`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import platform
import shlex
import sys
import time
from typing import Any, Callable

import jax

try:
  from tqdm import tqdm
  from foam_optax.bench import bias, optimizers, report, runner, scale
  from foam_optax.bench import stability, threads, transfer, workloads
except ImportError as error:
  # The benchmark's own dependencies (flax, scikit-learn, matplotlib, tqdm)
  # are an extra, not part of the library's.
  raise SystemExit(
      f"foam-bench needs the optional dependencies of foam_optax[bench] "
      f"(missing: {error.name}). Install them with: "
      f"pip install 'foam_optax[bench]'") from error



@dataclasses.dataclass(frozen=True)
class Suite:
  """A suite run by `--suite`. Its module provides ``FULL`` and ``QUICK``
  configs, ``units_of_work(cfg)``, ``run_suite(cfg, progress)`` (a dict,
  with ``compile_seconds`` when it measures compilation), ``markdown(raw)``,
  ``plot(raw, out_dir)``, and ``START_MARKER``/``END_MARKER`` for its block
  of BENCHMARKS.md."""
  module: Any
  title: str                       # heading of its BENCHMARKS.md block
  out: str                         # default --out
  unit: str                        # what the progress bar counts
  seeds: Callable[[Any], list]     # the seeds a config runs
  help: str


SUITES = {
    "scale": Suite(
        scale, "## The FOAM paper's claims at scale (`foam-bench --suite "
        "scale`)", "bench_scale_out", "step", lambda cfg: [0],
        "the FOAM paper's claims on a Transformer with 512-wide factors, 1000 "
        "steps (about 30 min on 2 CPU cores)"),
    "stability": Suite(
        stability, "### Stability under a data switch (`foam-bench --suite "
        "stability`)", "bench_stability_out", "run",
        lambda cfg: list(range(cfg.seeds)),
        "divergences of FOAM and Shampoo where the data switches, at equal "
        "EVD budget, and the paper's figure-1 grid (at most 15 min)"),
    "transfer": Suite(
        transfer, "## Hyperparameter transfer across widths (`foam-bench "
        "--suite transfer`)", "bench_transfer_out", "step", lambda cfg: [0],
        "learning-rate sweeps at 4 widths with and without muP for AdamW, "
        "FOAM, SOAP and Muon (under 20 min)"),
    "bias": Suite(
        bias, "### The run (`foam-bench --suite bias`)", "bench_bias_out",
        "step", lambda cfg: list(cfg.seeds),
        "each bias-corrected optimizer against its uncorrected self on the "
        "char Transformer LM (about 15 min)"),
}

QUICK: dict[str, Any] = dict(
    workloads=("quadratic_k1e2", "digits_mlp"),
    optimizers=("adamw", "shampoo_f20", "foam"), seeds=2, steps=40)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="foam-bench", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(
      "--suite", choices=("default", *SUITES), default="default",
      help="; ".join(f"'{name}': {suite.help}" for name, suite in
                     SUITES.items())
      + ". With --quick each is a smoke run of about a minute; they ignore "
        "--workloads, --optimizers, --seeds, --steps and --sweep-steps")
  parser.add_argument("--only", choices=scale.PARTS,
                      help="with --suite scale: 'pareto' runs only FOAM, "
                           "Shampoo at every f, FOAM's Pareto points and the "
                           "X@eps0 ablation (about 15 min on 2 CPU cores), "
                           "with its own block in BENCHMARKS.md")
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
  if args.only and args.suite != "scale":
    parser.error("--only needs --suite scale")
  if args.out is None:
    args.out = SUITES[args.suite].out if args.suite in SUITES else "bench_out"
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


def _json_safe(value) -> Any:
  """Non-finite floats become None (strict JSON)."""
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _meta(seeds, openblas: dict) -> dict:
  # The machine may be shared: its load and the process's CPU time tell
  # how far the wall-clock figures stretched.
  return {"command": "foam-bench " + shlex.join(sys.argv[1:]),
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "machine": machine(), "seeds": seeds, "openblas": openblas,
          "load_average_at_start": os.getloadavg()}


def _finish_meta(meta: dict, started: float) -> None:
  meta["total_seconds"] = time.perf_counter() - started
  meta["process_cpu_seconds"] = time.process_time()
  meta["load_average_at_end"] = os.getloadavg()
  meta["openblas"]["loaded_threads"] = threads.loaded_blas_threads()


def run(args: argparse.Namespace) -> dict:
  """Runs the benchmark and writes the outputs; returns the raw results.

  Sets ``OPENBLAS_NUM_THREADS=1`` first unless the environment sets it
  (`threads.limit_openblas`), before anything loads SciPy's OpenBLAS."""
  openblas = threads.limit_openblas()
  if args.suite in SUITES:
    return run_suite(args, openblas)
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
  raw = {"meta": _meta(seeds, openblas), "workloads": {}}
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
  _finish_meta(raw["meta"], started)
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
  load = ""
  if "load_average_at_start" in meta:
    load = (f" 1-min load average {meta['load_average_at_start'][0]:.1f} at "
            f"the start, {meta['load_average_at_end'][0]:.1f} at the end; "
            f"process CPU time {meta['process_cpu_seconds'] / 60:.1f} min; "
            f"OPENBLAS_NUM_THREADS="
            f"{meta['openblas']['OPENBLAS_NUM_THREADS']} (set by "
            f"{meta['openblas']['set_by']}).")
  lines = [
      title, "",
      f"Output of `{meta['command']}` on {meta['date'][:10]}: "
      f"{m['processor'] or m['platform']}, {m['cpu_count']} CPU cores, "
      f"devices {', '.join(m['devices'])}, JAX {m['jax']}; {totals}{load}",
      "", table, "", "#### Plots", ""]
  lines += [f"![{f.stem}](docs/figures/{f.name})" for f in figures]
  return "\n".join(lines)


def docs_block(raw: dict, table: str, figures) -> str:
  """The BENCHMARKS.md block: command, machine, table and figures."""
  meta = raw["meta"]
  return _block(
      "## Optimizer comparison (`foam-bench`)", meta,
      f"total {meta['total_seconds'] / 60:.1f} min. Figures are means ± std "
      f"over seeds {meta['seeds']}.", table, figures)


def run_suite(args: argparse.Namespace, openblas: dict) -> dict:
  """Runs ``SUITES[args.suite]`` and writes its outputs; returns the raw
  results."""
  suite = SUITES[args.suite]
  module = suite.module
  cfg = module.QUICK if args.quick else module.FULL
  part = {"only": args.only} if args.only else {}   # --only: scale's parts
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  started = time.perf_counter()
  with tqdm(total=module.units_of_work(cfg, **part), unit=suite.unit,
            disable=args.no_progress, file=sys.stderr) as bar:
    raw = {"meta": _meta(suite.seeds(cfg), openblas),
           **module.run_suite(cfg, bar.update, **part)}
  _finish_meta(raw["meta"], started)
  raw = _json_safe(raw)
  (out / "results.json").write_text(json.dumps(raw))
  table = module.markdown(raw)
  (out / "table.md").write_text(table)
  figures = module.plot(raw, out)
  if args.update_docs:
    title, markers = suite.title, (module.START_MARKER, module.END_MARKER)
    if args.only:
      title, markers = scale.PARETO_TITLE, scale.PARETO_MARKERS
    totals = f"total {raw['meta']['total_seconds'] / 60:.1f} min"
    if "compile_seconds" in raw:
      totals += f" (compilation {raw['compile_seconds'] / 60:.1f} min of it)"
    report.update_benchmarks_md(
        pathlib.Path("BENCHMARKS.md"),
        _block(title, raw["meta"], totals + ".", table, figures),
        figures, pathlib.Path("docs/figures"), markers=markers)
  print(table)
  print(f"total {raw['meta']['total_seconds']:.0f} s; outputs in {out}/")
  return raw


def main(argv=None) -> None:
  run(parse_args(argv))


if __name__ == "__main__":
  main()
