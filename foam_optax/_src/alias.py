"""The optimizers' aliases: `foam`, `shampoo`, `soap` and `asgo`.

Each alias is ``optax.chain(scale_by_X(...), add_decayed_weights(wd, mask),
scale_by_learning_rate(lr))``, wrapped in `skip_nonfinite`. The signatures
and the docstrings' argument lists are generated from the option table
(`options`) into this file by `signatures`: explicit to type checkers and
to `inspect`, so that `optax.inject_hyperparams` can inject any numeric
argument. Each body passes its arguments on as ``locals()``, which at its
first line are exactly the arguments.
"""

from typing import Any, Callable, Mapping, Optional

import optax

from foam_optax._src import first_step
from foam_optax._src import options
from foam_optax._src import signatures
from foam_optax._src.skipping import skip_nonfinite
from foam_optax._src.transform import scale_by_asgo, scale_by_foam
from foam_optax._src.transform import scale_by_shampoo, scale_by_soap
from foam_optax._src.weight_decay import decay_updated_weights


def _alias(optimizer: str,
           scale_by: Callable[..., optax.GradientTransformation],
           arguments: Mapping[str, Any]
           ) -> optax.GradientTransformationExtraArgs:
  """The alias of `scale_by` called with `arguments` (every argument)."""
  signatures.check_alias_arguments(optimizer, arguments)
  arguments = dict(arguments)
  learning_rate = arguments.pop("learning_rate")
  weight_decay = arguments.pop("weight_decay")
  mask = arguments.pop("weight_decay_mask")
  decay_after_update = arguments.pop("decay_after_update", False)
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
        decay_updated_weights(
            learning_rate, weight_decay, mask,
            skip_first_step=first_step.skips_first_decay(arguments)))
  else:
    chain = optax.chain(core, optax.add_decayed_weights(weight_decay, mask),
                        optax.scale_by_learning_rate(learning_rate))
  return skip_nonfinite(chain) if skip else chain


def decayed_alias(scale: optax.GradientTransformation,
                  learning_rate: optax.ScalarOrSchedule, weight_decay: float,
                  mask: options.MaskOrFn
                  ) -> optax.GradientTransformationExtraArgs:
  """``skip_nonfinite(chain(scale, add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(learning_rate)))``: the alias of a transformation
  outside the option table, its learning rate and weight decay checked."""
  signatures.check_learning_rate(learning_rate)
  options.ALIAS_BY_NAME["weight_decay"].validate("weight_decay", weight_decay)
  return skip_nonfinite(optax.chain(
      scale, optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate)))


