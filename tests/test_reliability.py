"""Fault injection and degenerate inputs for every exported optimizer."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import foam_optax as fo
from foam_optax._src import linalg
from helpers import all_finite, core_state, leaf_states, normal_like

EPS, MAX_EPS = 1e-9, 3e-7
# Small settings: preconditioning from step 1, a check every 2 steps.
FAST = dict(start_preconditioning_step=1, check_frequency=2)
OPTIMIZERS = {
    "foam": lambda **k: fo.foam(1e-2, **FAST, **k),
    "shampoo": lambda **k: fo.shampoo(1e-2, **FAST, **k),
    "soap": lambda **k: fo.soap(1e-2, check_frequency=2, **k),
    "scale_by_foam": lambda **k: fo.scale_by_foam(**FAST, **k),
    "scale_by_shampoo": lambda **k: fo.scale_by_shampoo(**FAST, **k),
    "scale_by_soap": lambda **k: fo.scale_by_soap(check_frequency=2, **k),
}


def _params():
  return {"w": jnp.ones((5, 4)), "b": jnp.ones((4,)), "k": jnp.ones((2, 3, 3))}


def _normal(seed, shape, dtype=np.float32):
  """Standard normal draws in NumPy (`jax.random` would compile a program
  per shape)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape)
                     .astype(dtype))


def _grads(seed, params=None, scale=1.0):
  """Gradients shaped like `params` (default `_params()`)."""
  return normal_like(_params() if params is None else params, seed, scale)


def _factors(state):
  return [x for x in jax.tree.leaves(
      core_state(state).classes,
      is_leaf=lambda x: isinstance(x, fo.FactorStack))
          if isinstance(x, fo.FactorStack)]


def _same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  return all(x.dtype == y.dtype and np.array_equal(
      np.asarray(x), np.asarray(y), equal_nan=True) for x, y in zip(la, lb))


def _all_zero(tree):
  return all(bool(np.all(np.asarray(u) == 0)) for u in jax.tree.leaves(tree))


def _stepper(tx):
  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates
  return step


def _without_skips(state):
  """The state with the skip counters zeroed, to compare everything else."""
  core = core_state(state)
  return _replace_core(state, core._replace(
      nonfinite_skips=jnp.zeros_like(core.nonfinite_skips),
      consecutive_skips=jnp.zeros_like(core.consecutive_skips),
      overflow_skips=jnp.zeros_like(core.overflow_skips)))


def _without_proxy(state):
  core = core_state(state)
  groups = jax.tree.map(
      lambda f: f._replace(proxy=jnp.zeros_like(f.proxy))
      if isinstance(f, fo.FactorStack) else f,
      core.classes, is_leaf=lambda x: isinstance(x, fo.FactorStack))
  return _replace_core(state, core._replace(classes=groups))


def _replace_core(state, new_core):
  return jax.tree.map(
      lambda x: new_core if isinstance(x, fo.ScaleByFoamState) else x, state,
      is_leaf=lambda x: isinstance(x, fo.ScaleByFoamState))


# ---------------------------------------------------------------------------
# Non-finite gradients.


@pytest.mark.parametrize("name,bad", [
    ("foam", math.nan), ("foam", 1e20), ("shampoo", math.inf),
    ("soap", -math.inf), ("soap", 1e30), ("scale_by_foam", -math.inf),
    ("scale_by_foam", 3e19),
    # A core's own check (as "scale_by_foam") keeping these preconditioners'
    # states (as "shampoo" and "soap" through their alias): slow variants.
    pytest.param("scale_by_shampoo", math.nan, marks=pytest.mark.slow),
    pytest.param("scale_by_soap", math.inf, marks=pytest.mark.slow)])
def test_nonfinite_gradient_skips_whole_update(name, bad):
  """A bad value in one leaf: zero update, state bit-for-bit kept, counted.

  The later trajectory equals the one that never saw the bad gradient.
  1e20 is finite but its square overflows float32 statistics, so it is
  treated like an infinity. The aliases check in their `skip_nonfinite`
  wrapper, the cores (``scale_by_*``) on their own.
  """
  tx, step = _shared_stepper(name)
  _check_skipped_step(tx, bad, step)


