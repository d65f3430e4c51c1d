"""Optimizers: `scale_by_*` transformations and their learning-rate aliases.

Each alias is ``optax.chain(scale_by_X(...), add_decayed_weights(wd, mask),
scale_by_learning_rate(lr))``. Signatures are explicit so that
`optax.inject_hyperparams` can inject any numeric argument.
"""

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from foam_optax._src import config
from foam_optax._src.config import FirstStep, Grafting, RefreshBatching
from foam_optax._src.config import Preconditioner, Proxy, RefreshMethod
from foam_optax._src.config import RootDamping
from foam_optax._src.config import RotationBasis, TensorShaping
from foam_optax._src.controllers import Controller
from foam_optax._src.skipping import skip_nonfinite
from foam_optax._src.transform import from_config, scale_by_foam

ScalarOrSchedule = optax.ScalarOrSchedule
MaskOrFn = Optional[Union[Any, Callable[[optax.Params], Any]]]


def _alias(scale_by, arguments, decay_after_update=False,
           skip_first_decay=False):
  """chain(scale_by(**rest), add_decayed_weights, scale_by_learning_rate),
  or with `decay_after_update` chain(scale_by(**rest),
  scale_by_learning_rate, decay_updated_weights)."""
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
  core = scale_by(skip_nonfinite=False, **arguments)
  if decay_after_update:
    chain = optax.chain(
        core, optax.scale_by_learning_rate(learning_rate),
        decay_updated_weights(learning_rate, weight_decay, weight_decay_mask,
                              skip_first_step=skip_first_decay))
  else:
    chain = optax.chain(
        core, optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate))
  return skip_nonfinite(chain) if skip else chain


class DecayUpdatedWeightsState(NamedTuple):
  count: jax.Array   # updates so far (the schedule's argument)


def decay_updated_weights(
    learning_rate: ScalarOrSchedule,
    weight_decay: float,
    mask: MaskOrFn = None,
    skip_first_step: bool = False,
) -> optax.GradientTransformation:
  r"""Decoupled weight decay of the weights *after* the update, as SOAP's.

  Put last in a chain whose updates already carry the learning rate: the
  parameters become ``(p + u)(1 - lr·wd)``, i.e. the update
  ``u - lr·wd·(p + u)``. This is the order of the official SOAP (and of
  PyTorch's AdamW "fixed" decay at the end of the step); optax's
  ``add_decayed_weights`` before the learning rate decays ``p`` instead,
  which differs by ``lr·wd·u`` (second order in the learning rate).

  Args:
    learning_rate: the chain's learning rate, a float or an optax schedule
      (evaluated at this transformation's own update count, like
      ``scale_by_learning_rate``).
    weight_decay: the decay coefficient.
    mask: pytree of bools or a callable of the params choosing the leaves
      that decay; None decays all.
    skip_first_step: no decay on the first update (SOAP's first step only
      initialises its preconditioner and leaves the weights untouched).

  Returns:
    An `optax.GradientTransformation`; `update` needs the params.

  Example:
    >>> import optax, foam_optax as fo
    >>> tx = optax.chain(fo.scale_by_soap(), optax.scale_by_learning_rate(3e-3),
    ...                  fo.decay_updated_weights(3e-3, 0.01))
  """
  config.check_learning_rate(learning_rate)
  config.check_weight_decay(weight_decay)

  def init_fn(params):
    del params
    return DecayUpdatedWeightsState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("decay_updated_weights needs the params in update.")
    lr = (learning_rate(state.count) if callable(learning_rate)
          else learning_rate)
    rate = lr * weight_decay
    if skip_first_step:
      rate = jnp.where(state.count == 0, 0.0, rate)
    updates = jax.tree.map(
        lambda u, p: (u - rate * (p + u)).astype(u.dtype), updates, params)
    return updates, DecayUpdatedWeightsState(
        optax.safe_increment(state.count))

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)


