"""How a parameter leaf becomes a matrix and the matrix becomes blocks.

Rules (all static, decided from the leaf's shape):

* Size-1 dimensions are squeezed. What remains decides the treatment:
  rank 0 (scalars) and zero-size leaves are never preconditioned; rank 1 is
  preconditioned only with ``precondition_1d=True``, as a ``1 x n`` matrix;
  rank 2 is used as is; rank >= 3 is reshaped to a matrix by merging the
  leading ``k`` dimensions into rows and the rest into columns, with ``k``
  chosen to make the matrix as square as possible (smallest larger side; on
  a tie the later split). A conv kernel ``(kh, kw, cin, cout)`` becomes
  ``(kh*kw*cin, cout)`` and an attention kernel ``(d, heads, head_dim)``
  becomes ``(d, heads*head_dim)``.
* The matrix is cut into blocks of at most ``block_size x block_size``; the
  last row/column of blocks may be smaller. Blocks of equal shape form a
  *group* (at most four per leaf).
* Groups of the same block shape and the same preconditioned sides form a
  *class* across the whole parameter tree (e.g. every 64 x 64 block of every
  layer). A class's statistics, bases and updates are stacked along one
  leading axis, so each step runs a few batched matrix products per class
  instead of a few per leaf; each factor in the stack still has its own
  state and its own refresh decision.
* A matrix side longer than ``max_precond_dim``, or a block side of length 1,
  is not preconditioned: that factor is the identity and has no state.

With ``weight_dimension_numbers`` (as `optax.contrib.muon`'s), a leaf's
`MuonDimensionNumbers(reduction_axis, output_axis)` replace the rule above:
the reduction axes (merged, in the given order) form the matrix's rows, the
output axes its columns, and every other axis is a *batch* axis. The leaf is
transposed to ``(batch axes, reduction axes, output axes)`` and each batch
slice is cut into blocks on its own, so stacked layers ``(L, m, n)`` (Flax
``nn.scan``/``nnx.scan``) or attention heads get independent factors: the
``b``-th slice's blocks are separate blocks of their class, exactly as if the
slice were a parameter of its own. Size-1 dimensions are then not squeezed;
empty axes stand for a side of length 1, so ``((), ())`` makes every axis a
batch axis and the leaf gets the grafting update only (e.g. the stacked
biases of scanned layers).

A tensor leaf of SOAP's ``tensor_shaping='per_dimension'`` is viewed as a
tensor instead (`per_dimension_layouts`, `TensorLayout`): one factor per
dimension, computed in `per_dimension`.

`dimension_numbers` reads ``weight_dimension_numbers`` into each leaf's
dimension numbers, and `nnx_dimension_numbers` derives them for the common
Flax NNX layers. `Plan` records the device mesh the block stacks are laid
out for (`mesh` places them).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh

from foam_optax._src.config import Config
from foam_optax._src.nnx import is_variable, plain_arrays




class DimensionNumbers(NamedTuple):
  """Which axes of a leaf form its matrix: the fields of
  `optax.contrib.MuonDimensionNumbers` (either type is accepted).

  Attributes:
    reduction_axis: axis or axes (merged in this order) forming the rows,
      e.g. the input axis of a ``x @ W`` kernel.
    output_axis: axis or axes forming the columns.
  Every other axis is a batch axis whose slices get independent factors.
  """

  reduction_axis: Union[int, Sequence[int]] = 0
  output_axis: Union[int, Sequence[int]] = 1


def is_dimension_numbers(x) -> bool:
  """Our `DimensionNumbers` or any NamedTuple with the same fields (such as
  `optax.contrib.MuonDimensionNumbers`)."""
  return getattr(x, "_fields", None) == ("reduction_axis", "output_axis")


@dataclasses.dataclass(frozen=True)
class BlockGroup:
  """Blocks of one shape inside a leaf's matrix view (in each of its `batch`
  slices: ``count`` counts the blocks of all slices)."""

  row_start: int
  num_row_blocks: int
  rows: int
  col_start: int
  num_col_blocks: int
  cols: int
  left: bool   # whether the left (rows x rows) factor is preconditioned
  right: bool  # whether the right (cols x cols) factor is preconditioned
  batch: int = 1

  @property
  def count(self) -> int:
    return self.batch * self.num_row_blocks * self.num_col_blocks


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class LeafLayout:
  """Static block structure of one leaf (kept in the state's tree structure,
  so `update` never re-derives shapes from possibly traced hyperparameters)."""

  shape: tuple
  matrix_shape: Optional[tuple]
  groups: tuple
  # With dimension numbers: the permutation putting the batch axes first,
  # then the reduction and the output axes; None for the default reshaping.
  transpose: Optional[tuple] = None
  batch: int = 1
  # With ``one_sided``: the side kept ('left' or 'right'); None: both.
  one_side: Optional[str] = None

  @property
  def preconditioned(self) -> bool:
    return any(g.left or g.right for g in self.groups)


def to_matrices(x, layout: LeafLayout):
  """A leaf -> its (batch, rows, cols) matrix view."""
  if layout.transpose is not None:
    x = jnp.transpose(x, layout.transpose)
  assert layout.matrix_shape is not None, "a leaf with no matrix view"
  return x.reshape((layout.batch,) + tuple(layout.matrix_shape))


def from_matrices(matrices, layout: LeafLayout):
  """Inverse of `to_matrices`."""
  transpose = layout.transpose
  if transpose is None:
    return matrices.reshape(layout.shape)
  permuted = tuple(layout.shape[a] for a in transpose)
  inverse = tuple(sorted(range(len(layout.shape)), key=lambda i: transpose[i]))
  return jnp.transpose(matrices.reshape(permuted), inverse)


@dataclasses.dataclass(frozen=True)
class BlockClass:
  """Blocks of one shape with the same preconditioned sides, across leaves.

  `members` lists ``(leaf index, group index)`` in stacking order; member
  ``i`` occupies rows ``offsets[i] : offsets[i] + count_i`` of the stack.
  """

  rows: int
  cols: int
  left: bool
  right: bool
  members: tuple
  offsets: tuple
  count: int


def block_classes(layouts: Sequence[LeafLayout]) -> tuple:
  """The classes of the preconditioned leaves' groups, in first-seen order."""
  found = {}
  for i, layout in enumerate(layouts):
    if not layout.preconditioned:
      continue
    for j, g in enumerate(layout.groups):
      found.setdefault((g.rows, g.cols, g.left, g.right), []).append(
          (i, j, g.count))
  classes = []
  for (rows, cols, left, right), members in found.items():
    offsets = [0]
    for _, _, count in members:
      offsets.append(offsets[-1] + count)
    classes.append(BlockClass(
        rows, cols, left, right, tuple((i, j) for i, j, _ in members),
        tuple(offsets[:-1]), offsets[-1]))
  return tuple(classes)


