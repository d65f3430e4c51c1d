"""Smoke tests of the scripts in scripts/ and scripts/archive/, run
in-process on tiny settings."""

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import foam_optax as fo

for folder in ("scripts", os.path.join("scripts", "archive")):
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", folder))

import compile_profile  # noqa: E402
import long_run  # noqa: E402
import robustness_sweep  # noqa: E402
import stagger_comparison  # noqa: E402
import trajectories  # noqa: E402

_FLOAT = r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|inf|nan)"
# The archived scripts' records are in the documents (scripts/archive/
# README.md); their smoke runs check that the recorded commands still run.
ARCHIVED = pytest.mark.slow


@ARCHIVED
def test_robustness_sweep_one_cell_grid_writes_finite_table(
    monkeypatch, tmp_path, capsys):
  # One learning rate and one epsilon: 3 optimizers x 2 problems, 3 steps.
  monkeypatch.setattr(robustness_sweep, "LRS", (1e-2,))
  monkeypatch.setattr(robustness_sweep, "EPSILONS", (1e-9,))
  out = tmp_path / "sweep.md"
  monkeypatch.setattr(sys, "argv", ["robustness_sweep.py", "--steps", "3",
                                    "--out", str(out)])
  robustness_sweep.main()
  text = out.read_text()
  assert text.strip() in capsys.readouterr().out
  assert "## Robustness sweep (3 steps, full batch)" in text
  titles = re.findall(r"^### (.*) \(initial loss (" + _FLOAT + r")\)$", text,
                      re.M)
  assert [t for t, _ in titles] == ["digits MLP", "Kronecker quadratic 16x12"]
  assert all(np.isfinite(float(v)) and float(v) > 0 for _, v in titles)
  rows = re.findall(r"^\| (foam|shampoo|adamw) \| 1e-09 \| (.*) \| (\d)/1 \|$",
                    text, re.M)
  assert [r[0] for r in rows] == ["foam", "shampoo", "adamw"] * 2
  for name, cell, finished in rows:
    # A 1e-2 step for 3 steps lowers every loss: no "**div**" cell.
    assert re.fullmatch(_FLOAT, cell), (name, cell)
    assert np.isfinite(float(cell)) and finished == "1", (name, cell)
  assert len(re.findall(r"\*\*100%\*\*", text)) == 6


def test_long_run_short_exits_zero_with_damping_in_range(monkeypatch, capsys):
  monkeypatch.setattr(sys, "argv", ["long_run.py", "--steps", "200"])
  assert long_run.main() == 0
  out = capsys.readouterr().out
  assert out.rstrip().splitlines()[-1] == "OK"
  for name in ("foam", "shampoo"):
    line = next(l for l in out.splitlines() if l.startswith(name + ":"))
    assert "steps=200 finite=True" in line
    lo, hi = map(float, re.search(
        r"damping in \[(" + _FLOAT + r"), (" + _FLOAT + r")\]", line).groups())
    assert 1e-9 * (1 - 1e-6) <= lo <= hi <= 3e-7 * (1 + 1e-6), line
  # 200 steps are enough for FOAM to raise its damping above epsilon.
  foam_hi = float(re.search(r"foam: .*damping in \[[^,]+, (" + _FLOAT + r")\]",
                            out).group(1))
  assert foam_hi > 1e-9


def _poisoned(tx, field, after):
  """`tx` whose state field `field` of every factor turns NaN once more than
  `after` updates were applied; the updates themselves are left alone."""
  def update(updates, state, params=None):
    updates, state = tx.update(updates, state, params)
    def poison(x):
      return jnp.where(state.count > after, jnp.full_like(x, jnp.nan), x)
    groups = tuple(
        gs._replace(**{side: getattr(gs, side)._replace(**{field: poison(
            getattr(getattr(gs, side), field))})
                       for side in ("left", "right")
                       if getattr(gs, side) is not None})
        for gs in state.classes)
    return updates, state._replace(classes=groups)
  return optax.GradientTransformation(tx.init, update)


@pytest.mark.parametrize("field", ["statistic", "proxy"])
def test_long_run_checks_optimizer_state_is_finite(field):
  tx = _poisoned(fo.scale_by_shampoo(epsilon=long_run.EPS), field, after=12)
  r = long_run.run(tx, steps=20, chunk=10)
  assert int(r["step"]) == 20
  if field == "proxy":   # a diagnostic that may legitimately overflow
    assert r["finite"] and r["first_nonfinite_step"] is None
    assert r["proxy_nonfinite"] == int(r["num_factors"])
  else:
    assert not r["finite"]
    assert r["first_nonfinite_step"] == 13
    assert any(f.endswith(".statistic") for f in r["nonfinite_fields"])
    # Parameters and updates stayed finite: only the state check caught it.
    assert np.isfinite(r["final_loss"])


