"""The factor pipeline: statistics, cached eigenbases and their refresh.

A `FactorStack` holds `k` same-sized Kronecker factors (one per block of a
block class, or one per-dimension factor of a tensor leaf). Each factor has
its own statistic, basis, eigenvalues, damping, check phase and counters;
nothing is shared between factors.

`advance` runs one step of the pipeline over a list of stacks, in four
phases, each over whole stacks:

1. accumulate: the statistics' moving average (batched products);
2. decide: on its check step, each factor's controller decides whether a
   fresh eigendecomposition is needed (one `lax.cond` per factor);
3. refresh: the eigendecompositions of the factors that asked (`refresh`,
   which also deals them out over the devices of a mesh);
4. commit: the new bases, damping and counters of the checked factors.

Every user of factors (the block stacks of matrix leaves, the per-dimension
factors of tensor leaves) goes through `advance`, so controllers, refresh
methods, storage dtypes and the check schedule are the same for all.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from foam_optax._src import first_step
from foam_optax._src import linalg
from foam_optax._src import refresh as refreshing
from foam_optax._src.config import Config
from foam_optax._src.controllers import CONTROLLERS, SKETCHABLE, Decision
from foam_optax._src.controllers import probe_keys
from foam_optax._src.cross_fitting import Samples


class FactorStack(NamedTuple):
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
  # (k, m, m) X = Q diag((D + ε_s)^(-1/p)) Qᵀ, rebuilt at the checks that
  # change it; None for eigenvalue-corrected preconditioning, which applies
  # Q itself, and with ``cache_inverse_root=False``.
  inverse_root: Optional[jax.Array] = None
  # (k, m) variance of each eigenvalue's estimate, measured at the last
  # refresh (``bias_correction='cross_fit_variance'``); else None.
  variance: Optional[jax.Array] = None


def storage_dtype(dtype):
  """The dtype a buffer is stored in: the option's, else the statistics'."""
  return linalg.stat_dtype() if dtype is None else jnp.dtype(dtype)


def init_stack(count, size, phase, cfg: Config) -> FactorStack:
  """Identity bases and zero statistics, stored in the configured dtypes
  (``factor_matrix_dtype`` etc.; a step computes in the statistics' dtype
  and casts on load and store). Root-inverse preconditioning with
  ``cache_inverse_root`` also caches X."""
  dtype = linalg.stat_dtype()
  eye = jnp.broadcast_to(jnp.eye(size, dtype=dtype), (count, size, size))
  # A fresh array per field: a state whose fields share a buffer cannot be
  # donated to a jitted step (XLA rejects donating one buffer twice).
  zeros_i = lambda: jnp.zeros((count,), jnp.int32)
  damping = jnp.full((count,), cfg.epsilon, dtype)
  eigvals = jnp.zeros((count, size), dtype)
  inverse_root = None
  variance = (jnp.zeros((count, size), dtype)
              if cfg.bias_correction == "cross_fit_variance" else None)
  if cfg.cache_inverse_root and not cfg.eigenvalue_corrected:
    inverse_root = eye * linalg.inverse_root_weights(
        eigvals, cfg.root_damping_of(damping), cfg.exponent,
        cfg.pseudo_inverse_rtol)[:, None, :]
    inverse_root = inverse_root.astype(
        storage_dtype(cfg.inv_factor_matrix_dtype))
  return FactorStack(
      statistic=jnp.zeros((count, size, size),
                          storage_dtype(cfg.factor_matrix_dtype)),
      basis=eye.astype(storage_dtype(cfg.factor_matrix_eigenvectors_dtype)),
      eigvals=eigvals,
      damping=damping,
      proxy=jnp.zeros((count,), dtype),
      phase=jnp.asarray(phase, jnp.int32),
      checks=zeros_i(), refreshes=zeros_i(), failures=zeros_i(),
      inverse_root=inverse_root, variance=variance)


def is_check_step(step, phase, cfg: Config):
  """`t == s0` or (`t > s0` and `(t + phase) % f == 0`)."""
  first = cfg.first_check_step
  freq = jnp.asarray(cfg.check_frequency, jnp.int32)
  periodic = (step > first) & ((step + phase) % freq == 0)
  return (step == first) | periodic


def is_statistics_step(step, cfg: Config):
  """Whether step `t` adds its gradient to the statistics: steps 1, 1 + k,
  1 + 2k, ... for ``k = statistics_compute_steps``."""
  k = jnp.asarray(cfg.statistics_compute_steps, jnp.int32)
  return (step >= 1) & ((step - 1) % k == 0)


def bias_correction(step, cfg: Config, dtype):
  """``1 - b2^n``: the statistics' bias correction after the ``n =
  ceil(t / k)`` accumulations of steps ``1..t`` (``n = t`` when every step
  accumulates, ``k = 1``); 1 with ``ema_bias_correction=False``."""
  if not cfg.ema_bias_correction:
    return jnp.ones((), dtype)
  k = jnp.asarray(cfg.statistics_compute_steps, jnp.int32)
  accumulations = (step + k - 1) // k
  return 1 - jnp.asarray(cfg.b2, dtype) ** accumulations


def _accumulates_every_step(cfg: Config) -> bool:
  """True when `statistics_compute_steps` is known to be 1 at trace time:
  then no conditional guards the statistics."""
  k = cfg.statistics_compute_steps
  return isinstance(k, (int, np.integer)) and int(k) == 1


def accumulate(fs: FactorStack, gram, cfg: Config) -> FactorStack:
  """Adds this step's (k, m, m) Gram matrices to the moving average."""
  b2 = jnp.asarray(cfg.b2, fs.statistic.dtype)
  return fs._replace(statistic=b2 * fs.statistic + (1 - b2) * gram)


