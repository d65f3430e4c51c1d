"""Bias-corrected AdamW: cross-fitted moments and variance-corrected
inversion from per-microbatch gradients."""

from __future__ import annotations

import typing
from typing import Any, Literal, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from foam_optax._src import alias
from foam_optax._src import cross_fitting
from foam_optax._src import linalg
from foam_optax._src import microbatches
from foam_optax._src import signatures
from foam_optax._src import validation
from foam_optax._src.nnx import plain_arrays
from foam_optax._src.state import SkipCounters

Method = Literal["leave_one_out", "two_group"]


class ScaleByBiasCorrectedAdamState(NamedTuple):
  """State of `scale_by_bias_corrected_adam`: AdamW's moments of the
  full-batch gradient (``count`` updates so far), and the steps an enclosing
  `skip_nonfinite` skipped (``skips``, `fo.bias_corrected_adamw`'s)."""

  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]
  mu: Any
  nu: Any
  skips: SkipCounters


def _leave_one_out(micro, mu, nu, b1, b2, eps, bc1, bc2, variance_correction,
                   safeguard):
  """The official LOO step: fold ``r``'s numerator from ``g_r``, its
  denominator from the other folds' mean; Jensen's term from the spread of
  the denominators. With `safeguard` (not None), each fold's second moment
  is floored at a fraction of a lower bound of Adam's, from all folds
  (`cross_fitting`). Returns (step, new momentum, new second moment)."""
  m = micro.shape[0]
  full = jnp.mean(micro, axis=0)
  others = (m * full - micro) / (m - 1)
  v_hat = jnp.maximum((b2 * nu + (1 - b2) * others ** 2) / bc2, 0.0)
  if safeguard is not None:
    v_hat = cross_fitting.floored(v_hat, (
        b2 * nu + (1 - b2) * jnp.mean(micro ** 2, axis=0) / m) / bc2)
  denom = jnp.sqrt(v_hat) + eps
  m_hat = (b1 * mu + (1 - b1) * micro) / bc1
  step = jnp.mean(m_hat / denom, axis=0)
  if variance_correction:
    third = jnp.mean(m_hat / denom ** 3, axis=0)
    corrected = step - jnp.var(denom, axis=0, ddof=1) * third
    # Where the correction would flip the sign, no step.
    step = jnp.where(corrected * step >= 0, corrected, 0.0)
  # The moments advance with the full-batch mean.
  return step, b1 * mu + (1 - b1) * full, b2 * nu + (1 - b2) * full ** 2


def _two_group(micro, mu, nu, b1, b2, eps, bc1, bc2, variance_correction,
               safeguard):
  """The official two-group step: the momentum from group A (the first
  half), the second moment from group B's mean square, and the variance of
  B's hypothetical denominators subtracted from the inverse. With
  `safeguard`, Adam's ratio bound ``R_t``, B's second moment is floored at
  a fraction of the pooled one's lower bound from the momentum
  (`cross_fitting`). Returns (step, new momentum, new second moment)."""
  half = micro.shape[0] // 2
  group_a, group_b = micro[:half], micro[half:]
  new_nu = b2 * nu + (1 - b2) * jnp.mean(group_b ** 2, axis=0)
  new_mu = b1 * mu + (1 - b1) * jnp.mean(group_a, axis=0)
  v_hat = new_nu / bc2
  if safeguard is not None:
    v_hat = cross_fitting.floored(v_hat, cross_fitting.pooled_lower_bound(
        new_mu / bc1, safeguard))
  denom = jnp.sqrt(v_hat) + eps
  inverse = 1.0 / denom
  if variance_correction:
    per_micro = jnp.sqrt(jnp.maximum((b2 * nu + (1 - b2) * group_b ** 2)
                                     / bc2, 0.0))
    spread = jnp.var(per_micro, axis=0, ddof=1) / group_b.shape[0]
    inverse = jnp.maximum(inverse - spread / denom ** 3, 0.0)
  return (new_mu / bc1) * inverse, new_mu, new_nu


