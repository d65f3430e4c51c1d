"""Controllers: *when* a factor's cached eigenbasis is refreshed.

A controller runs only on a factor's check step. It sees the bias-corrected
factor `A_t`, the cached basis `Q`, eigenvalues `D` and stored damping, and
returns a `Decision`: whether to pay for a fresh eigendecomposition and, if
not, the damping and eigenvalues to keep using. It never computes the
eigendecomposition itself; `factors.py` does that behind a `lax.cond`, so the
same controllers serve root-inverse Shampoo and eigenvalue-corrected (SOAP)
preconditioning.

Adding a method means writing one function `(factor, basis, eigvals, damping,
cfg, key) -> Decision` and decorating it with `register(name)`: that one
registry is what validation accepts and what `factors.py` dispatches on, so
``controller=name`` then works in every transformation. `key` is a
`jax.random` key that the caller derives from the step and the factor's
identity, so randomized measures (``proxy='sketch'``) are reproducible and
independent across factors; deterministic controllers ignore it (register
those that use it with ``uses_key=True``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp

from foam_optax._src import linalg
from foam_optax._src.validation import static_int

if TYPE_CHECKING:   # `config` reads the registry: no import at run time
  from foam_optax._src.config import Config


# The built-in controllers, for type checkers (`register` adds others).
Controller = Literal["stale", "foam", "foam_fixed_damping", "foam_no_refresh",
                     "residual"]

ControllerFn = Callable[..., "Decision"]

# name -> controller: the one registry (see `register`).
CONTROLLERS: dict[str, ControllerFn] = {}
# Controllers that use their `key`: only they get keys (``proxy='sketch'``).
SKETCHABLE: set[str] = set()


def register(name: str, *, uses_key: bool = False):
  """Decorator: makes the controller usable as ``controller=name``."""

  def add(fn: ControllerFn) -> ControllerFn:
    CONTROLLERS[name] = fn
    if uses_key:
      SKETCHABLE.add(name)
    return fn

  return add


class Decision(NamedTuple):
  refresh: jax.Array   # bool: do a fresh eigendecomposition now
  damping: jax.Array   # damping to store if the basis is kept
  eigvals: jax.Array   # eigenvalues to store if the basis is kept
  proxy: jax.Array     # the controller's staleness measure (reported)


def probe_keys(step, factor_ids):
  """Per-factor `jax.random` keys of the sketched proxy at this step.

  A key depends only on the step and the factor's integer id (see
  `foam_optax.factor_stacks`), so randomized controllers give the same
  decisions on every run, under either refresh_batching and on any mesh.
  """
  base = jax.random.key(0)
  return jax.vmap(lambda i: jax.random.fold_in(
      jax.random.fold_in(base, i), step))(factor_ids)


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


def sketched_staleness_proxy(factor, basis, eigvals, damping, exponent, key,
                             probes):
  r"""Randomized estimate of `staleness_proxy` in O(k m²) instead of O(m³).

  With ``C = S^(-1/2) (QᵀAQ − diag D) S^(-1/2)`` and ``S = D + ε``, ``RC =
  ‖C‖_F`` and ``RC² = E‖Cz‖²`` for any probe with ``E[zzᵀ] = I`` (Hutchinson).
  Each of the `probes` Rademacher vectors costs three m×m mat-vecs:

  .. math::

    C z = S^{-1/2} Q^\top (A (Q (S^{-1/2} z))) − (D / S) \odot z

  and ``RC² ≈ (1/k) Σ_i ‖C z_i‖²``. The relative standard deviation of the
  estimate of RC² is at most ``sqrt(2/k)`` (reached when C has rank one) and
  about ``sqrt(2/(k·r))`` when the drift spreads over r directions.

  Args:
    factor, basis, eigvals, damping, exponent: as `staleness_proxy`.
    key: `jax.random` key of this factor at this step.
    probes: k, the number of probe vectors (static).

  Returns:
    The estimate of ``h = RC·α/p``.
  """
  spectrum = eigvals + damping
  scale = jax.lax.rsqrt(spectrum)[:, None]
  signs = jax.random.rademacher(key, (eigvals.shape[-1], probes),
                                dtype=factor.dtype)
  rotated = linalg.matmul(basis.T, linalg.matmul(
      factor, linalg.matmul(basis, scale * signs)))
  applied = scale * rotated - (eigvals / spectrum)[:, None] * signs
  drift = jnp.sqrt(jnp.sum(applied * applied) / probes)
  weights = spectrum ** (-1.0 / exponent)
  alpha = jnp.max(weights) / jnp.linalg.norm(weights)
  return drift * alpha / exponent


def _proxy(factor, basis, eigvals, damping, cfg: Config, key):
  """The configured estimate of FOAM's proxy h (`cfg.proxy`)."""
  if cfg.proxy == "sketch":
    probes = static_int("proxy_probes", cfg.proxy_probes)
    return sketched_staleness_proxy(factor, basis, eigvals, damping,
                                    cfg.exponent, key, probes)
  return staleness_proxy(factor, basis, eigvals, damping, cfg.exponent)


