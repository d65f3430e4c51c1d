"""Wall-clock evidence on an accelerator: time to Shampoo f=20's final loss.

Trains one character Transformer LM (`foam_optax.bench.workloads`, on
`pydoc_data.topics`) with AdamW, Shampoo f = 20 and f = 100, FOAM (the
paper's configuration) and SOAP, in that order after Shampoo f = 20 (whose
final train loss is the target), and reports for each: seconds to the
target, EVDs, final loss, step times and compile time, with wall-clock
Pareto plots. This is the regime FOAM is for: on an H200 an `eigh` costs
27-64 products of its size (BENCHMARKS.md, "GPU").

Every run writes ``gpu_evidence.json`` again when it ends, so a run cut
short still leaves every finished method. ``--time-limit`` (seconds since
start, compilation included) stops a run between two steps once passed (it
is recorded with ``"truncated": true``) and starts no further method; the
report marks the methods never started. Learning rates are fixed per
method (``--lr NAME=VALUE`` overrides). The ``gpu`` preset uses 3e-3 for
every method: the scale suite's rate for Shampoo and FOAM on its d_model 128
Transformer (the best of 1e-3 to 3e-2), not tuned on this model.

  python scripts/gpu_evidence.py --out gpu_evidence_out            # GPU, ~5.5 min
  python scripts/gpu_evidence.py --preset tiny --out /tmp/gpu_tiny # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import numpy as np

from foam_optax.bench import optimizers, runner, workloads

METHODS = ("shampoo_f20", "foam", "adamw", "shampoo_f100", "soap")
TARGET_METHOD = "shampoo_f20"


@dataclasses.dataclass(frozen=True)
class Preset:
  """Model, run length and time limit."""

  d_model: int
  num_layers: int
  mlp_width: int
  seq_len: int
  batch_size: int
  steps: int
  eval_every: int
  time_limit: float
  lrs: dict


PRESETS = {
    # GPT-2-small-like in shape, sized so that five methods (compilation
    # included) fit in about 5.5 minutes on one H200.
    "gpu": Preset(d_model=512, num_layers=6, mlp_width=2048, seq_len=256,
                  batch_size=16, steps=600, eval_every=20, time_limit=330.0,
                  lrs=dict.fromkeys(METHODS, 3e-3)),
    "tiny": Preset(d_model=32, num_layers=1, mlp_width=64, seq_len=16,
                   batch_size=4, steps=30, eval_every=5, time_limit=600.0,
                   lrs=dict.fromkeys(METHODS, 1e-2)),
}


def train(trainer: runner.Trainer, steps: int, lr: float, eval_every: int,
          deadline: float) -> dict:
  """Seed-0 run; step times exclude evaluation. Stops between two steps
  once `deadline` (a `time.perf_counter` value) has passed."""
  params, opt_state = trainer.init(0)
  batches = trainer.workload.sample_batches(0, steps)
  curve = {"step": [0], "seconds": [0.0],
           "train_loss": [float(trainer.evaluate(params)["train_loss"])]}
  step_seconds, evds = [], None
  for i in range(steps):
    if time.perf_counter() > deadline:
      break
    batch = jax.tree.map(lambda b: b[i], batches)
    tic = time.perf_counter()
    params, opt_state, trace = jax.block_until_ready(
        trainer.step(params, opt_state, batch, jnp.float32(lr)))
    step_seconds.append(time.perf_counter() - tic)
    evds = trace.get("eigendecompositions", evds)
    if (i + 1) % eval_every == 0 or i + 1 == steps:
      curve["step"].append(i + 1)
      curve["seconds"].append(float(sum(step_seconds)))
      curve["train_loss"].append(
          float(trainer.evaluate(params)["train_loss"]))
  times = np.array(step_seconds) * 1e3
  return {"lr": lr, "steps_done": len(step_seconds),
          "truncated": len(step_seconds) < steps, "curve": curve,
          "final_train_loss": curve["train_loss"][-1],
          "train_seconds": float(sum(step_seconds)),
          "step_ms_median": float(np.median(times)) if len(times) else None,
          "step_ms_mean": float(np.mean(times)) if len(times) else None,
          "step_ms_max": float(np.max(times)) if len(times) else None,
          "eigendecompositions": None if evds is None else float(evds)}


def run_method(workload, spec, lr: float, preset: Preset,
               deadline: float) -> dict:
  """Compiles and trains one method; its record for the report."""
  trainer = runner.Trainer(workload, spec)
  compile_seconds = trainer.compile()
  run = train(trainer, preset.steps, lr, preset.eval_every, deadline)
  return {**run, "compile_seconds": compile_seconds,
          "settings": spec.settings}


def seconds_to(curve: dict, target: float):
  for loss, seconds in zip(curve["train_loss"], curve["seconds"]):
    if loss <= target:
      return seconds
  return None


def summarize(report: dict) -> None:
  """Adds the target, each method's seconds to it and the verdict."""
  runs = report["runs"]
  reference = runs.get(TARGET_METHOD)
  if reference is None or reference["truncated"]:
    report["target_train_loss"] = None
    return
  target = reference["final_train_loss"]
  report["target_train_loss"] = target
  for run in runs.values():
    run["seconds_to_target"] = seconds_to(run["curve"], target)
  foam = runs.get("foam", {}).get("seconds_to_target")
  fixed = {n: runs[n].get("seconds_to_target")
           for n in ("shampoo_f20", "shampoo_f100") if n in runs}
  report["foam_faster_than_fixed_f"] = (
      None if "foam" not in runs or len(fixed) < 2 else
      foam is not None and all(s is None or foam < s for s in fixed.values()))