@pytest.mark.parametrize("options", [
    dict(factor_matrix_dtype=jnp.bfloat16), dict(statistics_compute_steps=2)],
    ids=["bfloat16_statistics", "statistics_every_2_steps"])
def test_skipped_step_keeps_statistics_exactly(options):
  # A skipped step leaves the factor statistics as they were by arithmetic
  # (zero gradients, b2 = 1), not by a select: exact in low-precision
  # storage, and with statistics accumulated on some steps only. One
  # matrix (two factors): a smaller program than `_params()`'s three leaves.
  _check_skipped_step(OPTIMIZERS["foam"](**options), math.nan,
                      params={"w": jnp.ones((5, 4))})


@functools.lru_cache(maxsize=None)
def _shared_stepper(name):
  """One optimizer and its jitted step per name: the bad value is data, so
  every parametrization of a name runs the same compiled step."""
  tx = OPTIMIZERS[name]()
  return tx, _stepper(tx)


def _check_skipped_step(tx, bad, step=None, params=None):
  step = step or _stepper(tx)
  params = _params() if params is None else params
  clean = (params, tx.init(params))
  faulty = clean
  for i in range(3):
    clean = step(*clean, _grads(i, params))[:2]
    faulty = step(*faulty, _grads(i, params))[:2]
  poisoned = _grads(99, params)
  poisoned["w"] = poisoned["w"].at[2, 1].set(bad)
  params_after, state_after, updates = step(*faulty, poisoned)
  assert _all_zero(updates)
  assert _same(params_after, faulty[0])
  assert int(fo.stats(state_after)["nonfinite_skips"]) == 1
  assert int(fo.stats(state_after)["step"]) == 3
  assert _same(_without_skips(state_after), faulty[1])
  faulty = (params_after, state_after)
  for i in range(3, 7):
    clean = step(*clean, _grads(i, params))[:2]
    faulty = step(*faulty, _grads(i, params))[:2]
  assert _same(faulty[0], clean[0])
  assert _same(_without_skips(faulty[1]), clean[1])
  assert int(fo.stats(faulty[1])["step"]) == 7
  assert all_finite(faulty)


def _mixed_params():
  return {"matrix": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3),
          "vector": jnp.array([0.5, -1.0, 2.0]),
          "embed": jnp.ones((10, 4))}


def _skip_counters(state):
  return [int(s.nonfinite_skips) for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, fo.ScaleByFoamState))
          if isinstance(s, fo.ScaleByFoamState)]


def _check_whole_chain_skipped(tx, step, bad_leaf):
  """Two clean steps, then a NaN in `bad_leaf` only: zero updates, every
  state array kept bit for bit except the foam skip counter (incremented);
  the next clean step continues the trajectory that never saw the NaN."""
  params = _mixed_params()
  carry = (params, tx.init(params))
  for i in range(2):   # step 2 is a check step: bases computed
    carry = step(*carry, _grads(i, params))[:2]
  poisoned = _grads(2, params)
  poisoned[bad_leaf] = poisoned[bad_leaf].at[1].set(jnp.nan)
  params_after, state_after, updates = step(*carry, poisoned)
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  assert _all_zero(updates)
  assert _same(params_after, carry[0])
  assert int(fo.stats(state_after)["nonfinite_skips"]) == 1
  assert _skip_counters(state_after) == [1]
  assert _same(_without_skips(state_after), carry[1])
  clean = step(*carry, _grads(3, params))[:2]
  faulty = step(params_after, state_after, _grads(3, params))[:2]
  assert not _same(clean[0], carry[0])
  assert _same(faulty[0], clean[0])
  assert _same(_without_skips(faulty[1]), clean[1])
  return state_after


@functools.lru_cache(maxsize=None)
def _partition_stepper():
  """foam on the matrices, AdamW on the rest; one jitted step for both
  parametrizations (the NaN's leaf is data)."""
  tx = fo.partition(fo.foam(0.1, check_frequency=2), optax.adamw(0.1))
  return tx, _stepper(tx)


