"""Kronecker-factor state: statistics, cached eigenbases, and their refresh.

A `FactorState` holds a stack of `k` same-sized factors (one per block of a
block group). Each factor has its own statistic, basis, eigenvalues, damping,
check phase and counters; nothing is shared between factors.

A step runs in four phases, each over a whole stack, so that the transform
can interleave them across stacks and devices:

1. `accumulate`: the statistics' moving average (batched products).
2. `decide`: on its check step, each factor's controller decides whether a
   fresh eigendecomposition is needed (one `lax.cond` per factor).
3. `refresh`: the eigendecompositions of the factors that asked. Each sits in
   a `lax.cond` branch whose predicate is a per-factor scalar, never a
   `vmap`-batched one, so a factor that keeps its basis executes no `eigh`.
   Two schedules of that work are offered:

   * ``refresh_batching='map'``: `lax.map` over the stack, one `lax.cond` per
     factor.
   * ``refresh_batching='bucket'``: one `lax.cond` for the whole stack that
     runs a batched refresh when any member needs it, then keeps the old
     basis of the members that did not ask.

   On a device mesh each device refreshes its own slice of the stack. When
   one device holds more than its share of the step's ``n`` requests (over
   all stacks), the work is rebalanced: the stacks' statistics are gathered,
   the requests are dealt round-robin (each device computes at most
   ``ceil(n / devices)``), and the results are gathered back. Every
   collective sits behind a predicate computed from gathered data, identical
   on all devices.
4. `commit`: the new bases, damping and counters of the checked factors.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from foam_optax._src import linalg
from foam_optax._src.config import Config
from foam_optax._src.controllers import CONTROLLERS, SKETCHABLE, Decision


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
  # (k, m, m) X = Q diag((D + ε_s)^(-1/p)) Qᵀ, rebuilt at the checks that
  # change it; None for eigenvalue-corrected preconditioning, which applies
  # Q itself.
  inverse_root: Optional[jax.Array] = None


def init_factor_state(count, size, epsilon, phase, dtype,
                      exponent=None, storage: Optional[dict] = None,
                      pseudo_inverse_rtol=None) -> FactorState:
  """Identity bases, zero statistics; `exponent` (root-inverse
  preconditioning only) makes the state cache the inverse roots.

  `storage` maps ``'statistic'``, ``'basis'`` and ``'inverse_root'`` to the
  dtypes they are stored in (default `dtype`); a step computes in `dtype`
  and casts on load and store (`load`, `store`).
  """
  storage = storage or {}
  eye = jnp.broadcast_to(jnp.eye(size, dtype=dtype), (count, size, size))
  # A fresh array per field: a state whose fields share a buffer cannot be
  # donated to a jitted step (XLA rejects donating one buffer twice).
  zeros_i = lambda: jnp.zeros((count,), jnp.int32)
  damping = jnp.full((count,), epsilon, dtype)
  eigvals = jnp.zeros((count, size), dtype)
  inverse_root = None
  if exponent is not None:
    inverse_root = eye * linalg.inverse_root_weights(
        eigvals, damping, exponent, pseudo_inverse_rtol)[:, None, :]
    inverse_root = inverse_root.astype(storage.get("inverse_root", dtype))
  return FactorState(
      statistic=jnp.zeros((count, size, size),
                          storage.get("statistic", dtype)),
      basis=eye.astype(storage.get("basis", dtype)),
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


def is_statistics_step(step, cfg: Config):
  """Whether step `t` adds its gradient to the statistics: steps 1, 1 + k,
  1 + 2k, ... for ``k = statistics_compute_steps``."""
  k = jnp.asarray(cfg.statistics_compute_steps, jnp.int32)
  return (step >= 1) & ((step - 1) % k == 0)


def bias_correction(step, cfg: Config, dtype):
  """``1 - b2^n``: the statistics' bias correction after the ``n =
  ceil(t / k)`` accumulations of steps ``1..t`` (``n = t`` when every step
  accumulates, ``k = 1``)."""
  k = jnp.asarray(cfg.statistics_compute_steps, jnp.int32)
  accumulations = (step + k - 1) // k
  return 1 - jnp.asarray(cfg.b2, dtype) ** accumulations


def accumulates_every_step(cfg: Config) -> bool:
  """True when `statistics_compute_steps` is known to be 1 at trace time:
  then no conditional guards the statistics."""
  k = cfg.statistics_compute_steps
  return isinstance(k, (int, np.integer)) and int(k) == 1


def maybe_accumulate(step, states, grams, cfg: Config):
  """`accumulate` for a list of stacks on statistics steps; `grams` is a
  function returning their Gram matrices, computed only on those steps."""
  add = lambda: [accumulate(fs, g, cfg) for fs, g in zip(states, grams())]
  if accumulates_every_step(cfg):
    return add()
  return lax.cond(is_statistics_step(step, cfg), add, lambda: list(states))


def accumulate(fs: FactorState, gram, cfg: Config) -> FactorState:
  """Adds this step's (k, m, m) Gram matrices to the moving average."""
  b2 = jnp.asarray(cfg.b2, fs.statistic.dtype)
  return fs._replace(statistic=b2 * fs.statistic + (1 - b2) * gram)


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


