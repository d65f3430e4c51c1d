"""One Kronecker factor per tensor dimension (eigenvalue-corrected only).

With ``tensor_shaping='per_dimension'`` (`scale_by_soap`'s default, the
official SOAP's) a parameter is viewed as a tensor, not reshaped to a
matrix: its dimension ``d`` of size ``n_d`` gets an ``n_d x n_d`` factor, the
EMA of the gradient contracted with itself over every other dimension, and
Adam runs in the basis that rotates every factored dimension by its
eigenvectors. The view is the leaf's shape or, with ``merge_dims=True``,
SOAP's merge of adjacent dimensions while their product stays within
`max_precond_dim` (`merged_shape`); a dimension longer than
`max_precond_dim` keeps no factor, and size-1 dimensions are dropped (their
factor would be the scalar 1).

A view of rank 1 or 2 is a matrix and takes the stacked block path of
`transform`; only views of rank >= 3 are handled here, one leaf at a time,
each factor a `FactorState` stack of one so that controllers, refresh
methods and the check schedule are exactly those of the matrix path. They
are not divided among devices: on a mesh every device runs them whole.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from foam_optax._src import distribution
from foam_optax._src import factors
from foam_optax._src import linalg
from foam_optax._src import preconditioners
from foam_optax._src import shaping
from foam_optax._src.config import Config


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class TensorLayout:
  """Static shape of a per-dimension leaf: its tensor view and which of its
  dimensions have a factor."""

  shape: tuple
  factored: tuple


class TensorState(NamedTuple):
  """Factors and rotated second moment of one per-dimension leaf."""

  factors: tuple                    # per dimension a FactorState or None
  rotated_second_moment: jax.Array  # in `layout.shape`
  layout: TensorLayout


def merged_shape(shape, max_precond_dim: Optional[int]) -> tuple:
  """The official SOAP's ``merge_dims``: adjacent dimensions merged, left to
  right, while their product stays within `max_precond_dim`."""
  limit = math.inf if max_precond_dim is None else max_precond_dim
  new_shape, current = [], 1
  for size in shape:
    if current * size > limit:
      if current > 1:
        new_shape.append(current)
        current = size
      else:
        new_shape.append(size)
        current = 1
    else:
      current *= size
  if current > 1 or not new_shape:
    new_shape.append(current)
  return tuple(new_shape)


def layouts(shape, cfg: Config, block_size, max_precond_dim):
  """(LeafLayout, TensorLayout or None) of a leaf under 'per_dimension'.

  Views of rank <= 2 get a matrix `LeafLayout` (with SOAP's rule that a leaf
  of rank >= 2 whose view is a vector is preconditioned without
  `precondition_1d`); views of rank >= 3 get a `TensorLayout` and a
  `LeafLayout` with no blocks.
  """
  shape = tuple(int(d) for d in shape)
  view = shape
  if cfg.merge_dims and len(shape) >= 2:
    view = merged_shape(shape, max_precond_dim)
  view = tuple(d for d in view if d != 1)
  if len(view) <= 2 or 0 in shape:
    layout = shaping.leaf_layout(view, block_size, max_precond_dim,
                                 cfg.precondition_1d or len(shape) >= 2)
    return dataclasses.replace(layout, shape=shape), None
  factored = tuple(max_precond_dim is None or d <= max_precond_dim
                   for d in view)
  return shaping.LeafLayout(shape, None, ()), TensorLayout(view, factored)


def init_state(layout: TensorLayout, phases, cfg: Config, dtype):
  """Zero statistics and identity bases; `phases` yields each factor's (1,)
  check phase."""
  states = []
  for size, factored in zip(layout.shape, layout.factored):
    states.append(factors.init_factor_state(
        1, size, cfg.epsilon, next(phases), dtype) if factored else None)
  return TensorState(tuple(states), jnp.zeros(layout.shape, dtype), layout)


def num_factors(layout: Optional[TensorLayout]) -> int:
  return 0 if layout is None else sum(layout.factored)


def _along(x, basis, axis, transpose):
  """Multiplies dimension `axis` of `x` by `basisᵀ` (or `basis`)."""
  contract = 0 if transpose else 1
  x = jnp.tensordot(x, basis, axes=([axis], [contract]),
                    precision=linalg.HIGHEST)
  return jnp.moveaxis(x, -1, axis)


def _rotations(states):
  bases = [None if fs is None else fs.basis[0] for fs in states]

  def rotate(x):
    for axis, basis in enumerate(bases):
      if basis is not None:
        x = _along(x, basis, axis, transpose=True)
    return x

  def unrotate(x):
    for axis, basis in enumerate(bases):
      if basis is not None:
        x = _along(x, basis, axis, transpose=False)
    return x

  return rotate, unrotate


def _update_factor(fs: factors.FactorState, gram, step, cfg: Config):
  """Accumulate (`gram` returns the statistic's new term), and on a check
  step decide and refresh, one factor (a stack of one, on no mesh). Returns
  (new state, (1, m) column order)."""
  fs, = factors.maybe_accumulate(step, [fs], lambda: [gram()[None]], cfg)
  checks = factors.is_check_step(step, fs.phase, cfg)
  correction = factors.bias_correction(step, cfg, fs.statistic.dtype)
  decision = factors.decide(fs, checks, correction, cfg)
  need = checks & decision.refresh
  fresh = factors.refresh(fs, need, correction, cfg, distribution.Plan())
  return factors.commit(fs, checks, decision, fresh, cfg)


def _update_factors(grad, ts: TensorState, step, cfg: Config):
  """Accumulates each dimension's statistic and refreshes on its checks;
  the second moment follows the reordered basis columns."""
  moment = ts.rotated_second_moment
  states = []
  for axis, fs in enumerate(ts.factors):
    if fs is None:
      states.append(None)
      continue
    others = [a for a in range(grad.ndim) if a != axis]
    gram = functools.partial(jnp.tensordot, grad, grad,
                             axes=(others, others), precision=linalg.HIGHEST)
    fs, order = _update_factor(fs, gram, step, cfg)
    moment = jnp.take(moment, order[0], axis=axis)
    states.append(fs)
  return ts._replace(factors=tuple(states), rotated_second_moment=moment)


def update(grad, momentum, ts: TensorState, step, adam_step, cfg: Config):
  """Direction (in the leaf's shape) and new state of one tensor leaf.

  Args:
    grad, momentum: the gradient and bias-corrected momentum, leaf-shaped.
    ts: the leaf's tensor state.
    step: 1-based step of the factor statistics and check schedule.
    adam_step: the step of Adam's bias correction.
    cfg: hyperparameters.
  """
  shape = grad.shape
  grad = grad.reshape(ts.layout.shape)
  momentum = momentum.reshape(ts.layout.shape)
  if cfg.rotation_basis == "updated":
    ts = _update_factors(grad, ts, step, cfg)
  rotate, unrotate = _rotations(ts.factors)
  direction, moment = preconditioners.adam_in_basis(
      grad, momentum, ts.rotated_second_moment, adam_step, cfg.b2,
      cfg.graft_eps, rotate, unrotate)
  ts = ts._replace(rotated_second_moment=moment)
  if cfg.rotation_basis == "previous":
    ts = _update_factors(grad, ts, step, cfg)
  return direction.reshape(shape), ts
