r"""The safeguard of cross-fitted second moments.

Cross-fitted bias correction (`fo.bias_corrected_adamw`, and
``bias_correction='cross_fit'`` / ``'cross_fit_variance'`` of `fo.shampoo`,
`fo.foam`, `fo.soap`) divides a numerator built from some microbatches by
a second moment built from others, the held-out ones, so that the two are
independent. Nothing then ties the held-out second moment to the numerator.
In a coordinate that every held-out microbatch leaves at zero (an input
pixel or a ReLU unit that is zero on all their examples, a rare token) the
held-out second moment is 0 and Adam's step ``m̂ / (√v̂ + ε)`` becomes
``m̂ / ε``: on a digits MLP, ratios ``|m̂| / √v̂`` of 1e3 to 1e5 in the
first three steps, where Adam's stay below 1.1, and then a loss of 2e6.

Uncorrected Adam cannot do this: its momentum and second moment average
the same gradients, and Cauchy–Schwarz bounds their ratio,

.. math::

  \hat m_t^2 \le R_t^2\, \hat v_t, \qquad
  R_t = \frac{1-b_1}{c_1}\sqrt{\frac{c_2}{1-b_2}}
        \sqrt{\sum_{k<t} (b_1^2/b_2)^k},

for every gradient sequence (``c1 = 1 - b1^t``, ``c2 = 1 - b2^t``, or 1
where that bias correction is not applied; equality for gradients growing
like ``(b2/b1)^t``). ``R_1 = 1``; for ``b1² < b2``, ``R_t`` tends to
``(1-b1) / √((1-b2)(1 - b1²/b2))`` (1.17 at b1 = 0.9, b2 = 0.95).

The safeguard floors the held-out estimate at a fraction `FRACTION` (κ) of
a lower bound of the pooled one, the same estimate from all microbatches:
``v̂ ← max(v̂_held_out, κ·v̂_pooled)``. Where the held-out microbatches saw a
coordinate, its estimate is near the pooled one and the floor is inactive,
so the result is the official algorithm's; where they did not, the
coordinate is estimated from the data that did see it. The lower bounds
cost no state, and they cannot vanish where a numerator does not:

* Leave-one-out (fold ``r``: numerator ``g_r``, second moment from the
  other folds' mean ``ḡ_{-r}``): the pooled estimate is Adam's own,
  ``(b2·v + (1-b2)·ḡ²) / c2``, and ``ḡ² = (Σ_j g_j)² / m²`` has the lower
  bound ``Σ_j g_j² / m²`` in expectation (exchangeable microbatches, whose
  cross terms ``E[g_i g_j] = E[g]²`` are non-negative), which no
  cancellation between microbatches can bring to 0. So each fold's second
  moment is floored at ``κ·(b2·v + (1-b2)·Σ_j g_j² / m²) / c2``. Where only
  fold ``r`` sees a coordinate this equals ``κ`` times Adam's; before any
  second moment has built up it also bounds the official estimator's heavy
  tail (``g_r / |ḡ_{-r}|`` is a ratio of normals when the coordinate's mean
  is small: measured on N(μ, 1) draws, first steps up to 1e3 with the
  variance correction and 4e4 without, at most 1.7 and 3.8 with the
  floor).
* Two groups (the momentum from the first half, the second moment from the
  second half): the pooled moving average ``v̂ = (v̂_A + v̂_B) / 2`` is not
  kept, so its lower bound ``v̂ ≥ v̂_A / 2 ≥ m̂² / (2 R_t²)`` stands in for
  it (the momentum averages the first half's means, whose squares are at
  most the first half's mean squares). This costs no state, and it makes
  the bound explicit: the step ``|m̂| / √v̂`` is at most ``√(2/κ)·R_t``, four
  times the largest step Adam itself can take. The floor is inactive
  wherever ``v̂_B ≥ κ·v̂_A / 2``, the held-out half's second moment at least
  1/16 of the numerator half's. The same holds for the grafting optimizer
  of `fo.shampoo` and `fo.foam`, and per rotated coordinate for Adam in
  `fo.soap`'s eigenbasis.

The factor statistics of `fo.shampoo` and `fo.foam` (and SOAP's bases) are
cross-fitted too, and are not floored: a factor pools a whole row or column
of a block over a long moving average. Measured on the digits MLP whose
coordinates' held-out second moments are 0, the held-out factors miss at
most 2 of 64 directions, which hold under 1e-7 of the pooled statistic
(scripts/archive/cross_fit_safeguard.py). A grafted step takes its norm
from the floored grafting second moment, and SOAP's rotation preserves
norms.

The official algorithm stays selectable with ``cross_fit_safeguard=False``.

`Samples` carries the held-out microbatch gradients through a step of the
Shampoo family, with the few statistics the step takes from them.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from foam_optax._src import linalg

# κ: the held-out estimate is floored at this fraction of the pooled one.
FRACTION = 1 / 8


def adam_ratio_bound(b1, b2, step, momentum_corrected: bool = True,
                     moment_corrected: bool = True):
  r"""``R_t``, the largest ``|m̂_t| / √v̂_t`` of Adam with decays `b1`, `b2`
  over all gradient sequences (see the module docstring).

  Args:
    b1, b2: the momentum's and second moment's decays (floats or arrays).
    step: t, the number of gradients averaged (clamped at 1).
    momentum_corrected: ``m̂ = m / (1 - b1^t)``; False: ``m̂ = m``.
    moment_corrected: ``v̂ = v / (1 - b2^t)``; False: ``v̂ = v``.

  Returns:
    ``R_t`` as a float32 (float64 with x64) scalar; infinite when ``b2 = 0``
    and ``b1 > 0`` (the second moment forgets what the momentum keeps).
  """
  dtype = jnp.result_type(float)
  t = jnp.maximum(jnp.asarray(step, dtype), 1.0)
  b1, b2 = jnp.asarray(b1, dtype), jnp.asarray(b2, dtype)
  # Σ_{k<t} γ^k with γ = b1²/b2, as expm1(t log γ) / (γ - 1), and t at γ = 1.
  forgets = (b2 == 0) & (b1 > 0)
  gamma = jnp.where((b1 == 0) | forgets, 0.0,
                    b1 ** 2 / jnp.where(b2 > 0, b2, 1.0))
  log_gamma = jnp.log(jnp.where(gamma > 0, gamma, 1.0))
  near_one = jnp.abs(gamma - 1) < 1e-6
  series = jnp.where(
      forgets, jnp.inf, jnp.where(
          gamma == 0, 1.0,
          jnp.where(near_one, t, jnp.expm1(t * log_gamma)
                    / jnp.where(near_one, 1.0, gamma - 1))))
  c1 = 1 - b1 ** t if momentum_corrected else 1.0
  c2 = 1 - b2 ** t if moment_corrected else 1.0
  return (1 - b1) / c1 * jnp.sqrt(c2 / (1 - b2) * series)


def pooled_lower_bound(momentum, bound):
  """``m̂² / (2 R_t²)``: a lower bound of the pooled second moment of two
  equal groups of microbatches whose first group's averages make the
  momentum `momentum` (`bound` = ``R_t``, `adam_ratio_bound`)."""
  return momentum ** 2 / (2 * bound ** 2)


def floored(held_out, pooled):
  """``max(held_out, κ·pooled)``: the held-out second moment, floored at
  the fraction `FRACTION` of the pooled one (or of its lower bound)."""
  return jnp.maximum(held_out, FRACTION * pooled)


def bound_for(cfg, b2, step, moment_corrected: bool = True,
              samples: Optional[Samples] = None):
  """``R_t`` of a cross-fitted Adam-type estimate of the Shampoo family
  (its momentum decays with ``cfg.b1``, bias-corrected with
  ``cfg.ema_bias_correction``; its second moment with `b2`), or None where
  nothing is floored: no cross-fitting `samples`, or
  ``cross_fit_safeguard=False``."""
  if samples is None or not cfg.cross_fit_safeguard:
    return None
  return adam_ratio_bound(cfg.b1, b2, step, cfg.ema_bias_correction,
                          moment_corrected)


class Samples(NamedTuple):
  """The held-out microbatch gradients of a cross-fitted step.

  With ``bias_correction='cross_fit'`` or ``'cross_fit_variance'`` each
  update's ``J = 2h`` microbatch gradients are split in two halves
  (`split`): the momentum averages the first, and every second-order
  statistic (the factor statistics, Adam's and the grafting optimizer's
  second moments, the eigenvalues' variance) the second, these samples.
  Without cross-fitting a step passes None where a `Samples` would go and
  takes the same statistics from the gradient.

  `grads` holds them along their own axis: the leading one for a leaf's
  ``(J, *shape)`` and for one factor's ``(J, d, ·)``, the second for a
  block stack's ``(k, J, m, n)`` (`stacked`).
  """

  grads: jax.Array

  @classmethod
  def split(cls, micro) -> tuple[jax.Array, Samples]:
    """(the first half's mean, the second half) of a leaf's ``(J, *shape)``
    microbatch gradients."""
    half = micro.shape[0] // 2
    return jnp.mean(micro[:half], axis=0), cls(micro[half:])

  @classmethod
  def stacked(cls, per_leaf: Sequence[Samples],
              stack: Callable[[list], jax.Array]) -> Samples:
    """The ``(k, J, m, n)`` block stack of the leaves' samples, `stack`
    cutting one sample's leaves into their ``(k, m, n)`` blocks."""
    per_sample = jax.vmap(stack)([s.grads for s in per_leaf])
    return cls(jnp.moveaxis(per_sample, 0, 1))

  def reshaped(self, shape) -> Samples:
    """Each sample in `shape`."""
    return Samples(self.grads.reshape((-1,) + tuple(shape)))

  def side(self, side: str) -> Samples:
    """The samples whose Grams build a side's statistic: the blocks (left,
    ``G Gᵀ``) or their transposes (right, ``Gᵀ G``)."""
    if side == "left":
      return self
    return Samples(jnp.swapaxes(self.grads, -1, -2))

  def mean_square(self, axis: int = 0) -> jax.Array:
    """The samples' mean ``G²``: the term of Adam's second moment."""
    return jnp.mean(self.grads ** 2, axis=axis)

  def mean_rotated_square(self, rotate, axis: int = 0) -> jax.Array:
    """The mean of ``(rotate G)²``: Adam's term in an eigenbasis."""
    return jnp.mean(jax.vmap(rotate, axis, axis)(self.grads) ** 2,
                    axis=axis)

  def mean_gram(self) -> jax.Array:
    """``(k, d, d)``: the mean ``G Gᵀ`` of a ``(k, J, d, ·)`` stack."""
    s = self.grads
    return jnp.einsum("kjde,kjfe->kdf", s, s,
                      precision=linalg.HIGHEST) / s.shape[1]

  def mean_of(self, term: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """The mean over the ``(J, ...)`` samples of ``term(G)``."""
    return jnp.mean(jax.vmap(term)(self.grads), axis=0)

  def contributions(self, basis) -> jax.Array:
    """``(J, m)``: ``ℓ_jk = q_kᵀ G_j G_jᵀ q_k = ‖(Qᵀ G_j)_k‖²``, each
    sample's contribution to each eigenvalue of a ``(J, m, ·)`` factor's
    statistic along `basis`'s columns ``q_k``."""
    rotated = jnp.einsum("dk,jde->jke", basis, self.grads,
                         precision=linalg.HIGHEST)
    return jnp.sum(rotated ** 2, axis=-1)

  @property
  def num_samples(self) -> int:
    """J, the number of samples of a ``(J, ...)`` leaf or factor."""
    return self.grads.shape[0]
