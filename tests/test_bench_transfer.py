"""Smoke test of `foam-bench --suite transfer --quick` (in-process, into a
temporary directory: JSON structure, summaries consistent with the runs,
finite figures, the targets table, the plots), and the suite's Muon
multipliers net of `optax.contrib.muon`'s own width factor."""

import json
import math

import jax
import jax.numpy as jnp
import optax
import pytest

import foam_optax as fo
from foam_optax.bench import cli
from foam_optax.bench import transfer
from json_numbers import json_numbers


def test_quick_transfer_suite(tmp_path, capsys):
  cli.main(["--suite", "transfer", "--quick", "--no-progress", "--out",
            str(tmp_path)])
  out = capsys.readouterr().out
  raw = json.loads((tmp_path / "results.json").read_text())
  assert set(raw) == {"meta", "config", "compile_seconds", "runs",
                      "summaries", "targets"}
  cfg = transfer.QUICK
  base = str(cfg.widths[0])
  assert set(raw["runs"]) == set(cfg.optimizers)
  for name, arms in raw["runs"].items():
    grid = list(cfg.lr_grids[name])
    # The base width is one optimizer in both arms: run once.
    assert arms["mup"][base] == arms["sp"][base]
    for arm, per_width in arms.items():
      assert set(per_width) == {str(w) for w in cfg.widths}
      summary = raw["summaries"][name][arm]
      for width, entry in per_width.items():
        assert [r["lr"] for r in entry["runs"]] == grid
        for r in entry["runs"]:
          assert math.isfinite(r["held_out_loss"])
          assert r["delta_h"] > 0 and r["delta_f"] > 0
        row = summary["widths"][width]
        best = min(entry["runs"], key=lambda r: r["held_out_loss"])
        assert row["optimal_lr"] == best["lr"]
        assert row["loss_ratio"] >= 1.0
        multipliers = jax.tree.leaves(entry["multipliers"])
        if arm == "sp" or width == base:
          assert all(m == 1.0 for m in multipliers)
        else:
          assert any(m != 1.0 for m in multipliers)
      optimal = [math.log2(summary["widths"][str(w)]["optimal_lr"])
                 for w in cfg.widths]
      assert summary["drift_grid_steps"] == max(optimal) - min(optimal)
  assert len(raw["targets"]) == 4 * len(cfg.optimizers)
  for target in raw["targets"].values():
    verdict = "met" if target["met"] else "missed"
    assert f"| {target['target']} | {target['measured']} | {verdict} |" in out
  assert all(math.isfinite(x) for x in json_numbers(raw))
  # Two tables (rates, then ‖Δh‖), a μP row per optimizer in each.
  assert (tmp_path / "table.md").read_text().count("| μP |") == 2 * len(
      cfg.optimizers)
  assert sorted(p.name for p in tmp_path.glob("*.png")) == [
      "transfer_delta_h.png", "transfer_lr.png"]


@pytest.mark.parametrize("width,base,readout", [(256, 128, math.sqrt(0.5)),
                                                (16, 8, 1.0)])
def test_muon_multipliers_net_of_the_alias_factor(width, base, readout):
  """optax.contrib.muon multiplies by √max(1, fan_out/fan_in): the suite
  divides the official 'muon' rule by that factor's ratio. The readout
  (width x 103) has fan_out < fan_in at 128 and 256: the rule stands;
  at 8 and 16 the alias's factor already carries it all."""
  data = transfer.CharData(context=4)
  mine = transfer.multipliers("muon", transfer.init_params(width, data),
                              transfer.init_params(base, data))
  assert mine["hidden1"] == pytest.approx(1.0)
  assert mine["readout"] == pytest.approx(readout)
  official = fo.mup_multipliers(transfer.init_params(width, data),
                                transfer.init_params(base, data),
                                optimizer="muon")
  # The embedding (412 x width): fan_out < fan_in at every width here.
  assert mine["embed"] == pytest.approx(official["embed"])


def test_every_optimizer_of_the_full_run_has_its_direction_and_rule():
  """FOAM and Muon, outside the quick run: their directions initialise on
  the model, and the rules are 'grafted' (1/r_in) and SOAP's with blocks of
  128 (1 -> 2 blocks per side from width 32 to 256)."""
  data = transfer.CharData(context=1)
  wide, base = (transfer.init_params(w, data) for w in (256, 32))
  for name in transfer.FULL.optimizers:
    transfer.direction(name).init(wide)
  foam = transfer.multipliers("foam", wide, base)
  assert foam == {"embed": 1.0, "hidden1": 1 / 8, "hidden2": 1 / 8,
                  "readout": 1 / 8}
  soap = transfer.multipliers("soap", wide, base)
  assert soap["hidden1"] == pytest.approx(0.5)
  # Embedding (103 x width): √8 / √2 (1 -> 2 column blocks).
  assert soap["embed"] == pytest.approx(2.0)


def test_recipe_moves_parameters_as_documented():
  """-schedule(t) * (lr * m * u + wd * p) with u = SGD's gradient."""
  params = {"w": jnp.full((2, 3), 2.0)}
  schedule = lambda count: 0.5
  tx = transfer.recipe(optax.identity(), {"w": 3.0}, 0.1, 0.01, schedule)
  updates, _ = tx.update({"w": jnp.ones((2, 3))}, tx.init(params), params)
  assert jnp.allclose(updates["w"], -0.5 * (0.1 * 3.0 * 1.0 + 0.01 * 2.0))

