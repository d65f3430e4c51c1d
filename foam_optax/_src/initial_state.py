"""`init` of `scale_by_foam`: each leaf's layout, the block-class stacks and
their check phases, laid out for the device mesh in effect."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from foam_optax._src import factors
from foam_optax._src import first_step
from foam_optax._src import grafting
from foam_optax._src import layout
from foam_optax._src import mesh
from foam_optax._src import nnx
from foam_optax._src import per_dimension
from foam_optax._src.config import Config
from foam_optax._src.state import BlockClassState, RefreshKind
from foam_optax._src.state import ScaleByFoamState
from foam_optax._src.validation import static_int


def _layout(path, shape, dimension_numbers, cfg: Config) -> layout.LeafLayout:
  try:
    return layout.leaf_layout(
        shape, static_int("block_size", cfg.block_size),
        static_int("max_precond_dim", cfg.max_precond_dim),
        cfg.precondition_1d, dimension_numbers, cfg.one_sided)
  except ValueError as e:
    if dimension_numbers is None:
      raise
    raise ValueError(f"weight_dimension_numbers of parameter "
                     f"{jax.tree_util.keystr(path)}: {e}") from e


def _reject_non_real_floating(paths_and_leaves):
  for path, p in paths_and_leaves:
    name, dtype = jax.tree_util.keystr(path), jnp.result_type(p)
    if jnp.issubdtype(dtype, jnp.complexfloating):
      raise ValueError(
          f"parameter {name} is complex ({dtype}); foam_optax supports real "
          "parameters only. Split it into real and imaginary parts.")
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"parameter {name} has dtype {dtype}; foam_optax optimizes "
          "floating-point parameters only. Keep integer and boolean arrays "
          "out of the tree the optimizer sees (in Flax NNX, as a variable "
          "that is not an nnx.Param), or give them no update: "
          "optax.partition(..., optax.set_to_zero()) for those leaves.")


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
    return layout.per_dimension_layouts(
        shape, cfg, static_int("block_size", cfg.block_size),
        static_int("max_precond_dim", cfg.max_precond_dim))
  return _layout(path, shape, dimension_numbers, cfg), None


def _phases(stack_sizes, num_shards, cfg: Config) -> list:
  """Deterministic check offsets spreading factors over the check period.

  Factors are ranked stack after stack; inside a stack the ranks alternate
  between devices (`mesh.interleaved_ranks`), so the factors of one
  check step are spread over the mesh rather than landing on one device.
  Every offset is `first_step.uniform_phase` plus the spread.
  """
  total = sum(stack_sizes)
  offset = first_step.uniform_phase(cfg)
  phases, start = [], 0
  for size in stack_sizes:
    if not cfg.stagger:
      phases.append(jnp.full((size,), offset, jnp.int32))
      continue
    rank = jnp.asarray(
        start + mesh.interleaved_ranks(size, num_shards), jnp.int32)
    freq = jnp.asarray(cfg.check_frequency, jnp.int32)
    phases.append((rank * freq) // total + offset)
    start += size
  return phases


def _refuse_bucket_on_a_mesh(plan: layout.Plan, cfg: Config) -> None:
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


def _placeholder_state(params, cfg: Config, plan) -> ScaleByFoamState:
  """The state for optax's parameter placeholder: `map_params` maps over the
  fields returned as the placeholder itself, which must be whole copies of
  the parameter tree in every state. `nu` is one when every leaf has a
  grafting moment, which root-inverse preconditioning with Adam or RMSProp
  grafting guarantees."""
  every_leaf_grafts = (cfg.grafting in grafting.USES_SECOND_MOMENT
                       and not cfg.eigenvalue_corrected)
  shape_dependent: Any = _ShapeDependent()   # in place of tuples
  zero = lambda: jnp.zeros([], jnp.int32)
  return ScaleByFoamState(
      count=zero(), nonfinite_skips=zero(), mu=params,
      nu=params if every_leaf_grafts else shape_dependent,
      tensors=shape_dependent, layouts=shape_dependent,
      classes=shape_dependent, consecutive_skips=zero(),
      overflow_skips=zero(), plan=plan, refresh_kind=_refresh_kind(cfg))


def _refresh_kind(cfg: Config) -> RefreshKind:
  return RefreshKind("eigendecompositions" if cfg.root_method == "eigh"
                     else "inverse_roots")


def init(params, cfg: Config) -> ScaleByFoamState:
  """The initial state of `scale_by_foam` for `params`.

  For Flax NNX parameters on a device mesh, the state carries the sharding
  annotations of its layout (`nnx.annotate`).
  """
  wrapped, params = params, nnx.plain_arrays(params)
  paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  _reject_non_real_floating(paths_and_leaves)
  leaves = [p for _, p in paths_and_leaves]
  plan = layout.Plan.for_mesh(mesh.current_mesh(leaves))
  _refuse_bucket_on_a_mesh(plan, cfg)
  if _is_params_placeholder(params):   # has no leaves
    return _placeholder_state(params, cfg, plan)
  both = [_layouts(path, jnp.shape(p), dims, cfg) for (path, p), dims in
          zip(paths_and_leaves,
              layout.dimension_numbers(cfg.weight_dimension_numbers, params))]
  layouts = [lay for lay, _ in both]
  tensor_layouts = [tensor for _, tensor in both]
  classes = layout.block_classes(layouts)
  slots = [len(s) for s in mesh.slot_maps(classes, plan.num_shards)]
  sides = [(size, side) for cls, size in zip(classes, slots)
           for side in (cls.left, cls.right) if side]
  # Each per-dimension factor of a tensor leaf is a stack of one.
  num_tensor_factors = sum(map(layout.num_factors, tensor_layouts))
  phases = iter(_phases([size for size, _ in sides] + [1] * num_tensor_factors,
                        plan.num_shards, cfg))
  stack = lambda count, size, active: (
      factors.init_stack(count, size, next(phases), cfg) if active else None)
  second_moment_dtype = factors.storage_dtype(cfg.second_moment_dtype)
  class_states = tuple(
      BlockClassState(
          left=stack(count, c.rows, c.left),
          right=stack(count, c.cols, c.right),
          rotated_second_moment=(
              jnp.zeros((count, c.rows, c.cols), second_moment_dtype)
              if cfg.eigenvalue_corrected else None))
      for c, count in zip(classes, slots))
  momenta, graft_moments, tensor_states = [], [], []
  for p, lay, tensor_layout in zip(leaves, layouts, tensor_layouts):
    tensor = (None if tensor_layout is None
              else per_dimension.init_state(tensor_layout, phases, cfg))
    in_eigenbasis = cfg.eigenvalue_corrected and (
        lay.preconditioned or tensor is not None)
    needs_graft_moment = (cfg.grafting in grafting.USES_SECOND_MOMENT and
                          not in_eigenbasis)
    momenta.append(jnp.zeros(jnp.shape(p), jnp.result_type(p)
                             if cfg.mu_dtype is None else cfg.mu_dtype))
    graft_moments.append(jnp.zeros(jnp.shape(p), second_moment_dtype)
                         if needs_graft_moment else optax.MaskedNode())
    tensor_states.append(tensor)
  zero = lambda: jnp.zeros([], jnp.int32)
  return nnx.annotate(ScaleByFoamState(
      count=zero(), nonfinite_skips=zero(),
      mu=treedef.unflatten(momenta), nu=treedef.unflatten(graft_moments),
      tensors=tuple(tensor_states), layouts=tuple(layouts),
      classes=class_states, consecutive_skips=zero(), overflow_skips=zero(),
      plan=plan, refresh_kind=_refresh_kind(cfg)), wrapped)
