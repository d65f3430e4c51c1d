"""Optimizers: `scale_by_*` transformations and their learning-rate aliases.

Each alias is ``optax.chain(scale_by_X(...), add_decayed_weights(wd, mask),
scale_by_learning_rate(lr))``. Signatures are explicit so that
`optax.inject_hyperparams` can inject any numeric argument.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

from foam_optax._src import config
from foam_optax._src.transform import all_finite, from_config, scale_by_foam
from foam_optax._src.transform import skipping
from foam_optax._src.transform import ScaleByFoamState

ScalarOrSchedule = Union[float, Any, Callable[[Any], Any]]
MaskOrFn = Optional[Union[Any, Callable[[Any], Any]]]


def _alias(scale_by, arguments):
  """chain(scale_by(**rest), add_decayed_weights, scale_by_learning_rate)."""
  arguments = dict(arguments)
  learning_rate = arguments.pop("learning_rate")
  weight_decay = arguments.pop("weight_decay")
  weight_decay_mask = arguments.pop("weight_decay_mask")
  config.check_learning_rate(learning_rate)
  config.check_weight_decay(weight_decay)
  skip = arguments.pop("skip_nonfinite")
  if not isinstance(skip, bool):
    raise ValueError(f"skip_nonfinite must be a bool, got {skip!r}.")
  if not skip and arguments["max_consecutive_skips"] is not None:
    raise ValueError("max_consecutive_skips needs skip_nonfinite=True, got "
                     f"{arguments['max_consecutive_skips']!r}.")
  # The wrapper skips the whole chain (weight decay and the schedule's count
  # too); the core counts the step, so it need not check on its own.
  chain = optax.chain(
      scale_by(skip_nonfinite=False, **arguments),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate),
  )
  return skip_nonfinite(chain) if skip else chain


def skip_nonfinite(
    inner: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
  """Skips the whole of `inner` on a step whose gradients are not finite.

  On such a step the updates are zero and every array of `inner`'s state is
  kept exactly, except the skip counters (``nonfinite_skips``,
  ``consecutive_skips``) of the foam_optax transformations inside, which
  count the step (`stats` reports them) and also obey their own
  ``max_consecutive_skips``. Use it around a chain that adds anything after
  `scale_by_foam` (weight decay, a schedule, `optax.partition` with AdamW):
  `scale_by_foam` on its own skips only its own state. The aliases (`foam`,
  `shampoo`, `soap`) and `partition` already apply it.

  `inner` is traced once: its new state is selected against the old one
  (``jnp.where`` on the finite flag, fused by XLA into the arithmetic),
  and the foam_optax transformations inside skip their own work.

  Example:
    >>> import optax, foam_optax as fo
    >>> tx = fo.skip_nonfinite(optax.chain(
    ...     fo.scale_by_foam(), optax.add_decayed_weights(1e-4),
    ...     optax.scale_by_learning_rate(1e-3)))
  """
  is_core = lambda x: isinstance(x, ScaleByFoamState)

  def update_fn(updates, state, params=None, **extra_args):
    skip = jnp.logical_not(all_finite(updates))
    with skipping(skip):
      new_updates, new_state = inner.update(updates, state, params,
                                            **extra_args)
    new_updates = jax.tree.map(
        lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
    # foam_optax states already kept what a skipped step must keep.
    new_state = jax.tree.map(
        lambda new, old: new if is_core(new) else jnp.where(skip, old, new),
        new_state, state, is_leaf=is_core)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def foam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.95,
    b2: float = 0.995,
    epsilon: float = 1e-9,
    max_epsilon: float = 3e-7,
    threshold: float = 0.75,
    check_frequency: int = 20,
    exponent: float = 2,
    block_size: Optional[int] = 1024,
    max_precond_dim: Optional[int] = None,
    start_preconditioning_step: Optional[int] = None,
    grafting: str = "adam",
    graft_b2: float = 0.995,
    graft_eps: float = 1e-9,
    controller: str = "foam",
    residual_tol: float = 0.1,
    precondition_1d: bool = False,
    preconditioner: str = "root_inverse",
    refresh_method: str = "eigh",
    stagger: bool = True,
    grouping: str = "map",
    skip_nonfinite: bool = True,
    max_consecutive_skips: Optional[int] = None,
    mu_dtype: Optional[Any] = None,
    second_moment_dtype: Optional[Any] = None,
    factor_matrix_dtype: Optional[Any] = None,
    factor_matrix_eigenvectors_dtype: Optional[Any] = None,
    inv_factor_matrix_dtype: Optional[Any] = None,
    pseudo_inverse_rtol: Optional[float] = None,
    weight_dimension_numbers: Optional[Any] = None,
    cache_inverse_root: bool = True,
    proxy: str = "exact",
    proxy_probes: int = 16,
    weight_decay: float = 0.0,
    weight_decay_mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  """FOAM: Shampoo with adaptive damping and adaptive eigendecomposition.

  ``optax.chain(scale_by_foam(...), add_decayed_weights(weight_decay,
  weight_decay_mask), scale_by_learning_rate(learning_rate))``; the defaults
  are the FOAM paper's main configuration. See `scale_by_foam` for the update
  and every other argument.

  Non-finite gradients: a step with a NaN/Inf gradient is skipped whole
  (``skip_nonfinite``) and counted in ``fo.stats(state)['nonfinite_skips']``
  and ``['consecutive_skips']``; ``max_consecutive_skips=N`` stops the run
  with an error after N skips in a row. Under `optax.MultiSteps` pass
  ``should_skip_update_fn=optax.skip_not_finite``: otherwise one NaN
  micro-batch poisons its accumulator (NaN * 0 is NaN) and every later
  update is skipped.

  Args:
    learning_rate: a float or an optax schedule.
    weight_decay: decoupled weight decay (multiplied by the learning rate).
    weight_decay_mask: pytree of bools or a callable of the params choosing
      the leaves that decay; None decays all.
    max_consecutive_skips: None, or stop with an error once this many
      updates in a row were skipped (needs ``skip_nonfinite=True``).

  Example:
    >>> import jax.numpy as jnp, foam_optax as fo
    >>> opt = fo.foam(1e-3, weight_decay=1e-4)
    >>> state = opt.init({'w': jnp.zeros((8, 4))})

  References:
    The FOAM paper, ICML 2026. arXiv:2606.02365.

    Gupta, Koren and Singer, Shampoo: Preconditioned Stochastic Tensor
    Optimization, ICML 2018. arXiv:1802.09568.
  """
  return _alias(scale_by_foam, locals())


def scale_by_shampoo(
    b1: float = 0.95,
    b2: float = 0.995,
    epsilon: float = 1e-9,
    check_frequency: int = 20,
    exponent: float = 2,
    block_size: Optional[int] = 1024,
    max_precond_dim: Optional[int] = None,
    start_preconditioning_step: Optional[int] = None,
    grafting: str = "adam",
    graft_b2: float = 0.995,
    graft_eps: float = 1e-9,
    precondition_1d: bool = False,
    stagger: bool = True,
    grouping: str = "map",
    skip_nonfinite: bool = True,
    max_consecutive_skips: Optional[int] = None,
    mu_dtype: Optional[Any] = None,
    second_moment_dtype: Optional[Any] = None,
    factor_matrix_dtype: Optional[Any] = None,
    factor_matrix_eigenvectors_dtype: Optional[Any] = None,
    inv_factor_matrix_dtype: Optional[Any] = None,
    pseudo_inverse_rtol: Optional[float] = None,
    weight_dimension_numbers: Optional[Any] = None,
    cache_inverse_root: bool = True,
) -> optax.GradientTransformation:
  r"""Classic Shampoo with a fixed eigendecomposition frequency.

  The baseline FOAM improves on: every check step (every `check_frequency`
  steps) recomputes every factor's eigendecomposition and the damping stays
  `epsilon`. Same update and arguments as `scale_by_foam` with
  ``controller='stale'``; defaults match `scale_by_foam` so the two compare
  like for like (use ``exponent=4`` for the original Shampoo's ``-1/4`` root
  of matrices).

  Example:
    >>> import jax.numpy as jnp, foam_optax as fo
    >>> state = fo.scale_by_shampoo(check_frequency=100).init(jnp.zeros((4, 4)))

  References:
    Gupta, Koren and Singer, Shampoo: Preconditioned Stochastic Tensor
    Optimization, ICML 2018. arXiv:1802.09568.
  """
  # No max_epsilon argument here: the damping after a failed refresh is
  # max(3e-7, epsilon), so a large epsilon is not rejected against 3e-7.
  arguments = dict(locals())
  known = config._known(epsilon)
  cap = jnp.maximum(3e-7, epsilon) if known is None else max(3e-7, known)
  return scale_by_foam(controller="stale", max_epsilon=cap, **arguments)


def shampoo(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.95,
    b2: float = 0.995,
    epsilon: float = 1e-9,
    check_frequency: int = 20,
    exponent: float = 2,
    block_size: Optional[int] = 1024,
    max_precond_dim: Optional[int] = None,
    start_preconditioning_step: Optional[int] = None,
    grafting: str = "adam",
    graft_b2: float = 0.995,
    graft_eps: float = 1e-9,
    precondition_1d: bool = False,
    stagger: bool = True,
    grouping: str = "map",
    skip_nonfinite: bool = True,
    max_consecutive_skips: Optional[int] = None,
    mu_dtype: Optional[Any] = None,
    second_moment_dtype: Optional[Any] = None,
    factor_matrix_dtype: Optional[Any] = None,
    factor_matrix_eigenvectors_dtype: Optional[Any] = None,
    inv_factor_matrix_dtype: Optional[Any] = None,
    pseudo_inverse_rtol: Optional[float] = None,
    weight_dimension_numbers: Optional[Any] = None,
    cache_inverse_root: bool = True,
    weight_decay: float = 0.0,
    weight_decay_mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  """Stale Shampoo (`scale_by_shampoo`) with weight decay and learning rate.

  Non-finite gradients: a step with a NaN/Inf gradient is skipped whole
  (``skip_nonfinite``) and counted in ``fo.stats(state)['nonfinite_skips']``
  and ``['consecutive_skips']``; ``max_consecutive_skips=N`` stops the run
  with an error after N skips in a row. Under `optax.MultiSteps` pass
  ``should_skip_update_fn=optax.skip_not_finite``: otherwise one NaN
  micro-batch poisons its accumulator (NaN * 0 is NaN) and every later
  update is skipped.

  Example:
    >>> import foam_optax as fo
    >>> opt = fo.shampoo(1e-3, check_frequency=100)
  """
  return _alias(scale_by_shampoo, locals())


def scale_by_soap(
    b1: float = 0.95,
    b2: float = 0.95,
    epsilon: float = 1e-8,
    check_frequency: int = 10,
    max_precond_dim: Optional[int] = 10000,
    block_size: Optional[int] = None,
    start_preconditioning_step: int = 1,
    refresh_method: str = "power_qr",
    controller: str = "stale",
    controller_epsilon: float = 1e-9,
    max_epsilon: float = 3e-7,
    threshold: float = 0.75,
    exponent: float = 2,
    residual_tol: float = 0.1,
    precondition_1d: bool = False,
    stagger: bool = True,
    grouping: str = "map",
    skip_nonfinite: bool = True,
    max_consecutive_skips: Optional[int] = None,
    mu_dtype: Optional[Any] = None,
    second_moment_dtype: Optional[Any] = None,
    factor_matrix_dtype: Optional[Any] = None,
    factor_matrix_eigenvectors_dtype: Optional[Any] = None,
    weight_dimension_numbers: Optional[Any] = None,
    proxy: str = "exact",
    proxy_probes: int = 16,
) -> optax.GradientTransformation:
  r"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors.

  .. math::

    \tilde G = Q_L^\top G Q_R, \quad
    V_t = b_2 V_{t-1} + (1-b_2)\,\tilde G \odot \tilde G, \quad
    P_t = Q_L \big(Q_L^\top M_t Q_R \oslash (\sqrt{V_t/(1-b_2^t)} + \epsilon)
    \big) Q_R^\top

  The bases are refreshed on check steps by SOAP's warm-started power step and
  QR (``refresh_method='power_qr'``, the first basis a full ``eigh``) or by a
  fresh ``eigh``; which check steps refresh is the controller's choice:
  ``'stale'`` (all, SOAP), ``'residual'`` (Purifying Shampoo's tolerance) or
  ``'foam'`` (FOAM's staleness proxy applied to the eigenbasis, with its own
  damping ``controller_epsilon``..``max_epsilon`` and ``threshold``). Sides
  longer than `max_precond_dim` stay unrotated; parameters with no factor at
  all (and vectors unless `precondition_1d`) get plain Adam.

  Args:
    b1, b2: Adam's decays; `b2` also decays the factor statistics.
    epsilon: Adam's epsilon in the eigenbasis.
    check_frequency: steps between basis checks.
    controller_epsilon, max_epsilon, threshold: FOAM controller settings.
    exponent: ``p`` of FOAM's staleness proxy ``h = RC·α/p`` (the inverse
      root whose error it bounds); used only by the FOAM controllers.
    second_moment_dtype: storage dtype of the rotated second moment ``V``.
    proxy, proxy_probes: how the FOAM controllers measure staleness, as in
      `scale_by_foam`.
    Others: as in `scale_by_foam` (``mu_dtype``, ``factor_matrix_dtype``,
      ``factor_matrix_eigenvectors_dtype``, ``weight_dimension_numbers``
      included).

  Example:
    >>> import jax.numpy as jnp, foam_optax as fo
    >>> state = fo.scale_by_soap().init({'w': jnp.zeros((8, 4))})

  References:
    Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson and Kakade,
    SOAP: Improving and Stabilizing Shampoo using Adam, ICLR 2025.
    arXiv:2409.11321.

    Eschenhagen, Defazio, Lee, Turner and Shi, Purifying Shampoo:
    Investigating Shampoo's Heuristics by Decomposing its Preconditioner,
    NeurIPS 2025. arXiv:2506.03595.
  """
  # These map to differently named Config fields: check them under their
  # own names so the error names the argument the caller passed.
  config.check_soap_epsilons(epsilon, controller_epsilon, max_epsilon)
  return from_config(config.validate(config.Config(
      b1=b1, b2=b2, epsilon=controller_epsilon, max_epsilon=max_epsilon,
      threshold=threshold, exponent=exponent, check_frequency=check_frequency,
      block_size=block_size, max_precond_dim=max_precond_dim,
      start_preconditioning_step=start_preconditioning_step,
      grafting="adam", graft_b2=b2, graft_eps=epsilon, controller=controller,
      residual_tol=residual_tol, precondition_1d=precondition_1d,
      preconditioner="eigenvalue_corrected", refresh_method=refresh_method,
      stagger=stagger, grouping=grouping, skip_nonfinite=skip_nonfinite,
      max_consecutive_skips=max_consecutive_skips,
      mu_dtype=mu_dtype, second_moment_dtype=second_moment_dtype,
      factor_matrix_dtype=factor_matrix_dtype,
      factor_matrix_eigenvectors_dtype=factor_matrix_eigenvectors_dtype,
      weight_dimension_numbers=weight_dimension_numbers,

      proxy=proxy, proxy_probes=proxy_probes)))