def markdown(report: dict) -> str:
  m = report["meta"]
  fmt = lambda v, spec: "—" if v is None else format(v, spec)
  lines = [f"Devices {', '.join(m['devices'])}, JAX {m['jax']}; "
           f"{m['workload']}; {m['steps']} steps, seed 0; time limit "
           f"{m['time_limit']:.0f} s. Target: {TARGET_METHOD}'s final train "
           f"loss ({fmt(report.get('target_train_loss'), '.4f')}).", "",
           "| method | lr | steps done | final train loss | s to target | "
           "train s | EVDs | step ms median / mean / max | compile s |",
           "|---|---|---|---|---|---|---|---|---|"]
  for name in report["methods"]:
    run = report["runs"].get(name)
    if run is None:
      lines.append(f"| {name} | — | not run | | | | | | |")
      continue
    lines.append(
        f"| {name} | {run['lr']:g} | {run['steps_done']}"
        f"{' (cut)' if run['truncated'] else ''} | "
        f"{run['final_train_loss']:.4f} | "
        f"{fmt(run.get('seconds_to_target'), '.1f')} | "
        f"{run['train_seconds']:.1f} | {fmt(run['eigendecompositions'], '.0f')}"
        f" | {fmt(run['step_ms_median'], '.1f')} / "
        f"{fmt(run['step_ms_mean'], '.1f')} / {fmt(run['step_ms_max'], '.1f')}"
        f" | {run['compile_seconds']:.1f} |")
  verdict = report.get("foam_faster_than_fixed_f")
  lines += ["", "FOAM reaches the target in less wall-clock than Shampoo "
            "f = 20 and f = 100: " + {True: "yes", False: "no",
                                      None: "not measured"}[verdict] + "."]
  return "\n".join(lines) + "\n"


def plot(report: dict, out: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=70)
  for name, run in report["runs"].items():
    curve = run["curve"]
    axes[0].plot(curve["seconds"], curve["train_loss"], label=name, lw=1.2)
    axes[1].scatter(run["train_seconds"], run["final_train_loss"], s=20)
    axes[1].annotate(name, (run["train_seconds"], run["final_train_loss"]),
                     fontsize=7)
  if report.get("target_train_loss") is not None:
    axes[0].axhline(report["target_train_loss"], color="k", lw=0.6, ls="--")
  axes[0].set_yscale("log")
  axes[0].set_xlabel("wall-clock seconds (steps only)")
  axes[0].set_ylabel("train loss")
  axes[0].legend(fontsize=6)
  axes[1].set_xlabel("train seconds")
  axes[1].set_ylabel("final train loss")
  fig.suptitle("Wall-clock Pareto", fontsize=9)
  fig.tight_layout()
  fig.savefig(out / "gpu_evidence.png")
  plt.close(fig)


def write(report: dict, out: pathlib.Path) -> None:
  summarize(report)
  (out / "gpu_evidence.json").write_text(json.dumps(report, indent=1))
  (out / "gpu_evidence.md").write_text(markdown(report))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--preset", choices=list(PRESETS), default="gpu")
  parser.add_argument("--out", required=True)
  parser.add_argument("--methods", nargs="+", choices=METHODS,
                      default=list(METHODS))
  parser.add_argument("--time-limit", type=float,
                      help="seconds (default: the preset's)")
  parser.add_argument("--lr", action="append", default=[],
                      metavar="NAME=VALUE", help="learning rate of a method")
  args = parser.parse_args(argv)
  preset = PRESETS[args.preset]
  lrs = dict(preset.lrs)
  for item in args.lr:
    name, value = item.split("=")
    lrs[name] = float(value)
  limit = preset.time_limit if args.time_limit is None else args.time_limit
  started = time.perf_counter()
  deadline = started + limit
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  workload = workloads.transformer_lm(
      steps=preset.steps, d_model=preset.d_model, mlp_width=preset.mlp_width,
      num_layers=preset.num_layers, seq_len=preset.seq_len,
      batch_size=preset.batch_size, name="transformer_lm_gpu")
  specs = optimizers.optimizer_specs()
  report = {"meta": {"command": "python scripts/gpu_evidence.py "
                                + " ".join(sys.argv[1:] if argv is None
                                           else argv),
                     "devices": [str(d) for d in jax.devices()],
                     "jax": jax.__version__, "python": platform.python_version(),
                     "preset": args.preset, "workload": workload.description,
                     "steps": preset.steps, "time_limit": limit},
            "methods": args.methods, "runs": {}}
  for name in args.methods:
    if time.perf_counter() > deadline:
      break
    run = run_method(workload, specs[name], lrs[name], preset, deadline)
    report["runs"][name] = run
    report["meta"]["elapsed_seconds"] = time.perf_counter() - started
    write(report, out)
    print(f"{name}: {run['steps_done']} steps, final train loss "
          f"{run['final_train_loss']:.4f}", file=sys.stderr, flush=True)
  write(report, out)
  plot(report, out)
  print(markdown(report))
  return report


if __name__ == "__main__":
  main()
