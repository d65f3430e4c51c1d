"""`foam-bench --suite cost`: its measurements on a tiny tree (the compiled
updates' control flow and step kinds are read from the suite's quick run in
tests/bench/test_harness.py)."""

import pytest

from foam_optax.bench import cost

PARAMS = cost.init_params(1, 16)


def test_hlo_size_counts_each_kind():
  text = "\n".join([
      "ENTRY %main {",
      "  %a = f32[2] parameter(0)",
      "  %f = f32[2] fusion(%a), kind=kLoop, calls=%c",
      "  %w = (f32[2]) while(%t), condition=%x, body=%y",
      "  %k = f32[2] conditional(%p, %a, %a), branch_computations={%u, %v}",
      "}"])
  assert cost.hlo_size(text) == {"instructions": 4, "fusions": 1,
                                 "conditionals": 1, "loops": 1}


def test_state_bytes_of_adamw_are_two_parameter_copies():
  ratio = cost.state_bytes_ratio("adamw", PARAMS, scanned=False)
  assert ratio == pytest.approx(2.0, rel=1e-3)


def test_scanned_tree_has_the_layer_axis_as_a_batch_axis():
  params = cost.init_params(3, 16, scanned=True)
  dims = cost.dimension_numbers(params)
  assert params["qkv"].shape == (3, 16, 48)
  assert dims["qkv"].reduction_axis == 1 and dims["qkv"].output_axis == 2
  assert dims["ln1"] is None


@pytest.mark.slow
def test_a_warm_persistent_cache_skips_compilation():
  cfg = cost.CostConfig(d_model=16, layers=1)
  cached = cost.persistent_cache_cost("foam", cfg)
  assert cached["warm"]["compile_s"] < cached["cold"]["compile_s"] / 3
  assert cached["warm"]["hlo"] == cached["cold"]["hlo"]