def soap(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.95,
    b2: float = 0.95,
    epsilon: float = 1e-8,
    check_frequency: int = 10,
    max_precond_dim: Optional[int] = 10000,
    block_size: Optional[int] = None,
    start_preconditioning_step: int = 1,
    refresh_method: str = "power_qr",
    controller: str = "stale",
    controller_epsilon: float = 1e-9,
    max_epsilon: float = 3e-7,
    threshold: float = 0.75,
    exponent: float = 2,
    residual_tol: float = 0.1,
    precondition_1d: bool = False,
    stagger: bool = True,
    grouping: str = "map",
    skip_nonfinite: bool = True,
    max_consecutive_skips: Optional[int] = None,
    mu_dtype: Optional[Any] = None,
    second_moment_dtype: Optional[Any] = None,
    factor_matrix_dtype: Optional[Any] = None,
    factor_matrix_eigenvectors_dtype: Optional[Any] = None,
    weight_dimension_numbers: Optional[Any] = None,
    proxy: str = "exact",
    proxy_probes: int = 16,
    weight_decay: float = 0.01,
    weight_decay_mask: MaskOrFn = None,
) -> optax.GradientTransformation:
  """SOAP (`scale_by_soap`) with decoupled weight decay and learning rate.

  Non-finite gradients: a step with a NaN/Inf gradient is skipped whole
  (``skip_nonfinite``) and counted in ``fo.stats(state)['nonfinite_skips']``
  and ``['consecutive_skips']``; ``max_consecutive_skips=N`` stops the run
  with an error after N skips in a row. Under `optax.MultiSteps` pass
  ``should_skip_update_fn=optax.skip_not_finite``: otherwise one NaN
  micro-batch poisons its accumulator (NaN * 0 is NaN) and every later
  update is skipped.

  Example:
    >>> import foam_optax as fo
    >>> opt = fo.soap(3e-3)
  """
  return _alias(scale_by_soap, locals())