@pytest.mark.parametrize("bad_leaf", ["vector", "matrix"])
def test_partition_skips_both_parts(bad_leaf):
  """`fo.partition`: a NaN in either part skips foam *and* AdamW."""
  assert fo.precondition_labels(_mixed_params()) == {
      "matrix": "precondition", "vector": "diagonal", "embed": "diagonal"}
  _check_whole_chain_skipped(*_partition_stepper(), bad_leaf)


def test_skip_nonfinite_keeps_schedule_count():
  """`fo.skip_nonfinite` around a chain: weight decay gives no step and the
  learning-rate schedule's count does not advance."""
  schedule = optax.linear_schedule(1.0, 0.0, 10)
  tx = fo.skip_nonfinite(optax.chain(
      fo.scale_by_foam(check_frequency=2), optax.add_decayed_weights(0.1),
      optax.scale_by_learning_rate(schedule)))
  state = _check_whole_chain_skipped(tx, _stepper(tx), "vector")
  counts = [int(s.count) for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
            if isinstance(s, optax.ScaleByScheduleState)]
  assert counts == [2]
  assert int(fo.stats(state)["step"]) == 2


@pytest.mark.parametrize("name", [
    "foam",
    # The alias's skip_nonfinite wrapper inside apply_if_finite, as for
    # "foam": a slow variant. A core's own skip: apply_if_finite keeps the
    # inner state as for "foam", whatever the core did: slow too.
    pytest.param("shampoo", marks=pytest.mark.slow),
    pytest.param("scale_by_soap", marks=pytest.mark.slow)])
def test_composes_with_apply_if_finite(name):
  tx = optax.apply_if_finite(OPTIMIZERS[name](), max_consecutive_errors=3)
  step = _stepper(tx)
  # A matrix and the vector that gets the NaN: a smaller program than
  # `_params()`'s three leaves.
  params = {"w": jnp.ones((5, 4)), "b": jnp.ones((4,))}
  carry = (params, tx.init(params))
  carry = step(*carry, _grads(0, params))[:2]
  before = carry
  poisoned = _grads(1, params)
  poisoned["b"] = poisoned["b"].at[0].set(jnp.nan)
  params1, state1, updates = step(*carry, poisoned)
  assert _all_zero(updates)
  assert _same(params1, before[0])
  assert _same(state1.inner_state, before[1].inner_state)
  assert int(state1.notfinite_count) == 1
  assert int(fo.stats(state1)["step"]) == 1
  carry = (params1, state1)
  for i in range(2, 5):
    carry = step(*carry, _grads(i, params))[:2]
  assert int(carry[1].notfinite_count) == 0
  assert int(fo.stats(carry[1])["step"]) == 4
  assert all_finite(carry)


def test_skip_nonfinite_false_propagates():
  """The opt-out really is one: NaN reaches the updates."""
  tx = fo.scale_by_foam(skip_nonfinite=False, **FAST)
  params = {"w": jnp.ones((5, 4))}   # one leaf: a smaller program
  state = tx.init(params)
  grads = _grads(0, params)
  grads["w"] = grads["w"].at[0, 0].set(jnp.nan)
  updates, state = jax.jit(tx.update)(grads, state)
  assert not bool(np.all(np.isfinite(np.asarray(updates["w"]))))
  assert int(fo.stats(state)["nonfinite_skips"]) == 0


# ---------------------------------------------------------------------------
# Failed eigendecompositions.


# Whether the eigendecompositions fail: read when a compiled step runs, so
# that one compiled step per configuration serves its healthy and its
# failing steps.
_EIGH_FAILS = [False]


def _switchable_eigh(matrix):
  """`jnp.linalg.eigh`, or NaN while ``_EIGH_FAILS[0]`` is set."""
  vals, vecs = jnp.linalg.eigh(matrix)
  fails = jax.pure_callback(lambda: np.bool_(_EIGH_FAILS[0]),
                            jax.ShapeDtypeStruct((), jnp.bool_),
                            vmap_method="broadcast_all")
  return jnp.where(fails, jnp.nan, vals), jnp.where(fails, jnp.nan, vecs)


