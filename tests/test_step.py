"""The update's body (`foam_optax._src.step`): a skipped step is step 0 with
b2 = 1, properties of the compiled update that keep its compile time in
check, and overflowing finite gradients counted apart from non-finite ones.

Compile time is measured by ``foam-bench --suite cost``; the structural tests
here pin the causes found there, which do not depend on the machine.
"""

import dataclasses
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import foam_optax as fo
from foam_optax._src import initial_state
from foam_optax._src import signatures
from foam_optax._src import step


def _config(optimizer, **changes):
  """The validated `Config` of ``fo.scale_by_<optimizer>(**changes)``."""
  fn = getattr(fo, f"scale_by_{optimizer}")
  arguments = {name: p.default
               for name, p in inspect.signature(fn).parameters.items()}
  return signatures.config_for(optimizer, {**arguments, **changes})


def _factor_stacks(classes):
  return [fs for cls in classes for fs in (cls.left, cls.right)
          if fs is not None]


def _bits(tree):
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("optimizer,changes", [
    ("foam", {"check_frequency": 2}),
    ("foam", {"check_frequency": 2, "stagger": True,
              "ema_bias_correction": False, "one_sided": True,
              "factor_matrix_dtype": jnp.bfloat16}),
    ("soap", {}),
    ("asgo", {}),
])
def test_a_skipped_step_is_step_zero_with_b2_one(optimizer, changes):
  """`run_or_skip`'s invariant: the step with step count 0, zero gradients
  and b2 = 1 returns every factor stack bit for bit as it went in (so a
  skipped step needs no select over them), after real steps that filled
  the statistics and refreshed the bases; the same step with the real b2
  does change them."""
  cfg = _config(optimizer, **changes)
  rng = np.random.default_rng(0)   # NumPy: jax.random compiles per shape
  params = {name: jnp.asarray(rng.standard_normal(shape), jnp.float32)
            for name, shape in (("w", (12, 8)), ("c", (3, 4, 5)), ("b", (8,)))}
  state = initial_state.init(params, cfg)
  real = jax.jit(lambda grads, state: step.update(grads, state, cfg))
  for t in range(4):
    _, state = real(jax.tree.map(lambda p: jnp.sin((t + 1) * p), params),
                    state)
  stacks = _factor_stacks(state.classes)
  assert stacks and all(int(fs.refreshes.sum()) > 0 for fs in stacks)

  zeros = [jnp.zeros_like(p) for p in jax.tree.leaves(params)]

  @jax.jit
  def zero_step(state, b2):
    _, _, classes = step.update_tree(
        zeros, state.leaf_states(), state.classes, jnp.asarray(0, jnp.int32),
        dataclasses.replace(cfg, b2=b2), state.plan)
    return classes

  skipped = _factor_stacks(zero_step(state, jnp.asarray(1.0)))
  assert _bits(skipped) == _bits(stacks)
  decayed = _factor_stacks(zero_step(state, jnp.asarray(cfg.b2)))
  assert _bits([fs.statistic for fs in decayed]) != _bits(
      [fs.statistic for fs in stacks])


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
  update = jax.jit(tx.update)   # eagerly, every operation compiles apart
  for g in (1e30, np.nan, 1.0):
    _, state = update({"w": jnp.full((4, 3), g, jnp.float32)}, state, params)
  stats = fo.stats(state)
  assert int(stats["nonfinite_skips"]) == 2
  assert int(stats["overflow_skips"]) == 1
  assert int(stats["step"]) == 1
