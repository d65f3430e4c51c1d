"""Bias-corrected optimizers: the float64 ports of the official code
(`official_bias_correction`), with the cross-fitting safeguard off and
where it never acts, zero spread, the Monte-Carlo bias, bad input
(microbatch input: test_microbatches.py)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import foam_optax as fo
from foam_optax._src import cross_fitting
from helpers import FAST_COMPILE, first_steps
import official_bias_correction as official


STEPS = 30
LR = 1e-2


def _micro_sequence(shapes, microbatches, steps, seed=0, well_conditioned=False):
  """Per step, per parameter, `microbatches` gradients around a persistent
  mean (torch and JAX layouts alike: these are not transposed). Well
  conditioned: means of magnitude 1 to 3 and noise of 0.3, so that every
  group of microbatches estimates every second moment well."""
  rng = np.random.default_rng(seed)
  means = {k: rng.standard_normal(s) for k, s in shapes.items()}
  noise = 1.0
  if well_conditioned:
    means = {k: np.sign(m) * (1 + np.minimum(np.abs(m), 2))
             for k, m in means.items()}
    noise = 0.3
  return [{k: means[k] + noise * rng.standard_normal((microbatches,) + s)
           for k, s in shapes.items()} for _ in range(steps)]


def _compare(tx, reference, shapes, microbatches=8, well_conditioned=False):
  micro_seq = _micro_sequence(shapes, microbatches, STEPS,
                              well_conditioned=well_conditioned)
  rng = np.random.default_rng(1)
  start = {k: rng.standard_normal(s) for k, s in shapes.items()}
  theirs, params = [], start
  for micro in micro_seq:
    params = reference.step(params, micro)
    theirs.append(params)
  with jax.enable_x64(True):
    params = jax.tree.map(jnp.asarray, start)
    state = tx.init(params)
    step = jax.jit(lambda p, s, m: tx.update(
        jax.tree.map(lambda x: x.mean(0), m), s, p, microbatch_grads=m),
                   compiler_options=FAST_COMPILE)
    error = 0.0
    for micro, ref in zip(micro_seq, theirs):
      updates, state = step(params, state, jax.tree.map(jnp.asarray, micro))
      params = optax.apply_updates(params, updates)
      error = max(error, max(
          float(np.linalg.norm(np.asarray(params[k]) - ref[k])
                / np.linalg.norm(ref[k])) for k in ref))
  return error


ADAMW_SHAPES = {"w": (6, 5), "b": (5,)}


@pytest.mark.parametrize("method,reference", [
    ("leave_one_out", lambda: official.LOOBCAdamW(
        LR, betas=(0.9, 0.95), weight_decay=0.1, jensen_correction=True)),
    ("two_group", lambda: official.BiasCorrectedAdamW(
        LR, betas=(0.9, 0.95), weight_decay=0.1, mode="full")),
])
def test_bias_corrected_adamw_matches_the_official_code(method, reference):
  error = _compare(fo.bias_corrected_adamw(LR, method=method,
                                           cross_fit_safeguard=False),
                   reference(), ADAMW_SHAPES)
  assert error <= 1e-6, error


@pytest.fixture
def floor_triggers(monkeypatch):
  """The number of coordinates the cross-fitting safeguard floors, per
  call of `cross_fitting.floored` in the functions traced from now on."""
  counts = []
  floored = cross_fitting.floored

  def counting(held_out, pooled):
    jax.debug.callback(lambda n: counts.append(int(n)),
                       jnp.sum(held_out < cross_fitting.FRACTION * pooled))
    return floored(held_out, pooled)
  monkeypatch.setattr(cross_fitting, "floored", counting)
  return counts


@pytest.mark.parametrize("method,reference", [
    ("leave_one_out", lambda: official.LOOBCAdamW(
        LR, betas=(0.9, 0.95), weight_decay=0.1, jensen_correction=True)),
    ("two_group", lambda: official.BiasCorrectedAdamW(
        LR, betas=(0.9, 0.95), weight_decay=0.1, mode="full")),
])
def test_the_safeguard_keeps_the_official_adamw_where_it_never_acts(
    method, reference, floor_triggers):
  """Well-conditioned microbatches: the floor is evaluated at every step
  and leaf, is never active, and the run is the official one."""
  error = _compare(fo.bias_corrected_adamw(LR, method=method), reference(),
                   ADAMW_SHAPES, well_conditioned=True)
  assert len(floor_triggers) == STEPS * len(ADAMW_SHAPES)
  assert sum(floor_triggers) == 0
  assert error <= 1e-6, error


SHAMPOO_SHAPES = {"tall": (7, 4), "wide": (3, 6)}
# The official configuration, every step a root step (shampoo_root_freq=1):
# exponent 4, no grafting, raw (not bias-corrected) moving averages.
SHAMPOO = dict(b1=0.9, b2=0.95, epsilon=1e-6, exponent=4, grafting="none",
               check_frequency=1, start_preconditioning_step=1,
               ema_bias_correction=False, block_size=None, weight_decay=0.1)


@pytest.mark.parametrize("make,mode", [
    (lambda: fo.shampoo(LR, bias_correction="cross_fit_variance",
                        cross_fit_safeguard=False, **SHAMPOO), "full"),
    (lambda: fo.shampoo(LR, bias_correction="cross_fit",
                        cross_fit_safeguard=False, **SHAMPOO), "cf"),
    # FOAM's controller run as the stale one: the decisions of every step.
    (lambda: fo.foam(LR, bias_correction="cross_fit_variance",
                     controller="stale", max_epsilon=1e-6,
                     cross_fit_safeguard=False, **SHAMPOO), "full"),
    # The official configuration has no grafting: no second moment for the
    # safeguard to floor, and the run is the official one.
    (lambda: fo.shampoo(LR, bias_correction="cross_fit_variance", **SHAMPOO),
     "full"),
])
def test_bias_corrected_shampoo_matches_the_official_code(make, mode):
  reference = official.BiasCorrectedShampoo(
      LR, weight_decay=0.1, shampoo_beta1=0.9, shampoo_beta2=0.95,
      shampoo_damping=1e-6, shampoo_root_freq=1, mode=mode)
  error = _compare(make(), reference, SHAMPOO_SHAPES)
  assert error <= 1e-6, error


def _same_microbatches(grads, count=4):
  return jax.tree.map(lambda g: jnp.broadcast_to(g, (count,) + g.shape),
                      grads)


@pytest.mark.parametrize("corrected,plain", [
    (lambda: fo.bias_corrected_adamw(1e-2),
     lambda: optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)),
    (lambda: fo.bias_corrected_adamw(1e-2, method="two_group"),
     lambda: optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)),
    (lambda: fo.shampoo(1e-2, check_frequency=4,
                        bias_correction="cross_fit_variance"),
     lambda: fo.shampoo(1e-2, check_frequency=4)),
    (lambda: fo.foam(1e-2, check_frequency=4, epsilon=1e-4, max_epsilon=1e-3,
                     bias_correction="cross_fit_variance"),
     lambda: fo.foam(1e-2, check_frequency=4, epsilon=1e-4,
                     max_epsilon=1e-3)),
    (lambda: fo.soap(1e-2, bias_correction="cross_fit"),
     lambda: fo.soap(1e-2)),
])
def test_zero_spread_changes_nothing(corrected, plain):
  """Identical microbatch gradients: each corrected optimizer is its
  uncorrected self. In float64, and with statistics of full rank at every
  refresh (a basis inside the null space of a rank-deficient statistic is
  arbitrary, so two correct runs may pick different ones there)."""
  params = {"w": jnp.zeros((5, 5)), "t": jnp.zeros((3, 4, 2)),
            "b": jnp.zeros((4,))}
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    a, b = corrected(), plain()
    sa, sb = a.init(params), b.init(params)
    step_a = jax.jit(lambda g, s, p: a.update(
        g, s, p, microbatch_grads=_same_microbatches(g)),
                     compiler_options=FAST_COMPILE)
    step_b = jax.jit(b.update, compiler_options=FAST_COMPILE)
    for _ in range(9):
      grads = jax.tree.map(lambda p: jnp.asarray(
          rng.standard_normal(p.shape)), params)
      ua, sa = step_a(grads, sa, params)
      ub, sb = step_b(grads, sb, params)
      for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
      params = optax.apply_updates(params, ua)


def test_cross_fitting_decorrelates_numerator_and_preconditioner():
  """Over many draws of 8 microbatch gradients per coordinate, Adam's
  first-step numerator and denominator are correlated when both come from
  the same samples, and not when they are cross-fitted."""
  rng = np.random.default_rng(0)
  g = 0.3 + rng.standard_normal((20000, 8))
  plain = np.corrcoef(np.abs(g.mean(1)), (g.mean(1) ** 2))[0, 1]
  numerator, denominator = g[:, :4].mean(1), (g[:, 4:] ** 2).mean(1)
  crossed = np.corrcoef(numerator, denominator)[0, 1]
  same = np.corrcoef(g.mean(1), (g ** 2).mean(1))[0, 1]
  assert abs(crossed) < 0.03 < abs(same) and plain > 0.5


@pytest.mark.parametrize("mu", [0.2, 0.5, 1.0])
def test_variance_correction_reduces_the_first_step_bias_monte_carlo(mu):
  """Monte Carlo over 20,000 coordinates, 8 microbatches of N(μ, 1) each,
  of the paper's estimators (``cross_fit_safeguard=False``).

  Cross-fitted, the first step's numerator is independent of its
  denominator, so the remaining bias is Jensen's: E[1/d] > 1/E[d]. Against
  each estimator's population step (two groups: ``μ/√E[g_j²] =
  μ/√(μ²+1)``; leave-one-out: ``μ/√E[ḡ_{-r}²] = μ/√(μ²+1/7)``), the variance
  correction must cut the relative bias: measured 24% → 13% (two groups)
  and from 300-1070% to 6-21% (leave-one-out, whose uncorrected first
  step divides by one microbatch mean's magnitude), at every μ here.
  """
  two_group = mu / np.sqrt(mu ** 2 + 1.0)
  leave_one_out = mu / np.sqrt(mu ** 2 + 1.0 / 7)
  bias = lambda value, target: abs(value - target) / target
  for method, target in (("two_group", two_group),
                         ("leave_one_out", leave_one_out)):
    plain = bias(first_steps(mu, method=method, variance_correction=False,
                              cross_fit_safeguard=False), target)
    corrected = bias(first_steps(mu, method=method,
                                  cross_fit_safeguard=False), target)
    assert corrected < 0.6 * plain, (method, plain, corrected)
    assert corrected < 0.25, (method, corrected)


def test_variance_correction_refused_where_it_is_not_defined():
  with pytest.raises(ValueError, match="^bias_correction='cross_fit_varian"):
    fo.soap(1e-3, bias_correction="cross_fit_variance")
  with pytest.raises(ValueError, match="^bias_correction='cross_fit_varian"):
    fo.asgo(1e-3, bias_correction="cross_fit_variance") if "bias_correction" \
        in inspect.signature(fo.asgo).parameters else fo.shampoo(
            1e-3, bias_correction="cross_fit_variance",
            root_method="polar_express")


@pytest.mark.parametrize("make", [
    lambda: fo.bias_corrected_adamw(1e-2),
    lambda: fo.foam(1e-2, bias_correction="cross_fit_variance"),
])
def test_a_non_finite_microbatch_gradient_skips_the_step(make):
  tx = make()
  params = {"w": jnp.ones((4, 3))}
  state = tx.init(params)
  micro = np.ones((4, 4, 3), np.float32)
  micro[2, 1, 1] = np.nan
  # Jitted: one program, not one per operation of an eager update.
  step = jax.jit(lambda g, s, m: tx.update(g, s, params, microbatch_grads=m),
                 compiler_options=FAST_COMPILE)
  updates, new_state = step({"w": jnp.ones((4, 3))}, state,
                            {"w": jnp.asarray(micro)})
  assert np.all(np.asarray(updates["w"]) == 0)
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
    if a.dtype != jnp.int32:
      np.testing.assert_array_equal(a, b)