def matrix_shape(shape: Sequence[int], precondition_1d: bool):
  """The (rows, cols) matrix view of a leaf, or None for grafting only."""
  dims = [int(d) for d in shape if d != 1]
  if any(d == 0 for d in shape) or not dims:
    return None
  if len(dims) == 1:
    return (1, dims[0]) if precondition_1d else None
  if len(dims) == 2:
    return tuple(dims)
  best = None
  for k in range(1, len(dims)):
    rows, cols = math.prod(dims[:k]), math.prod(dims[k:])
    if best is None or max(rows, cols) <= max(best):
      best = (rows, cols)
  return best


def _parts(size: int, block_size: Optional[int]):
  """[(start, num_blocks, block_len)] covering range(size)."""
  if block_size is None or block_size >= size:
    return [(0, 1, size)]
  full, rem = divmod(size, block_size)
  parts = [(0, full, block_size)]
  if rem:
    parts.append((full * block_size, 1, rem))
  return parts


def _axes(axis, ndim, shape, what):
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if any(not -ndim <= a < ndim for a in axes):
    raise ValueError(f"{what} {axis!r} out of range for a leaf of shape "
                     f"{shape}.")
  return tuple(a % ndim for a in axes)


def dimension_numbers_transpose(shape, dimension_numbers):
  """(permutation, batch, (rows, cols)) of a leaf under dimension numbers."""
  ndim = len(shape)
  reduction = _axes(dimension_numbers.reduction_axis, ndim, shape,
                    "reduction_axis")
  output = _axes(dimension_numbers.output_axis, ndim, shape, "output_axis")
  if len(set(reduction + output)) != len(reduction) + len(output):
    raise ValueError(f"reduction_axis {dimension_numbers.reduction_axis!r} "
                     f"and output_axis {dimension_numbers.output_axis!r} "
                     f"must be distinct axes.")
  batch_axes = tuple(a for a in range(ndim) if a not in reduction + output)
  size = lambda axes: math.prod(shape[a] for a in axes)
  return (batch_axes + reduction + output, size(batch_axes),
          (size(reduction), size(output)))


def kept_side(rows: int, cols: int) -> str:
  """The side a one-sided preconditioner keeps: the smaller, the rows on a
  tie. The rows are the reduction (input) axis of a ``x @ W`` kernel, the
  side ASGO keeps for square weights (the input side of torch's
  ``(out, in)`` weights)."""
  return "left" if rows <= cols else "right"


