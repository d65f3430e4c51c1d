"""Flax NNX: the README recipe, parameters wrapped in `nnx.Param`, the state on
one device, dimension numbers from an NNX state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import foam_optax as fo
from helpers import FAST_COMPILE
from readme_blocks import recipe as _recipe
from readme_blocks import run as _run


def test_readme_nnx_recipe_both_loops_agree():
  ns, printed, expected = _run(_recipe("nnx.split"))
  assert printed == expected
  first, second = ns["model"], ns["model_2"]
  for a, b in zip(jax.tree.leaves(nnx.state(first, nnx.Param)),
                  jax.tree.leaves(nnx.state(second, nnx.Param))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _split_mlp():
  model = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(
      jnp.ones((3, 4))) ** 2))(params)
  return params, grads


@pytest.mark.parametrize("make", [
    lambda: fo.foam(1e-3),
    # Slow: the alias of the same transformation as fo.foam, with another
    # controller; the structure is kept by the code [<lambda>0] runs.
    pytest.param(lambda: fo.shampoo(1e-3), marks=pytest.mark.slow),
    lambda: fo.soap(1e-3),
    lambda: fo.partition(fo.foam(1e-3), optax.adamw(1e-3))])
def test_updates_keep_the_gradients_structure_with_nnx_params(make):
  params, grads = _split_mlp()
  tx = make()
  state = tx.init(params)
  updates, state = jax.jit(tx.update,
                           compiler_options=FAST_COMPILE)(grads, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(grads)
  new = optax.apply_updates(params, updates)
  assert jax.tree.structure(new) == jax.tree.structure(params)


def test_nnx_state_on_one_device_is_the_state_of_the_arrays():
  """Only a state laid out for a device mesh carries Flax NNX sharding
  annotations (tests/test_multi_device_recipes.py): on one device the state
  of NNX parameters is that of their arrays, as it always was."""
  params, _ = _split_mlp()
  for tx in (fo.foam(1e-3), fo.soap(1e-3), fo.asgo(1e-3)):
    state = tx.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(
        tx.init(nnx.as_pure(params)))
    assert not any(isinstance(x, nnx.Variable) for x in jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def test_dimension_numbers_from_nnx_state_and_short_errors():
  params, _ = _split_mlp()
  numbers = jax.tree.map(
      lambda p: fo.DimensionNumbers(0, 1) if p.ndim == 2 else None, params)
  fo.foam(1e-3, weight_dimension_numbers=numbers).init(params)
  # A tree that still holds the arrays: one short line naming the leaf.
  with pytest.raises(ValueError) as error:
    fo.foam(1e-3, weight_dimension_numbers=params).init(params)
  message = str(error.value)
  assert "['bias']" in message and "DimensionNumbers" in message
  assert len(message) < 400 and "0." not in message
  with pytest.raises(ValueError) as error:
    fo.foam(1e-3, weight_dimension_numbers={"other": None}).init(
        {"w": jnp.full((64, 64), 0.123)})
  assert "prefix" in str(error.value) and "0.123" not in str(error.value)
