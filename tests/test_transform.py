"""Step-by-step agreement of `scale_by_foam` with the float64 reference.

The library runs under x64 (its statistics then are float64 too), so the
comparison is tight; one float32 run checks the default precision with a
looser tolerance. Each case compiles one `lax.scan` over all steps, with a
pytree holding several leaf kinds at once (square, tall, wide, rank 3, rank 4
with a size-1 dim, vectors, scalar), blocked by a block size that divides no
dimension evenly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import foam_optax as fo
import reference
from helpers import (BASE, SHAPES, branches, compare, defaults,
                     factor_arrays, factor_keys)

# The leaves split in two halves to keep compile time low: every controller
# and every refresh_batching meets both halves (with --runslow).
HALVES = {"A": [(4, 4), (2, 3, 4), (1, 5), ()],
          "B": [(2, 1, 2, 2, 3), (3, 5), (7,), ()]}

# Each case: controller x refresh_batching, with grafting / momentum /
# precondition_1d spread over the cases. The default cases give every
# controller one case without grafting and without momentum (b1=0), where
# the preconditioned step is compared as it is; they meet both
# refresh_batchings ('bucket' with controllers that refresh every factor,
# some factors, or none after the first), every grafting type (the default
# 'adam' in the tests below), b1 in {0, 0.5, 0.9} and both halves. The slow
# cases pair the options otherwise; each names the default cases that cover
# its path.
CASES = [
    ("stale", "bucket", "B", dict(grafting="rmsprop", b1=0.0)),
    ("stale", "map", "B", dict(grafting="none")),
    ("foam", "bucket", "A", dict(grafting="sgd", b1=0.5)),
    ("foam", "bucket", "B", dict(grafting="none", b1=0.0,
                                 precondition_1d=True)),
    ("foam_fixed_damping", "map", "A", dict(grafting="none", b1=0.0)),
    ("foam_no_refresh", "map", "A", dict(grafting="none", b1=0.0,
                                         precondition_1d=True)),
    ("residual", "bucket", "A", dict(grafting="none", b1=0.0,
                                     precondition_1d=True)),
    # Slow: stale-map-B-none (stale, map) and test_float32_default_precision
    # (adam).
    pytest.param("stale", "map", "A",
                 dict(grafting="adam", precondition_1d=True),
                 marks=pytest.mark.slow),
    # Slow: foam-bucket-B-none-b1=0 (foam, half B, no grafting) and
    # foam_fixed_damping-map-A-none-b1=0 (map).
    pytest.param("foam", "map", "B",
                 dict(grafting="none", precondition_1d=True),
                 marks=pytest.mark.slow),
    # Slow: foam_fixed_damping-map-A-none-b1=0 (foam_fixed_damping),
    # foam-bucket-B-none-b1=0 (bucket with some factors refreshed, half B)
    # and test_float32_default_precision (adam).
    pytest.param("foam_fixed_damping", "bucket", "B",
                 dict(grafting="adam", precondition_1d=True),
                 marks=pytest.mark.slow),
    # Slow: foam_no_refresh-map-A-none-b1=0 (foam_no_refresh, map) and
    # stale-bucket-B-rmsprop-b1=0 (rmsprop, half B).
    pytest.param("foam_no_refresh", "map", "B", dict(grafting="rmsprop"),
                 marks=pytest.mark.slow),
    # Slow: foam_no_refresh-map-A-none-b1=0 (foam_no_refresh, half A),
    # foam-bucket-B-none-b1=0 (bucket) and test_float32_default_precision.
    pytest.param("foam_no_refresh", "bucket", "A",
                 dict(grafting="adam", precondition_1d=True),
                 marks=pytest.mark.slow),
    # Slow: residual-bucket-A-none-b1=0 (residual, half A, b1=0),
    # foam-bucket-A-sgd (sgd) and stale-map-B-none (map).
    pytest.param("residual", "map", "A",
                 dict(grafting="sgd", b1=0.0, precondition_1d=True),
                 marks=pytest.mark.slow),
    # Slow: residual-bucket-A-none-b1=0 (residual, bucket),
    # foam-bucket-B-none-b1=0 (half B) and test_float32_default_precision.
    pytest.param("residual", "bucket", "B",
                 dict(grafting="adam", precondition_1d=True),
                 marks=pytest.mark.slow),
    # Slow: foam-bucket-B-none-b1=0 (foam, b1=0), stale-map-B-none (map)
    # and test_float32_default_precision (adam).
    pytest.param("foam", "map", "A", dict(grafting="adam", b1=0.0),
                 marks=pytest.mark.slow),
    # Slow: residual-bucket-A-none-b1=0 (residual, no grafting),
    # foam-bucket-B-none-b1=0 (half B) and stale-map-B-none (map).
    pytest.param("residual", "map", "B",
                 dict(grafting="none", precondition_1d=True),
                 marks=pytest.mark.slow),
]


def _values(case):
  """A case's (controller, refresh_batching, half, extra)."""
  return tuple(case.values) if hasattr(case, "values") else case


