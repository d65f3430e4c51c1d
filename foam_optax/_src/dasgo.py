"""DASGO: ASGO's diagonal variant, one second moment per input row."""

from __future__ import annotations

import math
import typing
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from foam_optax._src import alias
from foam_optax._src import grafting
from foam_optax._src import layout
from foam_optax._src import linalg
from foam_optax._src import signatures
from foam_optax._src import validation
from foam_optax._src.nnx import plain_arrays
from foam_optax._src.state import SkipCounters



class ScaleByDasgoState(NamedTuple):
  """State of `scale_by_dasgo`.

  Attributes:
    count: number of updates applied.
    mu: the momentum, shaped like the parameters.
    nu: per parameter the EMA of the squared gradient summed over each
      matrix's columns (the output axis): shape ``(batch, rows)`` of its
      matrix view (see `layout`; a vector is one ``(n, 1)`` matrix).
    skips: the steps an enclosing `skip_nonfinite` skipped (`fo.dasgo`'s).
  """

  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]
  mu: Any
  nu: Any
  skips: SkipCounters


def _matrix_layout(shape, numbers) -> layout.LeafLayout:
  """The leaf's (batch, rows, cols) view: its matrix, or ``(n, 1)`` for a
  vector and ``(1, 1)`` for a scalar."""
  matrix = layout.leaf_layout(shape, None, None, False, numbers)
  if matrix.matrix_shape is not None:
    return matrix
  return layout.LeafLayout(tuple(shape), (math.prod(shape), 1), ())


def _rows(matrix: layout.LeafLayout) -> int:
  """The rows of a `_matrix_layout`, which always has a matrix."""
  assert matrix.matrix_shape is not None
  return matrix.matrix_shape[0]


_RENAMED = signatures.renamed(
    {"eps": "epsilon"}, "the damping is epsilon in fo.asgo and fo.dasgo alike")


