"""The default suite beyond its quick run (tests/bench/test_harness.py): the
ASGO family through the command line, the linearity in the learning rate
that the trainer relies on, and the trainer's sweep and deadline."""

import json
import math
import re

import jax
import numpy as np
import optax
import pytest

from foam_optax.bench import cli, measure, optimizers, trainer, workloads

ASGO_FAMILY = ("foam_one_sided", "asgo", "asgo_foam", "dasgo")


def test_quick_benchmark_asgo_family(tmp_path, capsys):
  cli.main(["--quick", "--no-progress", "--workloads", "digits_mlp",
            "--seeds", "1", "--optimizers", *ASGO_FAMILY, "--out",
            str(tmp_path)])
  out = capsys.readouterr().out
  raw = json.loads((tmp_path / "results.json").read_text())
  data = raw["workloads"]["digits_mlp"]
  assert set(data["results"]) == {"adamw", *ASGO_FAMILY}
  for name in ASGO_FAMILY:
    summary = data["summary"][name]
    assert re.search(rf"^\| {name} \| \de-0\d \| ", out, re.M), name
    sweep = data["results"][name]["sweep"]
    assert summary["lr"] == min(sweep, key=lambda s: s["final_train_loss"])[
        "lr"]
    assert summary["final_train_loss"] < math.log(10)   # learned something
    assert summary["compile_seconds"] > 0
  stats = {name: data["results"][name]["runs"]["0"]["stats"]
           for name in ("foam_one_sided", "asgo", "asgo_foam")}
  # One factor per weight matrix (the biases go to Adam or to grafting).
  assert {s["num_factors"] for s in stats.values()} == {3}
  # Every-step ASGO computes every factor's root at every step, by Polar
  # Express (no eigendecomposition); one-sided FOAM refreshes its
  # eigenbases only when the proxy asks.
  assert stats["asgo"]["inverse_roots"] == 3 * data["steps"]
  assert stats["asgo"]["eigendecompositions"] == 0
  assert 3 <= stats["asgo_foam"]["eigendecompositions"] < 3 * data["steps"]
  assert data["summary"]["dasgo"]["eigendecompositions"] is None
  assert (tmp_path / "digits_mlp_foam.png").exists()


@pytest.mark.parametrize("name", ("asgo", "asgo_foam", "dasgo"))
def test_asgo_family_updates_are_linear_in_the_learning_rate(name):
  """The trainer scales unit-learning-rate updates by the swept rate: that
  must equal building the optimizer with that rate (weight decay included)."""
  build = optimizers.optimizer_specs()[name].build
  # Drawn with NumPy (JAX's random numbers, op by op, compile per shape).
  rng = np.random.default_rng(0)
  normal = lambda shape: rng.standard_normal(shape, np.float32)
  params = {"embed": normal((12, 6)), "kernel": normal((6, 5)),
            "bias": normal((5,))}
  lr = 0.03
  unit, scaled = build(optax.constant_schedule(1.0)), build(lr)
  unit_state, scaled_state = unit.init(params), scaled.init(params)
  unit_update, scaled_update = (
      jax.jit(tx.update, compiler_options=measure.fast_compile())
      for tx in (unit, scaled))
  for _ in range(3):
    grads = jax.tree.map(lambda p: normal(p.shape), params)
    unit_updates, unit_state = unit_update(grads, unit_state, params)
    scaled_updates, scaled_state = scaled_update(grads, scaled_state, params)
    for u, s in zip(jax.tree.leaves(unit_updates),
                    jax.tree.leaves(scaled_updates)):
      np.testing.assert_allclose(lr * u, s, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("losses,tried,best", [
    # The best rate at the top end: two extensions upwards, then stop.
    ({1e-3: 3.0, 1e-2: 2.0, 1e-1: 1.0, 1.0: 0.5, 10.0: 0.4},
     [1e-3, 1e-2, 1e-1, 1.0, 10.0], 10.0),
    # Bracketed after one extension downwards; non-finite counts as worst.
    ({1e-3: 1.0, 1e-2: 2.0, 1e-1: math.nan, 1e-4: 1.5},
     [1e-4, 1e-3, 1e-2, 1e-1], 1e-3),
    # Bracketed at once.
    ({1e-3: 2.0, 1e-2: 1.0, 1e-1: 3.0}, [1e-3, 1e-2, 1e-1], 1e-2),
])
def test_sweep_extends_the_grid_while_the_best_rate_is_at_an_end(
    losses, tried, best):
  calls, done = [], []
  key = lambda lr: min(losses, key=lambda x: abs(math.log(x / lr)))

  def final_loss(lr):
    calls.append(lr)
    return losses[key(lr)]

  lr, runs = trainer.sweep(final_loss, (1e-3, 1e-2, 1e-1), steps=7,
                           progress=done.append)
  assert lr == pytest.approx(best)
  assert [r["lr"] for r in runs] == pytest.approx(tried)
  assert len(calls) == len(tried)
  # The progress bar counted every possible extension: the rest is paid.
  assert done == [(3 + trainer.MAX_GRID_EXTENSIONS - len(tried)) * 7]


class _Clock:
  """perf_counter stand-in: 0, 1, 2, ... on successive calls."""

  def __init__(self):
    self.now = -1

  def perf_counter(self):
    self.now += 1
    return float(self.now)


def test_a_deadline_stops_a_run_between_steps_and_evaluates_there(
    monkeypatch):
  workload = workloads.kronecker_quadratic(kappa=1e2, rows=8, cols=4,
                                           steps=20)
  compiled = trainer.Trainer(workload,
                             optimizers.optimizer_specs()["adamw"])
  full = compiled.train(0, 20, 1e-2, eval_every=10)
  assert not full["truncated"] and full["curve"]["step"] == [0, 10, 20]
  # The trainer's clock is read once per step, before it: the steps start
  # at times 0, 1, ..., so a deadline of 5.5 lets 6 of them run.
  monkeypatch.setattr(trainer, "time", _Clock())
  cut = compiled.train(0, 20, 1e-2, eval_every=10, deadline=5.5)
  assert cut["truncated"] and len(cut["trace"]["step_seconds"]) == 6
  assert cut["curve"]["step"] == [0, 6]
  # The same trajectory as the full run's, up to the cut.
  assert cut["trace"]["loss"] == full["trace"]["loss"][:6]