DEFAULT_CASES = [_values(c) for c in CASES
                 if not any(m.name == "slow" for m in getattr(c, "marks", ()))]


def _case_id(controller, refresh_batching, half, extra):
  momentum = "-b1=0" if extra.get("b1", BASE["b1"]) == 0 else ""
  return f"{controller}-{refresh_batching}-{half}-{extra['grafting']}{momentum}"


def test_default_cases_cover_every_controller_without_grafting_and_momentum():
  for controller in ("stale", "foam", "foam_fixed_damping", "foam_no_refresh",
                     "residual"):
    extras = [e for c, _, _, e in DEFAULT_CASES if c == controller]
    assert any(e["grafting"] == "none" for e in extras), controller
    assert any(e.get("b1", BASE["b1"]) == 0 for e in extras), controller
  # Both refresh_batchings, both halves, and every grafting type with
  # 'adam', the default that the tests below run.
  assert {b for _, b, _, _ in DEFAULT_CASES} == {"map", "bucket"}
  assert {h for _, _, h, _ in DEFAULT_CASES} == set(HALVES)
  assert {e["grafting"] for *_, e in DEFAULT_CASES} == {"none", "sgd",
                                                         "rmsprop"}
  assert "grafting" not in BASE
  assert defaults(fo.scale_by_foam)["grafting"] == "adam"


@pytest.mark.parametrize("controller,refresh_batching,half,extra", CASES,
                         ids=[_case_id(*_values(case)) for case in CASES])
def test_matches_reference(controller, refresh_batching, half, extra):
  kwargs = dict(BASE, controller=controller, **extra)
  _, ref_f, _ = compare(HALVES[half], kwargs, refresh_batching=refresh_batching)
  reuses, later = branches(ref_f)
  checks = ref_f["checks"][-1]
  # Checks at s0=3 and every even step after it: 3, 4, 6, ..., 16.
  assert np.all(checks == 8)
  if controller == "stale":
    assert reuses == 0 and later > 0
  elif controller == "foam_no_refresh":
    assert later == 0
    # The damping is raised, and capped at max_epsilon.
    assert ref_f["damping"].max() == pytest.approx(BASE["max_epsilon"])
    assert np.any(ref_f["damping"] > BASE["epsilon"] * 1.01)
  else:
    # Both branches are taken, so the run cannot pass trivially.
    assert reuses > 0 and later > 0, (reuses, later)
  if controller == "foam":
    # Damping above ε0 on some reuse, and back to ε0 after a later refresh.
    damping, refreshes = ref_f["damping"], ref_f["refreshes"]
    raised = damping > BASE["epsilon"] * 1.01
    reset = (np.diff(refreshes, axis=0) > 0) & (
        damping[1:] == BASE["epsilon"])
    assert any(raised[:t + 1, j].any() and reset[t:, j].any()
               for t in range(reset.shape[0]) for j in range(reset.shape[1]))


