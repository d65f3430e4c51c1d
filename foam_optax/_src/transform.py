"""`scale_by_foam`: the core transformation behind every optimizer here."""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import sys
from typing import Any, NamedTuple, Optional
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec
import optax

from foam_optax._src import distribution
from foam_optax._src import factors
from foam_optax._src import grafting
from foam_optax._src import guards
from foam_optax._src import linalg
from foam_optax._src import preconditioners
from foam_optax._src import shaping
from foam_optax._src import tensors
from foam_optax._src.config import Config, static_int, validate
from foam_optax._src.config import Grafting, RefreshBatching, Preconditioner
from foam_optax._src.config import Proxy, RefreshMethod, RootDamping
from foam_optax._src.controllers import Controller
from foam_optax._src.deprecation import renamed_argument
from foam_optax._src.factors import FactorState


class BlockClassState(NamedTuple):
  """State of one block class: every block of one shape in the tree, stacked.

  The leading axis of every array runs over the class's blocks (see
  `shaping.BlockClass`); None marks a side that is not preconditioned, or
  a part the preconditioner does not use.
  """

  left: Optional[FactorState]
  right: Optional[FactorState]
  rotated_second_moment: Optional[jax.Array]   # (k, m, n), eigenvalue-corrected


class LeafState(NamedTuple):
  """One parameter's part of `ScaleByFoamState` (see its `leaf_states`)."""

  momentum: jax.Array                  # EMA of gradients (not bias-corrected)
  graft_second_moment: Optional[jax.Array]
  layout: shaping.LeafLayout           # static: no arrays
  # Per-dimension factors of a tensor leaf (``tensor_shaping='per_dimension'``).
  tensor: Optional[tensors.TensorState] = None


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
    groups: per block class (`block_classes`) a `BlockClassState`; on a device
      mesh each stack is padded to a multiple of the device count (see
      `distribution`).
    consecutive_skips: updates skipped in a row up to now (0 after an
      applied update); a growing value means a stuck run.
    plan: static: the device mesh the stacks are laid out for.
  """

  count: jax.Array
  nonfinite_skips: jax.Array
  mu: Any
  nu: Any
  tensors: tuple
  layouts: tuple
  groups: tuple
  consecutive_skips: jax.Array
  plan: distribution.Plan = distribution.Plan()

  def leaf_states(self) -> list:
    """Each parameter's `LeafState`, in `jax.tree.leaves` order."""
    return [LeafState(m, None if isinstance(n, optax.MaskedNode) else n,
                      layout, tensor)
            for m, n, layout, tensor in zip(
                jax.tree.leaves(self.mu), _graft_leaves(self.mu, self.nu),
                self.layouts, self.tensors)]

  @property
  def leaves(self):
    """`leaf_states` in the parameters' tree structure (a read-only view)."""
    return jax.tree.structure(self.mu).unflatten(self.leaf_states())


def _graft_leaves(mu, nu) -> list:
  """`nu`'s entry for each leaf of `mu`: an array or `optax.MaskedNode`."""
  return jax.tree.structure(mu).flatten_up_to(nu)


def _with_leaf_states(state: ScaleByFoamState, leaf_states) -> ScaleByFoamState:
  """`state` with its per-parameter fields taken from `leaf_states`."""
  treedef = jax.tree.structure(state.mu)
  return state._replace(
      mu=treedef.unflatten([ls.momentum for ls in leaf_states]),
      nu=treedef.unflatten([
          optax.MaskedNode() if ls.graft_second_moment is None
          else ls.graft_second_moment for ls in leaf_states]),
      tensors=tuple(ls.tensor for ls in leaf_states))


def block_classes(state: ScaleByFoamState) -> tuple:
  """The `shaping.BlockClass` of each entry of ``state.groups``."""
  return shaping.block_classes(list(state.layouts))


def slot_maps(state: ScaleByFoamState) -> tuple:
  """For each entry of ``state.groups``, the block held by each stack slot
  (-1: padding); see `distribution.slot_maps`."""
  return distribution.slot_maps(block_classes(state), state.plan.num_shards)


def _layout(path, shape, dimension_numbers, cfg: Config) -> shaping.LeafLayout:
  try:
    return shaping.leaf_layout(
        shape, static_int("block_size", cfg.block_size),
        static_int("max_precond_dim", cfg.max_precond_dim),
        cfg.precondition_1d, dimension_numbers)
  except ValueError as e:
    if dimension_numbers is None:
      raise
    raise ValueError(f"weight_dimension_numbers of parameter "
                     f"{jax.tree_util.keystr(path)}: {e}") from e


def _dimension_numbers(params, num_leaves, cfg: Config) -> list:
  """Each leaf's dimension numbers (None: the default reshaping).

  `cfg.weight_dimension_numbers` is None, a pytree that is a prefix of the
  parameters with dimension numbers or None at its leaves, or a callable of
  the parameters returning one.
  """
  spec = cfg.weight_dimension_numbers
  if callable(spec):
    spec = spec(params)
  if spec is None:
    return [None] * num_leaves
  is_leaf = lambda x: x is None or shaping.is_dimension_numbers(x)
  prefix = jax.tree.structure(spec, is_leaf=is_leaf)
  try:
    subtrees = prefix.flatten_up_to(params)
  except (ValueError, TypeError) as e:
    raise ValueError("weight_dimension_numbers must be a prefix of the "
                     f"parameters' tree structure: {e}") from e
  numbers = []
  for dims, subtree in zip(jax.tree.leaves(spec, is_leaf=is_leaf), subtrees):
    numbers.extend([dims] * len(jax.tree.leaves(subtree)))
  return numbers


