"""Argument checks: each raises a `ValueError` naming the argument.

Numeric arguments may be traced arrays (under `optax.inject_hyperparams`):
a check then verifies only what it can see (the type), not the value.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np


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
