"""Reading an optimizer state: `stats` (counters and damping summaries) and
read-only views of its factors and blocks (`factor_stacks`, `block_stacks`),
for diagnostics, benchmarks and profiling."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from foam_optax._src import layout
from foam_optax._src.bias_corrected_adamw import ScaleByBiasCorrectedAdamState
from foam_optax._src.dasgo import ScaleByDasgoState
from foam_optax._src.factors import FactorStack
from foam_optax._src.mesh import state_slot_maps
from foam_optax._src.state import block_classes, find_states
from foam_optax._src.state import ScaleByFoamState
from foam_optax._src.step import class_stack


def stats(opt_state) -> dict[str, jax.Array]:
  """Diagnostics of every foam_optax transformation inside `opt_state`.

  Works on the state of every optimizer this package makes: `scale_by_foam`
  and the aliases built on it (`foam`, `shampoo`, `soap`, `asgo` and their
  `scale_by_*`), `dasgo` / `scale_by_dasgo`, `bias_corrected_adamw` /
  `scale_by_bias_corrected_adam`, and any optax chain or wrapper around them
  (`partition`, `inject_hyperparams`, `MultiSteps`, `masked`, ...). Figures
  are summed or reduced over all factors of all such transformations found;
  a transformation without factors (DASGO, bias-corrected AdamW) adds its
  step and skip counters and no factor.

  Returns:
    A dict of scalar arrays:

    - ``eigendecompositions``: fresh eigendecompositions (or power-QR
      refreshes) so far, over all factors;
    - ``inverse_roots``: inverse roots computed by iteration so far, over
      all factors: ASGO's Polar Express (or Newton-Schulz) roots
      (``root_method != 'eigh'``), which compute no eigendecomposition;
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
      statistics' dtype (float32: entries beyond about 1e19); the largest
      count over the transformations found (a step that an enclosing
      `skip_nonfinite` skips is counted by each transformation inside);
    - ``overflow_skips``: the part of ``nonfinite_skips`` whose gradients
      were finite but overflowed so;
    - ``consecutive_skips``: updates skipped in a row up to now (largest
      over transformations found); 0 after an applied update, so a value
      that keeps growing means a stuck run (see ``max_consecutive_skips``);
    - ``eigendecomposition_failures``: refreshes (eigendecompositions or
      iterative roots) that failed and kept the previous basis (an
      iterative root falls back to the identity);
    - ``num_factors``: number of preconditioned factors;
    - ``step``: updates applied, skipped ones not included (largest over
      transformations found). ``step + nonfinite_skips`` is the number of
      `update` calls that reached the transformation: what
      ``nnx.Optimizer.step`` and the ``count`` of
      `optax.inject_hyperparams` count.

    Without factors (DASGO, bias-corrected AdamW) the factor figures are 0.
    The skip counters of `scale_by_dasgo` and
    `scale_by_bias_corrected_adam` count the steps an enclosing
    `skip_nonfinite` skipped (their aliases apply one); on their own they
    skip nothing and stay 0.

  The figures are computed by one compiled function, cached per state
  structure: after the first call an eager call costs about one jitted
  dispatch, and inside a jitted train step it is inlined.

  Raises:
    ValueError: if `opt_state` holds no state of a foam_optax optimizer
      (`scale_by_mup` keeps none; `scale_by_spectral_norm` only its power
      iteration's vectors).
  """
  if not (find_states(opt_state) or find_states(opt_state, _COUNTED)):
    raise ValueError(
        "opt_state holds no state of a foam_optax optimizer (scale_by_foam "
        "and the aliases built on it, scale_by_dasgo, "
        "scale_by_bias_corrected_adam); fo.stats has nothing to report. "
        "scale_by_mup keeps no state, and scale_by_spectral_norm only its "
        "power iteration's vectors.")
  return _stats(opt_state)


# States without factors whose step and skip counters `stats` reports.
_COUNTED = (ScaleByDasgoState, ScaleByBiasCorrectedAdamState)


@jax.jit
def _stats(opt_state) -> dict[str, jax.Array]:
  states = find_states(opt_state)
  # Every factor stack with the mask of its real slots (the others are
  # padding, see `mesh`) and what its refreshes compute.
  # Reductions per stack, then over stacks, so that sharded stacks are
  # never gathered.
  stacks = []
  sides = {"left": [], "right": []}
  for state in states:
    kind = state.refresh_kind.counter
    for gs, slots in zip(state.classes, state_slot_maps(state)):
      for side in sides:
        fs = getattr(gs, side)
        if fs is not None:
          stacks.append((fs, slots >= 0, kind))
          if kind == "eigendecompositions":
            sides[side].append(fs)
    # Per-dimension factors of tensor leaves: stacks of one, never padded.
    stacks += [(fs, np.ones((1,), bool), kind)
               for fs in find_states(state.tensors, FactorStack)]
  int_zero = jnp.zeros((), jnp.int32)

  def total(field, kind=None):
    return sum((jnp.sum(getattr(f, field)) for f, _, k in stacks
                if kind in (None, k)), int_zero)

  def side_total(side):
    return sum((jnp.sum(f.refreshes) for f in sides[side]), int_zero)

  def largest(field):
    return jnp.max(jnp.stack([jnp.max(jnp.where(real, getattr(f, field), 0.0))
                              for f, real, _ in stacks]))

  num_factors = sum(int(real.sum()) for _, real, _ in stacks)
  if stacks:
    damping_max, proxy_max = largest("damping"), largest("proxy")
    damping_sum = sum(jnp.sum(jnp.where(real, f.damping, 0.0))
                      for f, real, _ in stacks)
    damping_min = jnp.min(jnp.stack([
        jnp.min(jnp.where(real, f.damping, jnp.inf)) for f, real, _ in stacks]))
    # A float32 mean of equal values can round past them (1e-9 -> 1.0000001e-9).
    damping_mean = jnp.clip(damping_sum / num_factors, damping_min,
                            damping_max)
  else:
    damping_min = damping_max = damping_mean = proxy_max = jnp.zeros(())
  # Step and skip counters: the foam_optax states', then those of the
  # states without factors.
  counters = [(s.count, s.nonfinite_skips, s.overflow_skips,
               s.consecutive_skips) for s in states]
  counters += [(s.count,) + (s.skips.nonfinite_skips, s.skips.overflow_skips,
                             s.skips.consecutive_skips)
               for s in find_states(opt_state, _COUNTED)]
  largest_counter = lambda i: jnp.max(jnp.stack([c[i] for c in counters]))
  return {
      "eigendecompositions": total("refreshes", "eigendecompositions"),
      "inverse_roots": total("refreshes", "inverse_roots"),
      "eigendecompositions_left": side_total("left"),
      "eigendecompositions_right": side_total("right"),
      "checks": total("checks"),
      "damping_max": damping_max,
      "damping_mean": damping_mean,
      "damping_min": damping_min,
      "proxy_max": proxy_max,
      "nonfinite_skips": largest_counter(1),
      "overflow_skips": largest_counter(2),
      "consecutive_skips": largest_counter(3),
      "eigendecomposition_failures": total("failures"),
      "num_factors": jnp.asarray(num_factors, jnp.int32),
      "step": largest_counter(0),
  }


class FactorStackView(NamedTuple):
  """One factor stack of a `ScaleByFoamState`, as `factor_stacks` lists it.

  Attributes:
    stack: the `FactorStack`; its leading axis runs over slots.
    side: ``'left'`` or ``'right'`` for the factors of matrix blocks,
      ``'dim<d>'`` for the per-dimension factor of a tensor leaf's
      dimension ``d``.
    ids: (slots,) each slot's factor id, the one its sketched proxy's probe
      keys are drawn from (`controllers.probe_keys`); -1 for the padding
      slots of a stack laid out for a device mesh.
    block_class: the static `layout.BlockClass` of the blocks (their shape
      and the leaves they come from); None for a tensor leaf's factor.
    class_index: the stack's index in ``state.classes`` (None for a tensor
      leaf's factor).
    leaf_index: for a tensor leaf's factor, the leaf's index in
      `jax.tree.leaves` order; None otherwise.
  """

  stack: FactorStack
  side: str
  ids: np.ndarray
  block_class: Optional[layout.BlockClass]
  class_index: Optional[int]
  leaf_index: Optional[int]

  @property
  def real(self) -> np.ndarray:
    """(slots,) bool: the slots that hold a factor (not mesh padding)."""
    return self.ids >= 0

  @property
  def size(self) -> int:
    """The factors' side length m."""
    return int(self.stack.eigvals.shape[-1])


def _core(opt_state) -> ScaleByFoamState:
  states = find_states(opt_state)
  if len(states) != 1:
    raise ValueError(f"expected one foam_optax transformation state inside "
                     f"the optimizer state, found {len(states)}.")
  return states[0]


def factor_stacks(opt_state) -> list:
  """Every factor stack of the foam_optax transformation inside `opt_state`.

  Block factors come first, class by class (left before right), then the
  per-dimension factors of tensor leaves in leaf order; factor ids count in
  that order, as the optimizer numbers them.

  Args:
    opt_state: the state of `scale_by_foam`, of an alias or of any optax
      chain or wrapper holding exactly one of them.

  Returns:
    A list of `FactorStackView`.

  Example:
    >>> import jax.numpy as jnp, foam_optax as fo
    >>> state = fo.foam(1e-3).init({'w': jnp.zeros((8, 4))})
    >>> [(v.side, v.size) for v in fo.factor_stacks(state)]
    [('left', 8), ('right', 4)]
  """
  core = _core(opt_state)
  views, first_id = [], 0
  for c, (cls, cs, slots) in enumerate(zip(block_classes(core), core.classes,
                                           state_slot_maps(core))):
    for side in ("left", "right"):
      if getattr(cls, side):
        ids = np.where(slots < 0, -1, first_id + slots)
        views.append(FactorStackView(getattr(cs, side), side, ids, cls, c,
                                     None))
        first_id += cls.count
  for i, tensor in enumerate(core.tensors):
    if tensor is None:
      continue
    for d, fs in enumerate(tensor.factors):
      if fs is not None:
        views.append(FactorStackView(fs, f"dim{d}", np.array([first_id]),
                                     None, None, i))
        first_id += 1
  return views


def block_stacks(opt_state, tree) -> list:
  """The blocks of `tree` (e.g. the gradients) stacked by block class, as
  the optimizer stacks them.

  Args:
    opt_state: as in `factor_stacks`.
    tree: arrays with the parameters' structure and shapes.

  Returns:
    Per entry of the state's ``classes``: ``(block_class, stack)`` with the
    (slots, m, n) stack (zero blocks in the padding slots of a mesh).
  """
  core = _core(opt_state)
  layouts = list(core.layouts)
  arrays = jax.tree.leaves(tree)
  return [(cls, class_stack(arrays, layouts, cls, slots))
          for cls, slots in zip(block_classes(core), state_slot_maps(core))]