def test_unblocked_and_max_precond_dim():
  # No blocking; sides longer than 5 get no factor: (6,4) keeps only its
  # right factor, (4,6) only its left one.
  kwargs = dict(BASE, controller="foam", block_size=None, max_precond_dim=5,
                precondition_1d=True)
  ref, ref_f, _ = compare(SHAPES, kwargs, refresh_batching="bucket")
  sides = {(k[0], k[3]) for k in ref.factors()}
  assert (1, "L") not in sides and (1, "R") in sides
  assert (2, "L") in sides and (2, "R") not in sides
  assert all(v > 0 for v in branches(ref_f))


def test_start_step_and_exponent():
  # s0 later than the first multiple of f, exponent 4 (classic Shampoo).
  kwargs = dict(BASE, controller="foam", start_preconditioning_step=5,
                check_frequency=3, exponent=4, precondition_1d=True)
  _, ref_f, _ = compare(SHAPES, kwargs)
  # Checks at 5, 6, 9, 12, 15.
  assert np.all(ref_f["checks"][-1] == 5)
  assert np.all(ref_f["checks"][3] == 0) and np.all(ref_f["checks"][4] == 1)


@pytest.mark.parametrize("controller", [
    "foam",
    # Slow: the statistics' schedule is the controller's input, the same for
    # both; [foam] checks it, and both branches of the checks that read it.
    pytest.param("stale", marks=pytest.mark.slow)])
def test_statistics_compute_steps(controller):
  # Statistics from steps 1, 4, 7, ... only; checks at 3, 4, 6, ...: some
  # checks see statistics last updated one or two steps before.
  kwargs = dict(BASE, controller=controller, statistics_compute_steps=3,
                precondition_1d=True)
  _, ref_f, _ = compare(HALVES["A"], kwargs)
  assert np.all(ref_f["checks"][-1] == 8)
  if controller == "foam":
    assert all(v > 0 for v in branches(ref_f))


def test_float32_default_precision():
  # Default dtype: float32 statistics against float64; decisions are checked
  # to be far enough from their thresholds for float32 to agree.
  kwargs = dict(BASE, controller="foam", precondition_1d=True)
  _, ref_f, margin = compare(SHAPES, kwargs, x64=False, rtol=2e-3, atol=2e-4)
  assert margin > 1e-3
  assert all(v > 0 for v in branches(ref_f))


@pytest.mark.parametrize("block_size,max_precond_dim,precondition_1d", [
    (4, None, True), (None, 6, False), (3, 8, True)])
def test_layout_matches_reference(block_size, max_precond_dim,
                                  precondition_1d):
  # Factor placement and sizes for many shapes (no compilation needed):
  # (2,3,2) is a tie, (2,6) vs (6,2), resolved to the later split (6,2).
  shapes = [(2, 3, 2), (3, 1, 2, 2, 5), (5, 7, 9), (3, 3, 3, 3), (9, 2),
            (1, 9, 1), (1, 1), (1,), (0, 3), (), (7,), (2, 1)]
  tx = fo.scale_by_foam(block_size=block_size, max_precond_dim=max_precond_dim,
                        precondition_1d=precondition_1d)
  # Jitted: one program, not one per operation of an eager init.
  state = jax.jit(tx.init)([jnp.zeros(s) for s in shapes])
  keys, _ = factor_arrays(state)
  lib = {key: fs.basis.shape[-1]
         for fs, ks in factor_keys(state) for key in ks}
  ref = reference.Reference(shapes, block_size=block_size,
                            max_precond_dim=max_precond_dim,
                            precondition_1d=precondition_1d)
  expected = {k: f.q.shape[0] for k, f in ref.factors().items()}
  assert sorted(keys) == sorted(expected)
  assert lib == expected
  # The tie: rows of 6 (left factors), columns of 2 (right factors).
  tie = {k: v for k, v in expected.items() if k[0] == 0}
  assert reference.matrix_shape((2, 3, 2), False) == (6, 2)
  assert all(k[3] == "L" or v == 2 for k, v in tie.items())