@signatures.public
def foam(
    # Generated from options.py by `python -m foam_optax._src.readme_tables`.
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.95,
    b2: float = 0.995,
    epsilon: float = 1e-09,
    max_epsilon: float = 3e-07,
    threshold: float = 0.75,
    check_frequency: int = 20,
    exponent: float = 2,
    block_size: Optional[int] = 1024,
    max_precond_dim: Optional[int] = None,
    start_preconditioning_step: Optional[int] = None,
    grafting: options.Grafting = "adam",
    graft_b2: float = 0.995,
    graft_eps: float = 1e-09,
    graft_rms: float = 0.2,
    controller: options.Controller = "foam",
    residual_tol: float = 0.1,
    precondition_1d: bool = False,
    preconditioner: options.Preconditioner = "root_inverse",
    refresh_method: options.RefreshMethod = "eigh",
    stagger: bool = False,
    statistics_compute_steps: int = 1,
    one_sided: bool = False,
    refresh_batching: options.RefreshBatching = "map",
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
    root_method: options.RootMethod = "eigh",
    root_iterations: int = 10,
    bias_correction: options.BiasCorrection = "none",
    cross_fit_safeguard: bool = True,
    ema_bias_correction: bool = True,
    proxy: options.Proxy = "exact",
    proxy_probes: int = 16,
    root_damping: options.RootDamping = "controller",
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """FOAM: Shampoo with adaptive damping and adaptive eigendecomposition.

  ``optax.chain(scale_by_foam(...), add_decayed_weights(weight_decay,
  weight_decay_mask), scale_by_learning_rate(learning_rate))``; the defaults
  are the FOAM paper's main configuration. See `scale_by_foam` for the
  update.

  Args:
    learning_rate: a float or an optax schedule.
    b1: momentum decay (0 disables momentum).
    b2: decay of the factor statistics (and, in eigenvalue-corrected
      mode, of Adam's second moment, in the eigenbasis and for the
      leaves without a factor).
    epsilon: base damping ``ε0``.
    max_epsilon: damping cap ``ε_max``; beyond it a fresh basis is
      computed.
    threshold: ``τ``, the tolerated staleness proxy.
    check_frequency: ``f``, steps between checks of a factor.
    exponent: ``p`` of the inverse root ``(A + ε)^{-1/p}``; 2 as in the
      FOAM paper, 4 for classic Shampoo.
    block_size: largest block side; None for no blocking.
    max_precond_dim: a matrix side (SOAP: a dimension) longer than this
      gets no factor (identity); None for no limit.
    start_preconditioning_step: ``s0``, the first check step; before it
      only the grafting optimizer steps. None: ``check_frequency``.
    grafting: ``'adam'``, ``'rmsprop'``, ``'sgd'``, ``'rms'`` or
      ``'none'``: the optimizer whose per-block step norm the
      preconditioned direction takes (and that steps the leaves without
      a factor); ``'rms'`` gives every block the Frobenius norm
      ``graft_rms·√(m·n)`` (entries of RMS `graft_rms`), as ASGO.
    graft_b2: second-moment decay of the grafting optimizer
      (root-inverse mode; in eigenvalue-corrected mode Adam decays with
      `b2`).
    graft_eps: epsilon of the grafting optimizer; in
      eigenvalue-corrected mode, the epsilon of Adam in the eigenbasis.
    graft_rms: the RMS of each block's step with ``grafting='rms'``.
    controller: when bases are refreshed: ``'foam'``, ``'stale'`` (every
      check), ``'foam_fixed_damping'``, ``'foam_no_refresh'``,
      ``'residual'``, or any name given to
      `foam_optax.controllers.register`.
    residual_tol: relative off-diagonal tolerance of
      ``controller='residual'``.
    precondition_1d: precondition vectors as ``1 x n`` matrices.
    preconditioner: ``'root_inverse'`` (Shampoo) or
      ``'eigenvalue_corrected'`` (Adam in the eigenbasis, as SOAP;
      grafting then steps only the leaves without a factor).
    refresh_method: ``'eigh'`` or ``'power_qr'`` (one warm-started power
      step and QR, as SOAP; the first basis is always a full ``eigh``).
    stagger: spread later check steps of different factors over the
      check period (the first check stays at ``s0``), which flattens the
      cost of check steps but moves them off the schedule above; off by
      default, so the defaults run the paper's algorithm.
    statistics_compute_steps: add the gradient's Gram matrices to the
      statistics on steps ``1, 1 + k, 1 + 2k, ...`` only (Google's
      distributed Shampoo's option of that name), saving ``2 m² n``
      flops per ``m x n`` block on the other steps; the bias correction
      counts the accumulations. 1 (every step, the paper's) by default.
    one_sided: precondition each matrix on its smaller side only, the
      rows (the reduction axis) on a tie, as ASGO does; the other side's
      factor is the identity. SOAP's tensor leaves keep the factor of
      their smallest dimension.
    refresh_batching: ``'map'`` (one conditional per factor) or
      ``'bucket'`` (one conditional per stack of same-sized factors, a
      batched refresh; one device only).
    skip_nonfinite: skip the whole update (zero step, state kept,
      counted in ``fo.stats(state)['nonfinite_skips']`` and
      ``['consecutive_skips']``) when any gradient is NaN or infinite,
      or so large that the sum of its squares overflows the statistics'
      dtype. Under `optax.MultiSteps` pass
      ``should_skip_update_fn=optax.skip_not_finite``: otherwise one NaN
      micro-batch poisons its accumulator (NaN * 0 is NaN) and every
      later update is skipped.
    max_consecutive_skips: stop the run with an error once this many
      updates in a row have been skipped (a run whose every gradient is
      non-finite, e.g. an `optax.MultiSteps` accumulator holding a NaN,
      is stuck); None never stops. Under `jax.jit` the error is raised
      from a host callback and surfaces as a
      `jax.errors.JaxRuntimeError` naming the cause.
    mu_dtype: dtype the momentum is stored in; None (optax's
      convention): each parameter's dtype.
    second_moment_dtype: storage dtype of the grafting second moment
      (and of Adam's rotated second moment in eigenvalue-corrected
      mode); None: float32.
    factor_matrix_dtype: storage dtype of the factor statistics; None:
      float32.
    factor_matrix_eigenvectors_dtype: storage dtype of the cached
      eigenbases Q; None: float32.
    inv_factor_matrix_dtype: storage dtype of the cached inverse roots
      X; None: float32. All computations run in float32 (float64 with
      x64): the storage dtypes only cast on load and store.
    pseudo_inverse_rtol: None (the paper's configuration) or a relative
      tolerance: eigenvalues at most ``rtol`` times a factor's largest
      are treated as zero (weight 0 in X, a pseudo-inverse, as in Meta's
      Distributed Shampoo) instead of being amplified by up to
      ``ε^(-1/p)``.
    weight_dimension_numbers: None (the default reshaping), or as
      ``muon_weight_dimension_numbers`` of `optax.contrib.muon`: a
      pytree (a prefix of the parameters) of
      `optax.contrib.MuonDimensionNumbers` / `fo.DimensionNumbers`
      ``(reduction_axis, output_axis)`` or None per leaf, or a callable
      of the parameters returning one. The reduction axes form the
      matrix's rows, the output axes its columns, and every other axis
      is a batch axis whose slices get independent factors (stacked
      scanned layers, attention heads).
    cache_inverse_root: keep each factor's X = Q diag((D+ε)^(-1/p)) Qᵀ
      in the state (two products per block and step); False applies X
      through Q and D instead (four products) and saves one (m, m) array
      per factor.
    root_method: how the inverse roots X are computed: ``'eigh'``, from
      the cached eigendecomposition (which the controller decides when
      to refresh); or ``'polar_express'`` / ``'newton_schulz'``, ASGO's
      iterations of matrix products, recomputed at every refresh with no
      eigenbasis (for the ``'stale'`` controller and the exponent 2
      only).
    root_iterations: iterations of ``root_method='polar_express'`` or
      ``'newton_schulz'``.
    bias_correction: ``'cross_fit'``: from the per-microbatch gradients
      of each ``update(..., microbatch_grads=...)`` (see
      `fo.microbatch_grads`), the numerator (momentum) from the first
      half of the microbatches and the factor statistics (and Adam's
      second moment) from the second half, so that they are independent;
      ``'cross_fit_variance'`` also subtracts from each inverse-root
      weight the leading delta-method term of its Jensen bias, estimated
      from the spread of the second half's contributions along the fresh
      eigenbasis (root-inverse preconditioning with
      ``root_method='eigh'``); ``'none'``: neither. Needs 4 or more
      microbatches, an even number.
    cross_fit_safeguard: with ``bias_correction``, floor the held-out
      second moment a step divides by (the grafting optimizer's, or
      Adam's in the eigenbasis) at 1/8 of the pooled one's lower bound
      ``M̂² / (2 R_t²)``, ``R_t`` the largest ``|M̂| / √V̂`` Adam
      reaches, so that no cross-fitted ratio exceeds 4 times Adam's
      largest; False: the official algorithm. The official one divides
      by a second moment near zero in coordinates that the held-out
      microbatches leave at zero (rare inputs or tokens, ReLU units off
      on all their examples) and diverges there. Wherever the held-out
      second moment is at least 1/16 of the numerator half's, the floor
      is inactive and the step is the official one
      (`foam_optax._src.cross_fitting`).
    ema_bias_correction: divide the momentum and the factor statistics
      by ``1 - b^t``, their moving averages' bias correction; False uses
      the raw averages, as the official bias-corrected Shampoo does.
    proxy: how the FOAM controllers measure ``RC``: ``'exact'`` (the
      paper's, two m³ products per check) or ``'sketch'`` (an unbiased
      estimate of ``RC²`` from `proxy_probes` random sign vectors, three
      m×m mat-vecs per probe; the probes depend only on the step and the
      factor, so runs are reproducible).
    proxy_probes: number of probe vectors of ``proxy='sketch'``.
    root_damping: the damping the inverse roots X are built with:
      ``'controller'`` (the controller's, FOAM's adaptive one) or
      ``'epsilon'`` (always ``ε0``): an ablation that keeps the
      controller's refresh decisions, which still follow its damping,
      but takes the damping out of the preconditioner.
    weight_decay: decoupled weight decay (multiplied by the learning
      rate).
    weight_decay_mask: pytree of bools or a callable of the params
      choosing the leaves that decay; None decays all.

  Example:
    >>> import jax.numpy as jnp, foam_optax as fo
    >>> opt = fo.foam(1e-3, weight_decay=1e-4)
    >>> state = opt.init({'w': jnp.zeros((8, 4))})

  References:
    The FOAM paper, ICML 2026. arXiv:2606.02365.

    Gupta, Koren and Singer, Shampoo: Preconditioned Stochastic Tensor
    Optimization, ICML 2018. arXiv:1802.09568.
  """
  return _alias("foam", scale_by_foam, locals())


@signatures.public
def shampoo(
    # Generated from options.py by `python -m foam_optax._src.readme_tables`.
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.95,
    b2: float = 0.995,
    epsilon: float = 1e-09,
    check_frequency: int = 20,
    exponent: float = 2,
    block_size: Optional[int] = 1024,
    max_precond_dim: Optional[int] = None,
    start_preconditioning_step: Optional[int] = None,
    grafting: options.Grafting = "adam",
    graft_b2: float = 0.995,
    graft_eps: float = 1e-09,
    graft_rms: float = 0.2,
    precondition_1d: bool = False,
    stagger: bool = False,
    statistics_compute_steps: int = 1,
    one_sided: bool = False,
    refresh_batching: options.RefreshBatching = "map",
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
    root_method: options.RootMethod = "eigh",
    root_iterations: int = 10,
    bias_correction: options.BiasCorrection = "none",
    cross_fit_safeguard: bool = True,
    ema_bias_correction: bool = True,
    weight_decay: float = 0.0,
    weight_decay_mask: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """Stale Shampoo (`scale_by_shampoo`) with weight decay and learning rate.

  Args:
    learning_rate: a float or an optax schedule.
    b1: momentum decay (0 disables momentum).
    b2: decay of the factor statistics (and, in eigenvalue-corrected
      mode, of Adam's second moment, in the eigenbasis and for the
      leaves without a factor).
    epsilon: base damping ``ε0``.
    check_frequency: ``f``, steps between checks of a factor.
    exponent: ``p`` of the inverse root ``(A + ε)^{-1/p}``; 2 as in the
      FOAM paper, 4 for classic Shampoo.
    block_size: largest block side; None for no blocking.
    max_precond_dim: a matrix side (SOAP: a dimension) longer than this
      gets no factor (identity); None for no limit.
    start_preconditioning_step: ``s0``, the first check step; before it
      only the grafting optimizer steps. None: ``check_frequency``.
    grafting: ``'adam'``, ``'rmsprop'``, ``'sgd'``, ``'rms'`` or
      ``'none'``: the optimizer whose per-block step norm the
      preconditioned direction takes (and that steps the leaves without
      a factor); ``'rms'`` gives every block the Frobenius norm
      ``graft_rms·√(m·n)`` (entries of RMS `graft_rms`), as ASGO.
    graft_b2: second-moment decay of the grafting optimizer
      (root-inverse mode; in eigenvalue-corrected mode Adam decays with
      `b2`).
    graft_eps: epsilon of the grafting optimizer; in
      eigenvalue-corrected mode, the epsilon of Adam in the eigenbasis.
    graft_rms: the RMS of each block's step with ``grafting='rms'``.
    precondition_1d: precondition vectors as ``1 x n`` matrices.
    stagger: spread later check steps of different factors over the
      check period (the first check stays at ``s0``), which flattens the
      cost of check steps but moves them off the schedule above; off by
      default, so the defaults run the paper's algorithm.
    statistics_compute_steps: add the gradient's Gram matrices to the
      statistics on steps ``1, 1 + k, 1 + 2k, ...`` only (Google's
      distributed Shampoo's option of that name), saving ``2 m² n``
      flops per ``m x n`` block on the other steps; the bias correction
      counts the accumulations. 1 (every step, the paper's) by default.
    one_sided: precondition each matrix on its smaller side only, the
      rows (the reduction axis) on a tie, as ASGO does; the other side's
      factor is the identity. SOAP's tensor leaves keep the factor of
      their smallest dimension.
    refresh_batching: ``'map'`` (one conditional per factor) or
      ``'bucket'`` (one conditional per stack of same-sized factors, a
      batched refresh; one device only).
    skip_nonfinite: skip the whole update (zero step, state kept,
      counted in ``fo.stats(state)['nonfinite_skips']`` and
      ``['consecutive_skips']``) when any gradient is NaN or infinite,
      or so large that the sum of its squares overflows the statistics'
      dtype. Under `optax.MultiSteps` pass
      ``should_skip_update_fn=optax.skip_not_finite``: otherwise one NaN
      micro-batch poisons its accumulator (NaN * 0 is NaN) and every
      later update is skipped.
    max_consecutive_skips: stop the run with an error once this many
      updates in a row have been skipped (a run whose every gradient is
      non-finite, e.g. an `optax.MultiSteps` accumulator holding a NaN,
      is stuck); None never stops. Under `jax.jit` the error is raised
      from a host callback and surfaces as a
      `jax.errors.JaxRuntimeError` naming the cause.
    mu_dtype: dtype the momentum is stored in; None (optax's
      convention): each parameter's dtype.
    second_moment_dtype: storage dtype of the grafting second moment
      (and of Adam's rotated second moment in eigenvalue-corrected
      mode); None: float32.
    factor_matrix_dtype: storage dtype of the factor statistics; None:
      float32.
    factor_matrix_eigenvectors_dtype: storage dtype of the cached
      eigenbases Q; None: float32.
    inv_factor_matrix_dtype: storage dtype of the cached inverse roots
      X; None: float32. All computations run in float32 (float64 with
      x64): the storage dtypes only cast on load and store.
    pseudo_inverse_rtol: None (the paper's configuration) or a relative
      tolerance: eigenvalues at most ``rtol`` times a factor's largest
      are treated as zero (weight 0 in X, a pseudo-inverse, as in Meta's
      Distributed Shampoo) instead of being amplified by up to
      ``ε^(-1/p)``.
    weight_dimension_numbers: None (the default reshaping), or as
      ``muon_weight_dimension_numbers`` of `optax.contrib.muon`: a
      pytree (a prefix of the parameters) of
      `optax.contrib.MuonDimensionNumbers` / `fo.DimensionNumbers`
      ``(reduction_axis, output_axis)`` or None per leaf, or a callable
      of the parameters returning one. The reduction axes form the
      matrix's rows, the output axes its columns, and every other axis
      is a batch axis whose slices get independent factors (stacked
      scanned layers, attention heads).
    cache_inverse_root: keep each factor's X = Q diag((D+ε)^(-1/p)) Qᵀ
      in the state (two products per block and step); False applies X
      through Q and D instead (four products) and saves one (m, m) array
      per factor.
    root_method: how the inverse roots X are computed: ``'eigh'``, from
      the cached eigendecomposition (which the controller decides when
      to refresh); or ``'polar_express'`` / ``'newton_schulz'``, ASGO's
      iterations of matrix products, recomputed at every refresh with no
      eigenbasis (for the ``'stale'`` controller and the exponent 2
      only).
    root_iterations: iterations of ``root_method='polar_express'`` or
      ``'newton_schulz'``.
    bias_correction: ``'cross_fit'``: from the per-microbatch gradients
      of each ``update(..., microbatch_grads=...)`` (see
      `fo.microbatch_grads`), the numerator (momentum) from the first
      half of the microbatches and the factor statistics (and Adam's
      second moment) from the second half, so that they are independent;
      ``'cross_fit_variance'`` also subtracts from each inverse-root
      weight the leading delta-method term of its Jensen bias, estimated
      from the spread of the second half's contributions along the fresh
      eigenbasis (root-inverse preconditioning with
      ``root_method='eigh'``); ``'none'``: neither. Needs 4 or more
      microbatches, an even number.
    cross_fit_safeguard: with ``bias_correction``, floor the held-out
      second moment a step divides by (the grafting optimizer's, or
      Adam's in the eigenbasis) at 1/8 of the pooled one's lower bound
      ``M̂² / (2 R_t²)``, ``R_t`` the largest ``|M̂| / √V̂`` Adam
      reaches, so that no cross-fitted ratio exceeds 4 times Adam's
      largest; False: the official algorithm. The official one divides
      by a second moment near zero in coordinates that the held-out
      microbatches leave at zero (rare inputs or tokens, ReLU units off
      on all their examples) and diverges there. Wherever the held-out
      second moment is at least 1/16 of the numerator half's, the floor
      is inactive and the step is the official one
      (`foam_optax._src.cross_fitting`).
    ema_bias_correction: divide the momentum and the factor statistics
      by ``1 - b^t``, their moving averages' bias correction; False uses
      the raw averages, as the official bias-corrected Shampoo does.
    weight_decay: decoupled weight decay (multiplied by the learning
      rate).
    weight_decay_mask: pytree of bools or a callable of the params
      choosing the leaves that decay; None decays all.

  Example:
    >>> import foam_optax as fo
    >>> opt = fo.shampoo(1e-3, check_frequency=100)
  """
  return _alias("shampoo", scale_by_shampoo, locals())


@signatures.public
def soap(
    # Generated from options.py by `python -m foam_optax._src.readme_tables`.
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.95,
    b2: float = 0.95,
    epsilon: float = 1e-08,
    check_frequency: int = 10,
    max_precond_dim: Optional[int] = 10000,
    merge_dims: bool = False,
    precondition_1d: bool = False,
    one_sided: bool = False,
    rotation_basis: options.RotationBasis = "previous",
    first_step: options.FirstStep = "init_only",
    tensor_shaping: options.TensorShaping = "per_dimension",
    block_size: Optional[int] = None,
    start_preconditioning_step: Optional[int] = 1,
    refresh_method: options.RefreshMethod = "power_qr",
    controller: options.Controller = "stale",
    controller_epsilon: float = 1e-09,
    max_epsilon: float = 3e-07,
    threshold: float = 0.75,
    exponent: float = 2,
    residual_tol: float = 0.1,
    stagger: bool = False,
    statistics_compute_steps: int = 1,
    refresh_batching: options.RefreshBatching = "map",
    skip_nonfinite: bool = True,
    max_consecutive_skips: Optional[int] = None,
    mu_dtype: Optional[Any] = None,
    second_moment_dtype: Optional[Any] = None,
    factor_matrix_dtype: Optional[Any] = None,
    factor_matrix_eigenvectors_dtype: Optional[Any] = None,
    weight_dimension_numbers: Optional[Any] = None,
    proxy: options.Proxy = "exact",
    proxy_probes: int = 16,
    bias_correction: options.BiasCorrection = "none",
    cross_fit_safeguard: bool = True,
    weight_decay: float = 0.01,
    weight_decay_mask: Optional[Any] = None,
    decay_after_update: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """SOAP (`scale_by_soap`) with decoupled weight decay and learning rate.

  With its defaults, the official SOAP optimizer (``lr = learning_rate``)
  step for step: ``optax.chain(scale_by_soap(...),
  scale_by_learning_rate(learning_rate), decay_updated_weights(...))``, the
  weights decayed after the update, ``p ← (p - lr·u)(1 - lr·wd)``, and not
  on the first step, which only initialises.

  Args:
    learning_rate: a float or an optax schedule.
    b1: Adam's momentum decay.
    b2: Adam's second-moment decay, also the decay of the factor
      statistics.
    epsilon: Adam's epsilon in the eigenbasis.
    check_frequency: ``f``, steps between checks of a factor.
    max_precond_dim: a matrix side (SOAP: a dimension) longer than this
      gets no factor (identity); None for no limit.
    merge_dims: merge adjacent dimensions while their product stays
      within `max_precond_dim`, as the official ``merge_dims``.
    precondition_1d: precondition vectors as ``1 x n`` matrices.
    one_sided: precondition each matrix on its smaller side only, the
      rows (the reduction axis) on a tie, as ASGO does; the other side's
      factor is the identity. SOAP's tensor leaves keep the factor of
      their smallest dimension.
    rotation_basis: ``'previous'``: rotate the gradient with the bases
      of the previous statistics and update the factors after the step,
      as the official SOAP; ``'updated'``: update the statistics and
      refresh the bases first, as Meta's Distributed Shampoo.
    first_step: ``'init_only'``: the first gradient only builds the
      factors and their first bases and the update is zero, as the
      official SOAP (needs ``start_preconditioning_step=1``);
      ``'update'``: step from the first gradient.
    tensor_shaping: ``'per_dimension'``: a parameter of rank >= 3 gets
      one factor per dimension, as the official SOAP; ``'matrix'``: it
      is reshaped to a blocked matrix, as `scale_by_foam` does.
    block_size: largest block side; None for no blocking.
    start_preconditioning_step: ``s0``, the first check step; before it
      only the grafting optimizer steps. None: ``check_frequency``.
    refresh_method: ``'eigh'`` or ``'power_qr'`` (one warm-started power
      step and QR, as SOAP; the first basis is always a full ``eigh``).
    controller: when bases are refreshed: ``'foam'``, ``'stale'`` (every
      check), ``'foam_fixed_damping'``, ``'foam_no_refresh'``,
      ``'residual'``, or any name given to
      `foam_optax.controllers.register`.
    controller_epsilon: the FOAM controllers' base damping (not Adam's
      epsilon).
    max_epsilon: damping cap ``ε_max``; beyond it a fresh basis is
      computed.
    threshold: ``τ``, the tolerated staleness proxy.
    exponent: ``p`` of FOAM's staleness proxy ``h = RC·α/p`` (the
      inverse root whose error it bounds); used only by the FOAM
      controllers.
    residual_tol: relative off-diagonal tolerance of
      ``controller='residual'``.
    stagger: spread later check steps of different factors over the
      check period (the first check stays at ``s0``), which flattens the
      cost of check steps but moves them off the schedule above; off by
      default, so the defaults run the paper's algorithm.
    statistics_compute_steps: add the gradient's Gram matrices to the
      statistics on steps ``1, 1 + k, 1 + 2k, ...`` only (Google's
      distributed Shampoo's option of that name), saving ``2 m² n``
      flops per ``m x n`` block on the other steps; the bias correction
      counts the accumulations. 1 (every step, the paper's) by default.
    refresh_batching: ``'map'`` (one conditional per factor) or
      ``'bucket'`` (one conditional per stack of same-sized factors, a
      batched refresh; one device only).
    skip_nonfinite: skip the whole update (zero step, state kept,
      counted in ``fo.stats(state)['nonfinite_skips']`` and
      ``['consecutive_skips']``) when any gradient is NaN or infinite,
      or so large that the sum of its squares overflows the statistics'
      dtype. Under `optax.MultiSteps` pass
      ``should_skip_update_fn=optax.skip_not_finite``: otherwise one NaN
      micro-batch poisons its accumulator (NaN * 0 is NaN) and every
      later update is skipped.
    max_consecutive_skips: stop the run with an error once this many
      updates in a row have been skipped (a run whose every gradient is
      non-finite, e.g. an `optax.MultiSteps` accumulator holding a NaN,
      is stuck); None never stops. Under `jax.jit` the error is raised
      from a host callback and surfaces as a
      `jax.errors.JaxRuntimeError` naming the cause.
    mu_dtype: dtype the momentum is stored in; None (optax's
      convention): each parameter's dtype.
    second_moment_dtype: storage dtype of the grafting second moment
      (and of Adam's rotated second moment in eigenvalue-corrected
      mode); None: float32.
    factor_matrix_dtype: storage dtype of the factor statistics; None:
      float32.
    factor_matrix_eigenvectors_dtype: storage dtype of the cached
      eigenbases Q; None: float32.
    weight_dimension_numbers: None (the default reshaping), or as
      ``muon_weight_dimension_numbers`` of `optax.contrib.muon`: a
      pytree (a prefix of the parameters) of
      `optax.contrib.MuonDimensionNumbers` / `fo.DimensionNumbers`
      ``(reduction_axis, output_axis)`` or None per leaf, or a callable
      of the parameters returning one. The reduction axes form the
      matrix's rows, the output axes its columns, and every other axis
      is a batch axis whose slices get independent factors (stacked
      scanned layers, attention heads).
    proxy: how the FOAM controllers measure ``RC``: ``'exact'`` (the
      paper's, two m³ products per check) or ``'sketch'`` (an unbiased
      estimate of ``RC²`` from `proxy_probes` random sign vectors, three
      m×m mat-vecs per probe; the probes depend only on the step and the
      factor, so runs are reproducible).
    proxy_probes: number of probe vectors of ``proxy='sketch'``.
    bias_correction: ``'cross_fit'``: from the per-microbatch gradients
      of each ``update(..., microbatch_grads=...)`` (see
      `fo.microbatch_grads`), the numerator (momentum) from the first
      half of the microbatches and the factor statistics (and Adam's
      second moment) from the second half, so that they are independent;
      ``'cross_fit_variance'`` also subtracts from each inverse-root
      weight the leading delta-method term of its Jensen bias, estimated
      from the spread of the second half's contributions along the fresh
      eigenbasis (root-inverse preconditioning with
      ``root_method='eigh'``); ``'none'``: neither. Needs 4 or more
      microbatches, an even number.
    cross_fit_safeguard: with ``bias_correction``, floor the held-out
      second moment a step divides by (the grafting optimizer's, or
      Adam's in the eigenbasis) at 1/8 of the pooled one's lower bound
      ``M̂² / (2 R_t²)``, ``R_t`` the largest ``|M̂| / √V̂`` Adam
      reaches, so that no cross-fitted ratio exceeds 4 times Adam's
      largest; False: the official algorithm. The official one divides
      by a second moment near zero in coordinates that the held-out
      microbatches leave at zero (rare inputs or tokens, ReLU units off
      on all their examples) and diverges there. Wherever the held-out
      second moment is at least 1/16 of the numerator half's, the floor
      is inactive and the step is the official one
      (`foam_optax._src.cross_fitting`).
    weight_decay: decoupled weight decay (multiplied by the learning
      rate).
    weight_decay_mask: pytree of bools or a callable of the params
      choosing the leaves that decay; None decays all.
    decay_after_update: decay the weights after the update, ``p ← (p -
      lr·u)(1 - lr·wd)``, as the official SOAP; False decays before the
      learning rate instead, as optax's AdamW (``p ← p - lr·(u +
      wd·p)``), making the update linear in the learning rate.

  Example:
    >>> import foam_optax as fo
    >>> opt = fo.soap(3e-3)
  """
  return _alias("soap", scale_by_soap, locals())


@signatures.public
def asgo(
    # Generated from options.py by `python -m foam_optax._src.readme_tables`.
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.8,
    epsilon: float = 1e-10,
    root_method: options.RootMethod = "polar_express",
    root_iterations: int = 10,
    graft_rms: float = 0.2,
    controller: options.Controller = "stale",
    max_epsilon: float = 3e-07,
    threshold: float = 0.75,
    check_frequency: int = 1,
    start_preconditioning_step: Optional[int] = 1,
    block_size: Optional[int] = None,
    max_precond_dim: Optional[int] = None,
    residual_tol: float = 0.1,
    stagger: bool = False,
    statistics_compute_steps: int = 1,
    refresh_batching: options.RefreshBatching = "map",
    skip_nonfinite: bool = True,
    max_consecutive_skips: Optional[int] = None,
    mu_dtype: Optional[Any] = None,
    factor_matrix_dtype: Optional[Any] = None,
    factor_matrix_eigenvectors_dtype: Optional[Any] = None,
    inv_factor_matrix_dtype: Optional[Any] = None,
    pseudo_inverse_rtol: Optional[float] = None,
    weight_dimension_numbers: Optional[Any] = None,
    proxy: options.Proxy = "exact",
    proxy_probes: int = 16,
    weight_decay: float = 0.1,
    weight_decay_mask: Optional[Any] = None,
) -> optax.GradientTransformationExtraArgs:
  """ASGO (`scale_by_asgo`) with decoupled weight decay and learning rate.

  ``p ← p·(1 - lr·wd) - lr·update``, as the official optimizer; its
  ``weight_decay`` default is the official 0.1.

  Args:
    learning_rate: a float or an optax schedule.
    b1: momentum decay (0 disables momentum).
    b2: decay of the factor statistics (and, in eigenvalue-corrected
      mode, of Adam's second moment, in the eigenbasis and for the
      leaves without a factor).
    epsilon: ``ε``: with the iterative roots, the ``εI`` in their
      normalisation ``1.01·‖V + εI‖_F`` (ASGO's ``eps``); with
      ``root_method='eigh'``, the base damping ``ε0`` of ``(V +
      ε)^{-1/2}``.
    root_method: how the inverse roots X are computed: ``'eigh'``, from
      the cached eigendecomposition (which the controller decides when
      to refresh); or ``'polar_express'`` / ``'newton_schulz'``, ASGO's
      iterations of matrix products, recomputed at every refresh with no
      eigenbasis (for the ``'stale'`` controller and the exponent 2
      only).
    root_iterations: iterations of ``root_method='polar_express'`` or
      ``'newton_schulz'``.
    graft_rms: the RMS of each matrix's step: ‖U‖_F = graft_rms·√(m·n).
    controller: when bases are refreshed: ``'foam'``, ``'stale'`` (every
      check), ``'foam_fixed_damping'``, ``'foam_no_refresh'``,
      ``'residual'``, or any name given to
      `foam_optax.controllers.register`.
    max_epsilon: damping cap ``ε_max``; beyond it a fresh basis is
      computed.
    threshold: ``τ``, the tolerated staleness proxy.
    check_frequency: ``f``, steps between checks of a factor.
    start_preconditioning_step: ``s0``, the first check step; before it
      only the grafting optimizer steps. None: ``check_frequency``.
    block_size: largest block side; None for no blocking.
    max_precond_dim: a matrix side (SOAP: a dimension) longer than this
      gets no factor (identity); None for no limit.
    residual_tol: relative off-diagonal tolerance of
      ``controller='residual'``.
    stagger: spread later check steps of different factors over the
      check period (the first check stays at ``s0``), which flattens the
      cost of check steps but moves them off the schedule above; off by
      default, so the defaults run the paper's algorithm.
    statistics_compute_steps: add the gradient's Gram matrices to the
      statistics on steps ``1, 1 + k, 1 + 2k, ...`` only (Google's
      distributed Shampoo's option of that name), saving ``2 m² n``
      flops per ``m x n`` block on the other steps; the bias correction
      counts the accumulations. 1 (every step, the paper's) by default.
    refresh_batching: ``'map'`` (one conditional per factor) or
      ``'bucket'`` (one conditional per stack of same-sized factors, a
      batched refresh; one device only).
    skip_nonfinite: skip the whole update (zero step, state kept,
      counted in ``fo.stats(state)['nonfinite_skips']`` and
      ``['consecutive_skips']``) when any gradient is NaN or infinite,
      or so large that the sum of its squares overflows the statistics'
      dtype. Under `optax.MultiSteps` pass
      ``should_skip_update_fn=optax.skip_not_finite``: otherwise one NaN
      micro-batch poisons its accumulator (NaN * 0 is NaN) and every
      later update is skipped.
    max_consecutive_skips: stop the run with an error once this many
      updates in a row have been skipped (a run whose every gradient is
      non-finite, e.g. an `optax.MultiSteps` accumulator holding a NaN,
      is stuck); None never stops. Under `jax.jit` the error is raised
      from a host callback and surfaces as a
      `jax.errors.JaxRuntimeError` naming the cause.
    mu_dtype: dtype the momentum is stored in; None (optax's
      convention): each parameter's dtype.
    factor_matrix_dtype: storage dtype of the factor statistics; None:
      float32.
    factor_matrix_eigenvectors_dtype: storage dtype of the cached
      eigenbases Q; None: float32.
    inv_factor_matrix_dtype: storage dtype of the cached inverse roots
      X; None: float32. All computations run in float32 (float64 with
      x64): the storage dtypes only cast on load and store.
    pseudo_inverse_rtol: None (the paper's configuration) or a relative
      tolerance: eigenvalues at most ``rtol`` times a factor's largest
      are treated as zero (weight 0 in X, a pseudo-inverse, as in Meta's
      Distributed Shampoo) instead of being amplified by up to
      ``ε^(-1/p)``.
    weight_dimension_numbers: None (the default reshaping), or as
      ``muon_weight_dimension_numbers`` of `optax.contrib.muon`: a
      pytree (a prefix of the parameters) of
      `optax.contrib.MuonDimensionNumbers` / `fo.DimensionNumbers`
      ``(reduction_axis, output_axis)`` or None per leaf, or a callable
      of the parameters returning one. The reduction axes form the
      matrix's rows, the output axes its columns, and every other axis
      is a batch axis whose slices get independent factors (stacked
      scanned layers, attention heads).
    proxy: how the FOAM controllers measure ``RC``: ``'exact'`` (the
      paper's, two m³ products per check) or ``'sketch'`` (an unbiased
      estimate of ``RC²`` from `proxy_probes` random sign vectors, three
      m×m mat-vecs per probe; the probes depend only on the step and the
      factor, so runs are reproducible).
    proxy_probes: number of probe vectors of ``proxy='sketch'``.
    weight_decay: decoupled weight decay (multiplied by the learning
      rate).
    weight_decay_mask: pytree of bools or a callable of the params
      choosing the leaves that decay; None decays all.

  Example:
    >>> import optax, foam_optax as fo
    >>> # The official runs' routing: embeddings, vectors and biases to Adam.
    >>> opt = fo.partition(fo.asgo(1e-2),
    ...                    optax.adam(1e-2, b1=0.9, b2=0.95, eps=1e-8),
    ...                    bias_and_norm_pattern="bias", embedding_pattern="emb")
  """
  return _alias("asgo", scale_by_asgo, locals())
