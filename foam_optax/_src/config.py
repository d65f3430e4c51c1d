"""Hyperparameters of the Shampoo family and their validation.

One frozen dataclass carries every option of the core transformation, so the
numerical modules read named fields instead of long argument lists. Numeric
fields may hold traced arrays when the transformation is wrapped in
`optax.inject_hyperparams`; validation only checks values it can see.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Optional, get_args

import jax
import numpy as np
import jax.numpy as jnp

# The string options: each type annotates the signatures, and validation
# accepts exactly its values.
Grafting = Literal["adam", "rmsprop", "sgd", "none"]
Preconditioner = Literal["root_inverse", "eigenvalue_corrected"]
RefreshMethod = Literal["eigh", "power_qr"]
RefreshBatching = Literal["map", "bucket"]
Proxy = Literal["exact", "sketch"]
RotationBasis = Literal["updated", "previous"]
FirstStep = Literal["update", "init_only"]
TensorShaping = Literal["matrix", "per_dimension"]
RootDamping = Literal["controller", "epsilon"]

GRAFTINGS = get_args(Grafting)
PRECONDITIONERS = get_args(Preconditioner)
REFRESH_METHODS = get_args(RefreshMethod)
REFRESH_BATCHINGS = get_args(RefreshBatching)
PROXIES = get_args(Proxy)
ROTATION_BASES = get_args(RotationBasis)
FIRST_STEPS = get_args(FirstStep)
TENSOR_SHAPINGS = get_args(TensorShaping)
ROOT_DAMPINGS = get_args(RootDamping)


@dataclasses.dataclass(frozen=True)
class Config:
  """All options of `scale_by_foam`; see its docstring for their meaning."""

  b1: Any = 0.95
  b2: Any = 0.995
  epsilon: Any = 1e-9
  max_epsilon: Any = 3e-7
  threshold: Any = 0.75
  check_frequency: Any = 20
  exponent: Any = 2
  block_size: Optional[int] = 1024
  max_precond_dim: Optional[int] = None
  start_preconditioning_step: Any = None
  grafting: str = "adam"
  graft_b2: Any = 0.995
  graft_eps: Any = 1e-9
  controller: str = "foam"
  residual_tol: Any = 0.1
  precondition_1d: bool = False
  preconditioner: str = "root_inverse"
  refresh_method: str = "eigh"
  stagger: bool = False
  statistics_compute_steps: Any = 1
  refresh_batching: str = "map"
  skip_nonfinite: bool = True
  max_consecutive_skips: Optional[int] = None
  mu_dtype: Any = None
  second_moment_dtype: Any = None
  factor_matrix_dtype: Any = None
  factor_matrix_eigenvectors_dtype: Any = None
  inv_factor_matrix_dtype: Any = None
  pseudo_inverse_rtol: Any = None
  cache_inverse_root: bool = True
  weight_dimension_numbers: Any = None
  proxy: str = "exact"
  proxy_probes: Any = 16
  root_damping: str = "controller"
  # Eigenvalue-corrected preconditioning only (see `scale_by_soap`).
  rotation_basis: str = "updated"
  first_step: str = "update"
  tensor_shaping: str = "matrix"
  merge_dims: bool = False

  @property
  def first_check_step(self):
    """`s0`: the step of every factor's first check (and fresh EVD)."""
    if self.start_preconditioning_step is None:
      return self.check_frequency
    return self.start_preconditioning_step

  @property
  def eigenvalue_corrected(self) -> bool:
    return self.preconditioner == "eigenvalue_corrected"

  @property
  def init_only_first_step(self) -> bool:
    return self.first_step == "init_only"

  def traced(self) -> dict:
    """The hyperparameters held as arrays (`optax.inject_hyperparams`)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), jax.Array)}

  def root_damping_of(self, damping):
    """The damping X is built with: the controller's stored one, or ε0
    for ``root_damping='epsilon'`` (the ablation that keeps FOAM's refresh
    decisions but not its damping)."""
    if self.root_damping == "epsilon":
      return jnp.full_like(damping, self.epsilon)
    return damping


def with_arguments(fn, cfg: Config):
  """`fn(*args, cfg)` as a function of ``(*args, traced)``, `traced` being
  ``cfg.traced()``.

  Array-valued hyperparameters travel as arguments, never as closures, into
  `shard_map` and `auto_axes`, whose bodies may not capture arrays placed
  under another mesh.
  """
  def call(*args):
    *args, traced = args
    return fn(*args, dataclasses.replace(cfg, **traced))
  return call


STORAGE_DTYPES = ("mu_dtype", "second_moment_dtype", "factor_matrix_dtype",
                  "factor_matrix_eigenvectors_dtype", "inv_factor_matrix_dtype")


def _known(value) -> Optional[float]:
  """The value as a float when it is concrete, else None (traced)."""
  if value is None:
    return None
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError):
    return None


def _check_numeric(name, value):
  """Rejects what is not a real number: strings that parse as one ("20"),
  bools, containers. Python and NumPy numbers and real-valued 0-d arrays
  (traced ones under `optax.inject_hyperparams` included) pass."""
  if isinstance(value, (bool, np.bool_)):
    ok = False
  elif isinstance(value, (int, float, np.integer, np.floating)):
    ok = True
  elif isinstance(value, (jax.Array, np.ndarray)):
    ok = (np.ndim(value) == 0 and (np.issubdtype(value.dtype, np.integer) or
                                   np.issubdtype(value.dtype, np.floating)))
  else:
    ok = False
  if not ok:
    raise ValueError(f"{name} must be a real number, got {value!r} of type "
                     f"{type(value).__name__}.")


def _check_range(name, value, low, high, low_open=False, high_open=False):
  _check_numeric(name, value)
  v = _known(value)
  if v is None:
    return
  # No hyperparameter is meaningful at infinity: the ranges stop short of it.
  high_open = high_open or high == math.inf
  too_low = v <= low if low_open else v < low
  too_high = v >= high if high_open else v > high
  if math.isnan(v) or too_low or too_high:
    lo = "(" if low_open else "["
    hi = ")" if high_open else "]"
    raise ValueError(
        f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}.")


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def _check_int(name, value, minimum, allow_none=False):
  if value is None and allow_none:
    return
  if not isinstance(value, bool):   # bools get the message below
    _check_numeric(name, value)
  v = _known(value)
  if isinstance(value, bool) or (
      v is not None and (math.isnan(v) or v < minimum or v != int(v))):
    none = " or None" if allow_none else ""
    raise ValueError(
        f"{name} must be an integer >= {minimum}{none}, got {value!r}.")


def _check_dtype(name, value):
  """None, or a real floating dtype."""
  if value is None:
    return
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be None or a floating dtype, got {value!r}.")


def static_int(name, value):
  """A structural integer (it decides shapes) as a Python int or None."""
  if value is None:
    return None
  v = _known(value)
  if v is None:
    raise ValueError(
        f"{name} decides the optimizer state's shapes and cannot be traced; "
        f"with optax.inject_hyperparams pass static_args=({name!r},).")
  return int(v)


def validate(cfg: Config) -> Config:
  """Raises ValueError naming the first invalid argument; returns `cfg`."""
  _check_range("b1", cfg.b1, 0.0, 1.0, high_open=True)
  _check_range("b2", cfg.b2, 0.0, 1.0, high_open=True)
  _check_range("graft_b2", cfg.graft_b2, 0.0, 1.0, high_open=True)
  _check_range("epsilon", cfg.epsilon, 0.0, math.inf, low_open=True)
  _check_range("graft_eps", cfg.graft_eps, 0.0, math.inf)
  _check_range("threshold", cfg.threshold, 0.0, math.inf, low_open=True)
  _check_range("exponent", cfg.exponent, 0.0, math.inf, low_open=True)
  _check_range("residual_tol", cfg.residual_tol, 0.0, 1.0)
  eps, max_eps = _known(cfg.epsilon), _known(cfg.max_epsilon)
  _check_range("max_epsilon", cfg.max_epsilon, 0.0, math.inf, low_open=True)
  if eps is not None and max_eps is not None and max_eps < eps:
    raise ValueError(
        f"max_epsilon must be >= epsilon ({cfg.epsilon!r}), got "
        f"{cfg.max_epsilon!r}.")
  _check_int("check_frequency", cfg.check_frequency, 1)
  _check_int("start_preconditioning_step", cfg.start_preconditioning_step, 1,
             allow_none=True)
  _check_int("block_size", cfg.block_size, 1, allow_none=True)
  _check_int("max_precond_dim", cfg.max_precond_dim, 1, allow_none=True)
  _check_int("statistics_compute_steps", cfg.statistics_compute_steps, 1)
  _check_int("max_consecutive_skips", cfg.max_consecutive_skips, 1,
             allow_none=True)
  # The controllers' registry is the one `factors` dispatches on (imported
  # here, not at the top: `controllers` imports this module).
  from foam_optax._src.controllers import CONTROLLERS
  _check_choice("controller", cfg.controller, tuple(CONTROLLERS))
  _check_choice("grafting", cfg.grafting, GRAFTINGS)
  _check_choice("preconditioner", cfg.preconditioner, PRECONDITIONERS)
  _check_choice("refresh_method", cfg.refresh_method, REFRESH_METHODS)
  _check_choice("refresh_batching", cfg.refresh_batching, REFRESH_BATCHINGS)
  if cfg.pseudo_inverse_rtol is not None:
    _check_range("pseudo_inverse_rtol", cfg.pseudo_inverse_rtol, 0.0, 1.0,
                 high_open=True)
  for name in STORAGE_DTYPES:
    _check_dtype(name, getattr(cfg, name))
  _check_choice("proxy", cfg.proxy, PROXIES)
  _check_int("proxy_probes", cfg.proxy_probes, 1)
  _check_choice("root_damping", cfg.root_damping, ROOT_DAMPINGS)
  _check_choice("rotation_basis", cfg.rotation_basis, ROTATION_BASES)
  _check_choice("first_step", cfg.first_step, FIRST_STEPS)
  _check_choice("tensor_shaping", cfg.tensor_shaping, TENSOR_SHAPINGS)
  for flag in ("precondition_1d", "stagger", "skip_nonfinite",
               "cache_inverse_root", "merge_dims"):
    if not isinstance(getattr(cfg, flag), bool):
      raise ValueError(f"{flag} must be a bool, got {getattr(cfg, flag)!r}.")
  if not cfg.eigenvalue_corrected:
    for name, default in (("rotation_basis", "updated"),
                          ("first_step", "update"),
                          ("tensor_shaping", "matrix"), ("merge_dims", False)):
      if getattr(cfg, name) != default:
        raise ValueError(
            f"{name}={getattr(cfg, name)!r} needs "
            "preconditioner='eigenvalue_corrected'.")
  if cfg.merge_dims and cfg.tensor_shaping != "per_dimension":
    raise ValueError("merge_dims=True needs tensor_shaping='per_dimension'.")
  first_check = _known(cfg.first_check_step)
  if cfg.init_only_first_step and first_check not in (None, 1):
    # The first step computes every first basis: it is the first check.
    raise ValueError(
        "start_preconditioning_step must be 1 with first_step='init_only', "
        f"got {cfg.start_preconditioning_step!r}.")
  return cfg


def check_learning_rate(learning_rate) -> None:
  """Aliases accept a non-negative float, an array or an optax schedule."""
  if callable(learning_rate):
    return
  _check_range("learning_rate", learning_rate, 0.0, math.inf)


def check_soap_epsilons(epsilon, controller_epsilon, max_epsilon) -> None:
  """`scale_by_soap`'s epsilons, named as in its signature."""
  _check_range("epsilon", epsilon, 0.0, math.inf)
  _check_range("controller_epsilon", controller_epsilon, 0.0, math.inf,
               low_open=True)
  _check_range("max_epsilon", max_epsilon, 0.0, math.inf, low_open=True)
  eps, max_eps = _known(controller_epsilon), _known(max_epsilon)
  if eps is not None and max_eps is not None and max_eps < eps:
    raise ValueError(
        f"max_epsilon must be >= controller_epsilon ({controller_epsilon!r}), "
        f"got {max_epsilon!r}.")


def check_weight_decay(weight_decay) -> None:
  _check_range("weight_decay", weight_decay, 0.0, math.inf)
