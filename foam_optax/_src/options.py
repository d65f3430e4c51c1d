"""Every option of the optimizers, written once.

Each `Option` gives a name (the `Config` field), its type, its default, its
documentation, its check and whether it decides the state's shapes
(``static``: it cannot be traced by `optax.inject_hyperparams`). An optimizer
may expose an option under another name or with a default of its own.
`EXPOSED` lists, per optimizer, the options its functions take, in order;
`FIXED` the options it sets itself. From these `config` derives `Config`
and its validation, and `signatures` the functions' signatures, their
docstrings' argument lists and the README's tables.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, Mapping, Optional

import optax

from foam_optax._src import controllers
from foam_optax._src import validation

Grafting = Literal["adam", "rmsprop", "sgd", "rms", "none"]
Preconditioner = Literal["root_inverse", "eigenvalue_corrected"]
RefreshMethod = Literal["eigh", "power_qr"]
RefreshBatching = Literal["map", "bucket"]
Proxy = Literal["exact", "sketch"]
RotationBasis = Literal["updated", "previous"]
FirstStep = Literal["update", "init_only"]
TensorShaping = Literal["matrix", "per_dimension"]
RootDamping = Literal["controller", "epsilon"]
RootMethod = Literal["eigh", "polar_express", "newton_schulz"]
BiasCorrection = Literal["none", "cross_fit", "cross_fit_variance"]
Controller = controllers.Controller
MaskOrFn = Optional[Any]

@dataclasses.dataclass(frozen=True)
class Option:
  """One option: see the module docstring."""

  name: str
  annotation: Any
  default: Any
  doc: str
  check: Optional[Callable[[str, Any], None]] = None
  static: bool = False
  # Per optimizer: its name for the option, its default, its documentation.
  public: Mapping[str, str] = dataclasses.field(default_factory=dict)
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  docs: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def public_name(self, optimizer: str) -> str:
    return self.public.get(optimizer, self.name)

  def default_for(self, optimizer: str):
    return self.defaults.get(optimizer, self.default)

  def doc_for(self, optimizer: str) -> str:
    return self.docs.get(optimizer, self.doc)

  def validate(self, name: str, value) -> None:
    """Raises the check's ValueError, naming `name`, if `value` is invalid."""
    if self.check is not None:
      self.check(name, value)


def _literal(annotation) -> Callable:
  return validation.choice(annotation.__args__)


_UNIT = validation.in_range(0.0, 1.0, high_open=True)
_POSITIVE = validation.in_range(0.0, math.inf, low_open=True)
_NON_NEGATIVE = validation.in_range(0.0, math.inf)

