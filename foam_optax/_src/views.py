"""Read-only views of an optimizer state's factors and blocks, for
diagnostics, benchmarks and profiling."""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import numpy as np

from foam_optax._src import leaves
from foam_optax._src import layout
from foam_optax._src.factors import FactorStack
from foam_optax._src.state import ScaleByFoamState
from foam_optax._src.mesh import state_slot_maps
from foam_optax._src.state import block_classes, find_states


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
  return [(cls, leaves.class_stack(arrays, layouts, cls, slots))
          for cls, slots in zip(block_classes(core), state_slot_maps(core))]
