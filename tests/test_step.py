"""The step: properties of the compiled update that keep its compile time in
check, and overflowing finite gradients counted apart from non-finite ones.

Compile time is measured by ``foam-bench --suite cost``; these tests pin the
structural causes found there, which do not depend on the machine.
"""

import jax
import jax.numpy as jnp
import numpy as np

import foam_optax as fo


def _compiled_update_text(tx, params) -> str:
  state = jax.eval_shape(tx.init, params)
  return jax.jit(tx.update).lower(params, state, params).compile().as_text()


def test_skip_predicate_is_computed_once():
  """The finite check of a skipped step reads one flag per leaf. Fused into
  every select that keeps the old state, it used to be repeated per kernel:
  2,910 ``is-finite`` instructions for these 24 leaves."""
  params = {f"layer{i}": {"w": jnp.zeros((8, 6)), "b": jnp.zeros((6,))}
            for i in range(12)}
  text = _compiled_update_text(fo.foam(1e-3), params)
  leaves = len(jax.tree.leaves(params))
  assert text.count("is-finite(") <= 3 * leaves


def test_overflowing_finite_gradients_are_counted_apart():
  tx = fo.foam(1e-3)
  params = {"w": jnp.ones((4, 3))}
  state = tx.init(params)
  for g in (1e30, np.nan, 1.0):
    _, state = tx.update({"w": jnp.full((4, 3), g)}, state, params)
  stats = fo.stats(state)
  assert int(stats["nonfinite_skips"]) == 2
  assert int(stats["overflow_skips"]) == 1
  assert int(stats["step"]) == 1
