"""Validation: argument checks at construction, and errors that stop a run.

Argument checks raise a `ValueError` naming the argument. Numeric arguments
may be traced arrays (under `optax.inject_hyperparams`): a check then
verifies only what it can see (the type), not the value. Arguments that fix
shapes or loop counts at construction (`python_integer`) must be integers
outright. The optimizers' checks come from the option table (`options`);
the other transformations (`dasgo`, `bias_corrected_adamw`, `mup`,
`spectral`, `microbatches`) use the same ones.

Errors that stop a run raise eagerly or from inside `jax.jit`. A condition
known at trace time raises at once. A traced one raises from a host
callback that only the failing branch of a `lax.cond` executes, so a healthy
step pays one scalar comparison; JAX re-raises the callback's error as a
`jax.errors.JaxRuntimeError` whose message contains ours.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING, Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import io_callback
import numpy as np

if TYPE_CHECKING:
  from foam_optax._src.config import Config
  from foam_optax._src.layout import LeafLayout


# --- Argument checks ---------------------------------------------------------


def known(value) -> Optional[float]:
  """The value as a float when it is concrete, else None (traced)."""
  if value is None:
    return None
  try:
    return float(value)
  except (TypeError, jax.errors.ConcretizationTypeError,
          jax.errors.TracerArrayConversionError):
    return None


def numeric(name, value):
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


def in_range(low, high, low_open=False, high_open=False, allow_none=False):
  """A check that the value lies in the interval (None too if allowed)."""
  # No hyperparameter is meaningful at infinity: the ranges stop short of it.
  high_open = high_open or high == math.inf

  def check(name, value):
    if value is None and allow_none:
      return
    numeric(name, value)
    v = known(value)
    if v is None:
      return
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if math.isnan(v) or too_low or too_high:
      lo = "(" if low_open else "["
      hi = ")" if high_open else "]"
      raise ValueError(
          f"{name} must be in {lo}{low}, {high}{hi}, got {value!r}.")
  return check


def integer(minimum, allow_none=False):
  """A check that the value is an integer >= `minimum` (or None)."""

  def check(name, value):
    if value is None and allow_none:
      return
    if not isinstance(value, bool):   # bools get the message below
      numeric(name, value)
    v = known(value)
    if isinstance(value, bool) or (
        v is not None and (math.isnan(v) or v < minimum or v != int(v))):
      none = " or None" if allow_none else ""
      raise ValueError(
          f"{name} must be an integer >= {minimum}{none}, got {value!r}.")
  return check


def choice(choices: Iterable | Callable[[], Iterable]):
  """A check that the value is one of `choices` (a callable returning them
  is read at check time, for registries that grow)."""

  def check(name, value):
    allowed = tuple(choices()) if callable(choices) else tuple(choices)
    if value not in allowed:
      raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
  return check


def boolean(name, value):
  if not isinstance(value, bool):
    raise ValueError(f"{name} must be a bool, got {value!r}.")


def floating_dtype(name, value):
  """None, or a real floating dtype."""
  if value is None:
    return
  try:
    dtype = jnp.dtype(value)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"{name} must be None or a floating dtype, got "
                     f"{value!r}.")


def static_int(name, value):
  """A structural integer (it decides shapes) as a Python int or None."""
  if value is None:
    return None
  v = known(value)
  if v is None:
    raise ValueError(
        f"{name} decides the optimizer state's shapes and cannot be traced; "
        f"with optax.inject_hyperparams pass static_args=({name!r},).")
  return int(v)


def python_integer(minimum, allow_none=False):
  """A check that the value is an integer (a Python or NumPy one, not a bool
  or a float) >= `minimum` (or None): for arguments that fix shapes or loop
  counts when the transformation is built."""

  def check(name, value):
    if value is None and allow_none:
      return
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
        or value < minimum):
      none = " or None" if allow_none else ""
      raise ValueError(
          f"{name} must be an integer >= {minimum}{none}, got {value!r}.")
  return check


# Decay rates in [0, 1); positive and non-negative scales (epsilon, RMS).
UNIT = in_range(0.0, 1.0, high_open=True)
POSITIVE = in_range(0.0, math.inf, low_open=True)
NON_NEGATIVE = in_range(0.0, math.inf)


# --- Errors that stop a run --------------------------------------------------


def fail_if(condition, error: type, message: str, *values) -> None:
  """Raises ``error(message.format(*values))`` when `condition` holds."""
  try:
    concrete = bool(condition)
  except jax.errors.ConcretizationTypeError:
    concrete = None
  if concrete is not None:
    if concrete:
      raise error(message.format(*(np.asarray(v).item() for v in values)))
    return

  def host_raise(*host_values):
    raise error(message.format(*(np.asarray(v).item() for v in host_values)))

  lax.cond(condition, lambda: io_callback(host_raise, None, *values),
           lambda: None)


def check_gradient_dtypes(updates) -> None:
  """Gradients must be real floating arrays: a float0 gradient
  (``jax.grad(..., allow_int=True)`` of an integer leaf) or an integer one
  raises, naming the leaf."""
  for path, g in jax.tree_util.tree_flatten_with_path(updates)[0]:
    dtype = jnp.result_type(g)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"the update of {jax.tree_util.keystr(path)} has dtype {dtype}; "
          "foam_optax takes floating-point gradients only (a float0 "
          "gradient comes from jax.grad(..., allow_int=True) of an integer "
          "leaf: keep such leaves out of the optimized tree).")


def check_consecutive_skips(consecutive, limit,
                            params_finite: bool | jax.Array = True) -> None:
  """Stops a run stuck on skipped updates, naming the likelier cause: the
  parameters, when they are themselves not finite, else the gradients."""
  stuck = consecutive >= limit
  fail_if(stuck & params_finite, FloatingPointError,
          "foam_optax: {} updates in a row were skipped because their "
          "gradients were not finite (max_consecutive_skips={}); the run is "
          "stuck. Under optax.MultiSteps one NaN micro-batch poisons the "
          "accumulator for good: pass "
          "should_skip_update_fn=optax.skip_not_finite to MultiSteps.",
          consecutive, jnp.asarray(limit))
  fail_if(stuck & jnp.logical_not(params_finite), FloatingPointError,
          "foam_optax: {} updates in a row were skipped "
          "(max_consecutive_skips={}) and the parameters themselves are not "
          "finite, so every gradient is NaN: the run is stuck. The cause is "
          "upstream of the gradients: a NaN or infinite learning rate or "
          "schedule value, or an update from another transformation that "
          "this optimizer's skip does not cover (wrap the whole chain in "
          "fo.skip_nonfinite).", consecutive, jnp.asarray(limit))


def _block_size_range(layouts: Sequence[LeafLayout]):
  """[low, high] of the block sizes that give `layouts` (high None: no cap)."""
  low, high = 1, None
  for leaf in layouts:
    if leaf.matrix_shape is None:
      continue
    first = leaf.groups[0]
    for size, block in zip(leaf.matrix_shape, (first.rows, first.cols)):
      if block < size:   # cut: the block side is the block size
        low = max(low, block)
        high = block if high is None else min(high, block)
      else:              # uncut: any block size at least as long
        low = max(low, size)
  return low, high


def _max_precond_dim_range(layouts: Sequence[LeafLayout]):
  """[low, high] of the max_precond_dim values that give `layouts`."""
  low, high = 1, None
  for leaf in layouts:
    if leaf.matrix_shape is None:
      continue
    for g in leaf.groups:
      for side, size, block, kept in (
          ("left", leaf.matrix_shape[0], g.rows, g.left),
          ("right", leaf.matrix_shape[1], g.cols, g.right)):
        if block <= 1 or leaf.one_side not in (None, side):
          continue       # never preconditioned, whatever max_precond_dim
        if kept:
          low = max(low, size)
        else:
          high = size - 1 if high is None else min(high, size - 1)
  return low, high


def check_structure(layouts: Sequence[LeafLayout], cfg: Config):
  """Raises when `block_size` or `max_precond_dim` no longer match the state.

  They decide the state's block layout at `init`; under
  `optax.inject_hyperparams` an edited value could not take effect.
  """
  for name, value, value_range in (
      ("block_size", cfg.block_size, _block_size_range),
      ("max_precond_dim", cfg.max_precond_dim, _max_precond_dim_range)):
    if value is None:
      continue
    low, high = value_range(layouts)
    outside = value < low if high is None else (value < low) | (value > high)
    fail_if(outside, ValueError,
            "foam_optax: " + name + "={} does not match the optimizer state, "
            "whose block layout was fixed at init; " + name + " cannot change "
            "mid-run (with optax.inject_hyperparams, pass static_args=('"
            + name + "',) and leave it alone).", jnp.asarray(value))