OPTIONS = (
    Option("b1", float, 0.95, "momentum decay (0 disables momentum).", _UNIT,
           defaults={"asgo": 0.9}, docs={"soap": "Adam's momentum decay."}),
    Option("b2", float, 0.995,
           "decay of the factor statistics (and, in eigenvalue-corrected "
           "mode, of Adam's second moment, in the eigenbasis and for the "
           "leaves without a factor).", _UNIT,
           defaults={"soap": 0.95, "asgo": 0.8},
           docs={"soap": "Adam's second-moment decay, also the decay of the "
                         "factor statistics."}),
    Option("epsilon", float, 1e-9, "base damping ``ε0``.", _POSITIVE,
           public={"soap": "controller_epsilon"}, defaults={"asgo": 1e-10},
           docs={"soap": "the FOAM controllers' base damping (not Adam's "
                         "epsilon).",
                 "asgo": "``ε``: with the iterative roots, the ``εI`` in "
                         "their normalisation ``1.01·‖V + εI‖_F`` (ASGO's "
                         "``eps``); with ``root_method='eigh'``, the base "
                         "damping ``ε0`` of ``(V + ε)^{-1/2}``."}),
    Option("max_epsilon", float, 3e-7,
           "damping cap ``ε_max``; beyond it a fresh basis is computed.",
           _POSITIVE),
    Option("threshold", float, 0.75, "``τ``, the tolerated staleness proxy.",
           _POSITIVE),
    Option("check_frequency", int, 20,
           "``f``, steps between checks of a factor.", validation.integer(1),
           defaults={"soap": 10, "asgo": 1}),
    Option("exponent", float, 2,
           "``p`` of the inverse root ``(A + ε)^{-1/p}``; 2 as in the FOAM "
           "paper, 4 for classic Shampoo.", _POSITIVE,
           docs={"soap": "``p`` of FOAM's staleness proxy ``h = RC·α/p`` "
                         "(the inverse root whose error it bounds); used "
                         "only by the FOAM controllers."}),
    Option("block_size", Optional[int], 1024,
           "largest block side; None for no blocking.",
           validation.integer(1, allow_none=True), static=True,
           defaults={"soap": None, "asgo": None}),
    Option("max_precond_dim", Optional[int], None,
           "a matrix side (SOAP: a dimension) longer than this gets no "
           "factor (identity); None for no limit.",
           validation.integer(1, allow_none=True), static=True,
           defaults={"soap": 10000}),
    Option("merge_dims", bool, False,
           "merge adjacent dimensions while their product stays within "
           "`max_precond_dim`, as the official ``merge_dims``.",
           validation.boolean, static=True),
    Option("one_sided", bool, False,
           "precondition each matrix on its smaller side only, the rows "
           "(the reduction axis) on a tie, as ASGO does; the other side's "
           "factor is the identity. SOAP's tensor leaves keep the factor of "
           "their smallest dimension.", validation.boolean, static=True),
    Option("precondition_1d", bool, False,
           "precondition vectors as ``1 x n`` matrices.", validation.boolean,
           static=True),
    Option("rotation_basis", RotationBasis, "updated",
           "``'previous'``: rotate the gradient with the bases of the "
           "previous statistics and update the factors after the step, as "
           "the official SOAP; ``'updated'``: update the statistics and "
           "refresh the bases first, as Meta's Distributed Shampoo.",
           _literal(RotationBasis), defaults={"soap": "previous"}),
    Option("first_step", FirstStep, "update",
           "``'init_only'``: the first gradient only builds the factors and "
           "their first bases and the update is zero, as the official SOAP "
           "(needs ``start_preconditioning_step=1``); ``'update'``: step "
           "from the first gradient.", _literal(FirstStep),
           defaults={"soap": "init_only"}),
    Option("tensor_shaping", TensorShaping, "matrix",
           "``'per_dimension'``: a parameter of rank >= 3 gets one factor "
           "per dimension, as the official SOAP; ``'matrix'``: it is "
           "reshaped to a blocked matrix, as `scale_by_foam` does.",
           _literal(TensorShaping), static=True,
           defaults={"soap": "per_dimension"}),
    Option("start_preconditioning_step", Optional[int], None,
           "``s0``, the first check step; before it only the grafting "
           "optimizer steps. None: ``check_frequency``.",
           validation.integer(1, allow_none=True),
           defaults={"soap": 1, "asgo": 1}),
    Option("grafting", Grafting, "adam",
           "``'adam'``, ``'rmsprop'``, ``'sgd'``, ``'rms'`` or ``'none'``: "
           "the optimizer whose per-block step norm the preconditioned "
           "direction takes (and that steps the leaves without a factor); "
           "``'rms'`` gives every block the Frobenius norm "
           "``graft_rms·√(m·n)`` (entries of RMS `graft_rms`), as ASGO.",
           _literal(Grafting)),
    Option("graft_rms", float, 0.2,
           "the RMS of each block's step with ``grafting='rms'``.", _POSITIVE,
           docs={"asgo": "the RMS of each matrix's step: ‖U‖_F = "
                         "graft_rms·√(m·n)."}),
    Option("graft_b2", float, 0.995,
           "second-moment decay of the grafting optimizer (root-inverse "
           "mode; in eigenvalue-corrected mode Adam decays with `b2`).",
           _UNIT),
    Option("adam_eps", float, 1e-9,
           "epsilon of the grafting optimizer; in eigenvalue-corrected mode, "
           "the epsilon of Adam in the eigenbasis.", _NON_NEGATIVE,
           public={"foam": "graft_eps", "shampoo": "graft_eps",
                   "soap": "epsilon"},
           defaults={"soap": 1e-8},
           docs={"soap": "Adam's epsilon in the eigenbasis."}),
    Option("controller", Controller, "foam",
           "when bases are refreshed: ``'foam'``, ``'stale'`` (every "
           "check), ``'foam_fixed_damping'``, ``'foam_no_refresh'``, "
           "``'residual'``, or any name given to "
           "`foam_optax.controllers.register`.",
           validation.choice(lambda: controllers.CONTROLLERS),
           defaults={"soap": "stale", "asgo": "stale"}),
    Option("residual_tol", float, 0.1,
           "relative off-diagonal tolerance of ``controller='residual'``.",
           validation.in_range(0.0, 1.0)),
    Option("preconditioner", Preconditioner, "root_inverse",
           "``'root_inverse'`` (Shampoo) or ``'eigenvalue_corrected'`` (Adam "
           "in the eigenbasis, as SOAP; grafting then steps only the leaves "
           "without a factor).", _literal(Preconditioner)),
    Option("refresh_method", RefreshMethod, "eigh",
           "``'eigh'`` or ``'power_qr'`` (one warm-started power step and "
           "QR, as SOAP; the first basis is always a full ``eigh``).",
           _literal(RefreshMethod), defaults={"soap": "power_qr"}),
    Option("stagger", bool, False,
           "spread later check steps of different factors over the check "
           "period (the first check stays at ``s0``), which flattens the "
           "cost of check steps but moves them off the schedule above; off "
           "by default, so the defaults run the paper's algorithm.",
           validation.boolean),
    Option("statistics_compute_steps", int, 1,
           "add the gradient's Gram matrices to the statistics on steps "
           "``1, 1 + k, 1 + 2k, ...`` only (Google's distributed Shampoo's "
           "option of that name), saving ``2 m² n`` flops per ``m x n`` "
           "block on the other steps; the bias correction counts the "
           "accumulations. 1 (every step, the paper's) by default.",
           validation.integer(1)),
    Option("refresh_batching", RefreshBatching, "map",
           "``'map'`` (one conditional per factor) or ``'bucket'`` (one "
           "conditional per stack of same-sized factors, a batched refresh; "
           "one device only).", _literal(RefreshBatching)),
    Option("skip_nonfinite", bool, True,
           "skip the whole update (zero step, state kept, counted in "
           "``fo.stats(state)['nonfinite_skips']`` and "
           "``['consecutive_skips']``) when any gradient is NaN or infinite, "
           "or so large that the sum of its squares overflows the "
           "statistics' dtype. Under `optax.MultiSteps` pass "
           "``should_skip_update_fn=optax.skip_not_finite``: otherwise one "
           "NaN micro-batch poisons its accumulator (NaN * 0 is NaN) and "
           "every later update is skipped.", validation.boolean),
    Option("max_consecutive_skips", Optional[int], None,
           "stop the run with an error once this many updates in a row have "
           "been skipped (a run whose every gradient is non-finite, e.g. an "
           "`optax.MultiSteps` accumulator holding a NaN, is stuck); None "
           "never stops. Under `jax.jit` the error is raised from a host "
           "callback and surfaces as a `jax.errors.JaxRuntimeError` naming "
           "the cause.", validation.integer(1, allow_none=True)),
    Option("mu_dtype", Optional[Any], None,
           "dtype the momentum is stored in; None (optax's convention): each "
           "parameter's dtype.", validation.floating_dtype, static=True),
    Option("second_moment_dtype", Optional[Any], None,
           "storage dtype of the grafting second moment (and of Adam's "
           "rotated second moment in eigenvalue-corrected mode); None: "
           "float32.", validation.floating_dtype, static=True),
    Option("factor_matrix_dtype", Optional[Any], None,
           "storage dtype of the factor statistics; None: float32.",
           validation.floating_dtype, static=True),
    Option("factor_matrix_eigenvectors_dtype", Optional[Any], None,
           "storage dtype of the cached eigenbases Q; None: float32.",
           validation.floating_dtype, static=True),
    Option("inv_factor_matrix_dtype", Optional[Any], None,
           "storage dtype of the cached inverse roots X; None: float32. All "
           "computations run in float32 (float64 with x64): the storage "
           "dtypes only cast on load and store.", validation.floating_dtype,
           static=True),
    Option("pseudo_inverse_rtol", Optional[float], None,
           "None (the paper's configuration) or a relative tolerance: "
           "eigenvalues at most ``rtol`` times a factor's largest are "
           "treated as zero (weight 0 in X, a pseudo-inverse, as in Meta's "
           "Distributed Shampoo) instead of being amplified by up to "
           "``ε^(-1/p)``.", validation.in_range(0.0, 1.0, high_open=True,
                                            allow_none=True)),
    Option("weight_dimension_numbers", Optional[Any], None,
           "None (the default reshaping), or as "
           "``muon_weight_dimension_numbers`` of `optax.contrib.muon`: a "
           "pytree (a prefix of the parameters) of "
           "`optax.contrib.MuonDimensionNumbers` / `fo.DimensionNumbers` "
           "``(reduction_axis, output_axis)`` or None per leaf, or a "
           "callable of the parameters returning one. The reduction axes "
           "form the matrix's rows, the output axes its columns, and every "
           "other axis is a batch axis whose slices get independent factors "
           "(stacked scanned layers, attention heads).", static=True),
    Option("cache_inverse_root", bool, True,
           "keep each factor's X = Q diag((D+ε)^(-1/p)) Qᵀ in the state "
           "(two products per block and step); False applies X through Q "
           "and D instead (four products) and saves one (m, m) array per "
           "factor.", validation.boolean, static=True),
    Option("proxy", Proxy, "exact",
           "how the FOAM controllers measure ``RC``: ``'exact'`` (the "
           "paper's, two m³ products per check) or ``'sketch'`` (an unbiased "
           "estimate of ``RC²`` from `proxy_probes` random sign vectors, "
           "three m×m mat-vecs per probe; the probes depend only on the step "
           "and the factor, so runs are reproducible).", _literal(Proxy)),
    Option("proxy_probes", int, 16,
           "number of probe vectors of ``proxy='sketch'``.",
           validation.integer(1), static=True),
    Option("root_method", RootMethod, "eigh",
           "how the inverse roots X are computed: ``'eigh'``, from the "
           "cached eigendecomposition (which the controller decides when to "
           "refresh); or ``'polar_express'`` / ``'newton_schulz'``, ASGO's "
           "iterations of matrix products, recomputed at every refresh with "
           "no eigenbasis (for the ``'stale'`` controller and the exponent "
           "2 only).", _literal(RootMethod),
           defaults={"asgo": "polar_express"}),
    Option("root_iterations", int, 10,
           "iterations of ``root_method='polar_express'`` or "
           "``'newton_schulz'``.", validation.integer(1)),
    Option("bias_correction", BiasCorrection, "none",
           "``'cross_fit'``: from the per-microbatch gradients of each "
           "``update(..., microbatch_grads=...)`` (see `fo.microbatch_grads`), "
           "the numerator (momentum) from the first half of the "
           "microbatches and the factor statistics (and Adam's second "
           "moment) from the second half, so that they are independent; "
           "``'cross_fit_variance'`` also subtracts from each inverse-root "
           "weight the leading delta-method term of its Jensen bias, "
           "estimated from the spread of the second half's contributions "
           "along the fresh eigenbasis (root-inverse preconditioning with "
           "``root_method='eigh'``); ``'none'``: neither. Needs 4 or more "
           "microbatches, an even number.", _literal(BiasCorrection),
           static=True),
    Option("cross_fit_safeguard", bool, True,
           "with ``bias_correction``, floor the held-out second moment a "
           "step divides by (the grafting optimizer's, or Adam's in the "
           "eigenbasis) at 1/8 of the pooled one's lower bound ``M̂² / (2 "
           "R_t²)``, ``R_t`` the largest ``|M̂| / √V̂`` Adam reaches, so "
           "that no cross-fitted ratio exceeds 4 times Adam's largest; "
           "False: the official algorithm. The official one divides by a "
           "second moment near zero in coordinates that the held-out "
           "microbatches leave at zero (rare inputs or tokens, ReLU units "
           "off on all their examples) and diverges there. Wherever the "
           "held-out second moment is at least 1/16 of the numerator "
           "half's, the floor is inactive and the step is the official "
           "one (`foam_optax._src.cross_fitting`).", validation.boolean),
    Option("ema_bias_correction", bool, True,
           "divide the momentum and the factor statistics by ``1 - b^t``, "
           "their moving averages' bias correction; False uses the raw "
           "averages, as the official bias-corrected Shampoo does.",
           validation.boolean),
    Option("root_damping", RootDamping, "controller",
           "the damping the inverse roots X are built with: "
           "``'controller'`` (the controller's, FOAM's adaptive one) or "
           "``'epsilon'`` (always ``ε0``): an ablation that keeps the "
           "controller's refresh decisions, which still follow its damping, "
           "but takes the damping out of the preconditioner.",
           _literal(RootDamping)),
)

