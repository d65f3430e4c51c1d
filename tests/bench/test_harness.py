"""Every registered `foam-bench` suite's quick run, in-process, through the
command line: one parametrised smoke test of what the harness promises for
every suite, then each suite's own properties on the same runs (one run
per suite and part, shared by this file's tests)."""

import contextlib
import dataclasses
import io
import json
import math
import os
import pathlib
import re

import numpy as np
import pytest

from foam_optax.bench import bias, cli, comparison, cost, harness, scale
from foam_optax.bench import stability, trainer, transfer


@dataclasses.dataclass
class QuickRun:
  raw: dict         # results.json
  stdout: str
  out: pathlib.Path
  cwd: pathlib.Path   # where --update-docs wrote BENCHMARKS.md
  bars: list        # [(total, units reported)] of each progress bar


class _Bar:
  """Stands in for tqdm: records the total and the units reported."""

  def __init__(self, bars, total, **kwargs):
    del kwargs
    self.total, self.done = total, 0
    bars.append(self)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def update(self, units=1):
    self.done += units

  def set_description(self, text):
    del text


_RUNS = {}


@pytest.fixture(scope="session")
def quick(tmp_path_factory):
  """quick(suite, *args) -> its `QuickRun` (``--quick --update-docs``), run
  once per process."""
  def get(name, *args):
    if (name, args) not in _RUNS:
      cwd = tmp_path_factory.mktemp(name)
      bars = []
      original, here = harness.tqdm, os.getcwd()
      harness.tqdm = lambda **kwargs: _Bar(bars, **kwargs)
      stdout = io.StringIO()
      try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(stdout):
          cli.main(["--suite", name, "--quick", "--update-docs", "--out",
                    "out", *args])
      finally:
        harness.tqdm = original
        os.chdir(here)
      text = (cwd / "out" / "results.json").read_text()
      raw = json.loads(text, parse_constant=lambda c: pytest.fail(
          f"results.json holds {c}: not strict JSON"))
      _RUNS[(name, args)] = QuickRun(raw, stdout.getvalue(), cwd / "out",
                                     cwd, [(b.total, b.done) for b in bars])
    return _RUNS[(name, args)]
  return get


def _printed_targets(run: QuickRun):
  """Each target is printed with its verdict in the last column."""
  for target in run.raw["targets"].values():
    verdict = "met" if target["met"] else "missed"
    assert (f"| {target['target']} | {target['measured']} | {verdict} |"
            in run.stdout), target


@pytest.mark.parametrize("name", list(cli.SUITES))
def test_quick_run_of_every_suite(name, quick):
  """What the harness promises for every suite: its meta, a progress bar
  that ends full, the printed and written table, the targets, the plots and
  the BENCHMARKS.md block."""
  suite = cli.SUITES[name]
  cfg = suite.presets["quick"]
  run = quick(name)
  meta = run.raw["meta"]
  assert meta["seeds"] == suite.seeds(cfg)
  assert meta["total_seconds"] > 0 and meta["process_cpu_seconds"] > 0
  assert meta["openblas"]["OPENBLAS_NUM_THREADS"]
  assert meta["machine"]["devices"]
  assert run.bars == [(suite.units_of_work(cfg),) * 2]
  table = (run.out / "table.md").read_text()
  assert table and table in run.stdout
  assert run.stdout.rstrip().endswith("outputs in out/")
  if "targets" in run.raw:
    _printed_targets(run)
  block = suite.block(cfg)
  docs = (run.cwd / "BENCHMARKS.md").read_text()
  inside = docs[docs.index(block.start):docs.index(block.end)]
  assert block.title in inside and table.strip() in inside
  assert "Output of `foam-bench " in inside
  # Every plot written is a PNG, copied to docs/figures/ and shown in the
  # block (the suites' own tests name theirs).
  figures = sorted(run.out.glob("*.png"))
  linked = re.findall(r"\(docs/figures/(.*?)\)", inside)
  assert sorted(linked) == [f.name for f in figures]
  for figure in figures:
    assert figure.read_bytes()[:4] == b"\x89PNG", figure
    assert (run.cwd / "docs" / "figures" / figure.name).exists()


SUMMARY_KEYS = {"lr", "final_train_loss", "final_test_loss", "steps_to_target",
                "seconds_to_target", "train_seconds", "step_ms_median",
                "step_ms_p95", "eigendecompositions", "state_bytes",
                "compile_seconds"}


