"""`Config`: the values of every option, derived from the option table.

One frozen dataclass carries every option of the core transformation: a
typed field per entry of `options.OPTIONS`, with its default and its
`Option` as metadata, written out by `signatures` (``python -m
foam_optax._src.readme_tables``), so that the numerical modules and type
checkers read named, typed fields instead of long argument lists. Numeric
fields may hold traced arrays when the transformation is wrapped in
`optax.inject_hyperparams`; validation only checks values it can see.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from foam_optax._src import options
from foam_optax._src import validation


def _field(name: str) -> Any:
  """The dataclass field of the option `name`: its default, and the `Option`
  in its metadata (``dataclasses.fields(Config)[i].metadata["option"]``)."""
  option = options.BY_NAME[name]
  return dataclasses.field(default=option.default,
                           metadata={"option": option})


@dataclasses.dataclass(frozen=True)
class Config:
  """All options of `scale_by_foam` (see `options.OPTIONS` for their
  meaning), with the quantities derived from them.

  Under `optax.inject_hyperparams` the numeric fields that are not static
  hold traced arrays.
  """

  # Generated from options.py by `python -m foam_optax._src.readme_tables`.
  b1: float = _field("b1")
  b2: float = _field("b2")
  epsilon: float = _field("epsilon")
  max_epsilon: float = _field("max_epsilon")
  threshold: float = _field("threshold")
  check_frequency: int = _field("check_frequency")
  exponent: float = _field("exponent")
  block_size: Optional[int] = _field("block_size")
  max_precond_dim: Optional[int] = _field("max_precond_dim")
  merge_dims: bool = _field("merge_dims")
  one_sided: bool = _field("one_sided")
  precondition_1d: bool = _field("precondition_1d")
  rotation_basis: options.RotationBasis = _field("rotation_basis")
  first_step: options.FirstStep = _field("first_step")
  tensor_shaping: options.TensorShaping = _field("tensor_shaping")
  start_preconditioning_step: Optional[int] = _field(
      "start_preconditioning_step")
  grafting: options.Grafting = _field("grafting")
  graft_rms: float = _field("graft_rms")
  graft_b2: float = _field("graft_b2")
  adam_eps: float = _field("adam_eps")
  controller: options.Controller = _field("controller")
  residual_tol: float = _field("residual_tol")
  preconditioner: options.Preconditioner = _field("preconditioner")
  refresh_method: options.RefreshMethod = _field("refresh_method")
  stagger: bool = _field("stagger")
  statistics_compute_steps: int = _field("statistics_compute_steps")
  refresh_batching: options.RefreshBatching = _field("refresh_batching")
  skip_nonfinite: bool = _field("skip_nonfinite")
  max_consecutive_skips: Optional[int] = _field("max_consecutive_skips")
  mu_dtype: Optional[Any] = _field("mu_dtype")
  second_moment_dtype: Optional[Any] = _field("second_moment_dtype")
  factor_matrix_dtype: Optional[Any] = _field("factor_matrix_dtype")
  factor_matrix_eigenvectors_dtype: Optional[Any] = _field(
      "factor_matrix_eigenvectors_dtype")
  inv_factor_matrix_dtype: Optional[Any] = _field("inv_factor_matrix_dtype")
  pseudo_inverse_rtol: Optional[float] = _field("pseudo_inverse_rtol")
  weight_dimension_numbers: Optional[Any] = _field("weight_dimension_numbers")
  cache_inverse_root: bool = _field("cache_inverse_root")
  proxy: options.Proxy = _field("proxy")
  proxy_probes: int = _field("proxy_probes")
  root_method: options.RootMethod = _field("root_method")
  root_iterations: int = _field("root_iterations")
  bias_correction: options.BiasCorrection = _field("bias_correction")
  cross_fit_safeguard: bool = _field("cross_fit_safeguard")
  ema_bias_correction: bool = _field("ema_bias_correction")
  root_damping: options.RootDamping = _field("root_damping")
  # End of the generated fields.

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


def with_arguments(fn: Callable[..., Any], cfg: Config) -> Callable[..., Any]:
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


# Options that only the eigenvalue-corrected preconditioner reads, with the
# value the other one needs.
_EIGENVALUE_CORRECTED_ONLY = {"rotation_basis": "updated",
                              "first_step": "update",
                              "tensor_shaping": "matrix", "merge_dims": False}


def validate(cfg: Config,
             names: Optional[Mapping[str, str]] = None) -> Config:
  """Raises ValueError naming the first invalid argument; returns `cfg`.

  `names` maps Config fields to the argument names the caller passed them
  as (e.g. SOAP's ``epsilon`` is the field ``adam_eps``).
  """
  renamed = dict(names or {})

  def name(field: str) -> str:
    return renamed.get(field, field)

  for option in options.OPTIONS:
    option.validate(name(option.name), getattr(cfg, option.name))
  eps, max_eps = validation.known(cfg.epsilon), validation.known(cfg.max_epsilon)
  if eps is not None and max_eps is not None and max_eps < eps:
    raise ValueError(
        f"{name('max_epsilon')} must be >= {name('epsilon')} "
        f"({cfg.epsilon!r}), got {cfg.max_epsilon!r}.")
  if not cfg.eigenvalue_corrected:
    for field, needed in _EIGENVALUE_CORRECTED_ONLY.items():
      if getattr(cfg, field) != needed:
        raise ValueError(
            f"{name(field)}={getattr(cfg, field)!r} needs "
            "preconditioner='eigenvalue_corrected'.")
  if cfg.merge_dims and cfg.tensor_shaping != "per_dimension":
    raise ValueError(f"{name('merge_dims')}=True needs "
                     f"{name('tensor_shaping')}='per_dimension'.")
  if cfg.root_method != "eigh":
    # The iterations compute X = A^(-1/2) directly, with no eigenbasis for
    # a controller to measure or for Adam to run in.
    needs = {"controller": "stale", "preconditioner": "root_inverse",
             "cache_inverse_root": True}
    for field, needed in needs.items():
      if getattr(cfg, field) != needed:
        raise ValueError(
            f"{name('root_method')}={cfg.root_method!r} needs "
            f"{name(field)}={needed!r}, got {getattr(cfg, field)!r}.")
    if validation.known(cfg.exponent) not in (None, 2.0):
      raise ValueError(f"{name('root_method')}={cfg.root_method!r} computes "
                       f"inverse square roots: it needs {name('exponent')}=2, "
                       f"got {cfg.exponent!r}.")
  if cfg.bias_correction == "cross_fit_variance" and (
      cfg.eigenvalue_corrected or cfg.root_method != "eigh"):
    # The correction acts on the weights of an eigendecomposition.
    raise ValueError(
        f"{name('bias_correction')}='cross_fit_variance' corrects the "
        "weights of inverse roots from an eigendecomposition: it needs "
        "preconditioner='root_inverse' and root_method='eigh'; use "
        "'cross_fit' here.")
  first_check = validation.known(cfg.first_check_step)
  if cfg.init_only_first_step and first_check not in (None, 1):
    # The first step computes every first basis: it is the first check.
    raise ValueError(
        f"{name('start_preconditioning_step')} must be 1 with "
        f"{name('first_step')}='init_only', got "
        f"{cfg.start_preconditioning_step!r}.")
  return cfg