def _reject_complex(paths_and_leaves):
  for path, p in paths_and_leaves:
    if jnp.iscomplexobj(p):
      raise ValueError(
          f"parameter {jax.tree_util.keystr(path)} is complex "
          f"({jnp.result_type(p)}); foam_optax supports real parameters "
          "only. Split it into real and imaginary parts.")


def _storage(dtype, default):
  return default if dtype is None else jnp.dtype(dtype)


class _ShapeDependent:
  """Stands for the fields whose structure depends on parameter shapes
  (block-class states, layouts, tensor factors) in what `init` returns for
  optax's parameter placeholder (`optax.tree.map_params`), which has no
  shapes. `map_params` then passes those fields whole to its
  ``transform_non_params``."""


def _is_params_placeholder(params) -> bool:
  return (type(params).__name__ == "_ParamsPlaceholder"
          and type(params).__module__.startswith("optax"))


def _layouts(path, shape, dimension_numbers, cfg: Config):
  """(LeafLayout, TensorLayout or None) of a leaf."""
  if cfg.tensor_shaping == "per_dimension" and dimension_numbers is None:
    return tensors.layouts(
        shape, cfg, static_int("block_size", cfg.block_size),
        static_int("max_precond_dim", cfg.max_precond_dim))
  return _layout(path, shape, dimension_numbers, cfg), None


