"""The update of `scale_by_foam`: its checks, mesh handling and skipping
(`update`), and the step of the parameter leaves (`update_tree`).

`update` checks the gradients and the state against the mesh, then runs the
step through `run_or_skip`, which skips it (zero updates, state kept,
counted) when the gradients are not finite or an enclosing `skip_nonfinite`
skips. `update_tree` advances every leaf's momentum and grafting moment
(`prepare`), stacks the leaves' blocks by block class, runs `blocks.step` on
the stacks (inside `shard_map` on a mesh), runs the per-dimension factors of
tensor leaves (`per_dimension`), and assembles each leaf's update in its own
shape and dtype.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import NamedTuple, Optional
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec
import optax

from foam_optax._src import blocks
from foam_optax._src import cross_fitting
from foam_optax._src import first_step
from foam_optax._src import grafting
from foam_optax._src import layout
from foam_optax._src import linalg
from foam_optax._src import mesh
from foam_optax._src import microbatches
from foam_optax._src import per_dimension
from foam_optax._src import preconditioners
from foam_optax._src import validation
from foam_optax._src.config import Config, with_arguments
from foam_optax._src.nnx import plain_arrays
from foam_optax._src.state import BlockClassState, LeafState
from foam_optax._src.state import ScaleByFoamState, with_leaf_states


# --- Skipping a step ---------------------------------------------------------


def _materialized(flag) -> jax.Array:
  """`flag`, computed once into a buffer of its own.

  A tree's finite flag is a chain of elementwise scalar operations over the
  leaves' reductions (an ``and`` per leaf). Every select of a skipped step
  reads it, and XLA's fusion copies such cheap producers into each consumer:
  on a 72-leaf GPT-2-small tree the chain was repeated in some 400 kernels
  (29,000 of the update's 115,000 HLO instructions, 7 of its 11 s of CPU
  compilation). The result of a conditional is a buffer, which fusion does
  not duplicate.
  """
  return lax.cond(flag, lambda: True, lambda: False)


def entries_finite(tree) -> jax.Array:
  """True when every entry of every leaf is finite."""
  leaves = jax.tree.leaves(tree)
  return _materialized(jnp.all(jnp.stack(
      [jnp.all(jnp.isfinite(x)) for x in leaves] or [jnp.asarray(True)])))


def gradients_finite(updates) -> jax.Array:
  """True when every leaf's sum of squares is finite in the statistics dtype.

  Rules out NaN and Inf, and gradients so large (|g| ~ 1e19 in float32) that
  their Gram matrices or squared entries would overflow. A gradient that is
  not floating-point raises, naming its leaf.
  """
  validation.check_gradient_dtypes(updates)
  leaves = jax.tree.leaves(updates)
  if not leaves:
    return jnp.asarray(True)
  return _materialized(jnp.all(jnp.stack(
      [jnp.isfinite(jnp.sum(jnp.square(g.astype(linalg.stat_dtype()))))
       for g in leaves])))


# A traced bool set by `skipped_when`: the enclosing `skip_nonfinite`
# wrapper's verdict, which every `scale_by_foam` update inside it obeys.
_OUTER_SKIP = contextvars.ContextVar("foam_optax_outer_skip", default=None)


@contextlib.contextmanager
def skipped_when(skip):
  """Within this context every `scale_by_foam` update also skips (and counts
  the step) when the traced bool `skip` is true; nested contexts combine."""
  outer = _OUTER_SKIP.get()
  token = _OUTER_SKIP.set(skip if outer is None else outer | skip)
  try:
    yield
  finally:
    _OUTER_SKIP.reset(token)


def zeroed(skip, tree):
  """`tree` with every leaf zero where the traced bool `skip` is true."""
  return jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), tree)


def _keep_class(new: BlockClassState, old: BlockClassState,
                keep) -> BlockClassState:
  """The class state to keep on a skipped step: the factor stacks as the
  step returned them, which by `run_or_skip`'s invariant are the old ones,
  bit for bit. They need no select, which on a CPU cost a pass over the
  largest arrays of the state; the rotated second moments (Adam's, which
  decays with b2 but also follows the bases' column orders) are selected.
  """
  moment = new.rotated_second_moment
  return BlockClassState(
      new.left, new.right,
      None if moment is None else keep(moment, old.rotated_second_moment))


def run_or_skip(run, inputs, state: ScaleByFoamState, step, traced,
                cfg: Config, params=None):
  """``run(inputs, state, step, traced)``, or a skipped step when the
  gradients (`inputs`: the updates and any microbatch gradients) are not
  finite (``cfg.skip_nonfinite``) or an enclosing `skip_nonfinite` skips.
  `params`, when given, lets a stuck run's error name non-finite parameters
  as its likelier cause.

  A skipped step is step 0 with b2 = 1: it runs the same computation with
  the step count 0, zero gradients (and microbatch gradients) and the
  statistics' decay b2 = 1, and the invariant that makes this a skip is
  that it leaves every factor stack (`FactorStack`: statistics, bases,
  eigenvalues, damping, counters, cached roots) bit for bit as it was:

  * step 0 is never a check step (checks start at s0 >= 1,
    `factors.is_check_step`), so no factor is decided, refreshed or
    committed;
  * each statistic's moving average becomes ``1·S + 0·(0·0ᵀ) = S``
    (`factors.accumulate`), on a statistics step or not.

  The factors therefore need no select (`_keep_class`); every other result
  (the updates, momentum, second moments, counters) is discarded by selects.
  tests/test_step.py checks the invariant on the step itself."""
  skip = _OUTER_SKIP.get()
  if cfg.skip_nonfinite:
    own = jnp.logical_not(gradients_finite(inputs))
    skip = own if skip is None else skip | own
  if skip is None:
    return run(inputs, state, step, traced)

  # One pass, no conditional over the state: step 0 with b2 = 1 (see the
  # docstring). The selects are fused by XLA into the arithmetic that
  # produces their inputs. Selects, not multiplications by a 0/1 flag:
  # NaN * 0 is NaN.
  traced = dict(traced, b2=jnp.where(skip, 1.0, cfg.b2))
  new_updates, new_state = run(zeroed(skip, inputs), state,
                               jnp.where(skip, 0, step), traced)
  keep = lambda new, old: jnp.where(skip, old, new)
  if cfg.skip_nonfinite:
    # Otherwise only the enclosing `skip_nonfinite` skips, and it zeroes the
    # whole chain's updates itself.
    new_updates = zeroed(skip, new_updates)
  consecutive = jnp.where(skip, optax.safe_increment(state.consecutive_skips),
                          jnp.zeros_like(state.consecutive_skips))
  if cfg.max_consecutive_skips is not None:
    validation.check_consecutive_skips(
        consecutive, cfg.max_consecutive_skips,
        True if params is None else entries_finite(params))
  # Finite entries whose squares overflow: skipped, and counted apart too.
  overflow = skip & entries_finite(inputs)
  return new_updates, state._replace(
      count=keep(step, state.count),
      nonfinite_skips=jnp.where(skip,
                                optax.safe_increment(state.nonfinite_skips),
                                state.nonfinite_skips),
      mu=jax.tree.map(keep, new_state.mu, state.mu),
      nu=jax.tree.map(keep, new_state.nu, state.nu),
      tensors=jax.tree.map(keep, new_state.tensors, state.tensors),
      classes=tuple(_keep_class(n, o, keep)
                    for n, o in zip(new_state.classes, state.classes)),
      consecutive_skips=consecutive,
      overflow_skips=jnp.where(overflow,
                               optax.safe_increment(state.overflow_skips),
                               state.overflow_skips))

# --- The step of the leaves --------------------------------------------------


class LeafStep(NamedTuple):
  """One leaf's per-step quantities, before preconditioning."""

  grad: jax.Array          # in the statistics dtype
  corrected: jax.Array     # bias-corrected momentum M_t
  graft_dir: Optional[jax.Array]
  state: LeafState         # momentum and grafting moment already advanced
  # Cross-fitting's held-out microbatch gradients; else None.
  samples: Optional[cross_fitting.Samples] = None


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
    numerator, samples = cross_fitting.Samples.split(micro.astype(g.dtype))
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
    square = g * g if samples is None else samples.mean_square()
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


def _sample_stack(leaf_steps, layouts, cls, slots):
  """(slots, J, m, n): the class's blocks of each cross-fitting sample
  (microbatch gradient); None without cross-fitting."""
  if leaf_steps[0].samples is None:
    return None
  return cross_fitting.Samples.stacked(
      [ls.samples for ls in leaf_steps],
      lambda arrays: class_stack(arrays, layouts, cls, slots))


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
      stacks, tuple(class_states), active, step,
      first_step.adam_step(step, cfg), cfg.traced())
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
  leaf_steps = [prepare(g, ls, first_step.adam_step(step, cfg), cfg, m)
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
          leaf.grad, leaf.corrected, state.tensor, step,
          first_step.adam_step(step, cfg), next_id, cfg, leaf.samples)
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
    direction, state = first_step.first_update(step, direction, state, old,
                                               cfg)
    updates.append(to_dtype(direction, grad.dtype))
    new_leaves.append(state)
  return updates, new_leaves, tuple(new_class_states)

