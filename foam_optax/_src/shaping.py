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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp


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
