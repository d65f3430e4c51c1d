"""`scale_by_foam`: the core transformation behind every optimizer here.

Where each part of it lives: `initial_state` (init), `update` (the update's
checks, mesh handling and skipping), `leaves` (momentum, grafting, block
stacks in and directions out), `blocks` (per block class: the factor
pipeline of `factors` and `refresh`, then `preconditioners`), `tensors`
(per-dimension factors of tensor leaves).
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
