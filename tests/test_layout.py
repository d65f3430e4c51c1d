"""How a leaf becomes blocks: weight dimension numbers (scanned layers,
attention heads), the default reshaping, the block layout (leaf -> matrix ->
blocks) and where the blocks land in the block-class stacks (on a mesh plan:
test_mesh.py)."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import foam_optax as fo
from foam_optax._src import layout as layout_lib
from foam_optax._src.state import block_classes
from helpers import FAST_COMPILE, leaf_states


SLICE_OPTS = dict(check_frequency=3, stagger=False, block_size=4)


@functools.lru_cache
def _single(name):
  """`name`'s optimizer with SLICE_OPTS and its jitted update: one for the
  tests below, so that slices of one shape compile one program."""
  tx = getattr(fo, name)(**SLICE_OPTS)
  return tx, jax.jit(tx.update, compiler_options=FAST_COMPILE)


def _independent(tx_batched, single_name, full_shape, to_slices, steps):
  """Updates of one batched leaf and of each slice optimized on its own."""
  grads = jax.random.normal(jax.random.PRNGKey(4), (steps,) + full_shape)
  tx_single, update_s = _single(single_name)
  update_b = jax.jit(tx_batched.update, compiler_options=FAST_COMPILE)
  state = tx_batched.init({"w": jnp.zeros(full_shape)})
  single = [tx_single.init({"w": s}) for s in to_slices(jnp.zeros(full_shape))]
  for g in grads:
    batched, state = update_b({"w": g}, state)
    outs = []
    for i, s in enumerate(to_slices(g)):
      u, single[i] = update_s({"w": s}, single[i])
      outs.append(u["w"])
  return batched["w"], outs, state


@pytest.mark.parametrize("name,numbers", [
    ("scale_by_foam", fo.DimensionNumbers(1, 2)),
    ("scale_by_soap", optax.contrib.MuonDimensionNumbers(
        reduction_axis=(-2,), output_axis=-1))])
def test_stacked_layers_equal_independent_layers(name, numbers):
  """(L, m, n) with dimension numbers == L separate (m, n) parameters."""
  L, m, n = 3, 6, 5   # block_size 4: two row and two column block groups
  make = getattr(fo, name)
  batched = make(weight_dimension_numbers={"w": numbers}, **SLICE_OPTS)
  out, slices, state = _independent(batched, name, (L, m, n),
                                    lambda x: list(x), 7)
  np.testing.assert_allclose(out, jnp.stack(slices), rtol=2e-5, atol=2e-6)
  assert sum(int(fs.refreshes.sum()) for g in state.classes
             for fs in (g.left, g.right) if fs is not None) > 0


def test_attention_kernel_heads_are_independent():
  """(d, heads, head_dim): rows d, columns head_dim, one matrix per head;
  given as a callable of the params. Heads of the stacked layers' (6, 5):
  the single heads' update is the one compiled there."""
  d, heads, head_dim = 6, 3, 5
  numbers = lambda params: {"w": fo.DimensionNumbers(0, 2)}
  batched = fo.scale_by_foam(weight_dimension_numbers=numbers, **SLICE_OPTS)
  out, slices, _ = _independent(
      batched, "scale_by_foam", (d, heads, head_dim),
      lambda x: [x[:, h, :] for h in range(heads)], 7)
  np.testing.assert_allclose(out, jnp.stack(slices, axis=1), rtol=2e-5,
                             atol=2e-6)


def test_default_reshaping_merges_layers():
  """Without dimension numbers a stacked leaf shares factors across layers
  (the behaviour the option fixes): updates differ from independent ones."""
  L, m, n = 3, 6, 5
  out, slices, _ = _independent(fo.scale_by_foam(**SLICE_OPTS),
                                "scale_by_foam", (L, m, n),
                                lambda x: list(x), 4)
  assert float(jnp.max(jnp.abs(out - jnp.stack(slices)))) > 1e-2


