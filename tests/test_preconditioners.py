"""Preconditioners: what is applied to a block's momentum.

Eigenvalue-corrected preconditioning (SPEC 3: SOAP and FOAM-in-eigenbasis)
against the float64 reference; the cached inverse root against the uncached
one, the root damping; one-sided preconditioning (``one_sided=True``: one
factor per matrix, on its smaller side) against a dense NumPy reference."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import foam_optax as fo
from helpers import BASE, FAST_COMPILE, branches, compare, run_steps


# Fewer leaves than the root-inverse suite: (4,4) square, (2,3,4) -> (6,4)
# blocked 4+2, (3,5) blocked 4+1, (1,5) vector, () scalar.
SHAPES = [(4, 4), (2, 3, 4), (3, 5), (1, 5), ()]
# With first_step='init_only' the first bases come from one gradient, so a
# factor's statistic has rank min(m, n) then. Where its null space has two
# or more dimensions, the basis inside it is arbitrary (it differs between
# eigh implementations), so these cases use unblocked leaves whose factors
# lack at most one rank: (5,4), (2,2,3) -> (4,3), and (1,2) as a vector.
INIT_ONLY_SHAPES = [(4, 4), (5, 4), (2, 2, 3), (1, 2), ()]


def _soap_and_reference_kwargs(**soap):
  """scale_by_soap arguments and the equivalent reference arguments.

  The reference reshapes tensors to blocked matrices, so the library runs
  with ``tensor_shaping='matrix'``; by default both update the statistics
  before rotating and step from the first gradient (Distributed Shampoo's
  conventions), the official SOAP's being separate cases.
  """
  soap = dict(dict(b1=0.9, b2=0.9, epsilon=1e-8, check_frequency=2,
                   start_preconditioning_step=3, block_size=4,
                   controller_epsilon=1e-3, max_epsilon=3e-3, threshold=0.5,
                   residual_tol=0.1, precondition_1d=True,
                   rotation_basis="updated", first_step="update",
                   tensor_shaping="matrix"), **soap)
  ref = dict(b1=soap["b1"], b2=soap["b2"], graft_b2=soap["b2"],
             rotation_basis=soap["rotation_basis"],
             first_step=soap["first_step"],
             graft_eps=soap["epsilon"], grafting="adam",
             check_frequency=soap["check_frequency"],
             start_preconditioning_step=soap["start_preconditioning_step"],
             block_size=soap["block_size"],
             epsilon=soap["controller_epsilon"],
             max_epsilon=soap["max_epsilon"], threshold=soap["threshold"],
             residual_tol=soap["residual_tol"],
             precondition_1d=soap["precondition_1d"],
             controller=soap.get("controller", "stale"),
             refresh_method=soap.get("refresh_method", "power_qr"),
             preconditioner="eigenvalue_corrected")
  return soap, ref


def test_no_factors_is_adam():
  # max_precond_dim below every dimension: no factor anywhere, plain Adam.
  params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros((5,)),
            "k": jnp.zeros((2, 3, 4)), "s": jnp.zeros(())}
  b1, b2, eps = 0.9, 0.99, 1e-8
  # Stepping from the first gradient, SOAP's Adam is optax's but for where
  # eps sits (sqrt(V)+eps, then the bias correction; invisible at rtol 1e-5
  # for gradients of order 1).
  soap = fo.scale_by_soap(b1=b1, b2=b2, epsilon=eps, max_precond_dim=1,
                          precondition_1d=True, check_frequency=2,
                          first_step="update")
  adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
  s_soap, s_adam = soap.init(params), adam.init(params)
  assert not fo.find_states(s_soap, fo.FactorStack)
  rng = np.random.default_rng(1)
  step = jax.jit(lambda g, s1, s2: (soap.update(g, s1), adam.update(g, s2)),
                 compiler_options=FAST_COMPILE)
  for _ in range(6):
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
        params)
    (u1, s_soap), (u2, s_adam) = step(grads, s_soap, s_adam)
    for k in params:
      np.testing.assert_allclose(u1[k], u2[k], rtol=1e-5, atol=1e-6)
      # Not a trivial comparison: Adam's step has entries of order 1.
      assert np.max(np.abs(u2[k])) > 0.1


# Every controller with the eigenvalue-corrected preconditioner; both
# refresh methods under both refresh_batchings (power-QR's 'bucket' path,
# which mixes first bases and warm starts, with a controller that refreshes
# some factors); no momentum; and the official SOAP's conventions, each
# alone and both together. The slow cases pair them otherwise; each names
# the default cases that cover its path.
SOAP_CASES = [
    ("foam", "power_qr", "bucket", {}),
    ("residual", "eigh", "bucket", {"rotation_basis": "previous"}),
    ("foam_fixed_damping", "power_qr", "map", {}),
    ("foam_no_refresh", "eigh", "map", {}),
    ("stale", "power_qr", "map", {"b1": 0.0}),
    ("stale", "power_qr", "map",
     {"first_step": "init_only", "start_preconditioning_step": 1,
      "block_size": None}),
    ("foam", "power_qr", "map",
     {"first_step": "init_only", "start_preconditioning_step": 1,
      "rotation_basis": "previous", "block_size": None}),
    # Slow: foam-power_qr-bucket (power-QR under 'bucket') and
    # stale-power_qr-map-b1=0.0 (stale).
    pytest.param("stale", "power_qr", "bucket", {}, marks=pytest.mark.slow),
    # Slow: residual-eigh-bucket-rotation_basis=previous (residual, eigh)
    # and foam_no_refresh-eigh-map (eigh under 'map').
    pytest.param("residual", "eigh", "map", {}, marks=pytest.mark.slow),
    # Slow: foam_no_refresh-eigh-map (eigh under 'map') and
    # stale-power_qr-map-b1=0.0 (stale).
    pytest.param("stale", "eigh", "map", {}, marks=pytest.mark.slow),
    # Slow: residual-eigh-bucket-rotation_basis=previous (residual) and
    # foam_fixed_damping-power_qr-map (power-QR under 'map').
    pytest.param("residual", "power_qr", "map", {}, marks=pytest.mark.slow),
    # Slow: residual-eigh-bucket-rotation_basis=previous (the convention
    # alone) and foam-power_qr-map-first_step=init_only-...-rotation_basis=
    # previous (with power-QR under 'map').
    pytest.param("stale", "power_qr", "map", {"rotation_basis": "previous"},
                 marks=pytest.mark.slow),
]


def _soap_case_id(controller, refresh, refresh_batching, extra):
  return f"{controller}-{refresh}-{refresh_batching}" + "".join(
      f"-{k}={v}" for k, v in extra.items())


@pytest.mark.parametrize(
    "controller,refresh,refresh_batching,extra", SOAP_CASES,
    ids=[_soap_case_id(*(case.values if hasattr(case, "values") else case))
         for case in SOAP_CASES])
def test_soap_matches_reference(controller, refresh, refresh_batching, extra):
  soap, ref = _soap_and_reference_kwargs(controller=controller,
                                         refresh_method=refresh, **extra)
  shapes = INIT_ONLY_SHAPES if soap["first_step"] == "init_only" else SHAPES
  _, ref_f, _ = compare(shapes, ref, soap=soap,
                        refresh_batching=refresh_batching)
  reuses, later = branches(ref_f)
  if controller == "foam_no_refresh":
    # Only the first basis; the damping rises to its cap instead.
    assert later == 0 and reuses > 0
    assert ref_f["damping"].max() == pytest.approx(soap["max_epsilon"])
    return
  assert later > 0
  if controller != "stale":
    assert reuses > 0, (reuses, later)


def test_foam_eigenvalue_corrected_matches_reference():
  # scale_by_foam's own spelling of FOAM in the eigenbasis, with its
  # grafting option applying to the unpreconditioned scalar.
  kwargs = dict(BASE, controller="foam", preconditioner="eigenvalue_corrected",
                refresh_method="eigh", grafting="sgd", precondition_1d=True)
  _, ref_f, _ = compare(SHAPES, kwargs, refresh_batching="map")
  reuses, later = branches(ref_f)
  assert reuses > 0 and later > 0, (reuses, later)


def test_defaults_are_the_soap_papers():
  paper = dict(b1=0.95, b2=0.95, epsilon=1e-8, check_frequency=10,
               max_precond_dim=10000, precondition_1d=False, merge_dims=False,
               rotation_basis="previous", first_step="init_only",
               tensor_shaping="per_dimension", block_size=None, stagger=False)
  for fn, extra in ((fo.scale_by_soap, {}), (fo.soap, {"weight_decay": 0.01})):
    params = inspect.signature(fn).parameters
    for name, value in dict(paper, **extra).items():
      assert params[name].default == value, (fn.__name__, name)


def test_init_only_first_step_needs_the_first_check_at_step_one():
  # The initialising step computes every first basis: it is the first check.
  with pytest.raises(ValueError, match="^start_preconditioning_step "):
    fo.scale_by_soap(start_preconditioning_step=2)
  fo.scale_by_soap(start_preconditioning_step=2, first_step="update")


def test_official_conventions_need_the_eigenvalue_corrected_preconditioner():
  from foam_optax._src import config
  with pytest.raises(ValueError, match="^rotation_basis="):
    config.validate(config.Config(rotation_basis="previous"))
  with pytest.raises(ValueError, match="^merge_dims=True needs"):
    config.validate(config.Config(preconditioner="eigenvalue_corrected",
                                  merge_dims=True))


def test_eigenvalue_corrected_leaves_without_a_factor_decay_with_b2():
  """In eigenvalue-corrected mode a leaf without a factor runs the
  eigenbasis Adam (decay `b2`), not the grafting optimizer's `graft_b2`."""
  tx = fo.scale_by_foam(preconditioner="eigenvalue_corrected", b2=0.5,
                        graft_b2=0.995, b1=0.0)
  params = {"v": jnp.zeros(4), "w": jnp.zeros((3, 3))}
  v = np.arange(1.0, 5.0, dtype=np.float32)
  grads = {"v": jnp.asarray(v), "w": jnp.ones((3, 3))}
  # One program for init and the first update, not one per eager operation.
  updates, state = jax.jit(lambda g: tx.update(g, tx.init(params)),
                           compiler_options=FAST_COMPILE)(grads)
  np.testing.assert_allclose(state.nu["v"], 0.5 * v ** 2, rtol=1e-6)
  # SOAP's step of such a leaf: m·sqrt(1 - b2^t) / (sqrt(v) + eps).
  np.testing.assert_allclose(
      updates["v"], v * np.sqrt(0.5) / (np.sqrt(0.5) * v + 1e-9), rtol=1e-5)


