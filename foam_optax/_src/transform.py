"""The `scale_by_*` transformations of the Shampoo family: `scale_by_foam`,
and `scale_by_shampoo`, `scale_by_soap` and `scale_by_asgo`, each the core
transformation (`from_config`) with its own defaults.

Their signatures and the docstrings' argument lists are generated from the
option table (`options`) into this file by `signatures`. Each body passes
its arguments on as ``locals()``, which at its first line are exactly the
arguments.

Where each part of the core transformation lives: `initial_state` (init),
`step` (the update: its checks, mesh handling and skipping; momentum,
grafting, block stacks in and directions out), `blocks` (per block class:
the factor pipeline of `factors` and `refresh`, then `preconditioners`),
`per_dimension` (per-dimension factors of tensor leaves). `layout` says how
each parameter is cut into blocks, `mesh` how the blocks are divided among
devices, `state` what the state holds.
"""

from typing import Any, Optional

import optax

from foam_optax._src import initial_state
from foam_optax._src import options
from foam_optax._src import signatures
from foam_optax._src import step
from foam_optax._src.config import Config


@signatures.public
def scale_by_foam(
    # Generated from options.py by `python -m foam_optax._src.readme_tables`.
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
) -> optax.GradientTransformation:
  r"""Shampoo-family preconditioning with FOAM's adaptive damping and refresh.

  For each block ``G`` (``m x n``) of each parameter, with ``t`` the 1-based
  step:

  .. math::

    L_t = b_2 L_{t-1} + (1-b_2) G G^\top, \quad
    R_t = b_2 R_{t-1} + (1-b_2) G^\top G, \quad
    A_t = L_t / (1 - b_2^t)

    M_t = (b_1 M_{t-1} + (1-b_1) G_t) / (1 - b_1^t), \qquad
    P_t = X_L M_t X_R, \quad X = Q\,\mathrm{diag}((D+\varepsilon)^{-1/p})\,Q^\top

  ``(Q, D)`` is a cached eigendecomposition of each factor and ``ε`` its
  damping. On a check step (``t == s0`` or ``t % f == 0``), FOAM measures the
  staleness of ``Q`` with ``h = ‖(QᵀA_tQ − D) ⊘ √(SSᵀ)‖_F · α / p``
  (``S = D + ε``, ``α = max(w)/‖w‖₂``, ``w = S^{-1/p}``), proposes
  ``ε_n = max(ε0, ε·h/τ)``, and recomputes ``eigh(A_t)`` only when ``ε_n``
  would exceed ``max_epsilon``. Each block's step gets the norm of a grafted
  Adam step. Under `jax.jit` the skipped eigendecompositions are not executed.

  Args:
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

  Returns:
    An `optax.GradientTransformation` producing the preconditioned direction
    (no learning rate, no sign flip), in each parameter's dtype. A state
    initialised under a device mesh (``jax.set_mesh``, or parameters sharded
    on it) divides the factors among the devices: see `state_sharding`.

  Example:
    >>> import jax.numpy as jnp, optax, foam_optax as fo
    >>> tx = optax.chain(fo.scale_by_foam(), optax.scale_by_learning_rate(1e-3))
    >>> state = tx.init({'w': jnp.ones((4, 3))})

  References:
    The FOAM paper, ICML 2026: frequency and operator-error based adaptive
    damping for Shampoo. arXiv:2606.02365.

    Gupta, Koren and Singer, Shampoo: Preconditioned Stochastic Tensor
    Optimization, ICML 2018. arXiv:1802.09568.

    Anil, Gupta, Koren, Regan and Singer, Scalable Second Order Optimization
    for Deep Learning, 2020. arXiv:2002.09018.

    Shi et al., A Distributed Data-Parallel PyTorch Implementation of the
    Distributed Shampoo Optimizer for Training Neural Networks At-Scale,
    2023. arXiv:2309.06497 (storage dtypes, pseudo-inverse).
  """
  return from_config(signatures.config_for("foam", locals()))


