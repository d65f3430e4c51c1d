"""The mesh plan: where the blocks of each class stack land on the devices
(every block once, padding at the ends of a device's range, lone blocks of
different stacks on different devices, interleaved check ranks), and an
update on a one-device explicit mesh (the 8-device mesh:
test_multi_device.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import foam_optax as fo
from foam_optax._src import layout
from foam_optax._src import mesh as mesh_lib


def test_update_on_a_one_device_explicit_mesh():
  """Sharding types on Explicit axes constrain every reshape, also on a
  mesh of one device (which distributes nothing)."""
  mesh = jax.make_mesh((1,), ("x",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    params = {"w": jax.device_put(jnp.ones((8, 4)),
                                  jax.NamedSharding(mesh, P("x"))),
              "b": jnp.zeros(4)}
    tx = fo.foam(1e-3)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params),
                                    tx.init(params), params)
    assert jax.typeof(updates["w"]).sharding.spec == P("x", None)
    assert bool(jnp.all(jnp.isfinite(updates["w"])))


def _lone_block_class(size):
  return layout.BlockClass(size, size, True, True, ((0, 0),), (0,), 1)


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 8])
def test_slot_maps_hold_every_block_once_with_padding_at_the_ends(
    num_shards):
  layouts = [layout.leaf_layout(s, 4, None, True)
             for s in [(9, 9), (4, 12), (5,), (8, 8), (3, 3, 4)]]
  classes = layout.block_classes(layouts)
  maps = mesh_lib.slot_maps(classes, num_shards)
  for cls, slots in zip(classes, maps):
    assert len(slots) == -(-cls.count // num_shards) * num_shards
    assert sorted(slots[slots >= 0]) == list(range(cls.count))
    per = len(slots) // num_shards
    if cls.count % num_shards == 0:
      np.testing.assert_array_equal(slots, np.arange(cls.count))
    # Each device's contiguous range holds its blocks first, then padding.
    for device in range(num_shards):
      mine = slots[device * per:(device + 1) * per]
      held = int((mine >= 0).sum())
      assert (mine[:held] >= 0).all() and (mine[held:] == -1).all()
    positions = mesh_lib.positions(slots)
    np.testing.assert_array_equal(slots[positions], np.arange(cls.count))


def test_lone_blocks_of_different_stacks_go_to_different_devices():
  """Stacks of one block each: the most expensive first, each to the least
  loaded device, so no device holds two while another holds none."""
  sizes = [2, 8, 4, 6]
  maps = mesh_lib.slot_maps([_lone_block_class(s) for s in sizes], 4)
  devices = [int(np.flatnonzero(slots == 0)[0]) for slots in maps]
  assert sorted(devices) == [0, 1, 2, 3]
  # Largest cost first: the 8x8 block on device 0, the 6x6 on device 1, ...
  assert [devices[sizes.index(s)] for s in (8, 6, 4, 2)] == [0, 1, 2, 3]
  # Five lone blocks on four devices: the fifth joins the cheapest device.
  sizes = [8, 7, 6, 5, 2]
  maps = mesh_lib.slot_maps([_lone_block_class(s) for s in sizes], 4)
  devices = [int(np.flatnonzero(slots == 0)[0]) for slots in maps]
  assert devices[-1] == devices[sizes.index(5)]


@pytest.mark.parametrize("num_slots,num_shards", [(8, 1), (8, 2), (12, 4),
                                                   (16, 8)])
def test_interleaved_ranks_alternate_devices(num_slots, num_shards):
  ranks = mesh_lib.interleaved_ranks(num_slots, num_shards)
  assert sorted(ranks) == list(range(num_slots))
  device_of_rank = np.empty(num_slots, int)
  device_of_rank[ranks] = np.arange(num_slots) // (num_slots // num_shards)
  # Consecutive ranks (neighbouring check phases) on consecutive devices.
  np.testing.assert_array_equal(device_of_rank,
                                np.arange(num_slots) % num_shards)