def test_quick_default_suite(quick):
  raw = quick("default").raw
  cfg = comparison.QUICK
  assert set(raw) == {"meta", "workloads", "targets"}
  assert set(raw["workloads"]) == set(cfg.workloads)
  for data in raw["workloads"].values():
    assert set(data["results"]) == set(cfg.optimizers)
    assert math.isfinite(data["target_train_loss"])
    for name, result in data["results"].items():
      assert len(result["runs"]) == cfg.seeds
      # The grid, extended past an end only while the best rate sits there.
      rates = [s["lr"] for s in result["sweep"]]
      losses = [math.inf if s["final_train_loss"] is None
                else s["final_train_loss"] for s in result["sweep"]]
      extra = len(rates) - 3
      assert 0 <= extra <= trainer.MAX_GRID_EXTENSIONS
      assert rates == sorted(rates) and result["lr"] in rates
      best = result["lr"]
      assert losses[rates.index(best)] == min(losses)
      if extra < trainer.MAX_GRID_EXTENSIONS:
        assert rates[0] < best < rates[-1]
      for run in result["runs"].values():
        assert len(run["trace"]["step_seconds"]) == data["steps"]
        assert run["curve"]["step"][-1] == data["steps"]
        assert len(run["curve"]["step"]) == comparison.EVAL_POINTS + 1
      summary = data["summary"][name]
      assert SUMMARY_KEYS <= set(summary)
      assert summary["final_train_loss"] is not None
      assert summary["compile_seconds"] > 0
    assert data["summary"]["foam"]["eigendecompositions"] > 0
  assert sorted(p.name for p in quick("default").out.glob("*.png")) == sorted(
      f"{w}_{kind}.png" for w in cfg.workloads for kind in ("loss", "foam"))


def test_quick_scale_suite(quick):
  raw = quick("scale").raw
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
  assert sorted(p.name for p in quick("scale").out.glob("*.png")) == [
      "scale_ablations.png", "scale_eigendecompositions.png",
      "scale_pareto.png", "scale_proxy.png", "scale_robustness.png",
      "scale_wallclock.png"]


def test_quick_scale_pareto_part(quick):
  run = quick("scale", "--only", "pareto")
  raw = run.raw
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
  assert [p.name for p in run.out.glob("*.png")] == ["scale_pareto.png"]
  assert run.bars == [(scale.units_of_work(
      dataclasses.replace(scale.QUICK, only="pareto")),) * 2]
  docs = (run.cwd / "BENCHMARKS.md").read_text()
  assert docs.count(scale.BLOCKS["pareto"].start) == 1
  assert scale.BLOCKS[None].start not in docs


def test_quick_scale_wallclock_part(quick):
  """The wall-clock part: Shampoo f=20 first (the target), FOAM, the other
  frequencies and the references (AdamW here), at the suite's rate."""
  run = quick("scale", "--only", "wallclock")
  raw = run.raw
  cfg = dataclasses.replace(scale.QUICK, only="wallclock")
  assert list(raw["runs"]) == ["shampoo_f20", "foam", "shampoo_f1"]
  assert set(raw["claims"]) == {"eigendecompositions", "wallclock"}
  wall = raw["claims"]["wallclock"]
  assert wall["not_run"] == []
  target = raw["runs"]["shampoo_f20"]["curve"]["train_loss"][-1]
  assert wall["target_train_loss"] == target
  reference = wall["summaries"]["shampoo_f20"]
  # The reference reaches its own final loss, at the latest when it ends.
  assert reference["seconds_to_target"] <= reference["train_seconds"]
  assert set(raw["targets"]) == {"foam_fastest_to_shampoo_f20_loss",
                                 "foam_evds_le_20pct_of_shampoo_f20"}
  assert sorted(p.name for p in run.out.glob("*.png")) == [
      "scale_eigendecompositions.png", "scale_wallclock.png"]
  assert run.bars == [(scale.units_of_work(cfg),) * 2]


def test_quick_stability_suite(quick):
  raw = quick("stability").raw
  assert set(raw) == {"meta", "config", "workloads", "policy", "targets"}
  cfg = stability.QUICK
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
  assert sorted(p.name for p in quick("stability").out.glob("*.png")) == [
      "stability_divergences.png", "stability_switch.png"]