def _accumulated(step, stacks, grams, cfg: Config):
  """`accumulate` for a list of stacks on statistics steps; `grams` returns
  their Gram matrices, computed only on those steps."""
  add = lambda: [accumulate(fs, g, cfg) for fs, g in zip(stacks, grams())]
  if _accumulates_every_step(cfg):
    return add()
  return lax.cond(is_statistics_step(step, cfg), add, lambda: list(stacks))


def _probe_keys(step, factor_ids, cfg: Config):
  """`controllers.probe_keys` for the controllers that use them, else None."""
  if cfg.proxy != "sketch" or cfg.controller not in SKETCHABLE:
    return None
  return probe_keys(step, factor_ids)


def _decide_one(factor, fs: FactorStack, cfg: Config, key=None) -> Decision:
  decision = CONTROLLERS[cfg.controller](
      factor, fs.basis, fs.eigvals, fs.damping, cfg, key)
  # The first check of every factor computes a fresh basis with ε0.
  first = fs.checks == 0
  return decision._replace(
      refresh=first | decision.refresh,
      proxy=jnp.where(first, jnp.zeros_like(decision.proxy), decision.proxy))


def _idle(fs: FactorStack) -> Decision:
  """The decision of a factor that is not checked this step."""
  return Decision(jnp.zeros(fs.damping.shape, bool), fs.damping, fs.eigvals,
                  fs.proxy)


def decide(fs: FactorStack, checks, correction, cfg: Config,
           keys=None) -> Decision:
  """Each checked factor's controller decision; `refresh` False elsewhere.

  Args:
    fs: a stack of factors (statistics already accumulated).
    checks: (k,) bool, the factors checked this step.
    correction: the statistics' bias correction ``1 - b2^t``.
    cfg: hyperparameters.
    keys: (k,) `jax.random` keys of the factors at this step
      (`controllers.probe_keys`), or None for deterministic controllers.
  """
  def one(args):
    fs1, check, key = args
    return lax.cond(
        check, lambda: _decide_one(fs1.statistic / correction, fs1, cfg, key),
        lambda: _idle(fs1))
  # On most steps no factor is checked: skip the loop entirely.
  return lax.cond(jnp.any(checks), lambda: lax.map(one, (fs, checks, keys)),
                  lambda: _idle(fs))


