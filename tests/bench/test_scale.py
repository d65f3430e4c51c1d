"""The scale suite beyond its quick runs (tests/bench/test_harness.py): the
Pareto line's interpolation, the float64 error of a stale inverse root, the
wall-clock part under a time limit and the GPU preset."""

import json

import numpy as np
import pytest

from foam_optax.bench import cli, scale


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


WALLCLOCK = ["--suite", "scale", "--only", "wallclock", "--quick",
             "--no-progress"]


def test_no_run_starts_after_the_time_limit(tmp_path, capsys):
  cli.main([*WALLCLOCK, "--time-limit", "0", "--out", str(tmp_path)])
  out = capsys.readouterr().out
  raw = json.loads((tmp_path / "results.json").read_text())
  assert raw["runs"] == {}
  wall = raw["claims"]["wallclock"]
  assert wall["target_train_loss"] is None
  assert wall["not_run"] == ["shampoo_f20", "foam", "shampoo_f1"]
  assert "| shampoo_f20 | not run (time limit) |" in out
  target = raw["targets"]["foam_fastest_to_shampoo_f20_loss"]
  assert not target["met"]
  assert target["measured"].startswith("no target")


def test_a_finished_run_is_saved_before_the_next_one(tmp_path, monkeypatch):
  real = scale._main_run

  def crash_at_foam(trainers, method, *args, **kwargs):
    if method == "foam":
      raise RuntimeError("device lost")
    return real(trainers, method, *args, **kwargs)

  monkeypatch.setattr(scale, "_main_run", crash_at_foam)
  with pytest.raises(RuntimeError):
    cli.main([*WALLCLOCK, "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "results.json").read_text())
  assert list(saved["runs"]) == ["shampoo_f20"]
  assert saved["only"] == "wallclock" and "command" in saved["meta"]
  assert len(saved["runs"]["shampoo_f20"]["trace"]["step_seconds"]) == (
      scale.QUICK.steps)


def test_gpu_preset_is_the_wallclock_part_with_references():
  cfg = scale.GPU
  assert cfg.only == "wallclock" and cfg.time_limit == 330.0
  assert scale._wallclock_names(cfg) == ["shampoo_f20", "foam",
                                         "shampoo_f100", "adamw", "soap"]
  assert scale.units_of_work(cfg) == 5 * cfg.steps