def test_dimension_numbers_layouts_and_errors():
  params = {"k": jnp.zeros((2, 8, 3, 4)), "b": jnp.zeros((2, 4)),
            "m": jnp.zeros((6, 4))}
  tx = fo.scale_by_foam(weight_dimension_numbers={
      "k": fo.DimensionNumbers((1,), (3, 2)), "b": fo.DimensionNumbers((), ()),
      "m": None})
  # Jitted: one program, not one per operation of an eager init.
  leaves = {ls.layout.shape: ls.layout
            for ls in leaf_states(jax.jit(tx.init)(params))}
  kernel = leaves[(2, 8, 3, 4)]
  # Columns merge the output axes in the given order: (4, 3) -> 12.
  assert (kernel.batch, kernel.matrix_shape, kernel.transpose) == (
      2, (8, 12), (0, 1, 3, 2))
  assert not leaves[(2, 4)].preconditioned        # grafting only
  assert leaves[(6, 4)].matrix_shape == (6, 4) and leaves[(6, 4)].batch == 1
  with pytest.raises(ValueError, match=r"\['b'\].*out of range"):
    fo.scale_by_foam(weight_dimension_numbers={
        "b": fo.DimensionNumbers(1, 2), "k": None, "m": None}).init(params)
  with pytest.raises(ValueError, match="distinct"):
    fo.scale_by_foam(weight_dimension_numbers=fo.DimensionNumbers(
        0, 0)).init({"m": jnp.zeros((3, 3))})
  with pytest.raises(ValueError, match="prefix"):
    fo.scale_by_foam(weight_dimension_numbers={"x": None}).init(params)


# --- leaf -> matrix -> blocks, against plain NumPy slicing -----------------

def _squarest(shape, precondition_1d):
  """The documented matrix view, by brute force: size-1 dims dropped; among
  all splits of the rest into leading rows and trailing columns, the one
  with the smallest larger side, the later split on a tie."""
  dims = [d for d in shape if d != 1]
  if 0 in shape or not dims:
    return None
  if len(dims) == 1:
    return (1, dims[0]) if precondition_1d else None
  splits = [(math.prod(dims[:k]), math.prod(dims[k:]), k)
            for k in range(1, len(dims))]
  rows, cols, _ = min(splits, key=lambda s: (max(s[0], s[1]), -s[2]))
  return rows, cols


def test_matrix_view_is_the_squarest_split_of_the_merged_dims():
  shapes = [s for rank in range(5)
            for s in itertools.product((1, 2, 3, 5), repeat=rank)]
  shapes += [(0, 3), (2, 0, 4), (3, 3, 3, 3), (2, 1, 2, 2, 3), (7, 2, 3)]
  for shape in shapes:
    for precondition_1d in (False, True):
      assert layout_lib.matrix_shape(shape, precondition_1d) == _squarest(
          shape, precondition_1d), (shape, precondition_1d)
  assert layout_lib.matrix_shape((3, 3, 2, 2), False) == (9, 4)   # a conv kernel
  assert layout_lib.matrix_shape((2, 1, 2, 2, 3), False) == (4, 6)