@_RENAMED
@signatures.public
def scale_by_dasgo(
    *,
    b1: float = 0.9,
    b2: float = 0.95,
    epsilon: float = 1e-8,
    graft_rms: float = 0.2,
    mu_dtype: Optional[Any] = None,
    weight_dimension_numbers: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""DASGO: the diagonal, one-sided ASGO.

  For each matrix gradient ``G`` (rows: the input, reduction axis):

  .. math::

    M_t = b_1 M_{t-1} + (1-b_1) G_t, \quad
    v_t = b_2 v_{t-1} + (1-b_2) \textstyle\sum_j G_{t,:j}^2, \quad
    U_t = \mathrm{diag}(v_t + \epsilon)^{-1/2} M_t, \quad
    \mathrm{update} = U_t \cdot \frac{r\sqrt{mn}}{\|U_t\|_F}

  with ``r = graft_rms``: the official DASGO (infinity-stars/ASGO at
  d3ef14b, ``optimizers/dasgo.py``) step for step, whose ``v`` runs over the
  input side of torch's ``(out, in)`` weights, the rows of a JAX ``(in,
  out)`` kernel. Leaves of rank >= 3 use their matrix view (or
  `weight_dimension_numbers`, whose batch slices each get their own `v` and
  rescaling); vectors are ``(n, 1)`` matrices. The official runs train
  vectors and embeddings with Adam: see `fo.partition`.

  Args:
    b1: momentum decay.
    b2: decay of the row second moments.
    epsilon: added to the second moments before the inverse square root
      (the official code's ``eps``; ``eps=`` is accepted, deprecated).
    graft_rms: the RMS of each matrix's step.
    mu_dtype: the momentum's storage dtype; None: the parameter's.
    weight_dimension_numbers: as in `scale_by_foam`.

  Returns:
    An `optax.GradientTransformation` (no learning rate, no sign flip).

  Example:
    >>> import jax.numpy as jnp, foam_optax as fo
    >>> layers = {'w': jnp.zeros((3, 8, 4))}   # three stacked 8 x 4 layers
    >>> state = fo.scale_by_dasgo(weight_dimension_numbers={
    ...     'w': fo.DimensionNumbers(1, 2)}).init(layers)

  References:
    An, Liu, Pan, Ren, Ma, Goldfarb and Zhang, ASGO: Adaptive Structured
    Gradient Optimization, NeurIPS 2025. arXiv:2503.20762.
  """
  for name, value, check in (
      ("b1", b1, validation.UNIT), ("b2", b2, validation.UNIT),
      ("epsilon", epsilon, validation.POSITIVE),
      ("graft_rms", graft_rms, validation.POSITIVE)):
    check(name, value)
  validation.floating_dtype("mu_dtype", mu_dtype)

  def layouts(params):
    """Each leaf's matrix view, in `jax.tree.leaves` order."""
    numbers = layout.dimension_numbers(weight_dimension_numbers,
                                              params)
    return [_matrix_layout(jnp.shape(p), dims)
            for p, dims in zip(jax.tree.leaves(params), numbers)]

  def init_fn(params):
    params = plain_arrays(params)
    treedef = jax.tree.structure(params)
    mu = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), mu_dtype or
                                          jnp.result_type(p)), params)
    nu = treedef.unflatten([
        jnp.zeros((lay.batch, _rows(lay)), linalg.stat_dtype())
        for lay in layouts(params)])
    return ScaleByDasgoState(jnp.zeros([], jnp.int32), mu, nu,
                             SkipCounters.zeros())

  def one(grad, momentum, second_moment, matrix):
    g = grad.astype(linalg.stat_dtype())
    momentum = b1 * momentum.astype(g.dtype) + (1 - b1) * g
    rows = layout.to_matrices(g, matrix)
    second_moment = b2 * second_moment + (1 - b2) * jnp.sum(rows ** 2, -1)
    scaled = (layout.to_matrices(momentum, matrix)
              * jax.lax.rsqrt(second_moment + epsilon)[..., None])
    update = grafting.with_rms(scaled, graft_rms)
    return (layout.from_matrices(update, matrix).astype(grad.dtype),
            momentum.astype(mu_dtype or grad.dtype), second_moment)

  def update_fn(updates, state, params=None):
    del params
    structure = jax.tree.structure(updates)
    grads = plain_arrays(updates)
    out = [one(g, m, v, lay) for g, m, v, lay in zip(
        jax.tree.leaves(grads), jax.tree.leaves(state.mu),
        jax.tree.leaves(state.nu), layouts(grads))]
    treedef = jax.tree.structure(state.mu)
    return (structure.unflatten([u for u, _, _ in out]),
            ScaleByDasgoState(typing.cast(jax.Array,
                                          optax.safe_increment(state.count)),
                              treedef.unflatten([m for _, m, _ in out]),
                              treedef.unflatten([v for _, _, v in out]),
                              state.skips))

  return optax.GradientTransformation(init_fn, update_fn)


@_RENAMED
@signatures.public
def dasgo(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.95,
    epsilon: float = 1e-8,
    graft_rms: float = 0.2,
    mu_dtype: Optional[Any] = None,
    weight_dimension_numbers: Optional[Any] = None,
    weight_decay: float = 0.1,
    weight_decay_mask: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """DASGO (`scale_by_dasgo`) with decoupled weight decay and learning rate.

  ``p ← p·(1 - lr·wd) - lr·update`` as the official optimizer, whose
  defaults these are; a step with a non-finite gradient is skipped whole
  (`skip_nonfinite`).

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, epsilon, graft_rms, mu_dtype, weight_dimension_numbers: as in
      `scale_by_dasgo`.
    weight_decay: decoupled weight decay (multiplied by the learning rate).
    weight_decay_mask: pytree of bools or a callable of the params choosing
      the leaves that decay; None decays all.

  Example:
    >>> import optax, foam_optax as fo
    >>> # The official runs' routing: embeddings, vectors and biases to Adam.
    >>> opt = fo.partition(fo.dasgo(1e-2),
    ...                    optax.adam(1e-2, b1=0.9, b2=0.95, eps=1e-8),
    ...                    bias_and_norm_pattern="bias", embedding_pattern="emb")
  """
  return alias.decayed_alias(
      scale_by_dasgo(b1=b1, b2=b2, epsilon=epsilon, graft_rms=graft_rms,
                     mu_dtype=mu_dtype,
                     weight_dimension_numbers=weight_dimension_numbers),
      learning_rate, weight_decay, weight_decay_mask)