def _phases(stack_sizes, num_shards, cfg: Config) -> list:
  """Deterministic check offsets spreading factors over the check period.

  Factors are ranked stack after stack; inside a stack the ranks alternate
  between devices (`distribution.interleaved_ranks`), so the factors of one
  check step are spread over the mesh rather than landing on one device.

  With ``first_step='init_only'`` every offset is one less: the step count
  of the schedule then starts at the second gradient, as SOAP's does (its
  refreshes follow the updates ``t - 1 = f, 2f, ...``).
  """
  total = sum(stack_sizes)
  offset = _uniform_phase(cfg)
  phases, start = [], 0
  for size in stack_sizes:
    if not cfg.stagger:
      phases.append(jnp.full((size,), offset, jnp.int32))
      continue
    rank = jnp.asarray(
        start + distribution.interleaved_ranks(size, num_shards), jnp.int32)
    freq = jnp.asarray(cfg.check_frequency, jnp.int32)
    phases.append((rank * freq) // total + offset)
    start += size
  return phases


def _uniform_phase(cfg: Config) -> int:
  """The check offset that `_phases` gives every factor without stagger."""
  return -1 if cfg.init_only_first_step else 0


def _plain_arrays(tree):
  """`tree` with Flax NNX variables replaced by the arrays they hold.

  `nnx.Optimizer` hands `init` its parameters as `nnx.Param` variables; the
  state keeps plain arrays, not wrapped in them.
  Flax is not a dependency: a tree can hold NNX variables only once the
  caller has imported `flax.nnx`.
  """
  nnx = sys.modules.get("flax.nnx")
  if nnx is None:
    return tree
  is_variable = lambda x: isinstance(x, nnx.Variable)
  # `get_value` from Flax 0.12 on (where `.value` is deprecated).
  unwrap = lambda v: v.get_value() if hasattr(v, "get_value") else v.value
  return jax.tree.map(lambda x: unwrap(x) if is_variable(x) else x, tree,
                      is_leaf=is_variable)


def _init(params, cfg: Config) -> ScaleByFoamState:
  dtype = linalg.stat_dtype()
  params = _plain_arrays(params)
  paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  _reject_complex(paths_and_leaves)
  leaves = [p for _, p in paths_and_leaves]
  placeholder = _is_params_placeholder(params)   # has no leaves
  dimension_numbers = [] if placeholder else _dimension_numbers(
      params, len(leaves), cfg)
  both = [_layouts(path, jnp.shape(p), dims, cfg) for (path, p), dims in
          zip(paths_and_leaves, dimension_numbers)]
  layouts = [lay for lay, _ in both]
  tensor_layouts = [tensor for _, tensor in both]
  plan = distribution.Plan.for_mesh(distribution.current_mesh(leaves))
  if plan.distributed and cfg.refresh_batching == "bucket":
    # Measured on 8 CPU devices: with the batched refresh the collectives
    # around the per-device work reached the devices in different orders
    # and the step deadlocked; the per-factor refresh runs.
    raise ValueError(
        "refresh_batching='bucket' is not supported on a device mesh (its "
        "batched refresh deadlocked the step's collectives on 8 CPU "
        "devices); use refresh_batching='map', which divides the "
        "eigendecompositions among the devices and skips each factor's "
        "individually.")
  classes = shaping.block_classes(layouts)
  slots = [len(s) for s in distribution.slot_maps(classes, plan.num_shards)]
  sides = [(size, side) for cls, size in zip(classes, slots)
           for side in (cls.left, cls.right) if side]
  # Each per-dimension factor of a tensor leaf is a stack of one.
  num_tensor_factors = sum(map(tensors.num_factors, tensor_layouts))
  phases = iter(_phases([size for size, _ in sides] + [1] * num_tensor_factors,
                        plan.num_shards, cfg))

  def factor(count, size, active):
    if not active:
      return None
    return factors.init_factor_state(
        count, size, cfg.epsilon, next(phases), dtype,
        exponent=(cfg.exponent if cfg.cache_inverse_root
                  and not cfg.eigenvalue_corrected else None),
        storage=factor_storage, pseudo_inverse_rtol=cfg.pseudo_inverse_rtol)

  factor_storage = {
      "statistic": _storage(cfg.factor_matrix_dtype, dtype),
      "basis": _storage(cfg.factor_matrix_eigenvectors_dtype, dtype),
      "inverse_root": _storage(cfg.inv_factor_matrix_dtype, dtype)}
  second_moment_dtype = _storage(cfg.second_moment_dtype, dtype)
  groups = tuple(
      BlockClassState(
          left=factor(count, c.rows, c.left),
          right=factor(count, c.cols, c.right),
          rotated_second_moment=(
              jnp.zeros((count, c.rows, c.cols), second_moment_dtype)
              if cfg.eigenvalue_corrected else None))
      for c, count in zip(classes, slots))
  momenta, graft_moments, tensor_states = [], [], []
  for p, lay, tensor_layout in zip(leaves, layouts, tensor_layouts):
    shape = jnp.shape(p)
    tensor = None
    if tensor_layout is not None:
      tensor = tensors.init_state(tensor_layout, phases, cfg, dtype)
    in_eigenbasis = cfg.eigenvalue_corrected and (
        lay.preconditioned or tensor is not None)
    needs_graft_moment = (cfg.grafting in grafting.USES_SECOND_MOMENT and
                          not in_eigenbasis)
    momenta.append(
        jnp.zeros(shape, _storage(cfg.mu_dtype, jnp.result_type(p))))
    graft_moments.append(jnp.zeros(shape, second_moment_dtype)
                         if needs_graft_moment else optax.MaskedNode())
    tensor_states.append(tensor)
  if placeholder:
    # optax's parameter placeholder: `map_params` maps over the fields
    # returned as the placeholder itself, which must be whole copies of the
    # parameter tree in every state. `nu` is one when every leaf has a
    # grafting moment, which root-inverse preconditioning with Adam or
    # RMSProp grafting guarantees.
    every_leaf_grafts = (cfg.grafting in grafting.USES_SECOND_MOMENT
                         and not cfg.eigenvalue_corrected)
    shape_dependent = _ShapeDependent()
    return ScaleByFoamState(
        count=jnp.zeros([], jnp.int32),
        nonfinite_skips=jnp.zeros([], jnp.int32),
        mu=params, nu=params if every_leaf_grafts else shape_dependent,
        tensors=shape_dependent, layouts=shape_dependent,
        groups=shape_dependent, consecutive_skips=jnp.zeros([], jnp.int32),
        plan=plan)
  return ScaleByFoamState(
      count=jnp.zeros([], jnp.int32),
      nonfinite_skips=jnp.zeros([], jnp.int32),
      mu=treedef.unflatten(momenta), nu=treedef.unflatten(graft_moments),
      tensors=tuple(tensor_states), layouts=tuple(layouts), groups=groups,
      consecutive_skips=jnp.zeros([], jnp.int32), plan=plan)


_SIDES = (("left", linalg.gram_left), ("right", linalg.gram_right))


def _factor_ids(first_id, slots, count, plan: distribution.Plan):
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


def _block_step(blocks, groups, active, step, cfg: Config, *, classes,
                plan: distribution.Plan):
  """Every block class's per-block work; per device under `shard_map`.

  Args:
    blocks: per class ``(grad, momentum, graft)`` stacks of (k, m, n) blocks
      (``graft`` None in eigenvalue-corrected mode).
    groups: per class its `BlockClassState`.
    active: per class (k,) bool: the slot holds a block (not padding).
    step: the 1-based step.

  Returns:
    (per class the (k, m, n) preconditioned direction, new class states).
  """
  correction = factors.bias_correction(step, cfg, linalg.stat_dtype())
  # Phase 1: statistics.
  sides = []   # (class index, side name, checks, ids)
  loaded, gram_inputs = [], []
  slot_maps = distribution.slot_maps(classes, plan.num_shards)
  first_id = 0   # id of the stack's first block (factor ids, `_factor_ids`)
  for c, (cls, gs, (grad, _, _), act) in enumerate(
      zip(classes, groups, blocks, active)):
    for name, gram in _SIDES:
      if getattr(cls, name):
        # Computed in the statistics' dtype, cast back to storage below.
        fs = factors.load(getattr(gs, name), grad.dtype)
        checks = factors.is_check_step(step, fs.phase, cfg) & act
        ids = _factor_ids(first_id, slot_maps[c], checks.shape[0], plan)
        first_id += cls.count
        sides.append((c, name, checks, ids))
        loaded.append(fs)
        gram_inputs.append((gram, grad))
  states = factors.maybe_accumulate(
      step, loaded, lambda: [gram(grad) for gram, grad in gram_inputs], cfg)

  def check(states):
    """Phases 2-4 for every stack: decisions, fresh bases, new states;
    returns the new states and their bases' column orders."""
    decisions = [
        factors.decide(fs, checks, correction, cfg,
                       factors.probe_keys(step, ids, cfg))
        for fs, (_, _, checks, ids) in zip(states, sides)]
    # Which factors need a fresh basis, known on every device.
    needs = [checks & d.refresh for (_, _, checks, _), d in zip(sides, decisions)]
    stack_requests = [None] * len(needs)
    if plan.distributed and needs:
      gathered = lax.all_gather(jnp.concatenate(needs), plan.axes, tiled=True)
      gathered = gathered.reshape(plan.num_shards, -1)
      bounds = [0]
      for need in needs:
        bounds.append(bounds[-1] + need.shape[0])
      stack_requests = factors.requests(
          [gathered[:, a:b].reshape(-1)
           for a, b in zip(bounds[:-1], bounds[1:])], plan.num_shards)
    new, orders = [], []
    for fs, (_, _, checks, _), decision, need, requests in zip(
        states, sides, decisions, needs, stack_requests):
      fresh = factors.refresh(fs, need, correction, cfg, plan, requests)
      new_fs, order = factors.commit(fs, checks, decision, fresh, cfg)
      new.append(new_fs)
      orders.append(order)
    return new, orders

  if cfg.stagger:
    checked, side_orders = check(states)
  else:
    # Every factor has the same check steps: a step without checks (most
    # steps) skips phases 2-4 with one conditional for all stacks.
    unchecked = lambda: (states, [
        jnp.broadcast_to(jnp.arange(fs.eigvals.shape[-1]), fs.eigvals.shape)
        for fs in states])
    checked, side_orders = lax.cond(
        factors.is_check_step(step, _uniform_phase(cfg), cfg),
        lambda: check(states), unchecked)
  new_states = [dict(gs._asdict()) for gs in groups]
  orders = [dict(left=None, right=None) for _ in groups]
  for (c, name, _, _), new_fs, order in zip(sides, checked, side_orders):
    orders[c][name] = order
    new_states[c][name] = factors.store(new_fs, getattr(groups[c], name))

  # Preconditioned directions.
  adam_step = _adam_step(step, cfg)
  directions, new_groups = [], []
  for (grad, momentum, graft), gs, order, state in zip(
      blocks, groups, orders, new_states):
    left, right = state["left"], state["right"]
    if cfg.eigenvalue_corrected:
      # The rotated second moment follows the reordered columns of new
      # bases, before this step's rotation ('updated') or after it
      # ('previous', which rotates with the bases of the previous step).
      follow = lambda m: preconditioners.permute(m, order["left"],
                                                 order["right"])
      previous = cfg.rotation_basis == "previous"
      rotating = (gs.left, gs.right) if previous else (left, right)
      moment = gs.rotated_second_moment
      direction, moment = preconditioners.eigenvalue_corrected(
          grad, momentum, moment if previous else follow(moment),
          *map(preconditioners.basis, rotating), adam_step, cfg)
      if previous:
        moment = follow(moment)
      if cfg.init_only_first_step:
        moment = _keep_on_first_step(step, gs.rotated_second_moment, moment)
      moment = moment.astype(gs.rotated_second_moment.dtype)
    else:
      direction = grafting.rescale(
          preconditioners.root_inverse(momentum, left, right, cfg), graft,
          cfg)
      moment = None
    directions.append(direction)
    new_groups.append(BlockClassState(left, right, moment))
  return tuple(directions), tuple(new_groups)


def _to_dtype(direction, dtype):
  """`direction` in the parameter's dtype, saturating instead of overflowing.

  A finite float32 direction beyond float16's range (e.g. with
  ``grafting='none'`` and a tiny damping) would otherwise become inf.
  """
  if jnp.finfo(dtype).max < jnp.finfo(direction.dtype).max:
    limit = jnp.finfo(dtype).max.astype(direction.dtype)
    direction = jnp.clip(direction, -limit, limit)
  return direction.astype(dtype)


class _LeafStep(NamedTuple):
  """One leaf's per-step quantities, before preconditioning."""

  grad: jax.Array          # in the statistics dtype
  corrected: jax.Array     # bias-corrected momentum M_t
  graft_dir: Optional[jax.Array]
  state: LeafState         # momentum and grafting moment already advanced


def _prepare_leaf(grad, ls: LeafState, step, cfg: Config) -> _LeafStep:
  layout = ls.layout
  if tuple(grad.shape) != layout.shape:
    raise ValueError(f"update of shape {tuple(grad.shape)} does not match the "
                     f"shape {layout.shape} the state was initialised with.")
  # Computations in the statistics' dtype; the buffers are cast on load
  # and store (`mu_dtype`, `second_moment_dtype`).
  g = grad.astype(linalg.stat_dtype())
  b1 = jnp.asarray(cfg.b1, g.dtype)
  momentum = b1 * ls.momentum.astype(g.dtype) + (1 - b1) * g
  corrected = momentum / (1 - b1 ** step)
  graft_moment = ls.graft_second_moment
  if cfg.eigenvalue_corrected and (layout.preconditioned or
                                   ls.tensor is not None):
    graft_dir = None   # Adam runs in the eigenbasis
  elif cfg.eigenvalue_corrected and cfg.grafting == "adam":
    # No factor: Adam in the identity basis, as SOAP steps such leaves.
    graft_dir, new_graft_moment = preconditioners.adam_in_basis(
        g, corrected, graft_moment.astype(g.dtype), step, cfg.graft_b2,
        cfg.graft_eps)
    graft_moment = new_graft_moment.astype(graft_moment.dtype)
  else:
    graft_dir, new_graft_moment = grafting.direction(
        None if graft_moment is None else graft_moment.astype(g.dtype),
        g, corrected, step, cfg)
    if graft_moment is not None:
      graft_moment = new_graft_moment.astype(graft_moment.dtype)
  return _LeafStep(g, corrected, graft_dir, ls._replace(
      momentum=momentum.astype(ls.momentum.dtype),
      graft_second_moment=graft_moment))


def _class_blocks(leaf_steps, field, cls: shaping.BlockClass, slots):
  """(slots, m, n) stack of `field` over every block of the class, with
  zero blocks in the padding slots."""
  blocks = []
  for i, j in cls.members:
    layout = leaf_steps[i].state.layout
    matrices = shaping.to_matrices(getattr(leaf_steps[i], field), layout)
    blocks.append(shaping.extract(matrices, layout.groups[j]))
  stack = blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks)
  if distribution.is_natural(slots):
    return stack
  stack = jnp.concatenate([stack, jnp.zeros_like(stack[:1])])
  return stack[jnp.where(slots < 0, cls.count, slots)]


