"""`foam-bench --suite stability`: the quick run in-process, the suite's
measures, the switch workload's purpose and the hold controller."""

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from foam_optax import controllers
from foam_optax.bench import cli
from foam_optax.bench import stability


def test_quick_stability_suite(tmp_path, capsys):
  cli.main(["--suite", "stability", "--quick", "--no-progress", "--out",
            str(tmp_path)])
  out = capsys.readouterr().out
  raw = json.loads((tmp_path / "results.json").read_text())
  assert set(raw) == {"meta", "config", "workloads", "policy", "targets"}
  assert raw["meta"]["openblas"]["OPENBLAS_NUM_THREADS"]
  cfg = stability.QUICK
  for target in raw["targets"].values():
    verdict = "met" if target["met"] else "missed"
    assert f"| {target['target']} | {target['measured']} | {verdict} |" in out
  for w in cfg.workloads:
    for s in w.settings:
      setting = raw["workloads"][w.name]["settings"][s.name]
      methods = setting["methods"]
      expected = ({"foam", "shampoo_equal_evd"}
                  | {f"shampoo_f{f}" for f in cfg.ladder}
                  | {m.name for m in cfg.policy}
                  | {m.name for m in stability.figure1_methods()})
      assert set(methods) == expected
      for m in methods.values():
        assert len(m["runs"]) == len(s.lrs) * cfg.seeds
        for run in m["runs"]:
          assert math.isfinite(run["initial_loss"])
          assert (run["switch_step"] is None) != w.switches
          assert len(run["curve"]) == cfg.steps // cfg.curve_every + 1
      # Equal budget: Shampoo's schedule gives it at least FOAM's mean EVDs,
      # and a larger f would not (or f is already the run's length).
      f = setting["equal_evd_frequency"]
      factors = methods["foam"]["runs"][0]["num_factors"]
      foam_evds = methods["foam"]["summary"]["eigendecompositions"]
      scheduled = lambda f: stability.scheduled_evds(
          f, cfg.steps, stability.START, factors)
      assert scheduled(f) >= foam_evds
      assert f == cfg.steps or scheduled(f + 1) < foam_evds
      # Shampoo f=1 refreshes every factor on every step from the first check.
      for run in methods["shampoo_f1"]["runs"]:
        assert run["diverged"] or run["eigendecompositions"] == factors * (
            cfg.steps - stability.START + 1)
  assert sorted(p.name for p in tmp_path.glob("*.png")) == [
      "stability_divergences.png", "stability_switch.png"]


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
  sim = stability.Simulator(stability.regression_family(), 200, 10)
  setting = stability.Setting("s", "none", 4, 1e-12, (3e-2,))
  diverged = {f: sim.run(stability.shampoo("s", "ladder", f), setting, 3e-2,
                         0, 150)["diverged"] for f in (1, 100)}
  assert diverged == {1: False, 100: True}


def test_hold_keeps_the_damping_that_foam_lowers():
  class Cfg:
    epsilon, threshold, max_epsilon, exponent, proxy = 1e-9, 0.75, 3e-7, 2, "exact"

  basis = jnp.eye(3)
  eigvals = jnp.array([3.0, 2.0, 1.0])
  factor = jnp.diag(eigvals) + 1e-3   # slightly stale: h well below tau
  damping = jnp.asarray(1e-7)
  foam = controllers.foam(factor, basis, eigvals, damping, Cfg, None)
  hold = stability.foam_hold(factor, basis, eigvals, damping, Cfg, None)
  assert float(foam.damping) < 1e-7
  assert float(hold.damping) == pytest.approx(1e-7)
  assert not bool(hold.refresh)
