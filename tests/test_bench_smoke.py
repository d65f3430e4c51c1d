"""Smoke test of `foam-bench --quick`: runs in-process into a temporary
directory and checks the JSON structure and that every figure is finite."""

import json
import math

from foam_optax.bench import cli
from foam_optax.bench import runner

SUMMARY_KEYS = {"lr", "final_train_loss", "final_test_loss", "steps_to_target",
                "seconds_to_target", "train_seconds", "step_ms_median",
                "step_ms_p95", "eigendecompositions", "state_bytes",
                "compile_seconds"}


def _numbers(value):
  if isinstance(value, dict):
    for v in value.values():
      yield from _numbers(v)
  elif isinstance(value, list):
    for v in value:
      yield from _numbers(v)
  elif isinstance(value, (int, float)) and not isinstance(value, bool):
    yield value


def test_quick_benchmark(tmp_path, capsys):
  cli.main(["--quick", "--no-progress", "--out", str(tmp_path)])
  assert "| optimizer |" in capsys.readouterr().out
  raw = json.loads((tmp_path / "results.json").read_text())
  assert set(raw) == {"meta", "workloads", "targets"}
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
  assert all(math.isfinite(x) for x in _numbers(raw))
  assert (tmp_path / "table.md").exists()
  assert sorted(p.name for p in tmp_path.glob("*.png"))
