"""Each example trains for a few steps through its command-line entry point
and the loss goes down."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import linen_cnn  # noqa: E402
import nnx_mlp  # noqa: E402


@pytest.mark.parametrize("example", [nnx_mlp, linen_cnn],
                         ids=["nnx_mlp", "linen_cnn"])
def test_example_loss_decreases(example, capsys):
  result = example.main(["--steps", "30", "--optimizer", "foam",
                         "--learning-rate", "1e-2", "--check-frequency", "5",
                         "--log-every", "10"])
  losses = result["losses"]
  assert len(losses) == 30 and np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < 0.9 * losses[0]
  assert result["stats"]["eigendecompositions"] > 0
  assert result["accuracy"] > 0.3   # 10 classes: chance is 0.1
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("step    10 | loss ")
  assert "eigendecompositions" in lines[0] and lines[-1].startswith(
      "test accuracy")