def _unslot(direction, slots):
  """The class's blocks in member order from a (slots, m, n) stack."""
  if distribution.is_natural(slots):
    return direction
  return direction[distribution.positions(slots)]


def _adam_step(step, cfg: Config):
  """The step of the momentum's and Adam's bias corrections: with
  ``first_step='init_only'`` the first gradient only initialises, so they
  count from the second (clamped at 1 on the first step, whose results are
  discarded)."""
  if cfg.init_only_first_step:
    return jnp.maximum(step - 1, 1)
  return step


def _keep_on_first_step(step, old, new):
  """`old` on the first step, else `new` (trees alike): the moments an
  initialising first step must leave untouched."""
  return jax.tree.map(lambda o, n: jnp.where(step == 1, o, n), old, new)


def _update_tree(grads, leaf_states, groups, step, cfg: Config,
                 plan: distribution.Plan):
  """Updates and new (leaf states, class states) for flat lists of leaves."""
  leaf_steps = [_prepare_leaf(g, ls, _adam_step(step, cfg), cfg)
                for g, ls in zip(grads, leaf_states)]
  classes = shaping.block_classes([ls.layout for ls in leaf_states])
  slot_maps = distribution.slot_maps(classes, plan.num_shards)
  fields = ("grad", "corrected") + (
      () if cfg.eigenvalue_corrected else ("graft_dir",))
  blocks = tuple(
      tuple(_class_blocks(leaf_steps, f, cls, slots) for f in fields)
      + ((None,) if cfg.eigenvalue_corrected else ())
      for cls, slots in zip(classes, slot_maps))
  active = tuple(jnp.asarray(slots >= 0) for slots in slot_maps)
  block_step = _with_arguments(
      functools.partial(_block_step, classes=classes, plan=plan), cfg)
  if plan.distributed:
    stacked, replicated = PartitionSpec(plan.block_spec), PartitionSpec()
    block_step = jax.shard_map(
        block_step, mesh=plan.mesh(),
        in_specs=(stacked, stacked, stacked, replicated, replicated),
        out_specs=(stacked, stacked),
        # Per-factor branches mix per-device and replicated values; every
        # output is per device, so the replication check has nothing to add.
        check_vma=False)
  class_directions, new_groups = block_step(
      blocks, tuple(groups), active, step, _traced_hyperparameters(cfg))

  # directions[i][j]: the (count, m, n) direction of group j of leaf i.
  directions = [[None] * len(ls.layout.groups) for ls in leaf_states]
  for cls, slots, direction in zip(classes, slot_maps, class_directions):
    direction = _unslot(direction, slots)
    for (i, j), start in zip(cls.members, cls.offsets):
      count = leaf_states[i].layout.groups[j].count
      directions[i][j] = direction[start:start + count]

  updates, new_leaves = [], []
  for grad, leaf, stacks, old in zip(grads, leaf_steps, directions,
                                     leaf_states):
    layout, state = leaf.state.layout, leaf.state
    if state.tensor is not None:
      # Per leaf, outside the block stacks: every device runs it whole.
      direction, tensor = tensors.update(
          leaf.grad, leaf.corrected, state.tensor, step, _adam_step(step, cfg),
          cfg)
      state = state._replace(tensor=tensor)
    elif not layout.preconditioned:
      direction = leaf.graft_dir
    else:
      direction = shaping.assemble(stacks, layout)
      if not cfg.eigenvalue_corrected:
        # Before the first check only the grafting optimizer steps.
        direction = jnp.where(step >= cfg.first_check_step, direction,
                              leaf.graft_dir)
    if cfg.init_only_first_step:
      # The first gradient only builds the statistics and first bases.
      direction = jnp.where(step == 1, jnp.zeros_like(direction), direction)
      state = state._replace(
          momentum=_keep_on_first_step(step, old.momentum, state.momentum),
          graft_second_moment=_keep_on_first_step(
              step, old.graft_second_moment, state.graft_second_moment))
      if state.tensor is not None:
        state = state._replace(tensor=state.tensor._replace(
            rotated_second_moment=_keep_on_first_step(
                step, old.tensor.rotated_second_moment,
                state.tensor.rotated_second_moment)))
    updates.append(_to_dtype(direction, grad.dtype))
    new_leaves.append(state)
  return updates, new_leaves, tuple(new_groups)


