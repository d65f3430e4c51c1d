"""The optimizer state: `mu_dtype` and the storage dtypes of its buffers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import foam_optax as fo
from helpers import FAST_COMPILE, leaf_states, run_steps


MIXED = {"w": jnp.ones((6, 4)), "h": jnp.ones((4, 3), jnp.bfloat16),
         "v": jnp.ones((3,), jnp.bfloat16)}


@pytest.mark.parametrize("name,mu_dtype", [
    ("scale_by_foam", None), ("scale_by_shampoo", jnp.bfloat16),
    ("scale_by_soap", None), ("scale_by_soap", jnp.float32)])
def test_mu_dtype(name, mu_dtype):
  tx = getattr(fo, name)(mu_dtype=mu_dtype, check_frequency=2)
  updates, state = run_steps(tx, MIXED, 3, compiler_options=FAST_COMPILE)
  for (key, p), ls in zip(sorted(MIXED.items()), leaf_states(state)):
    want = p.dtype if mu_dtype is None else jnp.dtype(mu_dtype)
    assert ls.momentum.dtype == want, key
    assert updates[key].dtype == p.dtype
  factors = [x for x in jax.tree.leaves(state.classes)
             if jnp.issubdtype(x.dtype, jnp.floating)]
  assert factors and all(x.dtype == jnp.float32 for x in factors)


LOW = dict(mu_dtype=jnp.bfloat16, second_moment_dtype=jnp.bfloat16,
           factor_matrix_dtype=jnp.bfloat16,
           factor_matrix_eigenvectors_dtype=jnp.bfloat16)


STORAGE_PARAMS = {"w": jnp.ones((6, 4)), "v": jnp.ones((4,))}


@functools.lru_cache
def _float32_updates(name):
  """The updates of `name` with its default (float32) storage after 6 steps
  on STORAGE_PARAMS: the reference of the tests below, run once."""
  updates, _ = run_steps(getattr(fo, name)(check_frequency=2),
                         STORAGE_PARAMS, 6, compiler_options=FAST_COMPILE)
  return updates


@pytest.mark.parametrize("name,options", [
    ("scale_by_foam", dict(LOW, inv_factor_matrix_dtype=jnp.bfloat16)),
    ("scale_by_shampoo", dict(LOW, inv_factor_matrix_dtype=jnp.float16)),
    ("scale_by_soap", LOW)])
def test_storage_dtypes(name, options):
  """Buffers stored as asked and kept so across jitted steps; the update
  stays close to the float32 one (computations stay in float32)."""
  params = STORAGE_PARAMS
  tx = getattr(fo, name)(check_frequency=2, **options)
  state = tx.init(params)
  before = [(x.shape, x.dtype) for x in jax.tree.leaves(state)]
  updates, state = run_steps(tx, params, 6, compiler_options=FAST_COMPILE)
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(state)] == before
  (group,) = state.classes
  for fs in (group.left, group.right):
    assert fs.statistic.dtype == options["factor_matrix_dtype"]
    assert fs.basis.dtype == options["factor_matrix_eigenvectors_dtype"]
    if name != "scale_by_soap":
      assert fs.inverse_root.dtype == options["inv_factor_matrix_dtype"]
    assert fs.eigvals.dtype == fs.damping.dtype == jnp.float32
  stored_moment = (group.rotated_second_moment if name == "scale_by_soap"
                   else leaf_states(state)[0].graft_second_moment)
  assert stored_moment.dtype == jnp.bfloat16
  expected = _float32_updates(name)
  for key in params:
    assert updates[key].dtype == jnp.float32
    ours, theirs = np.asarray(updates[key]), np.asarray(expected[key])
    err = np.linalg.norm(ours - theirs)
    assert err < 0.1 * np.linalg.norm(theirs), key


def test_float32_storage_is_the_default_exactly():
  f32 = dict(mu_dtype=jnp.float32, second_moment_dtype=jnp.float32,
             factor_matrix_dtype=jnp.float32,
             factor_matrix_eigenvectors_dtype=jnp.float32,
             inv_factor_matrix_dtype=jnp.float32)
  a, _ = run_steps(fo.scale_by_foam(check_frequency=2, **f32),
                   STORAGE_PARAMS, 6, compiler_options=FAST_COMPILE)
  b = _float32_updates("scale_by_foam")
  for key in STORAGE_PARAMS:
    np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("argument", [
    "mu_dtype", "second_moment_dtype", "factor_matrix_dtype",
    "factor_matrix_eigenvectors_dtype", "inv_factor_matrix_dtype"])
def test_storage_dtype_validated(argument):
  with pytest.raises(ValueError, match=argument):
    fo.foam(1e-3, **{argument: jnp.int32})