def leaf_layout(shape, block_size, max_precond_dim, precondition_1d,
                dimension_numbers: Any = None, one_sided: bool = False):
  """Static layout of a leaf; `dimension_numbers` as in the module doc;
  `one_sided` keeps one factor per matrix (`kept_side`)."""
  shape = tuple(int(d) for d in shape)
  transpose, batch = None, 1
  if dimension_numbers is not None:
    transpose, batch, mshape = dimension_numbers_transpose(
        shape, dimension_numbers)
    if 0 in shape:
      return LeafLayout(shape, None, ())
  else:
    mshape = matrix_shape(shape, precondition_1d)
  if mshape is None:
    return LeafLayout(shape, None, ())
  rows, cols = mshape
  one_side = kept_side(rows, cols) if one_sided else None
  left_ok = ((max_precond_dim is None or rows <= max_precond_dim)
             and one_side in (None, "left"))
  right_ok = ((max_precond_dim is None or cols <= max_precond_dim)
              and one_side in (None, "right"))
  groups = tuple(
      BlockGroup(r0, nr, m, c0, nc, n, left_ok and m > 1, right_ok and n > 1,
                 batch)
      for (r0, nr, m) in _parts(rows, block_size)
      for (c0, nc, n) in _parts(cols, block_size))
  return LeafLayout(shape, mshape, groups, transpose, batch, one_side)


def extract(matrices, group: BlockGroup):
  """(batch, rows, cols) matrices -> (count, m, n) stack of the group's
  blocks, batch slice by batch slice."""
  g = group
  sub = matrices[:, g.row_start:g.row_start + g.num_row_blocks * g.rows,
                 g.col_start:g.col_start + g.num_col_blocks * g.cols]
  sub = sub.reshape(g.batch, g.num_row_blocks, g.rows, g.num_col_blocks,
                    g.cols)
  return sub.transpose(0, 1, 3, 2, 4).reshape(g.count, g.rows, g.cols)


def assemble(stacks, layout: LeafLayout):
  """Inverse of `extract` over all groups: back to the leaf's shape."""
  row_bands = {}
  for stack, g in zip(stacks, layout.groups):
    tile = stack.reshape(g.batch, g.num_row_blocks, g.num_col_blocks, g.rows,
                         g.cols)
    tile = tile.transpose(0, 1, 3, 2, 4).reshape(
        g.batch, g.num_row_blocks * g.rows, g.num_col_blocks * g.cols)
    row_bands.setdefault(g.row_start, []).append((g.col_start, tile))
  bands = [jnp.concatenate([t for _, t in sorted(tiles, key=lambda x: x[0])],
                           axis=2)
           for _, tiles in sorted(row_bands.items())]
  return from_matrices(jnp.concatenate(bands, axis=1), layout)


# --- Per-dimension views of tensor leaves ----------------------------------


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class TensorLayout:
  """Static shape of a per-dimension leaf: its tensor view and which of its
  dimensions have a factor."""

  shape: tuple
  factored: tuple


def merged_shape(shape, max_precond_dim: Optional[int]) -> tuple:
  """The official SOAP's ``merge_dims``: adjacent dimensions merged, left to
  right, while their product stays within `max_precond_dim`."""
  limit = math.inf if max_precond_dim is None else max_precond_dim
  new_shape, current = [], 1
  for size in shape:
    if current * size > limit:
      if current > 1:
        new_shape.append(current)
        current = size
      else:
        new_shape.append(size)
        current = 1
    else:
      current *= size
  if current > 1 or not new_shape:
    new_shape.append(current)
  return tuple(new_shape)


def per_dimension_layouts(shape, cfg: Config, block_size, max_precond_dim):
  """(LeafLayout, TensorLayout or None) of a leaf under 'per_dimension'.

  Views of rank <= 2 get a matrix `LeafLayout` (with SOAP's rule that a leaf
  of rank >= 2 whose view is a vector is preconditioned without
  `precondition_1d`); views of rank >= 3 get a `TensorLayout` and a
  `LeafLayout` with no blocks.
  """
  shape = tuple(int(d) for d in shape)
  view = shape
  if cfg.merge_dims and len(shape) >= 2:
    view = merged_shape(shape, max_precond_dim)
  view = tuple(d for d in view if d != 1)
  if len(view) <= 2 or 0 in shape:
    matrix = leaf_layout(view, block_size, max_precond_dim,
                         cfg.precondition_1d or len(shape) >= 2,
                         one_sided=cfg.one_sided)
    return dataclasses.replace(matrix, shape=shape), None
  factored = tuple(max_precond_dim is None or d <= max_precond_dim
                   for d in view)
  if cfg.one_sided:   # the smallest dimension only (the first on a tie)
    smallest = view.index(min(view))
    factored = tuple(f and d == smallest for d, f in enumerate(factored))
  return LeafLayout(shape, None, ()), TensorLayout(view, factored)


