"""The step of each parameter leaf: momentum and grafting, block stacks in,
directions out.

`update_tree` advances every leaf's momentum and grafting moment, stacks the
leaves' blocks by block class, runs `blocks.step` on the stacks (inside
`shard_map` on a mesh), runs the per-dimension factors of tensor leaves
(`tensors`), and assembles each leaf's update in its own shape and dtype.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from foam_optax._src import blocks
from foam_optax._src import cross_fitting
from foam_optax._src import mesh
from foam_optax._src import grafting
from foam_optax._src import linalg
from foam_optax._src import preconditioners
from foam_optax._src import layout
from foam_optax._src import per_dimension
from foam_optax._src.config import Config, with_arguments
from foam_optax._src.state import LeafState


class LeafStep(NamedTuple):
  """One leaf's per-step quantities, before preconditioning."""

  grad: jax.Array          # in the statistics dtype
  corrected: jax.Array     # bias-corrected momentum M_t
  graft_dir: Optional[jax.Array]
  state: LeafState         # momentum and grafting moment already advanced
  # Cross-fitting: the second group's (J, *shape) microbatch gradients,
  # whose statistics the factors and second moments take; else None.
  samples: Optional[jax.Array] = None


def adam_step(step, cfg: Config):
  """The step of the momentum's and Adam's bias corrections: with
  ``first_step='init_only'`` the first gradient only initialises, so they
  count from the second (clamped at 1 on the first step, whose results are
  discarded)."""
  if cfg.init_only_first_step:
    return jnp.maximum(step - 1, 1)
  return step


def prepare(grad, ls: LeafState, step, cfg: Config, micro=None) -> LeafStep:
  """Momentum, grafting direction and advanced buffers of one leaf;
  `step` is the bias corrections' (`adam_step`). With `micro` (the leaf's
  (J, *shape) microbatch gradients, ``bias_correction`` on) the momentum
  takes the first half's mean and every second moment the second half's
  (cross-fitting)."""
  if tuple(grad.shape) != ls.layout.shape:
    raise ValueError(f"update of shape {tuple(grad.shape)} does not match the "
                     f"shape {ls.layout.shape} the state was initialised with.")
  # Computations in the statistics' dtype; the buffers are cast on load
  # and store (`mu_dtype`, `second_moment_dtype`).
  g = grad.astype(linalg.stat_dtype())
  numerator, samples = g, None
  if micro is not None:
    micro = micro.astype(g.dtype)
    half = micro.shape[0] // 2
    numerator, samples = jnp.mean(micro[:half], axis=0), micro[half:]
  b1 = jnp.asarray(cfg.b1, g.dtype)
  momentum = b1 * ls.momentum.astype(g.dtype) + (1 - b1) * numerator
  corrected = momentum
  if cfg.ema_bias_correction:
    corrected = momentum / (1 - b1 ** step)
  graft_moment = ls.graft_second_moment
  if cfg.eigenvalue_corrected and (ls.layout.preconditioned or
                                   ls.tensor is not None):
    graft_dir = None   # Adam runs in the eigenbasis
  elif cfg.eigenvalue_corrected and cfg.grafting == "adam":
    # No factor: Adam in the identity basis with the eigenbasis Adam's
    # decay and epsilon, as SOAP steps such leaves.
    square = g * g if samples is None else jnp.mean(samples ** 2, axis=0)
    graft_dir, new_graft_moment = preconditioners.adam_in_basis(
        square, corrected, graft_moment.astype(g.dtype), step, cfg.b2,  # pyright: ignore[reportOptionalMemberAccess]
        cfg.adam_eps, bound=cross_fitting.bound_for(cfg, cfg.b2, step,
                                                    samples=samples))
    graft_moment = new_graft_moment.astype(graft_moment.dtype)  # pyright: ignore[reportOptionalMemberAccess]
  else:
    graft_dir, new_graft_moment = grafting.direction(
        None if graft_moment is None else graft_moment.astype(g.dtype),
        g, corrected, step, cfg, samples)
    if graft_moment is not None:
      graft_moment = new_graft_moment.astype(graft_moment.dtype)  # pyright: ignore[reportOptionalMemberAccess]
  return LeafStep(g, corrected, graft_dir, ls._replace(
      momentum=momentum.astype(ls.momentum.dtype),
      graft_second_moment=graft_moment), samples)


def class_stack(arrays, layouts, cls: layout.BlockClass, slots):
  """(slots, m, n) stack of every block of the class cut from the leaves'
  `arrays`, with zero blocks in the padding slots."""
  stacks = []
  for i, j in cls.members:
    matrices = layout.to_matrices(arrays[i], layouts[i])
    stacks.append(layout.extract(matrices, layouts[i].groups[j]))
  stack = stacks[0] if len(stacks) == 1 else jnp.concatenate(stacks)
  if mesh.is_natural(slots):
    return stack
  stack = jnp.concatenate([stack, jnp.zeros_like(stack[:1])])
  return stack[jnp.where(slots < 0, cls.count, slots)]


def _unslot(direction, slots):
  """The class's blocks in member order from a (slots, m, n) stack."""
  if mesh.is_natural(slots):
    return direction
  return direction[mesh.positions(slots)]