def all_finite(updates) -> jax.Array:
  """True when every leaf's sum of squares is finite in the statistics dtype.

  Rules out NaN and Inf, and gradients so large (|g| ~ 1e19 in float32) that
  their Gram matrices or squared entries would overflow.
  """
  leaves = jax.tree.leaves(updates)
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack(
      [jnp.isfinite(jnp.sum(jnp.square(g.astype(linalg.stat_dtype()))))
       for g in leaves]))


def _check_mesh(plan: distribution.Plan, tree) -> None:
  """The state's plan against the mesh `update` runs under."""
  mesh = distribution.current_mesh(tree)
  if mesh is None:
    return
  if not plan.distributed:
    warnings.warn(
        f"foam_optax: updating under a mesh of {mesh.size} devices a state "
        "initialised without one: every device repeats every "
        "eigendecomposition. Initialise the state under the mesh (inside "
        "`with jax.set_mesh(mesh):`, or from parameters sharded on it).",
        stacklevel=4)
  elif dict(mesh.shape) != plan.shape:
    raise ValueError(
        f"the optimizer state was laid out for the mesh {plan.shape}"
        f" but is updated under {dict(mesh.shape)}; initialise it for this "
        "mesh, or move a saved state with `foam_optax.relayout`.")


def _specs(tree):
  return jax.tree.map(lambda x: jax.typeof(x).sharding.spec, tree)