def _compute_refresh(factor, basis, first, cfg: Config) -> _Refresh:
  """The expensive part: a fresh basis for one factor."""
  if cfg.refresh_method == "eigh":
    return _by_eigh(factor)
  # The first basis of every factor is a full eigendecomposition.
  return lax.cond(first, lambda: _by_eigh(factor),
                  lambda: _by_power_qr(factor, basis))


def _compute_refresh_stack(factors, basis, first, cfg: Config) -> _Refresh:
  """Fresh bases for a whole stack with batched kernels
  (`refresh_batching='bucket'`).

  `first` marks the members that need their first, full eigendecomposition.
  Power-QR stacks run the batched `eigh` only when some member does (at
  `s0`, or after a failed first decomposition), never on ordinary checks.
  """
  by_eigh = lambda: jax.vmap(_by_eigh)(factors)
  if cfg.refresh_method == "eigh":
    return by_eigh()
  by_power_qr = lambda: jax.vmap(_by_power_qr)(factors, basis)

  def mixed():
    full, warm = by_eigh(), by_power_qr()
    pick = lambda x, y: jnp.where(
        first.reshape(first.shape + (1,) * (x.ndim - 1)), x, y)
    return jax.tree.map(pick, full, warm)

  return lax.cond(jnp.any(first), mixed, by_power_qr)


def _placeholder(size, dtype) -> _Refresh:
  """Stands in for a refresh that was not computed (never committed)."""
  return _Refresh(jnp.eye(size, dtype=dtype), jnp.zeros((size,), dtype),
                  jnp.arange(size), jnp.asarray(False))


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
    # Cached so that every step applies X with two products instead of four;
    # rebuilt (one m³ product) only when the check changed what X is made
    # of.
    changed = (success | jnp.logical_not(new.damping == fs.damping)
               | jnp.logical_not(jnp.all(new.eigvals == fs.eigvals)))
    new = new._replace(inverse_root=lax.cond(
        changed,
        lambda: linalg.inverse_root(new.basis, new.eigvals,
                                    cfg.root_damping_of(new.damping),
                                    cfg.exponent, cfg.pseudo_inverse_rtol),
        lambda: fs.inverse_root))
  order = jnp.where(success, fresh.order, jnp.arange(fresh.order.shape[-1]))
  return new, order


def probe_keys(step, factor_ids, cfg: Config):
  """Per-factor `jax.random` keys for this step, or None when unused.

  A key depends only on the step and the factor's integer id, so randomized
  controllers (``proxy='sketch'``) give the same decisions on every run,
  under either refresh_batching and on any mesh (the ids are the factors'
  blocks, not their slots: see `transform._factor_ids`).
  """
  if cfg.proxy != "sketch" or cfg.controller not in SKETCHABLE:
    return None
  base = jax.random.key(0)
  return jax.vmap(lambda i: jax.random.fold_in(
      jax.random.fold_in(base, i), step))(factor_ids)


