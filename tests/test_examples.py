"""Each example trains for a few steps through its command-line entry point
and the loss goes down."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))

import linen_cnn  # noqa: E402
import mup_transfer  # noqa: E402
import nnx_mlp  # noqa: E402


@pytest.mark.parametrize("example", [nnx_mlp, linen_cnn, mup_transfer],
                         ids=["nnx_mlp", "linen_cnn", "mup_transfer"])
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


@pytest.mark.parametrize("optimizer", ["shampoo", "soap"])
@pytest.mark.parametrize("example", [
    nnx_mlp,
    # Slow: the flag goes through the same `common` code as nnx_mlp's, and
    # the Linen loop is the one test_example_loss_decreases trains.
    pytest.param(linen_cnn, marks=pytest.mark.slow)],
                         ids=["nnx_mlp", "linen_cnn"])
def test_example_runs_with_shampoo_and_soap(example, optimizer, capsys):
  """A short run per baseline optimizer through the same entry point: the
  flag reaches the optimizer, its counters are logged, the loss goes down."""
  result = example.main(["--steps", "10", "--optimizer", optimizer,
                         "--learning-rate", "1e-2", "--check-frequency", "5",
                         "--log-every", "5"])
  losses = result["losses"]
  assert len(losses) == 10 and np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < 0.98 * losses[0]
  stats = result["stats"]
  assert stats["step"] == 10 and stats["eigendecompositions"] > 0
  assert stats["eigendecomposition_failures"] == 0
  assert stats["nonfinite_skips"] == 0
  assert 0.0 <= result["accuracy"] <= 1.0
  lines = capsys.readouterr().out.splitlines()
  assert [l.split(" | ")[0] for l in lines[:2]] == ["step     5", "step    10"]
  assert all("eigendecompositions" in l for l in lines[:2])
  assert lines[-1].startswith("test accuracy")


def test_mesh_2d_example_trains_on_8_devices():
  """The data x model example in its own process (it needs 8 devices, which
  XLA creates only before JAX starts), under a timeout."""
  import host_devices
  lines = host_devices.run(
      ["examples/mesh_2d.py", "--steps", "30", "--learning-rate", "1e-2",
       "--check-frequency", "5", "--log-every", "10"], 300).splitlines()
  losses = [float(l.split("loss ")[1].split()[0]) for l in lines
            if l.startswith("step")]
  assert len(losses) == 3 and losses[-1] < 0.6 * losses[0]
  assert "eigendecompositions" in lines[0]
  assert lines[-1].startswith("mesh {'data': 4, 'model': 2} | test accuracy")
  assert float(lines[-1].split()[-1]) > 0.5


def test_nnx_scan_example_gives_each_layer_its_own_factors(capsys):
  """The scanned blocks' (depth, width, width) kernel is preconditioned per
  layer (batch axis 0), their stacked biases get grafting only."""
  import jax
  import foam_optax as fo
  import nnx_scan

  result = nnx_scan.main(["--steps", "20", "--learning-rate", "1e-2",
                          "--check-frequency", "5", "--log-every", "10"])
  losses = result["losses"]
  assert np.all(np.isfinite(losses)) and np.mean(losses[-5:]) < 0.95 * losses[0]
  assert result["stats"]["eigendecompositions"] > 0
  layouts = {layout.shape: layout
             for core in fo.find_states(result["opt_state"])
             for layout in core.layouts}
  kernel, bias = layouts[(3, 32, 32)], layouts[(3, 32)]
  assert kernel.batch == 3 and kernel.matrix_shape == (32, 32)
  assert not bias.preconditioned
  assert capsys.readouterr().out.splitlines()[-1].startswith("test accuracy")


def test_mup_transfer_example_scales_the_rates_with_width(capsys):
  """Trained at 4x the base width with AdamW: the μP multipliers of Adam's
  rule reach the optimizer and the loss goes down at the base's rate."""
  result = mup_transfer.main(["--steps", "20", "--optimizer", "adamw",
                              "--learning-rate", "1e-2", "--width", "256",
                              "--base-width", "64", "--log-every", "10"])
  kernels = {name: layer["kernel"]
             for name, layer in result["multipliers"].items()}
  # 1 / r_in: input 64 -> width, hidden, readout width -> 10.
  assert kernels == {"input": 1.0, "hidden": 0.25, "readout": 0.25}
  assert all(layer["bias"] == 1.0 for layer in result["multipliers"].values())
  losses = result["losses"]
  assert np.all(np.isfinite(losses)) and np.mean(losses[-5:]) < 0.9 * losses[0]
  assert capsys.readouterr().out.splitlines()[-1].startswith("test accuracy")


def test_readme_mup_snippet_runs_with_the_examples_mlp():
  """docs/mup.md's first block as pasted, with the example's MLP: the chain
  initialises on the width-1024 model and the multipliers are the grafted
  rule's 1/8 for the hidden and readout kernels."""
  import pathlib
  import re
  page = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "mup.md"
          ).read_text()
  section = page[page.index("# Hyperparameter transfer across widths"):]
  code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
  namespace = {"MLP": mup_transfer.MLP}
  exec(compile(code, "docs/mup.md", "exec"), namespace)
  multipliers = namespace["multipliers"]
  assert multipliers["hidden"]["kernel"] == multipliers["readout"][
      "kernel"] == 1 / 8
  assert multipliers["input"]["kernel"] == 1.0
  namespace["tx"].init(namespace["nnx"].as_pure(namespace["nnx"].state(
      namespace["model"], namespace["nnx"].Param)))
