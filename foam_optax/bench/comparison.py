"""`foam-bench` (the default suite): optimizers side by side.

AdamW, Muon, Shampoo at f = 1, 20 and 100, FOAM (the paper's settings and
tuned), SOAP and SOAP with FOAM's controller (`optimizers.DEFAULT_OPTIMIZERS`;
``--optimizers`` picks others, e.g. the ASGO family) on every workload of
`foam_optax.bench.workloads`. Per (workload, optimizer): a learning-rate
sweep (seed 0, a third of the steps, best final train loss; the grid
extended past an end while the best rate sits there, `trainer.sweep`), then
one run per seed at the chosen rate (`trainer.Trainer`). Reported: losses
and accuracy (mean ± std over seeds), steps and seconds to AdamW's final
train loss, EVDs, step times, compilation, state size, and the targets.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Optional

import numpy as np

from foam_optax.bench import harness, measure, optimizers, report, trainer
from foam_optax.bench import workloads

BLOCK = harness.Block("## Optimizer comparison (`foam-bench`)",
                      "<!-- bench:start -->", "<!-- bench:end -->")
SHAMPOO_FIXED = ("shampoo_f1", "shampoo_f20", "shampoo_f100")
EVAL_POINTS = 20   # evaluations per reported run (resolution of the target)


@dataclasses.dataclass(frozen=True)
class ComparisonConfig:
  """Sizes of the comparison (`FULL`) or of its smoke run (`QUICK`).

  Attributes:
    workloads: names in `workloads.WORKLOADS`.
    optimizers: names in `optimizers.optimizer_specs()`; AdamW always runs
      (its final loss is the target).
    seeds: runs per optimizer at the chosen learning rate (seeds 0, 1, ...).
    steps: training steps of every workload (None: each workload's own).
    sweep_steps: steps of each sweep run (None: a third of the steps, at
      least 10).
    fast_compile: compile with `measure.fast_compile()` (a smoke run's
      timings mean nothing).
  """

  workloads: tuple = tuple(workloads.WORKLOADS)
  optimizers: tuple = optimizers.DEFAULT_OPTIMIZERS
  seeds: int = 3
  steps: Optional[int] = None
  sweep_steps: Optional[int] = None
  fast_compile: bool = False


FULL = ComparisonConfig()
QUICK = ComparisonConfig(workloads=("quadratic_k1e2", "digits_mlp"),
                         optimizers=("adamw", "shampoo_f20", "foam"), seeds=2,
                         steps=40, fast_compile=True)


def benchmark_pair(workload: workloads.Workload,
                   spec: optimizers.OptimizerSpec, seeds, steps: int,
                   sweep_steps: int, progress: trainer.Progress = None,
                   compiler_options: Optional[dict] = None) -> dict:
  """Learning-rate sweep (seed `seeds[0]`, `sweep_steps`, `trainer.sweep`)
  then one run per seed at the chosen rate, evaluated
  `trainer.EVAL_POINTS` times; `compiler_options` go to XLA."""
  run = trainer.Trainer(workload, spec, compiler_options=compiler_options)
  lr, sweep = trainer.sweep(
      lambda lr: run.train(seeds[0], sweep_steps, lr, progress=progress)[
          "curve"]["train_loss"][-1],
      spec.lr_grid, progress=progress, steps=sweep_steps)
  eval_every = max(1, steps // EVAL_POINTS)
  runs = {str(seed): run.train(seed, steps, lr, eval_every=eval_every,
                               progress=progress)
          for seed in seeds}
  return {"optimizer": spec.name, "settings": spec.settings, "lr": lr,
          "sweep": sweep, "compile_seconds": run.compile_seconds,
          "runs": runs}


def _built(cfg: ComparisonConfig) -> dict:
  return {w: workloads.WORKLOADS[w](**({"steps": cfg.steps} if cfg.steps
                                       else {}))
          for w in cfg.workloads}


def _sweep_steps(cfg: ComparisonConfig, workload: workloads.Workload) -> int:
  return cfg.sweep_steps or max(10, workload.steps // 3)


def _names(cfg: ComparisonConfig) -> list:
  return ["adamw"] + [n for n in cfg.optimizers if n != "adamw"]


def units_of_work(cfg: ComparisonConfig) -> int:
  """Progress-bar units (steps) of `run`."""
  specs = optimizers.optimizer_specs()
  return sum((len(specs[n].lr_grid) + trainer.MAX_GRID_EXTENSIONS)
             * _sweep_steps(cfg, wl) + cfg.seeds * wl.steps
             for wl in _built(cfg).values() for n in _names(cfg) if n in specs)


def run(cfg: ComparisonConfig, context: harness.Context) -> dict:
  """Every (workload, optimizer) pair; returns the runs, each workload's
  summaries (the target: AdamW's mean final train loss) and the targets."""
  specs = optimizers.optimizer_specs()
  unknown = [name for name in cfg.optimizers if name not in specs]
  if unknown:
    raise SystemExit(f"unknown or unavailable optimizers: {unknown}; "
                     f"available: {list(specs)}")
  seeds = list(range(cfg.seeds))
  raw = {"workloads": {}}
  for w, wl in _built(cfg).items():
    results = {}
    for name in _names(cfg):
      context.describe(f"{w} {name}")
      results[name] = benchmark_pair(
          wl, specs[name], seeds, wl.steps, _sweep_steps(cfg, wl),
          context.progress, measure.compiler_options(cfg.fast_compile))
    target = summarize(results["adamw"], math.inf)["final_train_loss"]
    raw["workloads"][w] = {
        "description": wl.description, "steps": wl.steps,
        "sweep_steps": _sweep_steps(cfg, wl), "target_train_loss": target,
        "results": results,
        "summary": {n: summarize(r, target) for n, r in results.items()}}
  raw["targets"] = targets({w: d["summary"]
                            for w, d in raw["workloads"].items()})
  return raw


def _mean_std(values):
  values = [v for v in values if v is not None and math.isfinite(v)]
  if not values:
    return None, None
  return float(np.mean(values)), float(np.std(values))


def summarize(results: dict, target: float) -> dict:
  """Figures of one optimizer on one workload (mean and std over seeds).

  `target` is AdamW's mean final train loss. ``steps_to_target`` and
  ``seconds_to_target`` come from the seed-mean curve (None: not reached);
  the ``*_per_seed`` lists hold each seed's own first crossing.
  """
  runs = list(results["runs"].values())
  curves = [r["curve"] for r in runs]
  summary = {"lr": results["lr"]}
  for key in curves[0]:
    if key in ("step", "seconds"):
      continue
    mean, std = _mean_std([c[key][-1] for c in curves])
    summary[f"final_{key}"], summary[f"final_{key}_std"] = mean, std
  mean_curve = np.mean([c["train_loss"] for c in curves], axis=0)
  mean_seconds = np.mean([c["seconds"] for c in curves], axis=0)
  step, second = trainer.first_reach(curves[0]["step"], mean_seconds,
                                     mean_curve, target)
  summary["steps_to_target"] = step
  summary["seconds_to_target"] = None if second is None else float(second)
  per_seed = [trainer.first_reach(c["step"], c["seconds"], c["train_loss"],
                                  target)
              for c in curves]
  summary["steps_to_target_per_seed"] = [s for s, _ in per_seed]
  summary["seconds_to_target_per_seed"] = [t for _, t in per_seed]
  summary["train_seconds"], summary["train_seconds_std"] = _mean_std(
      [c["seconds"][-1] for c in curves])
  step_times = np.concatenate([r["trace"]["step_seconds"] for r in runs])
  summary["step_ms_median"] = float(1e3 * np.median(step_times))
  summary["step_ms_p95"] = float(1e3 * np.percentile(step_times, 95))
  if "stats" in runs[0]:
    summary["eigendecompositions"], summary["eigendecompositions_std"] = (
        _mean_std([r["stats"]["eigendecompositions"] for r in runs]))
  else:
    summary["eigendecompositions"] = summary["eigendecompositions_std"] = None
  summary["state_bytes"] = runs[0]["state_bytes"]
  summary["compile_seconds"] = results.get("compile_seconds")
  return summary


def targets(summaries: dict) -> dict:
  """The reported targets, evaluated on the summaries.

  `summaries`: workload -> optimizer -> `summarize` output. Each target is a
  dict with ``target`` (the statement), ``measured`` (the figures, as text),
  ``met`` and the figures themselves.
  """
  def seconds(w, name):
    value = summaries[w].get(name, {}).get("seconds_to_target")
    return math.inf if value is None else value

  speed = {}
  for w, s in summaries.items():
    if "foam" in s and "adamw" in s:
      ratio = seconds(w, "foam") / seconds(w, "adamw")
      speed[w] = {"foam_over_adamw_seconds": (ratio if math.isfinite(ratio)
                                              else None),
                  "met": ratio <= 0.8}
  evds = {}
  for w, s in summaries.items():
    if "foam" in s and "shampoo_f20" in s:
      ratio = s["foam"]["eigendecompositions"] / max(
          s["shampoo_f20"]["eigendecompositions"], 1.0)
      loss_ratio = (s["foam"]["final_train_loss"]
                    / s["shampoo_f20"]["final_train_loss"])
      evds[w] = {"evd_ratio": ratio, "loss_ratio": loss_ratio,
                 "met": ratio <= 0.2 and loss_ratio <= 1.01}
  speed_met = sum(v["met"] for v in speed.values())
  evds_met = sum(v["met"] for v in evds.values())
  result = {
      "foam_0.8x_adamw_wallclock_on_3_workloads": {
          "target": "FOAM reaches AdamW's final train loss in ≤ 0.8× "
                    "AdamW's wall-clock on at least 3 workloads",
          "measured": (f"met on {speed_met} of {len(speed)}; FOAM/AdamW "
                       "seconds: ") + ", ".join(
              f"{w} {report.fmt(v['foam_over_adamw_seconds'])}"
              for w, v in speed.items()),
          "per_workload": speed, "workloads_met": speed_met,
          "met": speed_met >= 3},
      "foam_evds_le_20pct_of_shampoo_f20_loss_within_1pct": {
          "target": "FOAM's eigendecompositions ≤ 20% of Shampoo f=20's at "
                    "final train loss within 1%, on every workload",
          "measured": "EVD ratio / loss ratio: " + ", ".join(
              f"{w} {v['evd_ratio']:.3g} / {v['loss_ratio']:.3g}"
              for w, v in evds.items()),
          "per_workload": evds, "workloads_met": evds_met,
          "met": bool(evds) and evds_met == len(evds)},
  }
  lm = summaries.get("transformer_lm", {})
  if "foam" in lm and all(n in lm for n in SHAMPOO_FIXED):
    foam_seconds = seconds("transformer_lm", "foam")
    fixed = {n: seconds("transformer_lm", n) for n in SHAMPOO_FIXED}
    result["foam_beats_fixed_shampoo_wallclock_on_transformer"] = {
        "target": "on transformer_lm FOAM reaches AdamW's loss in less "
                  "wall-clock than Shampoo at every fixed frequency",
        "measured": f"FOAM {_seconds(foam_seconds)}; " + ", ".join(
            f"{n} {_seconds(t)}" for n, t in fixed.items()),
        "per_frequency": {n: t > foam_seconds for n, t in fixed.items()},
        "met": math.isfinite(foam_seconds) and all(
            t > foam_seconds for t in fixed.values())}
  return result


def _seconds(value):
  return "not reached" if not math.isfinite(value) else f"{value:.2f} s"


def markdown(raw: dict) -> str:
  """Per-workload Markdown tables and the targets."""
  summaries = {w: d["summary"] for w, d in raw["workloads"].items()}
  descriptions = {w: d["description"] for w, d in raw["workloads"].items()}
  target_results = raw["targets"]
  lines = []
  for w, per_opt in summaries.items():
    adam_bytes = per_opt.get("adamw", {}).get("state_bytes")
    accuracy = "final_test_accuracy" in next(iter(per_opt.values()))
    lines += [f"### {w}", "", f"{descriptions[w]}", "",
              "| optimizer | lr | train loss | held-out loss"
              + (" | held-out acc" if accuracy else "")
              + " | steps to AdamW loss | s to AdamW loss | train s | EVDs"
              " | step ms median / p95 | compile s | state vs AdamW |",
              "|---" * (11 + accuracy) + "|"]
    for name, s in per_opt.items():
      row = [name, report.fmt(s["lr"], ".0e"),
             report.fmt(s["final_train_loss"], ".4g",
                        s["final_train_loss_std"]),
             report.fmt(s["final_test_loss"], ".4g", s["final_test_loss_std"])]
      if accuracy:
        row.append(report.fmt(s["final_test_accuracy"], ".3f",
                        s["final_test_accuracy_std"]))
      row += [report.fmt(s["steps_to_target"], "d"),
              report.fmt(s["seconds_to_target"], ".2f"),
              report.fmt(s["train_seconds"], ".2f"),
              report.fmt(s["eigendecompositions"], ".0f"),
              f"{s['step_ms_median']:.2f} / {s['step_ms_p95']:.2f}",
              report.fmt(s.get("compile_seconds"), ".2f"),
              report.fmt(s["state_bytes"] / adam_bytes if adam_bytes
                         else None, ".2f")]
      lines.append("| " + " | ".join(row) + " |")
    lines.append("")
  lines += ["### Targets", "", report.targets_table(target_results)]
  return "\n".join(lines)


def plot(raw: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Loss vs step and vs wall-clock, and FOAM damping/EVD events, per
  workload."""
  plt = report.pyplot()
  paths = []
  for w, data in raw["workloads"].items():
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=70)
    for name, res in data["results"].items():
      curves = [r["curve"] for r in res["runs"].values()]
      loss = np.array([c["train_loss"] for c in curves])
      for ax, x in ((axes[0], np.array(curves[0]["step"])),
                    (axes[1], np.mean([c["seconds"] for c in curves], axis=0))):
        line, = ax.plot(x, loss.mean(0), label=name, lw=1.2)
        ax.fill_between(x, loss.min(0), loss.max(0), color=line.get_color(),
                        alpha=0.15)
    for ax, label in zip(axes, ("step", "wall-clock seconds (steps only)")):
      ax.set_yscale("log")
      ax.set_xlabel(label)
      ax.set_ylabel("train loss")
    axes[1].legend(fontsize=6)
    fig.suptitle(w, fontsize=9)
    paths.append(report.save_figure(fig, out_dir / f"{w}_loss.png"))

    foam_like = {n: r for n, r in data["results"].items()
                 if "damping_max" in next(iter(r["runs"].values()))["trace"]}
    if not foam_like:
      continue
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=70)
    for name, res in foam_like.items():
      trace = next(iter(res["runs"].values()))["trace"]
      steps = np.arange(1, len(trace["damping_max"]) + 1)
      if name.startswith("foam"):
        axes[0].plot(steps, trace["damping_max"], label=name, lw=1.2)
      axes[1].plot(steps, trace["eigendecompositions"], label=name, lw=1.2)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("max damping ε over factors")
    axes[1].set_ylabel("cumulative fresh EVDs")
    for ax in axes:
      ax.set_xlabel("step (seed 0)")
      ax.legend(fontsize=6)
    fig.suptitle(f"{w}: FOAM damping and eigendecompositions", fontsize=9)
    paths.append(report.save_figure(fig, out_dir / f"{w}_foam.png"))
  return paths


SUITE = harness.Suite(
    name="default",
    help="optimizers side by side on six workloads, 3 seeds each (about "
         "6 min on 2 CPU cores)",
    presets={"full": FULL, "quick": QUICK}, run=run,
    units_of_work=units_of_work, seeds=lambda cfg: list(range(cfg.seeds)),
    markdown=markdown, plot=plot, block=lambda cfg: BLOCK, out="bench_out",
    caption=lambda raw: (f"Figures are means ± std over seeds "
                         f"{raw['meta']['seeds']}."),
    options=(
        harness.Option(("--workloads",), "workloads", dict(
            nargs="+", choices=list(workloads.WORKLOADS),
            help="default: all")),
        harness.Option(("--optimizers",), "optimizers", dict(
            nargs="+", help="default: " + " ".join(
                optimizers.DEFAULT_OPTIMIZERS) + " (available: "
            "adds foam_one_sided, asgo, asgo_foam, dasgo, and "
            "distributed_shampoo_f20 when precondition-opt is installed)")),
        harness.Option(("--seeds",), "seeds", dict(
            type=int, help="seeds per run (default 3)")),
        harness.Option(("--steps",), "steps", dict(
            type=int, help="training steps for every workload (default: "
                           "each workload's own, 150-200)")),
        harness.Option(("--sweep-steps",), "sweep_steps", dict(
            type=int, help="steps of each learning-rate sweep run "
                           "(default: a third of --steps)")),
    ))
