"""Robust small linear-algebra kernels for Kronecker factors.

Every function here works on a single factor (no batch axis); callers map or
vmap them. Eigenvectors are returned with eigenvalues in descending order, so
a fresh `eigh` and SOAP's power-QR refresh agree on column order.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax import lax

HIGHEST = lax.Precision.HIGHEST


def matmul(a, b):
  return jnp.matmul(a, b, precision=HIGHEST)


def arrays_finite(*arrays):
  """True when every entry of every array is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays]))


# The implementation `eigh` calls, innermost `using_eigh` last.
_EIGH = [jnp.linalg.eigh]


def eigh(matrix):
  """Symmetric eigendecomposition: the single place the optimizers call
  one (`jnp.linalg.eigh`, or the function of the innermost `using_eigh`)."""
  return _EIGH[-1](matrix)


@contextlib.contextmanager
def using_eigh(fn):
  """Within this context, every eigendecomposition the optimizers trace is
  ``fn(matrix) -> (eigenvalues, eigenvectors)`` instead of
  `jnp.linalg.eigh`: e.g. one that also counts the decompositions a jitted
  step really executes, with a `jax.debug.callback`.

  It applies to what is traced inside the context: a function jitted and
  traced before keeps the implementation it was traced with.

  Example:
    >>> import jax, foam_optax as fo
    >>> executed = []
    >>> def counting(matrix):
    ...   jax.debug.callback(lambda: executed.append(1))
    ...   return jax.numpy.linalg.eigh(matrix)
    >>> with fo.kernels.using_eigh(counting):
    ...   step = jax.jit(tx.update).lower(grads, state).compile()  # doctest: +SKIP
  """
  _EIGH.append(fn)
  try:
    yield
  finally:
    _EIGH.remove(fn)


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
  ok = finite_in & arrays_finite(eigvals, eigvecs)
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
  ok = arrays_finite(factor, new_basis, eigvals)
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


def _two_sided(blocks, left, right, left_spec, right_spec):
  """`left` and `right` (None: the identity) applied to a (k, m, n) stack
  by the given einsum specifications."""
  if left is not None:
    blocks = jnp.einsum(left_spec, left, blocks, precision=HIGHEST)
  if right is not None:
    blocks = jnp.einsum(right_spec, blocks, right, precision=HIGHEST)
  return blocks


def rotate(blocks, left_basis, right_basis):
  """Q_Lᵀ · B · Q_R for a (k, m, n) stack; a None basis is the identity."""
  return _two_sided(blocks, left_basis, right_basis, "kji,kjn->kin",
                    "kmj,kjn->kmn")


def unrotate(blocks, left_basis, right_basis):
  """Q_L · B · Q_Rᵀ for a (k, m, n) stack; a None basis is the identity."""
  return _two_sided(blocks, left_basis, right_basis, "kij,kjn->kin",
                    "kmj,knj->kmn")


def multiply(blocks, left, right):
  """L · B · R for a (k, m, n) stack; a None factor is the identity."""
  return _two_sided(blocks, left, right, "kij,kjn->kin", "kmj,kjn->kmn")


def gram_left(blocks):
  """G Gᵀ for each block of a (k, m, n) stack."""
  return jnp.einsum("kmn,kpn->kmp", blocks, blocks, precision=HIGHEST)


def gram_right(blocks):
  """Gᵀ G for each block of a (k, m, n) stack."""
  return jnp.einsum("kmn,kmp->knp", blocks, blocks, precision=HIGHEST)


def stat_dtype():
  """float32, or float64 when x64 is enabled."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)
