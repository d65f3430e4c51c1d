"""Smoke tests of `foam-bench --quick` and `foam-bench --suite scale --quick`:
run in-process into a temporary directory and check the JSON structure and
that every figure is finite."""

import json
import math
import re

import jax
import numpy as np
import optax
import pytest

from foam_optax.bench import cli
from foam_optax.bench import optimizers
from foam_optax.bench import runner
from foam_optax.bench import scale
from json_numbers import json_numbers

SUMMARY_KEYS = {"lr", "final_train_loss", "final_test_loss", "steps_to_target",
                "seconds_to_target", "train_seconds", "step_ms_median",
                "step_ms_p95", "eigendecompositions", "state_bytes",
                "compile_seconds"}


def test_quick_benchmark(tmp_path, capsys):
  cli.main(["--quick", "--no-progress", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  assert "| optimizer |" in out
  raw = json.loads((tmp_path / "results.json").read_text())
  assert set(raw) == {"meta", "workloads", "targets"}
  # The targets table: one row per target, its verdict in the last column.
  for target in raw["targets"].values():
    verdict = "met" if target["met"] else "missed"
    assert f"| {target['target']} | {target['measured']} | {verdict} |" in out
  assert set(raw["workloads"]) == set(cli.QUICK["workloads"])
  for data in raw["workloads"].values():
    assert set(data["results"]) == set(cli.QUICK["optimizers"])
    assert math.isfinite(data["target_train_loss"])
    for name, result in data["results"].items():
      assert len(result["runs"]) == cli.QUICK["seeds"]
      # The grid, extended past an end only while the best rate sits there.
      rates = [s["lr"] for s in result["sweep"]]
      losses = [math.inf if s["final_train_loss"] is None
                else s["final_train_loss"] for s in result["sweep"]]
      extra = len(rates) - 3
      assert 0 <= extra <= runner.MAX_GRID_EXTENSIONS
      assert rates == sorted(rates) and result["lr"] in rates
      best = result["lr"]
      assert losses[rates.index(best)] == min(losses)
      if extra < runner.MAX_GRID_EXTENSIONS:
        assert rates[0] < best < rates[-1]
      for run in result["runs"].values():
        assert len(run["trace"]["step_seconds"]) == data["steps"]
        assert all(math.isfinite(x) for x in run["curve"]["train_loss"])
      summary = data["summary"][name]
      assert SUMMARY_KEYS <= set(summary)
      assert summary["final_train_loss"] is not None
      assert summary["compile_seconds"] > 0
    assert data["summary"]["foam"]["eigendecompositions"] > 0
  # Non-finite values are stored as null; every stored number is finite.
  assert all(math.isfinite(x) for x in json_numbers(raw))
  assert (tmp_path / "table.md").exists()
  assert sorted(p.name for p in tmp_path.glob("*.png"))


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
  assert all(math.isfinite(x) for x in json_numbers(raw))
  assert (tmp_path / "digits_mlp_foam.png").exists()


@pytest.mark.parametrize("name", ("asgo", "asgo_foam", "dasgo"))
def test_asgo_family_updates_are_linear_in_the_learning_rate(name):
  """The runner scales unit-learning-rate updates by the swept rate: that
  must equal building the optimizer with that rate (weight decay included)."""
  build = optimizers.optimizer_specs()[name].build
  keys = jax.random.split(jax.random.key(0), 4)
  params = {"embed": jax.random.normal(keys[0], (12, 6)),
            "kernel": jax.random.normal(keys[1], (6, 5)),
            "bias": jax.random.normal(keys[2], (5,))}
  lr = 0.03
  unit, scaled = build(optax.constant_schedule(1.0)), build(lr)
  unit_state, scaled_state = unit.init(params), scaled.init(params)
  unit_update, scaled_update = jax.jit(unit.update), jax.jit(scaled.update)
  for key in jax.random.split(keys[3], 3):
    grads = jax.tree.map(
        lambda p, k=key: jax.random.normal(k, p.shape), params)
    unit_updates, unit_state = unit_update(grads, unit_state, params)
    scaled_updates, scaled_state = scaled_update(grads, scaled_state, params)
    for u, s in zip(jax.tree.leaves(unit_updates),
                    jax.tree.leaves(scaled_updates)):
      np.testing.assert_allclose(lr * u, s, rtol=1e-5, atol=1e-8)


def test_quick_scale_suite(tmp_path, capsys):
  cli.main(["--suite", "scale", "--quick", "--no-progress", "--out",
            str(tmp_path)])
  out = capsys.readouterr().out
  assert "| target | measured | met/missed |" in out
  raw = json.loads((tmp_path / "results.json").read_text())
  assert set(raw) == {"meta", "workload", "only", "compile_seconds", "runs",
                      "claims", "targets"}
  cfg = scale.QUICK
  pareto_runs = {scale.pareto_name(*point) for point in cfg.pareto_points}
  seeds = {f"{name}_seed{seed}" for seed in cfg.spread_seeds
           for name in ("foam", f"shampoo_f{cfg.spread_frequency}")}
  line = set(cfg.frequencies) | set(cfg.line_frequencies)
  assert set(raw["runs"]) == ({"foam"} | set(scale.ABLATIONS) | pareto_runs
                              | seeds | {f"shampoo_f{f}" for f in line})
  for run in raw["runs"].values():
    assert len(run["trace"]["step_seconds"]) == cfg.steps
    stats = run["stats"]
    assert (stats["eigendecompositions_left"]
            + stats["eigendecompositions_right"]) == stats["eigendecompositions"]
  claims = raw["claims"]
  assert set(claims) == {"eigendecompositions", "wallclock", "robustness",
                         "proxy", "ablations", "pareto"}
  assert set(claims["pareto"]["points"]) == (
      {"foam", *scale.PARETO_ABLATIONS} | pareto_runs)
  # Shampoo f=1 refreshes every factor every step from the first check on.
  f1 = raw["runs"]["shampoo_f1"]["stats"]
  start = scale.foam_settings()["start_preconditioning_step"]
  assert f1["eigendecompositions"] == f1["num_factors"] * (cfg.steps - start + 1)
  robustness = claims["robustness"]
  assert len(robustness["runs"]) == (2 * len(cfg.robustness_frequencies)
                                     * len(cfg.robustness_epsilons)
                                     * len(cfg.robustness_lrs))
  for fractions in robustness["failure_fraction"].values():
    assert all(0.0 <= x <= 1.0 for x in fractions.values())
  proxy = claims["proxy"]
  assert proxy["finite_pairs"] > 0
  assert all(r["error"] >= 0 and r["proxy"] >= 0 for r in proxy["records"])
  assert set(raw["targets"]) == {
      "foam_fastest_to_shampoo_f20_loss", "foam_evds_le_20pct_of_shampoo_f20",
      "foam_robustness_le_shampoo", "proxy_roc_auc_ge_0.9"}
  for target in raw["targets"].values():
    assert {"target", "measured", "met"} <= set(target)
  assert all(math.isfinite(x) for x in json_numbers(raw))
  assert sorted(p.name for p in tmp_path.glob("scale_*.png")) == [
      "scale_ablations.png", "scale_eigendecompositions.png",
      "scale_pareto.png", "scale_proxy.png", "scale_robustness.png",
      "scale_wallclock.png"]


def test_quick_scale_pareto_part(tmp_path):
  cli.main(["--suite", "scale", "--only", "pareto", "--quick",
            "--no-progress", "--out", str(tmp_path)])
  raw = json.loads((tmp_path / "results.json").read_text())
  assert raw["only"] == "pareto"
  assert set(raw["claims"]) == {"eigendecompositions", "wallclock",
                                "ablations", "pareto"}
  points = raw["claims"]["pareto"]["points"]
  assert points["foam_x_at_eps0"]["root_damping"] == "epsilon"
  spread = raw["claims"]["pareto"]["spread"]
  assert spread["seeds"] == [0, *scale.QUICK.spread_seeds]
  for losses in spread["final_train_loss"].values():
    assert len(losses) == len(spread["seeds"])
  assert raw["runs"]["foam_x_at_eps0"]["settings"]["root_damping"] == "epsilon"
  assert [p.name for p in tmp_path.glob("*.png")] == ["scale_pareto.png"]


def test_frontier_loss_interpolates_in_log_evds():
  frontier = [(10.0, 2.0), (1000.0, 1.0)]
  assert scale.frontier_loss(frontier, 100.0) == 1.5
  assert scale.frontier_loss(frontier, 10.0) == 2.0
  assert scale.frontier_loss(frontier, 5.0) is None


def test_stale_inverse_root_error_is_zero_for_a_fresh_basis():
  rng = np.random.default_rng(0)
  g = rng.standard_normal((6, 6))
  factor = g @ g.T
  eigvals, basis = np.linalg.eigh(factor)
  assert scale.true_relative_error(factor, basis, eigvals, 1e-3, 2) < 1e-12
  # A stale basis of a different factor gives a positive error.
  other = factor + 3.0 * np.diag(np.arange(6.0))
  assert scale.true_relative_error(other, basis, eigvals, 1e-3, 2) > 1e-2
