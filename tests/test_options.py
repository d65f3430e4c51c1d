"""The options under `optax.inject_hyperparams`: what an edit changes mid-run
(the README recipe, the check frequency) and what it may not (the options that
decide the layout)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import foam_optax as fo
from helpers import FAST_COMPILE
from readme_blocks import recipe as _recipe
from readme_blocks import run as _run


def test_readme_inject_hyperparams_recipe():
  ns, _, _ = _run(_recipe("inject_hyperparams"))
  state = ns["state"]
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(3e-4)
  assert "block_size" not in state.hyperparams
  assert int(fo.stats(state)["step"]) == 1
  # The update used the edited learning rate: a first FOAM step is the
  # grafted Adam step, of size lr per entry.
  np.testing.assert_allclose(ns["updates"]["w"], -3e-4, rtol=1e-3)


_W = {"w": jnp.ones((6, 4)), "v": jnp.ones((6, 6))}


def _grads(i):
  keys = jax.random.split(jax.random.PRNGKey(i), 2)
  return {"w": jax.random.normal(keys[0], (6, 4)),
          "v": jax.random.normal(keys[1], (6, 6))}


@functools.lru_cache
def _injected(block_size):
  """FOAM under inject_hyperparams with `block_size` and max_precond_dim=8
  (above every side), and its jitted update: the tests below edit one
  state's values, so one program per block size serves them."""
  tx = optax.inject_hyperparams(fo.foam)(1e-3, block_size=block_size,
                                         max_precond_dim=8)
  return tx, jax.jit(tx.update, compiler_options=FAST_COMPILE)


@pytest.mark.parametrize("name,block_size,edited", [
    ("block_size", 4, 3), ("block_size", 1024, 5),
    ("max_precond_dim", 1024, 4)])
def test_structural_edit_raises(name, block_size, edited):
  tx, update = _injected(block_size)
  state = tx.init(_W)
  state.hyperparams[name] = jnp.asarray(edited)
  with pytest.raises(ValueError, match=f"{name}={edited} does not match"):
    tx.update(_grads(0), state, _W)
  with pytest.raises(jax.errors.JaxRuntimeError,
                     match=f"{name}={edited} does not match"):
    jax.block_until_ready(update(_grads(0), state, _W))


def test_structural_edit_with_the_same_layout_is_accepted():
  tx, update = _injected(1024)
  state = tx.init(_W)
  # Every side is at most 6: these give the layout the state already has.
  state.hyperparams["block_size"] = jnp.asarray(6)
  state.hyperparams["max_precond_dim"] = jnp.asarray(100)
  _, state = update(_grads(0), state, _W)
  assert int(fo.stats(state)["step"]) == 1


def test_injected_check_frequency_takes_effect():
  tx = optax.inject_hyperparams(fo.foam)(
      1e-3, check_frequency=100, start_preconditioning_step=1, stagger=False)
  step = jax.jit(tx.update, compiler_options=FAST_COMPILE)

  def checks(frequency):
    state = tx.init(_W)
    state.hyperparams["check_frequency"] = jnp.asarray(frequency)
    for i in range(6):
      _, state = step(_grads(i), state, _W)
    return int(fo.stats(state)["checks"])

  num_factors = 4
  assert checks(100) == num_factors            # only the first check
  assert checks(2) == 4 * num_factors          # steps 1, 2, 4, 6
