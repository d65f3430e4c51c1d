"""The benchmark's trainer: one compiled train step, timed training runs,
the learning-rate sweep and the time to a target loss.

The optimizer is built once at a unit learning rate; each step multiplies
its updates by the step's learning rate, a traced argument. This is exact
for every optimizer the suites run (their updates are linear in the
learning rate, see `foam_optax.bench.optimizers`), so one compilation per
(workload, optimizer) serves the sweep, every seed and every schedule.

Each step is one call of the compiled step, timed alone with
`block_until_ready`: a run's wall-clock is the sum of its step times
(compilation and evaluation excluded) and every step time is recorded. A
single compiled step, rather than a `lax.scan` over steps, gives one
compilation per pairing and an exact step-time distribution from every
run. (Suites that run thousands of short runs, `stability` and `transfer`,
compile whole runs as one `lax.scan` instead and do not time steps.)
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import foam_optax as fo
from foam_optax.bench import measure
from foam_optax.bench.optimizers import OptimizerSpec, unit_schedule
from foam_optax.bench.workloads import Workload

Progress = Optional[Callable[[int], object]]
MAX_GRID_EXTENSIONS = 2   # extra sweep points past an end of the grid


class Trainer:
  """A compiled train step of `spec` on `workload`, and runs with it.

  Args:
    workload: the problem.
    spec: the optimizer, built at `unit_learning_rate`.
    unit_learning_rate: the learning rate (or schedule) the optimizer is
      built with; each step's updates are multiplied by the run's rate.
      Default: `optimizers.unit_schedule()` (a short warmup to 1).
    microbatches: when set, the step takes the gradients of this many
      microbatches of the batch (`fo.microbatch_grads`) and passes them to
      the optimizer's ``update(..., microbatch_grads=...)``.
    batch_transform: applied to each batch inside the step (e.g. a
      control that trains on part of it).
    trace_stats: record `fo.stats`' eigendecompositions and damping at
      every step (default: whether `fo.stats` applies, ``spec.foam_family``).
    evaluate: a jitted evaluation to share between trainers (compiled once);
      by default the trainer compiles the workload's own, and its
      compilation counts in `compile_seconds`.
    compiler_options: XLA options of the step and of its own evaluation
      (`measure.compiler_options`); None: XLA's defaults.

  Attributes:
    compile_seconds: seconds to trace and compile the step (and the
      evaluation, unless shared).
    memory: XLA's buffer sizes of the compiled step (`measure.memory`).
  """

  def __init__(self, workload: Workload, spec: OptimizerSpec, *,
               unit_learning_rate=None, microbatches: Optional[int] = None,
               batch_transform: Optional[Callable] = None,
               trace_stats: Optional[bool] = None,
               evaluate: Optional[Callable] = None,
               compiler_options: Optional[dict] = None):
    self.workload, self.spec = workload, spec
    self._compiler_options = compiler_options or {}
    # Any: the optimizers of the suites take extra `update` arguments.
    self.tx: Any = spec.build(unit_schedule() if unit_learning_rate is None
                              else unit_learning_rate)
    trace_stats = spec.foam_family if trace_stats is None else trace_stats

    def train_step(params, opt_state, batch, lr):
      if batch_transform is not None:
        batch = batch_transform(batch)
      if microbatches is None:
        loss, grads = jax.value_and_grad(workload.loss_fn)(params, batch)
        updates, opt_state = self.tx.update(grads, opt_state, params)
      else:
        loss, grads, micro = fo.microbatch_grads(
            workload.loss_fn, params, batch, microbatches)
        updates, opt_state = self.tx.update(grads, opt_state, params,
                                            microbatch_grads=micro)
      updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
      trace = {"loss": loss}
      if trace_stats:
        stats = fo.stats(opt_state)
        for key in ("eigendecompositions", "damping_max", "damping_mean"):
          trace[key] = stats[key]
      return optax.apply_updates(params, updates), opt_state, trace

    params, opt_state = self.init(0)
    batch = jax.tree.map(lambda b: b[0], workload.sample_batches(0, 1))
    self.step, trace_seconds, compile_seconds = measure.lower_and_compile(
        train_step, params, opt_state, batch, jnp.float32(0),
        **self._compiler_options)
    self.compile_seconds = trace_seconds + compile_seconds
    self.memory = measure.memory(self.step)
    self.evaluate: Callable = evaluate if evaluate is not None else (
        self._compile_evaluation(params))

  def _compile_evaluation(self, params) -> Callable:
    """The workload's evaluation, compiled; its seconds count in
    `compile_seconds`."""
    compiled, *seconds = measure.lower_and_compile(
        self.workload.evaluate, params, **self._compiler_options)
    self.compile_seconds += sum(seconds)
    return compiled

  def init(self, seed: int):
    """(parameters, optimizer state) of `seed`."""
    params = self.workload.init_params(seed)
    return params, self.tx.init(params)

  def train(self, seed: int, steps: int, lr: float, *,
            schedule: Optional[Callable[[int], np.ndarray]] = None,
            eval_every: Optional[int] = None, progress: Progress = None,
            deadline: float = math.inf) -> dict:
    """Trains `steps` steps from `seed` at learning rate `lr`.

    Args:
      seed: parameters and batches.
      steps: training steps.
      lr: the learning rate, or the peak of `schedule`.
      schedule: ``schedule(steps)`` -> per-step multipliers of `lr`
        (float32); None: `lr` at every step.
      eval_every: evaluate every this many steps; None: only at the start
        and the end.
      progress: called with 1 after every step.
      deadline: a `time.perf_counter` value; the run stops between two
        steps once it has passed (and is then evaluated where it stopped).

    Returns:
      ``curve`` (lists over evaluations: ``step``, ``seconds`` of training
      so far and the workload's metrics), ``trace`` (per-step lists:
      ``loss``, ``step_seconds`` and, with `trace_stats`, the cumulative
      ``eigendecompositions``, ``damping_max`` and ``damping_mean``),
      ``state_bytes``, ``truncated`` (stopped by the deadline) and, for
      ``spec.foam_family``, ``stats`` (final `fo.stats`).
    """
    params, opt_state = self.init(seed)
    batches = self.workload.sample_batches(seed, steps)
    if schedule is None:
      rates = [jnp.float32(lr)] * steps
    else:
      rates = [jnp.float32(rate) for rate in lr * schedule(steps)]
    every = steps if eval_every is None else max(1, eval_every)
    curve = {"step": [0], "seconds": [0.0]}
    for key, value in self.evaluate(params).items():
      curve[key] = [float(value)]

    def record(step):
      curve["step"].append(step)
      curve["seconds"].append(elapsed)
      for key, value in self.evaluate(params).items():
        curve[key].append(float(value))

    trace, elapsed, done = {"step_seconds": []}, 0.0, 0
    for i in range(steps):
      if time.perf_counter() > deadline:
        break
      batch = jax.tree.map(lambda b: b[i], batches)
      (params, opt_state, step_trace), seconds = measure.call_timed(
          self.step, params, opt_state, batch, rates[i])
      elapsed += seconds
      done = i + 1
      trace["step_seconds"].append(seconds)
      for key, value in step_trace.items():
        trace.setdefault(key, []).append(float(value))
      if done % every == 0 or done == steps:
        record(done)
      if progress:
        progress(1)
    truncated = done < steps
    if truncated and curve["step"][-1] != done:
      record(done)
    result = {"curve": curve, "trace": trace, "truncated": truncated,
              "state_bytes": measure.tree_bytes(opt_state)}
    if self.spec.foam_family:
      result["stats"] = {k: float(v) for k, v in fo.stats(opt_state).items()}
    return result


def _finite_or_inf(x: float) -> float:
  return x if math.isfinite(x) else math.inf


def sweep(final_loss: Callable[[float], float], grid: Sequence[float], *,
          max_extensions: int = MAX_GRID_EXTENSIONS, progress: Progress = None,
          steps: int = 0) -> tuple[float, list[dict]]:
  """The learning rate of `grid` with the lowest ``final_loss(lr)``.

  While the best rate sits at an end of the rates tried, one more rate past
  that end (by the grid's own ratio) is tried, at most `max_extensions`
  times, so that the rate chosen is a bracketed optimum rather than an
  edge. Non-finite losses count as infinite. `progress` is then called with
  the `steps` of the extensions not run (a progress bar counts them all).

  Returns:
    ``(best_lr, [{"lr", "final_train_loss"}, ...])``, the tried rates in
    increasing order.
  """
  losses: dict = {}
  for lr in grid:
    losses[lr] = final_loss(lr)
  ordered = sorted(grid)
  extensions = 0
  while extensions < max_extensions and len(ordered) > 1:
    ratio = ordered[-1] / ordered[-2]
    best = min(losses, key=lambda lr: _finite_or_inf(losses[lr]))
    tried = sorted(losses)
    if best == tried[-1]:
      losses[best * ratio] = final_loss(best * ratio)
    elif best == tried[0]:
      losses[best / ratio] = final_loss(best / ratio)
    else:
      break
    extensions += 1
  if progress is not None:
    progress((max_extensions - extensions) * steps)
  best = min(losses, key=lambda lr: _finite_or_inf(losses[lr]))
  return best, [{"lr": lr, "final_train_loss": losses[lr]}
                for lr in sorted(losses)]


def first_reach(steps: Sequence, seconds: Sequence, losses: Sequence,
                target: float) -> tuple[Optional[int], Optional[float]]:
  """(step, seconds) of the first evaluation with loss <= `target`;
  ``(None, None)`` if none."""
  for step, second, loss in zip(steps, seconds, losses):
    if loss <= target:
      return step, second
  return None, None


def seconds_to(curve: dict, target: float) -> Optional[float]:
  """Training seconds until a run's train loss first reached `target`
  (None: never, at its evaluations)."""
  return first_reach(curve["step"], curve["seconds"], curve["train_loss"],
                     target)[1]