def eigenvalue_variance(basis, samples: Samples, correction, cfg: Config):
  """Variance of each eigenvalue's estimate of the bias-corrected statistic,
  from the spread of the microbatches' contributions along the basis.

  `samples` (`cross_fitting.Samples`) hold (J, m, ·): the J microbatches'
  blocks (or their transposes, for a right factor), whose Grams ``S_j`` make up the statistic's new
  term. Along eigenvector ``q_k`` microbatch ``j`` contributes
  ``ℓ_jk = q_kᵀ S_j q_k = ‖(Qᵀ S_j)_k‖²``, so the estimate's variance is
  ``(1-b2)²·s²_j(ℓ_jk) / J / c²`` (sample variance over the microbatches,
  ``c`` the statistics' bias correction), as the official bias-corrected
  Shampoo measures it.
  """
  b2 = jnp.asarray(cfg.b2, basis.dtype)
  return ((1 - b2) ** 2 * jnp.var(samples.contributions(basis), axis=0,
                                  ddof=1)
          / samples.num_samples / correction ** 2)


def _commit_one(fs: FactorStack, decision: Decision,
                fresh: refreshing.Refresh, cfg: Config,
                samples: Optional[Samples] = None, correction=None):
  """New state of one checked factor given the decision and refresh result;
  `samples` (J, m, ·) give a fresh basis its eigenvalues' variance."""
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
  if fs.variance is not None:
    # A variance is kept only with cross-fitting ('cross_fit_variance').
    assert samples is not None, "cross_fit_variance without samples"
    new = new._replace(variance=lax.cond(
        success,
        lambda: eigenvalue_variance(fresh.basis, samples, correction, cfg),
        lambda: fs.variance))
  if fresh.inverse_root is not None:
    # An iterative root (ASGO's): the fresh X, or on failure the identity,
    # as ASGO's official code falls back to.
    eye = jnp.eye(fresh.inverse_root.shape[-1], dtype=fs.inverse_root.dtype)  # pyright: ignore[reportOptionalMemberAccess]
    new = new._replace(inverse_root=jnp.where(
        success, fresh.inverse_root, jnp.where(failure, eye,
                                               fs.inverse_root)))  # pyright: ignore[reportArgumentType]
  elif fs.inverse_root is not None:
    # Cached so that every step applies X with two products instead of four;
    # rebuilt (one m³ product) only when the check changed what X is made
    # of: the basis, the eigenvalues or the damping (which also moves the
    # variance-corrected weights).
    changed = (success | jnp.logical_not(new.damping == fs.damping)
               | jnp.logical_not(jnp.all(new.eigvals == fs.eigvals)))
    new = new._replace(inverse_root=lax.cond(
        changed,
        lambda: linalg.inverse_root(new.basis, new.eigvals,
                                    cfg.root_damping_of(new.damping),
                                    cfg.exponent, cfg.pseudo_inverse_rtol,
                                    new.variance),
        lambda: fs.inverse_root))
  order = jnp.where(success, fresh.order, jnp.arange(fresh.order.shape[-1]))
  return new, order


def identity_orders(fs: FactorStack):
  """(k, m) column orders of bases that did not change."""
  return jnp.broadcast_to(jnp.arange(fs.eigvals.shape[-1]), fs.eigvals.shape)


