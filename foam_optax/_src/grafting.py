"""Grafting: the diagonal optimizer whose per-block step norm Shampoo borrows.

The preconditioned direction fixes the *direction* of each block's step; the
grafting optimizer fixes its *size*: ``P · ‖a‖_F / (‖P‖_F + tiny)``. Leaves
that are not preconditioned (and every leaf before the first check step) use
the grafting direction `a` itself. ``grafting='rms'`` (ASGO's rescaling)
fixes the size instead: every block, and every leaf's momentum, gets the
entries' RMS ``graft_rms``, i.e. the norm ``graft_rms·√(size)``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from foam_optax._src import cross_fitting
from foam_optax._src.config import Config
from foam_optax._src.cross_fitting import Samples

USES_SECOND_MOMENT = ("adam", "rmsprop")


def adam_direction(second_moment, grad, momentum, step, b2, eps,
                   bias_correction=True,
                   samples: Optional[Samples | jax.Array] = None,
                   bound=None):
  """Adam's direction ``M / (sqrt(V / (1 - b2^t)) + eps)`` (RMSProp's
  without the bias correction) and the new second moment ``V ← b2·V +
  (1-b2)·G²``; with `samples` (`cross_fitting.Samples` of ``(J, *shape)``),
  cross-fitting's held-out microbatch gradients, ``V`` takes their mean
  square instead of ``G²`` (a ``(J, *shape)`` array is taken as such
  samples). With `bound`, Adam's ratio bound ``R_t``
  (`cross_fitting.adam_ratio_bound`), the direction divides by that
  held-out estimate floored at a fraction of the pooled one's lower bound
  ``M² / (2 R_t²)`` (`cross_fitting`; the state keeps the unfloored ``V``)."""
  b2 = jnp.asarray(b2, grad.dtype)
  if samples is not None and not isinstance(samples, Samples):
    samples = Samples(jnp.asarray(samples))
  if samples is None:
    term = (1 - b2) * grad * grad
  else:
    term = (1 - b2) * samples.mean_square()
  second_moment = b2 * second_moment + term
  scale = second_moment / (1 - b2 ** step) if bias_correction else second_moment
  if bound is not None:
    scale = cross_fitting.floored(
        scale, cross_fitting.pooled_lower_bound(momentum, bound))
  return momentum / (jnp.sqrt(scale) + eps), second_moment


def direction(second_moment, grad, momentum, step, cfg: Config,
              samples: Optional[Samples] = None):
  """Grafting direction `a_t` and the new second moment (None if unused).

  `momentum` is the bias-corrected `M_t` shared with the preconditioner;
  `samples` as in `adam_direction`, whose estimate is floored with
  ``cross_fit_safeguard`` (`cross_fitting`).
  """
  if cfg.grafting == "rms":
    return with_rms(momentum[None], cfg.graft_rms)[0], second_moment
  if cfg.grafting not in USES_SECOND_MOMENT:   # 'sgd' and 'none'
    return momentum, second_moment
  corrected = cfg.grafting == "adam"
  return adam_direction(second_moment, grad, momentum, step, cfg.graft_b2,
                        cfg.adam_eps, bias_correction=corrected,
                        samples=samples, bound=cross_fitting.bound_for(
                            cfg, cfg.graft_b2, step, corrected, samples))


def _frobenius_norms(x):
  """Per entry of the leading axis, over the others, scaled by the largest
  entry first so that the squares cannot overflow."""
  axes = tuple(range(1, x.ndim))
  peak = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
  peak = jnp.where(peak > 0, peak, 1.0)
  return peak * jnp.sqrt(jnp.sum((x / peak) ** 2, axis=axes, keepdims=True))


def with_rms(x, rms):
  """Each entry of the leading axis rescaled to the entries' RMS `rms`
  (zero stays zero)."""
  size = x[0].size
  target = jnp.asarray(rms, x.dtype) * jnp.sqrt(jnp.asarray(size, x.dtype))
  return x * (target / (_frobenius_norms(x) + jnp.finfo(x.dtype).tiny))


def match_norms(blocks, reference):
  """Each (m, n) block of a (k, m, n) stack rescaled to the Frobenius norm
  of the same block of `reference`."""
  tiny = jnp.finfo(blocks.dtype).tiny
  return blocks * (_frobenius_norms(reference) /
                   (_frobenius_norms(blocks) + tiny))


def borrows_norm(cfg: Config) -> bool:
  """Whether a block's step takes its norm from the grafting direction
  (else: fixed by ``'rms'``, or no rescaling, or Adam in the eigenbasis)."""
  return not (cfg.eigenvalue_corrected or cfg.grafting in ("rms", "none"))


def rescale(blocks, graft_blocks, cfg: Config):
  """Give each (m, n) block of a (k, m, n) stack its grafting norm."""
  if cfg.grafting == "none":
    return blocks
  if cfg.grafting == "rms":
    return with_rms(blocks, cfg.graft_rms)
  return match_norms(blocks, graft_blocks)