@pytest.mark.parametrize("name", [
    "scale_by_foam",
    # Slow: X is applied through Q and D by the same code whatever the
    # controller; [scale_by_foam] checks it.
    pytest.param("scale_by_shampoo", marks=pytest.mark.slow)])
def test_uncached_inverse_root_matches_cached(name):
  """X applied through Q and D equals the cached X, with no (m, m) X kept."""
  params = {"w": jnp.ones((6, 4)), "k": jnp.ones((2, 3, 4))}
  opts = dict(check_frequency=2, pseudo_inverse_rtol=1e-6)
  cached, _ = run_steps(getattr(fo, name)(**opts), params, 5,
                        compiler_options=FAST_COMPILE)
  uncached, state = run_steps(
      getattr(fo, name)(cache_inverse_root=False, **opts), params, 5,
      compiler_options=FAST_COMPILE)
  for key in params:
    np.testing.assert_allclose(uncached[key], cached[key], rtol=2e-4,
                               atol=1e-6)
  assert all(fs.inverse_root is None for g in state.classes
             for fs in (g.left, g.right) if fs is not None)


def test_root_damping_epsilon_keeps_decisions_and_builds_x_with_epsilon0():
  """``root_damping='epsilon'`` (the X@ε0 ablation): on the same gradients
  the controller makes the same decisions and damping as FOAM's, while X is
  built with ε0, checked against X assembled from the state's basis."""
  rng = np.random.default_rng(0)
  # Stationary, then a new mean: FOAM raises the damping before refreshing.
  means = [rng.standard_normal((6, 5)) for _ in range(2)]
  grads = [means[t >= 12] + 0.3 * rng.standard_normal((6, 5))
           for t in range(24)]
  options = dict(b1=0.0, epsilon=1e-3, max_epsilon=1e-1, threshold=0.1,
                 check_frequency=2, grafting="none")
  runs = {}
  for root_damping in ("controller", "epsilon"):
    tx = fo.scale_by_foam(root_damping=root_damping, **options)
    state = tx.init(jnp.zeros((6, 5)))
    step = jax.jit(tx.update, compiler_options=FAST_COMPILE)
    dampings, updates = [], []
    for g in grads:
      u, state = step(jnp.asarray(g, jnp.float32), state)
      dampings.append(np.asarray(state.classes[0].left.damping))
      updates.append(u)
    runs[root_damping] = (np.stack(dampings), state, updates)
  d_controller, _, u_controller = runs["controller"]
  d_epsilon, state, u_epsilon = runs["epsilon"]
  np.testing.assert_array_equal(d_controller, d_epsilon)
  assert d_controller.max() > 1e-3   # the damping moved: the test can fail
  assert fo.stats(state)["eigendecompositions"] > 2
  gs = state.classes[0]
  x = lambda fs: (fs.basis[0] * (fs.eigvals[0] + 1e-3) ** -0.5) @ fs.basis[0].T
  corrected = grads[-1]   # b1 = 0: the momentum is the gradient
  np.testing.assert_allclose(u_epsilon[-1], x(gs.left) @ corrected @ x(gs.right),
                             rtol=2e-4, atol=1e-6)
  assert not np.allclose(u_controller[-1], u_epsilon[-1], rtol=1e-3)


