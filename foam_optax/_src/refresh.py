"""Refresh: the eigendecompositions of the factors that asked for one.

Each fresh basis sits in a `lax.cond` branch whose predicate is a
per-factor scalar, never a `vmap`-batched one, so a factor that keeps its
basis executes no `eigh`. Two schedules of that work are offered:

* ``refresh_batching='map'``: `lax.map` over the stack, one `lax.cond` per
  factor.
* ``refresh_batching='bucket'``: one `lax.cond` for the whole stack that runs
  a batched refresh when any member needs it, then keeps the old basis of the
  members that did not ask.

On a device mesh each device refreshes its own slice of the stack. When one
device holds more than its share of the step's ``n`` requests (over all
stacks), the work is rebalanced: the stacks' statistics are gathered, the
requests are dealt round-robin (each device computes at most
``ceil(n / devices)``), and the results are gathered back. Every collective
sits behind a predicate computed from gathered data, identical on all
devices (`requests`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from foam_optax._src import linalg
from foam_optax._src.config import Config


class Refresh(NamedTuple):
  """A fresh basis of one factor (or of each factor of a stack); with an
  iterative ``root_method``, a fresh inverse root and no basis."""

  basis: jax.Array
  eigvals: jax.Array
  order: jax.Array   # permutation of the basis columns (for rotated moments)
  ok: jax.Array
  inverse_root: Optional[jax.Array] = None


_ITERATIVE_ROOTS = {"polar_express": linalg.polar_express_inverse_sqrt,
                    "newton_schulz": linalg.newton_schulz_inverse_sqrt}


def _by_iteration(factor, cfg: Config) -> Refresh:
  """X = A^(-1/2) by ASGO's iterations; the basis stays the identity."""
  root = _ITERATIVE_ROOTS[cfg.root_method](factor, cfg.epsilon,
                                           cfg.root_iterations)
  size = factor.shape[-1]
  return Refresh(jnp.eye(size, dtype=factor.dtype),
                 jnp.zeros((size,), factor.dtype), jnp.arange(size),
                 linalg.arrays_finite(root), root)


def _by_eigh(factor) -> Refresh:
  basis, eigvals, ok = linalg.fresh_eigendecomposition(factor)
  return Refresh(basis, eigvals, jnp.arange(factor.shape[-1]), ok)


def _by_power_qr(factor, basis) -> Refresh:
  return Refresh(*linalg.power_qr_refresh(factor, basis))


def _compute(factor, basis, first, cfg: Config) -> Refresh:
  """The expensive part: a fresh basis (or inverse root) for one factor."""
  if cfg.root_method != "eigh":
    return _by_iteration(factor, cfg)
  if cfg.refresh_method == "eigh":
    return _by_eigh(factor)
  # The first basis of every factor is a full eigendecomposition.
  return lax.cond(first, lambda: _by_eigh(factor),
                  lambda: _by_power_qr(factor, basis))


def _compute_stack(factors, basis, first, cfg: Config) -> Refresh:
  """Fresh bases for a whole stack with batched kernels
  (``refresh_batching='bucket'``).

  `first` marks the members that need their first, full eigendecomposition.
  Power-QR stacks run the batched `eigh` only when some member does (at
  `s0`, or after a failed first decomposition), never on ordinary checks.
  """
  if cfg.root_method != "eigh":
    return jax.vmap(lambda factor: _by_iteration(factor, cfg))(factors)
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


def _placeholder(size, dtype, cfg: Config) -> Refresh:
  """Stands in for a refresh that was not computed (never committed)."""
  eye = jnp.eye(size, dtype=dtype)
  return Refresh(eye, jnp.zeros((size,), dtype), jnp.arange(size),
                 jnp.asarray(False),
                 None if cfg.root_method == "eigh" else eye)


def _local(fs, need, correction, cfg: Config) -> Refresh:
  """Fresh bases for this device's factors that asked."""
  first = fs.checks == 0
  size, dtype = fs.eigvals.shape[-1], fs.eigvals.dtype
  if cfg.refresh_batching == "bucket":
    stack = lambda: _compute_stack(fs.statistic / correction, fs.basis,
                                   first & need, cfg)
    none = lambda: jax.vmap(lambda _: _placeholder(size, dtype, cfg))(need)
    return lax.cond(jnp.any(need), stack, none)

  def one(args):
    statistic, basis, first1, need1 = args
    return lax.cond(
        need1, lambda: _compute(statistic / correction, basis, first1, cfg),
        lambda: _placeholder(size, dtype, cfg))
  return lax.map(one, (fs.statistic, fs.basis, first, need))


def _rebalanced(fs, need_all, offset, correction, cfg: Config,
                plan) -> Refresh:
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
        lambda: _compute(statistics[i] / correction, basis, first[i], cfg),
        lambda: _placeholder(size, dtype, cfg))
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


def requests(needs: Sequence[jax.Array], plan) -> list:
  """Each stack's `Requests`, from this device's `need` flags of every stack
  (one all-gather for all stacks); None per stack without a mesh.

  A device's share is ``ceil(requests / devices)`` over all stacks; when
  every device holds at most its share, each refreshes its own factors,
  otherwise every stack deals its requests round-robin.
  """
  if not plan.distributed or not needs:
    return [None] * len(needs)
  shards = plan.num_shards
  gathered = lax.all_gather(jnp.concatenate(needs), plan.axes, tiled=True)
  gathered = gathered.reshape(shards, -1)
  needs_all, start = [], 0
  for need in needs:
    needs_all.append(gathered[:, start:start + need.shape[0]].reshape(-1))
    start += need.shape[0]
  held = sum(n.reshape(shards, -1).sum(axis=1) for n in needs_all)
  rebalance = jnp.any(held > (jnp.sum(held) + shards - 1) // shards)
  out, offset = [], jnp.zeros((), jnp.int32)
  for need_all in needs_all:
    out.append(Requests(need_all, offset, rebalance))
    offset = offset + jnp.sum(need_all, dtype=jnp.int32)
  return out


def refresh(fs, need, correction, cfg: Config, plan,
            stack_requests: Optional[Requests] = None) -> Refresh:
  """Fresh bases for the factors in `need`; placeholders elsewhere.

  Args:
    fs: this device's slice of a `FactorStack` (all of it without a mesh).
    need: (k,) bool, the slice's factors that need a fresh basis.
    correction: the statistics' bias correction ``1 - b2^t``.
    cfg: hyperparameters.
    plan: the state's `layout.Plan`.
    stack_requests: on a mesh, the stack's `Requests` (see `requests`).
  """
  size, dtype = fs.eigvals.shape[-1], fs.eigvals.dtype
  none = lambda: jax.vmap(lambda _: _placeholder(size, dtype, cfg))(need)
  local = lambda: _local(fs, need, correction, cfg)
  if not plan.distributed:
    return lax.cond(jnp.any(need), local, none)
  r = stack_requests
  branch = jnp.where(jnp.any(r.need_all), jnp.where(r.rebalance, 2, 1), 0)  # pyright: ignore[reportOptionalMemberAccess]
  return lax.switch(branch, [
      none, local,
      lambda: _rebalanced(fs, r.need_all, r.offset, correction, cfg, plan)])  # pyright: ignore[reportOptionalMemberAccess]
