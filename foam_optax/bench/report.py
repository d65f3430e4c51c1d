"""Summary figures, targets, Markdown table, plots and the BENCHMARKS.md block."""

from __future__ import annotations

import math
import pathlib
import re
import shutil

import numpy as np

START_MARKER = "<!-- bench:start -->"
END_MARKER = "<!-- bench:end -->"
SHAMPOO_FIXED = ("shampoo_f1", "shampoo_f20", "shampoo_f100")


def _first_reach(steps, seconds, losses, target):
  """(step, seconds) of the first evaluation with loss <= target, else None."""
  for step, second, loss in zip(steps, seconds, losses):
    if loss <= target:
      return step, second
  return None, None


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
  step, second = _first_reach(curves[0]["step"], mean_seconds, mean_curve, target)
  summary["steps_to_target"] = step
  summary["seconds_to_target"] = None if second is None else float(second)
  per_seed = [_first_reach(c["step"], c["seconds"], c["train_loss"], target)
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
      speed[w] = {"foam_over_adamw_seconds": ratio if math.isfinite(ratio) else None,
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
              f"{w} {_fmt(v['foam_over_adamw_seconds'])}"
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


def targets_table(target_results: dict) -> str:
  """Markdown table ``target | measured | met/missed`` of `targets` output."""
  lines = ["| target | measured | met/missed |", "|---|---|---|"]
  for result in target_results.values():
    lines.append(f"| {result['target']} | {result['measured']} | "
                 f"{'met' if result['met'] else 'missed'} |")
  return "\n".join(lines) + "\n"


def _fmt(value, spec=".3g", std=None):
  if value is None:
    return "—"
  text = format(value, spec)
  return text if std is None else f"{text} ± {format(std, spec)}"


def markdown(summaries: dict, target_results: dict, descriptions: dict) -> str:
  """Per-workload Markdown tables and the targets."""
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
      row = [name, _fmt(s["lr"], ".0e"),
             _fmt(s["final_train_loss"], ".4g", s["final_train_loss_std"]),
             _fmt(s["final_test_loss"], ".4g", s["final_test_loss_std"])]
      if accuracy:
        row.append(_fmt(s["final_test_accuracy"], ".3f",
                        s["final_test_accuracy_std"]))
      row += [_fmt(s["steps_to_target"], "d"),
              _fmt(s["seconds_to_target"], ".2f"),
              _fmt(s["train_seconds"], ".2f"),
              _fmt(s["eigendecompositions"], ".0f"),
              f"{s['step_ms_median']:.2f} / {s['step_ms_p95']:.2f}",
              _fmt(s.get("compile_seconds"), ".2f"),
              _fmt(s["state_bytes"] / adam_bytes if adam_bytes else None, ".2f")]
      lines.append("| " + " | ".join(row) + " |")
    lines.append("")
  lines += ["### Targets", "", targets_table(target_results)]
  return "\n".join(lines)


def plot(raw: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """Loss vs step and vs wall-clock, and FOAM damping/EVD events, per workload."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

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
    fig.tight_layout()
    paths.append(out_dir / f"{w}_loss.png")
    fig.savefig(paths[-1])
    plt.close(fig)

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
    fig.tight_layout()
    paths.append(out_dir / f"{w}_foam.png")
    fig.savefig(paths[-1])
    plt.close(fig)
  return paths


def update_benchmarks_md(path: pathlib.Path, block: str,
                         figures: list[pathlib.Path],
                         figures_dir: pathlib.Path,
                         markers: tuple = (START_MARKER, END_MARKER)) -> None:
  """Replaces the text between `markers` in `path` (appending the markers
  if absent) and copies `figures` into `figures_dir`."""
  start_marker, end_marker = markers
  figures_dir.mkdir(parents=True, exist_ok=True)
  for figure in figures:
    shutil.copy(figure, figures_dir / figure.name)
  text = path.read_text() if path.exists() else "# Benchmarks\n"
  new_block = f"{start_marker}\n{block.rstrip()}\n{end_marker}"
  pattern = re.compile(re.escape(start_marker) + ".*?" + re.escape(end_marker),
                       re.DOTALL)
  if pattern.search(text):
    text = pattern.sub(lambda _: new_block, text)
  else:
    text = text.rstrip() + "\n\n" + new_block + "\n"
  path.write_text(text)
