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


def inverse_root_weights(eigvals, damping, exponent, pseudo_inverse_rtol=None,
                         variance=None):
  """w = (D + eps)^(-1/p): the spectrum of X(Q, D, eps).

  With `pseudo_inverse_rtol` (a pseudo-inverse, as Meta's Distributed
  Shampoo's rank-deficient setting), eigenvalues at most `rtol` times the
  largest are treated as zero: their weight is 0 instead of up to
  ``eps^(-1/p)``, so near-null directions of the statistic are not amplified.

  With `variance` (of each eigenvalue's estimate), the leading delta-method
  term of the Jensen bias of ``E[f(λ)]``, ``f(λ) = λ^(-1/p)``, is removed:
  ``w = max(0, f(λ) - ½ f''(λ) Var)`` with ``½ f''(λ) = (p+1)/(2p²)·
  λ^(-1/p-2)`` and ``λ = D + eps``.
  """
  spectrum = eigvals + damping[..., None]
  weights = spectrum ** (-1.0 / exponent)
  if variance is not None:
    curvature = (exponent + 1) / (2 * exponent ** 2)
    weights = jnp.maximum(
        weights - curvature * spectrum ** (-1.0 / exponent - 2) * variance,
        0.0)
  if pseudo_inverse_rtol is None:
    return weights
  largest = jnp.max(eigvals, axis=-1, keepdims=True)
  kept = eigvals > pseudo_inverse_rtol * largest
  return jnp.where(kept, weights, 0.0)


def inverse_root(basis, eigvals, damping, exponent, pseudo_inverse_rtol=None,
                 variance=None):
  """X = Q diag((D + eps)^(-1/p)) Qᵀ for one factor (see
  `inverse_root_weights` for `pseudo_inverse_rtol` and `variance`)."""
  weights = inverse_root_weights(eigvals, damping, exponent,
                                 pseudo_inverse_rtol, variance)
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


# The Polar Express polynomials (Amsel et al., 2025) as ASGO's official code
# lists them, each (a, b, c) of p(x) = a·x + b·x³ + c·x⁵; every one but the
# last is divided by its safety factor (1.01, 1.01³, 1.01⁵), and the last
# repeats once the list is used up.
_POLAR_EXPRESS = tuple(
    (a / 1.01, b / 1.01 ** 3, c / 1.01 ** 5) for a, b, c in (
        (8.28721201814563, -23.595886519098837, 17.300387312530933),
        (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
        (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
        (3.3184196573706015, -2.488488024314874, 0.51004894012372),
        (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
        (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
        (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    )) + ((1.875, -1.25, 0.375),)

# The Newton–Schulz polynomial of ASGO's official alternative: a = 2,
# b = -3/2, c = 1/2.
_NEWTON_SCHULZ = (2.0, -1.5, 0.5)


def _coupled_inverse_sqrt(scaled, coefficients):
  """Z ≈ Y^(-1/2) from the coupled iteration ``ZY = Z·Y``, ``B = b·ZY +
  c·(ZY)²``, ``Y ← a·Y + Y·B``, ``Z ← a·Z + B·Z`` on a normalised Y."""
  eye = jnp.eye(scaled.shape[-1], dtype=scaled.dtype)

  def body(carry, abc):
    y, z = carry
    a, b, c = abc
    zy = matmul(z, y)
    poly = b * zy + c * matmul(zy, zy)
    return (a * y + matmul(y, poly), a * z + matmul(poly, z)), None

  (_, z), _ = lax.scan(body, (scaled, eye),
                       jnp.asarray(coefficients, scaled.dtype))
  return z


def polar_express_inverse_sqrt(factor, epsilon, iterations=10):
  """A^(-1/2) by ASGO's Polar Express iteration, as its official code:
  ``Y = A / n`` with ``n = 1.01·‖A + εI‖_F``, `iterations` coupled steps
  with the Polar Express polynomials, then ``Z / √n``. No eigendecomposition:
  matrix products only."""
  eye = jnp.eye(factor.shape[-1], dtype=factor.dtype)
  norm = jnp.linalg.norm(factor + epsilon * eye) * 1.01
  steps = [_POLAR_EXPRESS[min(i, len(_POLAR_EXPRESS) - 1)]
           for i in range(iterations)]
  return _coupled_inverse_sqrt(factor / norm, steps) / jnp.sqrt(norm)


def newton_schulz_inverse_sqrt(factor, epsilon, iterations=10):
  """A^(-1/2) by ASGO's official Newton–Schulz alternative:
  ``Y = (A + εI) / (‖A‖_F + ε)``, `iterations` coupled steps with ``(a, b,
  c) = (2, -3/2, 1/2)``, then ``Z / √‖A‖_F``."""
  eye = jnp.eye(factor.shape[-1], dtype=factor.dtype)
  norm = jnp.linalg.norm(factor)
  scaled = (factor + epsilon * eye) / (norm + epsilon)
  return (_coupled_inverse_sqrt(scaled, [_NEWTON_SCHULZ] * iterations)
          / jnp.sqrt(norm))