@pytest.fixture
def eigh_fails():
  """Sets whether the steps of `_failing_stepper` fail their
  eigendecompositions; healthy again after the test."""
  def set_fails(value):
    _EIGH_FAILS[0] = value
  yield set_fails
  _EIGH_FAILS[0] = False


FAILING = {
    "foam": lambda **k: fo.scale_by_foam(threshold=1e-9, **FAST, **k),
    "foam_fixed_damping": lambda **k: fo.scale_by_foam(
        controller="foam_fixed_damping", threshold=1e-9, **FAST, **k),
    "residual": lambda **k: fo.scale_by_foam(
        controller="residual", residual_tol=0.0, **FAST, **k),
    "shampoo": lambda **k: fo.shampoo(1e-2, **FAST, **k),
    "soap_eigh": lambda **k: fo.soap(1e-2, check_frequency=2,
                                     refresh_method="eigh", **k),
    "soap": lambda **k: fo.soap(1e-2, check_frequency=2, **k),   # power-QR
}


@functools.lru_cache(maxsize=None)
def _failing_stepper(name, refresh_batching):
  """The optimizer and its jitted step, traced with `_switchable_eigh`; one
  per configuration, shared by the tests of failed eigendecompositions."""
  tx = FAILING[name](stagger=False, refresh_batching=refresh_batching)
  step = _stepper(tx)

  def run(*args):
    with linalg.using_eigh(_switchable_eigh):   # in place for the trace
      return step(*args)
  return tx, run


def _orthonormal(basis):
  basis = np.asarray(basis)
  eye = np.eye(basis.shape[-1])
  return bool(np.all(np.abs(np.swapaxes(basis, -1, -2) @ basis - eye) < 1e-4))


@pytest.mark.parametrize("name,refresh_batching", [
    ("foam", "map"), ("shampoo", "bucket"), ("soap_eigh", "map"),
    # The same refresh path under the other controllers: slow variants.
    pytest.param("foam_fixed_damping", "bucket", marks=pytest.mark.slow),
    pytest.param("residual", "map", marks=pytest.mark.slow)])
def test_failed_eigendecomposition_keeps_basis_and_recovers(
    name, refresh_batching, eigh_fails):
  tx, step = _failing_stepper(name, refresh_batching)
  params = _params()
  carry = (params, tx.init(params))
  for i in range(2):   # step 1: first EVD succeeds; step 2: a check
    carry = step(*carry, _grads(i))[:2]
  good = fo.stats(carry[1])
  assert int(good["eigendecomposition_failures"]) == 0
  bases = [f.basis for f in _factors(carry[1])]
  dampings = [f.damping for f in _factors(carry[1])]

  eigh_fails(True)
  for i in range(2, 6):
    carry = step(*carry, _grads(i))[:2]
  bad = fo.stats(carry[1])
  failures = int(bad["eigendecomposition_failures"])
  assert failures > 0
  assert int(bad["eigendecompositions"]) == int(good["eigendecompositions"])
  for f, basis, damping in zip(_factors(carry[1]), bases, dampings):
    failed = f.failures > 0
    assert np.array_equal(np.asarray(f.basis)[np.asarray(failed)],
                          np.asarray(basis)[np.asarray(failed)])
    assert bool(np.all(np.where(
        failed, np.asarray(f.damping) >= np.maximum(
            MAX_EPS, np.asarray(damping)) * (1 - 1e-6), True)))
  assert all_finite(carry)

  eigh_fails(False)
  for i in range(6, 12):
    carry = step(*carry, _grads(i))[:2]
  after = fo.stats(carry[1])
  assert int(after["eigendecomposition_failures"]) == failures
  assert int(after["eigendecompositions"]) > int(bad["eigendecompositions"])
  assert float(after["damping_max"]) <= MAX_EPS * (1 + 1e-6)
  assert all(_orthonormal(f.basis) for f in _factors(carry[1]))
  assert all_finite(carry)


# FOAM and Shampoo on the configurations above (their compiled steps), SOAP
# with its default power-QR refresh.
@pytest.mark.parametrize("name,refresh_batching", [
    ("foam", "map"), ("shampoo", "bucket"), ("soap", "map")])
