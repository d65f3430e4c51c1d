"""Robust small linear-algebra kernels for Kronecker factors.

Every function here works on a single factor (no batch axis); callers map or
vmap them. Eigenvectors are returned with eigenvalues in descending order, so
a fresh `eigh` and SOAP's power-QR refresh agree on column order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST


def matmul(a, b):
  return jnp.matmul(a, b, precision=HIGHEST)


def all_finite(*arrays):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays]))


def eigh(matrix):
  """Symmetric eigendecomposition, the single place `eigh` is called.

  Tests replace this function to inject failures.
  """
  return jnp.linalg.eigh(matrix)


def fresh_eigendecomposition(factor):
  """(Q, D, ok): eigenbasis of the symmetrised factor, D >= 0, descending.

  `ok` is False when the factor or the result is not finite; callers then
  keep the previous basis. A non-finite factor is zeroed before `eigh` so the
  solver never sees NaN.
  """
  finite_in = jnp.all(jnp.isfinite(factor))
  sym = jnp.where(finite_in, 0.5 * (factor + factor.T), 0.0)
  eigvals, eigvecs = eigh(sym)
  eigvals, eigvecs = eigvals[::-1], eigvecs[:, ::-1]
  ok = finite_in & all_finite(eigvals, eigvecs)
  return eigvecs, jnp.maximum(eigvals, 0.0), ok


def power_qr_refresh(factor, basis):
  """SOAP's warm-started refresh: one power step from the previous basis.

  Columns of the previous basis are ordered by their Rayleigh quotients
  `diag(Qᵀ A Q)` (descending); then `Q_new = qr(A Q_sorted)`. Returns
  `(Q_new, D, order, ok)` with `D` the sorted Rayleigh quotients (clamped at
  0) and `order` the permutation that the rotated second moment must follow.
  """
  estimates = jnp.diagonal(matmul(basis.T, matmul(factor, basis)))
  order = jnp.argsort(-estimates)
  sorted_basis = basis[:, order]
  new_basis, _ = jnp.linalg.qr(matmul(factor, sorted_basis))
  eigvals = jnp.maximum(estimates[order], 0.0)
  ok = all_finite(factor, new_basis, eigvals)
  return new_basis, eigvals, order, ok


def inverse_root_weights(eigvals, damping, exponent, pseudo_inverse_rtol=None):
  """w = (D + eps)^(-1/p): the spectrum of X(Q, D, eps).

  With `pseudo_inverse_rtol` (a pseudo-inverse, as Meta's Distributed
  Shampoo's rank-deficient setting), eigenvalues at most `rtol` times the
  largest are treated as zero: their weight is 0 instead of up to
  ``eps^(-1/p)``, so near-null directions of the statistic are not amplified.
  """
  weights = (eigvals + damping[..., None]) ** (-1.0 / exponent)
  if pseudo_inverse_rtol is None:
    return weights
  largest = jnp.max(eigvals, axis=-1, keepdims=True)
  kept = eigvals > pseudo_inverse_rtol * largest
  return jnp.where(kept, weights, 0.0)


def inverse_root(basis, eigvals, damping, exponent, pseudo_inverse_rtol=None):
  """X = Q diag((D + eps)^(-1/p)) Qᵀ for one factor (see
  `inverse_root_weights` for `pseudo_inverse_rtol`)."""
  weights = inverse_root_weights(eigvals, damping, exponent,
                                 pseudo_inverse_rtol)
  return matmul(basis * weights[None, :], basis.T)


def rotate(blocks, left_basis, right_basis):
  """Q_Lᵀ · B · Q_R for a (k, m, n) stack; a None basis is the identity."""
  if left_basis is not None:
    blocks = jnp.einsum("kji,kjn->kin", left_basis, blocks, precision=HIGHEST)
  if right_basis is not None:
    blocks = jnp.einsum("kmj,kjn->kmn", blocks, right_basis, precision=HIGHEST)
  return blocks


def unrotate(blocks, left_basis, right_basis):
  """Q_L · B · Q_Rᵀ for a (k, m, n) stack; a None basis is the identity."""
  if left_basis is not None:
    blocks = jnp.einsum("kij,kjn->kin", left_basis, blocks, precision=HIGHEST)
  if right_basis is not None:
    blocks = jnp.einsum("kmj,knj->kmn", blocks, right_basis, precision=HIGHEST)
  return blocks


def gram_left(blocks):
  """G Gᵀ for each block of a (k, m, n) stack."""
  return jnp.einsum("kmn,kpn->kmp", blocks, blocks, precision=HIGHEST)


def gram_right(blocks):
  """Gᵀ G for each block of a (k, m, n) stack."""
  return jnp.einsum("kmn,kmp->knp", blocks, blocks, precision=HIGHEST)


def stat_dtype():
  """float32, or float64 when x64 is enabled."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)
