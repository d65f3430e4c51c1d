"""The state of `scale_by_foam` and how to find it inside any optax state."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from foam_optax._src import layout
from foam_optax._src import per_dimension
from foam_optax._src.factors import FactorStack
from foam_optax._src.nnx import plain_arrays


class BlockClassState(NamedTuple):
  """State of one block class: every block of one shape in the tree, stacked.

  The leading axis of every array runs over the class's blocks (see
  `layout.BlockClass`); None marks a side that is not preconditioned, or
  a part the preconditioner does not use.
  """

  left: Optional[FactorStack]
  right: Optional[FactorStack]
  rotated_second_moment: Optional[jax.Array]   # (k, m, n), eigenvalue-corrected


class LeafState(NamedTuple):
  """One parameter's part of `ScaleByFoamState` (see its `leaf_states`)."""

  momentum: jax.Array                  # EMA of gradients (not bias-corrected)
  graft_second_moment: Optional[jax.Array]
  layout: layout.LeafLayout           # static: no arrays
  # Per-dimension factors of a tensor leaf (``tensor_shaping='per_dimension'``).
  tensor: Optional[per_dimension.TensorState] = None


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class RefreshKind:
  """Static: what a refresh of a state's factors computes, which names the
  `stats` counter their ``FactorStack.refreshes`` feed: a fresh basis
  (``'eigendecompositions'``: ``eigh`` or SOAP's power-QR step) or an inverse
  root computed by iteration (``'inverse_roots'``: ASGO's Polar Express or
  Newton-Schulz, ``root_method != 'eigh'``)."""

  counter: str = "eigendecompositions"


class SkipCounters(NamedTuple):
  """The skip counters of a transformation that does not skip steps itself
  (`scale_by_dasgo`, `scale_by_bias_corrected_adam`): an enclosing
  `skip_nonfinite` counts here the steps it skips, as `scale_by_foam`
  counts its own, and `stats` reads them."""

  nonfinite_skips: jax.Array
  consecutive_skips: jax.Array
  overflow_skips: jax.Array

  @classmethod
  def zeros(cls) -> "SkipCounters":
    zero = lambda: jnp.zeros([], jnp.int32)
    return cls(zero(), zero(), zero())


class ScaleByFoamState(NamedTuple):
  """State of `scale_by_foam`.

  The per-parameter buffers are trees shaped like the parameters, as in
  optax's own states, so `optax.tree.map_params` reaches them.

  Attributes:
    count: number of updates applied (the next update is step `count + 1`).
    nonfinite_skips: updates skipped because a gradient was not finite.
    mu: the momentum (EMA of gradients, not bias-corrected), shaped like
      the parameters.
    nu: the grafting optimizer's second moment, shaped like the
      parameters; `optax.MaskedNode()` for a parameter that has none
      (grafting ``'sgd'``/``'none'``, or a leaf that SOAP preconditions in
      its eigenbasis).
    tensors: per parameter (in `jax.tree.leaves` order) its per-dimension
      factors (``tensor_shaping='per_dimension'``) or None.
    layouts: static: per parameter its block structure.
    classes: per block class (`block_classes`) a `BlockClassState`; on a
      device mesh each stack is padded to a multiple of the device count
      (see `mesh`).
    consecutive_skips: updates skipped in a row up to now (0 after an
      applied update); a growing value means a stuck run.
    overflow_skips: the skipped updates whose gradients were finite but so
      large that their squares overflow (also in `nonfinite_skips`).
    plan: static: the device mesh the stacks are laid out for.
    refresh_kind: static: what a refresh of the factors computes.
  """

  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]
  nonfinite_skips: jax.Array
  mu: Any
  nu: Any
  tensors: tuple
  layouts: tuple
  classes: tuple
  consecutive_skips: jax.Array
  overflow_skips: jax.Array
  plan: layout.Plan = layout.Plan()
  refresh_kind: RefreshKind = RefreshKind()

  def leaf_states(self) -> list:
    """Each parameter's `LeafState`, in `jax.tree.leaves` order."""
    graft = jax.tree.structure(self.mu).flatten_up_to(self.nu)
    return [LeafState(m, None if isinstance(n, optax.MaskedNode) else n,
                      layout, tensor)
            for m, n, layout, tensor in zip(
                jax.tree.leaves(self.mu), graft, self.layouts, self.tensors)]

  @property
  def leaves(self):
    """`leaf_states` in the parameters' tree structure (a read-only view)."""
    return jax.tree.structure(self.mu).unflatten(self.leaf_states())


def with_leaf_states(state: ScaleByFoamState, leaf_states) -> ScaleByFoamState:
  """`state` with its per-parameter fields taken from `leaf_states`."""
  treedef = jax.tree.structure(state.mu)
  return state._replace(
      mu=treedef.unflatten([ls.momentum for ls in leaf_states]),
      nu=treedef.unflatten([
          optax.MaskedNode() if ls.graft_second_moment is None
          else ls.graft_second_moment for ls in leaf_states]),
      tensors=tuple(ls.tensor for ls in leaf_states))


def block_classes(state: ScaleByFoamState) -> tuple:
  """The `layout.BlockClass` of each entry of ``state.classes``."""
  return layout.block_classes(list(state.layouts))


def find_states(tree, kind=None) -> list:
  """Every `kind` NamedTuple (default `ScaleByFoamState`) inside `tree`, an
  optimizer state of any chain or wrapper, in `jax.tree.leaves` order, with
  Flax NNX variables replaced by their values (`plain_arrays`)."""
  kind = kind or ScaleByFoamState
  is_kind = lambda x: isinstance(x, kind)
  return [plain_arrays(x) for x in jax.tree.leaves(tree, is_leaf=is_kind)
          if is_kind(x)]
