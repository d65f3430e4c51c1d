"""`stats`: counters and damping summaries read from an optimizer state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from foam_optax._src.factors import FactorStack
from foam_optax._src.state import find_states
from foam_optax._src.state import slot_maps


def stats(opt_state) -> dict[str, jax.Array]:
  """Diagnostics of every foam_optax transformation inside `opt_state`.

  Works on the state of `scale_by_foam` itself, of an alias (`foam`,
  `shampoo`, `soap`) or of any optax chain or wrapper around them
  (`inject_hyperparams`, `MultiSteps`, `masked`, ...). Figures are summed or
  reduced over all factors of all such transformations found.

  Returns:
    A dict of scalar arrays:

    - ``eigendecompositions``: fresh eigendecompositions (or power-QR
      refreshes) so far, over all factors;
    - ``eigendecompositions_left``, ``eigendecompositions_right``: the
      same count split by side, over the left (rows, ``G Gᵀ``) and right
      (columns, ``Gᵀ G``) factors of matrix blocks; the per-dimension
      factors of tensor leaves (``tensor_shaping='per_dimension'``) are in
      neither, so the two sum to ``eigendecompositions`` exactly when there
      are none;
    - ``checks``: check-step evaluations so far;
    - ``damping_max``, ``damping_mean``: current damping ε of the factors
      (``damping_min <= damping_mean <= damping_max`` holds exactly). It
      is the damping of the refresh controller: for root-inverse
      preconditioners (`foam`, `shampoo`) the ε in ``(A + ε)^(-1/p)``; for
      eigenvalue-corrected ones (`soap`) the FOAM controller's
      ``controller_epsilon``..``max_epsilon``, which moves only with
      ``controller='foam'`` and is not Adam's `epsilon`;
    - ``damping_min``: the smallest such damping;
    - ``proxy_max``: largest last staleness measure over factors;
    - ``nonfinite_skips``: updates skipped for non-finite gradients,
      including finite ones so large that their squares overflow the
      statistics' dtype (float32: entries beyond about 1e19);
    - ``overflow_skips``: the part of ``nonfinite_skips`` whose gradients
      were finite but overflowed so;
    - ``consecutive_skips``: updates skipped in a row up to now (largest
      over transformations found); 0 after an applied update, so a value
      that keeps growing means a stuck run (see ``max_consecutive_skips``);
    - ``eigendecomposition_failures``: refreshes that failed and kept the
      previous basis;
    - ``num_factors``: number of preconditioned factors;
    - ``step``: updates applied, skipped ones not included (largest over
      transformations found). ``step + nonfinite_skips`` is the number of
      `update` calls that reached the transformation: what
      ``nnx.Optimizer.step`` and the ``count`` of
      `optax.inject_hyperparams` count.

  The figures are computed by one compiled function, cached per state
  structure: after the first call an eager call costs about one jitted
  dispatch, and inside a jitted train step it is inlined.

  Raises:
    ValueError: if `opt_state` holds no foam_optax state.
  """
  if not find_states(opt_state):
    raise ValueError("opt_state holds no foam_optax transformation state.")
  return _stats(opt_state)


@jax.jit
def _stats(opt_state) -> dict[str, jax.Array]:
  states = find_states(opt_state)
  # Every factor stack with the mask of its real slots (the others are
  # padding, see `distribution`). Reductions per stack, then over stacks,
  # so that sharded stacks are never gathered.
  stacks = []
  sides = {"left": [], "right": []}
  for state in states:
    for gs, slots in zip(state.classes, slot_maps(state)):
      for side in sides:
        fs = getattr(gs, side)
        if fs is not None:
          stacks.append((fs, slots >= 0))
          sides[side].append(fs)
    # Per-dimension factors of tensor leaves: stacks of one, never padded.
    stacks += [(fs, np.ones((1,), bool))
               for fs in find_states(state.tensors, FactorStack)]
  int_zero = jnp.zeros((), jnp.int32)

  def total(field):
    return sum((jnp.sum(getattr(f, field)) for f, _ in stacks), int_zero)

  def side_total(side):
    return sum((jnp.sum(f.refreshes) for f in sides[side]), int_zero)

  def largest(field):
    return jnp.max(jnp.stack([jnp.max(jnp.where(real, getattr(f, field), 0.0))
                              for f, real in stacks]))

  num_factors = sum(int(real.sum()) for _, real in stacks)
  if stacks:
    damping_max, proxy_max = largest("damping"), largest("proxy")
    damping_sum = sum(jnp.sum(jnp.where(real, f.damping, 0.0))
                      for f, real in stacks)
    damping_min = jnp.min(jnp.stack([
        jnp.min(jnp.where(real, f.damping, jnp.inf)) for f, real in stacks]))
    # A float32 mean of equal values can round past them (1e-9 -> 1.0000001e-9).
    damping_mean = jnp.clip(damping_sum / num_factors, damping_min,
                            damping_max)
  else:
    damping_min = damping_max = damping_mean = proxy_max = jnp.zeros(())
  return {
      "eigendecompositions": total("refreshes"),
      "eigendecompositions_left": side_total("left"),
      "eigendecompositions_right": side_total("right"),
      "checks": total("checks"),
      "damping_max": damping_max,
      "damping_mean": damping_mean,
      "damping_min": damping_min,
      "proxy_max": proxy_max,
      "nonfinite_skips": sum((s.nonfinite_skips for s in states), int_zero),
      "overflow_skips": sum((s.overflow_skips for s in states), int_zero),
      "consecutive_skips": jnp.max(jnp.stack(
          [s.consecutive_skips for s in states])),
      "eigendecomposition_failures": total("failures"),
      "num_factors": jnp.asarray(num_factors, jnp.int32),
      "step": jnp.max(jnp.stack([s.count for s in states])),
  }
