"""Per-dimension factors of tensor leaves (eigenvalue-corrected only): counted
and refreshed on SOAP's schedule, stored in the configured dtypes, and the
one-sided choice of the smallest dimension."""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import foam_optax as fo
from helpers import FAST_COMPILE


def test_tensor_factors_are_counted_and_refreshed_on_soaps_schedule():
  # (3,4,5): one factor per dimension, beside a matrix's two. The first
  # step decomposes all five; the next refresh follows update t - 1 = 10.
  params = {"k": jnp.zeros((3, 4, 5)), "w": jnp.zeros((6, 5))}
  tx = fo.scale_by_soap()
  rng = np.random.default_rng(3)
  grads = jax.tree.map(lambda p: jnp.asarray(
      rng.standard_normal((12,) + p.shape), jnp.float32), params)

  def body(state, g):
    _, state = tx.update(g, state)
    return state, fo.stats(state)["eigendecompositions"]

  state, evds = jax.jit(lambda s, g: lax.scan(body, s, g),
                        compiler_options=FAST_COMPILE)(tx.init(params), grads)
  assert int(fo.stats(state)["num_factors"]) == 5
  np.testing.assert_array_equal(evds, [5] * 10 + [10, 10])
  tensor = state.leaves["k"].tensor
  assert [f.statistic.shape for f in tensor.factors] == [
      (1, 3, 3), (1, 4, 4), (1, 5, 5)]


def test_tensor_leaves_use_the_storage_dtypes():
  """The per-dimension factors and rotated second moment of a rank-3 leaf
  are stored in the storage dtypes, as matrix leaves' are, and stay so."""
  bf16 = jnp.bfloat16
  tx = fo.scale_by_soap(factor_matrix_dtype=bf16,
                        factor_matrix_eigenvectors_dtype=bf16,
                        second_moment_dtype=bf16)
  params = {"t": jnp.zeros((3, 4, 5)), "w": jnp.zeros((6, 5))}
  state = tx.init(params)
  rng = np.random.default_rng(0)
  step = jax.jit(tx.update)
  for _ in range(3):
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
        params)
    updates, state = step(grads, state)
  views = fo.factor_stacks(state)
  assert {v.side for v in views} >= {"dim0", "dim1", "dim2", "left", "right"}
  for view in views:
    assert view.stack.statistic.dtype == bf16, view.side
    assert view.stack.basis.dtype == bf16, view.side
  (tensor,) = [t for t in state.tensors if t is not None]
  assert tensor.rotated_second_moment.dtype == bf16
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def test_one_sided_keeps_the_smallest_dimension_of_a_tensor_leaf():
  state = fo.scale_by_soap(one_sided=True).init(jnp.zeros((6, 3, 5)))
  assert [v.side for v in fo.factor_stacks(state)] == ["dim1"]
  state = fo.scale_by_soap(one_sided=True).init(jnp.zeros((6, 4)))
  assert [v.side for v in fo.factor_stacks(state)] == ["right"]