BY_NAME = {option.name: option for option in OPTIONS}

# The options of the aliases only (not of the `scale_by_*` transformations).
ALIAS_OPTIONS = (
    Option("weight_decay", float, 0.0,
           "decoupled weight decay (multiplied by the learning rate).",
           _NON_NEGATIVE, defaults={"soap": 0.01, "asgo": 0.1}),
    Option("weight_decay_mask", MaskOrFn, None,
           "pytree of bools or a callable of the params choosing the leaves "
           "that decay; None decays all."),
    Option("decay_after_update", bool, True,
           "decay the weights after the update, ``p ← (p - lr·u)(1 - "
           "lr·wd)``, as the official SOAP; False decays before the "
           "learning rate instead, as optax's AdamW (``p ← p - lr·(u + "
           "wd·p)``), making the update linear in the learning rate.",
           validation.boolean),
)

ALIAS_BY_NAME = {option.name: option for option in ALIAS_OPTIONS}

LEARNING_RATE = Option("learning_rate", optax.ScalarOrSchedule, None,
                       "a float or an optax schedule.", _NON_NEGATIVE)

_SHAMPOO = (
    "b1", "b2", "epsilon", "check_frequency", "exponent", "block_size",
    "max_precond_dim", "start_preconditioning_step", "grafting", "graft_b2",
    "adam_eps", "graft_rms", "precondition_1d", "stagger", "statistics_compute_steps",
    "one_sided", "refresh_batching", "skip_nonfinite",
    "max_consecutive_skips",
    "mu_dtype", "second_moment_dtype", "factor_matrix_dtype",
    "factor_matrix_eigenvectors_dtype", "inv_factor_matrix_dtype",
    "pseudo_inverse_rtol", "weight_dimension_numbers", "cache_inverse_root",
    "root_method", "root_iterations", "bias_correction",
    "cross_fit_safeguard", "ema_bias_correction")

