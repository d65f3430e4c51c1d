"""`Config`: the values of every option, derived from the option table.

One frozen dataclass carries every option of the core transformation (its
fields are `options.OPTIONS`, with their defaults), so the numerical modules
read named fields instead of long argument lists. Numeric fields may hold
traced arrays when the transformation is wrapped in
`optax.inject_hyperparams`; validation only checks values it can see.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from foam_optax._src import checks
from foam_optax._src import options


class _Derived:
  """Quantities derived from the options (a base of `Config`)."""

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


Config = dataclasses.make_dataclass(
    "Config",
    [(o.name, Any, dataclasses.field(default=o.default))
     for o in options.OPTIONS],
    bases=(_Derived,), frozen=True)
Config.__module__ = __name__
Config.__doc__ = ("All options of `scale_by_foam` (see `options.OPTIONS` for "
                  "their meaning).")


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


# Options that only the eigenvalue-corrected preconditioner reads, with the
# value the other one needs.
_EIGENVALUE_CORRECTED_ONLY = {"rotation_basis": "updated",
                              "first_step": "update",
                              "tensor_shaping": "matrix", "merge_dims": False}


def validate(cfg: Config, names: Mapping[str, str] = None) -> Config:
  """Raises ValueError naming the first invalid argument; returns `cfg`.

  `names` maps Config fields to the argument names the caller passed them
  as (e.g. SOAP's ``epsilon`` is the field ``adam_eps``).
  """
  names = dict(names or {})
  name = lambda field: names.get(field, field)
  for option in options.OPTIONS:
    if option.check is not None:
      option.check(name(option.name), getattr(cfg, option.name))
  eps, max_eps = checks.known(cfg.epsilon), checks.known(cfg.max_epsilon)
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
    if checks.known(cfg.exponent) not in (None, 2.0):
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
  first_check = checks.known(cfg.first_check_step)
  if cfg.init_only_first_step and first_check not in (None, 1):
    # The first step computes every first basis: it is the first check.
    raise ValueError(
        f"{name('start_preconditioning_step')} must be 1 with "
        f"{name('first_step')}='init_only', got "
        f"{cfg.start_preconditioning_step!r}.")
  return cfg
