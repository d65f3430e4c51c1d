"""Kronecker-factor state: statistics, cached eigenbases, and their refresh.

A `FactorState` holds a stack of `k` same-sized factors (one per block of a
block group). Each factor has its own statistic, basis, eigenvalues, damping,
check phase and counters; nothing is shared between factors.

On a factor's check step its controller decides whether a fresh
eigendecomposition is needed. The decomposition sits in a `lax.cond` branch
whose predicate is a per-factor scalar, never a `vmap`-batched one, so a
factor that keeps its basis executes no `eigh` at all. Two schedules of that
work are offered:

* ``grouping='map'``: `lax.map` over the stack, one `lax.cond` per factor.
* ``grouping='bucket'``: one `lax.cond` for the whole stack that runs a
  batched refresh when any member needs it, then keeps the old basis of the
  members that did not ask.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from foam_optax._src import linalg
from foam_optax._src.config import Config
from foam_optax._src.controllers import CONTROLLERS, Decision


class FactorState(NamedTuple):
  """State of a stack of `k` Kronecker factors of size `m`."""

  statistic: jax.Array       # (k, m, m) EMA of G Gᵀ (or Gᵀ G), not bias-corrected
  basis: jax.Array           # (k, m, m) cached eigenvectors Q (columns)
  eigvals: jax.Array         # (k, m) cached eigenvalues D >= 0, descending
  damping: jax.Array         # (k,) stored damping ε_s
  proxy: jax.Array           # (k,) controller's last staleness measure
  phase: jax.Array           # (k,) int32 check-step offset (stagger)
  checks: jax.Array          # (k,) int32 check steps evaluated
  refreshes: jax.Array       # (k,) int32 fresh eigendecompositions
  failures: jax.Array        # (k,) int32 refreshes that failed (basis kept)
  # (k, m, m) X = Q diag((D + ε_s)^(-1/p)) Qᵀ, rebuilt at every check; None
  # for eigenvalue-corrected preconditioning, which applies Q itself.
  inverse_root: Optional[jax.Array] = None


def init_factor_state(count, size, epsilon, phase, dtype,
                      exponent=None) -> FactorState:
  """Identity bases, zero statistics; `exponent` (root-inverse
  preconditioning only) makes the state cache the inverse roots."""
  eye = jnp.broadcast_to(jnp.eye(size, dtype=dtype), (count, size, size))
  # A fresh array per field: a state whose fields share a buffer cannot be
  # donated to a jitted step (XLA rejects donating one buffer twice).
  zeros_i = lambda: jnp.zeros((count,), jnp.int32)
  damping = jnp.full((count,), epsilon, dtype)
  eigvals = jnp.zeros((count, size), dtype)
  inverse_root = None
  if exponent is not None:
    inverse_root = eye * linalg.inverse_root_weights(
        eigvals, damping, exponent)[:, None, :]
  return FactorState(
      statistic=jnp.zeros((count, size, size), dtype),
      basis=eye,
      eigvals=eigvals,
      damping=damping,
      proxy=jnp.zeros((count,), dtype),
      phase=jnp.asarray(phase, jnp.int32),
      checks=zeros_i(), refreshes=zeros_i(), failures=zeros_i(),
      inverse_root=inverse_root)


def is_check_step(step, phase, cfg: Config):
  """`t == s0` or (`t > s0` and `(t + phase) % f == 0`); phase 0 without stagger."""
  first = cfg.first_check_step
  freq = jnp.asarray(cfg.check_frequency, jnp.int32)
  periodic = (step > first) & ((step + phase) % freq == 0)
  return (step == first) | periodic


class _Refresh(NamedTuple):
  basis: jax.Array
  eigvals: jax.Array
  order: jax.Array   # permutation of the basis columns (for rotated moments)
  ok: jax.Array


def _by_eigh(factor) -> _Refresh:
  basis, eigvals, ok = linalg.fresh_eigendecomposition(factor)
  return _Refresh(basis, eigvals, jnp.arange(factor.shape[-1]), ok)


def _by_power_qr(factor, basis) -> _Refresh:
  return _Refresh(*linalg.power_qr_refresh(factor, basis))


def _compute_refresh(factor, fs: FactorState, first, cfg: Config) -> _Refresh:
  """The expensive part: a fresh basis for one factor."""
  if cfg.refresh_method == "eigh":
    return _by_eigh(factor)
  # The first basis of every factor is a full eigendecomposition.
  return lax.cond(first, lambda: _by_eigh(factor),
                  lambda: _by_power_qr(factor, fs.basis))


def _compute_refresh_stack(factors, fs: FactorState, first,
                           cfg: Config) -> _Refresh:
  """Fresh bases for a whole stack with batched kernels (`grouping='bucket'`).

  `first` marks the members that need their first, full eigendecomposition.
  Power-QR stacks run the batched `eigh` only when some member does (at
  `s0`, or after a failed first decomposition), never on ordinary checks.
  """
  by_eigh = lambda: jax.vmap(_by_eigh)(factors)
  if cfg.refresh_method == "eigh":
    return by_eigh()
  by_power_qr = lambda: jax.vmap(_by_power_qr)(factors, fs.basis)

  def mixed():
    full, warm = by_eigh(), by_power_qr()
    pick = lambda x, y: jnp.where(
        first.reshape(first.shape + (1,) * (x.ndim - 1)), x, y)
    return jax.tree.map(pick, full, warm)

  return lax.cond(jnp.any(first), mixed, by_power_qr)


def _no_refresh(fs: FactorState) -> _Refresh:
  size = fs.eigvals.shape[-1]
  return _Refresh(fs.basis, fs.eigvals, jnp.arange(size), jnp.asarray(True))


def _commit(fs: FactorState, decision: Decision, fresh: _Refresh, cfg: Config):
  """New state of one checked factor given the decision and refresh result."""
  eps0 = jnp.asarray(cfg.epsilon, fs.damping.dtype)
  refresh = decision.refresh
  success = refresh & fresh.ok
  failure = refresh & jnp.logical_not(fresh.ok)
  # On a failed refresh keep the old basis and raise damping to the cap.
  failed_damping = jnp.maximum(
      jnp.asarray(cfg.max_epsilon, fs.damping.dtype),
      jnp.maximum(eps0, fs.damping))
  damping = jnp.where(success, eps0,
                      jnp.where(failure, failed_damping, decision.damping))
  new = fs._replace(
      basis=jnp.where(success, fresh.basis, fs.basis),
      eigvals=jnp.where(success, fresh.eigvals,
                        jnp.where(failure, fs.eigvals, decision.eigvals)),
      damping=damping,
      proxy=decision.proxy,
      checks=fs.checks + 1,
      refreshes=fs.refreshes + success.astype(jnp.int32),
      failures=fs.failures + failure.astype(jnp.int32))
  if fs.inverse_root is not None:
    # Rebuilt once per check (the damping may change without a refresh) so
    # that every step applies X with two products instead of four.
    new = new._replace(inverse_root=linalg.inverse_root(
        new.basis, new.eigvals, new.damping, cfg.exponent))
  order = jnp.where(success, fresh.order, jnp.arange(fresh.order.shape[-1]))
  return new, order


def _decide(factor, fs: FactorState, cfg: Config) -> tuple[Decision, jax.Array]:
  first = fs.checks == 0
  decision = CONTROLLERS[cfg.controller](
      factor, fs.basis, fs.eigvals, fs.damping, cfg)
  # The first check of every factor computes a fresh basis with ε0.
  decision = decision._replace(
      refresh=first | decision.refresh,
      proxy=jnp.where(first, jnp.zeros_like(decision.proxy), decision.proxy))
  return decision, first


def _check_one(factor, fs: FactorState, cfg: Config):
  decision, first = _decide(factor, fs, cfg)
  fresh = lax.cond(decision.refresh,
                   lambda: _compute_refresh(factor, fs, first, cfg),
                   lambda: _no_refresh(fs))
  return _commit(fs, decision, fresh, cfg)


def _identity_orders(fs: FactorState):
  count, size = fs.eigvals.shape
  return jnp.broadcast_to(jnp.arange(size), (count, size))


def _refresh_map(fs: FactorState, checks, bias_correction, cfg: Config):
  def one(args):
    fs1, check = args
    return lax.cond(
        check, lambda: _check_one(fs1.statistic / bias_correction, fs1, cfg),
        lambda: (fs1, jnp.arange(fs1.statistic.shape[-1])))
  # On most steps no factor is checked: skip the loop entirely.
  return lax.cond(jnp.any(checks), lambda: lax.map(one, (fs, checks)),
                  lambda: (fs, _identity_orders(fs)))


def _refresh_bucket(fs: FactorState, checks, bias_correction, cfg: Config):
  def run_checks():
    factors = fs.statistic / bias_correction
    decision, first = jax.vmap(lambda a, f: _decide(a, f, cfg))(factors, fs)
    decision = decision._replace(refresh=decision.refresh & checks)
    fresh = lax.cond(
        jnp.any(decision.refresh),
        lambda: _compute_refresh_stack(
            factors, fs, first & decision.refresh, cfg),
        lambda: jax.vmap(_no_refresh)(fs))
    new, orders = jax.vmap(lambda f, d, r: _commit(f, d, r, cfg))(
        fs, decision, fresh)
    keep = lambda n, o: jnp.where(
        checks.reshape(checks.shape + (1,) * (n.ndim - 1)), n, o)
    return jax.tree.map(keep, new, fs), jnp.where(
        checks[:, None], orders, _identity_orders(fs))

  return lax.cond(jnp.any(checks), run_checks,
                  lambda: (fs, _identity_orders(fs)))


def update_factor(fs: FactorState, gram, step, cfg: Config):
  """Accumulate this step's Gram matrices and refresh on check steps.

  Args:
    fs: stacked state of `k` factors.
    gram: (k, m, m) this step's G Gᵀ (or Gᵀ G) per block.
    step: 1-based step `t`.
    cfg: hyperparameters.

  Returns:
    (new state, (k, m) column orders of the new bases relative to the old).
  """
  b2 = jnp.asarray(cfg.b2, fs.statistic.dtype)
  statistic = b2 * fs.statistic + (1 - b2) * gram
  fs = fs._replace(statistic=statistic)
  checks = is_check_step(step, fs.phase, cfg)
  refresh = _refresh_map if cfg.grouping == "map" else _refresh_bucket
  # A_t = L_t / (1 - b2^t) is formed only inside the check branches.
  return refresh(fs, checks, 1 - b2 ** step, cfg)