# --- The update --------------------------------------------------------------


def _check_mesh(plan: layout.Plan, tree) -> None:
  """The state's plan against the mesh `update` runs under."""
  current = mesh.current_mesh(tree)
  if current is None:
    return
  if not plan.distributed:
    warnings.warn(
        f"foam_optax: updating under a mesh of {current.size} devices a state "
        "initialised without one: every device repeats every "
        "eigendecomposition. Initialise the state under the mesh (inside "
        "`with jax.set_mesh(mesh):`, or from parameters sharded on it).",
        stacklevel=4)
  elif dict(current.shape) != plan.shape:
    raise ValueError(
        f"the optimizer state was laid out for the mesh {plan.shape}"
        f" but is updated under {dict(current.shape)}; initialise it for this "
        "mesh, or move a saved state with `foam_optax.relayout`.")


def _specs(tree):
  return jax.tree.map(lambda x: jax.typeof(x).sharding.spec, tree)


def _apply(inputs, state: ScaleByFoamState, step, cfg: Config):
  """`inputs`: (updates, per leaf its microbatch gradients or None)."""
  updates, micro = inputs
  grads, treedef = jax.tree.flatten(updates)
  if treedef != jax.tree.structure(state.mu):
    raise ValueError(
        f"updates have the tree structure {treedef}, but the state was "
        f"initialised for {jax.tree.structure(state.mu)}.")
  new_updates, new_leaves, new_classes = update_tree(
      grads, state.leaf_states(), state.classes, step, cfg, state.plan,
      micro)
  return treedef.unflatten(new_updates), with_leaf_states(
      state, new_leaves)._replace(count=step, classes=new_classes)


