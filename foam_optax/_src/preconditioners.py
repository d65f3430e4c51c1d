"""Preconditioners: *what* is applied to a block's momentum.

* `root_inverse` (Shampoo, FOAM): ``P = X_L · M · X_R`` with
  ``X = Q diag((D + ε)^(-1/p)) Qᵀ``. The factor state caches X, rebuilt at
  the checks that change it: two products per step instead of the four of applying it
  through the eigenbasis, for one more (m, m) array per factor (measured in
  `scripts/profile_step.py`).
* `eigenvalue_corrected` (SOAP, Purifying Shampoo): Adam in the factors'
  eigenbasis, ``P = Q_L (M̃ ⊘ (sqrt(V̂) + eps)) Q_Rᵀ`` with a second moment `V`
  of the rotated gradients.

Both take the same factor states, so any controller can drive either.
"""

from __future__ import annotations

import jax.numpy as jnp

from foam_optax._src import linalg
from foam_optax._src.config import Config


def _basis(fs, dtype):
  return None if fs is None else fs.basis.astype(dtype)


def _weights(fs, cfg: Config):
  return linalg.inverse_root_weights(fs.eigvals, fs.damping, cfg.exponent,
                                     cfg.pseudo_inverse_rtol)


def root_inverse(momentum, left, right, cfg: Config):
  """X_L · M · X_R for a (k, m, n) stack; a None factor is the identity.

  With cached inverse roots, two products; otherwise (``cache_inverse_root=
  False``) X = Q diag(w) Qᵀ is applied through the basis, four products.
  Stored matrices are loaded in the momentum's (computation) dtype.
  """
  dtype = momentum.dtype
  if left is not None and left.inverse_root is not None:
    momentum = jnp.einsum("kij,kjn->kin", left.inverse_root.astype(dtype),
                          momentum, precision=linalg.HIGHEST)
  elif left is not None:
    basis = left.basis.astype(dtype)
    rotated = linalg.rotate(momentum, basis, None) * _weights(left, cfg)[
        :, :, None]
    momentum = linalg.unrotate(rotated, basis, None)
  if right is not None and right.inverse_root is not None:
    momentum = jnp.einsum("kmj,kjn->kmn", momentum,
                          right.inverse_root.astype(dtype),
                          precision=linalg.HIGHEST)
  elif right is not None:
    basis = right.basis.astype(dtype)
    rotated = linalg.rotate(momentum, None, basis) * _weights(right, cfg)[
        :, None, :]
    momentum = linalg.unrotate(rotated, None, basis)
  return momentum


def _permute(second_moment, left_order, right_order):
  """Make the rotated second moment follow reordered basis columns."""
  if left_order is not None:
    second_moment = jnp.take_along_axis(
        second_moment, left_order[:, :, None], axis=1)
  if right_order is not None:
    second_moment = jnp.take_along_axis(
        second_moment, right_order[:, None, :], axis=2)
  return second_moment


def eigenvalue_corrected(grad, momentum, second_moment, left, right,
                         left_order, right_order, step, cfg: Config):
  """Adam in the eigenbasis; returns (direction, new second moment).

  The second moment comes back in `grad`'s (computation) dtype; the caller
  casts it to its storage dtype.
  """
  left_basis, right_basis = _basis(left, grad.dtype), _basis(right, grad.dtype)
  second_moment = _permute(second_moment.astype(grad.dtype), left_order,
                           right_order)
  rotated_grad = linalg.rotate(grad, left_basis, right_basis)
  b2 = jnp.asarray(cfg.b2, grad.dtype)
  second_moment = b2 * second_moment + (1 - b2) * rotated_grad ** 2
  denom = jnp.sqrt(second_moment / (1 - b2 ** step)) + cfg.graft_eps
  rotated = linalg.rotate(momentum, left_basis, right_basis) / denom
  return linalg.unrotate(rotated, left_basis, right_basis), second_moment
