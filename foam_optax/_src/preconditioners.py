"""Preconditioners: *what* is applied to a block's momentum.

* `root_inverse` (Shampoo, FOAM): ``P = X_L · M · X_R`` with
  ``X = Q diag((D + ε)^(-1/p)) Qᵀ``. The factor state caches X, rebuilt at
  the checks that change it: two products per step instead of the four of applying it
  through the eigenbasis, for one more (m, m) array per factor (measured in
  `scripts/profile_step.py`).
* `eigenvalue_corrected` (SOAP, Purifying Shampoo): Adam in the factors'
  eigenbasis, ``P = Q_L (M̃ ⊘ (sqrt(V) + eps)) Q_Rᵀ · sqrt(1 - b2^t)`` with a
  second moment `V` of the rotated gradients (the official SOAP's placement
  of `eps`).

Both take the same factor states, so any controller can drive either.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from foam_optax._src import cross_fitting
from foam_optax._src import linalg
from foam_optax._src.config import Config
from foam_optax._src.cross_fitting import Samples


def basis(fs):
  """The cached eigenbasis of a factor state, None for no factor."""
  return None if fs is None else fs.basis


def _weights(fs, cfg: Config):
  return linalg.inverse_root_weights(fs.eigvals,
                                     cfg.root_damping_of(fs.damping),
                                     cfg.exponent, cfg.pseudo_inverse_rtol,
                                     fs.variance)


def apply_inverse_roots(momentum, left, right):
  """``X_L · M · X_R`` for a (k, m, n) stack and (k, m, m), (k, n, n)
  inverse roots (None: the identity)."""
  return linalg.multiply(momentum, left, right)


def root_inverse(momentum, left, right, cfg: Config):
  """X_L · M · X_R for a (k, m, n) stack; a None factor is the identity.

  With cached inverse roots, two products; otherwise (``cache_inverse_root=
  False``) X = Q diag(w) Qᵀ is applied through the basis, four products.
  Stored matrices are loaded in the momentum's (computation) dtype.
  """
  dtype = momentum.dtype
  cached = lambda fs: fs is not None and fs.inverse_root is not None
  if not (cached(left) or cached(right)):
    return _through_bases(momentum, left, right, cfg)
  as_dtype = lambda fs: None if fs is None else fs.inverse_root.astype(dtype)
  return apply_inverse_roots(momentum, as_dtype(left), as_dtype(right))


def _through_bases(momentum, left, right, cfg: Config):
  """X_L · M · X_R applied through Q and D (four products)."""
  dtype = momentum.dtype
  left_basis = None if left is None else left.basis.astype(dtype)
  right_basis = None if right is None else right.basis.astype(dtype)
  rotated = linalg.rotate(momentum, left_basis, right_basis)
  if left is not None:
    rotated = rotated * _weights(left, cfg)[:, :, None]
  if right is not None:
    rotated = rotated * _weights(right, cfg)[:, None, :]
  return linalg.unrotate(rotated, left_basis, right_basis)


def permute(second_moment, left_order, right_order):
  """Make the rotated second moment follow reordered basis columns."""
  if left_order is not None:
    second_moment = jnp.take_along_axis(
        second_moment, left_order[:, :, None], axis=1)
  if right_order is not None:
    second_moment = jnp.take_along_axis(
        second_moment, right_order[:, None, :], axis=2)
  return second_moment


def rotated_square(grad, rotate, samples: Optional[Samples] = None, axis=0):
  """``(rotate G)²``, or with `samples` (`cross_fitting.Samples`, stacked
  along `axis`) the mean of their rotated squares: the term Adam's second moment
  adds."""
  if samples is None:
    return rotate(grad) ** 2
  return samples.mean_rotated_square(rotate, axis)


def adam_in_basis(square, momentum, second_moment, step, b2, eps,
                  rotate=lambda x: x, unrotate=lambda x: x, bound=None):
  """Adam on rotated gradients, with SOAP's bias correction and epsilon.

  ``V ← b2·V + (1-b2)·square`` (`square` = ``(rotate G)²``, see
  `rotated_square`) and the direction
  ``unrotate(rotate(M) ⊘ (√V + eps)) · √(1 - b2^t)``, where `momentum` is
  the already bias-corrected ``M_t``: the official SOAP's step
  ``lr·√(1-b2^t)/(1-b1^t)`` with ``√V + eps`` (Adam's
  ``√(V/(1-b2^t)) + eps`` differs only in where `eps` sits).

  With `bound`, Adam's ratio bound ``R_t`` (`cross_fitting`), `square` is
  cross-fitting's held-out term, and the direction divides by ``V``
  floored at a fraction of the pooled moment's lower bound ``(1-b2^t)·
  M̃² / (2 R_t²)``, ``M̃ = rotate(M)`` (the state keeps the unfloored ``V``).

  Returns:
    (direction, new second moment).
  """
  b2 = jnp.asarray(b2, square.dtype)
  second_moment = b2 * second_moment + (1 - b2) * square
  correction = 1 - b2 ** step
  rotated = rotate(momentum)
  held_out = second_moment
  if bound is not None:
    held_out = cross_fitting.floored(second_moment, correction * (
        cross_fitting.pooled_lower_bound(rotated, bound)))
  scaled = rotated * jnp.sqrt(correction)
  return unrotate(scaled / (jnp.sqrt(held_out) + eps)), second_moment


def eigenvalue_corrected(grad, momentum, second_moment, left_basis,
                         right_basis, step, cfg: Config,
                         samples: Optional[Samples] = None):
  """Adam in the eigenbasis of a (k, m, n) stack (None: identity basis);
  with `samples` (k, J, m, n) the second moment takes their rotated squares'
  mean (cross-fitting) instead of the gradient's, floored with
  ``cross_fit_safeguard`` (`cross_fitting`).

  Returns (direction, new second moment).
  """
  rotate = lambda x: linalg.rotate(x, left_basis, right_basis)
  return adam_in_basis(
      rotated_square(grad, rotate, samples, axis=1), momentum, second_moment,
      step, cfg.b2, cfg.adam_eps, rotate=rotate,
      unrotate=lambda x: linalg.unrotate(x, left_basis, right_basis),
      bound=cross_fitting.bound_for(cfg, cfg.b2, step, samples=samples))
