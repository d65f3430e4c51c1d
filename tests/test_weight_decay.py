"""Decoupled weight decay after the update, as the official SOAP's: it decays
the updated weights."""

import jax.numpy as jnp
import numpy as np
import optax

import foam_optax as fo


def test_decay_updated_weights_decays_the_updated_weights():
  # p <- (p + u)(1 - lr·wd) on masked leaves, the schedule read at the
  # transformation's own count, nothing on a skipped first step.
  params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([3.0])}
  updates = {"w": jnp.array([0.5, 0.5]), "b": jnp.array([1.0])}
  lr = optax.piecewise_constant_schedule(0.1, {1: 0.5})   # 0.1, then 0.05
  tx = fo.decay_updated_weights(lr, 0.2, mask={"w": True, "b": False},
                                skip_first_step=True)
  state = tx.init(params)
  first, state = tx.update(updates, state, params)
  second, state = tx.update(updates, state, params)
  for k in params:
    np.testing.assert_array_equal(first[k], updates[k])
  rate = 0.05 * 0.2
  np.testing.assert_allclose(second["w"], updates["w"] - rate * (
      params["w"] + updates["w"]), rtol=1e-6)
  np.testing.assert_array_equal(second["b"], updates["b"])
  third, _ = fo.decay_updated_weights(0.1, 0.2).update(
      updates, fo.decay_updated_weights(0.1, 0.2).init(params), params)
  np.testing.assert_allclose(third["b"], 1.0 - 0.02 * 4.0, rtol=1e-6)