def test_first_eigendecomposition_fails(name, refresh_batching, eigh_fails):
  """Failing from the very first check: identity basis, damping at the cap."""
  tx, step = _failing_stepper(name, refresh_batching)
  params = _params()
  carry = (params, tx.init(params))
  eigh_fails(True)
  for i in range(3):
    carry = step(*carry, _grads(i))[:2]
  st = fo.stats(carry[1])
  assert int(st["eigendecomposition_failures"]) >= int(st["num_factors"]) > 0
  for f in _factors(carry[1]):
    if name.endswith("soap"):   # power-QR refreshes after the first check
      continue
    assert np.array_equal(np.asarray(f.basis),
                          np.broadcast_to(np.eye(f.basis.shape[-1]),
                                          f.basis.shape))
    assert bool(np.all(np.asarray(f.damping) >= MAX_EPS * (1 - 1e-6)))
  assert all_finite(carry)
  eigh_fails(False)
  for i in range(3, 9):
    carry = step(*carry, _grads(i))[:2]
  assert int(fo.stats(carry[1])["eigendecompositions"]) > 0
  assert all_finite(carry)


# b1 = 0.9 and one block: the grafting test's Adam reference; the float32
# limit and scale invariance tests run the same compiled update.
UNBLOCKED = ("scale_by_foam", "scale_by_shampoo")


@functools.lru_cache(maxsize=None)
def _unblocked_update(name):
  tx = OPTIMIZERS[name](b1=0.9, block_size=None)
  return tx, jax.jit(tx.update)


@pytest.mark.parametrize("controller", ["foam", "residual"])
def test_gradient_at_the_float32_limit(controller):
  """‖G‖² just below the float32 maximum is applied (Gram entries ~1e38,
  eigh at the edge of its range); just above it the step is skipped.

  Only the diagnostic `proxy` may be non-finite here (the drift norm
  overflows, which asks for a fresh basis); nothing that feeds a step is.
  """
  if controller == "foam":
    tx, step = _unblocked_update("scale_by_foam")
  else:
    tx = fo.scale_by_foam(controller=controller, **FAST)
    step = jax.jit(tx.update)
  shape = (5, 4)
  state = tx.init({"w": jnp.zeros(shape)})
  # float32, not weakly typed: the same compiled step as the later grads.
  updates, state = step({"w": jnp.full(shape, 3.8e18, jnp.float32)},
                        state)   # 2.9e38
  st = fo.stats(state)
  assert int(st["nonfinite_skips"]) == 0 and int(st["step"]) == 1
  assert int(st["eigendecomposition_failures"]) == 0
  assert all_finite((updates, state))
  assert 0 < float(np.abs(np.asarray(updates["w"])).max()) < 10
  before = state
  updates, state = step({"w": jnp.full(shape, 4.4e18, jnp.float32)},
                        state)   # 3.9e38
  assert int(fo.stats(state)["nonfinite_skips"]) == 1
  assert _same(_without_skips(state), before)
  for i in range(1, 8):
    updates, state = step(_grads(i, {"w": jnp.zeros(shape)}), state)
    assert all_finite((updates, _without_proxy(state)))
    assert 0 < float(np.abs(np.asarray(updates["w"])).max()) < 10
  assert int(fo.stats(state)["step"]) == 8


# ---------------------------------------------------------------------------
# Degenerate inputs.


@pytest.mark.parametrize("name", [
    "foam", "shampoo", "soap",
    # Shampoo's factors as for "shampoo", without the alias: slow.
    pytest.param("scale_by_shampoo", marks=pytest.mark.slow)])
def test_zero_gradients_for_many_steps(name):
  tx, step = _shared_stepper(name)
  params = jax.tree.map(jnp.zeros_like, _params())
  carry = (params, tx.init(params))
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(25):
    carry = step(*carry, zeros)[:2]
  assert _all_zero(carry[0])
  st = fo.stats(carry[1])
  assert int(st["eigendecomposition_failures"]) == 0
  assert EPS * (1 - 1e-6) <= float(st["damping_max"]) <= MAX_EPS * (1 + 1e-6)
  _, state, updates = step(*carry, _grads(0))
  norms = [float(np.linalg.norm(np.asarray(u)))
           for u in jax.tree.leaves(updates)]
  assert all(0 < n < 1e3 for n in norms), norms
  assert all_finite(state)


