"""The bias suite's pairing, Monte-Carlo figures and schedule (its quick
run: tests/bench/test_harness.py)."""

import numpy as np
import pytest

from foam_optax.bench import bias
from helpers import first_steps


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
  path as tests/test_bias_corrected_adamw.py's Monte-Carlo test."""
  for correction in (False, True):
    assert bias.first_step_mean(0.5, method, correction) == (
        first_steps(
            0.5, method=method, variance_correction=correction,
            cross_fit_safeguard=False))


def test_learning_rates_warm_up_then_decay_to_zero():
  rates = bias.unit_learning_rates(50)
  assert rates[0] == 0.0
  assert rates[bias.WARMUP_STEPS] == pytest.approx(1.0)
  assert np.all(np.diff(rates[bias.WARMUP_STEPS:]) < 0)
  assert rates[-1] < 0.01
