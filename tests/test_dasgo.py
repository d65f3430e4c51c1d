"""ASGO and DASGO against a float64 port of the official code
(`official_asgo`), the Muon identity, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import foam_optax as fo
import official_asgo
from helpers import FAST_COMPILE

STEPS = 50
LR = 1e-2
# torch (out, in) shapes: out > in, out < in, square.
SHAPES = {"tall": (8, 5), "wide": (5, 8), "square": (6, 6)}


def _gradients(shapes, steps, seed=0):
  """A fixed gradient sequence per parameter (torch layout), with a
  persistent mean so that the momentum and statistics matter."""
  rng = np.random.default_rng(seed)
  means = {k: rng.standard_normal(s) for k, s in shapes.items()}
  return [{k: means[k] + 0.5 * rng.standard_normal(s)
           for k, s in shapes.items()} for _ in range(steps)]


def _run_official(official, shapes, grads):
  rng = np.random.default_rng(1)
  params = {k: rng.standard_normal(s) for k, s in shapes.items()}
  trajectory = []
  for g in grads:
    params = official.step(params, g)
    trajectory.append(params)
  return {k: rng.standard_normal(s) for k, s in shapes.items()}, trajectory


def _run_library(tx, shapes, grads, stacked=False):
  """The same run in JAX's (in, out) layout, in float64; returns the
  parameters after every step in torch layout."""
  rng = np.random.default_rng(1)
  start = {k: rng.standard_normal(s) for k, s in shapes.items()}
  to_jax = lambda tree: {k: jnp.asarray(v.T) for k, v in tree.items()}
  with jax.enable_x64(True):
    params = to_jax(start)
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p),
                   compiler_options=FAST_COMPILE)
    trajectory = []
    for g in grads:
      updates, state = step(params, state, to_jax(g))
      params = optax.apply_updates(params, updates)
      trajectory.append({k: np.asarray(v).T for k, v in params.items()})
  return state, trajectory


def _max_relative_error(ours, theirs):
  return max(float(np.linalg.norm(o[k] - t[k]) / np.linalg.norm(t[k]))
             for o, t in zip(ours, theirs) for k in t)


@pytest.mark.parametrize("make,official", [
    (lambda: fo.asgo(LR), lambda: official_asgo.OfficialASGO(LR)),
    (lambda: fo.asgo(LR, root_method="newton_schulz"),
     lambda: official_asgo.OfficialASGO(
         LR, inv_method="_matrix_inverse_root_newtonschulz")),
    (lambda: fo.dasgo(LR), lambda: official_asgo.OfficialDASGO(LR)),
])
def test_matches_the_official_code_for_50_steps(make, official):
  grads = _gradients(SHAPES, STEPS)
  _, theirs = _run_official(official(), SHAPES, grads)
  _, ours = _run_library(make(), SHAPES, grads)
  assert _max_relative_error(ours, theirs) <= 1e-6


@pytest.mark.parametrize("make,official", [
    (lambda numbers: fo.asgo(LR, weight_dimension_numbers=numbers),
     lambda: official_asgo.OfficialASGO(LR)),
    (lambda numbers: fo.dasgo(LR, weight_dimension_numbers=numbers),
     lambda: official_asgo.OfficialDASGO(LR)),
])
def test_stacked_layers_match_the_official_code_slice_by_slice(make, official):
  """A (layers, in, out) leaf with dimension numbers: each layer is its own
  matrix, as the official code steps separate parameters."""
  layers, shape = 3, (5, 7)   # torch (out, in) per layer
  grads = _gradients({f"l{i}": shape for i in range(layers)}, STEPS)
  _, theirs = _run_official(official(), {f"l{i}": shape
                                         for i in range(layers)}, grads)
  rng = np.random.default_rng(1)
  start = np.stack([rng.standard_normal(shape).T for _ in range(layers)])
  numbers = {"w": fo.DimensionNumbers(reduction_axis=1, output_axis=2)}
  tx = make(numbers)
  with jax.enable_x64(True):
    params = {"w": jnp.asarray(start)}
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: tx.update(g, s, p),
                   compiler_options=FAST_COMPILE)
    ours = []
    for g in grads:
      stacked = {"w": jnp.asarray(np.stack([g[f"l{i}"].T
                                            for i in range(layers)]))}
      updates, state = step(params, state, stacked)
      params = optax.apply_updates(params, updates)
      ours.append({f"l{i}": np.asarray(params["w"][i]).T
                   for i in range(layers)})
  assert _max_relative_error(ours, theirs) <= 1e-6


def test_polar_express_kernel_matches_the_port():
  rng = np.random.default_rng(0)
  g = rng.standard_normal((7, 12))
  factor = g @ g.T / 12
  with jax.enable_x64(True):
    ours = fo.kernels.polar_express_inverse_sqrt(jnp.asarray(factor), 1e-10,
                                                  10)
  theirs = official_asgo.matrix_inverse_root_polar_express(factor, 1e-10, 10)
  np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)
  d, q = np.linalg.eigh(factor)
  exact = (q * d ** -0.5) @ q.T
  assert np.linalg.norm(theirs - exact) <= 1e-6 * np.linalg.norm(exact)


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (6, 6)])
def test_muon_identity(shape):
  """With b1 = b2 = 0 and an exact inverse root, ASGO's direction is the
  orthogonalised gradient U Vᵀ (up to its norm), which optax's Muon
  computes; here with its convergent Newton–Schulz coefficients."""
  rng = np.random.default_rng(0)
  g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  tx = fo.scale_by_asgo(b1=0.0, b2=0.0, epsilon=1e-12, root_method="eigh")
  update, _ = jax.jit(tx.update, compiler_options=FAST_COMPILE)(g, tx.init(g))
  u, _, vt = np.linalg.svd(np.asarray(g, np.float64), full_matrices=False)
  polar = u @ vt
  # 60 iterations given as 60 rows of coefficients: optax scans them
  # instead of unrolling 60 steps into the compiled program.
  muon_tx = optax.contrib.scale_by_muon(ns_coeffs=((1.5, -0.5, 0.0),) * 60,
                                        ns_steps=60, beta=0.0,
                                        nesterov=False)
  muon, _ = jax.jit(muon_tx.update,
                    compiler_options=FAST_COMPILE)(g, muon_tx.init(g))
  normalized = lambda x: np.asarray(x, np.float64) / np.linalg.norm(x)
  np.testing.assert_allclose(normalized(update), normalized(polar),
                             atol=2e-5)
  np.testing.assert_allclose(normalized(update), normalized(muon), atol=2e-5)


def test_zero_and_rank_deficient_statistics_give_finite_updates():
  """First steps with dead units (zero rows) and an all-zero gradient."""
  tx = fo.asgo(LR)
  params = {"w": jnp.ones((6, 4))}
  state = tx.init(params)
  dead = np.random.default_rng(0).standard_normal((6, 4))
  dead[2:] = 0.0   # four dead input rows: a rank-2 statistic
  update_fn = jax.jit(tx.update, compiler_options=FAST_COMPILE)
  for g in (jnp.zeros((6, 4)), jnp.asarray(dead, jnp.float32)):
    updates, state = update_fn({"w": g}, state, params)
    assert bool(np.all(np.isfinite(np.asarray(updates["w"]))))
  assert fo.stats(state)["nonfinite_skips"] == 0


def test_a_non_finite_root_falls_back_to_the_identity(monkeypatch):
  """As the official code: the identity instead of a non-finite root,
  counted as a failed refresh; the next step recomputes it."""
  from foam_optax._src import refresh
  real = refresh._ITERATIVE_ROOTS["polar_express"]
  calls = {"n": 0}

  def flaky(factor, eps, iterations):
    calls["n"] += 1
    root = real(factor, eps, iterations)
    return root * jnp.nan if calls["n"] == 1 else root

  monkeypatch.setitem(refresh._ITERATIVE_ROOTS, "polar_express", flaky)
  tx = fo.scale_by_asgo(b1=0.0)
  g = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6)),
                  jnp.float32)
  state = tx.init(g)
  # Traced once: both calls below.
  update, state = jax.jit(tx.update, compiler_options=FAST_COMPILE)(g, state)
  identity_step = np.asarray(g) * 0.2 * np.sqrt(24) / np.linalg.norm(g)
  np.testing.assert_allclose(update, identity_step, rtol=1e-5)
  assert int(fo.stats(state)["eigendecomposition_failures"]) == 1


def test_one_sided_foam_is_asgo_with_foams_refresh():
  """``root_method='eigh', controller='foam'``: ASGO's update from a cached
  eigenbasis that FOAM refreshes only when its proxy asks."""
  rng = np.random.default_rng(0)
  mean = rng.standard_normal((16, 24))
  tx = fo.asgo(1e-2, root_method="eigh", controller="foam",
               check_frequency=5)
  params = {"w": jnp.zeros((16, 24))}
  state = tx.init(params)
  step = jax.jit(lambda s, g: tx.update({"w": g}, s, params),
                 compiler_options=FAST_COMPILE)
  for _ in range(40):
    g = jnp.asarray(mean + 0.1 * rng.standard_normal((16, 24)), jnp.float32)
    updates, state = step(state, g)
  stats = fo.stats(state)
  assert int(stats["num_factors"]) == 1
  assert int(stats["checks"]) == 9   # steps 1, 5, 10, ..., 40
  assert 1 <= int(stats["eigendecompositions"]) < 9
  rms = float(jnp.sqrt(jnp.mean(updates["w"] ** 2)))
  assert rms == pytest.approx(1e-2 * 0.2, rel=1e-3)


@pytest.mark.parametrize("make,needed", [
    (lambda: fo.foam(1e-3, root_method="polar_express"), "controller"),
    (lambda: fo.scale_by_shampoo(root_method="newton_schulz", exponent=4),
     "exponent"),
    (lambda: fo.scale_by_asgo(controller="foam"), "controller"),
    (lambda: fo.shampoo(1e-3, root_method="polar_express",
                        cache_inverse_root=False), "cache_inverse_root"),
])
def test_iterative_roots_refuse_what_needs_an_eigenbasis(make, needed):
  with pytest.raises(ValueError, match=f"^root_method=.*{needed}"):
    make()


def test_shampoo_with_polar_express_roots_matches_eigh_roots():
  """Shampoo's own option: the inverse roots by Polar Express instead of
  eigh give the same preconditioned step once both factors have full rank
  (on a rank-deficient factor the iteration leaves near-null directions
  amplified by about 1e5, eigh by ``ε^(-1/2)``: a one-sided factor on the
  smaller side, as ASGO's, has full rank)."""
  rng = np.random.default_rng(0)
  grads = [jnp.asarray(rng.standard_normal((6, 9)), jnp.float32)
           for _ in range(4)]
  steps = {}
  for method in ("eigh", "polar_express"):
    tx = fo.scale_by_shampoo(root_method=method, check_frequency=1,
                             start_preconditioning_step=1, epsilon=1e-6,
                             grafting="none", b1=0.0)
    state = tx.init(grads[0])
    # One program, not one per eager cond.
    update_fn = jax.jit(tx.update, compiler_options=FAST_COMPILE)
    for g in grads:
      update, state = update_fn(g, state)
    steps[method] = np.asarray(update)
  np.testing.assert_allclose(steps["polar_express"], steps["eigh"],
                             rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("make", [lambda **k: fo.dasgo(LR, **k),
                                  lambda **k: fo.scale_by_dasgo(**k)])
def test_dasgo_takes_asgos_epsilon_and_its_old_eps_with_a_warning(make):
  """ASGO's and DASGO's damping is `epsilon`; DASGO's former `eps` still
  works, with a DeprecationWarning that names `epsilon`."""
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)}
  grads = {"w": jnp.sin(5 * params["w"])}

  def step(tx):
    return tx.update(grads, tx.init(params), params)[0]["w"]

  new = step(make(epsilon=0.5))
  with pytest.warns(DeprecationWarning, match=r"the argument 'eps' is "
                    r"deprecated, pass epsilon=0\.5 instead") as record:
    old = step(make(eps=0.5))
  assert record[0].filename == __file__   # points at the caller
  np.testing.assert_array_equal(old, new)
  assert not np.array_equal(new, step(make()))   # the value reaches DASGO
  with pytest.raises(TypeError, match="pass 'epsilon' only"):
    make(eps=0.5, epsilon=0.5)


def test_asgo_and_dasgo_name_their_damping_alike():
  import inspect
  for fn in (fo.asgo, fo.scale_by_asgo, fo.dasgo, fo.scale_by_dasgo):
    params = inspect.signature(fn).parameters
    assert "epsilon" in params and "eps" not in params, fn.__name__
  with pytest.raises(TypeError, match=r"^fo\.asgo\(\) got an unexpected "
                     r"keyword argument 'eps'; did you mean 'epsilon'\?$"):
    fo.asgo(LR, eps=1e-10)