# Per optimizer, the options its functions take, in signature order.
EXPOSED = {
    "foam": _SHAMPOO[:3] + ("max_epsilon", "threshold") + _SHAMPOO[3:12] + (
        "controller", "residual_tol", "precondition_1d", "preconditioner",
        "refresh_method") + _SHAMPOO[13:] + ("proxy", "proxy_probes",
                                             "root_damping"),
    "shampoo": _SHAMPOO,
    "soap": (
        "b1", "b2", "adam_eps", "check_frequency", "max_precond_dim",
        "merge_dims", "precondition_1d", "one_sided", "rotation_basis", "first_step",
        "tensor_shaping", "block_size", "start_preconditioning_step",
        "refresh_method", "controller", "epsilon", "max_epsilon",
        "threshold", "exponent", "residual_tol", "stagger",
        "statistics_compute_steps", "refresh_batching", "skip_nonfinite",
        "max_consecutive_skips", "mu_dtype", "second_moment_dtype",
        "factor_matrix_dtype", "factor_matrix_eigenvectors_dtype",
        "weight_dimension_numbers", "proxy", "proxy_probes",
        "bias_correction", "cross_fit_safeguard"),
    "asgo": (
        "b1", "b2", "epsilon", "root_method", "root_iterations", "graft_rms",
        "controller", "max_epsilon", "threshold", "check_frequency",
        "start_preconditioning_step", "block_size", "max_precond_dim",
        "residual_tol", "stagger", "statistics_compute_steps",
        "refresh_batching", "skip_nonfinite", "max_consecutive_skips",
        "mu_dtype", "factor_matrix_dtype", "factor_matrix_eigenvectors_dtype",
        "inv_factor_matrix_dtype", "pseudo_inverse_rtol",
        "weight_dimension_numbers", "proxy", "proxy_probes"),
}

