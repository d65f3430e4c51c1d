"""Errors that stop a run, eagerly or from inside `jax.jit`.

A condition known at trace time raises at once. A traced one raises from a
host callback that only the failing branch of a `lax.cond` executes, so a
healthy step pays one scalar comparison; JAX re-raises the callback's error
as a `jax.errors.JaxRuntimeError` whose message contains ours.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import io_callback
import numpy as np

from foam_optax._src import layout
from foam_optax._src.config import Config


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


def _block_size_range(layouts: Sequence[layout.LeafLayout]):
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


def _max_precond_dim_range(layouts: Sequence[layout.LeafLayout]):
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


def check_structure(layouts: Sequence[layout.LeafLayout], cfg: Config):
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