def update(updates, state: ScaleByFoamState, cfg: Config, params=None,
           microbatch_grads=None):
  """The update of `scale_by_foam` for an already validated `Config`.

  The updates come back with exactly the structure of `updates`, and the
  state with that of `state`: wrappers such as Flax's ``nnx.Param`` stay
  (the computation runs on their leaves, in the same order).
  `microbatch_grads` feed the cross-fitting of ``bias_correction``; without
  it they are unused, which `microbatches.ignored` reports.
  """
  structure, state_structure = map(jax.tree.structure, (updates, state))
  updates, state = plain_arrays(updates), plain_arrays(state)
  validation.check_gradient_dtypes(updates)
  micro = None
  if cfg.bias_correction != "none":
    micro = microbatches.checked(
        microbatch_grads, updates, 4,
        f"bias_correction={cfg.bias_correction!r}", even=True)
  else:
    microbatches.ignored(microbatch_grads,
                         "this transformation (bias_correction='none')")
  _check_mesh(state.plan, state)
  validation.check_structure(list(state.layouts), cfg)
  run = with_arguments(_apply, cfg)
  explicit = mesh.typed_mesh((updates, state, params),
                                     single_device=True)
  if explicit is not None:
    # On Explicit axes every reshape of a sharded array would need its output
    # sharding spelled out; let the partitioner place the intermediates and
    # return every array with the sharding it came in with.
    def run(inputs, state, step, traced, inner=run):
      with jax.sharding.use_abstract_mesh(explicit):
        return jax.sharding.auto_axes(
            inner, out_sharding=(_specs(inputs[0]), _specs(state)))(
                inputs, state, step, traced)  # pyright: ignore[reportCallIssue]
  new_updates, new_state = run_or_skip(
      run, (updates, micro), state, optax.safe_increment(state.count),
      cfg.traced(), cfg, params)
  return (structure.unflatten(jax.tree.leaves(new_updates)),
          state_structure.unflatten(jax.tree.leaves(new_state)))
