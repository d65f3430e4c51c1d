"""One-sided FOAM against the official every-step ASGO: root computations,
wall-clock and loss on the foam-bench workloads.

ASGO preconditions each weight matrix on its smaller side with the inverse
square root of one factor, recomputed at every step (the official code: 10
Polar Express iterations). One-sided FOAM is the same update with the root
taken from a cached eigendecomposition that FOAM's staleness proxy refreshes
only when it asks, with FOAM's adaptive damping. The methods, with
foam-bench's settings (`foam_optax.bench.optimizers`; the ASGO family sends
vectors and embeddings to Adam, as the official runs):

  asgo            fo.asgo: Polar Express root every step (official)
  asgo_eigh       fo.asgo(root_method="eigh"): eigendecomposition every step
  asgo_foam       one-sided FOAM: fo.asgo(root_method="eigh",
                  controller="foam", check_frequency=20)
  foam_one_sided  fo.foam(one_sided=True): FOAM's paper settings with Adam
                  grafting and one factor per matrix
  dasgo           fo.dasgo: diagonal, no root
  adamw           optax.adamw, for reference

Root computations are `fo.stats(state)["eigendecompositions"]` plus
`["inverse_roots"]`: eigendecompositions and Polar Express roots.

Every round trains each method once, on the seed of the round, in an order
rotated from round to round, so that a slow spell of a shared machine falls
on every method alike. Times are medians over rounds (step by step: the
clock at step k is the median over rounds of the time to step k), by the
wall clock and by the process's CPU time; losses are means ± std over
rounds (seeds), on the workload's fixed train and held-out sets. Prints, per
workload, a table at equal steps, one at equal wall-clock (one-sided FOAM's
run time), and a summary of one-sided FOAM against every-step ASGO.

  python scripts/archive/asgo_comparison.py                        # 3 rounds
  python scripts/archive/asgo_comparison.py --rounds 5 --json asgo.json
  python scripts/archive/asgo_comparison.py --workloads digits_mlp --steps 30 \\
      --rounds 1 --methods asgo asgo_foam                  # smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import numpy as np

import foam_optax as fo
from foam_optax.bench import optimizers, trainer, workloads

WORKLOADS = ("digits_mlp", "digits_cnn", "transformer_lm")
# Near ASGO's best rate in sweeps of a third of the steps, which the other
# methods also reach or come close to (BENCHMARKS.md).
LEARNING_RATES = {"digits_mlp": 3e-2, "digits_cnn": 3e-2,
                  "transformer_lm": 1e-2}
EVAL_POINTS = 40
OFFICIAL, ONE_SIDED_FOAM = "asgo", "asgo_foam"
METHODS = ("asgo", "asgo_eigh", "asgo_foam", "foam_one_sided", "dasgo",
           "adamw")


def method_specs(names) -> dict:
  """The `OptimizerSpec` of each method in `names`."""
  specs = optimizers.optimizer_specs()
  eigh_settings = dict(optimizers.ASGO_SETTINGS, root_method="eigh")
  specs["asgo_eigh"] = optimizers.OptimizerSpec(
      "asgo_eigh",
      lambda schedule: optimizers.adam_routed(fo.asgo)(schedule,
                                                       **eigh_settings),
      (), eigh_settings, foam_family=True)
  return {name: specs[name] for name in names}


def train(compiled, seed, steps, lr, eval_every) -> dict:
  """One run: per-step wall and CPU seconds, train/held-out loss every
  `eval_every` steps, and the final `fo.stats` figures."""
  params, opt_state = compiled.init(seed)
  batches = compiled.workload.sample_batches(seed, steps)
  lr = jnp.float32(lr)
  wall, cpu = [], []
  curve = {"step": [0], **{k: [float(v)] for k, v in
                           compiled.evaluate(params).items()}}
  for i in range(steps):
    batch = jax.tree.map(lambda b: b[i], batches)
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    params, opt_state, _ = jax.block_until_ready(
        compiled.step(params, opt_state, batch, lr))
    wall.append(time.perf_counter() - wall_start)
    cpu.append(time.process_time() - cpu_start)
    if (i + 1) % eval_every == 0 or i + 1 == steps:
      curve["step"].append(i + 1)
      for key, value in compiled.evaluate(params).items():
        curve[key].append(float(value))
  run = {"step_seconds": wall, "step_cpu_seconds": cpu, "curve": curve}
  if compiled.spec.foam_family:
    stats = fo.stats(opt_state)
    run["root_computations"] = int(stats["eigendecompositions"]
                                   + stats["inverse_roots"])
    run["num_factors"] = int(stats["num_factors"])
  return run


def run_workload(name, names, steps, rounds, lr) -> dict:
  """Compiles every method, then trains them in `rounds` interleaved
  rounds; returns the raw runs and the compile seconds."""
  workload = workloads.WORKLOADS[name](**({"steps": steps} if steps else {}))
  trainers = {m: trainer.Trainer(workload, spec)
              for m, spec in method_specs(names).items()}
  compile_seconds = {m: t.compile_seconds for m, t in trainers.items()}
  eval_every = max(1, workload.steps // EVAL_POINTS)
  runs = {m: [] for m in names}
  for r in range(rounds):
    for m in names[r % len(names):] + names[:r % len(names)]:
      runs[m].append(train(trainers[m], r, workload.steps, lr, eval_every))
  return {"description": workload.description, "steps": workload.steps,
          "lr": lr, "compile_seconds": compile_seconds, "runs": runs}


CLOCKS = {"wall": "step_seconds", "cpu": "step_cpu_seconds"}


def _clock(runs, key):
  """Median over rounds of the time to each step."""
  return np.median([np.cumsum(r[key]) for r in runs], axis=0)


def _time_at(clock, step):
  return 0.0 if step == 0 else float(clock[step - 1])


def summarize(data) -> dict:
  """Per method: figures at equal steps, and by each clock (wall, CPU) at
  one-sided FOAM's run time and to every-step ASGO's final train loss."""
  summary, clocks, curves = {}, {}, {}
  for m, runs in data["runs"].items():
    clocks[m] = {c: _clock(runs, key) for c, key in CLOCKS.items()}
    curves[m] = np.mean([r["curve"]["train_loss"] for r in runs], axis=0)
    finals = {k: [r["curve"][k][-1] for r in runs]
              for k in ("train_loss", "test_loss")}
    summary[m] = {
        "root_computations": (statistics.mean(r["root_computations"]
                                              for r in runs)
                              if "root_computations" in runs[0] else None),
        "num_factors": runs[0].get("num_factors"),
        **{f"{c}_seconds": float(t[-1]) for c, t in clocks[m].items()},
        "compile_seconds": data["compile_seconds"][m],
        **{f"final_{k}": statistics.mean(v) for k, v in finals.items()},
        **{f"final_{k}_std": statistics.pstdev(v) for k, v in finals.items()}}
  target = summary[OFFICIAL]["final_train_loss"]
  for c in CLOCKS:
    budget = summary[ONE_SIDED_FOAM][f"{c}_seconds"]
    for m, s in summary.items():
      clock, curve = clocks[m][c], curves[m]
      eval_steps = data["runs"][m][0]["curve"]["step"]
      within = [i for i, step in enumerate(eval_steps)
                if _time_at(clock, step) <= budget]
      reached = [step for step, loss in zip(eval_steps, curve)
                 if loss <= target]
      s[f"{c}_budget_steps"] = int(np.sum(clock <= budget))
      s[f"{c}_budget_train_loss"] = float(curve[within[-1]])
      s[f"{c}_seconds_to_official_loss"] = (
          _time_at(clock, reached[0]) if reached else None)
  return summary


def _loss(s, key):
  return f"{s[key]:.4g} ± {s[key + '_std']:.2g}"


def _optional(value, spec):
  return "—" if value is None else format(value, spec)


def markdown(results, meta) -> str:
  load = lambda l: " / ".join(f"{x:.2f}" for x in l)
  lines = [
      "## One-sided FOAM against every-step ASGO", "",
      f"`{meta['command']}` on {meta['date'][:10]}: {meta['cpu_count']} CPU "
      f"cores, JAX {meta['jax']}, load average (1 / 5 / 15 min) "
      f"{load(meta['load_start'])} at the start, {load(meta['load_end'])} at "
      f"the end; {meta['rounds']} interleaved rounds (seeds 0.."
      f"{meta['rounds'] - 1}); times are medians over rounds, losses means ± "
      f"std over seeds; {meta['total_seconds'] / 60:.1f} min in all.", ""]
  for w, data in results.items():
    summary = data["summary"]
    lines += [
        f"### {w}: {data['description']}; {data['steps']} steps, "
        f"lr {data['lr']:g}", "",
        "| method | root computations | factors | wall s | CPU s | "
        "compile s | train loss | held-out loss |", "|---" * 8 + "|"]
    for m, s in summary.items():
      lines.append(
          f"| {m} | {_optional(s['root_computations'], '.0f')} | "
          f"{_optional(s['num_factors'], 'd')} | {s['wall_seconds']:.2f} | "
          f"{s['cpu_seconds']:.2f} | {s['compile_seconds']:.1f} | "
          f"{_loss(s, 'final_train_loss')} | {_loss(s, 'final_test_loss')} |")
    foam = summary[ONE_SIDED_FOAM]
    lines += [
        "", "At equal time, by the wall clock and by CPU time: steps done "
        "and train loss by one-sided FOAM's run time "
        f"({foam['wall_seconds']:.2f} s wall, {foam['cpu_seconds']:.2f} s "
        "CPU), and the time to every-step ASGO's final train loss "
        f"({summary[OFFICIAL]['final_train_loss']:.4g}; evaluated every "
        f"{data['runs'][OFFICIAL][0]['curve']['step'][1]} steps).", "",
        "| method | steps, wall | train loss, wall | s to ASGO's loss, wall "
        "| steps, CPU | train loss, CPU | s to ASGO's loss, CPU |",
        "|---" * 7 + "|"]
    for m, s in summary.items():
      lines.append(f"| {m} | " + " | ".join(
          f"{s[f'{c}_budget_steps']} | {s[f'{c}_budget_train_loss']:.4g} | "
          f"{_optional(s[f'{c}_seconds_to_official_loss'], '.2f')}"
          for c in CLOCKS) + " |")
    lines.append("")
  lines += [
      "### One-sided FOAM / every-step ASGO", "",
      "| workload | root computations | wall-clock | CPU time | "
      "train loss (ASGO's) | held-out loss (ASGO's) |", "|---" * 6 + "|"]
  for w, data in results.items():
    foam, asgo = data["summary"][ONE_SIDED_FOAM], data["summary"][OFFICIAL]
    lines.append(
        f"| {w} | {foam['root_computations'] / asgo['root_computations']:.3f}"
        f" | {foam['wall_seconds'] / asgo['wall_seconds']:.2f} | "
        f"{foam['cpu_seconds'] / asgo['cpu_seconds']:.2f} | "
        f"{foam['final_train_loss']:.4g} ({asgo['final_train_loss']:.4g}) | "
        f"{foam['final_test_loss']:.4g} ({asgo['final_test_loss']:.4g}) |")
  return "\n".join(lines) + "\n"


def main(argv=None):
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS),
                      choices=list(WORKLOADS))
  parser.add_argument("--methods", nargs="+", default=list(METHODS),
                      choices=list(METHODS),
                      help="asgo and asgo_foam always run")
  parser.add_argument("--steps", type=int, help="default: each workload's")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--lr", type=float,
                      help="one rate for every workload (default: "
                      + ", ".join(f"{w} {lr:g}"
                                  for w, lr in LEARNING_RATES.items()) + ")")
  parser.add_argument("--json", help="write the runs and figures here")
  args = parser.parse_args(argv)
  names = [m for m in METHODS
           if m in args.methods or m in (OFFICIAL, ONE_SIDED_FOAM)]
  meta = {"command": "python scripts/archive/asgo_comparison.py "
                     + shlex.join(sys.argv[1:] if argv is None else argv),
          "date": datetime.datetime.now().isoformat(timespec="seconds"),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "rounds": args.rounds, "load_start": os.getloadavg()}
  started = time.perf_counter()
  results = {}
  for w in args.workloads:
    data = run_workload(w, names, args.steps, args.rounds,
                        args.lr or LEARNING_RATES[w])
    data["summary"] = summarize(data)
    results[w] = data
  meta["load_end"] = os.getloadavg()
  meta["total_seconds"] = time.perf_counter() - started
  print(markdown(results, meta))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"meta": meta, "workloads": results}, f)
  return results


if __name__ == "__main__":
  main()