# (shape, the side kept): the smaller side; the rows on a tie.
CASES = [((6, 4), "right"), ((4, 6), "left"), ((5, 5), "left")]


def _inverse_sqrt(a, eps):
  d, q = np.linalg.eigh(a)
  return (q * (np.maximum(d, 0) + eps) ** -0.5) @ q.T


ONE_SIDED = dict(one_sided=True, b1=0.0, b2=0.9, epsilon=1e-3,
                 grafting="none", check_frequency=1,
                 start_preconditioning_step=1)
ONE_SIDED_STEPS = 6


@functools.lru_cache
def _one_sided_updates():
  """One-sided Shampoo's update of each CASES shape, step by step, the
  shapes as the leaves of one tree (one program for all), each leaf's
  gradients drawn as the test below draws them."""
  tx = fo.scale_by_shampoo(**ONE_SIDED)
  state = tx.init([jnp.zeros(shape) for shape, _ in CASES])
  step = jax.jit(tx.update, compiler_options=FAST_COMPILE)
  rngs = [np.random.default_rng(0) for _ in CASES]
  updates = []
  for _ in range(ONE_SIDED_STEPS):
    grads = [jnp.asarray(rng.standard_normal(shape), jnp.float32)
             for rng, (shape, _) in zip(rngs, CASES)]
    update, state = step(grads, state)
    updates.append([np.asarray(u) for u in update])
  return updates