EXPOSED_BY_ALIAS = {
    "foam": ("weight_decay", "weight_decay_mask"),
    "shampoo": ("weight_decay", "weight_decay_mask"),
    "asgo": ("weight_decay", "weight_decay_mask"),
    "soap": ("weight_decay", "weight_decay_mask", "decay_after_update"),
}


def _shampoo_cap(arguments):
  """Stale Shampoo has no max_epsilon: the damping after a failed refresh
  is max(3e-7, epsilon), so a large epsilon is not rejected against 3e-7."""
  epsilon = arguments["epsilon"]
  value = validation.known(epsilon)
  if value is None:
    import jax.numpy as jnp
    return jnp.maximum(3e-7, epsilon)
  return max(3e-7, value)


# Per optimizer, the options it sets itself: a value, or a function of the
# arguments (by Config name).
FIXED = {
    "foam": {},
    "shampoo": {"controller": "stale", "max_epsilon": _shampoo_cap},
    "soap": {"preconditioner": "eigenvalue_corrected", "grafting": "adam"},
    "asgo": {"one_sided": True, "grafting": "rms", "exponent": 2},
}


def exposed(optimizer: str, alias: bool = False) -> list:
  """The `Option`s an optimizer's function takes, in signature order."""
  options = [BY_NAME[name] for name in EXPOSED[optimizer]]
  if alias:
    by_name = {o.name: o for o in ALIAS_OPTIONS}
    options += [by_name[name] for name in EXPOSED_BY_ALIAS[optimizer]]
  return options
