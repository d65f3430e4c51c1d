"""The factor pipeline: bases change only on check steps, and each factor's
check phase and schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import foam_optax as fo
from helpers import FAST_COMPILE


@pytest.mark.parametrize("controller,tol", [
    ("residual", 1.0),
    # Slow: a fresh basis on every check, as [stale-0.1] asserts; the
    # residual controller's path is [residual-1.0]'s.
    pytest.param("residual", 0.0, marks=pytest.mark.slow),
    ("stale", 0.1)])
def test_bases_change_only_on_check_steps(controller, tol):
  params = [jnp.zeros((4, 3)), jnp.zeros((2, 3, 2))]
  tx = fo.scale_by_soap(check_frequency=3, start_preconditioning_step=2,
                        controller=controller, residual_tol=tol, stagger=False,
                        refresh_method="power_qr", first_step="update")
  steps = 14
  rng = np.random.default_rng(2)
  grads = [jnp.asarray(rng.standard_normal((steps,) + p.shape), jnp.float32)
           for p in params]

  def body(state, g):
    _, state = tx.update(g, state)
    fss = fo.find_states(state, fo.FactorStack)
    bases = jnp.concatenate([f.basis.reshape(-1) for f in fss])
    return state, (bases, fo.stats(state))

  _, (bases, stats) = jax.jit(lambda s, g: lax.scan(body, s, g),
                              compiler_options=FAST_COMPILE)(
                                  tx.init(params), grads)
  bases = np.asarray(bases)
  changed = [not np.array_equal(bases[t], bases[t - 1])
             for t in range(1, steps)]
  checks = [t == 2 or (t > 2 and t % 3 == 0) for t in range(2, steps + 1)]
  # A basis moves only on a check step.
  assert all(c for c, ch in zip(checks, changed) if ch)
  num_factors = int(stats["num_factors"][-1])
  evds = np.asarray(stats["eigendecompositions"])
  n_checks = np.asarray(stats["checks"])
  assert n_checks[-1] == num_factors * sum(checks)
  if controller == "residual" and tol == 1.0:
    # ‖offdiag(B)‖ <= ‖B‖ always: only the first basis is ever computed.
    assert evds[-1] == num_factors
    assert not any(changed[1:])
  else:
    # tol = 0 (and 'stale'): a fresh basis on every check.
    np.testing.assert_array_equal(evds, n_checks)
    assert all(ch for c, ch in zip(checks, changed) if c)


@pytest.mark.parametrize("make,phase,refresh_steps", [
    (lambda: fo.scale_by_soap(check_frequency=3), -1, [1, 4, 7]),
    (lambda: fo.scale_by_foam(check_frequency=3, controller="stale"), 0,
     [3, 6]),
])
def test_check_phase_and_schedule(make, phase, refresh_steps):
  """Without stagger every factor's check phase is -1 with the init-only
  first step (SOAP: refreshes after updates s = t - 1 = 0, f, 2f, ...) and 0
  otherwise (checks at t = s0, 2f, ...)."""
  tx = make()
  params = {"w": jnp.zeros((4, 3))}
  state = tx.init(params)
  assert all(np.all(np.asarray(v.stack.phase) == phase)
             for v in fo.factor_stacks(state))
  step = jax.jit(tx.update, compiler_options=FAST_COMPILE)
  rng = np.random.default_rng(0)
  seen, before = [], 0
  for t in range(1, 8):
    grads = {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}
    _, state = step(grads, state)
    total = int(fo.stats(state)["eigendecompositions"])
    if total > before:
      seen.append(t)
    before = total
  assert seen == refresh_steps