def _adam_norm(grads_seq, b1, b2, eps):
  adam = optax.scale_by_adam(b1, b2, eps)
  state = adam.init(grads_seq[0])
  for g in grads_seq:
    a, state = adam.update(g, state)
  return np.linalg.norm(np.asarray(a, np.float64))


def _norm64(x):
  return np.linalg.norm(np.asarray(x, np.float64))


@pytest.mark.parametrize("name", UNBLOCKED)
def test_grafted_norm_at_extreme_magnitudes(name):
  """Each block's step has exactly the Adam grafting norm at any magnitude.

  Below graft_eps the Adam step is ~g/graft_eps (tiny but nonzero); above,
  it is scale-free. The preconditioned direction itself spans ~1e-30..1e30
  here, so the rescaling must not under- or overflow.
  """
  tx, step = _unblocked_update(name)
  for scale in [1e-30, 1e-20, 1e-10, 1.0, 1e10, 1e18]:
    state = tx.init({"w": jnp.zeros((5, 4))})
    seq = [scale * _normal(i, (5, 4)) for i in range(4)]
    for g in seq:
      updates, state = step({"w": g}, state)
    expected = _adam_norm(seq, 0.9, 0.995, 1e-9)
    assert expected > 0
    np.testing.assert_allclose(_norm64(updates["w"]), expected, rtol=1e-4,
                               err_msg=f"scale={scale}")
    assert int(fo.stats(state)["nonfinite_skips"]) == 0
    assert all_finite(state)


@pytest.mark.parametrize("name", ["scale_by_foam", "scale_by_shampoo",
                                  "scale_by_soap"])
def test_scale_invariance(name):
  """Powers of two are exact in float: the step must not depend on them."""
  if name in UNBLOCKED:   # the grafting test's compiled update
    tx, step = _unblocked_update(name)
  else:
    tx = OPTIMIZERS[name]()
    step = jax.jit(tx.update)
  norms = []
  for scale in [2.0 ** -10, 1.0, 2.0 ** 30, 2.0 ** 60]:
    state = tx.init({"w": jnp.zeros((5, 4))})
    for i in range(5):
      g = scale * _normal(i, (5, 4))
      updates, state = step({"w": g}, state)
    norms.append(_norm64(updates["w"]))
  np.testing.assert_allclose(norms, norms[1], rtol=2e-3)
  assert 0 < norms[1] <= 2 * math.sqrt(20)


def _rank_one_grads(scale):
  """Gradients of rank one in every matricization (`_params()`'s shapes)."""
  u, v = np.arange(5.0) - 2.0, np.array([1.0, -1.0, 0.0, 2.0])
  a, b, c = np.array([1.0, -2.0]), np.arange(3.0) - 1.0, np.ones(3)
  grads = {"w": np.outer(u, v), "b": v, "k": np.einsum("i,j,k->ijk", a, b, c)}
  return {k: jnp.asarray(scale * g, jnp.float32) for k, g in grads.items()}


@pytest.mark.parametrize("name", ["scale_by_foam", "shampoo", "soap"])
def test_rank_deficient_factors(name):
  """Rank-1 gradients: singular factors, finite steps with the graft norm."""
  tx, step = _shared_stepper(name)   # the non-finite tests' compiled step
  params = jax.tree.map(jnp.zeros_like, _params())
  carry = (params, tx.init(params))
  for i in range(12):
    carry = step(*carry, _rank_one_grads(1.0 + 0.1 * i))[:2]
  st = fo.stats(carry[1])
  assert int(st["eigendecomposition_failures"]) == 0
  assert float(st["damping_max"]) <= MAX_EPS * (1 + 1e-6)
  for f in _factors(carry[1]):
    assert bool(np.all(np.asarray(f.eigvals) >= 0))
    assert _orthonormal(f.basis)
  assert all_finite(carry)
  assert 0 < float(np.abs(np.asarray(carry[0]["w"])).max()) < 1e3


