"""`foam-bench --suite bias --quick`: run in-process into a temporary
directory; every pair reported, every run finished, the paired differences
taken seed by seed, the learning rate of each corrected method its
uncorrected self's."""

import json
import math

import numpy as np
import pytest

from foam_optax.bench import bias
from foam_optax.bench import cli
import test_bias_correction


def test_quick_bias_suite(tmp_path, capsys):
  cli.main(["--suite", "bias", "--quick", "--no-progress", "--out",
            str(tmp_path)])
  out = capsys.readouterr().out
  raw = json.loads((tmp_path / "results.json").read_text())
  cfg = bias.QUICK
  suite = {m.name: m for m in bias.methods()}
  assert set(raw["results"]) == set(suite)
  seeds = [str(s) for s in cfg.seeds]
  for name, result in raw["results"].items():
    assert list(result["runs"]) == seeds
    for run in result["runs"].values():
      assert len(run["losses"]) == len(run["step_seconds"]) == cfg.steps
      assert all(math.isfinite(x) for x in run["losses"])
      assert math.isfinite(run["test_loss"]) and math.isfinite(
          run["train_loss"])
    # One sweep per family, on the uncorrected method; its best rate is
    # every family member's.
    sweep = raw["sweeps"][suite[name].family]
    losses = {r["lr"]: r["final_train_loss"] for r in sweep["runs"]}
    assert sweep["seed"] not in cfg.seeds
    assert result["lr"] == sweep["lr"] == min(losses, key=losses.get)
    assert result["memory"]["total_bytes"] > 0
  # Every corrected method (and the control) is paired with its uncorrected
  # self, seed by seed.
  corrected = {n for n, m in suite.items() if m.corrected}
  assert corrected == {"adamw_loo", "adamw_two_group", "shampoo_cfv",
                       "shampoo_cf", "foam_cfv", "soap_cf"}
  assert set(raw["pairs"]) == corrected | {"adamw_first_half"}
  for name, pair in raw["pairs"].items():
    base = suite[name].baseline
    assert pair["baseline"] == base and pair["corrected"] == (
        name in corrected)
    assert pair["seeds"] == list(cfg.seeds)
    expected = [raw["results"][name]["runs"][s]["test_loss"]
                - raw["results"][base]["runs"][s]["test_loss"] for s in seeds]
    np.testing.assert_allclose(pair["test_loss_differences"], expected)
    spread = pair["test_loss_difference"]
    np.testing.assert_allclose(spread["mean"], np.mean(expected))
    np.testing.assert_allclose(spread["std"], np.std(expected, ddof=1))
    assert f"| {name} | " in out
  # Two targets per pair, each printed with its verdict.
  assert len(raw["targets"]) == 2 * len(corrected)
  for target in raw["targets"].values():
    verdict = "met" if target["met"] else "missed"
    assert f"| {target['target']} | {target['measured']} | {verdict} |" in out
  for name in corrected:
    pair = raw["pairs"][name]
    held_out = raw["targets"][f"{name}_held_out_le_{pair['baseline']}"]
    assert held_out["met"] == (pair["test_loss_difference"]["mean"] <= 0)
  # The per-microbatch gradients are the compiled function's outputs.
  cost = raw["gradient_cost"]
  assert cost["microbatch_grads_bytes"] == (cfg.num_microbatches
                                            * cost["param_bytes"])
  assert (cost["microbatch_grads"]["memory"]["output"]
          >= cost["microbatch_grads_bytes"]
          > cost["value_and_grad"]["memory"]["output"])
  assert (tmp_path / "bias_paired.png").exists()


def test_pairs_use_only_the_seeds_both_ran():
  run = lambda loss: {"test_loss": loss, "train_loss": 2 * loss}
  corrected = {"runs": {"0": run(1.0), "1": run(2.0), "2": run(4.0)}}
  uncorrected = {"runs": {"1": run(1.5), "2": run(3.0), "3": run(9.0)}}
  pair = bias.paired(corrected, uncorrected)
  assert pair["seeds"] == [1, 2]
  assert pair["test_loss_differences"] == [0.5, 1.0]
  assert pair["train_loss_differences"] == [1.0, 2.0]
  assert pair["test_loss_difference"]["mean"] == pytest.approx(0.75)
  assert pair["test_loss_difference"]["se"] == pytest.approx(
      np.std([0.5, 1.0], ddof=1) / np.sqrt(2))


@pytest.mark.parametrize("method", ["two_group", "leave_one_out"])
def test_monte_carlo_figures_are_the_tests(method):
  """BENCHMARKS.md's Monte-Carlo table comes from the same draws and code
  path as tests/test_bias_correction.py's Monte-Carlo test."""
  for correction in (False, True):
    assert bias.first_step_mean(0.5, method, correction) == (
        test_bias_correction._first_steps(
            0.5, method=method, variance_correction=correction))


def test_learning_rates_warm_up_then_decay_to_zero():
  rates = bias.unit_learning_rates(50)
  assert rates[0] == 0.0
  assert rates[bias.WARMUP_STEPS] == pytest.approx(1.0)
  assert np.all(np.diff(rates[bias.WARMUP_STEPS:]) < 0)
  assert rates[-1] < 0.01
