"""The stability suite's measures, the switch workload's purpose and the
hold controller (its quick run: tests/bench/test_harness.py)."""

import jax
import numpy as np
import pytest

from foam_optax import controllers
from foam_optax.bench import measure, stability


def test_spike_is_the_largest_rise_within_a_phase():
  losses = np.array([4.0, 2.0, 3.0, 1.0, 8.0, 2.0, 4.0, 1.0])
  phase = np.array([0, 0, 0, 0, 1, 1, 1])
  # Phase 0: 2 -> 3 is 1/4 of its start; phase 1 (from 8): 2 -> 4 is 2/8.
  assert stability.largest_spike(losses, phase) == 0.25
  assert stability.largest_spike(np.array([3.0, 2.0, 1.0]),
                                 np.array([0, 0])) == 0.0


@pytest.mark.parametrize("losses,diverged_at", [
    ([1.0, 0.5, 0.4], None), ([1.0, 0.5, 10.5], 3), ([1.0, np.inf, 0.1], 2)])
def test_divergence_is_nonfinite_or_ten_times_the_initial_loss(losses,
                                                               diverged_at):
  out = {"eigendecompositions": 0, "checks": 0, "num_factors": 2,
         "damping": np.zeros(2)}
  run = stability.outcome(np.array(losses), np.zeros(2, np.int32), out, 0.1,
                          0, None, 1)
  assert run["diverged"] == (diverged_at is not None)
  assert run["diverged_at"] == diverged_at
  assert (run["spike"] is None) == run["diverged"]


def test_scheduled_evds_count_the_check_steps():
  for f in (1, 7, 20, 30, 100):
    steps = [t for t in range(1, 301)
             if t == 20 or (t > 20 and t % f == 0)]
    assert stability.scheduled_evds(f, 300, 20, 3) == 3 * len(steps)


def test_stale_factor_null_space_diverges_where_every_step_refresh_does_not():
  """The switch workload's purpose: no grafting, p = 4, eps0 = 1e-12."""
  sim = stability.Simulator(stability.regression_family(), 200, 10,
                            measure.fast_compile())
  setting = stability.Setting("s", "none", 4, 1e-12, (3e-2,))
  diverged = {f: sim.run(stability.shampoo("s", "ladder", f), setting, 3e-2,
                         0, 150)["diverged"] for f in (1, 100)}
  assert diverged == {1: False, 100: True}


def test_hold_keeps_the_damping_that_foam_lowers():
  class Cfg:
    epsilon, threshold, max_epsilon, exponent, proxy = 1e-9, 0.75, 3e-7, 2, "exact"

  basis = np.eye(3, dtype=np.float32)
  eigvals = np.array([3.0, 2.0, 1.0], np.float32)
  factor = np.diag(eigvals) + np.float32(1e-3)   # slightly stale: h << tau
  damping = np.float32(1e-7)
  # Each decision one program (op by op, every operation compiles its own).
  decide = lambda controller: jax.jit(
      lambda *arrays: controller(*arrays, Cfg, None))(factor, basis, eigvals,
                                                      damping)
  foam = decide(controllers.foam)
  hold = decide(stability.foam_hold)
  assert float(foam.damping) < 1e-7
  assert float(hold.damping) == pytest.approx(1e-7)
  assert not bool(hold.refresh)
