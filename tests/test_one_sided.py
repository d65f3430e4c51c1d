"""One-sided preconditioning (``one_sided=True``): one factor per matrix,
on its smaller side, against a dense NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import foam_optax as fo

# (shape, the side kept): the smaller side; the rows on a tie.
CASES = [((6, 4), "right"), ((4, 6), "left"), ((5, 5), "left")]


def _inverse_sqrt(a, eps):
  d, q = np.linalg.eigh(a)
  return (q * (np.maximum(d, 0) + eps) ** -0.5) @ q.T


@pytest.mark.parametrize("shape,side", CASES)
def test_one_sided_shampoo_matches_a_dense_reference(shape, side):
  b2, eps, steps = 0.9, 1e-3, 6
  tx = fo.scale_by_shampoo(one_sided=True, b1=0.0, b2=b2, epsilon=eps,
                           grafting="none", check_frequency=1,
                           start_preconditioning_step=1)
  state = tx.init(jnp.zeros(shape))
  assert [v.side for v in fo.factor_stacks(state)] == [side]
  rng = np.random.default_rng(0)
  statistic = 0.0
  step = jax.jit(tx.update)
  for t in range(1, steps + 1):
    g = rng.standard_normal(shape)
    gram = g @ g.T if side == "left" else g.T @ g
    statistic = b2 * statistic + (1 - b2) * gram
    root = _inverse_sqrt(statistic / (1 - b2 ** t), eps)
    expected = root @ g if side == "left" else g @ root
    update, state = step(jnp.asarray(g, jnp.float32), state)
    np.testing.assert_allclose(update, expected, rtol=2e-3, atol=1e-4)


def test_one_sided_keeps_the_smallest_dimension_of_a_tensor_leaf():
  state = fo.scale_by_soap(one_sided=True).init(jnp.zeros((6, 3, 5)))
  assert [v.side for v in fo.factor_stacks(state)] == ["dim1"]
  state = fo.scale_by_soap(one_sided=True).init(jnp.zeros((6, 4)))
  assert [v.side for v in fo.factor_stacks(state)] == ["right"]


def test_one_sided_with_max_precond_dim_under_inject_hyperparams():
  """The side dropped by one-sidedness is not read as a max_precond_dim
  limit when a static max_precond_dim is checked against the state."""
  import optax
  tx = optax.inject_hyperparams(fo.foam, static_args=(
      "max_precond_dim", "block_size"))(
          learning_rate=1e-3, one_sided=True, max_precond_dim=1000)
  params = {"w": jnp.ones((8, 3))}
  state = tx.init(params)
  _, state = jax.jit(tx.update)({"w": jnp.ones((8, 3))}, state, params)
  assert int(fo.stats(state)["num_factors"]) == 1
