"""The optimizers' aliases and the `scale_by_*` transformations of the
Shampoo family other than `scale_by_foam`.

Each alias is ``optax.chain(scale_by_X(...), add_decayed_weights(wd, mask),
scale_by_learning_rate(lr))``, wrapped in `skip_nonfinite`. The signatures
are generated from the option table (`options`), explicit to `inspect`, so
that `optax.inject_hyperparams` can inject any numeric argument.
"""

import optax

from foam_optax._src import signatures
from foam_optax._src.skipping import skip_nonfinite
from foam_optax._src.transform import from_config, scale_by_foam
from foam_optax._src.weight_decay import decay_updated_weights


def _alias(optimizer, scale_by, arguments):
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
            skip_first_step=arguments.get("first_step") == "init_only"))
  else:
    chain = optax.chain(core, optax.add_decayed_weights(weight_decay, mask),
                        optax.scale_by_learning_rate(learning_rate))
  return skip_nonfinite(chain) if skip else chain


@signatures.optimizer_function("foam", alias=True)
def foam(**arguments) -> optax.GradientTransformationExtraArgs:
  """FOAM: Shampoo with adaptive damping and adaptive eigendecomposition.

  ``optax.chain(scale_by_foam(...), add_decayed_weights(weight_decay,
  weight_decay_mask), scale_by_learning_rate(learning_rate))``; the defaults
  are the FOAM paper's main configuration. See `scale_by_foam` for the
  update.

  Args:
    <<arguments>>

  Example:
    >>> import jax.numpy as jnp, foam_optax as fo
    >>> opt = fo.foam(1e-3, weight_decay=1e-4)
    >>> state = opt.init({'w': jnp.zeros((8, 4))})

  References:
    The FOAM paper, ICML 2026. arXiv:2606.02365.

    Gupta, Koren and Singer, Shampoo: Preconditioned Stochastic Tensor
    Optimization, ICML 2018. arXiv:1802.09568.
  """
  return _alias("foam", scale_by_foam, arguments)


@signatures.optimizer_function("shampoo")
def scale_by_shampoo(**arguments) -> optax.GradientTransformation:
  r"""Classic Shampoo with a fixed eigendecomposition frequency.

  The baseline FOAM improves on: every check step (every `check_frequency`
  steps) recomputes every factor's eigendecomposition and the damping stays
  `epsilon`. Same update as `scale_by_foam` with ``controller='stale'``;
  defaults match `scale_by_foam` so the two compare like for like (use
  ``exponent=4`` for the original Shampoo's ``-1/4`` root of matrices).

  Args:
    <<arguments>>

  Example:
    >>> import jax.numpy as jnp, foam_optax as fo
    >>> state = fo.scale_by_shampoo(check_frequency=100).init(jnp.zeros((4, 4)))

  References:
    Gupta, Koren and Singer, Shampoo: Preconditioned Stochastic Tensor
    Optimization, ICML 2018. arXiv:1802.09568.
  """
  return from_config(signatures.config_for("shampoo", arguments))


@signatures.optimizer_function("shampoo", alias=True)
def shampoo(**arguments) -> optax.GradientTransformationExtraArgs:
  """Stale Shampoo (`scale_by_shampoo`) with weight decay and learning rate.

  Args:
    <<arguments>>

  Example:
    >>> import foam_optax as fo
    >>> opt = fo.shampoo(1e-3, check_frequency=100)
  """
  return _alias("shampoo", scale_by_shampoo, arguments)


@signatures.optimizer_function("soap")
def scale_by_soap(**arguments) -> optax.GradientTransformation:
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
    <<arguments>>

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
  return from_config(signatures.config_for("soap", arguments))


@signatures.optimizer_function("soap", alias=True)
def soap(**arguments) -> optax.GradientTransformationExtraArgs:
  """SOAP (`scale_by_soap`) with decoupled weight decay and learning rate.

  With its defaults, the official SOAP optimizer (``lr = learning_rate``)
  step for step: ``optax.chain(scale_by_soap(...),
  scale_by_learning_rate(learning_rate), decay_updated_weights(...))``, the
  weights decayed after the update, ``p ← (p - lr·u)(1 - lr·wd)``, and not
  on the first step, which only initialises.

  Args:
    <<arguments>>

  Example:
    >>> import foam_optax as fo
    >>> opt = fo.soap(3e-3)
  """
  return _alias("soap", scale_by_soap, arguments)


@signatures.optimizer_function("asgo")
def scale_by_asgo(**arguments) -> optax.GradientTransformation:
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
  `fo.partition` reproduces (see the README).

  Args:
    <<arguments>>

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
  return from_config(signatures.config_for("asgo", arguments))


@signatures.optimizer_function("asgo", alias=True)
def asgo(**arguments) -> optax.GradientTransformationExtraArgs:
  """ASGO (`scale_by_asgo`) with decoupled weight decay and learning rate.

  ``p ← p·(1 - lr·wd) - lr·update``, as the official optimizer; its
  ``weight_decay`` default is the official 0.1.

  Args:
    <<arguments>>

  Example:
    >>> import optax, foam_optax as fo
    >>> # The official runs' routing: embeddings, vectors and biases to Adam.
    >>> opt = fo.partition(fo.asgo(1e-2),
    ...                    optax.adam(1e-2, b1=0.9, b2=0.95, eps=1e-8),
    ...                    bias_and_norm_pattern="bias", embedding_pattern="emb")
  """
  return _alias("asgo", scale_by_asgo, arguments)