@signatures.public
def scale_by_shampoo(
    # Generated from options.py by `python -m foam_optax._src.readme_tables`.
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
) -> optax.GradientTransformation:
  r"""Classic Shampoo with a fixed eigendecomposition frequency.

  The baseline FOAM improves on: every check step (every `check_frequency`
  steps) recomputes every factor's eigendecomposition and the damping stays
  `epsilon`. Same update as `scale_by_foam` with ``controller='stale'``;
  defaults match `scale_by_foam` so the two compare like for like (use
  ``exponent=4`` for the original Shampoo's ``-1/4`` root of matrices).

  Args:
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

  Example:
    >>> import jax.numpy as jnp, foam_optax as fo
    >>> state = fo.scale_by_shampoo(check_frequency=100).init(jnp.zeros((4, 4)))

  References:
    Gupta, Koren and Singer, Shampoo: Preconditioned Stochastic Tensor
    Optimization, ICML 2018. arXiv:1802.09568.
  """
  return from_config(signatures.config_for("shampoo", locals()))


@signatures.public
def scale_by_soap(
    # Generated from options.py by `python -m foam_optax._src.readme_tables`.
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
  basis change) up to round-off. ``controller`` chooses which check steps
  refresh: ``'stale'`` (all, SOAP), ``'residual'`` (Purifying Shampoo's
  tolerance) or ``'foam'`` (FOAM's staleness proxy applied to the
  eigenbasis, with its own damping ``controller_epsilon``..``max_epsilon``
  and ``threshold``).

  Args:
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
  return from_config(signatures.config_for("soap", locals()))


@signatures.public
def scale_by_asgo(
    # Generated from options.py by `python -m foam_optax._src.readme_tables`.
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
) -> optax.GradientTransformation:
  r"""ASGO: one-sided structured preconditioning of each weight matrix.

  For each matrix gradient ``G`` (``m x n``, preconditioned on its smaller
  side; on the rows, the reduction axis, when ``m <= n``):

  .. math::

    M_t = b_1 M_{t-1} + (1-b_1) G_t, \quad
    V_t = b_2 V_{t-1} + (1-b_2) G_t G_t^\top, \quad
    U_t = V_t^{-1/2} M_t, \quad
    \mathrm{update} = U_t \cdot \frac{r\sqrt{mn}}{\|U_t\|_F}

  (``GᵀG`` and ``M_t V_t^{-1/2}`` for the columns), with ``r = graft_rms``.
  With its defaults this is the official ASGO (infinity-stars/ASGO at
  d3ef14b, ``optimizers/asgo.py``) step for step: ``V^{-1/2}`` by 10 steps
  of the Polar Express iteration, recomputed every step, with the official
  ``eps`` and decays; the tests compare it with a float64 port of that
  code. (The bias corrections of ``M`` and ``V`` that this library applies
  are scalars that the rescaling removes.) Where the root is not finite, the
  official code's identity fallback is taken and counted in
  ``fo.stats(state)['eigendecomposition_failures']``; a zero statistic
  (dead units) gives a zero step, never NaN.

  The factor goes through the library's factor pipeline, so FOAM's control
  is one argument away: ``root_method='eigh', controller='foam'`` keeps a
  cached eigenbasis of ``V`` and refreshes it only when FOAM's staleness
  proxy asks, with its adaptive damping (set ``check_frequency``, e.g. 20).
  Vectors and scalars get their momentum rescaled to RMS `graft_rms`; the
  official runs train them (and embeddings) with Adam instead, which
  `fo.partition` reproduces (see docs/reproduction.md).

  Args:
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

  Example:
    >>> import optax, foam_optax as fo
    >>> tx = optax.chain(fo.scale_by_asgo(root_method='eigh',
    ...                                   controller='foam',
    ...                                   check_frequency=20),
    ...                  optax.scale_by_learning_rate(1e-2))

  References:
    An, Liu, Pan, Ren, Ma, Goldfarb and Zhang, ASGO: Adaptive Structured
    Gradient Optimization, NeurIPS 2025. arXiv:2503.20762.

    Amsel, Persson, Musco and Gower, The Polar Express: Optimal Matrix Sign
    Methods and Their Application to the Muon Algorithm, 2025.
    arXiv:2505.16932.
  """
  return from_config(signatures.config_for("asgo", locals()))


def from_config(cfg: Config) -> optax.GradientTransformation:
  """The transformation for an already validated `Config`."""

  # Typed Any: optax's OptState (a tree of arrays) does not cover the static
  # layouts and plan that ScaleByFoamState holds.
  def init_fn(params) -> Any:
    return initial_state.init(params, cfg)

  def update_fn(updates, state, params=None, *, microbatch_grads=None,
                **extra_args) -> tuple[Any, Any]:
    del extra_args   # optax's convention: the chain's others, unused here
    return step.update(updates, state, cfg, params, microbatch_grads)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