def num_factors(layout: Optional[TensorLayout]) -> int:
  return 0 if layout is None else sum(layout.factored)


# --- Dimension numbers -------------------------------------------------------


def dimension_numbers(spec, params) -> list:
  """Each leaf's dimension numbers (None: the default reshaping).

  `spec` (``weight_dimension_numbers``) is None, a pytree that is a prefix
  of the parameters with dimension numbers or None at its leaves, or a
  callable of the parameters returning one.
  """
  num_leaves = len(jax.tree.leaves(params))
  if callable(spec):
    spec = spec(params)
  if spec is None:
    return [None] * num_leaves
  # A tree built from `nnx.state(model, nnx.Param)` keeps the wrappers.
  spec = plain_arrays(spec)
  is_leaf = lambda x: x is None or is_dimension_numbers(x)
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      spec, is_leaf=is_leaf)[0]:
    if not is_leaf(leaf):
      raise ValueError(
          f"weight_dimension_numbers holds a {type(leaf).__name__} at "
          f"{jax.tree_util.keystr(path)}; it must hold DimensionNumbers or "
          "None per parameter (e.g. jax.tree.map(lambda p: "
          "fo.DimensionNumbers(0, 1) if p.ndim == 2 else None, params)), or "
          "be a callable of the parameters returning such a tree.")
  prefix = jax.tree.structure(spec, is_leaf=is_leaf)
  try:
    subtrees = prefix.flatten_up_to(params)
  except (ValueError, TypeError):
    # Structures only: jax's own message would print the arrays.
    short = lambda treedef: str(treedef)[:400]
    raise ValueError(
        "weight_dimension_numbers must be a prefix of the parameters' tree "
        f"structure; its structure {short(prefix)} does not match the "
        f"parameters' {short(jax.tree.structure(params))}.") from None
  numbers = []
  for dims, subtree in zip(jax.tree.leaves(spec, is_leaf=is_leaf), subtrees):
    numbers.extend([dims] * len(jax.tree.leaves(subtree)))
  return numbers


def _trailing(ndim: int, num_in: int, num_out: int) -> DimensionNumbers:
  """The last `num_out` axes as the output, the `num_in` before them as the
  reduction; any leading axis (stacked layers of `nnx.vmap` / `nnx.scan`,
  ``LinearGeneral``'s ``batch_axis``) is a batch axis."""
  first = ndim - num_in - num_out
  return DimensionNumbers(tuple(range(first, first + num_in)),
                          tuple(range(first + num_in, ndim)))


# Not a matrix: a vector per layer (its slices, when layers are stacked).
_VECTOR = DimensionNumbers((), ())


def _layer_numbers(nnx, module) -> dict:
  """Per parameter name of one layer, its dimension numbers."""
  ndim = lambda name: len(getattr(module, name).shape)
  if isinstance(module, nnx.Embed):
    return {"embedding": _trailing(ndim("embedding"), 1, 1)}
  if isinstance(module, nnx.Linear):
    return {"kernel": _trailing(ndim("kernel"), 1, 1), "bias": _VECTOR}
  if isinstance(module, nnx.LinearGeneral):
    return {"kernel": _trailing(ndim("kernel"), len(module.in_features),
                                len(module.out_features)),
            "bias": _VECTOR}
  if isinstance(module, (nnx.Conv, nnx.ConvTranspose)):
    # (*kernel_size, in_features // groups, out_features)
    return {"kernel": _trailing(ndim("kernel"), len(module.kernel_size) + 1,
                                1),
            "bias": _VECTOR}
  if isinstance(module, (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm,
                         nnx.GroupNorm)):
    return {"scale": _VECTOR, "bias": _VECTOR}
  return {}


def _key_name(key):
  for field in ("key", "idx", "name"):
    if hasattr(key, field):
      return getattr(key, field)
  return key


