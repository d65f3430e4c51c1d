"""Shardings of an optimizer state on a device mesh.

`state_sharding` places every array of a foam_optax state:

* per-parameter arrays (momentum, grafting second moment) take the sharding
  of their parameter;
* the per-factor stacks (`FactorState` fields and rotated second moments,
  whose leading axis runs over the blocks of a block class) are split along
  that block axis over the mesh, so each device stores, and decomposes, only
  its share of the blocks. A stack whose block count is not a multiple of the
  number of devices on the chosen axes is replicated;
* counters and other scalars are replicated.

Subtrees of other transformations in a chain (e.g. AdamW's moments inside
`optax.partition`) that have the parameters' tree structure follow the
parameters' shardings; any other array is replicated.

The eigendecompositions of a stack are divided among devices when the
transformation uses ``grouping='bucket'`` (one batched `eigh` per stack,
which the SPMD partitioner splits along the block axis). With
``grouping='map'`` each factor is visited by a sequential loop, and the loop
gathers the stack on every device.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from foam_optax._src.transform import GroupState, LeafState, ScaleByFoamState


def _block_spec(shape, mesh: Mesh, axes: tuple) -> PartitionSpec:
  size = 1
  for a in axes:
    size *= mesh.shape[a]
  if len(shape) >= 1 and shape[0] % size == 0:
    return PartitionSpec(axes if len(axes) > 1 else axes[0])
  return PartitionSpec()


def _foam_sharding(state: ScaleByFoamState, params_sharding, mesh: Mesh,
                   axes: tuple) -> ScaleByFoamState:
  replicated = NamedSharding(mesh, PartitionSpec())
  treedef = jax.tree.structure(params_sharding)
  leaf_states = treedef.flatten_up_to(state.leaves)
  stack = lambda x: NamedSharding(mesh, _block_spec(x.shape, mesh, axes))

  def leaf(ls, param_sharding):
    if not isinstance(ls, LeafState):   # e.g. optax.masked's MaskedNode
      return ls
    follow = lambda x: None if x is None else param_sharding
    return LeafState(follow(ls.momentum), follow(ls.graft_second_moment),
                     ls.layout)

  leaves = [leaf(ls, s) for ls, s in
            zip(leaf_states, treedef.flatten_up_to(params_sharding))]
  groups = tuple(
      GroupState(*(None if part is None else jax.tree.map(stack, part)
                   for part in gs))
      for gs in state.groups)
  return ScaleByFoamState(replicated, replicated, treedef.unflatten(leaves),
                          groups)


def state_sharding(opt_state, params, params_sharding,
                   block_axes: Optional[Union[str, Sequence[str]]] = None) -> Any:
  """NamedShardings for `opt_state`, with block stacks split across devices.

  Args:
    opt_state: a state (or `jax.eval_shape` of one) of a foam_optax
      transformation, alias, or any optax chain or wrapper around them.
    params: the parameters (arrays or `jax.ShapeDtypeStruct`s).
    params_sharding: a `NamedSharding` per parameter, in the parameters' tree
      structure; all on one mesh.
    block_axes: mesh axis name(s) the block axis of factor stacks is split
      over; by default all axes of the mesh.

  Returns:
    A pytree of `NamedSharding` with the structure of `opt_state`, usable as
    `jax.jit` in/out shardings or with `jax.device_put`.

  Example:
    >>> abstract = jax.eval_shape(tx.init, params)
    >>> shardings = state_sharding(abstract, params, params_shardings)
    >>> state = jax.jit(tx.init, out_shardings=shardings)(params)
  """
  mesh = jax.tree.leaves(params_sharding)[0].mesh
  axes = tuple(mesh.axis_names) if block_axes is None else (
      (block_axes,) if isinstance(block_axes, str) else tuple(block_axes))
  replicated = NamedSharding(mesh, PartitionSpec())
  params_def = jax.tree.structure(params_sharding)
  shapes = lambda tree: [tuple(getattr(x, "shape", ()))
                         for x in jax.tree.leaves(tree)]
  param_shapes = shapes(params)
  # A subtree shaped like the parameters (same structure and leaf shapes).
  is_param_like = lambda x: (
      not isinstance(x, ScaleByFoamState)
      and jax.tree.structure(x) == params_def and shapes(x) == param_shapes)

  def place(x):
    if isinstance(x, ScaleByFoamState):
      return _foam_sharding(x, params_sharding, mesh, axes)
    if is_param_like(x):
      return params_sharding
    return replicated

  return jax.tree.map(
      place, opt_state,
      is_leaf=lambda x: isinstance(x, ScaleByFoamState) or is_param_like(x))
