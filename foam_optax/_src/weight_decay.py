"""Decoupled weight decay applied after the update, as the official SOAP's."""

import typing
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from foam_optax._src import options


class DecayUpdatedWeightsState(NamedTuple):
  # Updates so far (the schedule's argument).
  count: jax.Array  # pyright: ignore[reportIncompatibleMethodOverride]


def decay_updated_weights(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: float,
    mask: options.MaskOrFn = None,
    skip_first_step: bool = False,
) -> optax.GradientTransformation:
  r"""Decoupled weight decay of the weights *after* the update, as SOAP's.

  Put last in a chain whose updates already carry the learning rate: the
  parameters become ``(p + u)(1 - lr·wd)``, i.e. the update
  ``u - lr·wd·(p + u)``. This is the order of the official SOAP (and of
  PyTorch's AdamW "fixed" decay at the end of the step); optax's
  ``add_decayed_weights`` before the learning rate decays ``p`` instead,
  which differs by ``lr·wd·u`` (second order in the learning rate).

  Args:
    learning_rate: the chain's learning rate, a float or an optax schedule
      (evaluated at this transformation's own update count, like
      ``scale_by_learning_rate``).
    weight_decay: the decay coefficient.
    mask: pytree of bools or a callable of the params choosing the leaves
      that decay; None decays all.
    skip_first_step: no decay on the first update (SOAP's first step only
      initialises its preconditioner and leaves the weights untouched).

  Returns:
    An `optax.GradientTransformation`; `update` needs the params.

  Example:
    >>> import optax, foam_optax as fo
    >>> tx = optax.chain(fo.scale_by_soap(), optax.scale_by_learning_rate(3e-3),
    ...                  fo.decay_updated_weights(3e-3, 0.01))
  """
  if not callable(learning_rate):
    options.LEARNING_RATE.validate("learning_rate", learning_rate)
  options.ALIAS_BY_NAME["weight_decay"].validate("weight_decay", weight_decay)

  def init_fn(params):
    del params
    return DecayUpdatedWeightsState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("decay_updated_weights needs the params in update.")
    lr = (learning_rate(state.count) if callable(learning_rate)
          else learning_rate)
    rate = lr * weight_decay
    if skip_first_step:
      rate = jnp.where(state.count == 0, 0.0, rate)
    updates = jax.tree.map(
        lambda u, p: (u - rate * (p + u)).astype(u.dtype), updates, params)
    return updates, DecayUpdatedWeightsState(
        typing.cast(jax.Array, optax.safe_increment(state.count)))

  tx = optax.GradientTransformation(init_fn, update_fn)
  return tx if mask is None else optax.masked(tx, mask)
