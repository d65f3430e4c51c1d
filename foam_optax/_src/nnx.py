"""Flax NNX variables in the optimizer's trees: reading through them, and
the sharding annotations of a state laid out for a device mesh.

`nnx.split(model, nnx.Param)` and `nnx.Optimizer` hand the optimizer its
parameters wrapped in ``nnx.Param`` variables. The computations read plain
arrays (`plain_arrays`); `update` returns the state in the structure it came
in.

Flax NNX shards a model and its optimizer from annotations on the variables
(``nnx.with_partitioning``): `nnx.get_partition_spec` reads a
``PartitionSpec`` from each `nnx.Variable` of a state and gives ``P()`` to
every plain array. optax's states keep the parameters' ``nnx.Param``
wrappers (their moments are `jax.tree.map` over the parameters), so their
parameter-shaped buffers follow the parameters. `annotate` gives a
`ScaleByFoamState` the same form:

* per-parameter buffers (momentum, grafting second moment) keep their
  parameter's variable, metadata included;
* each array of a factor stack (and of the rotated second moments) is an
  ``nnx.OptState`` annotated to be split along its block axis over all mesh
  axes, the layout of `mesh.state_sharding`;
* counters and per-dimension factors of tensor leaves stay plain arrays
  (replicated, as `state_sharding` places them).

Only states laid out for a mesh of several devices whose parameters hold NNX
variables are annotated; every other state is unchanged.

Flax is not a dependency: a tree can hold NNX variables only once the caller
has imported `flax.nnx`.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import jax
import optax

if TYPE_CHECKING:
  from foam_optax._src.state import ScaleByFoamState


def is_variable(x) -> bool:
  """Whether `x` is a Flax NNX variable (``nnx.Param`` and the like).

  Flax is not a dependency: a tree can hold NNX variables only once the
  caller has imported `flax.nnx`.
  """
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.Variable)


def plain_arrays(tree):
  """`tree` with Flax NNX variables replaced by the values they hold.

  `nnx.split(model, nnx.Param)` and `nnx.Optimizer` hand the optimizer
  parameters wrapped in `nnx.Param` variables; the state keeps plain
  arrays, and trees built from the parameters (dimension numbers) are read
  without the wrappers.
  """
  # `get_value` from Flax 0.12 on (where `.value` is deprecated).
  unwrap = lambda v: v.get_value() if hasattr(v, "get_value") else v.value
  return jax.tree.map(lambda x: unwrap(x) if is_variable(x) else x, tree,
                      is_leaf=is_variable)


def _holds_variables(params) -> bool:
  return any(is_variable(x)
             for x in jax.tree.leaves(params, is_leaf=is_variable))


def _in_variables_of(params, buffers):
  """`buffers` (the parameters' structure without wrappers, an array or
  `optax.MaskedNode` per parameter) with each array in a copy of its
  parameter's variable, as `jax.tree.map` over the parameters makes it."""
  def wrap(param, buffer):
    if not is_variable(param) or isinstance(buffer, optax.MaskedNode):
      return buffer
    # Unflattening copies the metadata without re-running the variable's
    # constructor (which may shard its value eagerly).
    return jax.tree.structure(param).unflatten([buffer])
  return jax.tree.map(wrap, params, buffers, is_leaf=is_variable)


def _block_axis_annotated(stack, block_spec):
  """Each array of `stack` in an ``nnx.OptState`` annotated to be split
  along its leading (block) axis by `block_spec`."""
  nnx = sys.modules["flax.nnx"]
  # Flax shards an annotated variable when it is created, which needs the
  # mesh in context; without one the annotation alone is recorded.
  eager = False if jax.sharding.get_abstract_mesh().empty else None

  def annotated(x):
    spec = (block_spec,) + (None,) * (x.ndim - 1)
    return nnx.OptState(nnx.with_partitioning(lambda: x, spec)(),
                        eager_sharding=eager)
  return jax.tree.map(annotated, stack)


def annotate(state: ScaleByFoamState, params) -> ScaleByFoamState:
  """`state` with the Flax NNX sharding annotations of its mesh layout.

  Args:
    state: a state from `init`, its per-parameter buffers plain arrays.
    params: the parameters `init` received (NNX variables, or arrays).

  Returns:
    `state` itself unless it is laid out for a mesh and `params` hold NNX
    variables; then the state in the form described in the module
    docstring, whose `nnx.get_partition_spec` divides the factor stacks
    over the mesh and places the buffers like their parameters.
  """
  if not state.plan.distributed or not _holds_variables(params):
    return state
  block = lambda stacks: _block_axis_annotated(stacks, state.plan.block_spec)
  return state._replace(mu=_in_variables_of(params, state.mu),
                        nu=_in_variables_of(params, state.nu),
                        classes=block(state.classes))
