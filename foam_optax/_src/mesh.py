"""The device mesh: how block stacks are divided among its devices, and the
shardings of a state laid out for it.

A state initialised under a device mesh records that mesh (as a static
`Plan` in its tree structure). Every block stack then holds a multiple of the
mesh's device count, is split along its block axis over all mesh axes, and
`update` runs the per-block work (statistics, staleness checks,
eigendecompositions, preconditioning) inside `jax.shard_map`, each device on
its own slice. Three choices shape that layout:

* **Padding.** A stack whose block count is not a multiple of the device count
  gets padding slots: identity factors that are never checked or refreshed
  and see zero gradients, so they change no result.
* **Placement by cost.** Which slots hold real blocks is chosen across all
  stacks at once, largest eigendecomposition cost first, each block to the
  device with the least cost so far (as Meta's Distributed Shampoo assigns
  blocks to ranks), so a device that holds the lone block of one stack holds
  padding in the next. Stacks that divide evenly keep their natural order, so
  their layout does not depend on the device count.
* **Check phases** (``stagger=True``) are interleaved across devices: the
  factors that check on the same step lie on different devices.

Which factors need a fresh eigendecomposition is only known at run time, so
`refresh.refresh` also rebalances that work when one device holds more than
its share of the factors that asked (see `refresh`).

The shardings of a state so laid out: `state_sharding` places every array:

* the per-factor stacks (`FactorStack` fields and rotated second moments,
  whose leading axis runs over the blocks of a block class) are split along
  that block axis over all mesh axes: each device stores, checks and
  decomposes only its share of the factors;
* per-parameter arrays (momentum, grafting second moment) take their
  parameter's sharding and are further split over the mesh axes that the
  parameter does not use, on the first dimension that divides evenly (as
  ZeRO does for data-parallel training), so replicated parameters do not
  mean replicated optimizer state;
* counters and other scalars are replicated.

Subtrees of other transformations in a chain (e.g. AdamW's moments inside
`optax.partition`) that have the parameters' tree structure follow the
parameters' shardings; any other array is replicated.

`relayout` moves a saved state to another mesh.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import jax
import jax.core
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec
import numpy as np
import optax

from foam_optax._src import layout
from foam_optax._src.nnx import plain_arrays
from foam_optax._src.state import BlockClassState
from foam_optax._src.state import ScaleByFoamState


def _usable(mesh) -> Optional[AbstractMesh]:
  """`mesh` as an AbstractMesh when it has more than one device."""
  if mesh is None or getattr(mesh, "empty", True):
    return None
  mesh = getattr(mesh, "abstract_mesh", mesh)
  return mesh if mesh.size > 1 else None


def typed_mesh(tree, *, single_device: bool = False
               ) -> Optional[AbstractMesh]:
  """The mesh in the sharding types of `tree`'s arrays (Explicit axes).

  A mesh of one device distributes nothing and is ignored, unless
  `single_device`: its sharding types still constrain every reshape.
  """
  for x in jax.tree.leaves(tree):
    try:
      sharding = jax.typeof(x).sharding
    except (TypeError, AttributeError):
      continue
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or getattr(mesh, "empty", True):
      continue
    mesh = getattr(mesh, "abstract_mesh", mesh)
    if (mesh.size > 1 or single_device) and any(
        t == AxisType.Explicit for t in mesh.axis_types):
      return mesh
  return None


def current_mesh(tree=None) -> Optional[AbstractMesh]:
  """The mesh computations run under: `jax.set_mesh`'s, else the one in the
  arrays' sharding types, else (outside `jit`) the arrays' own placement."""
  mesh = _usable(jax.sharding.get_abstract_mesh())
  if mesh is not None or tree is None:
    return mesh
  mesh = typed_mesh(tree)
  if mesh is not None:
    return mesh
  for x in jax.tree.leaves(tree):
    if not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
      continue
    sharding = x.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      mesh = _usable(sharding.mesh)
      if mesh is not None:
        return mesh
  return None


def padded_count(count: int, num_shards: int) -> int:
  return -(-count // num_shards) * num_shards


def _block_cost(cls: layout.BlockClass) -> int:
  """Eigendecomposition cost of one block of the class, in m³ units."""
  return cls.rows ** 3 * cls.left + cls.cols ** 3 * cls.right


def slot_maps(classes: Sequence[layout.BlockClass],
              num_shards: int) -> tuple:
  """For each class, an int array over its stack's slots: the class's block
  held by each slot, or -1 for padding.

  A stack of ``count`` blocks gets ``padded_count(count, num_shards)`` slots,
  ``per = slots / num_shards`` on each device (contiguous ranges). Classes
  that divide evenly keep the natural order. The others are placed largest
  cost first: each of their blocks goes to the device with the least cost so
  far that still has a free slot in that stack.
  """
  loads = np.zeros(num_shards)
  maps: list[Optional[np.ndarray]] = [None] * len(classes)
  uneven = []
  for c, cls in enumerate(classes):
    if cls.count % num_shards == 0:
      maps[c] = np.arange(cls.count)
      loads += _block_cost(cls) * cls.count / num_shards
    else:
      uneven.append(c)
  for c in sorted(uneven, key=lambda c: -_block_cost(classes[c])):
    cls = classes[c]
    per = padded_count(cls.count, num_shards) // num_shards
    used = np.zeros(num_shards, int)
    slots = np.full(per * num_shards, -1)
    for block in range(cls.count):
      free = np.flatnonzero(used < per)
      device = free[np.argmin(loads[free])]
      slots[device * per + used[device]] = block
      used[device] += 1
      loads[device] += _block_cost(cls)
    maps[c] = slots
  return tuple(maps)


def interleaved_ranks(num_slots: int, num_shards: int) -> np.ndarray:
  """Rank of each slot when slots are taken one per device in turn.

  Slot ``s`` (device ``s // per``, local index ``s % per``) gets rank
  ``(s % per) * num_shards + s // per``, so consecutive ranks (which
  `stagger` gives neighbouring check phases) lie on different devices.
  """
  per = num_slots // num_shards
  slot = np.arange(num_slots)
  return (slot % per) * num_shards + slot // per if per else slot


def is_natural(slots) -> bool:
  """Whether a slot map is the identity: no padding, blocks in order."""
  return bool((slots == np.arange(len(slots))).all())


def positions(slots) -> np.ndarray:
  """The slot of each block (0, 1, …) of a class, from its slot map."""
  order = np.argsort(np.where(slots < 0, len(slots), slots), kind="stable")
  return order[:int((slots >= 0).sum())]


def state_slot_maps(state: ScaleByFoamState) -> tuple:
  """For each entry of ``state.classes``, the block held by each stack slot
  (-1: padding); see `slot_maps`."""
  return slot_maps(layout.block_classes(list(state.layouts)),
                   state.plan.num_shards)


# --- Shardings of a state ----------------------------------------------------

def _axes_of(entry) -> tuple:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _split_further(shape, spec: PartitionSpec, mesh: Mesh) -> PartitionSpec:
  """`spec` with the mesh axes it leaves unused added to the first
  dimension that they (together with its own axes) divide evenly."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  used = {a for e in entries for a in _axes_of(e)}
  free = tuple(a for a in mesh.axis_names if a not in used)
  if not free:
    return spec
  for dim, entry in enumerate(entries):
    axes = _axes_of(entry) + free
    if shape[dim] % math.prod(mesh.shape[a] for a in axes) == 0:
      entries[dim] = axes[0] if len(axes) == 1 else axes
      return PartitionSpec(*entries)
  return spec


