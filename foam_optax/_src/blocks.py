"""The per-block work of a step: factor pipeline, then preconditioning.

Blocks of one shape across the whole parameter tree form a block class
(`layout.BlockClass`) whose gradients, momenta and factors are stacked
along one leading axis. `step` advances every class's factor stacks with
`factors.advance` and returns each class's preconditioned directions. On a
device mesh it runs inside `jax.shard_map` over the block axis, each device
on its own slice of every stack (`mesh`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from foam_optax._src import cross_fitting
from foam_optax._src import factors
from foam_optax._src import first_step
from foam_optax._src import grafting
from foam_optax._src import layout
from foam_optax._src import linalg
from foam_optax._src import mesh
from foam_optax._src import preconditioners
from foam_optax._src.config import Config
from foam_optax._src.state import BlockClassState


class ClassBlocks(NamedTuple):
  """One block class's (k, m, n) stacks of this step's per-block inputs."""

  grad: jax.Array
  momentum: jax.Array                 # bias-corrected M_t
  graft: Optional[jax.Array]          # grafting direction (root-inverse)
  # (k, J, m, n) cross-fitting samples: the statistics' microbatches.
  samples: Optional[cross_fitting.Samples] = None


_SIDES = (("left", linalg.gram_left), ("right", linalg.gram_right))


def _statistic_term(blocks_c: ClassBlocks, side, gram):
  """This step's term of a side's statistic: the gradient's Gram, or the
  mean Gram of the cross-fitting samples."""
  if blocks_c.samples is None:
    return gram(blocks_c.grad)
  return blocks_c.samples.side(side).mean_gram()


def num_block_factors(classes) -> int:
  """Factors over all block classes: the ids of tensor leaves' factors
  start after them."""
  return sum(cls.count * (cls.left + cls.right) for cls in classes)


def _factor_ids(first_id, slots, count, plan: layout.Plan):
  """Ids of this device's `count` factor slots of one stack.

  A factor's id is `first_id` plus the index of its block in the class
  (`slots`: the class's block per slot, -1 for padding, which gets -1), so
  it does not depend on how the stack is laid out over a mesh: randomized
  controllers draw the same probes for a factor on any number of devices.
  """
  blocks = jnp.asarray(slots, jnp.int32)
  if plan.distributed:   # the stack is split into contiguous equal shards
    blocks = lax.dynamic_slice_in_dim(
        blocks, lax.axis_index(plan.axes) * count, count)
  return jnp.where(blocks < 0, -1, first_id + blocks)


def _direction(blocks: ClassBlocks, old: BlockClassState, left, right,
               orders, adam_step, step, cfg: Config):
  """(direction, rotated second moment) of one class given its new factor
  stacks `left`, `right` and their bases' column `orders`."""
  if not cfg.eigenvalue_corrected:
    direction = preconditioners.root_inverse(blocks.momentum, left, right, cfg)
    return grafting.rescale(direction, blocks.graft, cfg), None
  # The rotated second moment follows the reordered columns of new bases,
  # before this step's rotation ('updated') or after it ('previous', which
  # rotates with the bases of the previous step).
  follow = lambda m: preconditioners.permute(m, *orders)
  previous = cfg.rotation_basis == "previous"
  rotating = (old.left, old.right) if previous else (left, right)
  moment = old.rotated_second_moment
  direction, moment = preconditioners.eigenvalue_corrected(
      blocks.grad, blocks.momentum, moment if previous else follow(moment),
      *map(preconditioners.basis, rotating), adam_step, cfg, blocks.samples)  # pyright: ignore[reportCallIssue]
  if previous:
    moment = follow(moment)
  moment = first_step.rotated_moment(step, old.rotated_second_moment, moment,
                                     cfg)
  return direction, moment.astype(old.rotated_second_moment.dtype)  # pyright: ignore[reportOptionalMemberAccess]


def step(blocks, states, active, step, adam_step, cfg: Config, *, classes,
         plan: layout.Plan):
  """Every block class's per-block work; per device under `shard_map`.

  Args:
    blocks: per class its `ClassBlocks`.
    states: per class its `BlockClassState`.
    active: per class (k,) bool: the slot holds a block (not padding).
    step: the 1-based step (0 on a skipped step).
    adam_step: the step of the momentum's and Adam's bias corrections.
    cfg: hyperparameters.
    classes: the static `layout.BlockClass` of each class.
    plan: the mesh the stacks are laid out for.

  Returns:
    (per class the (k, m, n) preconditioned direction, new class states).
  """
  slot_maps = mesh.slot_maps(classes, plan.num_shards)
  sides, stacks, ids, act, terms = [], [], [], [], []
  first_id = 0   # id of the stack's first block (`_factor_ids`)
  for c, (cls, state, blocks_c) in enumerate(zip(classes, states, blocks)):
    for name, gram in _SIDES:
      if getattr(cls, name):
        sides.append((c, name))
        stacks.append(getattr(state, name))
        ids.append(_factor_ids(first_id, slot_maps[c], active[c].shape[0],
                               plan))
        act.append(active[c])
        terms.append((blocks_c, name, gram))
        first_id += cls.count
  samples = None
  if cfg.bias_correction == "cross_fit_variance":
    samples = lambda: [b.samples.side(name) for b, name, _ in terms]  # pyright: ignore[reportOptionalMemberAccess]
  new_stacks, new_orders = factors.advance(
      stacks, lambda: [_statistic_term(*t) for t in terms], ids, step, cfg,
      plan, active=act, samples=samples)
  new = [dict(left=None, right=None) for _ in states]
  orders = [dict(left=None, right=None) for _ in states]
  for (c, name), fs, order in zip(sides, new_stacks, new_orders):
    new[c][name], orders[c][name] = fs, order

  directions, new_states = [], []
  for blocks_c, old, stacks_c, orders_c in zip(blocks, states, new, orders):
    direction, moment = _direction(
        blocks_c, old, stacks_c["left"], stacks_c["right"],
        (orders_c["left"], orders_c["right"]), adam_step, step, cfg)
    directions.append(direction)
    new_states.append(BlockClassState(stacks_c["left"], stacks_c["right"],
                                      moment))
  return tuple(directions), tuple(new_states)
