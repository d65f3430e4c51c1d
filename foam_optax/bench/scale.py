"""`foam-bench --suite scale`: the FOAM paper's claims where eigendecompositions cost.

One workload with Kronecker factors of 512 (a character Transformer LM whose
MLP is 128 -> 512 -> 128) trained for 1000 steps, and five experiments on it:

1. **eigendecompositions**: FOAM's fresh EVDs against stale Shampoo's at the
   same check frequency (20), split by left and right factors, at equal loss;
2. **wall-clock**: FOAM against Shampoo at f in {1, 5, 20, 100, 500}: time to
   Shampoo f=20's final train loss, and eigendecompositions and seconds
   against final loss (Pareto plot);
3. **robustness**: learning rate x staleness f x damping eps0, for FOAM and
   Shampoo; per f, the fraction of runs that fail (diverge, or finish more
   than 10% above the grid's best loss);
4. **proxy decision utility**: on factor snapshots recorded during training,
   ROC-AUC of FOAM's proxy h (the library's `staleness_proxy`) for predicting
   that the stale inverse root's true relative error exceeds tau, and
   Spearman's correlation between h and that error (float64 reference);
5. **ablations**: FOAM with ``controller='foam_fixed_damping'``,
   ``'foam_no_refresh'``, ``'residual'``, ``proxy='sketch'`` and
   ``root_damping='epsilon'`` (X@ε0: FOAM's refresh decisions, inverse roots
   built with ε0 instead of FOAM's raised damping);
6. **Pareto**: final loss against EVDs for FOAM at several (f, τ) and for
   Shampoo's fixed frequencies; for each FOAM point, the loss of the
   fixed-f line at the same EVD count.

Parts (``ScaleConfig.only``, ``foam-bench --suite scale --only PART``):
``'pareto'`` runs just what experiment 6 and the X@ε0 ablation need (FOAM,
Shampoo at every f, the Pareto points and X@ε0); ``'wallclock'`` runs
experiments 1 and 2 alone: Shampoo f=20 first (its final loss is the
target), then FOAM, the other frequencies and `ScaleConfig.references`,
saving the results after each run and stopping at `ScaleConfig.time_limit`.
The ``gpu`` preset (``foam-bench --suite scale --preset gpu``) is that part on
a larger Transformer, sized for about 5.5 minutes on one GPU, with AdamW and
SOAP as references: FOAM's wall-clock claim where an ``eigh`` costs tens of
matrix products.

Every run uses one learning rate (`ScaleConfig.lr`), chosen once with a short
sweep of Shampoo f=20 and FOAM (see BENCHMARKS.md). Wall-clock is the sum of
the timed train steps (compilation and evaluation excluded), as in the
default suite (`trainer.Trainer`). Runs on any JAX backend unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import foam_optax as fo
from foam_optax.controllers import staleness_proxy
from foam_optax.bench import harness, measure, metrics, optimizers, report
from foam_optax.bench import trainer, workloads

BLOCKS = {
    None: harness.Block(
        "## The FOAM paper's claims at scale (`foam-bench --suite scale`)",
        "<!-- bench-scale:start -->", "<!-- bench-scale:end -->"),
    "pareto": harness.Block(
        "### Loss against eigendecompositions, and X@ε0 "
        "(`foam-bench --suite scale --only pareto`)",
        "<!-- bench-scale-pareto:start -->", "<!-- bench-scale-pareto:end -->"),
    "wallclock": harness.Block(
        "### Wall-clock to Shampoo f = 20's loss (`foam-bench --suite scale "
        "--only wallclock`)", "<!-- bench-scale-wallclock:start -->",
        "<!-- bench-scale-wallclock:end -->"),
}
PARTS = ("pareto", "wallclock")
FAILURE_MARGIN = 0.10   # a run fails when its loss is above (1 + this) x best


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
  """Sizes of the scale suite (`FULL`) or of its smoke run (`QUICK`).

  Attributes:
    make_workload: () -> the workload.
    steps: training steps of the main and ablation runs.
    lr: the learning rate of every main and ablation run.
    frequencies: Shampoo's check frequencies in the wall-clock comparison.
    robustness_steps: steps of each robustness run.
    robustness_lrs, robustness_frequencies, robustness_epsilons: the grid.
      FOAM's ``max_epsilon`` is ``MAX_EPSILON_RATIO`` x eps0 (the paper's
      3e-7 / 1e-9).
    proxy_steps: steps of each recording run (FOAM and Shampoo at the
      largest frequency).
    snapshot_every: a snapshot of the recorded factors every this many steps.
    factors_per_size: recorded factors per distinct factor size and side.
    eval_points: train-loss evaluations per main run (resolution of the time
      to target).
    taus: error thresholds of the ROC-AUC; the first is the target's.
    pareto_points: FOAM's (check_frequency, threshold, proxy) besides the
      paper's (20, 0.75, 'exact') in the Pareto experiment.
    line_frequencies: Shampoo's check frequencies on the Pareto experiment's
      fixed-f line besides `frequencies` (where FOAM's points fall).
    spread_seeds, spread_frequency: seeds besides 0 of FOAM and of Shampoo
      at this f (the fixed f nearest FOAM's EVDs), for the seed-to-seed
      spread of the final loss.
    references: other optimizers (`optimizers.optimizer_specs` names) of
      the wall-clock comparison, at `lr`, in the ``'wallclock'`` part only.
    only: None for every experiment, or one of `PARTS`.
    time_limit: seconds from the start after which no run starts and a run
      in progress stops between two steps (``'wallclock'`` part; None: no
      limit).
    fast_compile: compile with `measure.fast_compile()` (a smoke run's
      timings mean nothing).
  """

  make_workload: Callable[[], workloads.Workload]
  steps: int
  lr: float
  frequencies: tuple = (1, 5, 20, 100, 500)
  robustness_steps: int = 300
  robustness_lrs: tuple = (3e-3, 1e-2, 3e-2)
  robustness_frequencies: tuple = (20, 100, 500)
  robustness_epsilons: tuple = (1e-9, 1e-6)
  proxy_steps: int = 500
  snapshot_every: int = 20
  factors_per_size: int = 2
  eval_points: int = 100
  taus: tuple = (0.75, 0.25, 0.1)
  pareto_points: tuple = ((1, 0.75, "exact"), (1, 0.75, "sketch"),
                          (5, 0.75, "exact"), (10, 0.75, "exact"),
                          (50, 0.75, "exact"), (20, 0.25, "exact"),
                          (20, 1.5, "exact"))
  line_frequencies: tuple = (50, 150, 250)
  spread_seeds: tuple = (1, 2)
  spread_frequency: int = 100
  references: tuple = ()
  only: Optional[str] = None
  time_limit: Optional[float] = None
  fast_compile: bool = False


def scale_workload(steps: int = 1000) -> workloads.Workload:
  """Char Transformer LM, 2 layers, d_model 128, MLP 512, seq 64, batch 16."""
  return workloads.transformer_lm(steps=steps, d_model=128, mlp_width=512,
                                  num_layers=2, seq_len=64, batch_size=16,
                                  name="transformer_lm_scale")


FULL = ScaleConfig(make_workload=scale_workload, steps=1000, lr=3e-3)
# Smoke run: a tiny quadratic, a few steps, one point per grid axis but f;
# every optimizer configuration it needs more than once (f = 1 and 20, FOAM
# at f = 1 for the Pareto point and the grid) is compiled once.
QUICK = ScaleConfig(
    make_workload=lambda: workloads.kronecker_quadratic(
        kappa=1e2, rows=16, cols=8, steps=30),
    steps=30, lr=3e-2, frequencies=(1, 20), robustness_steps=25,
    robustness_lrs=(3e-2,), robustness_frequencies=(1, 20),
    robustness_epsilons=(1e-9,), proxy_steps=30, snapshot_every=5,
    factors_per_size=1, eval_points=10, pareto_points=((1, 0.75, "exact"),),
    line_frequencies=(), spread_seeds=(1,), spread_frequency=20,
    fast_compile=True)


def gpu_workload(steps: int = 600) -> workloads.Workload:
  """Char Transformer LM, 6 layers, d_model 512, MLP 2048, seq 256, batch
  16 (GPT-2-small-like in shape)."""
  return workloads.transformer_lm(steps=steps, d_model=512, mlp_width=2048,
                                  num_layers=6, seq_len=256, batch_size=16,
                                  name="transformer_lm_gpu")


# The wall-clock part on one GPU: five methods, compilation included, in
# about 5.5 minutes. The learning rate is the scale suite's (the best of
# 1e-3 to 3e-2 for Shampoo and FOAM on its d_model 128 Transformer), not
# tuned on this model.
GPU = ScaleConfig(make_workload=gpu_workload, steps=600, lr=3e-3,
                  frequencies=(20, 100), eval_points=30,
                  references=("adamw", "soap"), only="wallclock",
                  time_limit=330.0)
MAX_EPSILON_RATIO = 300.0
ABLATIONS = {"foam_fixed_damping": dict(controller="foam_fixed_damping"),
             "foam_no_refresh": dict(controller="foam_no_refresh"),
             "residual": dict(controller="residual"),
             "foam_sketch": dict(proxy="sketch"),
             "foam_x_at_eps0": dict(root_damping="epsilon")}
PARETO_ABLATIONS = ("foam_x_at_eps0",)   # the ablations `only='pareto'` runs


def shampoo_settings(check_frequency: int, epsilon: float = 1e-9) -> dict:
  return dict(optimizers._shampoo_settings(check_frequency), epsilon=epsilon)


def foam_settings(check_frequency: int = 20, epsilon: float = 1e-9,
                  **overrides) -> dict:
  """The paper's configuration (`optimizers.FOAM_PAPER`, its exact proxy
  stated, so that equal configurations share a compiled step) at f and
  eps0."""
  return {**optimizers.FOAM_PAPER, "proxy": "exact",
          "check_frequency": check_frequency, "epsilon": epsilon,
          "max_epsilon": MAX_EPSILON_RATIO * epsilon, **overrides}


class Trainers:
  """One compiled `trainer.Trainer` per distinct optimizer configuration,
  kept in `cache` (its own by default; `run` passes one shared by the runs
  of a process on the same workload). `compile_seconds` has, per
  configuration asked for, the seconds its step took to compile.
  `compiler_options` go to XLA."""

  def __init__(self, workload: workloads.Workload,
               cache: Optional[dict] = None,
               compiler_options: Optional[dict] = None):
    self.workload = workload
    self._cache = {} if cache is None else cache
    self._compiler_options = compiler_options
    self.compile_seconds = {}

  def get(self, method: str, settings: Optional[dict] = None
          ) -> trainer.Trainer:
    """FOAM (`method` 'foam') or Shampoo ('shampoo') with `settings`, or
    `method` of `optimizers.optimizer_specs` when `settings` is None."""
    key = (method, None if settings is None
           else tuple(sorted(settings.items())))
    if key not in self._cache:
      if settings is None:
        spec = optimizers.optimizer_specs()[method]
      else:
        spec = optimizers.make_spec(
            method, fo.foam if method == "foam" else fo.shampoo, settings,
            grid=())
      self._cache[key] = trainer.Trainer(
          self.workload, spec, compiler_options=self._compiler_options)
    self.compile_seconds[key] = self._cache[key].compile_seconds
    return self._cache[key]


# Per workload factory (and `fast_compile`), its workload and the compiled
# steps on it: a second run in the same process (a part after the whole
# suite) compiles only the configurations the first did not. The factories
# are deterministic.
_COMPILED: dict = {}


def _main_run(trainers, method, settings, cfg, progress, seed=0,
              deadline=math.inf) -> dict:
  compiled = trainers.get(method, settings)
  run = compiled.train(seed, cfg.steps, cfg.lr, progress=progress,
                       deadline=deadline,
                       eval_every=max(1, cfg.steps // cfg.eval_points))
  return {"method": method, "settings": compiled.spec.settings, "lr": cfg.lr,
          "steps": cfg.steps, "seed": seed, **run}


def _final(run) -> float:
  return run["curve"]["train_loss"][-1]


def pareto_name(check_frequency: int, threshold: float, proxy: str) -> str:
  suffix = "_sketch" if proxy == "sketch" else ""
  return f"foam_f{check_frequency}_tau{threshold:g}{suffix}"


def summarize_run(run: dict, target: Optional[float]) -> dict:
  """A run's figures; EVDs, checks and damping are None for an optimizer
  without `fo.stats`, the time to `target` None without a target."""
  stats = run.get("stats", {})
  return {"final_train_loss": _final(run),
          # Time-averaged over the steps: the damping a run trained with.
          "damping_mean_over_steps": (
              float(np.mean(run["trace"]["damping_mean"]))
              if "damping_mean" in run["trace"] else None),
          "final_test_loss": run["curve"]["test_loss"][-1],
          "train_seconds": run["curve"]["seconds"][-1],
          "seconds_to_target": (None if target is None else
                                trainer.seconds_to(run["curve"], target)),
          "eigendecompositions": stats.get("eigendecompositions"),
          "eigendecompositions_left": stats.get("eigendecompositions_left"),
          "eigendecompositions_right": stats.get("eigendecompositions_right"),
          "checks": stats.get("checks"),
          "steps_done": len(run["trace"]["step_seconds"]),
          "truncated": run["truncated"],
          "step_ms_median": (
              float(1e3 * np.median(run["trace"]["step_seconds"]))
              if run["trace"]["step_seconds"] else None)}


def _ratio(a, b):
  return None if not b else a / b


def eigendecomposition_claim(summaries: dict) -> dict:
  """FOAM's EVDs over Shampoo f=20's, total and per side, with the loss ratio."""
  foam, stale = summaries["foam"], summaries["shampoo_f20"]
  return {
      "foam": {k: foam[k] for k in ("eigendecompositions",
                                    "eigendecompositions_left",
                                    "eigendecompositions_right",
                                    "final_train_loss")},
      "shampoo_f20": {k: stale[k] for k in ("eigendecompositions",
                                            "eigendecompositions_left",
                                            "eigendecompositions_right",
                                            "final_train_loss")},
      "ratio_total": _ratio(foam["eigendecompositions"],
                            stale["eigendecompositions"]),
      "ratio_left": _ratio(foam["eigendecompositions_left"],
                           stale["eigendecompositions_left"]),
      "ratio_right": _ratio(foam["eigendecompositions_right"],
                            stale["eigendecompositions_right"]),
      "loss_ratio": foam["final_train_loss"] / stale["final_train_loss"],
  }


def frontier_loss(frontier: list, evds: float) -> Optional[float]:
  """The fixed-f line's loss at `evds`: linear in log EVDs between the
  neighbouring (EVDs, loss) points of `frontier`; None outside its range."""
  points = sorted(frontier)
  for (x0, y0), (x1, y1) in zip(points, points[1:]):
    if x0 <= evds <= x1:
      if x1 == x0:
        return min(y0, y1)
      weight = (math.log(evds) - math.log(x0)) / (math.log(x1) - math.log(x0))
      return y0 + weight * (y1 - y0)
  return None


def pareto(summaries: dict, runs: dict, cfg: ScaleConfig) -> dict:
  """Every FOAM run's EVDs and final loss against the fixed-f line.

  ``gap`` is the FOAM run's final loss minus the line's at its EVD count
  (negative: below the line, a better loss for its EVDs); the damping is
  the time average of the mean over factors, as a fraction of ε_max.
  ``spread``: the final losses of FOAM and of Shampoo at
  `spread_frequency` over seed 0 and `spread_seeds`.
  """
  line = [{"check_frequency": f,
           "eigendecompositions": summaries[f"shampoo_f{f}"]["eigendecompositions"],
           "final_train_loss": summaries[f"shampoo_f{f}"]["final_train_loss"]}
          for f in sorted(set(cfg.frequencies) | set(cfg.line_frequencies))]
  frontier = [(p["eigendecompositions"], p["final_train_loss"]) for p in line]
  names = (["foam"] + [pareto_name(*point) for point in cfg.pareto_points]
           + list(PARETO_ABLATIONS))
  points = {}
  for name in names:
    s, settings = summaries[name], runs[name]["settings"]
    at = frontier_loss(frontier, s["eigendecompositions"])
    points[name] = {
        "check_frequency": settings["check_frequency"],
        "threshold": settings["threshold"],
        "root_damping": settings.get("root_damping", "controller"),
        "proxy": settings.get("proxy", "exact"),
        "eigendecompositions": s["eigendecompositions"],
        "checks": s["checks"],
        "step_ms_median": s["step_ms_median"],
        "train_seconds": s["train_seconds"],
        "final_train_loss": s["final_train_loss"],
        "frontier_loss": at,
        "gap": None if at is None else s["final_train_loss"] - at,
        "damping_over_max_epsilon": (s["damping_mean_over_steps"]
                                     / settings["max_epsilon"])}
  reference = f"shampoo_f{cfg.spread_frequency}"
  spread = {"seeds": [0, *cfg.spread_seeds], "final_train_loss": {
      name: [summaries[name]["final_train_loss"]] + [
          summaries[f"{name}_seed{seed}"]["final_train_loss"]
          for seed in cfg.spread_seeds] for name in ("foam", reference)}}
  return {"fixed_frequency": line, "points": points, "spread": spread}


def _failed(run: dict, best: float) -> bool:
  final, initial = run["final_train_loss"], run["initial_train_loss"]
  return (not math.isfinite(final) or final > initial
          or final > (1 + FAILURE_MARGIN) * best)


def robustness(trainers: Trainers, cfg: ScaleConfig, progress) -> dict:
  """The grid's runs and each method's failure fraction per frequency.

  A run fails when its final train loss is not finite, is above its initial
  loss, or is more than `FAILURE_MARGIN` above the best final loss of the
  whole grid (both methods, every f, lr and eps0).
  """
  runs = []
  for f in cfg.robustness_frequencies:
    for eps in cfg.robustness_epsilons:
      for method in ("foam", "shampoo"):
        settings = (foam_settings(f, eps) if method == "foam"
                    else shampoo_settings(f, eps))
        compiled = trainers.get(method, settings)
        for lr in cfg.robustness_lrs:
          run = compiled.train(0, cfg.robustness_steps, lr, progress=progress)
          runs.append({"method": method, "check_frequency": f,
                       "epsilon": eps, "lr": lr,
                       "initial_train_loss": run["curve"]["train_loss"][0],
                       "final_train_loss": _final(run),
                       "eigendecompositions": run["stats"]["eigendecompositions"]})
  finite = [r["final_train_loss"] for r in runs
            if math.isfinite(r["final_train_loss"])]
  best = min(finite) if finite else math.inf
  for r in runs:
    r["failed"] = _failed(r, best)
  fractions = {}
  for method in ("foam", "shampoo"):
    fractions[method] = {}
    for f in cfg.robustness_frequencies:
      mine = [r["failed"] for r in runs
              if r["method"] == method and r["check_frequency"] == f]
      fractions[method][str(f)] = sum(mine) / len(mine)
  return {"steps": cfg.robustness_steps, "best_final_train_loss": best,
          "failure_margin": FAILURE_MARGIN, "failure_fraction": fractions,
          "runs": runs}


# ------------------------------------------------------------ proxy utility


def _recorded_factors(opt_state, per_size: int) -> list:
  """(stack, side, slot) of up to `per_size` real factors per size and
  side; `stack` indexes `fo.factor_stacks`."""
  chosen, counts = [], {}
  for s, view in enumerate(fo.factor_stacks(opt_state)):
    for slot in np.flatnonzero(view.real):
      if counts.get((view.size, view.side), 0) < per_size:
        counts[(view.size, view.side)] = counts.get((view.size, view.side),
                                                    0) + 1
        chosen.append((s, view.side, int(slot)))
  return chosen


def inverse_root(eigvals, basis, damping, exponent):
  """Q diag((max(D, 0) + eps)^(-1/p)) Qᵀ in float64."""
  weights = (np.maximum(eigvals, 0.0) + damping) ** (-1.0 / exponent)
  return (basis * weights) @ basis.T


def true_relative_error(factor, basis, eigvals, damping, exponent) -> float:
  """‖X_stale − X(A)‖_F / ‖X(A)‖_F in float64, X(A) = (A + εI)^(-1/p)."""
  factor = np.asarray(factor, np.float64)
  exact_eigvals, exact_basis = np.linalg.eigh(0.5 * (factor + factor.T))
  exact = inverse_root(exact_eigvals, exact_basis, damping, exponent)
  stale = inverse_root(np.asarray(eigvals, np.float64),
                       np.asarray(basis, np.float64), damping, exponent)
  return float(np.linalg.norm(stale - exact) / np.linalg.norm(exact))


def record_snapshots(recorder: trainer.Trainer, steps: int, every: int,
                     per_size: int, lr: float, progress,
                     compiler_options: Optional[dict] = None) -> list:
  """Trains and, every `every` steps, pairs each recorded factor's current
  bias-corrected statistic A_t with its cached (Q, D, ε).

  A pair is taken after step t with t % every == every - 1 (from the first
  check on), comparing the cache that step t+1 would check against A_t.
  Returns dicts with the proxy h (library `staleness_proxy`,
  computed as the optimizer does, in the statistic's dtype), the float64 true
  relative error, the factor's size, side, and the steps since its cache was
  refreshed. `compiler_options` go to XLA (the proxy's program).
  """
  settings = recorder.spec.settings
  b2, exponent = settings["b2"], settings["exponent"]
  # Bias correction counts accumulations: one every `every_stat` steps.
  every_stat = settings.get("statistics_compute_steps", 1)
  params, opt_state = recorder.init(0)
  batches = recorder.workload.sample_batches(0, steps)
  chosen = _recorded_factors(opt_state, per_size)
  last_refresh = {key: 0 for key in chosen}
  refreshes = {key: 0 for key in chosen}
  proxy = jax.jit(staleness_proxy, static_argnums=4,
                  compiler_options=compiler_options)
  pairs = []
  for i in range(steps):
    batch = jax.tree.map(lambda b: b[i], batches)
    params, opt_state, _ = recorder.step(params, opt_state, batch,
                                         jnp.float32(lr))
    step = i + 1
    stacks = [view.stack for view in fo.factor_stacks(opt_state)]
    for key in chosen:
      s, _, slot = key
      fs = stacks[s]
      count = int(fs.refreshes[slot])
      if count != refreshes[key]:
        refreshes[key], last_refresh[key] = count, step
    if step % every != every - 1 or step < settings["start_preconditioning_step"]:
      if progress:
        progress(1)
      continue
    for key in chosen:
      s, side, slot = key
      fs = stacks[s]
      factor = fs.statistic[slot] / (1 - b2 ** -(-step // every_stat))
      basis, eigvals, damping = fs.basis[slot], fs.eigvals[slot], fs.damping[slot]
      h = float(proxy(factor.astype(eigvals.dtype), basis.astype(eigvals.dtype),
                      eigvals, damping, exponent))
      error = true_relative_error(np.asarray(factor), np.asarray(basis),
                                  np.asarray(eigvals), float(damping), exponent)
      pairs.append({"step": step, "size": int(basis.shape[-1]), "side": side,
                    "age": step - last_refresh[key], "damping": float(damping),
                    "proxy": h, "error": error})
    if progress:
      progress(1)
  return pairs


def proxy_utility(pairs: list, taus) -> dict:
  """ROC-AUC of h for error > tau (each tau) and Spearman(h, error)."""
  h = np.array([p["proxy"] for p in pairs])
  error = np.array([p["error"] for p in pairs])
  keep = np.isfinite(h) & np.isfinite(error)
  h, error = h[keep], error[keep]
  per_tau = {}
  for tau in taus:
    labels = error > tau
    per_tau[str(tau)] = {"positives": int(labels.sum()),
                         "negatives": int((~labels).sum()),
                         "roc_auc": metrics.roc_auc(h, labels)}
  return {"pairs": len(pairs), "finite_pairs": int(keep.sum()),
          "spearman": metrics.spearman(h, error), "roc_auc": per_tau,
          "primary_tau": taus[0]}


# ------------------------------------------------------------------ targets


def targets(claims: dict, cfg: ScaleConfig) -> dict:
  """The suite's targets (those its part measures), each with its
  statement, measured figure and met."""
  result = {}
  wall = claims["wallclock"]
  summaries = wall["summaries"]
  fixed = [f"shampoo_f{f}" for f in cfg.frequencies]
  seconds = {n: summaries[n]["seconds_to_target"]
             for n in ["foam", *fixed] if n in summaries}
  text = lambda n: ("not run" if n not in seconds
                    else "not reached" if seconds[n] is None
                    else f"{seconds[n]:.1f} s")
  measured = f"FOAM {text('foam')}; " + ", ".join(
      f"f={n.split('_f')[1]} {text(n)}" for n in fixed)
  if wall["target_train_loss"] is None:
    measured = "no target (Shampoo f=20 did not finish); " + measured
  foam_s = seconds.get("foam")
  result["foam_fastest_to_shampoo_f20_loss"] = {
      "target": "FOAM reaches Shampoo f=20's final train loss in less "
                "wall-clock than every fixed frequency",
      "measured": measured,
      "met": (foam_s is not None and all(n in seconds for n in fixed)
              and all(seconds[n] is None or seconds[n] > foam_s
                      for n in fixed))}
  if "eigendecompositions" not in claims:
    return result
  evd = claims["eigendecompositions"]
  result["foam_evds_le_20pct_of_shampoo_f20"] = {
      "target": "FOAM's eigendecompositions ≤ 20% of Shampoo f=20's "
                "(paper: >80% fewer) at final loss within 1%",
      "measured": (f"{_pct(evd['ratio_total'])} (left {_pct(evd['ratio_left'])}, "
                   f"right {_pct(evd['ratio_right'])}); loss ratio "
                   f"{evd['loss_ratio']:.4f}"),
      "met": (evd["ratio_total"] is not None and evd["ratio_total"] <= 0.2
              and evd["loss_ratio"] <= 1.01)}
  if "robustness" not in claims:   # a part
    return result
  fractions = claims["robustness"]["failure_fraction"]
  result["foam_robustness_le_shampoo"] = {
      "target": "FOAM's failure fraction ≤ Shampoo's at every f",
      "measured": "; ".join(
          f"f={f}: FOAM {fractions['foam'][f]:.2f}, Shampoo "
          f"{fractions['shampoo'][f]:.2f}" for f in fractions["foam"]),
      "met": all(fractions["foam"][f] <= fractions["shampoo"][f]
                 for f in fractions["foam"])}
  proxy = claims["proxy"]
  primary = proxy["roc_auc"][str(proxy["primary_tau"])]
  auc = primary["roc_auc"]
  result["proxy_roc_auc_ge_0.9"] = {
      "target": f"proxy ROC-AUC ≥ 0.9 (error > τ = {proxy['primary_tau']})",
      "measured": (f"{auc:.3f}" if auc is not None else "undefined")
                  + f" ({primary['positives']} of {proxy['finite_pairs']} "
                    f"pairs above τ); Spearman "
                  + ("—" if proxy["spearman"] is None
                     else f"{proxy['spearman']:.3f}"),
      "met": auc is not None and auc >= 0.9}
  return result


def _pct(ratio):
  return "—" if ratio is None else f"{100 * ratio:.1f}%"


# --------------------------------------------------------------------- run


def _ablations(only) -> dict:
  if only == "pareto":
    return {n: ABLATIONS[n] for n in PARETO_ABLATIONS}
  return ABLATIONS


def _wallclock_names(cfg: ScaleConfig) -> list:
  """The wall-clock part's runs in their order: the target first."""
  return (["shampoo_f20", "foam"]
          + [f"shampoo_f{f}" for f in cfg.frequencies if f != 20]
          + list(cfg.references))


def units_of_work(cfg: ScaleConfig) -> int:
  if cfg.only == "wallclock":
    return len(_wallclock_names(cfg)) * cfg.steps
  main = (1 + len(cfg.frequencies) + len(cfg.pareto_points)
          + len(cfg.line_frequencies) + 2 * len(cfg.spread_seeds)
          + len(_ablations(cfg.only))) * cfg.steps
  if cfg.only == "pareto":
    return main
  grid = (2 * len(cfg.robustness_frequencies) * len(cfg.robustness_epsilons)
          * len(cfg.robustness_lrs) * cfg.robustness_steps)
  return main + grid + 2 * cfg.proxy_steps


def _wallclock_runs(trainers: Trainers, cfg: ScaleConfig,
                    context: harness.Context, deadline: float,
                    record: dict) -> dict:
  """The wall-clock part's runs, saved after each; none starts after the
  deadline (the ones left out are absent)."""
  runs = {}
  for name in _wallclock_names(cfg):
    if time.perf_counter() > deadline:
      break
    context.describe(name)
    if name == "foam":
      method, settings = "foam", foam_settings()
    elif name.startswith("shampoo_f"):
      method, settings = "shampoo", shampoo_settings(int(name[9:]))
    else:
      method, settings = name, None
    runs[name] = _main_run(trainers, method, settings, cfg, context.progress,
                           deadline=deadline)
    context.save({**record, "runs": runs})
  return runs


def _main_runs(trainers: Trainers, cfg: ScaleConfig, progress) -> dict:
  """The runs of experiments 1, 2, 5 and 6 (those `cfg.only` needs)."""
  runs = {"foam": _main_run(trainers, "foam", foam_settings(), cfg, progress)}
  for f in cfg.frequencies:
    runs[f"shampoo_f{f}"] = _main_run(trainers, "shampoo", shampoo_settings(f),
                                      cfg, progress)
  for f in cfg.line_frequencies:
    runs[f"shampoo_f{f}"] = _main_run(trainers, "shampoo", shampoo_settings(f),
                                      cfg, progress)
  for f, tau, proxy in cfg.pareto_points:
    runs[pareto_name(f, tau, proxy)] = _main_run(
        trainers, "foam", foam_settings(f, threshold=tau, proxy=proxy), cfg,
        progress)
  for seed in cfg.spread_seeds:
    runs[f"foam_seed{seed}"] = _main_run(trainers, "foam", foam_settings(),
                                         cfg, progress, seed)
    runs[f"shampoo_f{cfg.spread_frequency}_seed{seed}"] = _main_run(
        trainers, "shampoo", shampoo_settings(cfg.spread_frequency), cfg,
        progress, seed)
  for name, overrides in _ablations(cfg.only).items():
    runs[name] = _main_run(trainers, "foam", foam_settings(**overrides), cfg,
                           progress)
  return runs


def run(cfg: ScaleConfig, context: harness.Context) -> dict:
  """Runs the six experiments, or the part `cfg.only`; returns the
  workload, runs, claims and targets. Runs in one process with the same
  `cfg.make_workload` share their compiled steps (`compile_seconds` counts
  each step's compilation, whichever run paid it)."""
  deadline = (math.inf if cfg.time_limit is None
              else time.perf_counter() + cfg.time_limit)
  options = measure.compiler_options(cfg.fast_compile)
  compiled = (cfg.make_workload, cfg.fast_compile)
  if compiled not in _COMPILED:
    _COMPILED[compiled] = (cfg.make_workload(), {})
  workload, cache = _COMPILED[compiled]
  trainers = Trainers(workload, cache, options)
  record = {"workload": _workload_record(workload, cfg), "only": cfg.only}
  if cfg.only == "wallclock":
    runs = _wallclock_runs(trainers, cfg, context, deadline, record)
  else:
    runs = _main_runs(trainers, cfg, context.progress)
  reference = runs.get("shampoo_f20")
  target = (None if reference is None or reference["truncated"]
            else _final(reference))
  summaries = {n: summarize_run(r, target) for n, r in runs.items()}
  main_names = ["foam"] + [f"shampoo_f{f}" for f in cfg.frequencies]
  if cfg.only == "wallclock":
    main_names += list(cfg.references)
  claims = {}
  if "foam" in summaries and "shampoo_f20" in summaries:
    claims["eigendecompositions"] = eigendecomposition_claim(summaries)
  claims["wallclock"] = {"target_train_loss": target, "summaries": {
      n: summaries[n] for n in main_names if n in summaries}}
  if cfg.only == "wallclock":
    claims["wallclock"]["not_run"] = [n for n in _wallclock_names(cfg)
                                      if n not in runs]
  if cfg.only != "wallclock":
    claims["pareto"] = pareto(summaries, runs, cfg)
    claims["ablations"] = {n: summaries[n] for n in [
        "foam", "shampoo_f20", *_ablations(cfg.only)]}
  if cfg.only is None:
    claims["robustness"] = robustness(trainers, cfg, context.progress)
    recordings = {
        "foam": trainers.get("foam", foam_settings()),
        f"shampoo_f{max(cfg.frequencies)}": trainers.get(
            "shampoo", shampoo_settings(max(cfg.frequencies)))}
    pairs = []
    for source, recorder in recordings.items():
      for pair in record_snapshots(recorder, cfg.proxy_steps,
                                   cfg.snapshot_every, cfg.factors_per_size,
                                   cfg.lr, context.progress, options):
        pairs.append({"source": source, **pair})
    claims["proxy"] = {**proxy_utility(pairs, cfg.taus),
                       "steps": cfg.proxy_steps, "sources": list(recordings),
                       "records": pairs}
  return {**record,
          "compile_seconds": sum(trainers.compile_seconds.values()),
          "runs": runs, "claims": claims, "targets": targets(claims, cfg)}


def _workload_record(workload, cfg: ScaleConfig) -> dict:
  return {"name": workload.name, "description": workload.description,
          "steps": cfg.steps, "lr": cfg.lr}


# ------------------------------------------------------------------- report


def markdown(result: dict) -> str:
  """The claims' tables (those run) and the targets table."""
  claims, wl = result["claims"], result["workload"]
  lines = [f"Workload: {wl['description']}; {wl['steps']} steps, lr "
           f"{wl['lr']:g} for every run; seed 0.", ""]
  if "eigendecompositions" in claims:
    evd = claims["eigendecompositions"]
    lines += ["#### 1. Eigendecompositions: FOAM vs Shampoo at the same "
              "check frequency (f=20)", "",
              "| optimizer | EVDs | left factors | right factors | final "
              "train loss |", "|---|---|---|---|---|"]
    for name in ("foam", "shampoo_f20"):
      s = evd[name]
      lines.append(f"| {name} | {s['eigendecompositions']:.0f} | "
                   f"{s['eigendecompositions_left']:.0f} | "
                   f"{s['eigendecompositions_right']:.0f} | "
                   f"{s['final_train_loss']:.4f} |")
    lines += ["", f"FOAM/Shampoo: total {_pct(evd['ratio_total'])}, left "
              f"{_pct(evd['ratio_left'])}, right {_pct(evd['ratio_right'])} "
              f"(paper: left ≈ 10%, right ≈ 5%); loss ratio "
              f"{evd['loss_ratio']:.4f}.", ""]
  wall = claims["wallclock"]
  lines += ["#### 2. Wall-clock: time to Shampoo f=20's final train loss "
            f"({report.fmt(wall['target_train_loss'], '.4f')})", "",
            _run_table(wall["summaries"], wall.get("not_run", ())), ""]
  if "robustness" in claims:
    lines += _robustness_and_proxy_lines(claims)
  if "ablations" in claims:
    lines += ["#### 5. Ablations (FOAM's paper configuration, one change "
              "each)", "", _run_table(claims["ablations"]), "",
              "#### 6. Pareto: final train loss against eigendecompositions",
              "", _pareto_table(claims["pareto"]), ""]
  lines += ["#### Targets", "", report.targets_table(result["targets"])]
  return "\n".join(lines)


def _robustness_and_proxy_lines(claims: dict) -> list:
  rob = claims["robustness"]
  fractions = rob["failure_fraction"]
  lrs = sorted({r["lr"] for r in rob["runs"]})
  epsilons = sorted({r["epsilon"] for r in rob["runs"]})
  lines = ["#### 3. Robustness: fraction of failed runs", "",
           f"Grid: lr ∈ {{{', '.join(f'{x:g}' for x in lrs)}}} × ε0 ∈ "
           f"{{{', '.join(f'{x:g}' for x in epsilons)}}} per method and f, "
           f"{rob['steps']} steps each (fewer than the main runs, to fit "
           f"the budget); FOAM's ε_max = {MAX_EPSILON_RATIO:g} × ε0. A run "
           f"fails when its final train loss is not finite, above its "
           f"initial loss, or more than {100 * rob['failure_margin']:.0f}% "
           f"above the grid's best ({rob['best_final_train_loss']:.4f}).", "",
           "| f | FOAM | Shampoo |", "|---|---|---|"]
  for f in fractions["foam"]:
    lines.append(f"| {f} | {fractions['foam'][f]:.2f} | "
                 f"{fractions['shampoo'][f]:.2f} |")
  proxy = claims["proxy"]
  lines += ["", "#### 4. Proxy decision utility", "",
            f"{proxy['finite_pairs']} (A_t, cached Q, D, ε) pairs recorded every "
            f"few steps over {proxy['steps']} steps of "
            f"{' and '.join(proxy['sources'])}; h from the library's "
            f"`staleness_proxy`, error ‖X_stale − X(A_t)‖_F / ‖X(A_t)‖_F in "
            f"float64. Spearman(h, error) = "
            f"{report.fmt(proxy['spearman'], '.3f')}.", "",
            "| τ | pairs with error > τ | ROC-AUC of h |", "|---|---|---|"]
  for tau, r in proxy["roc_auc"].items():
    lines.append(f"| {tau} | {r['positives']} / {r['positives'] + r['negatives']}"
                 f" | {report.fmt(r['roc_auc'], '.3f')} |")
  return lines + [""]


def _pareto_table(claim: dict) -> str:
  lines = ["Fixed-f line: " + ", ".join(
      f"f={p['check_frequency']} {p['eigendecompositions']:.0f} EVDs / "
      f"{p['final_train_loss']:.4f}" for p in claim["fixed_frequency"])
           + ". Line's loss at a run's EVDs: linear in log EVDs between "
             "neighbouring f; gap = run − line (negative: below the line).",
           "", "| run | f | τ | proxy | X built with | EVDs | checks | final "
           "train loss | line at same EVDs | gap | mean damping / ε_max | "
           "step ms median | train s |",
           "|---" * 13 + "|"]
  for name, p in claim["points"].items():
    damping = ("ε0" if p["root_damping"] == "epsilon"
               else "FOAM's damping")
    lines.append(
        f"| {name} | {p['check_frequency']} | {p['threshold']:g} | "
        f"{p['proxy']} | {damping} | {p['eigendecompositions']:.0f} | "
        f"{p['checks']:.0f} | {p['final_train_loss']:.4f} | "
        f"{report.fmt(p['frontier_loss'], '.4f')} | "
        f"{report.fmt(p['gap'], '+.4f')} | "
        f"{100 * p['damping_over_max_epsilon']:.1f}% | "
        f"{p['step_ms_median']:.1f} | {p['train_seconds']:.1f} |")
  spread = claim["spread"]
  losses = "; ".join(
      f"{name} {min(v):.4f}–{max(v):.4f} (range {max(v) - min(v):.4f})"
      for name, v in spread["final_train_loss"].items())
  lines += ["", f"Seed-to-seed spread of the final train loss (seeds "
            f"{', '.join(str(x) for x in spread['seeds'])}): {losses}."]
  return "\n".join(lines)


def _run_table(summaries: dict, not_run=()) -> str:
  """A row per run (a run cut by the time limit says where); then the runs
  the time limit left out."""
  lines = ["| run | final train loss | held-out loss | s to target | train s "
           "| EVDs (left / right) | checks | step ms median |",
           "|---|---|---|---|---|---|---|---|"]
  for name, s in summaries.items():
    label = name + (f" (cut at step {s['steps_done']})" if s["truncated"]
                    else "")
    evds = (f"{s['eigendecompositions']:.0f} "
            f"({s['eigendecompositions_left']:.0f} / "
            f"{s['eigendecompositions_right']:.0f})"
            if s["eigendecompositions"] is not None else "—")
    lines.append(
        f"| {label} | {s['final_train_loss']:.4f} | "
        f"{s['final_test_loss']:.4f} | "
        f"{report.fmt(s['seconds_to_target'], '.1f')} | "
        f"{s['train_seconds']:.1f} | {evds} | "
        f"{report.fmt(s['checks'], '.0f')} | "
        f"{report.fmt(s['step_ms_median'], '.1f')} |")
  lines += [f"| {name} | not run (time limit) | | | | | | |"
            for name in not_run]
  return "\n".join(lines)


def plot(result: dict, out_dir: pathlib.Path) -> list[pathlib.Path]:
  """One PNG per claim, named ``scale_*.png`` (for ``only='pareto'`` only
  ``scale_pareto.png``; for ``'wallclock'`` the EVDs and the wall-clock)."""
  plt = report.pyplot()
  claims, runs = result["claims"], result["runs"]
  paths = []

  def save(fig, name):
    paths.append(report.save_figure(fig, out_dir / f"scale_{name}.png"))

  if "pareto" in claims:
    _plot_pareto(plt, claims["pareto"], runs, save)
  if result["only"] == "pareto":
    return paths
  if "eigendecompositions" in claims:
    _plot_eigendecompositions(plt, claims, runs, save)
  if claims["wallclock"]["summaries"]:   # no run: the time limit
    _plot_wallclock(plt, claims["wallclock"], runs, save)
  if result["only"] is None:
    _plot_robustness_proxy_ablations(plt, claims, runs, save)
  return paths


def _plot_pareto(plt, claim: dict, runs: dict, save) -> None:
  """6. Pareto: final loss against EVDs; loss over steps relative to
  Shampoo f=20's (where X@ε0 and FOAM part from the fixed frequencies)."""
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=70)
  line = claim["fixed_frequency"]
  axes[0].plot([max(p["eigendecompositions"], 1) for p in line],
               [p["final_train_loss"] for p in line], "k.-", lw=1,
               label="Shampoo, fixed f")
  for p in line:
    axes[0].annotate(f"f={p['check_frequency']}",
                     (max(p["eigendecompositions"], 1), p["final_train_loss"]),
                     fontsize=7)
  for name, p in claim["points"].items():
    marker = "x" if p["root_damping"] == "epsilon" else "o"
    axes[0].scatter(p["eigendecompositions"], p["final_train_loss"], s=22,
                    marker=marker, label=name)
  axes[0].set_xscale("log")
  axes[0].set_xlabel("fresh EVDs")
  axes[0].set_ylabel("final train loss")
  axes[0].legend(fontsize=6)
  reference = np.array(runs["shampoo_f20"]["curve"]["train_loss"])
  # The fixed frequencies whose EVD counts bracket FOAM's.
  foam_evds = claim["points"]["foam"]["eigendecompositions"]
  more = [p for p in line if p["eigendecompositions"] >= foam_evds]
  fewer = [p for p in line if p["eigendecompositions"] < foam_evds]
  bracket = ([min(more, key=lambda p: p["eigendecompositions"])] if more
             else []) + ([max(fewer, key=lambda p: p["eigendecompositions"])]
                         if fewer else [])
  for name in ["foam", *PARETO_ABLATIONS,
               *(f"shampoo_f{p['check_frequency']}" for p in bracket)]:
    curve = runs[name]["curve"]
    axes[1].plot(curve["step"], np.array(curve["train_loss"]) / reference,
                 label=name, lw=1.2)
  axes[1].axhline(1.0, color="k", lw=0.6, ls="--")
  axes[1].set_xlabel("step")
  axes[1].set_ylabel("train loss / Shampoo f=20's")
  axes[1].legend(fontsize=6)
  fig.suptitle("Loss against eigendecompositions", fontsize=9)
  save(fig, "pareto")


def _plot_eigendecompositions(plt, claims: dict, runs: dict, save) -> None:
  """1. Cumulative EVDs over steps, and the per-side counts."""
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=70)
  for name in claims["wallclock"]["summaries"]:
    if "eigendecompositions" not in runs[name]["trace"]:
      continue
    trace = runs[name]["trace"]["eigendecompositions"]
    axes[0].plot(np.arange(1, len(trace) + 1), trace, label=name, lw=1.2)
  axes[0].set_yscale("symlog")
  axes[0].set_xlabel("step")
  axes[0].set_ylabel("cumulative fresh EVDs")
  axes[0].legend(fontsize=6)
  evd = claims["eigendecompositions"]
  x = np.arange(2)
  for offset, name in ((-0.2, "foam"), (0.2, "shampoo_f20")):
    axes[1].bar(x + offset, [evd[name]["eigendecompositions_left"],
                             evd[name]["eigendecompositions_right"]],
                width=0.4, label=name)
  axes[1].set_xticks(x, ["left factors", "right factors"])
  axes[1].set_ylabel("fresh EVDs")
  axes[1].legend(fontsize=6)
  fig.suptitle("FOAM vs Shampoo f=20: eigendecompositions", fontsize=9)
  save(fig, "eigendecompositions")


def _plot_wallclock(plt, claim: dict, runs: dict, save) -> None:
  """2. Loss against seconds, and the Pareto plots."""
  summaries = claim["summaries"]
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=70)
  for name in summaries:
    curve = runs[name]["curve"]
    axes[0].plot(curve["seconds"], curve["train_loss"], label=name, lw=1.2)
  if claim["target_train_loss"] is not None:
    axes[0].axhline(claim["target_train_loss"], color="k", lw=0.6, ls="--")
  axes[0].set_xlabel("wall-clock seconds (steps only)")
  axes[0].set_ylabel("train loss")
  axes[0].set_yscale("log")
  axes[0].legend(fontsize=6)
  for ax, key, label in ((axes[1], "eigendecompositions", "fresh EVDs"),
                         (axes[2], "train_seconds", "train seconds")):
    for name, s in summaries.items():
      if s[key] is None:   # an optimizer without `fo.stats`
        continue
      # Log axis: a run without EVDs is drawn at 1.
      x = max(s[key], 1) if key == "eigendecompositions" else s[key]
      ax.scatter(x, s["final_train_loss"], s=18)
      ax.annotate(name.replace("shampoo_", ""), (x, s["final_train_loss"]),
                  fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("final train loss")
  fig.suptitle("Wall-clock and Pareto fronts", fontsize=9)
  save(fig, "wallclock")


def _plot_robustness_proxy_ablations(plt, claims: dict, runs: dict,
                                     save) -> None:
  """3. Robustness: failure fraction per f; 4. the proxy h against the
  true relative error; 5. the ablations' loss against seconds."""
  fractions = claims["robustness"]["failure_fraction"]
  fig, ax = plt.subplots(figsize=(4.5, 3.4), dpi=70)
  x = np.arange(len(fractions["foam"]))
  for offset, name in ((-0.2, "foam"), (0.2, "shampoo")):
    ax.bar(x + offset, list(fractions[name].values()), width=0.4, label=name)
  ax.set_xticks(x, [f"f={f}" for f in fractions["foam"]])
  ax.set_ylabel("fraction of failed runs")
  ax.set_ylim(0, 1)
  ax.legend(fontsize=7)
  fig.suptitle("Robustness over lr × ε0", fontsize=9)
  save(fig, "robustness")

  records = claims["proxy"]["records"]
  fig, ax = plt.subplots(figsize=(4.5, 3.4), dpi=70)
  for source in claims["proxy"]["sources"]:
    mine = [r for r in records if r["source"] == source]
    ax.scatter([r["proxy"] for r in mine], [r["error"] for r in mine], s=8,
               label=source, alpha=0.7)
  for tau in claims["proxy"]["roc_auc"]:
    ax.axhline(float(tau), color="k", lw=0.5, ls=":")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("proxy h")
  ax.set_ylabel("true relative error of X_stale")
  ax.legend(fontsize=7)
  fig.suptitle("Proxy decision utility", fontsize=9)
  save(fig, "proxy")

  fig, ax = plt.subplots(figsize=(4.5, 3.4), dpi=70)
  for name in claims["ablations"]:
    curve = runs[name]["curve"]
    ax.plot(curve["seconds"], curve["train_loss"], label=name, lw=1.2)
  ax.set_yscale("log")
  ax.set_xlabel("wall-clock seconds (steps only)")
  ax.set_ylabel("train loss")
  ax.legend(fontsize=6)
  fig.suptitle("Ablations", fontsize=9)
  save(fig, "ablations")


SUITE = harness.Suite(
    name="scale",
    help="the FOAM paper's claims on a Transformer with 512-wide factors, "
         "1000 steps (about 30 min on 2 CPU cores); --preset gpu: the "
         "wall-clock part on a larger Transformer (about 5.5 min on one GPU)",
    presets={"full": FULL, "quick": QUICK, "gpu": GPU}, run=run,
    units_of_work=units_of_work, seeds=lambda cfg: [0], markdown=markdown,
    plot=plot, block=lambda cfg: BLOCKS[cfg.only], out="bench_scale_out",
    options=(
        harness.Option(("--only",), "only", dict(
            choices=PARTS,
            help="with --suite scale: 'pareto' runs only FOAM, Shampoo at "
                 "every f, FOAM's Pareto points and the X@eps0 ablation "
                 "(about 15 min on 2 CPU cores); 'wallclock' only FOAM and "
                 "Shampoo at every f (and the preset's references), Shampoo "
                 "f=20 first; each with its own block in BENCHMARKS.md")),
        harness.Option(("--time-limit",), "time_limit", dict(
            type=float, metavar="SECONDS",
            help="with --suite scale --only wallclock: no run starts after "
                 "this many seconds and a run stops there (default: the "
                 "preset's; gpu: 330)")),
    ))
