"""Staggered checks on and off: final losses and eigendecomposition counts.

For each foam-bench workload and each paper-named optimizer (`foam`,
`shampoo` f=20, `soap`, with foam-bench's settings), trains every seed with
``stagger=False`` and ``stagger=True`` at one learning rate and prints a
Markdown table: final train loss mean ± std over seeds, the difference of
the means in units of the seed std, and fresh eigendecompositions (EVDs).

  python scripts/archive/stagger_comparison.py --seeds 3 --lr 1e-2
"""

import argparse
import functools
import statistics

import foam_optax as fo
from foam_optax.bench import optimizers, trainer, workloads

NAMES = ("foam", "shampoo_f20", "soap")


def run(workload_names, seeds, steps, lr):
  specs = optimizers.optimizer_specs()
  rows = []
  for w in workload_names:
    wl = workloads.WORKLOADS[w](**({"steps": steps} if steps else {}))
    for name in NAMES:
      base = specs[name]
      result = {}
      for stagger in (False, True):
        spec = optimizers.OptimizerSpec(
            name, functools.partial(_build, name, stagger), base.lr_grid,
            base.settings, True)
        compiled = trainer.Trainer(wl, spec)
        runs = [compiled.train(seed, wl.steps, lr)
                for seed in range(seeds)]
        result[stagger] = (
            [r["curve"]["train_loss"][-1] for r in runs],
            [r["stats"]["eigendecompositions"] for r in runs])
      rows.append((w, name, wl.steps, result))
  return rows


def _build(name, stagger, schedule):
  factory = {"foam": fo.foam, "shampoo_f20": fo.shampoo, "soap": fo.soap}[name]
  settings = optimizers.optimizer_specs()[name].settings
  return factory(learning_rate=schedule, stagger=stagger, **settings)


def table(rows, seeds, lr):
  lines = [
      f"| workload | optimizer | steps | train loss, stagger off | "
      f"train loss, stagger on | difference / seed std | EVDs off | EVDs on |",
      "|---|---|---|---|---|---|---|---|"]
  for w, name, steps, result in rows:
    (off, evd_off), (on, evd_on) = result[False], result[True]
    # Seed noise: the mean of the two settings' standard deviations.
    std = (statistics.pstdev(off) + statistics.pstdev(on)) / 2
    diff = statistics.mean(on) - statistics.mean(off)
    ratio = f"{diff / std:+.2f}" if std > 0 else "—"
    fmt = lambda xs: (f"{statistics.mean(xs):.4g} ± "
                      f"{statistics.pstdev(xs):.2g}")
    lines.append(
        f"| {w} | {name} | {steps} | {fmt(off)} | {fmt(on)} | {ratio} | "
        f"{statistics.mean(evd_off):.0f} | {statistics.mean(evd_on):.0f} |")
  lines.append("")
  lines.append(f"lr {lr:g} (after foam-bench's warmup), seeds 0..{seeds - 1}; "
               "seed std: mean of the two settings' "
               "population standard deviations over seeds.")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workloads", nargs="+",
                      default=list(workloads.WORKLOADS))
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, help="default: each workload's")
  parser.add_argument("--lr", type=float, default=1e-2)
  args = parser.parse_args()
  print(table(run(args.workloads, args.seeds, args.steps, args.lr),
              args.seeds, args.lr))


if __name__ == "__main__":
  main()