@ARCHIVED
def test_storage_dtypes_tiny(monkeypatch, capsys):
  import storage_dtypes
  monkeypatch.setattr(storage_dtypes, "BYTES_MODELS", ("digits_mlp",))
  monkeypatch.setattr(storage_dtypes, "LOSS_WORKLOADS", ("quadratic_k1e2",))
  storage_dtypes.main(["--steps", "3", "--seeds", "1", "--settings",
                       "float32", "all but statistics bf16, no X cache, pinv 1e-6"])
  out = capsys.readouterr().out
  rows = {tuple(c.strip() for c in line.split("|")[1:3]): line
          for line in out.splitlines() if line.startswith("| ")}
  number = lambda line: float(line.split("|")[3])
  assert number(rows[("adamw", "float32")]) == pytest.approx(2.0)
  assert number(rows[("foam", "float32")]) > 8
  # The documented low-memory setting stays under 4.5x.
  assert number(rows[("foam", "all but statistics bf16, no X cache, "
                               "pinv 1e-6")]) <= 4.5
  losses = re.findall(r"\| float32 \| (" + _FLOAT + r") \(\+0\.00%\) \| ("
                      + _FLOAT + r") \(\+0\.00%\) \|", out)
  assert len(losses) == 1 and all(np.isfinite(float(x)) for x in losses[0])


