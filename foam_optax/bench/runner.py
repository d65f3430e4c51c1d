"""Training loops, learning-rate sweep and raw figures.

Each training step is one jitted call, compiled once per (workload,
optimizer) and shared by the sweep and every seed (the learning rate is a
traced argument), and timed individually with `block_until_ready`. Wall-clock
is the sum of those step times: compilation and evaluation are excluded. A
single compiled step (rather than a `lax.scan` over steps) means one
compilation per pairing and an exact step-time distribution from every run.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

import foam_optax as fo
from foam_optax.bench.optimizers import OptimizerSpec, unit_schedule
from foam_optax.bench.workloads import Workload

EVAL_POINTS = 20


class Trainer:
  """Compiled train step and evaluation for one (workload, optimizer)."""

  def __init__(self, workload: Workload, spec: OptimizerSpec):
    self.workload, self.spec = workload, spec
    self.tx = spec.build(unit_schedule())
    self._step = jax.jit(self._train_step)
    self.evaluate = jax.jit(workload.evaluate)

  def _train_step(self, params, opt_state, batch, lr):
    loss, grads = jax.value_and_grad(self.workload.loss_fn)(params, batch)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
    trace = {"loss": loss}
    if self.spec.foam_family:
      stats = fo.stats(opt_state)
      trace["eigendecompositions"] = stats["eigendecompositions"]
      trace["damping_max"] = stats["damping_max"]
      trace["damping_mean"] = stats["damping_mean"]
    return optax.apply_updates(params, updates), opt_state, trace

  def step(self, params, opt_state, batch, lr):
    """One compiled train step; returns (params, opt_state, trace)."""
    return self._step(params, opt_state, batch, lr)

  def init(self, seed):
    params = self.workload.init_params(seed)
    return params, self.tx.init(params)

  def compile(self) -> float:
    """Compiles (by running once) the step and evaluation; returns seconds."""
    start = time.perf_counter()
    params, opt_state = self.init(0)
    batch = jax.tree.map(lambda b: b[0], self.workload.sample_batches(0, 1))
    jax.block_until_ready(self._step(params, opt_state, batch, jnp.float32(0)))
    jax.block_until_ready(self.evaluate(params))
    return time.perf_counter() - start

  def train(self, seed: int, steps: int, lr: float,
            progress: Optional[Callable[[int], object]] = None,
            record: bool = True, eval_points: int = EVAL_POINTS) -> dict:
    """Trains `steps` steps from `seed`.

    Returns ``curve`` (lists over evaluation points: ``step``, ``seconds``
    and the workload's metrics; evaluated `eval_points` times when `record`,
    else only at the start and end), ``trace`` (per-step lists: ``loss``,
    ``step_seconds`` and, for foam_optax optimizers, cumulative
    ``eigendecompositions``, ``damping_max`` and ``damping_mean`` over the
    factors), ``stats`` (final
    `fo.stats`, foam_optax optimizers only) and ``state_bytes``.
    """
    params, opt_state = self.init(seed)
    batches = self.workload.sample_batches(seed, steps)
    lr = jnp.float32(lr)
    eval_every = max(1, steps // eval_points) if record else steps
    curve = {"step": [0], "seconds": [0.0]}
    for key, value in self.evaluate(params).items():
      curve[key] = [float(value)]
    trace, elapsed = {"step_seconds": []}, 0.0
    for i in range(steps):
      batch = jax.tree.map(lambda b: b[i], batches)
      tic = time.perf_counter()
      params, opt_state, step_trace = jax.block_until_ready(
          self._step(params, opt_state, batch, lr))
      seconds = time.perf_counter() - tic
      elapsed += seconds
      trace["step_seconds"].append(seconds)
      for key, value in step_trace.items():
        trace.setdefault(key, []).append(float(value))
      if (i + 1) % eval_every == 0 or i + 1 == steps:
        curve["step"].append(i + 1)
        curve["seconds"].append(elapsed)
        for key, value in self.evaluate(params).items():
          curve[key].append(float(value))
      if progress:
        progress(1)
    result = {"curve": curve, "trace": trace,
              "state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(opt_state)))}
    if self.spec.foam_family:
      result["stats"] = {k: float(v) for k, v in fo.stats(opt_state).items()}
    return result


MAX_GRID_EXTENSIONS = 2   # extra sweep points past an edge of the grid


def _finite_or_inf(x):
  return x if math.isfinite(x) else math.inf


def benchmark_pair(workload: Workload, spec: OptimizerSpec, seeds, steps: int,
                   sweep_steps: int,
                   progress: Optional[Callable[[int], object]] = None
                   ) -> dict:
  """Learning-rate sweep (seed `seeds[0]`, `sweep_steps`, best final train
  loss wins) then one run per seed at the chosen rate.

  When the best rate sits at an end of the grid, the grid is extended past
  that end by the grid's own ratio, up to `MAX_GRID_EXTENSIONS` times, so
  the chosen rate is a bracketed optimum rather than an edge.
  """
  trainer = Trainer(workload, spec)
  compile_seconds = trainer.compile()
  sweep = []

  def try_rate(lr):
    run = trainer.train(seeds[0], sweep_steps, lr, progress, record=False)
    sweep.append({"lr": lr, "final_train_loss": run["curve"]["train_loss"][-1]})

  for lr in spec.lr_grid:
    try_rate(lr)
  grid = sorted(spec.lr_grid)
  ratio = grid[-1] / grid[-2] if len(grid) > 1 else 3.0
  extensions = 0
  while extensions < MAX_GRID_EXTENSIONS and len(grid) > 1:
    best = min(sweep, key=lambda s: _finite_or_inf(s["final_train_loss"]))
    tried = sorted(s["lr"] for s in sweep)
    if best["lr"] == tried[-1]:
      try_rate(tried[-1] * ratio)
    elif best["lr"] == tried[0]:
      try_rate(tried[0] / ratio)
    else:
      break
    extensions += 1
  if progress is not None:   # the bar counted every possible extension
    progress((MAX_GRID_EXTENSIONS - extensions) * sweep_steps)
  best = min(sweep, key=lambda s: _finite_or_inf(s["final_train_loss"]))
  runs = {str(seed): trainer.train(seed, steps, best["lr"], progress)
          for seed in seeds}
  return {"optimizer": spec.name, "settings": spec.settings,
          "lr": best["lr"], "sweep": sorted(sweep, key=lambda s: s["lr"]),
          "compile_seconds": compile_seconds, "runs": runs}


def units_of_work(num_seeds, steps, sweep_steps, grid_size):
  """Progress-bar units (steps) that `benchmark_pair` reports."""
  return (grid_size + MAX_GRID_EXTENSIONS) * sweep_steps + num_seeds * steps