def nnx_dimension_numbers(model, wrt: Any = None) -> Any:
  """The fan-in and fan-out axes of a Flax NNX model's weights.

  For the layers whose kernels are not ``(fan_in, fan_out)`` matrices, above
  all ``nnx.MultiHeadAttention`` (query, key and value kernels ``(in,
  heads, head_dim)``, output kernel ``(heads, head_dim, out)``), this reads
  each layer's own description of its axes:

  ====================================  ====================================
  layer                                 fan-in (reduction) / fan-out
                                        (output) axes
  ====================================  ====================================
  ``nnx.Linear``                        ``kernel`` ``(in, out)``: 0 / 1
  ``nnx.LinearGeneral`` (attention)     ``kernel``: its ``in_features``
                                        axes / its ``out_features`` axes
  ``nnx.Conv``, ``nnx.ConvTranspose``   ``kernel``: the window and input
                                        channels / the output channels
  ``nnx.Embed``                         ``embedding`` ``(vocabulary,
                                        features)``: 0 / 1
  ====================================  ====================================

  Any axis before those (layers stacked by ``nnx.vmap`` or ``nnx.scan``) is
  a batch axis. The biases of these layers and the scales and biases of
  ``nnx.LayerNorm``, ``nnx.RMSNorm``, ``nnx.BatchNorm`` and
  ``nnx.GroupNorm`` are vectors, whatever their shape (``(heads,
  head_dim)`` in attention, a leading layer axis when stacked):
  ``DimensionNumbers((), ())``, no matrix (Adam's multiplier in
  `mup_multipliers`, the grafting step alone in the optimizers). Every
  other parameter (``nnx.Einsum`` and other layers) gets None: the default
  reading of its shape.

  The tree serves as ``weight_dimension_numbers`` both of `mup_multipliers`
  (whose matrices are then ``(fan_in, fan_out)``, a rank-3 attention kernel
  included) and of the optimizers (`foam`, `shampoo`, `soap`, `asgo`,
  `dasgo`: each batch slice gets its own factors).

  Args:
    model: a Flax NNX module (an abstract one from ``nnx.eval_shape`` too).
    wrt: the variables the tree is for (an ``nnx.filterlib`` filter);
      None: ``nnx.Param``, as ``nnx.Optimizer`` and ``nnx.state(model,
      nnx.Param)``.

  Returns:
    A tree with the structure of ``nnx.state(model, wrt)``, holding
    `DimensionNumbers` or None in place of each variable: a prefix of that
    state and of its ``nnx.as_pure`` form.

  Example:
    >>> from flax import nnx
    >>> import foam_optax as fo
    >>> attention = nnx.MultiHeadAttention(
    ...     num_heads=2, in_features=16, decode=False, rngs=nnx.Rngs(0))
    >>> numbers = fo.nnx_dimension_numbers(attention)
    >>> numbers['query']['kernel'], numbers['out']['kernel']
    (DimensionNumbers(reduction_axis=(0,), output_axis=(1, 2)), DimensionNumbers(reduction_axis=(0, 1), output_axis=(2,)))
  """
  from flax import nnx   # Flax is not a dependency of the library

  numbers = {}
  for path, module in nnx.iter_graph(model):
    if isinstance(module, nnx.Module):
      for name, dims in _layer_numbers(nnx, module).items():
        numbers[tuple(path) + (name,)] = dims

  def lookup(path, _):
    return numbers.get(tuple(_key_name(k) for k in path))

  return jax.tree_util.tree_map_with_path(
      lookup, nnx.state(model, nnx.Param if wrt is None else wrt),
      is_leaf=is_variable)


# --- The mesh of a state -----------------------------------------------------


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Plan:
  """The mesh a state is laid out for: its axis names and sizes (empty for
  one device). Axis types are not recorded: the same layout serves Auto and
  Explicit meshes."""

  axis_names: tuple = ()
  axis_sizes: tuple = ()

  @classmethod
  def for_mesh(cls, mesh: Optional[AbstractMesh]) -> "Plan":
    if mesh is None:
      return cls()
    return cls(tuple(mesh.axis_names), tuple(mesh.axis_sizes))

  @property
  def distributed(self) -> bool:
    return bool(self.axis_names)

  @property
  def shape(self) -> dict:
    return dict(zip(self.axis_names, self.axis_sizes))

  @property
  def num_shards(self) -> int:
    return int(np.prod(self.axis_sizes, dtype=int))

  @property
  def axes(self) -> tuple:
    """Mesh axis names the block axis is split over (all of them)."""
    return self.axis_names

  @property
  def block_spec(self):
    """PartitionSpec entry of the block axis."""
    axes = self.axes
    return axes[0] if len(axes) == 1 else axes

  def mesh(self) -> AbstractMesh:
    """The mesh to `shard_map` over: the context's when it is this one (its
    axis types included), else the plan's with Auto axes."""
    context = jax.sharding.get_abstract_mesh()
    if not context.empty and dict(context.shape) == self.shape:
      return context
    return AbstractMesh(self.axis_sizes, self.axis_names)
