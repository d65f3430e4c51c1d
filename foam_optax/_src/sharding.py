"""Shardings of an optimizer state on a device mesh.

A state initialised under a mesh (see `distribution`) stacks its factors in
multiples of the device count. `state_sharding` places every array:

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
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np
import optax

from foam_optax._src import distribution
from foam_optax._src.state import BlockClassState
from foam_optax._src.state import ScaleByFoamState
from foam_optax._src.nnx import plain_arrays
from foam_optax._src.state import slot_maps


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
      source.classes, target.classes, slot_maps(source), slot_maps(target)):
    src_pos = distribution.positions(src_slots)
    dst_pos = distribution.positions(dst_slots)

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