def _traced_hyperparameters(cfg: Config) -> dict:
  """The hyperparameters held as arrays (`optax.inject_hyperparams`)."""
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
          if isinstance(getattr(cfg, f.name), jax.Array)}


def _with_arguments(fn, cfg: Config):
  """`fn(*args, cfg)` as a function of ``(*args, traced)``.

  Array-valued hyperparameters travel as arguments, never as closures, into
  `shard_map` and `auto_axes`, whose bodies may not capture arrays placed
  under another mesh.
  """
  def call(*args):
    *args, traced = args
    return fn(*args, dataclasses.replace(cfg, **traced))
  return call


# A traced bool set by `skipping`: the enclosing `skip_nonfinite` wrapper's
# verdict, which every `scale_by_foam` update inside it obeys.
_OUTER_SKIP = contextvars.ContextVar("foam_optax_outer_skip", default=None)


@contextlib.contextmanager
def skipping(skip):
  """Within this context every `scale_by_foam` update also skips (and counts
  the step) when the traced bool `skip` is true; nested contexts combine."""
  outer = _OUTER_SKIP.get()
  token = _OUTER_SKIP.set(skip if outer is None else outer | skip)
  try:
    yield
  finally:
    _OUTER_SKIP.reset(token)


def _keep_group(new: BlockClassState, old: BlockClassState,
                keep) -> BlockClassState:
  """The class state to keep on a skipped step.

  A skipped step runs with step 0 (never a check step: checks start at
  s0 >= 1), zero gradients and b2 = 1, so the factors come out exactly as
  they went in: the statistics' average is ``1·S + 0·(0·0ᵀ)`` and nothing
  else changes outside a check. They need no select, which on a CPU cost a
  pass over the largest arrays of the state.
  """
  moment = new.rotated_second_moment
  return BlockClassState(
      new.left, new.right,
      None if moment is None else keep(moment, old.rotated_second_moment))


