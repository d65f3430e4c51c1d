"""`foam-bench --suite bias`: bias-corrected optimizers against their
uncorrected selves, at equal steps.

The corrections of "Correcting Stochastic Update Bias in Preconditioned
Language Model Optimizers" (arXiv 2605.20756) need the gradients of each
microbatch of a step. Every corrected method here trains with
``fo.microbatch_grads(loss_fn, params, batch, num_microbatches)`` and
``tx.update(grads, state, params, microbatch_grads=micro)``; its uncorrected
self trains with ``jax.value_and_grad`` on the same batch, from the same
initial parameters and the same batches per seed, so that each seed gives a
paired difference.

Pairs (each corrected method's uncorrected self in brackets):
``fo.bias_corrected_adamw`` leave-one-out and two-group [``optax.adamw``],
``fo.shampoo`` with ``bias_correction='cross_fit_variance'`` and
``'cross_fit'`` [``fo.shampoo``], ``fo.foam`` with ``'cross_fit_variance'``
[``fo.foam``], ``fo.soap`` with ``'cross_fit'`` [``fo.soap``]. Each family's
peak learning rate is swept for the uncorrected method (on a seed not among
the reported ones) and used for the corrected ones too. A control,
``adamw_first_half`` [``optax.adamw``], trains ``optax.adamw`` on the first
half of each batch: the data that a cross-fitted numerator (momentum) sees.

Reported per method: held-out loss over seeds, the paired differences
corrected - uncorrected, the median step time, the compiled step's memory
(XLA's buffer sizes), and the cost of the per-microbatch gradients alone.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Callable, Literal, Optional, cast

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

import foam_optax as fo
from foam_optax.bench import harness, measure, optimizers, report, trainer
from foam_optax.bench import workloads

BLOCK = harness.Block("### The run (`foam-bench --suite bias`)",
                      "<!-- bench-bias:start -->", "<!-- bench-bias:end -->")
# The paper's AdamW betas and epsilon, shared by each AdamW pair.
ADAM_SETTINGS = dict(b1=0.9, b2=0.95, eps=1e-8,
                     weight_decay=optimizers.WEIGHT_DECAY)
WARMUP_STEPS = 10


@dataclasses.dataclass(frozen=True)
class Method:
  """One optimizer of the suite.

  Attributes:
    name: identifier in the report.
    family: the learning-rate sweep it shares (the uncorrected method's).
    factory: ``factory(learning_rate=..., **settings)`` builds it.
    settings: its hyperparameters, recorded in the report.
    baseline: the method it is compared with seed by seed (its uncorrected
      self); None for an uncorrected method.
    first_half_only: a control, not a correction: the baseline's optimizer
      trained on the first half of each batch only, the data a
      cross-fitted numerator sees.
  """

  name: str
  family: str
  factory: Callable[..., optax.GradientTransformation]
  settings: dict
  baseline: Optional[str] = None
  first_half_only: bool = False

  @property
  def corrected(self) -> bool:
    """Whether it takes per-microbatch gradients."""
    return self.baseline is not None and not self.first_half_only

  @property
  def spec(self) -> optimizers.OptimizerSpec:
    """The optimizer (`fo.stats` applies to the Shampoo family's)."""
    return optimizers.make_spec(
        self.name, self.factory, self.settings, grid=(),
        foam_family=self.factory in (fo.shampoo, fo.foam, fo.soap))


def methods() -> list[Method]:
  """The suite's methods, each uncorrected one before its corrected ones
  (and AdamW's first-half control).

  The Shampoo family uses the default suite's settings (`shampoo_f20`,
  `foam` and `soap` there).
  """
  shampoo = optimizers._shampoo_settings(20)
  return [
      Method("adamw", "adamw", optax.adamw, ADAM_SETTINGS),
      Method("adamw_loo", "adamw", fo.bias_corrected_adamw,
             dict(ADAM_SETTINGS, method="leave_one_out"), "adamw"),
      Method("adamw_two_group", "adamw", fo.bias_corrected_adamw,
             dict(ADAM_SETTINGS, method="two_group"), "adamw"),
      Method("adamw_first_half", "adamw", optax.adamw, ADAM_SETTINGS,
             "adamw", first_half_only=True),
      Method("shampoo", "shampoo", fo.shampoo, shampoo),
      Method("shampoo_cfv", "shampoo", fo.shampoo,
             dict(shampoo, bias_correction="cross_fit_variance"), "shampoo"),
      Method("shampoo_cf", "shampoo", fo.shampoo,
             dict(shampoo, bias_correction="cross_fit"), "shampoo"),
      Method("foam", "foam", fo.foam, optimizers.FOAM_PAPER),
      Method("foam_cfv", "foam", fo.foam,
             dict(optimizers.FOAM_PAPER, bias_correction="cross_fit_variance"),
             "foam"),
      Method("soap", "soap", fo.soap, optimizers.SOAP_SETTINGS),
      Method("soap_cf", "soap", fo.soap,
             dict(optimizers.SOAP_SETTINGS, bias_correction="cross_fit"),
             "soap"),
  ]


@dataclasses.dataclass(frozen=True)
class BiasConfig:
  """Sizes of the bias suite (`FULL`) or of its smoke run (`QUICK`).

  Attributes:
    make_workload: () -> the workload (one with a held-out split).
    steps: training steps of every reported run.
    seeds: the reported seeds; every method runs each of them.
    sweep_seed: the seed of the learning-rate sweep, not a reported one.
    sweep_steps: steps of each sweep run (its own warmup and cosine).
    lr_grid: peak learning rates swept for each uncorrected method.
    max_grid_extensions: extra sweep points past an end of the grid while
      the best rate sits there.
    num_microbatches: microbatches per step of the corrected methods.
    timing_repeats: alternated repeats of the gradient-cost timing.
    fast_compile: compile with `measure.fast_compile()` (a smoke run's
      timings mean nothing).
  """

  make_workload: Callable[[], workloads.Workload]
  steps: int
  seeds: tuple
  sweep_seed: int
  sweep_steps: int
  lr_grid: tuple
  max_grid_extensions: int = 2
  num_microbatches: int = 8
  timing_repeats: int = 30
  fast_compile: bool = False


def bias_workload() -> workloads.Workload:
  """The default suite's char Transformer LM (last 10% of the text held
  out): batch 16, i.e. 8 microbatches of 2 sequences of 64 characters;
  held-out loss on 256 fixed windows."""
  return workloads.transformer_lm(steps=200, batch_size=16,
                                  eval_sequences=256)


def digits_linear(steps: int) -> workloads.Workload:
  """A linear classifier on scikit-learn digits (batch 128, held-out
  split): one 64 x 10 matrix, the smallest model every method preconditions
  (compilation dominates the smoke run)."""
  return workloads._digits_workload(
      "digits_linear", "linear classifier 64-10 on sklearn digits",
      lambda seed: nnx.Linear(64, 10, rngs=nnx.Rngs(seed)),
      reconstruct=False, steps=steps)


FULL = BiasConfig(make_workload=bias_workload, steps=200,
                  seeds=(0, 1, 2, 3, 4), sweep_seed=100, sweep_steps=100,
                  lr_grid=optimizers.ADAM_GRID)
# Smoke run: a few steps past the Shampoo family's first check (step 20).
QUICK = BiasConfig(make_workload=lambda: digits_linear(steps=24), steps=24,
                   seeds=(0, 1), sweep_seed=100, sweep_steps=24,
                   lr_grid=(1e-2, 3e-2), max_grid_extensions=0,
                   timing_repeats=5, fast_compile=True)


def unit_learning_rates(steps: int) -> np.ndarray:
  """Per step, the learning rate at a unit peak: linear warmup from 0 over
  `WARMUP_STEPS`, then a cosine decay to 0 at `steps`.

  Starting at 0, as the paper's runs (Hugging Face's cosine schedule with
  warmup), matters for the leave-one-out AdamW: with no second moment yet,
  its first step divides each fold's gradient by the magnitude of the other
  folds' mean, which can be near 0 in any coordinate (measured: entries up
  to 8e4 at a unit rate; Adam's first step is ±1).
  """
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, 1.0, WARMUP_STEPS, max(steps, WARMUP_STEPS + 1), 0.0)
  return np.asarray([schedule(i) for i in range(steps)], np.float32)


def _first_half(batch):
  """The first half of each batch (the control's data)."""
  return jax.tree.map(lambda b: b[:b.shape[0] // 2], batch)


def compile_method(workload: workloads.Workload, method: Method,
                   num_microbatches: int, evaluate,
                   compiler_options: Optional[dict] = None) -> trainer.Trainer:
  """`method`'s compiled train step: at a unit learning rate, its updates
  multiplied by the step's rate (`trainer.Trainer`); a corrected method
  gets `num_microbatches` microbatch gradients; `evaluate` is shared;
  `compiler_options` go to XLA."""
  return trainer.Trainer(
      workload, method.spec, unit_learning_rate=1.0,
      microbatches=num_microbatches if method.corrected else None,
      batch_transform=_first_half if method.first_half_only else None,
      trace_stats=False, evaluate=evaluate, compiler_options=compiler_options)


def train(compiled: trainer.Trainer, seed: int, steps: int, peak_lr: float,
          progress: trainer.Progress = None) -> dict:
  """Trains `steps` steps from `seed` at `peak_lr` (warmup and cosine,
  `unit_learning_rates`).

  Returns the final ``train_loss`` and ``test_loss`` (the workload's fixed
  sets), per step the minibatch ``losses`` and ``step_seconds``,
  ``state_bytes`` and, for the Shampoo family, the final
  ``eigendecompositions``.
  """
  run = compiled.train(seed, steps, peak_lr, schedule=unit_learning_rates,
                       progress=progress)
  result = {"train_loss": run["curve"]["train_loss"][-1],
            "test_loss": run["curve"]["test_loss"][-1],
            "losses": run["trace"]["loss"],
            "step_seconds": run["trace"]["step_seconds"],
            "state_bytes": run["state_bytes"]}
  if "stats" in run:
    result["eigendecompositions"] = run["stats"]["eigendecompositions"]
  return result


def gradient_cost(workload: workloads.Workload, num_microbatches: int,
                  repeats: int, compiler_options: Optional[dict] = None
                  ) -> dict:
  """The full-batch gradient against the per-microbatch ones, alone:
  median milliseconds over `repeats` alternated calls, and XLA's buffer
  sizes (the outputs hold the `num_microbatches` gradients);
  `compiler_options` go to XLA."""
  params = workload.init_params(0)
  batch = jax.tree.map(lambda b: b[0], workload.sample_batches(0, 1))
  functions = {
      "value_and_grad": jax.value_and_grad(workload.loss_fn),
      "microbatch_grads": lambda p, b: fo.microbatch_grads(
          workload.loss_fn, p, b, num_microbatches)}
  compiled = {name: measure.lower_and_compile(f, params, batch,
                                              **(compiler_options or {}))[0]
              for name, f in functions.items()}
  for f in compiled.values():
    jax.block_until_ready(f(params, batch))
  seconds = {name: [] for name in compiled}
  for _ in range(repeats):
    for name, f in compiled.items():
      seconds[name].append(measure.call_timed(f, params, batch)[1])
  param_bytes = measure.tree_bytes(params)
  return {"num_microbatches": num_microbatches, "param_bytes": param_bytes,
          "microbatch_grads_bytes": num_microbatches * param_bytes,
          **{name: {"ms_median": float(1e3 * np.median(seconds[name])),
                    "memory": measure.memory(compiled[name])}
             for name in compiled}}


def sweep(compiled: trainer.Trainer, cfg: BiasConfig, progress) -> dict:
  """The uncorrected method's peak learning rate (`trainer.sweep` over
  `cfg.lr_grid`, at most `cfg.max_grid_extensions` extensions): the best
  final train loss of the sweep seed wins."""
  lr, runs = trainer.sweep(
      lambda lr: train(compiled, cfg.sweep_seed, cfg.sweep_steps, lr,
                       progress)["train_loss"],
      cfg.lr_grid, max_extensions=cfg.max_grid_extensions, progress=progress,
      steps=cfg.sweep_steps)
  return {"lr": lr, "seed": cfg.sweep_seed, "runs": runs}


def _spread(values) -> dict:
  """Mean, sample standard deviation (ddof 1) and standard error."""
  values = np.asarray(values, np.float64)
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return {"mean": float(np.mean(values)), "std": std,
          "se": std / math.sqrt(len(values))}


def summarize(result: dict) -> dict:
  """A method's figures over its seeds."""
  runs = list(result["runs"].values())
  step_seconds = np.concatenate([r["step_seconds"] for r in runs])
  summary = {"lr": result["lr"],
             "test_loss": _spread([r["test_loss"] for r in runs]),
             "train_loss": _spread([r["train_loss"] for r in runs]),
             "step_ms_median": float(1e3 * np.median(step_seconds)),
             "state_bytes": runs[0]["state_bytes"],
             "memory_bytes": (result["memory"] or {}).get("total_bytes"),
             "compile_seconds": result["compile_seconds"]}
  if "eigendecompositions" in runs[0]:
    summary["eigendecompositions"] = float(np.mean(
        [r["eigendecompositions"] for r in runs]))
  return summary


def paired(method: dict, baseline: dict) -> dict:
  """Per seed, `method` - `baseline` final held-out (and train) loss, over
  the seeds both ran, with their spread."""
  seeds = sorted(set(method["runs"]) & set(baseline["runs"]), key=int)
  diff = lambda key: [method["runs"][s][key] - baseline["runs"][s][key]
                      for s in seeds]
  held_out, train = diff("test_loss"), diff("train_loss")
  return {"seeds": [int(s) for s in seeds], "test_loss_differences": held_out,
          "test_loss_difference": _spread(held_out),
          "train_loss_differences": train,
          "train_loss_difference": _spread(train)}


def _beyond_noise(spread: dict) -> bool:
  """Whether a mean difference is more than two standard errors from 0."""
  return abs(spread["mean"]) > 2 * spread["se"]


def targets(pairs: dict, summaries: dict) -> dict:
  """Per corrected method: its paired held-out loss against its uncorrected
  self's, and its step time against twice the uncorrected step's."""
  result = {}
  for name, pair in pairs.items():
    if not pair["corrected"]:
      continue
    base = pair["baseline"]
    d = pair["test_loss_difference"]
    noise = ("beyond 2 SE" if _beyond_noise(d) else "within noise, < 2 SE")
    result[f"{name}_held_out_le_{base}"] = {
        "target": f"{name}: held-out loss ≤ {base}'s (paired, mean over "
                  f"{len(pair['seeds'])} seeds)",
        "measured": f"Δ = {d['mean']:+.4f} ± {d['std']:.4f} (SE "
                    f"{d['se']:.4f}; {noise})",
        "difference": d["mean"], "met": d["mean"] <= 0}
    ratio = (summaries[name]["step_ms_median"]
             / summaries[base]["step_ms_median"])
    result[f"{name}_step_time_le_2x_{base}"] = {
        "target": f"{name}: median step time ≤ 2× {base}'s",
        "measured": f"{ratio:.2f}×", "ratio": ratio, "met": ratio <= 2.0}
  return result


def units_of_work(cfg: BiasConfig) -> int:
  """Progress-bar units (training steps) of `run`."""
  suite = methods()
  families = sum(m.baseline is None for m in suite)
  sweep_runs = families * (len(cfg.lr_grid) + cfg.max_grid_extensions)
  return sweep_runs * cfg.sweep_steps + len(suite) * len(cfg.seeds) * cfg.steps


def run(cfg: BiasConfig, context: harness.Context) -> dict:
  """Sweeps each uncorrected method, then trains every method on every
  seed (the seeds outermost, so that slow phases of a shared machine fall
  on every method alike). Returns the workload, the gradient cost, the
  sweeps, each method's runs and summary, the pairs and the targets."""
  workload = cfg.make_workload()
  options = measure.compiler_options(cfg.fast_compile)
  evaluate = jax.jit(workload.evaluate, compiler_options=options)
  suite = methods()
  trainers = {m.name: compile_method(workload, m, cfg.num_microbatches,
                                     evaluate, options)
              for m in suite}
  sweeps = {m.family: sweep(trainers[m.name], cfg, context.progress)
            for m in suite if m.baseline is None}
  results = {m.name: {"family": m.family, "baseline": m.baseline,
                      "corrected": m.corrected,
                      "first_half_only": m.first_half_only,
                      "settings": m.settings, "lr": sweeps[m.family]["lr"],
                      "compile_seconds": trainers[m.name].compile_seconds,
                      "memory": trainers[m.name].memory, "runs": {}}
             for m in suite}
  for seed in cfg.seeds:
    for m in suite:
      results[m.name]["runs"][str(seed)] = train(
          trainers[m.name], seed, cfg.steps, results[m.name]["lr"],
          context.progress)
  summaries = {name: summarize(r) for name, r in results.items()}
  pairs = {m.name: {"baseline": m.baseline, "corrected": m.corrected,
                    **paired(results[m.name], results[m.baseline])}
           for m in suite if m.baseline is not None}
  return {"workload": {"name": workload.name,
                       "description": workload.description,
                       "steps": cfg.steps,
                       "num_microbatches": cfg.num_microbatches,
                       "seeds": list(cfg.seeds)},
          "gradient_cost": gradient_cost(workload, cfg.num_microbatches,
                                         cfg.timing_repeats, options),
          "compile_seconds": sum(t.compile_seconds
                                 for t in trainers.values()),
          "monte_carlo": monte_carlo(),
          "sweeps": sweeps, "results": results, "summaries": summaries,
          "pairs": pairs, "targets": targets(pairs, summaries)}


MONTE_CARLO_MEANS = (0.2, 0.5, 1.0)
Estimator = Literal["two_group", "leave_one_out"]


def first_step_mean(mu: float, method: Estimator, variance_correction: bool,
                    num_microbatches: int = 8, draws: int = 20000) -> float:
  """The mean first-step update of the paper's estimator
  (`fo.scale_by_bias_corrected_adam` with ``cross_fit_safeguard=False``)
  over `draws` coordinates whose microbatch gradients are N(`mu`, 1), drawn
  as tests/test_bias_corrected_adamw.py's Monte-Carlo test draws them (seed
  0)."""
  rng = np.random.default_rng(0)
  micro = (mu + rng.standard_normal((num_microbatches, draws))).astype(
      np.float32)
  tx = fo.scale_by_bias_corrected_adam(
      method=method, variance_correction=variance_correction,
      cross_fit_safeguard=False)
  params = {"w": jnp.zeros((draws,))}
  update, _ = tx.update({"w": jnp.asarray(micro.mean(0))}, tx.init(params),
                        params, microbatch_grads={"w": jnp.asarray(micro)})
  return float(jnp.mean(cast(dict, update)["w"]))


def monte_carlo() -> list[dict]:
  """Per mean and method, the first step's relative bias against the
  estimator's population step without and with the variance correction.

  The population steps: two groups ``μ/√E[g_j²] = μ/√(μ²+1)``,
  leave-one-out ``μ/√E[ḡ_{-r}²] = μ/√(μ²+1/7)`` (8 microbatches).
  """
  rows = []
  for mu in MONTE_CARLO_MEANS:
    estimators: tuple[tuple[Estimator, float], ...] = (
        ("two_group", mu / math.sqrt(mu ** 2 + 1.0)),
        ("leave_one_out", mu / math.sqrt(mu ** 2 + 1.0 / 7)))
    for method, target in estimators:
      bias = {correction: abs(first_step_mean(mu, method, correction)
                              - target) / target
              for correction in (False, True)}
      rows.append({"mu": mu, "method": method, "target": target,
                   "relative_bias_uncorrected": bias[False],
                   "relative_bias_corrected": bias[True]})
  return rows


# ------------------------------------------------------------------- report


def _mb(value) -> str:
  return report.fmt(None if value is None else value / 2 ** 20, ".2f")


def _pm(spread: dict, spec: str = ".4f") -> str:
  return (f"{report.fmt(spread['mean'], spec)} ± "
          f"{report.fmt(spread['std'], spec.lstrip('+'))}")


def markdown(raw: dict) -> str:
  """The suite's tables: per pair the held-out losses and paired
  differences, step time and memory; the gradient cost; the sweeps; the
  Monte-Carlo first-step bias; the targets."""
  wl, summaries = raw["workload"], raw["summaries"]
  results, pairs = raw["results"], raw["pairs"]
  lines = [
      f"Workload: {wl['description']}; {wl['steps']} steps (warmup from 0 "
      f"over {WARMUP_STEPS}, cosine to 0), seeds {wl['seeds']}; corrected "
      f"methods get {wl['num_microbatches']} microbatches per step from "
      "`fo.microbatch_grads`. Losses are final, in nats per token; ± is "
      "the sample standard deviation over seeds; Δ is the method − its "
      "uncorrected self on the same seed (same initialisation and "
      "batches). `adamw_first_half` is a control: `optax.adamw` on the "
      "first half of each batch, the data a cross-fitted numerator sees.",
      "",
      "| method | lr | held-out loss | Δ held-out (paired) | per-seed Δ "
      "| train loss | step ms (median) | × uncorrected | EVDs "
      "| step memory MB | state MB |",
      "|---" * 11 + "|"]
  for name, s in summaries.items():
    base = results[name]["baseline"]
    pair = pairs.get(name)
    ratio = (s["step_ms_median"] / summaries[base]["step_ms_median"]
             if base else 1.0)
    lines.append("| " + " | ".join([
        name, f"{s['lr']:.0e}",
        _pm(s["test_loss"]),
        _pm(pair["test_loss_difference"], "+.4f") if pair else "—",
        " ".join(report.fmt(d, "+.3f") for d in pair["test_loss_differences"])
        if pair else "—",
        _pm(s["train_loss"]), f"{s['step_ms_median']:.1f}",
        f"{ratio:.2f}", "—" if "eigendecompositions" not in s
        else f"{s['eigendecompositions']:.0f}",
        _mb(s["memory_bytes"]), _mb(s["state_bytes"])]) + " |")
  cost = raw["gradient_cost"]
  lines += [
      "", f"Gradients alone (the {cost['num_microbatches']} per-microbatch "
      "gradients against the full batch's; alternated calls, median):", "",
      "| gradient | ms (median) | output MB | memory MB |", "|---|---|---|---|"]
  for name in ("value_and_grad", "microbatch_grads"):
    c = cost[name]
    memory = c["memory"] or {}
    lines.append(f"| `{name}` | {c['ms_median']:.1f} | "
                 f"{_mb(memory.get('output'))} | "
                 f"{_mb(memory.get('total_bytes'))} |")
  lines += ["", f"Parameters {_mb(cost['param_bytes'])} MB; the "
            f"{cost['num_microbatches']} microbatch gradients held at once "
            f"{_mb(cost['microbatch_grads_bytes'])} MB.", "",
            "Learning-rate sweeps (uncorrected method, seed "
            f"{next(iter(raw['sweeps'].values()))['seed']}, final train "
            "loss; the chosen rate serves the corrected methods too):", "",
            "| family | lr: final train loss | chosen |", "|---|---|---|"]
  for family, s in raw["sweeps"].items():
    tried = ", ".join(f"{r['lr']:.0e}: "
                      + report.fmt(r["final_train_loss"], ".4f")
                      for r in s["runs"])
    lines.append(f"| {family} | {tried} | {s['lr']:.0e} |")
  lines += ["", "First-step relative bias of the paper's estimators "
            "(`fo.scale_by_bias_corrected_adam` with "
            "`cross_fit_safeguard=False`; Monte Carlo, 20,000 coordinates of "
            "8 microbatches of N(μ, 1); the figures of "
            "tests/test_bias_corrected_adamw.py):", "",
            "| μ | method | population step | bias, cross-fitted only "
            "| bias, with variance correction |", "|---|---|---|---|---|"]
  for row in raw["monte_carlo"]:
    lines.append(f"| {row['mu']:g} | {row['method']} | {row['target']:.4f} | "
                 f"{100 * row['relative_bias_uncorrected']:.1f}% | "
                 f"{100 * row['relative_bias_corrected']:.1f}% |")
  lines += ["", "#### Targets", "", report.targets_table(raw["targets"])]
  return "\n".join(lines)


def plot(raw: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """``bias_paired.png``: per corrected method, each seed's held-out
  difference to its uncorrected self, and the mean ± 2 standard errors."""
  plt = report.pyplot()
  pairs = raw["pairs"]
  fig, ax = plt.subplots(figsize=(7, 3.4), dpi=70)
  for i, (name, pair) in enumerate(pairs.items()):
    differences = [d for d in pair["test_loss_differences"] if d is not None]
    ax.scatter([i] * len(differences), differences, s=14, color="0.5")
    spread = pair["test_loss_difference"]
    if spread["mean"] is not None:
      ax.errorbar(i + 0.15, spread["mean"], yerr=2 * spread["se"], fmt="o",
                  color="C0", capsize=3)
  ax.axhline(0.0, color="k", lw=0.6)
  ax.set_xticks(range(len(pairs)),
                [f"{n}\n− {p['baseline']}" for n, p in pairs.items()],
                fontsize=7)
  ax.set_ylabel("held-out loss difference (nats)")
  fig.suptitle("Corrected − uncorrected, per seed (grey) and mean ± 2 SE",
               fontsize=9)
  return [report.save_figure(fig, out_dir / "bias_paired.png")]


SUITE = harness.Suite(
    name="bias",
    help="each bias-corrected optimizer against its uncorrected self on the "
         "char Transformer LM (about 15 min)",
    presets={"full": FULL, "quick": QUICK}, run=run,
    units_of_work=units_of_work, seeds=lambda cfg: list(cfg.seeds),
    markdown=markdown, plot=plot, block=lambda cfg: BLOCK,
    out="bench_bias_out")
