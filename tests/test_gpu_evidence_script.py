"""scripts/gpu_evidence.py on a tiny model, on CPU (the GPU run's smoke test)."""

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))

import gpu_evidence  # noqa: E402


def test_tiny_run_reports_time_to_shampoo_f20_loss(tmp_path):
  report = gpu_evidence.main(["--preset", "tiny", "--methods", "shampoo_f20",
                              "foam", "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "gpu_evidence.json").read_text())
  assert saved == json.loads(json.dumps(report))
  steps = gpu_evidence.PRESETS["tiny"].steps
  runs = saved["runs"]
  assert list(runs) == ["shampoo_f20", "foam"]
  for run in runs.values():
    assert run["steps_done"] == steps and not run["truncated"]
    assert math.isfinite(run["final_train_loss"])
    assert run["curve"]["step"][-1] == steps
    assert run["eigendecompositions"] > 0 and run["compile_seconds"] > 0
  reference = runs["shampoo_f20"]
  assert saved["target_train_loss"] == reference["final_train_loss"]
  # The reference reaches its own final loss, at the latest when it ends.
  assert reference["seconds_to_target"] <= reference["train_seconds"]
  assert saved["foam_faster_than_fixed_f"] is None   # f=100 did not run
  assert "| foam | 0.01 |" in (tmp_path / "gpu_evidence.md").read_text()
  assert (tmp_path / "gpu_evidence.png").exists()


def test_a_cut_run_is_written_before_the_next_method(tmp_path, monkeypatch):
  real = gpu_evidence.run_method

  def deadline_passed_then_crash(workload, spec, lr, preset, deadline):
    if spec.name == "adamw":
      return real(workload, spec, lr, preset, deadline=0.0)
    raise RuntimeError("device lost")

  monkeypatch.setattr(gpu_evidence, "run_method", deadline_passed_then_crash)
  with pytest.raises(RuntimeError):
    gpu_evidence.main(["--preset", "tiny", "--methods", "adamw", "soap",
                       "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "gpu_evidence.json").read_text())
  assert list(saved["runs"]) == ["adamw"]
  assert saved["runs"]["adamw"]["truncated"]
  assert saved["runs"]["adamw"]["steps_done"] == 0
  text = (tmp_path / "gpu_evidence.md").read_text()
  assert "| adamw | 0.01 | 0 (cut) |" in text
  assert "| soap | — | not run |" in text