def foam(
    learning_rate: ScalarOrSchedule,
    *,
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
    grafting: Grafting = "adam",
    graft_b2: float = 0.995,
    graft_eps: float = 1e-9,
    controller: Controller = "foam",
    residual_tol: float = 0.1,
    precondition_1d: bool = False,
    preconditioner: Preconditioner = "root_inverse",
    refresh_method: RefreshMethod = "eigh",
    stagger: bool = False,
    statistics_compute_steps: int = 1,
    refresh_batching: RefreshBatching = "map",
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
    proxy: Proxy = "exact",
    proxy_probes: int = 16,
    root_damping: RootDamping = "controller",
    weight_decay: float = 0.0,
    weight_decay_mask: MaskOrFn = None,
) -> optax.GradientTransformationExtraArgs:
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
    *,
    b1: float = 0.95,
    b2: float = 0.995,
    epsilon: float = 1e-9,
    check_frequency: int = 20,
    exponent: float = 2,
    block_size: Optional[int] = 1024,
    max_precond_dim: Optional[int] = None,
    start_preconditioning_step: Optional[int] = None,
    grafting: Grafting = "adam",
    graft_b2: float = 0.995,
    graft_eps: float = 1e-9,
    precondition_1d: bool = False,
    stagger: bool = False,
    statistics_compute_steps: int = 1,
    refresh_batching: RefreshBatching = "map",
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
    *,
    b1: float = 0.95,
    b2: float = 0.995,
    epsilon: float = 1e-9,
    check_frequency: int = 20,
    exponent: float = 2,
    block_size: Optional[int] = 1024,
    max_precond_dim: Optional[int] = None,
    start_preconditioning_step: Optional[int] = None,
    grafting: Grafting = "adam",
    graft_b2: float = 0.995,
    graft_eps: float = 1e-9,
    precondition_1d: bool = False,
    stagger: bool = False,
    statistics_compute_steps: int = 1,
    refresh_batching: RefreshBatching = "map",
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
) -> optax.GradientTransformationExtraArgs:
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
    *,
    b1: float = 0.95,
    b2: float = 0.95,
    epsilon: float = 1e-8,
    check_frequency: int = 10,
    max_precond_dim: Optional[int] = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    rotation_basis: RotationBasis = "previous",
    first_step: FirstStep = "init_only",
    tensor_shaping: TensorShaping = "per_dimension",
    block_size: Optional[int] = None,
    start_preconditioning_step: int = 1,
    refresh_method: RefreshMethod = "power_qr",
    controller: Controller = "stale",
    controller_epsilon: float = 1e-9,
    max_epsilon: float = 3e-7,
    threshold: float = 0.75,
    exponent: float = 2,
    residual_tol: float = 0.1,
    stagger: bool = False,
    statistics_compute_steps: int = 1,
    refresh_batching: RefreshBatching = "map",
    skip_nonfinite: bool = True,
    max_consecutive_skips: Optional[int] = None,
    mu_dtype: Optional[Any] = None,
    second_moment_dtype: Optional[Any] = None,
    factor_matrix_dtype: Optional[Any] = None,
    factor_matrix_eigenvectors_dtype: Optional[Any] = None,
    weight_dimension_numbers: Optional[Any] = None,
    proxy: Proxy = "exact",
    proxy_probes: int = 16,
) -> optax.GradientTransformation:
  r"""SOAP: Adam in the eigenbasis of Shampoo's Kronecker factors.

  With its defaults this is the official SOAP (github.com/nikhilvyas/SOAP,
  ``soap.py``) step for step; the tests compare it with a float64 port of
  that code. Each parameter dimension ``d`` (of size at most
  `max_precond_dim`) has a factor ``L_d``, the EMA (decay `b2`) of the
  gradient contracted with itself over the other dimensions, and its
  eigenbasis ``Q_d``. With ``G̃`` the gradient rotated by every ``Q_dᵀ``:

  .. math::

    \tilde M_t = b_1 \tilde M_{t-1} + (1-b_1)\,\tilde G, \quad
    V_t = b_2 V_{t-1} + (1-b_2)\,\tilde G \odot \tilde G, \quad
    P_t = \frac{\sqrt{1-b_2^s}}{1-b_1^s}\,
      Q\big(\tilde M_t \oslash (\sqrt{V_t} + \epsilon)\big)

  (``Q(·)`` rotates back), where, as in the official code:

  * the first gradient only initialises: it builds the factors and their
    first bases by ``eigh`` and the update is zero; ``s = t - 1`` counts
    from the second gradient (``first_step='init_only'``);
  * the gradient is rotated with the bases of the *previous* statistics; the
    factors are updated with it, and the bases refreshed, after the step
    (``rotation_basis='previous'``), on the steps with ``s % f == 0``;
  * a refresh is one power step warm-started from the previous basis, whose
    columns are first sorted by ``diag(QᵀLQ)`` (``V`` permuted to follow),
    then QR (``refresh_method='power_qr'``);
  * a parameter of rank >= 3 gets one factor per dimension
    (``tensor_shaping='per_dimension'``), or one per group of adjacent
    dimensions merged while their product stays within `max_precond_dim`
    (``merge_dims=True``); a vector gets a factor only with
    `precondition_1d`; a parameter with no factor is stepped by Adam with
    the same ``s``, step size and epsilon.

  The momentum is kept in the parameters' space and rotated each step,
  which equals the official code's rotated momentum (re-projected at every
  basis change) up to round-off.

  Other conventions, as options:

  * ``rotation_basis='updated'``: update the statistics and refresh the bases
    before rotating the gradient, as Meta's Distributed Shampoo does;
  * ``first_step='update'``: step from the first gradient (``s = t``), the
    first bases computed at `start_preconditioning_step`;
  * ``tensor_shaping='matrix'``: a parameter of rank >= 3 is reshaped to a
    blocked matrix, as `scale_by_foam` does (`block_size` blocks matrices
    under either shaping);
  * ``controller``: which check steps refresh: ``'stale'`` (all, SOAP),
    ``'residual'`` (Purifying Shampoo's tolerance) or ``'foam'`` (FOAM's
    staleness proxy applied to the eigenbasis, with its own damping
    ``controller_epsilon``..``max_epsilon`` and ``threshold``), and
    ``refresh_method='eigh'`` for full decompositions.

  Args:
    b1, b2: Adam's decays; `b2` also decays the factor statistics.
    epsilon: Adam's epsilon in the eigenbasis.
    check_frequency: ``f``, steps between basis checks.
    max_precond_dim: a dimension longer than this gets no factor.
    merge_dims: merge adjacent dimensions, as the official ``merge_dims``.
    precondition_1d: give vectors a factor.
    rotation_basis: ``'previous'`` or ``'updated'`` (above).
    first_step: ``'init_only'`` or ``'update'`` (above); ``'init_only'``
      needs ``start_preconditioning_step=1``.
    tensor_shaping: ``'per_dimension'`` or ``'matrix'`` (above).
    block_size: largest block side of matrices; None for no blocking.
    start_preconditioning_step: the first check step.
    refresh_method: ``'power_qr'`` (the first basis a full ``eigh``) or
      ``'eigh'``.
    controller: ``'stale'``, ``'residual'``, ``'foam'``,
      ``'foam_fixed_damping'`` or ``'foam_no_refresh'``.
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
      stagger=stagger, statistics_compute_steps=statistics_compute_steps,
      refresh_batching=refresh_batching, skip_nonfinite=skip_nonfinite,
      max_consecutive_skips=max_consecutive_skips,
      mu_dtype=mu_dtype, second_moment_dtype=second_moment_dtype,
      factor_matrix_dtype=factor_matrix_dtype,
      factor_matrix_eigenvectors_dtype=factor_matrix_eigenvectors_dtype,
      weight_dimension_numbers=weight_dimension_numbers,
      proxy=proxy, proxy_probes=proxy_probes,
      rotation_basis=rotation_basis, first_step=first_step,
      tensor_shaping=tensor_shaping, merge_dims=merge_dims)))


def soap(
    learning_rate: ScalarOrSchedule,
    *,
    b1: float = 0.95,
    b2: float = 0.95,
    epsilon: float = 1e-8,
    check_frequency: int = 10,
    max_precond_dim: Optional[int] = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    rotation_basis: RotationBasis = "previous",
    first_step: FirstStep = "init_only",
    tensor_shaping: TensorShaping = "per_dimension",
    block_size: Optional[int] = None,
    start_preconditioning_step: int = 1,
    refresh_method: RefreshMethod = "power_qr",
    controller: Controller = "stale",
    controller_epsilon: float = 1e-9,
    max_epsilon: float = 3e-7,
    threshold: float = 0.75,
    exponent: float = 2,
    residual_tol: float = 0.1,
    stagger: bool = False,
    statistics_compute_steps: int = 1,
    refresh_batching: RefreshBatching = "map",
    skip_nonfinite: bool = True,
    max_consecutive_skips: Optional[int] = None,
    mu_dtype: Optional[Any] = None,
    second_moment_dtype: Optional[Any] = None,
    factor_matrix_dtype: Optional[Any] = None,
    factor_matrix_eigenvectors_dtype: Optional[Any] = None,
    weight_dimension_numbers: Optional[Any] = None,
    proxy: Proxy = "exact",
    proxy_probes: int = 16,
    weight_decay: float = 0.01,
    weight_decay_mask: MaskOrFn = None,
    decay_after_update: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """SOAP (`scale_by_soap`) with decoupled weight decay and learning rate.

  Non-finite gradients: a step with a NaN/Inf gradient is skipped whole
  (``skip_nonfinite``) and counted in ``fo.stats(state)['nonfinite_skips']``
  and ``['consecutive_skips']``; ``max_consecutive_skips=N`` stops the run
  with an error after N skips in a row. Under `optax.MultiSteps` pass
  ``should_skip_update_fn=optax.skip_not_finite``: otherwise one NaN
  micro-batch poisons its accumulator (NaN * 0 is NaN) and every later
  update is skipped.

  With its defaults, the official SOAP optimizer (``lr = learning_rate``)
  step for step: ``optax.chain(scale_by_soap(...),
  scale_by_learning_rate(learning_rate), decay_updated_weights(...))``, the
  weights decayed after the update, ``p ← (p - lr·u)(1 - lr·wd)``, and not
  on the first step, which only initialises.

  Args:
    learning_rate: a float or an optax schedule.
    weight_decay: decoupled weight decay (multiplied by the learning rate).
    weight_decay_mask: pytree of bools or a callable of the params choosing
      the leaves that decay; None decays all.
    decay_after_update: False decays before the learning rate instead, as
      optax's AdamW (``p ← p - lr·(u + wd·p)``, which differs by
      ``lr²·wd·u``), making the update linear in the learning rate.
    Others: as in `scale_by_soap`.

  Example:
    >>> import foam_optax as fo
    >>> opt = fo.soap(3e-3)
  """
  arguments = dict(locals())
  after = arguments.pop("decay_after_update")
  if not isinstance(after, bool):
    raise ValueError(f"decay_after_update must be a bool, got {after!r}.")
  return _alias(scale_by_soap, arguments, decay_after_update=after,
                skip_first_decay=first_step == "init_only")