def _proposed_damping(factor, basis, eigvals, damping, cfg: Config, key):
  """FOAM's proxy h, measured at the current damping ``ε_c = max(ε0, ε_s)``,
  and the damping it proposes, ``ε_n = max(ε0, ε_c·h/τ)`` (SPEC 2.2)."""
  current = jnp.maximum(jnp.asarray(cfg.epsilon, damping.dtype), damping)
  proxy = _proxy(factor, basis, eigvals, current, cfg, key)
  return proxy, jnp.maximum(cfg.epsilon, current * proxy / cfg.threshold)


@register("stale")
def stale(factor, basis, eigvals, damping, cfg: Config, key) -> Decision:
  del basis, damping, key
  dtype = eigvals.dtype
  return Decision(jnp.asarray(True), jnp.asarray(cfg.epsilon, dtype), eigvals,
                  jnp.zeros((), dtype))


@register("foam", uses_key=True)
def foam(factor, basis, eigvals, damping, cfg: Config,
         key) -> Decision:
  proxy, proposed = _proposed_damping(factor, basis, eigvals, damping, cfg,
                                      key)
  # Written as "not <=" so a NaN proxy asks for a fresh basis.
  refresh = jnp.logical_not(proposed <= cfg.max_epsilon)
  return Decision(refresh, proposed.astype(damping.dtype), eigvals,
                  proxy.astype(damping.dtype))


@register("foam_fixed_damping", uses_key=True)
def foam_fixed_damping(factor, basis, eigvals, damping, cfg: Config,
                       key) -> Decision:
  eps0 = jnp.asarray(cfg.epsilon, damping.dtype)
  proxy = _proxy(factor, basis, eigvals, eps0, cfg, key)
  refresh = jnp.logical_not(proxy <= cfg.threshold)
  return Decision(refresh, eps0, eigvals, proxy.astype(damping.dtype))


@register("foam_no_refresh", uses_key=True)
def foam_no_refresh(factor, basis, eigvals, damping, cfg: Config,
                    key) -> Decision:
  proxy, proposed = _proposed_damping(factor, basis, eigvals, damping, cfg,
                                      key)
  capped = jnp.minimum(jnp.nan_to_num(proposed, nan=cfg.max_epsilon),
                       cfg.max_epsilon)
  return Decision(jnp.asarray(False), capped.astype(damping.dtype), eigvals,
                  proxy.astype(damping.dtype))


@register("residual")
def residual(factor, basis, eigvals, damping, cfg: Config, key) -> Decision:
  """Purifying Shampoo: keep Q while Qᵀ A Q stays nearly diagonal."""
  del eigvals, key
  rotated = linalg.matmul(basis.T, linalg.matmul(factor, basis))
  diagonal = jnp.diagonal(rotated)
  off_diagonal = jnp.linalg.norm(rotated - jnp.diag(diagonal))
  total = jnp.linalg.norm(rotated)
  relative = off_diagonal / jnp.maximum(total, jnp.finfo(total.dtype).tiny)
  refresh = jnp.logical_not(off_diagonal <= cfg.residual_tol * total)
  return Decision(refresh, jnp.asarray(cfg.epsilon, damping.dtype),
                  jnp.maximum(diagonal, 0.0), relative.astype(damping.dtype))
