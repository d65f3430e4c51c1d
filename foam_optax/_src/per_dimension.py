"""One Kronecker factor per tensor dimension (eigenvalue-corrected only).

With ``tensor_shaping='per_dimension'`` (`scale_by_soap`'s default, the
official SOAP's) a parameter is viewed as a tensor, not reshaped to a
matrix: its dimension ``d`` of size ``n_d`` gets an ``n_d x n_d`` factor, the
EMA of the gradient contracted with itself over every other dimension, and
Adam runs in the basis that rotates every factored dimension by its
eigenvectors. The view is the leaf's shape or, with ``merge_dims=True``,
SOAP's merge of adjacent dimensions while their product stays within
`max_precond_dim` (`layout.merged_shape`); a dimension longer than
`max_precond_dim` keeps no factor, and size-1 dimensions are dropped (their
factor would be the scalar 1). `layout.per_dimension_layouts` decides the
view.

A view of rank 1 or 2 is a matrix and takes the block stacks of the other
leaves (`step`, `blocks`); only views of rank >= 3 are handled here, one
leaf at a time, each factor a `FactorStack` of one that goes through the
same factor pipeline (`factors.advance`) as the block stacks: controllers,
refresh methods, storage dtypes and the check schedule are theirs. They are
not divided among devices: on a mesh every device runs them whole.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from foam_optax._src import cross_fitting
from foam_optax._src import factors
from foam_optax._src import linalg
from foam_optax._src import preconditioners
from foam_optax._src.config import Config
from foam_optax._src.cross_fitting import Samples
from foam_optax._src.layout import Plan, TensorLayout


class TensorState(NamedTuple):
  """Factors and rotated second moment of one per-dimension leaf."""

  factors: tuple                    # per dimension a FactorStack or None
  rotated_second_moment: jax.Array  # in `layout.shape`
  layout: TensorLayout


def init_state(layout: TensorLayout, phases, cfg: Config):
  """Zero statistics and identity bases; `phases` yields each factor's (1,)
  check phase."""
  states = [factors.init_stack(1, size, next(phases), cfg) if factored
            else None
            for size, factored in zip(layout.shape, layout.factored)]
  moment = jnp.zeros(layout.shape,
                     factors.storage_dtype(cfg.second_moment_dtype))
  return TensorState(tuple(states), moment, layout)


def _along(x, basis, axis, transpose):
  """Multiplies dimension `axis` of `x` by `basisᵀ` (or `basis`)."""
  contract = 0 if transpose else 1
  x = jnp.tensordot(x, basis, axes=([axis], [contract]),
                    precision=linalg.HIGHEST)
  return jnp.moveaxis(x, -1, axis)


def _rotations(states):
  # Stored bases (maybe low precision) in the computation's dtype.
  bases = [None if fs is None else fs.basis[0].astype(linalg.stat_dtype())
           for fs in states]

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


def _update_factors(grad, ts: TensorState, step, first_id, cfg: Config,
                    samples: Optional[Samples] = None):
  """Accumulates each dimension's statistic (from `grad`, or the mean over
  the cross-fitting `samples`) and refreshes on its checks
  (`factors.advance`, ids from `first_id` on); the second moment follows
  the reordered basis columns."""
  axes = [axis for axis, fs in enumerate(ts.factors) if fs is not None]

  def contraction(x, axis):
    others = [a for a in range(x.ndim) if a != axis]
    return jnp.tensordot(x, x, axes=(others, others),
                         precision=linalg.HIGHEST)

  def grams():
    if samples is None:
      return [contraction(grad, axis)[None] for axis in axes]
    return [samples.mean_of(lambda s: contraction(s, axis))[None]
            for axis in axes]
  ids = [jnp.full((1,), first_id + i, jnp.int32) for i in range(len(axes))]
  stacks, orders = factors.advance([ts.factors[a] for a in axes], grams, ids,
                                   step, cfg, Plan())
  moment, states = ts.rotated_second_moment, list(ts.factors)
  for axis, fs, order in zip(axes, stacks, orders):
    moment = jnp.take(moment, order[0], axis=axis)
    states[axis] = fs
  return ts._replace(factors=tuple(states), rotated_second_moment=moment)


def update(grad, momentum, ts: TensorState, step, adam_step, first_id,
           cfg: Config, samples: Optional[Samples] = None):
  """Direction (in the leaf's shape) and new state of one tensor leaf.

  Args:
    grad, momentum: the gradient and bias-corrected momentum, leaf-shaped.
    ts: the leaf's tensor state.
    step: 1-based step of the factor statistics and check schedule.
    adam_step: the step of Adam's bias correction.
    first_id: the id of the leaf's first factor (`controllers.probe_keys`).
    cfg: hyperparameters.
    samples: cross-fitting: the `cross_fitting.Samples` of (J, *leaf shape)
      microbatch gradients that the statistics and the second moment take
      instead of `grad`.
  """
  shape = grad.shape
  grad = grad.reshape(ts.layout.shape)
  momentum = momentum.reshape(ts.layout.shape)
  if samples is not None:
    samples = samples.reshaped(ts.layout.shape)
  if cfg.rotation_basis == "updated":
    ts = _update_factors(grad, ts, step, first_id, cfg, samples)
  rotate, unrotate = _rotations(ts.factors)
  stored = ts.rotated_second_moment.dtype
  direction, moment = preconditioners.adam_in_basis(
      preconditioners.rotated_square(grad, rotate, samples), momentum,
      ts.rotated_second_moment.astype(grad.dtype), adam_step, cfg.b2,
      cfg.adam_eps, rotate, unrotate,
      cross_fitting.bound_for(cfg, cfg.b2, adam_step, samples=samples))
  ts = ts._replace(rotated_second_moment=moment.astype(stored))
  if cfg.rotation_basis == "previous":
    ts = _update_factors(grad, ts, step, first_id, cfg, samples)
  return direction.reshape(shape), ts