def _decide(factor, fs: FactorState, cfg: Config, key=None) -> Decision:
  decision = CONTROLLERS[cfg.controller](
      factor, fs.basis, fs.eigvals, fs.damping, cfg, key)
  # The first check of every factor computes a fresh basis with ε0.
  first = fs.checks == 0
  return decision._replace(
      refresh=first | decision.refresh,
      proxy=jnp.where(first, jnp.zeros_like(decision.proxy), decision.proxy))


def _idle(fs: FactorState) -> Decision:
  """The decision of a factor that is not checked this step."""
  return Decision(jnp.zeros(fs.damping.shape, bool), fs.damping, fs.eigvals,
                  fs.proxy)


def decide(fs: FactorState, checks, correction, cfg: Config,
           keys=None) -> Decision:
  """Each checked factor's controller decision; `refresh` False elsewhere.

  Args:
    fs: a stack of factors (statistics already accumulated).
    checks: (k,) bool, the factors checked this step.
    correction: the statistics' bias correction ``1 - b2^t``.
    cfg: hyperparameters.
    keys: (k,) `jax.random` keys of the factors at this step
      (`probe_keys`), or None for deterministic controllers.
  """
  def one(args):
    fs1, check, key = args
    return lax.cond(
        check, lambda: _decide(fs1.statistic / correction, fs1, cfg, key),
        lambda: _idle(fs1))
  # On most steps no factor is checked: skip the loop entirely.
  return lax.cond(jnp.any(checks), lambda: lax.map(one, (fs, checks, keys)),
                  lambda: _idle(fs))


def _refresh_local(fs: FactorState, need, correction, cfg: Config) -> _Refresh:
  """Fresh bases for this device's factors that asked."""
  first = fs.checks == 0
  size, dtype = fs.eigvals.shape[-1], fs.eigvals.dtype
  if cfg.refresh_batching == "bucket":
    stack = lambda: _compute_refresh_stack(
        fs.statistic / correction, fs.basis, first & need, cfg)
    return lax.cond(jnp.any(need), stack,
                    lambda: jax.vmap(lambda _: _placeholder(size, dtype))(need))

  def one(args):
    statistic, basis, first1, need1 = args
    return lax.cond(
        need1, lambda: _compute_refresh(statistic / correction, basis, first1,
                                        cfg),
        lambda: _placeholder(size, dtype))
  return lax.map(one, (fs.statistic, fs.basis, first, need))


def _refresh_rebalanced(fs: FactorState, need_all, offset, correction,
                        cfg: Config, plan) -> _Refresh:
  """Fresh bases with the requests dealt round-robin over the devices.

  Runs inside `shard_map`, on steps where some device holds more than its
  share of the requests. The stack's ``j``-th request is the step's request
  number ``offset + j`` (counting the earlier stacks' requests first) and
  goes to device ``(offset + j) % S`` (``S`` devices), which computes it from
  the gathered stack; the results are gathered and each device keeps those of
  its own factors. Over all stacks each device computes at most
  ``ceil(requests / S)``.
  """
  axes, shards = plan.axes, plan.num_shards
  per = fs.basis.shape[0]
  total_slots = per * shards
  gather = lambda x: lax.all_gather(x, axes, tiled=True)
  statistics = gather(fs.statistic)
  bases = gather(fs.basis) if cfg.refresh_method == "power_qr" else None
  first = gather(fs.checks == 0)
  device = lax.axis_index(axes)
  # Global indices of the factors that asked, first; then the rest.
  requests = jnp.argsort(jnp.logical_not(need_all), stable=True)
  rank = (device - offset) % shards + shards * jnp.arange(per)
  valid = rank < jnp.sum(need_all)
  index = requests[jnp.minimum(rank, total_slots - 1)]
  size, dtype = fs.eigvals.shape[-1], fs.eigvals.dtype

  def one(args):
    i, valid1 = args
    basis = None if bases is None else bases[i]
    return lax.cond(
        valid1,
        lambda: _compute_refresh(statistics[i] / correction, basis, first[i],
                                 cfg),
        lambda: _placeholder(size, dtype))
  results = jax.tree.map(gather, lax.map(one, (index, valid)))
  index, valid = gather(index), gather(valid)
  # source[g]: the row of `results` holding factor g's refresh.
  source = jnp.zeros((total_slots,), jnp.int32).at[
      jnp.where(valid, index, total_slots)].set(
          jnp.arange(total_slots, dtype=jnp.int32), mode="drop")
  mine = source[device * per + jnp.arange(per)]
  return jax.tree.map(lambda r: r[mine], results)