@ARCHIVED
def test_sensitivity_tiny(monkeypatch, capsys):
  import sensitivity
  configurations = sensitivity.configurations()
  monkeypatch.setattr(sensitivity, "configurations", lambda: {
      k: configurations[k] for k in ("adamw", "foam pseudo_inverse_rtol=1e-6")})
  sensitivity.main(["--steps", "3", "--relative", "1e-3"])
  rows = [line.split("|")[2:7] for line in
          capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
  assert len(rows) == 2
  for delta, change, growth, moved, ratio in map(
      lambda r: [float(x) for x in r], rows):
    assert 0 < delta and 0 < change < moved
    assert growth == pytest.approx(change / delta, rel=2e-2)
    assert ratio == pytest.approx(change / moved, rel=2e-2)


def test_device_check_tiny_writes_every_figure(tmp_path):
  import json
  import device_check   # noqa: E402
  device_check.main(["--tiny", "--out", str(tmp_path)])
  report = json.loads((tmp_path / "device_check.json").read_text())
  assert report["tiny"] and report["platform"] == jax.devices()[0].platform
  sizes = [r["m"] for r in report["eigh_vs_matmul"]]
  assert sizes == list(device_check.TINY.matrix_sizes)
  for row in report["eigh_vs_matmul"]:
    for key in ("eigh_ms", "matmul_ms", "matmul_default_precision_ms",
                "eigh_batched_ms", "matmul_batched_ms"):
      assert row[key] > 0, (key, row)
  cond = report["cond"]
  for key in ("no_cond_ms_per_factor", "skipped_ms_per_factor",
              "taken_ms_per_factor", "unconditional_ms_per_factor"):
    assert cond[key] > 0, key
  runs = report["steps"]["optimizers"]
  assert list(runs) == ["adamw", "shampoo_f1", "shampoo_f20", "foam", "soap"]
  for name, r in runs.items():
    assert r["median_step_ms"] > 0 and np.isfinite(r["final_loss"]), name
    assert r["compiled_step_bytes"] > 0 and r["state_bytes"] > 0, name
  # Shampoo-family state (statistics, bases, inverse roots) exceeds Adam's.
  assert runs["foam"]["state_bytes"] > runs["adamw"]["state_bytes"]
  text = (tmp_path / "device_check.md").read_text()
  assert "### eigh vs matmul" in text and "| foam |" in text


@ARCHIVED
def test_stagger_comparison_one_pair_table(monkeypatch):
  monkeypatch.setattr(stagger_comparison, "NAMES", ("foam",))
  rows = stagger_comparison.run(["quadratic_k1e2"], seeds=2, steps=3, lr=1e-2)
  text = stagger_comparison.table(rows, seeds=2, lr=1e-2)
  row = re.search(r"^\| quadratic_k1e2 \| foam \| 3 \| (.*) \|$", text, re.M)
  cells = row.group(1).split(" | ")
  assert len(cells) == 5
  for cell in cells[:2]:   # loss mean ± std, finite
    mean, std = map(float, cell.split(" ± "))
    assert np.isfinite(mean) and mean > 0 and std >= 0
  # Three steps, first check at step 20: no eigendecomposition either way.
  assert cells[3:] == ["0", "0"]


@ARCHIVED
def test_asgo_comparison_one_sided_foam_computes_fewer_roots(capsys):
  import asgo_comparison
  steps = 25
  asgo_comparison.main(["--workloads", "digits_mlp", "--steps", str(steps),
                        "--rounds", "1", "--methods", "asgo", "asgo_foam"])
  out = capsys.readouterr().out
  rows = {m: cells for m, *cells in re.findall(
      r"^\| (asgo|asgo_foam) \| (\d+) \| 3 \| (" + _FLOAT + r") \| (" + _FLOAT
      + r") \| [^|]+ \| (" + _FLOAT + r") ± \S+ \| (" + _FLOAT + r") ± \S+ \|$",
      out, re.M)}
  assert set(rows) == {"asgo", "asgo_foam"}
  roots = {m: int(cells[0]) for m, cells in rows.items()}
  # Every-step ASGO: a root of each of the MLP's 3 factors at every step;
  # one-sided FOAM: an eigendecomposition at the first check (step 1) and
  # at most one more per factor at the check of step 20.
  assert roots["asgo"] == 3 * steps
  assert 3 <= roots["asgo_foam"] <= 6
  for cells in rows.values():
    wall, cpu, train_loss, test_loss = map(float, cells[1:])
    assert wall > 0 and cpu > 0
    assert 0 < train_loss < np.log(10) and np.isfinite(test_loss)
  ratio = re.search(r"^\| digits_mlp \| (" + _FLOAT + r") \|", out, re.M)
  assert float(ratio.group(1)) == pytest.approx(
      roots["asgo_foam"] / roots["asgo"], abs=5e-4)


def test_profile_step_stacks_blocks_as_the_library():
  """Blocks of one shape across leaves form one stack, in tree order."""
  import profile_step
  # NumPy inputs: made op by op with jnp, each would compile its own program.
  params = {"a": np.ones((4, 3), np.float32), "b": np.ones((6, 2), np.float32),
            "c": np.ones((4, 3), np.float32), "v": np.ones(3, np.float32)}
  grads = jax.tree.map(
      lambda x: np.arange(x.size, dtype=np.float32).reshape(x.shape) + x.size,
      params)
  stacks = {(cls.rows, cls.cols): stack
            for cls, stack in profile_step.block_stacks(params, grads)}
  assert set(stacks) == {(4, 3), (6, 2)}
  np.testing.assert_array_equal(stacks[(4, 3)],
                                np.stack([grads["a"], grads["c"]]))
  np.testing.assert_array_equal(stacks[(6, 2)], grads["b"][None])


def test_trajectories_compare_a_run_with_itself_and_spot_a_change(
    tmp_path, capsys, monkeypatch):
  first = tmp_path / "first.json"
  assert trajectories.main(["--only", "dasgo", "--out", str(first)]) == 0
  assert trajectories.main(["--only", "dasgo", "--compare", str(first)]) == 0
  assert capsys.readouterr().out.rstrip().endswith("identical")
  # Another learning rate is another trajectory.
  monkeypatch.setitem(trajectories.CONFIGS, "dasgo", lambda: fo.dasgo(2e-2))
  assert trajectories.main(["--only", "dasgo", "--compare", str(first)]) == 1
  assert capsys.readouterr().out.rstrip().endswith("changed: dasgo")


def test_compile_profile_attributes_kernels_to_their_source(capsys):
  compile_profile.main(["--layers", "1", "--d-model", "16", "--top", "50",
                        "fo.shampoo(1e-3, skip_nonfinite=False)"])
  out = capsys.readouterr().out
  kernels = re.search(r"kernels: (\d+) LLVM modules, (" + _FLOAT + ") s", out)
  assert kernels and int(kernels.group(1)) > 0
  assert float(kernels.group(2)) > 0
  # The factor pipeline's kernels are named after the functions that make
  # them: the eigendecomposition's post-processing among them.
  assert re.search(r"\d+ +linalg\.fresh_eigendecomposition", out)
  size = re.search(r"optimized HLO: instructions (\d+), fusions (\d+), "
                   r"conditionals (\d+), loops (\d+)", out)
  assert size and int(size.group(3)) > 0
