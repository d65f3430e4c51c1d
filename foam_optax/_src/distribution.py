"""How block stacks are divided among the devices of a mesh.

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
`factors.refresh` also rebalances that work when one device holds more than
its share of the factors that asked (see there).
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.core
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from foam_optax._src import layout


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
