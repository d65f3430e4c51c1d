"""`init`: the initial state can be donated to a jitted step."""

import jax
import jax.numpy as jnp
import optax
import pytest

import foam_optax as fo
from helpers import FAST_COMPILE


@pytest.mark.parametrize("make", [
    lambda: fo.foam(1e-3),
    # Slow: the alias of the same transformation as fo.foam, another
    # controller with a state of the same structure, shapes and dtypes,
    # which [foam] donates.
    pytest.param(lambda: fo.shampoo(1e-3), marks=pytest.mark.slow),
    lambda: fo.soap(1e-3),
    lambda: fo.partition(fo.foam(1e-3), optax.adamw(1e-3))],
    ids=["foam", "shampoo", "soap", "partition"])
def test_initial_state_can_be_donated(make):
  # Training loops donate the optimizer state to the jitted step; XLA
  # rejects a state whose fields share one buffer.
  tx = make()
  params = {"w": jnp.ones((8, 4)), "b": jnp.ones(4), "k": jnp.ones((2, 3, 4))}
  state = tx.init(params)
  pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
  assert len(set(pointers)) == len(pointers)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p), donate_argnums=(1,),
                 compiler_options=FAST_COMPILE)
  _, new_state = step(params, state, params)
  assert jax.tree.structure(new_state) == jax.tree.structure(
      jax.eval_shape(tx.init, params))