def _update(updates, state: ScaleByFoamState, cfg: Config):
  updates = _plain_arrays(updates)
  _check_mesh(state.plan, state)
  guards.check_structure(list(state.layouts), cfg)

  def apply(updates, state, step, cfg):
    grads, treedef = jax.tree.flatten(updates)
    if treedef != jax.tree.structure(state.mu):
      raise ValueError(
          f"updates have the tree structure {treedef}, but the state was "
          f"initialised for {jax.tree.structure(state.mu)}.")
    new_updates, new_leaves, new_groups = _update_tree(
        grads, state.leaf_states(), state.groups, step, cfg, state.plan)
    return treedef.unflatten(new_updates), _with_leaf_states(
        state, new_leaves)._replace(count=step, groups=new_groups)

  traced = _traced_hyperparameters(cfg)
  run = _with_arguments(apply, cfg)
  explicit = distribution.typed_mesh(state)
  if explicit is not None:
    # On Explicit axes every reshape of a sharded array would need its output
    # sharding spelled out; let the partitioner place the intermediates and
    # return every array with the sharding it came in with.
    def run(updates, state, step, traced, inner=run):
      with jax.sharding.use_abstract_mesh(explicit):
        return jax.sharding.auto_axes(
            inner, out_sharding=(_specs(updates), _specs(state)))(
                updates, state, step, traced)

  step = optax.safe_increment(state.count)
  skip = _OUTER_SKIP.get()
  if cfg.skip_nonfinite:
    own = jnp.logical_not(all_finite(updates))
    skip = own if skip is None else skip | own
  if skip is None:
    return run(updates, state, step, traced)

  # One pass, no conditional over the state: a skipped step runs with step 0
  # (no factor is checked), zero gradients and b2 = 1, which leave the
  # factors as they were (`_keep_group`); the other results are discarded by
  # selects, which XLA fuses into the arithmetic that produces them.
  # Selects, not multiplications by a 0/1 flag: NaN * 0 is NaN.
  zeroed = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u),
                        updates)
  traced = dict(traced, b2=jnp.where(skip, 1.0, cfg.b2))
  new_updates, new_state = run(zeroed, state, jnp.where(skip, 0, step),
                               traced)
  keep = lambda new, old: jnp.where(skip, old, new)
  if cfg.skip_nonfinite:
    # Otherwise only the enclosing `skip_nonfinite` skips, and it zeroes the
    # whole chain's updates itself.
    new_updates = jax.tree.map(
        lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
  consecutive = jnp.where(skip, optax.safe_increment(state.consecutive_skips),
                          jnp.zeros_like(state.consecutive_skips))
  guards.check_consecutive_skips(consecutive, cfg.max_consecutive_skips)
  return new_updates, state._replace(
      count=keep(step, state.count),
      nonfinite_skips=jnp.where(skip,
                                optax.safe_increment(state.nonfinite_skips),
                                state.nonfinite_skips),
      mu=jax.tree.map(keep, new_state.mu, state.mu),
      nu=jax.tree.map(keep, new_state.nu, state.nu),
      tensors=jax.tree.map(keep, new_state.tensors, state.tensors),
      groups=tuple(_keep_group(n, o, keep)
                   for n, o in zip(new_state.groups, state.groups)),
      consecutive_skips=consecutive)


@renamed_argument("grouping", "refresh_batching")
def scale_by_foam(
    *,
    b1: float = 0.95,
    b2: float = 0.995,
    epsilon: float = 1e-9,
    max_epsilon: float = 3e-7,
    threshold: float = 0.75,
    check_frequency: int = 20,
    exponent: float = 2,
    block_size: Optional[int] = 1024,
    max_precond_dim: Optional[int] = None,
    start_preconditioning_step: Optional[int] = None,
    grafting: Grafting = "adam",
    graft_b2: float = 0.995,
    graft_eps: float = 1e-9,
    controller: Controller = "foam",
    residual_tol: float = 0.1,
    precondition_1d: bool = False,
    preconditioner: Preconditioner = "root_inverse",
    refresh_method: RefreshMethod = "eigh",
    stagger: bool = False,
    statistics_compute_steps: int = 1,
    refresh_batching: RefreshBatching = "map",
    skip_nonfinite: bool = True,
    max_consecutive_skips: Optional[int] = None,
    mu_dtype: Optional[Any] = None,
    second_moment_dtype: Optional[Any] = None,
    factor_matrix_dtype: Optional[Any] = None,
    factor_matrix_eigenvectors_dtype: Optional[Any] = None,
    inv_factor_matrix_dtype: Optional[Any] = None,
    pseudo_inverse_rtol: Optional[float] = None,
    weight_dimension_numbers: Optional[Any] = None,
    cache_inverse_root: bool = True,
    proxy: Proxy = "exact",
    proxy_probes: int = 16,
    root_damping: RootDamping = "controller",
) -> optax.GradientTransformation:
  r"""Shampoo-family preconditioning with FOAM's adaptive damping and refresh.

  For each block ``G`` (``m x n``) of each parameter, with ``t`` the 1-based
  step:

  .. math::

    L_t = b_2 L_{t-1} + (1-b_2) G G^\top, \quad
    R_t = b_2 R_{t-1} + (1-b_2) G^\top G, \quad
    A_t = L_t / (1 - b_2^t)

    M_t = (b_1 M_{t-1} + (1-b_1) G_t) / (1 - b_1^t), \qquad
    P_t = X_L M_t X_R, \quad X = Q\,\mathrm{diag}((D+\varepsilon)^{-1/p})\,Q^\top

  ``(Q, D)`` is a cached eigendecomposition of each factor and ``ε`` its
  damping. On a check step (``t == s0`` or ``t % f == 0``), FOAM measures the
  staleness of ``Q`` with ``h = ‖(QᵀA_tQ − D) ⊘ √(SSᵀ)‖_F · α / p``
  (``S = D + ε``, ``α = max(w)/‖w‖₂``, ``w = S^{-1/p}``), proposes
  ``ε_n = max(ε0, ε·h/τ)``, and recomputes ``eigh(A_t)`` only when ``ε_n``
  would exceed ``max_epsilon``. Each block's step gets the norm of a grafted
  Adam step. Under `jax.jit` the skipped eigendecompositions are not executed.

  Args:
    b1: momentum decay (0 disables momentum).
    b2: decay of the factor statistics (and, in eigenvalue-corrected mode, of
      the rotated second moment).
    epsilon: base damping ``ε0``.
    max_epsilon: damping cap ``ε_max``; beyond it a fresh basis is computed.
    threshold: ``τ``, the tolerated staleness proxy.
    check_frequency: ``f``, steps between checks of a factor.
    exponent: ``p`` of the inverse root ``(A + ε)^{-1/p}``; 2 as in the FOAM
      paper, 4 for classic Shampoo.
    block_size: largest block side; None for no blocking.
    max_precond_dim: a matrix side longer than this gets no factor
      (identity); None for no limit.
    start_preconditioning_step: ``s0``, the first check step; before it only
      the grafting optimizer steps. Defaults to ``check_frequency``.
    grafting: ``'adam'``, ``'rmsprop'``, ``'sgd'`` or ``'none'``.
    graft_b2: second-moment decay of the grafting optimizer.
    graft_eps: epsilon of the grafting optimizer; in eigenvalue-corrected mode,
      the epsilon of Adam in the eigenbasis.
    controller: when bases are refreshed: ``'foam'``, ``'stale'`` (every check),
      ``'foam_fixed_damping'``, ``'foam_no_refresh'`` or ``'residual'``.
    residual_tol: relative off-diagonal tolerance of ``'residual'``.
    precondition_1d: precondition vectors as ``1 x n`` matrices.
    preconditioner: ``'root_inverse'`` (Shampoo) or ``'eigenvalue_corrected'``
      (Adam in the eigenbasis, as SOAP; grafting is then unused).
    refresh_method: ``'eigh'`` or ``'power_qr'`` (one warm-started power step
      and QR, as SOAP; the first basis is always a full ``eigh``).
    stagger: spread later check steps of different factors over the check
      period (the first check stays at ``s0``), which flattens the cost of
      check steps but moves them off the schedule above; off by default, so
      the defaults run the paper's algorithm.
    statistics_compute_steps: add the gradient's Gram matrices to the
      statistics on steps ``1, 1 + k, 1 + 2k, ...`` only (Google's
      distributed Shampoo's option of that name), saving ``2 m² n`` flops
      per ``m x n`` block on the other steps; the bias correction counts
      the accumulations. 1 (every step, the paper's) by default.
    refresh_batching: ``'map'`` (one conditional per factor) or ``'bucket'``
      (one conditional per stack of same-sized factors, a batched refresh;
      one device only).
    skip_nonfinite: skip the whole update (zero step, state kept, counter
      incremented) when any gradient is NaN or infinite, or so large that
      the sum of its squares overflows the statistics' dtype.
    max_consecutive_skips: stop the run with an error once this many updates
      in a row have been skipped (a run whose every gradient is non-finite,
      e.g. an `optax.MultiSteps` accumulator holding a NaN, is stuck); None
      never stops. Under `jax.jit` the error is raised from a host callback
      and surfaces as a `jax.errors.JaxRuntimeError` naming the cause.
    mu_dtype: dtype the momentum is stored in; None (optax's convention):
      each parameter's dtype.
    second_moment_dtype: storage dtype of the grafting second moment (and of
      the rotated second moment in eigenvalue-corrected mode); None: float32.
    factor_matrix_dtype: storage dtype of the factor statistics L and R;
      None: float32.
    factor_matrix_eigenvectors_dtype: storage dtype of the cached eigenbases
      Q; None: float32.
    inv_factor_matrix_dtype: storage dtype of the cached inverse roots X;
      None: float32. All computations run in float32 (float64 with x64):
      the storage dtypes only cast on load and store. See BENCHMARKS.md for
      the memory each saves and its effect on training.
    pseudo_inverse_rtol: None (the paper's configuration) or a relative
      tolerance: eigenvalues at most ``rtol`` times a factor's largest are
      treated as zero (weight 0 in X, a pseudo-inverse, as in Meta's
      Distributed Shampoo) instead of being amplified by up to
      ``ε^(-1/p)``. Makes updates far less sensitive to noise in near-null
      directions.
    weight_dimension_numbers: None (the default reshaping, see
      `foam_optax._src.shaping`), or as ``muon_weight_dimension_numbers`` of
      `optax.contrib.muon`: a pytree (a prefix of the parameters) of
      `optax.contrib.MuonDimensionNumbers` / `fo.DimensionNumbers`
      ``(reduction_axis, output_axis)`` or None per leaf, or a callable of
      the parameters returning one. The reduction axes form the matrix's
      rows, the output axes its columns, and every other axis is a batch
      axis whose slices get independent factors (stacked scanned layers,
      attention heads).
    cache_inverse_root: keep each factor's X = Q diag((D+ε)^(-1/p)) Qᵀ in
      the state (two products per block and step); False applies X through
      Q and D instead (four products) and saves one (m, m) array per factor.
    proxy: how the FOAM controllers measure ``RC``: ``'exact'`` (the
      paper's, two m³ products per check) or ``'sketch'`` (an unbiased
      estimate of ``RC²`` from `proxy_probes` random sign vectors, three
      m×m mat-vecs per probe; the probes depend only on the step and the
      factor, so runs are reproducible). See BENCHMARKS.md for when the
      sketch's decisions match the exact proxy's.
    proxy_probes: number of probe vectors of ``proxy='sketch'``.
    root_damping: the damping the inverse roots X are built with:
      ``'controller'`` (the controller's, FOAM's adaptive one) or
      ``'epsilon'`` (always ``ε0``): an ablation that keeps the controller's
      refresh decisions, which still follow its damping, but takes the
      damping out of the preconditioner.

  Returns:
    An `optax.GradientTransformation` producing the preconditioned direction
    (no learning rate, no sign flip), in each parameter's dtype. A state
    initialised under a device mesh (``jax.set_mesh``, or parameters sharded
    on it) divides the factors among the devices: see `state_sharding`.

  Example:
    >>> import jax.numpy as jnp, optax, foam_optax as fo
    >>> tx = optax.chain(fo.scale_by_foam(), optax.scale_by_learning_rate(1e-3))
    >>> state = tx.init({'w': jnp.ones((4, 3))})

  References:
    The FOAM paper, ICML 2026: frequency and operator-error based adaptive
    damping for Shampoo. arXiv:2606.02365.

    Gupta, Koren and Singer, Shampoo: Preconditioned Stochastic Tensor
    Optimization, ICML 2018. arXiv:1802.09568.

    Anil, Gupta, Koren, Regan and Singer, Scalable Second Order Optimization
    for Deep Learning, 2020. arXiv:2002.09018.

    Shi et al., A Distributed Data-Parallel PyTorch Implementation of the
    Distributed Shampoo Optimizer for Training Neural Networks At-Scale,
    2023. arXiv:2309.06497 (storage dtypes, pseudo-inverse).
  """
  cfg = validate(Config(
      b1=b1, b2=b2, epsilon=epsilon, max_epsilon=max_epsilon,
      threshold=threshold, check_frequency=check_frequency, exponent=exponent,
      block_size=block_size, max_precond_dim=max_precond_dim,
      start_preconditioning_step=start_preconditioning_step,
      grafting=grafting, graft_b2=graft_b2, graft_eps=graft_eps,
      controller=controller, residual_tol=residual_tol,
      precondition_1d=precondition_1d, preconditioner=preconditioner,
      refresh_method=refresh_method, stagger=stagger,
      statistics_compute_steps=statistics_compute_steps,
      refresh_batching=refresh_batching,
      skip_nonfinite=skip_nonfinite,
      max_consecutive_skips=max_consecutive_skips,
      mu_dtype=mu_dtype,
      second_moment_dtype=second_moment_dtype,
      factor_matrix_dtype=factor_matrix_dtype,
      factor_matrix_eigenvectors_dtype=factor_matrix_eigenvectors_dtype,
      inv_factor_matrix_dtype=inv_factor_matrix_dtype,
      pseudo_inverse_rtol=pseudo_inverse_rtol,
      weight_dimension_numbers=weight_dimension_numbers,
      cache_inverse_root=cache_inverse_root,
      proxy=proxy, proxy_probes=proxy_probes, root_damping=root_damping))
  return from_config(cfg)


def from_config(cfg: Config) -> optax.GradientTransformation:
  """The transformation for an already validated `Config`."""

  def init_fn(params):
    return _init(params, cfg)

  def update_fn(updates, state, params=None):
    del params
    return _update(updates, state, cfg)

  return optax.GradientTransformation(init_fn, update_fn)