@pytest.mark.parametrize("shape,side", CASES)
def test_one_sided_shampoo_matches_a_dense_reference(shape, side):
  b2, eps = ONE_SIDED["b2"], ONE_SIDED["epsilon"]
  state = fo.scale_by_shampoo(**ONE_SIDED).init(jnp.zeros(shape))
  assert [v.side for v in fo.factor_stacks(state)] == [side]
  leaf = CASES.index((shape, side))
  rng = np.random.default_rng(0)
  statistic = 0.0
  for t, updates in enumerate(_one_sided_updates(), start=1):
    g = rng.standard_normal(shape)
    gram = g @ g.T if side == "left" else g.T @ g
    statistic = b2 * statistic + (1 - b2) * gram
    root = _inverse_sqrt(statistic / (1 - b2 ** t), eps)
    expected = root @ g if side == "left" else g @ root
    np.testing.assert_allclose(updates[leaf], expected, rtol=2e-3, atol=1e-4)


def test_one_sided_with_max_precond_dim_under_inject_hyperparams():
  """The side dropped by one-sidedness is not read as a max_precond_dim
  limit when a static max_precond_dim is checked against the state."""
  import optax
  tx = optax.inject_hyperparams(fo.foam, static_args=(
      "max_precond_dim", "block_size"))(
          learning_rate=1e-3, one_sided=True, max_precond_dim=1000)
  params = {"w": jnp.ones((8, 3))}
  state = tx.init(params)
  step = jax.jit(tx.update, compiler_options=FAST_COMPILE)
  _, state = step({"w": jnp.ones((8, 3))}, state, params)
  assert int(fo.stats(state)["num_factors"]) == 1