@pytest.mark.parametrize("name", [
    "foam", "soap",
    # The layout of "foam" (Shampoo's factors are laid out alike): slow.
    pytest.param("scale_by_shampoo", marks=pytest.mark.slow)])
def test_awkward_shapes(name):
  params = {
      "scalar": jnp.ones(()), "row": jnp.ones((1, 7)), "col": jnp.ones((7, 1)),
      "empty": jnp.ones((0, 3)), "empty3": jnp.ones((2, 0, 4)),
      "none": None, "nested": {"empty": {}, "t": ()},
      "w": jnp.ones((3, 5)), "one": jnp.ones((1, 1)),
  }
  tx = OPTIMIZERS[name]()
  state = tx.init(params)
  step = _stepper(tx)
  carry = (params, state)
  for i in range(5):
    grads = _grads(i, params)
    carry_params, new_state, updates = step(*carry, grads)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      assert u.shape == p.shape and u.dtype == p.dtype
    carry = (carry_params, new_state)
  assert all_finite(carry)
  for key in ("scalar", "row", "col", "w", "one"):
    assert not np.array_equal(np.asarray(carry[0][key]),
                              np.asarray(params[key])), key
  # Only the genuine matrix gets Kronecker factors (3 x 3 and 5 x 5); SOAP,
  # as the official code, also gives the 7-long side of "row" and "col" a
  # factor (their other side, of size 1, would be the scalar 1): one stack.
  sizes = sorted(f.basis.shape[-1] for f in _factors(carry[1]))
  assert sizes == ([3, 5, 7] if name == "soap" else [3, 5])


@pytest.mark.parametrize("name", [
    "foam", "soap", "scale_by_foam",
    # Without a leaf these compile the programs of "foam" (the alias) and
    # "scale_by_foam" (the cores): slow variants.
    *(pytest.param(name, marks=pytest.mark.slow)
      for name in ("shampoo", "scale_by_shampoo", "scale_by_soap"))])
