"""Controllers: *when* a factor's cached eigenbasis is refreshed.

A controller runs only on a factor's check step. It sees the bias-corrected
factor `A_t`, the cached basis `Q`, eigenvalues `D` and stored damping, and
returns a `Decision`: whether to pay for a fresh eigendecomposition and, if
not, the damping and eigenvalues to keep using. It never computes the
eigendecomposition itself; `factors.py` does that behind a `lax.cond`, so the
same controllers serve root-inverse Shampoo and eigenvalue-corrected (SOAP)
preconditioning.

Adding a method means writing one function `(factor, basis, eigvals, damping,
cfg) -> Decision` and registering it in `CONTROLLERS`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from foam_optax._src import linalg
from foam_optax._src.config import Config


class Decision(NamedTuple):
  refresh: jax.Array   # bool: do a fresh eigendecomposition now
  damping: jax.Array   # damping to store if the basis is kept
  eigvals: jax.Array   # eigenvalues to store if the basis is kept
  proxy: jax.Array     # the controller's staleness measure (reported)


def staleness_proxy(factor, basis, eigvals, damping, exponent):
  """FOAM's proxy h = RC·α/p for the stale inverse root (SPEC 2.2).

  RC is the drift of the factor in its stale eigenbasis, whitened by the
  damped spectrum; α = max(w)/‖w‖₂ with w = (D + ε)^(-1/p). To first order
  ‖X(A) − X_stale‖_F / ‖X_stale‖_F ≤ h.
  """
  spectrum = eigvals + damping
  drift = linalg.matmul(basis.T, linalg.matmul(factor, basis)) - jnp.diag(eigvals)
  whitened = drift / jnp.sqrt(spectrum[:, None] * spectrum[None, :])
  weights = spectrum ** (-1.0 / exponent)
  alpha = jnp.max(weights) / jnp.linalg.norm(weights)
  return jnp.linalg.norm(whitened) * alpha / exponent


def _damping_floor(damping, cfg):
  return jnp.maximum(jnp.asarray(cfg.epsilon, damping.dtype), damping)


def stale(factor, basis, eigvals, damping, cfg: Config) -> Decision:
  del basis, damping
  dtype = eigvals.dtype
  return Decision(jnp.asarray(True), jnp.asarray(cfg.epsilon, dtype), eigvals,
                  jnp.zeros((), dtype))


def foam(factor, basis, eigvals, damping, cfg: Config) -> Decision:
  current = _damping_floor(damping, cfg)
  proxy = staleness_proxy(factor, basis, eigvals, current, cfg.exponent)
  proposed = jnp.maximum(cfg.epsilon, current * proxy / cfg.threshold)
  # Written as "not <=" so a NaN proxy asks for a fresh basis.
  refresh = jnp.logical_not(proposed <= cfg.max_epsilon)
  return Decision(refresh, proposed.astype(damping.dtype), eigvals,
                  proxy.astype(damping.dtype))


def foam_fixed_damping(factor, basis, eigvals, damping, cfg: Config) -> Decision:
  eps0 = jnp.asarray(cfg.epsilon, damping.dtype)
  proxy = staleness_proxy(factor, basis, eigvals, eps0, cfg.exponent)
  refresh = jnp.logical_not(proxy <= cfg.threshold)
  return Decision(refresh, eps0, eigvals, proxy.astype(damping.dtype))


def foam_no_refresh(factor, basis, eigvals, damping, cfg: Config) -> Decision:
  current = _damping_floor(damping, cfg)
  proxy = staleness_proxy(factor, basis, eigvals, current, cfg.exponent)
  proposed = jnp.maximum(cfg.epsilon, current * proxy / cfg.threshold)
  capped = jnp.minimum(jnp.nan_to_num(proposed, nan=cfg.max_epsilon),
                       cfg.max_epsilon)
  return Decision(jnp.asarray(False), capped.astype(damping.dtype), eigvals,
                  proxy.astype(damping.dtype))


def residual(factor, basis, eigvals, damping, cfg: Config) -> Decision:
  """Purifying Shampoo: keep Q while Qᵀ A Q stays nearly diagonal."""
  del eigvals
  rotated = linalg.matmul(basis.T, linalg.matmul(factor, basis))
  diagonal = jnp.diagonal(rotated)
  off_diagonal = jnp.linalg.norm(rotated - jnp.diag(diagonal))
  total = jnp.linalg.norm(rotated)
  relative = off_diagonal / jnp.maximum(total, jnp.finfo(total.dtype).tiny)
  refresh = jnp.logical_not(off_diagonal <= cfg.residual_tol * total)
  return Decision(refresh, jnp.asarray(cfg.epsilon, damping.dtype),
                  jnp.maximum(diagonal, 0.0), relative.astype(damping.dtype))


CONTROLLERS: dict[str, Callable[..., Decision]] = {
    "stale": stale,
    "foam": foam,
    "foam_fixed_damping": foam_fixed_damping,
    "foam_no_refresh": foam_no_refresh,
    "residual": residual,
}