def to_dtype(direction, dtype):
  """`direction` in the parameter's dtype, saturating instead of overflowing.

  A finite float32 direction beyond float16's range (e.g. with
  ``grafting='none'`` and a tiny damping) would otherwise become inf.
  """
  if jnp.finfo(dtype).max < jnp.finfo(direction.dtype).max:
    limit = jnp.finfo(dtype).max.astype(direction.dtype)
    direction = jnp.clip(direction, -limit, limit)
  return direction.astype(dtype)


def _keep_on_first_step(step, old, new):
  """`old` on the first step, else `new` (trees alike): the moments an
  initialising first step must leave untouched."""
  return jax.tree.map(lambda o, n: jnp.where(step == 1, o, n), old, new)


def _sample_stack(leaf_steps, layouts, cls, slots):
  """(slots, J, m, n): the class's blocks of each cross-fitting sample
  (microbatch gradient); None without cross-fitting."""
  if leaf_steps[0].samples is None:
    return None
  per_sample = jax.vmap(lambda arrays: class_stack(arrays, layouts, cls,
                                                   slots))(
      [ls.samples for ls in leaf_steps])
  return jnp.moveaxis(per_sample, 0, 1)


def _class_directions(leaf_steps, class_states, step, cfg: Config, plan):
  """Per leaf, per block group, the (count, m, n) preconditioned direction;
  and the new class states."""
  layouts = [ls.state.layout for ls in leaf_steps]
  classes = layout.block_classes(layouts)
  slot_maps = mesh.slot_maps(classes, plan.num_shards)
  stack = lambda field, cls, slots: class_stack(
      [getattr(ls, field) for ls in leaf_steps], layouts, cls, slots)
  stacks = tuple(
      blocks.ClassBlocks(
          stack("grad", cls, slots), stack("corrected", cls, slots),
          stack("graft_dir", cls, slots) if grafting.borrows_norm(cfg)
          else None,
          _sample_stack(leaf_steps, layouts, cls, slots))
      for cls, slots in zip(classes, slot_maps))
  active = tuple(jnp.asarray(slots >= 0) for slots in slot_maps)
  block_step = with_arguments(
      functools.partial(blocks.step, classes=classes, plan=plan), cfg)
  if plan.distributed:
    stacked, replicated = PartitionSpec(plan.block_spec), PartitionSpec()
    block_step = jax.shard_map(
        block_step, mesh=plan.mesh(),
        in_specs=(stacked, stacked, stacked) + (replicated,) * 3,
        out_specs=(stacked, stacked),
        # Per-factor branches mix per-device and replicated values; every
        # output is per device, so the replication check has nothing to add.
        check_vma=False)
  class_directions, new_states = block_step(
      stacks, tuple(class_states), active, step, adam_step(step, cfg),
      cfg.traced())
  directions = [[None] * len(leaf.groups) for leaf in layouts]
  for cls, slots, direction in zip(classes, slot_maps, class_directions):
    direction = _unslot(direction, slots)
    for (i, j), start in zip(cls.members, cls.offsets):
      count = layouts[i].groups[j].count
      directions[i][j] = direction[start:start + count]
  return directions, new_states


def update_tree(grads, leaf_states, class_states, step, cfg: Config,
                plan: layout.Plan, micro=None):
  """Updates and new (leaf states, class states) for flat lists of leaves;
  `micro`, per leaf its (J, *shape) microbatch gradients (cross-fitting)."""
  micro = micro or [None] * len(grads)
  leaf_steps = [prepare(g, ls, adam_step(step, cfg), cfg, m)
                for g, ls, m in zip(grads, leaf_states, micro)]
  directions, new_class_states = _class_directions(
      leaf_steps, class_states, step, cfg, plan)
  next_id = blocks.num_block_factors(
      layout.block_classes([ls.layout for ls in leaf_states]))
  updates, new_leaves = [], []
  for grad, leaf, stacks, old in zip(grads, leaf_steps, directions,
                                     leaf_states):
    state = leaf.state
    if state.tensor is not None:
      # Per leaf, outside the block stacks: every device runs it whole.
      direction, tensor = per_dimension.update(
          leaf.grad, leaf.corrected, state.tensor, step, adam_step(step, cfg),
          next_id, cfg, leaf.samples)
      next_id += layout.num_factors(state.tensor.layout)
      state = state._replace(tensor=tensor)
    elif not state.layout.preconditioned:
      direction = leaf.graft_dir
    else:
      direction = layout.assemble(stacks, state.layout)
      if not cfg.eigenvalue_corrected:
        # Before the first check only the grafting optimizer steps.
        direction = jnp.where(step >= cfg.first_check_step, direction,
                              leaf.graft_dir)  # pyright: ignore[reportArgumentType]
    if cfg.init_only_first_step:
      # The first gradient only builds the statistics and first bases.
      direction = jnp.where(step == 1, jnp.zeros_like(direction), direction)  # pyright: ignore[reportArgumentType]
      state = state._replace(
          momentum=_keep_on_first_step(step, old.momentum, state.momentum),
          graft_second_moment=_keep_on_first_step(
              step, old.graft_second_moment, state.graft_second_moment))
      if state.tensor is not None:
        state = state._replace(tensor=state.tensor._replace(
            rotated_second_moment=_keep_on_first_step(
                step, old.tensor.rotated_second_moment,
                state.tensor.rotated_second_moment)))
    updates.append(to_dtype(direction, grad.dtype))
    new_leaves.append(state)
  return updates, new_leaves, tuple(new_class_states)