@signatures.public
def scale_by_bias_corrected_adam(
    *,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    method: Method = "leave_one_out",
    variance_correction: bool = True,
    cross_fit_safeguard: bool = True,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam from per-microbatch gradients, corrected for the two biases of a
  minibatch estimate of ``M / √V``.

  ``update(grads, state, params, microbatch_grads=...)`` takes the
  gradients of ``m`` microbatches (leaves with a leading axis of length
  ``m``; `fo.microbatch_grads` computes them). With ``method=
  'leave_one_out'`` (the paper's headline run), fold ``r`` pairs the
  numerator of microbatch ``r`` with the denominator of the other
  ``m - 1``, so the two are independent (no coupling bias):

  .. math::

    \hat m_r = \frac{b_1 m + (1-b_1) g_r}{1-b_1^t}, \quad
    d_r = \sqrt{\frac{b_2 v + (1-b_2) g_{-r}^2}{1-b_2^t}} + \epsilon, \quad
    u = \overline{\hat m_r / d_r}
        - \mathrm{Var}_r(d_r)\, \overline{\hat m_r / d_r^3}

  (``g_{-r}`` the mean of the other folds; the second term removes the
  leading delta-method term of ``E[1/d] > 1/E[d]``, the Jensen bias), and
  entries whose correction flips the sign are zeroed. The moments then
  advance with the full-batch mean ``ḡ``: ``m ← b1·m + (1-b1)·ḡ``,
  ``v ← b2·v + (1-b2)·ḡ²``. With ``method='two_group'`` the momentum comes
  from the first half of the microbatches and ``v`` from the second half's
  mean square, and the variance of that half's denominators is subtracted
  from the inverse. ``variance_correction=False`` keeps the cross-fitting
  only. When every microbatch gradient is the same, the step is Adam's.

  The held-out second moment is floored (``cross_fit_safeguard``, see
  `foam_optax._src.cross_fitting`). In a coordinate that the held-out
  microbatches never saw (a rare input, a ReLU unit off on all their
  examples) the official estimators divide by a second moment near 0, and
  on such data they diverge (a digits MLP: loss 2e6 for two groups, 2e8
  for leave-one-out without the variance correction). Leave-one-out floors
  each fold's ``d_r²`` (before ``ε``) at 1/8 of ``(b2·v + (1-b2)·Σ_j g_j² /
  m²) / (1-b2^t)``, a lower bound of Adam's own second moment from all
  folds that no cancellation between them brings to 0. Two groups floor
  B's at 1/8 of the pooled second moment's lower bound ``m̂² / (2 R_t²)``
  (``R_t``: the largest ``|m̂| / √v̂`` Adam reaches with these decays), so
  the step never exceeds ``4 R_t``; this floor is inactive wherever B's
  second moment is at least 1/16 of A's. Where a floor is inactive, the
  step is the official one. ``cross_fit_safeguard=False`` runs the
  official algorithm.

  The step is computed from `microbatch_grads` alone (`grads` gives the
  structure): a transformation before this one in a chain that changes the
  gradients, such as clipping, does not reach it.

  Args:
    b1, b2, eps: Adam's decays and epsilon (outside the square root).
    method: ``'leave_one_out'`` (needs 2 or more microbatches) or
      ``'two_group'`` (4 or more, an even number).
    variance_correction: subtract the variance (Jensen) term.
    cross_fit_safeguard: floor the held-out second moment (above); False:
      the official algorithm.
    mu_dtype: the momentum's storage dtype; None: the parameter's.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  References:
    Correcting Stochastic Update Bias in Preconditioned Language Model
    Optimizers, 2026. arXiv:2605.20756 (official code:
    fastino-ai/preconditioner-bias-correction, ``LOOBCAdamW`` with the
    ``loo_hybrid`` collector, and ``BiasCorrectedAdamW``).
  """
  for name, value in (("b1", b1), ("b2", b2)):
    validation.UNIT(name, value)
  validation.NON_NEGATIVE("eps", eps)
  validation.choice(("leave_one_out", "two_group"))("method", method)
  validation.boolean("variance_correction", variance_correction)
  validation.boolean("cross_fit_safeguard", cross_fit_safeguard)
  validation.floating_dtype("mu_dtype", mu_dtype)
  step_fn = _leave_one_out if method == "leave_one_out" else _two_group
  minimum = 2 if method == "leave_one_out" else 4

  def init_fn(params):
    params = plain_arrays(params)
    zeros = lambda dtype: lambda p: jnp.zeros(jnp.shape(p), dtype or
                                              jnp.result_type(p))
    return ScaleByBiasCorrectedAdamState(
        jnp.zeros([], jnp.int32), jax.tree.map(zeros(mu_dtype), params),
        jax.tree.map(zeros(linalg.stat_dtype()), params),
        SkipCounters.zeros())

  def update_fn(updates, state, params=None, *, microbatch_grads=None,
                **extra_args):
    del params, extra_args
    structure = jax.tree.structure(updates)
    micro = microbatches.checked(
        microbatch_grads, plain_arrays(updates), minimum,
        "bias-corrected AdamW" + (" (two_group)" if method == "two_group"
                                  else ""), even=method == "two_group")
    count = typing.cast(jax.Array, optax.safe_increment(state.count))
    dtype = linalg.stat_dtype()
    bc1 = 1 - jnp.asarray(b1, dtype) ** count
    bc2 = 1 - jnp.asarray(b2, dtype) ** count
    safeguard = (cross_fitting.adam_ratio_bound(b1, b2, count)
                 if cross_fit_safeguard else None)
    out = [step_fn(g.astype(dtype), m.astype(dtype), v, b1, b2, eps, bc1,
                   bc2, variance_correction, safeguard)
           for g, m, v in zip(micro, jax.tree.leaves(state.mu),
                              jax.tree.leaves(state.nu))]
    treedef = jax.tree.structure(state.mu)
    new_updates = [u.astype(p.dtype) for (u, _, _), p in
                   zip(out, jax.tree.leaves(plain_arrays(updates)))]
    mu = [m_.astype(old.dtype) for (_, m_, _), old in
          zip(out, jax.tree.leaves(state.mu))]
    return structure.unflatten(new_updates), ScaleByBiasCorrectedAdamState(
        count, treedef.unflatten(mu),
        treedef.unflatten([v for _, _, v in out]), state.skips)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@signatures.public
def bias_corrected_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
    method: Method = "leave_one_out",
    variance_correction: bool = True,
    cross_fit_safeguard: bool = True,
    mu_dtype: Optional[Any] = None,
    weight_decay: float = 0.1,
    mask: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """AdamW with the paper's bias corrections
  (`scale_by_bias_corrected_adam`), decoupled weight decay and learning
  rate, ``p ← p·(1 - lr·wd) - lr·u``, taking `optax.adamw`'s arguments.

  The defaults are the paper's headline run (``scripts/pretrain/
  adamw_loo_jensen.sh``: leave-one-out with the variance correction,
  ``betas=(0.9, 0.95)``, ``eps=1e-8``, weight decay 0.1; the embeddings
  there are trained by plain AdamW). A step with a non-finite microbatch
  gradient is skipped whole (`skip_nonfinite`).

  Args:
    learning_rate: a float or an optax schedule.
    b1, b2, eps, method, variance_correction, cross_fit_safeguard, mu_dtype:
      as in `scale_by_bias_corrected_adam`.
    weight_decay: decoupled weight decay (multiplied by the learning rate).
    mask: pytree of bools or a callable of the params choosing the leaves
      that decay; None decays all.

  Example:
    >>> import foam_optax as fo
    >>> opt = fo.bias_corrected_adamw(3e-4)
    >>> # loss, grads, micro = fo.microbatch_grads(loss_fn, params, batch, 8)
    >>> # updates, state = opt.update(grads, state, params,
    >>> #                             microbatch_grads=micro)
  """
  return alias.decayed_alias(
      scale_by_bias_corrected_adam(
          b1=b1, b2=b2, eps=eps, method=method,
          variance_correction=variance_correction,
          cross_fit_safeguard=cross_fit_safeguard, mu_dtype=mu_dtype),
      learning_rate, weight_decay, mask)
