"""How a leaf becomes blocks: weight dimension numbers (scanned layers,
attention heads), the default reshaping, and the block layout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import foam_optax as fo
from helpers import leaf_states


def _independent(tx_batched, tx_single, full_shape, slices, to_slices, steps):
  """Updates of one batched leaf and of each slice optimized on its own."""
  grads = jax.random.normal(jax.random.PRNGKey(4), (steps,) + full_shape)
  update_b, update_s = jax.jit(tx_batched.update), jax.jit(tx_single.update)
  state = tx_batched.init({"w": jnp.zeros(full_shape)})
  single = [tx_single.init({"w": s}) for s in to_slices(jnp.zeros(full_shape))]
  for g in grads:
    batched, state = update_b({"w": g}, state)
    outs = []
    for i, s in enumerate(to_slices(g)):
      u, single[i] = update_s({"w": s}, single[i])
      outs.append(u["w"])
  return batched["w"], outs, state


SLICE_OPTS = dict(check_frequency=3, stagger=False, block_size=4)


@pytest.mark.parametrize("name,numbers", [
    ("scale_by_foam", fo.DimensionNumbers(1, 2)),
    ("scale_by_soap", optax.contrib.MuonDimensionNumbers(
        reduction_axis=(-2,), output_axis=-1))])
def test_stacked_layers_equal_independent_layers(name, numbers):
  """(L, m, n) with dimension numbers == L separate (m, n) parameters."""
  L, m, n = 3, 6, 5   # block_size 4: two row and two column block groups
  make = getattr(fo, name)
  batched = make(weight_dimension_numbers={"w": numbers}, **SLICE_OPTS)
  single = make(**SLICE_OPTS)
  out, slices, state = _independent(batched, single, (L, m, n), L,
                                    lambda x: list(x), 7)
  np.testing.assert_allclose(out, jnp.stack(slices), rtol=2e-5, atol=2e-6)
  assert sum(int(fs.refreshes.sum()) for g in state.classes
             for fs in (g.left, g.right) if fs is not None) > 0


def test_attention_kernel_heads_are_independent():
  """(d, heads, head_dim): rows d, columns head_dim, one matrix per head;
  given as a callable of the params."""
  d, heads, head_dim = 5, 3, 4
  numbers = lambda params: {"w": fo.DimensionNumbers(0, 2)}
  batched = fo.scale_by_foam(weight_dimension_numbers=numbers, **SLICE_OPTS)
  single = fo.scale_by_foam(**SLICE_OPTS)
  out, slices, _ = _independent(
      batched, single, (d, heads, head_dim), heads,
      lambda x: [x[:, h, :] for h in range(heads)], 7)
  np.testing.assert_allclose(out, jnp.stack(slices, axis=1), rtol=2e-5,
                             atol=2e-6)


def test_default_reshaping_merges_layers():
  """Without dimension numbers a stacked leaf shares factors across layers
  (the behaviour the option fixes): updates differ from independent ones."""
  L, m, n = 3, 6, 5
  out, slices, _ = _independent(fo.scale_by_foam(**SLICE_OPTS),
                                fo.scale_by_foam(**SLICE_OPTS), (L, m, n), L,
                                lambda x: list(x), 4)
  assert float(jnp.max(jnp.abs(out - jnp.stack(slices)))) > 1e-2


def test_dimension_numbers_layouts_and_errors():
  params = {"k": jnp.zeros((2, 8, 3, 4)), "b": jnp.zeros((2, 4)),
            "m": jnp.zeros((6, 4))}
  tx = fo.scale_by_foam(weight_dimension_numbers={
      "k": fo.DimensionNumbers((1,), (3, 2)), "b": fo.DimensionNumbers((), ()),
      "m": None})
  leaves = {ls.layout.shape: ls.layout for ls in leaf_states(tx.init(params))}
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
