"""`fo.stats` splits its eigendecomposition count by factor side."""

import jax
import jax.numpy as jnp
import numpy as np

import foam_optax as fo


def test_eigendecompositions_by_side_are_exact_counts():
  # block_size 2: u (4, 4) has 4 blocks with a left and a right factor
  # each; w (2, 3) has blocks 2x2 and 2x1, the 2x1 with no right factor.
  # Left factors: 4 + 2 = 6; right factors: 4 + 1 = 5.
  params = {"u": jnp.zeros((4, 4)), "w": jnp.zeros((2, 3))}
  tx = fo.scale_by_shampoo(block_size=2, check_frequency=2,
                           start_preconditioning_step=2)
  state = tx.init(params)
  rng = np.random.default_rng(0)
  step = jax.jit(tx.update)
  for _ in range(6):   # check steps 2, 4, 6
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
        params)
    _, state = step(grads, state, params)
  stats = fo.stats(state)
  assert int(stats["eigendecompositions_left"]) == 3 * 6
  assert int(stats["eigendecompositions_right"]) == 3 * 5
  assert int(stats["eigendecompositions"]) == 3 * 11