def _foam_sharding(state: ScaleByFoamState, params_sharding,
                   mesh: Mesh) -> ScaleByFoamState:
  replicated = NamedSharding(mesh, PartitionSpec())
  if not state.plan.distributed:
    if mesh.size > 1:
      raise ValueError(
          f"the optimizer state was initialised without a device mesh, so its "
          f"factor stacks cannot be divided among the mesh's {mesh.size} "
          "devices. Initialise it under the mesh: inside `with "
          "jax.set_mesh(mesh):`, or from parameters sharded on it.")
    stack = replicated
  else:
    if state.plan.shape != dict(mesh.shape):
      raise ValueError(
          f"the optimizer state was laid out for the mesh "
          f"{state.plan.shape}, not {dict(mesh.shape)}.")
    stack = NamedSharding(mesh, PartitionSpec(state.plan.block_spec))

  def follow(buffers):
    """A parameter-shaped tree of buffers (arrays, or optax.MaskedNode where
    a parameter has none) placed like the parameters, further split over
    the mesh axes a parameter leaves unused."""
    def one(x, param_sharding):
      return NamedSharding(
          mesh, _split_further(x.shape, param_sharding.spec, mesh))
    # The parameters' structure: inside `optax.masked` the buffers hold a
    # MaskedNode where a parameter is masked out.
    treedef = jax.tree.structure(params_sharding)
    return treedef.unflatten([
        x if isinstance(x, optax.MaskedNode) else one(x, sharding)
        for x, sharding in zip(treedef.flatten_up_to(buffers),
                               jax.tree.leaves(params_sharding))])

  classes = tuple(
      BlockClassState(*(None if part is None else jax.tree.map(lambda _: stack,
                                                          part)
                   for part in gs))
      for gs in state.classes)
  # A tensor leaf's per-dimension factors stay whole on every device.
  return state._replace(count=replicated, nonfinite_skips=replicated,
                        overflow_skips=replicated,
                        consecutive_skips=replicated, mu=follow(state.mu),
                        nu=follow(state.nu),
                        tensors=jax.tree.map(lambda _: replicated,
                                             state.tensors),
                        classes=classes)