class Requests(NamedTuple):
  """A stack's refresh requests, identical on every device of a mesh."""

  need_all: jax.Array    # (stack,) bool: factors of this stack that asked
  offset: jax.Array      # requests of the stacks refreshed before this one
  rebalance: jax.Array   # bool: some device holds more than its share


def requests(needs_all, num_shards) -> list:
  """`Requests` of each stack from every stack's gathered `need` flags.

  A device's share is ``ceil(requests / devices)`` over all stacks; when
  every device holds at most its share, each refreshes its own factors,
  otherwise every stack deals its requests round-robin.
  """
  held = sum(n.reshape(num_shards, -1).sum(axis=1) for n in needs_all)
  total = jnp.sum(held)
  rebalance = jnp.any(held > (total + num_shards - 1) // num_shards)
  out, offset = [], jnp.zeros((), jnp.int32)
  for need_all in needs_all:
    out.append(Requests(need_all, offset, rebalance))
    offset = offset + jnp.sum(need_all, dtype=jnp.int32)
  return out


def refresh(fs: FactorState, need, correction, cfg: Config, plan,
            stack_requests: Optional[Requests] = None) -> _Refresh:
  """Fresh bases for the factors in `need`; placeholders elsewhere.

  Args:
    fs: this device's slice of a stack (all of it without a mesh).
    need: (k,) bool, the slice's factors that need a fresh basis.
    correction: the statistics' bias correction ``1 - b2^t``.
    cfg: hyperparameters.
    plan: the state's `distribution.Plan`.
    stack_requests: on a mesh, the stack's `Requests` (see `requests`).
  """
  size, dtype = fs.eigvals.shape[-1], fs.eigvals.dtype
  none = lambda: jax.vmap(lambda _: _placeholder(size, dtype))(need)
  local = lambda: _refresh_local(fs, need, correction, cfg)
  if not plan.distributed:
    return lax.cond(jnp.any(need), local, none)
  r = stack_requests
  branch = jnp.where(jnp.any(r.need_all), jnp.where(r.rebalance, 2, 1), 0)
  return lax.switch(branch, [
      none, local,
      lambda: _refresh_rebalanced(fs, r.need_all, r.offset, correction, cfg,
                                  plan)])


def commit(fs: FactorState, checks, decision: Decision, fresh: _Refresh,
           cfg: Config):
  """New state of the checked factors.

  Returns:
    (new state, (k, m) column orders of the new bases relative to the old).
  """
  count, size = fs.eigvals.shape
  identity = lambda: jnp.arange(size)

  def one(args):
    fs1, check, decision1, fresh1 = args
    return lax.cond(check, lambda: _commit(fs1, decision1, fresh1, cfg),
                    lambda: (fs1, identity()))
  return lax.cond(
      jnp.any(checks), lambda: lax.map(one, (fs, checks, decision, fresh)),
      lambda: (fs, jnp.broadcast_to(identity(), (count, size))))


_STORED = ("statistic", "basis", "inverse_root")


def load(fs: FactorState, dtype) -> FactorState:
  """The state with its (possibly low-precision) matrices in `dtype`."""
  return fs._replace(**{name: getattr(fs, name).astype(dtype)
                        for name in _STORED if getattr(fs, name) is not None})


def store(fs: FactorState, like: FactorState) -> FactorState:
  """`fs` with its matrices cast back to the dtypes of `like`."""
  return fs._replace(**{
      name: getattr(fs, name).astype(getattr(like, name).dtype)
      for name in _STORED if getattr(fs, name) is not None})