def test_empty_pytree(name):
  tx = OPTIMIZERS[name]()
  for params in ({}, (), {"a": None}):
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(params, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    st = fo.stats(state)
    assert int(st["num_factors"]) == 0 and int(st["step"]) == 1


@pytest.mark.parametrize("name", [
    "foam", "soap",
    # The layout and blocks of "foam" (the same max_precond_dim): slow.
    pytest.param("shampoo", marks=pytest.mark.slow)])
def test_embedding_65536_by_4(name):
  """A tall embedding with max_precond_dim: only the 4 x 4 side is kept."""
  kwargs = {"max_precond_dim": 1024} if name != "soap" else {}
  tx = OPTIMIZERS[name](**kwargs)
  params = {"emb": jnp.zeros((65536, 4))}
  state = tx.init(params)
  # 65536 > max_precond_dim: no left factor; one 4 x 4 right factor per
  # row block (64 with block_size=1024, 1 for SOAP's block_size=None).
  blocks = 1 if name == "soap" else 64
  assert [f.basis.shape for f in _factors(state)] == [(blocks, 4, 4)]
  step = _stepper(tx)
  carry = (params, state)
  rows = np.arange(65536)
  for i in range(3):   # sparse rows, as an embedding lookup produces
    g = np.where((rows % 97 == i)[:, None], np.asarray(_normal(i, (65536, 4))),
                 np.float32(0))
    carry = step(*carry, {"emb": jnp.asarray(g)})[:2]
  assert all_finite(carry)
  assert int(fo.stats(carry[1])["eigendecompositions"]) >= 1
  touched = np.any(np.asarray(carry[0]["emb"]) != 0, axis=1)
  # SOAP's first gradient only initialises its factors: rows touched by the
  # later two gradients move.
  first = 1 if name == "soap" else 0
  assert bool(np.all(touched == ((rows % 97 >= first) & (rows % 97 < 3))))


@pytest.mark.parametrize("name,dtype", [
    ("foam", jnp.bfloat16), ("soap", jnp.bfloat16),
    ("scale_by_foam", jnp.float16),
    # Shampoo's buffers are FOAM's (cached inverse roots included) and cast
    # alike: slow, as "foam". float16 parameters as for "scale_by_foam",
    # SOAP's buffers in a low-precision model as for "soap": slow.
    pytest.param("shampoo", jnp.bfloat16, marks=pytest.mark.slow),
    pytest.param("scale_by_shampoo", jnp.float16, marks=pytest.mark.slow),
    pytest.param("scale_by_soap", jnp.float16, marks=pytest.mark.slow)])
def test_low_precision_parameters(name, dtype):
  """Updates and momentum in the parameter dtype (optax's ``mu_dtype=None``),
  every other buffer in float32, loss decreases."""
  target = _normal(1, (6, 4), dtype)
  params = {"w": jnp.zeros((6, 4), dtype), "b": jnp.zeros((4,), dtype)}
  loss = lambda p: jnp.sum((p["w"].astype(jnp.float32) - target) ** 2) + \
      jnp.sum(p["b"].astype(jnp.float32) ** 2)
  tx = optax.chain(OPTIMIZERS[name](), optax.scale(-5e-2)) if name.startswith(
      "scale_by") else OPTIMIZERS[name]()
  state = tx.init(params)
  leaves = leaf_states(state)
  assert {x.momentum.dtype for x in leaves} == {jnp.dtype(dtype)}
  momenta = {id(x.momentum) for x in leaves}
  float_leaves = [x for x in jax.tree.leaves(state)
                  if jnp.issubdtype(x.dtype, jnp.floating)
                  and id(x) not in momenta]
  assert all(x.dtype == jnp.float32 for x in float_leaves)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
    return optax.apply_updates(params, updates), state

  start = float(loss(params))
  for _ in range(30):
    params, state = step(params, state)
  assert all(p.dtype == dtype for p in jax.tree.leaves(params))
  assert all_finite((params, state))
  assert float(loss(params)) < 0.8 * start


def test_float16_update_saturates_instead_of_overflowing():
  """A finite float32 direction beyond float16's range is clipped to it."""
  tx = fo.scale_by_foam(grafting="none", epsilon=1e-12, max_epsilon=1e-12,
                        check_frequency=1, start_preconditioning_step=1)
  # Rank one, exactly representable in float16: singular value s ~ 5.8e-7,
  # so the direction's scale s / (s^2 + eps) ~ 4e5 exceeds float16's 65504.
  g32 = jnp.full((2, 3), 4 * 2.0 ** -24, jnp.float32)
  # Jitted: an eager update compiles its operations one by one.
  update = jax.jit(tx.update)
  reference, _ = update({"w": g32}, tx.init({"w": g32}))
  reference = np.asarray(reference["w"])
  big = np.abs(reference) > 65504.0
  assert bool(np.any(big)), "the float32 direction must exceed float16's range"
  g16 = g32.astype(jnp.float16)
  updates, _ = update({"w": g16}, tx.init({"w": g16}))
  assert updates["w"].dtype == jnp.float16
  assert bool(np.all(np.isfinite(np.asarray(updates["w"]))))
  expected = np.clip(reference, -65504.0, 65504.0).astype(np.float16)
  np.testing.assert_array_equal(np.asarray(updates["w"]), expected)


@pytest.mark.slow
def test_long_run_damping_stays_in_range():
  """20,000 steps of drifting curvature (scripts/long_run.py)."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).parents[1] / "scripts" / "long_run.py"
  spec = importlib.util.spec_from_file_location("long_run", path)
  long_run = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(long_run)
  r = long_run.run(fo.scale_by_foam(epsilon=EPS, max_epsilon=MAX_EPS), 20000)
  assert r["finite"] and int(r["step"]) == 20000
  assert EPS * (1 - 1e-6) <= r["damping_min"]
  assert r["damping_max"] <= MAX_EPS * (1 + 1e-6)
  assert 0 < r["eigendecompositions"] < r["checks"]
  assert r["final_loss"] < r["losses"][0]