@pytest.mark.parametrize("max_precond_dim", [None, 5])
def test_blocks_tile_the_matrix_once_with_partial_last_blocks(
    max_precond_dim):
  for rows, cols in [(1, 7), (4, 4), (5, 7), (6, 4), (9, 2), (3, 10)]:
    for block_size in (None, 1, 2, 3, 4, 8):
      layout = layout_lib.leaf_layout((rows, cols), block_size, max_precond_dim,
                                   True)
      covered = np.zeros((rows, cols), int)
      for g in layout.groups:
        for bi in range(g.num_row_blocks):
          for bj in range(g.num_col_blocks):
            r, c = g.row_start + bi * g.rows, g.col_start + bj * g.cols
            covered[r:r + g.rows, c:c + g.cols] += 1
        # Full blocks, or the one partial block at the matrix's end.
        for start, count, size, side in ((g.row_start, g.num_row_blocks,
                                          g.rows, rows),
                                         (g.col_start, g.num_col_blocks,
                                          g.cols, cols)):
          full = side if block_size is None else min(block_size, side)
          assert size == full or (count == 1 and start + size == side
                                  and size == side % full), (g, block_size)
        fits = lambda side: max_precond_dim is None or side <= max_precond_dim
        assert g.left == (g.rows > 1 and fits(rows))
        assert g.right == (g.cols > 1 and fits(cols))
      np.testing.assert_array_equal(covered, 1)
      assert len(layout.groups) <= 4
      assert sum(g.count for g in layout.groups) == (
          -(-rows // (block_size or rows)) * -(-cols // (block_size or cols)))


def _numpy_blocks(leaf, layout, group):
  """The group's blocks by NumPy slicing, batch slice by batch slice, row
  blocks before column blocks."""
  x = np.asarray(leaf)
  if layout.transpose is not None:
    x = x.transpose(layout.transpose)
  x = x.reshape((layout.batch,) + layout.matrix_shape)
  g = group
  return [x[b, g.row_start + i * g.rows:g.row_start + (i + 1) * g.rows,
            g.col_start + j * g.cols:g.col_start + (j + 1) * g.cols]
          for b in range(g.batch) for i in range(g.num_row_blocks)
          for j in range(g.num_col_blocks)]


@pytest.mark.parametrize("shape,numbers", [
    ((7, 5), None),
    ((2, 3, 5), None),                              # merged into (6, 5)
    ((3, 7, 5), fo.DimensionNumbers(1, 2)),         # 3 stacked layers
    ((5, 2, 3), fo.DimensionNumbers(0, (2, 1))),    # columns merge (3, 2)
])
def test_extract_is_numpy_slicing_and_assemble_inverts_it(shape, numbers):
  leaf = np.arange(math.prod(shape), dtype=np.float32).reshape(shape)
  layout = layout_lib.leaf_layout(shape, 3, None, False, numbers)

  # Jitted: one program, not one per operation of eager calls.
  @jax.jit
  def extract_and_assemble(leaf):
    matrices = layout_lib.to_matrices(leaf, layout)
    stacks = [layout_lib.extract(matrices, g) for g in layout.groups]
    return stacks, layout_lib.assemble(stacks, layout)

  stacks, assembled = extract_and_assemble(leaf)
  for stack, g in zip(stacks, layout.groups):
    want = _numpy_blocks(leaf, layout, g)
    assert stack.shape == (len(want), g.rows, g.cols)
    np.testing.assert_array_equal(stack, np.stack(want))
  np.testing.assert_array_equal(assembled, leaf)


# --- slot placement: where each leaf's blocks land in the class stacks ---

def test_each_block_lands_in_its_class_stack_at_its_members_offset():
  """After one step, stack slot ``offsets[m] + k`` of a class holds the
  statistics of block ``k`` of member ``m`` (leaf, group): ``B Bᵀ`` on the
  left and ``Bᵀ B`` on the right, up to one common factor, for every block
  of every leaf, computed here from the gradient by NumPy slicing."""
  grads = {"a": (5, 7), "b": (3, 7, 4), "c": (6,), "d": (4, 3), "e": (2, 3, 4)}
  rng = np.random.default_rng(0)
  grads = {k: jnp.asarray(rng.standard_normal(s), jnp.float32)
           for k, s in sorted(grads.items())}
  tx = fo.scale_by_shampoo(block_size=3, precondition_1d=True, stagger=False,
                           weight_dimension_numbers={
                               "a": None, "b": fo.DimensionNumbers(1, 2),
                               "c": None, "d": None, "e": None})
  # Init and update in one program, not one per operation of an eager init.
  state = jax.jit(lambda g: tx.update(g, tx.init(g))[1],
                  compiler_options=FAST_COMPILE)(grads)
  (core,) = fo.find_states(state)
  leaves = jax.tree.leaves(grads)
  classes = block_classes(core)
  assert sum(c.count for c in classes) == sum(
      layout.batch * -(-layout.matrix_shape[0] // 3)
      * -(-layout.matrix_shape[1] // 3)
      for layout in core.layouts if layout.preconditioned)
  scale = None
  for cls, stacks in zip(classes, core.classes):
    seen = 0
    for (i, j), offset in zip(cls.members, cls.offsets):
      layout = core.layouts[i]
      blocks = _numpy_blocks(leaves[i], layout, layout.groups[j])
      assert offset == seen
      seen += len(blocks)
      for k, block in enumerate(blocks):
        block = block.astype(np.float64)
        for fs, gram in ((stacks.left, block @ block.T),
                         (stacks.right, block.T @ block)):
          if fs is None:
            continue
          got = np.asarray(fs.statistic[offset + k], np.float64)
          scale = scale or np.trace(got) / np.trace(gram)
          np.testing.assert_allclose(got, scale * gram, rtol=1e-4,
                                     atol=1e-6 * np.abs(got).max(),
                                     err_msg=f"leaf {i} group {j} block {k}")
    assert seen == cls.count
    for fs in (stacks.left, stacks.right):
      assert fs is None or fs.statistic.shape[0] == cls.count
  assert scale is not None and scale > 0