def state_sharding(opt_state, params, params_sharding) -> Any:
  """NamedShardings for `opt_state`, with factor stacks split across devices.

  Args:
    opt_state: a state (or `jax.eval_shape` of one) of a foam_optax
      transformation, alias, or any optax chain or wrapper around them,
      initialised under the mesh of `params_sharding` (inside
      ``with jax.set_mesh(mesh):``, or from parameters sharded on it).
    params: the parameters (arrays or `jax.ShapeDtypeStruct` objects;
      Flax NNX variables holding them are read through).
    params_sharding: a `NamedSharding` per parameter, in the parameters' tree
      structure (e.g. ``nnx.get_named_sharding(params, mesh)``); all on one
      mesh.

  Returns:
    A pytree of `NamedSharding` with the structure of `opt_state`, usable as
    `jax.jit` in/out shardings or with `jax.device_put`.

  Raises:
    ValueError: if the state was initialised for another mesh, or without
      one while the mesh has several devices.

  Example:
    >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
    >>> with jax.set_mesh(mesh):
    ...   abstract = jax.eval_shape(tx.init, params)
    ...   shardings = state_sharding(abstract, params, params_shardings)
    ...   state = jax.jit(tx.init, out_shardings=shardings)(params)
  """
  # Flax NNX variables (in the state, the parameters or their shardings)
  # are placed by their values; the result keeps the state's structure.
  structure = jax.tree.structure(opt_state)
  opt_state, params, params_sharding = map(
      plain_arrays, (opt_state, params, params_sharding))
  mesh = jax.tree.leaves(params_sharding)[0].mesh
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
      return _foam_sharding(x, params_sharding, mesh)
    if is_param_like(x):
      return params_sharding
    return replicated

  return structure.unflatten(jax.tree.leaves(jax.tree.map(
      place, opt_state,
      is_leaf=lambda x: isinstance(x, ScaleByFoamState) or is_param_like(x))))


def _relayout_core(source: ScaleByFoamState,
                   target: ScaleByFoamState) -> ScaleByFoamState:
  if source.layouts != target.layouts:
    raise ValueError("relayout: the two states belong to different "
                     "parameters or block settings.")
  classes = []
  for src, dst, src_slots, dst_slots in zip(
      source.classes, target.classes, state_slot_maps(source),
      state_slot_maps(target)):
    src_pos = positions(src_slots)
    dst_pos = positions(dst_slots)

    def move(s, d):
      # On the host: the two states may live on different devices.
      moved = np.array(jax.device_get(d))
      moved[dst_pos] = np.asarray(jax.device_get(s))[src_pos]
      return jax.device_put(moved, getattr(d, "sharding", None))
    classes.append(jax.tree.map(move, src, dst))
  return target._replace(count=source.count,
                         nonfinite_skips=source.nonfinite_skips,
                         overflow_skips=source.overflow_skips,
                         consecutive_skips=source.consecutive_skips,
                         mu=source.mu, nu=source.nu, tensors=source.tensors,
                         classes=tuple(classes))


def relayout(opt_state, target):
  """`opt_state`'s values in the layout of `target` (another device count).

  A state initialised under a mesh pads each factor stack to a multiple of
  the device count and places its blocks by cost (see `state_sharding`), so
  a state saved on one mesh may not fit another. `relayout` moves every
  factor to its slot in `target`'s layout, keeps `target`'s padding slots,
  and copies everything else from `opt_state`. The moved stacks come back
  placed like `target`'s; the copied arrays as they were in `opt_state`;
  the whole in `target`'s tree structure (Flax NNX variables included: the
  sharding annotations of a state laid out for a mesh, see
  `foam_optax.state_sharding`).

  Args:
    opt_state: the state to move (e.g. restored from a checkpoint in the
      layout it was saved with).
    target: an initialised state in the wanted layout (e.g.
      ``jax.jit(tx.init, out_shardings=...)(params)`` under the new mesh).

  Returns:
    A state with `target`'s structure and `opt_state`'s values.

  Example:
    >>> with jax.set_mesh(new_mesh):
    ...   target = jax.jit(tx.init, out_shardings=shardings)(params)
    >>> state = jax.device_put(fo.relayout(restored, target), shardings)
  """
  is_core = lambda x: isinstance(x, ScaleByFoamState)

  def move(dst, src):
    if not is_core(dst):
      return src
    moved = _relayout_core(plain_arrays(src), plain_arrays(dst))
    return jax.tree.structure(dst).unflatten(jax.tree.leaves(moved))
  return jax.tree.map(move, target, opt_state, is_leaf=is_core)
