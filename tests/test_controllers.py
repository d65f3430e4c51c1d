"""FOAM's staleness proxy h against the true error of the stale inverse root.

SPEC 2.2: to first order ‖X(A) − X_stale‖_F / ‖X_stale‖_F ≤ h with
X_stale = X(Q, D, ε) from the cached eigendecomposition of an earlier factor
and X(A) = (A + εI)^(-1/p).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as scipy_stats

import foam_optax as fo
from foam_optax._src.controllers import staleness_proxy
from helpers import run_steps
import reference


def _spd(rng, n, cond):
  q, _ = np.linalg.qr(rng.standard_normal((n, n)))
  d = np.geomspace(1.0, 1.0 / cond, n)
  return (q * d) @ q.T


def _root(a, eps, p):
  d, q = np.linalg.eigh(a)
  return (q * (d + eps) ** (-1.0 / p)) @ q.T


def _figures(rng, n, cond, eps, p, sizes):
  """(h, true relative error) for perturbations A0 + δ·λ_min(A0)·E with
  ‖E‖_F = 1 (so A stays positive definite for δ < 1), one per size δ."""
  a0 = _spd(rng, n, cond)
  q, d = reference.eigh_desc(a0)
  stale = reference.inverse_root(q, d, eps, p)
  currents = []
  for size in sizes:
    e = rng.standard_normal((n, n))
    e = (e + e.T) / np.linalg.norm(e + e.T)
    currents.append(a0 + size * d.min() * e)
  currents = np.stack(currents)
  with jax.enable_x64(True):
    proxy = jax.jit(jax.vmap(
        lambda a: staleness_proxy(a, jnp.asarray(q), jnp.asarray(d),
                                  jnp.asarray(eps), p)))(currents)
    proxy = np.asarray(proxy)
  errors = np.array([np.linalg.norm(_root(a, eps, p) - stale) /
                     np.linalg.norm(stale) for a in currents])
  # The library's h is the SPEC formula (checked against the reference).
  np.testing.assert_allclose(
      proxy, [reference.staleness_proxy(a, q, d, eps, p) for a in currents],
      rtol=1e-7)
  return proxy, errors


@pytest.mark.parametrize("p,cond,eps", [(2, 10.0, 1e-9), (2, 1e3, 1e-4),
                                        (4, 1e2, 1e-6)])
def test_proxy_bounds_error_to_first_order(p, cond, eps):
  rng = np.random.default_rng(int(p * cond))
  proxy, errors = _figures(rng, 6, cond, eps, p, np.full(40, 1e-4))
  ratio = errors / proxy
  print(f"\np={p} cond={cond:g} eps={eps:g}: error/h in "
        f"[{ratio.min():.3f}, {ratio.max():.3f}], median {np.median(ratio):.3f}")
  # Bound, with slack for the second-order terms.
  assert np.all(errors <= proxy * 1.01), np.max(errors / proxy)
  # And not vacuous: h is within a modest factor of the error.
  assert np.median(errors / proxy) > 0.3


def test_proxy_orders_perturbations():
  rng = np.random.default_rng(7)
  sizes = np.geomspace(1e-4, 0.5, 60)
  proxy, errors = _figures(rng, 6, 1e2, 1e-6, 2, rng.permutation(sizes))
  rho = scipy_stats.spearmanr(proxy, errors).statistic
  print(f"\nSpearman(h, true error) over {len(sizes)} perturbations: {rho:.4f}")
  assert rho > 0.9
  # Small perturbations stay inside the first-order bound.
  small = proxy < 1e-2
  assert small.sum() > 10
  assert np.all(errors[small] <= proxy[small] * 1.05)


def test_controller_literal_names_the_builtin_controllers():
  """The Literal lists the library's own controllers; others registered by
  user code (e.g. `foam_optax.bench.stability`'s) come after it."""
  import typing
  from foam_optax._src import controllers
  builtin = {name for name, fn in controllers.CONTROLLERS.items()
             if fn.__module__ == controllers.__name__}
  assert set(typing.get_args(controllers.Controller)) == builtin


def test_a_registered_controller_works_end_to_end():
  """One registration: validation accepts it, every transformation runs it."""
  from foam_optax._src import controllers
  assert "test_never" not in controllers.CONTROLLERS

  def never(factor, basis, eigvals, damping, cfg, key):
    del factor, basis, key
    return controllers.Decision(jnp.asarray(False), damping, eigvals,
                                jnp.zeros((), damping.dtype))

  controllers.register("test_never")(never)
  try:
    params = {"w": jnp.ones((6, 4)), "k": jnp.ones((2, 3, 4))}
    for tx in (fo.scale_by_foam(controller="test_never", check_frequency=2),
               fo.soap(1e-2, controller="test_never", check_frequency=2),
               fo.scale_by_foam(controller="test_never", check_frequency=2,
                                refresh_batching="bucket")):
      updates, state = run_steps(tx, params, 6)
      s = fo.stats(state)
      # Only the first check of each factor decomposes; the later ones ask
      # the new controller, which never refreshes.
      assert int(s["eigendecompositions"]) == int(s["num_factors"]) > 0
      assert int(s["checks"]) > int(s["num_factors"])
      assert all(bool(jnp.all(jnp.isfinite(u)))
                 for u in jax.tree.leaves(updates))
  finally:
    del controllers.CONTROLLERS["test_never"]


def test_one_controller_registry():
  from foam_optax._src import config, controllers
  assert not hasattr(config, "CONTROLLERS")
  for name in controllers.CONTROLLERS:
    fo.scale_by_foam(controller=name)
  with pytest.raises(ValueError, match="controller must be one of"):
    fo.scale_by_foam(controller="unknown")