def commit(fs: FactorStack, checks, decision: Decision,
           fresh: refreshing.Refresh, cfg: Config,
           samples: Optional[Samples] = None, correction=None):
  """New state of the checked factors; `samples` (k, J, m, ·) give the fresh
  bases their eigenvalues' variance (`eigenvalue_variance`).

  Returns:
    (new state, (k, m) column orders of the new bases relative to the old).
  """
  identity = lambda: jnp.arange(fs.eigvals.shape[-1])

  def one(args):
    fs1, check, decision1, fresh1, samples1 = args
    return lax.cond(
        check, lambda: _commit_one(fs1, decision1, fresh1, cfg, samples1,
                                   correction),
        lambda: (fs1, identity()))
  return lax.cond(
      jnp.any(checks),
      lambda: lax.map(one, (fs, checks, decision, fresh, samples)),
      lambda: (fs, identity_orders(fs)))


_STORED = ("statistic", "basis", "inverse_root")


def load(fs: FactorStack, dtype) -> FactorStack:
  """The state with its (possibly low-precision) matrices in `dtype`."""
  return fs._replace(**{name: getattr(fs, name).astype(dtype)
                        for name in _STORED if getattr(fs, name) is not None})


def store(fs: FactorStack, like: FactorStack) -> FactorStack:
  """`fs` with its matrices cast back to the dtypes of `like`."""
  return fs._replace(**{
      name: getattr(fs, name).astype(getattr(like, name).dtype)
      for name in _STORED if getattr(fs, name) is not None})


def advance(stacks: Sequence[FactorStack],
            grams: Callable[[], Sequence[jax.Array]], ids, step, cfg: Config,
            plan, active=None, samples=None):
  """One step of the pipeline: accumulate, decide, refresh, commit.

  Args:
    stacks: the factor stacks as stored (this device's slices on a mesh).
    grams: returns each stack's (k, m, m) new statistic term; called only on
      statistics steps (``statistics_compute_steps``).
    ids: per stack the (k,) int32 ids of its factors (`controllers.probe_keys`).
    step: the 1-based step (0 on a skipped step: no factor is checked).
    cfg: hyperparameters.
    plan: the `layout.Plan` the stacks are divided by; on a mesh this
      runs inside `shard_map` and the refresh requests are gathered.
    active: per stack (k,) bool, the slots that hold a factor (not mesh
      padding, which is never checked); None: all.
    samples: with ``bias_correction='cross_fit_variance'``, returns per
      stack the (k, J, m, ·) microbatch blocks whose Grams make up the
      statistic's term (for `eigenvalue_variance`); called only on checks.

  Returns:
    (new stacks in their storage dtypes, per stack the (k, m) column orders
    of the new bases relative to the old ones).
  """
  dtype = linalg.stat_dtype()
  loaded = _accumulated(step, [load(fs, dtype) for fs in stacks], grams, cfg)
  correction = bias_correction(step, cfg, dtype)
  if active is None:
    active = [True] * len(stacks)
  checks = [is_check_step(step, fs.phase, cfg) & act
            for fs, act in zip(loaded, active)]

  def check(loaded):
    decisions = [decide(fs, c, correction, cfg, _probe_keys(step, i, cfg))
                 for fs, c, i in zip(loaded, checks, ids)]
    needs = [c & d.refresh for c, d in zip(checks, decisions)]
    all_samples = samples() if samples is not None else [None] * len(loaded)
    new, orders = [], []
    for fs, c, decision, need, stack_requests, stack_samples in zip(
        loaded, checks, decisions, needs, refreshing.requests(needs, plan),
        all_samples):
      fresh = refreshing.refresh(fs, need, correction, cfg, plan,
                                 stack_requests)
      new_fs, order = commit(fs, c, decision, fresh, cfg, stack_samples,
                             correction)
      new.append(new_fs)
      orders.append(order)
    return new, orders

  if cfg.stagger:
    new, orders = check(loaded)
  else:
    # Every factor has the same check steps: a step without checks (most
    # steps) skips decisions, refresh and commit with one conditional for
    # all stacks.
    new, orders = lax.cond(
        is_check_step(step, first_step.uniform_phase(cfg), cfg),
        lambda: check(loaded),
        lambda: (loaded, [identity_orders(fs) for fs in loaded]))
  return [store(n, fs) for n, fs in zip(new, stacks)], orders