def test_quick_transfer_suite(quick):
  run = quick("transfer")
  raw = run.raw
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
        multipliers = [m for m in entry["multipliers"].values()]
        if arm == "sp" or width == base:
          assert all(m == 1.0 for m in multipliers)
        else:
          assert any(m != 1.0 for m in multipliers)
      optimal = [math.log2(summary["widths"][str(w)]["optimal_lr"])
                 for w in cfg.widths]
      assert summary["drift_grid_steps"] == max(optimal) - min(optimal)
  assert len(raw["targets"]) == 4 * len(cfg.optimizers)
  # Two tables (rates, then ‖Δh‖), a μP row per optimizer in each.
  assert (run.out / "table.md").read_text().count("| μP |") == 2 * len(
      cfg.optimizers)
  assert sorted(p.name for p in run.out.glob("*.png")) == [
      "transfer_delta_h.png", "transfer_lr.png"]


def test_quick_bias_suite(quick):
  run = quick("bias")
  raw = run.raw
  cfg = bias.QUICK
  suite = {m.name: m for m in bias.methods()}
  assert set(raw["results"]) == set(suite)
  seeds = [str(s) for s in cfg.seeds]
  for name, result in raw["results"].items():
    assert list(result["runs"]) == seeds
    for r in result["runs"].values():
      assert len(r["losses"]) == len(r["step_seconds"]) == cfg.steps
      assert all(math.isfinite(x) for x in r["losses"])
      assert math.isfinite(r["test_loss"]) and math.isfinite(r["train_loss"])
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
    assert f"| {name} | " in run.stdout
  # Two targets per pair.
  assert len(raw["targets"]) == 2 * len(corrected)
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
  assert [p.name for p in run.out.glob("*.png")] == ["bias_paired.png"]


def test_quick_cost_suite(quick):
  """The compiled updates' control flow, and the step-time part on the quick
  run: FOAM's steps 1 to 5, with a check every 2 steps and one gradient
  repeated."""
  raw = quick("cost").raw
  cfg = cost.QUICK
  assert (cfg.d_model, cfg.step_layers, cfg.check_frequency) == (16, 1, 2)
  # The optimized HLO's control flow, on the two-layer tree of the sweep (a
  # stack of one factor would need no loop): FOAM guards its refreshes with
  # conditionals and maps over its stacks of factors; Muon has neither.
  assert cfg.sweep == (2,)
  foam, muon = (raw["update"]["sweep_2"][name] for name in ("foam", "muon"))
  assert foam["hlo"]["conditionals"] > 0 and foam["hlo"]["loops"] > 0
  assert muon["hlo"]["conditionals"] == 0 and muon["hlo"]["loops"] == 0
  assert foam["total_s"] >= foam["compile_s"] > 0
  times = raw["step_times"]["foam"]
  # Step 2 is the first check (every factor refreshes), step 4 a check of
  # bases that a repeated gradient keeps exact; 1, 3 and 5 check nothing.
  assert times["plain"]["steps"] == 3
  assert times["check"]["steps"] == 1
  assert times["refresh"]["steps"] == 1
  # Four one-block matrices, two factors each.
  assert times["refresh"]["work"]["eigendecompositions"] == 8


@pytest.mark.parametrize("argv,message", [
    (["--only", "pareto"], "--only is not an option of --suite default"),
    (["--suite", "bias", "--seeds", "2"],
     "--seeds is not an option of --suite bias"),
    (["--suite", "bias", "--preset", "gpu"],
     "--suite bias has no preset 'gpu'"),
])
def test_an_option_the_suite_lacks_is_an_error(argv, message, capsys):
  with pytest.raises(SystemExit):
    cli.parse_args(argv)
  assert message in capsys.readouterr().err


def test_suite_options_set_config_fields():
  suite, cfg, args = cli.parse_args(["--quick", "--workloads", "digits_mlp",
                                     "--seeds", "1"])
  assert suite is comparison.SUITE and args.out == "bench_out"
  assert cfg == dataclasses.replace(comparison.QUICK,
                                    workloads=["digits_mlp"], seeds=1)
  suite, cfg, _ = cli.parse_args(["--suite", "scale", "--preset", "gpu",
                                  "--time-limit", "60"])
  assert cfg == dataclasses.replace(scale.GPU, time_limit=60.0)
  assert suite.block(cfg) is scale.BLOCKS["wallclock"]
