"""Step-by-step agreement of `scale_by_foam` with the float64 reference.

The library runs under x64 (its statistics then are float64 too), so the
comparison is tight; one float32 run checks the default precision with a
looser tolerance. Each case compiles one `lax.scan` over all steps, with a
pytree holding several leaf kinds at once (square, tall, wide, rank 3, rank 4
with a size-1 dim, vectors, scalar), blocked by a block size that divides no
dimension evenly.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import foam_optax as fo
from foam_optax._src.state import block_classes
import reference

# (4,4) square; (2,3,4) -> (6,4) tall, row blocks 4+2; (2,1,2,2,3) ->
# (4,6) wide (rank 4 with a size-1 dim), column blocks 4+2; (3,5) wide,
# column blocks 4+1 (the 3x1 block has no right factor); (1,5) a vector
# (blocks 1x4 and 1x1 with precondition_1d); () a scalar.
SHAPES = [(4, 4), (2, 3, 4), (2, 1, 2, 2, 3), (3, 5), (1, 5), ()]
STEPS = 16
JUMP = 10   # the gradient distribution changes here: bases go stale

# Small damping range so that FOAM's decisions depend on the proxy:
# reuse while the statistics are stationary, refresh after the jump.
BASE = dict(block_size=4, b1=0.9, b2=0.9, epsilon=1e-3, max_epsilon=3e-3,
            threshold=0.5, check_frequency=2, start_preconditioning_step=3,
            residual_tol=0.1)


def make_grads(shapes=SHAPES, steps=STEPS, jump=JUMP, seed=0, sigma=0.3):
  """Mean + noise, the mean switching at `jump`."""
  rng = np.random.default_rng(seed)
  means = [[rng.standard_normal(s) for s in shapes] for _ in range(2)]
  return [[means[int(t >= jump)][i] + sigma * rng.standard_normal(s)
           for i, s in enumerate(shapes)] for t in range(1, steps + 1)]


def factor_keys(core):
  """Per factor stack of a ScaleByFoamState, in stacking order: the
  FactorStack and the keys (leaf, row0, col0, side) of its factors, keyed
  like `reference.Reference.factors()`."""
  layouts = list(core.layouts)
  stacks = []
  for cls, gs in zip(block_classes(core), core.classes):
    for side, fs in (("L", gs.left), ("R", gs.right)):
      if fs is None:
        continue
      keys = []
      for i, j in cls.members:
        g = layouts[i].groups[j]
        for k in range(g.count):
          bi, bj = divmod(k, g.num_col_blocks)
          keys.append((i, g.row_start + bi * g.rows,
                       g.col_start + bj * g.cols, side))
      stacks.append((fs, keys))
  return stacks


def factor_arrays(core):
  """Per-factor (keys, damping, refreshes, checks, proxy) of a
  ScaleByFoamState, keyed like `reference.Reference.factors()`."""
  stacks = factor_keys(core)
  keys = [k for _, ks in stacks for k in ks]
  arrays = {name: jnp.concatenate([getattr(fs, name) for fs, _ in stacks])
            if stacks else jnp.zeros((0,))
            for name in ("damping", "refreshes", "checks", "proxy")}
  return keys, arrays


# These programs run once: spend less time optimising their machine code.
FAST_COMPILE = dict(xla_backend_optimization_level=0,
                    xla_llvm_disable_expensive_passes=True)


def run_library(tx, grads, dtype):
  """All steps of `tx` in one jitted scan. Returns per-step updates (a list
  of arrays with a leading step axis), per-factor arrays, stats and keys."""
  n = len(grads[0])
  params = [jnp.zeros(np.shape(g), dtype) for g in grads[0]]
  stacked = [jnp.asarray(np.stack([g[i] for g in grads]), dtype)
             for i in range(n)]
  keys = []

  def body(state, g):
    updates, state = tx.update(g, state)
    k, arrays = factor_arrays(state)
    keys[:] = k
    return state, (updates, arrays, fo.stats(state))

  state = tx.init(params)
  final, (updates, arrays, stats) = jax.jit(
      lambda s, g: lax.scan(body, s, g), compiler_options=FAST_COMPILE)(
          state, stacked)
  return final, [np.asarray(u, np.float64) for u in updates], jax.tree.map(
      np.asarray, arrays), jax.tree.map(np.asarray, stats), list(keys)


def run_reference(shapes, grads, **kwargs):
  ref = reference.Reference(shapes, **kwargs)
  facs = ref.factors()
  keys = list(facs)
  updates, per_factor, stats = [], [], []
  for g in grads:
    updates.append(ref.update(g))
    per_factor.append({
        "damping": np.array([facs[k].eps for k in keys]),
        "refreshes": np.array([facs[k].refreshes for k in keys]),
        "checks": np.array([facs[k].checks for k in keys]),
        "proxy": np.array([facs[k].proxy for k in keys])})
    stats.append(ref.stats())
  arrays = {k: np.stack([p[k] for p in per_factor]) for k in per_factor[0]}
  margin = min((m for f in facs.values() for m in f.margins), default=math.inf)
  return ref, updates, arrays, stats, keys, margin


def compare(shapes, kwargs, *, refresh_batching="map", x64=True, rtol=1e-7,
            atol=1e-9, grads=None, soap=None):
  """Runs library and reference; asserts agreement; returns the reference
  figures for further assertions."""
  grads = make_grads(shapes) if grads is None else grads
  with jax.enable_x64(x64):
    if soap is None:
      tx = fo.scale_by_foam(stagger=False, refresh_batching=refresh_batching,
                            **kwargs)
    else:
      tx = fo.scale_by_soap(stagger=False, refresh_batching=refresh_batching,
                            **soap)
    dtype = jnp.float64 if x64 else jnp.float32
    _, lib_u, lib_f, lib_s, lib_keys = run_library(tx, grads, dtype)
  ref, ref_u, ref_f, ref_s, ref_keys, margin = run_reference(
      shapes, grads, **kwargs)
  assert sorted(lib_keys) == sorted(ref_keys)
  perm = [lib_keys.index(k) for k in ref_keys]
  for name in ("refreshes", "checks"):
    np.testing.assert_array_equal(lib_f[name][:, perm], ref_f[name],
                                  err_msg=name)
  np.testing.assert_allclose(lib_f["damping"][:, perm], ref_f["damping"],
                             rtol=max(rtol, 1e-6) if x64 else 1e-3,
                             err_msg="damping")
  np.testing.assert_allclose(lib_f["proxy"][:, perm], ref_f["proxy"],
                             rtol=1e-5 if x64 else 1e-2, atol=1e-12,
                             err_msg="proxy")
  np.testing.assert_array_equal(
      lib_s["eigendecompositions"],
      [s["eigendecompositions"] for s in ref_s])
  np.testing.assert_array_equal(lib_s["checks"], [s["checks"] for s in ref_s])
  # The damping and proxy summaries of `fo.stats`, step by step.
  for name in ("damping_max", "damping_mean"):
    np.testing.assert_allclose(lib_s[name], [s[name] for s in ref_s],
                               rtol=max(rtol, 1e-6) if x64 else 1e-3,
                               err_msg=name)
  np.testing.assert_allclose(lib_s["proxy_max"],
                             [s["proxy_max"] for s in ref_s],
                             rtol=1e-5 if x64 else 1e-2, atol=1e-12,
                             err_msg="proxy_max")
  for t in range(len(grads)):
    for i, shape in enumerate(shapes):
      assert lib_u[i][t].shape == tuple(shape)
      np.testing.assert_allclose(
          lib_u[i][t], ref_u[t][i], rtol=rtol, atol=atol,
          err_msg=f"step {t + 1}, leaf {i} {shape}")
  return ref, ref_f, margin


def branches(ref_f):
  """(reuses, refreshes after the first) summed over factors."""
  checks, refreshes = ref_f["checks"][-1], ref_f["refreshes"][-1]
  reuses = int(np.sum(checks - refreshes))
  later = int(np.sum(refreshes - (checks > 0)))
  return reuses, later


# The leaves split in two halves to keep compile time low: every controller
# and every refresh_batching meets both halves.
HALVES = {"A": [(4, 4), (2, 3, 4), (1, 5), ()],
          "B": [(2, 1, 2, 2, 3), (3, 5), (7,), ()]}

# Each case: controller x refresh_batching, with grafting / momentum /
# precondition_1d
# spread over the cases so that every option meets every refresh_batching.
CASES = [
    ("stale", "map", "A", dict(grafting="adam", precondition_1d=True)),
    ("stale", "bucket", "B", dict(grafting="rmsprop", b1=0.0)),
    ("foam", "map", "B", dict(grafting="none", precondition_1d=True)),
    ("foam", "bucket", "A", dict(grafting="sgd", b1=0.5)),
    ("foam_fixed_damping", "map", "A", dict(grafting="none", b1=0.0)),
    ("foam_fixed_damping", "bucket", "B",
     dict(grafting="adam", precondition_1d=True)),
    ("foam_no_refresh", "map", "B", dict(grafting="rmsprop")),
    ("foam_no_refresh", "bucket", "A",
     dict(grafting="adam", precondition_1d=True)),
    ("residual", "map", "A", dict(grafting="sgd", b1=0.0,
                                  precondition_1d=True)),
    ("residual", "bucket", "B", dict(grafting="adam", precondition_1d=True)),
    # With those above, every controller meets grafting='none' and b1=0
    # (no momentum) at least once; map refresh_batching only, to stay cheap.
    ("stale", "map", "B", dict(grafting="none")),
    ("foam", "map", "A", dict(grafting="adam", b1=0.0)),
    ("foam_no_refresh", "map", "A", dict(grafting="none", b1=0.0,
                                         precondition_1d=True)),
    ("residual", "map", "B", dict(grafting="none", precondition_1d=True)),
]


def _case_id(controller, refresh_batching, half, extra):
  momentum = "-b1=0" if extra.get("b1", BASE["b1"]) == 0 else ""
  return f"{controller}-{refresh_batching}-{half}-{extra['grafting']}{momentum}"


def test_cases_cover_every_controller_without_grafting_and_momentum():
  for controller in ("stale", "foam", "foam_fixed_damping", "foam_no_refresh",
                     "residual"):
    extras = [e for c, _, _, e in CASES if c == controller]
    assert any(e["grafting"] == "none" for e in extras), controller
    assert any(e.get("b1", BASE["b1"]) == 0 for e in extras), controller


@pytest.mark.parametrize("controller,refresh_batching,half,extra", CASES,
                         ids=[_case_id(*case) for case in CASES])
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


@pytest.mark.parametrize("controller", ["foam", "stale"])
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
  state = tx.init([jnp.zeros(s) for s in shapes])
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
