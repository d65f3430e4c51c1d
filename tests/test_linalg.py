"""Linear-algebra kernels: the pseudo-inverse option of the inverse root."""

import jax.numpy as jnp
import numpy as np
import pytest

import foam_optax as fo
from foam_optax._src import linalg


def test_pseudo_inverse_weights():
  eigvals = jnp.array([[4.0, 1e-3, 1e-7, 0.0]])
  damping = jnp.array([1e-9])
  full = linalg.inverse_root_weights(eigvals, damping, 2)
  pinv = linalg.inverse_root_weights(eigvals, damping, 2, 1e-6)
  np.testing.assert_allclose(pinv, [[full[0, 0], full[0, 1], 0.0, 0.0]])
  assert float(full[0, 3]) == pytest.approx(1e-9 ** -0.5, rel=1e-5)


def test_pseudo_inverse_direction_ignores_null_space():
  """With a rank-deficient statistic the direction has no component in the
  null space; without the option, that component is amplified."""
  u = jnp.array([[1.0], [0.0], [0.0]])
  g = u @ jnp.array([[1.0, 2.0]])            # rank one, rows span e1
  noise = jnp.zeros((3, 2)).at[2, 0].set(1e-4)   # momentum off the span
  opts = dict(check_frequency=1, start_preconditioning_step=1, b1=0.0,
              grafting="none", stagger=False)

  def direction(**extra):
    tx = fo.scale_by_foam(**opts, **extra)
    state = tx.init({"w": jnp.zeros((3, 2))})
    return tx.update({"w": g + noise}, state)[0]["w"]

  plain, pinv = direction(), direction(pseudo_inverse_rtol=1e-3)
  # The 1e-4 entry off the span is amplified by ~(1e-8 + ε)^(-1/2) ...
  assert float(jnp.abs(plain[2, 0])) > 1.0
  # ... or dropped: what remains in row 3 is the basis' tilt (~1e-4·‖P‖).
  assert float(jnp.abs(pinv[2, :]).max()) < 1e-3 * float(jnp.abs(pinv).max())


def test_pseudo_inverse_validated():
  with pytest.raises(ValueError, match="pseudo_inverse_rtol"):
    fo.foam(1e-3, pseudo_inverse_rtol=1.5)
