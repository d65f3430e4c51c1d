"""A Flax Linen CNN on scikit-learn digits, trained with a `TrainState`.

    python examples/linen_cnn.py --optimizer foam --steps 300
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.training import train_state

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


class CNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))            # kernel (3, 3, 1, 8)
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))  # kernel (128, 10)


@jax.jit
def _train_step(state: train_state.TrainState, images, labels):
  def loss_fn(params):
    logits = state.apply_fn({"params": params}, images)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


@jax.jit
def _accuracy(state: train_state.TrainState, images, labels):
  logits = state.apply_fn({"params": state.params}, images)
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def train(steps: int = 300, optimizer: str = "foam",
          learning_rate: float = 3e-3, batch_size: int = 128,
          check_frequency: int = 10, log_every: int = 50, seed: int = 0):
  """Trains the CNN; returns losses, test accuracy and optimizer stats."""
  (x_train, y_train), (x_test, y_test) = common.load_data(seed)
  model = CNN()
  params = model.init(jax.random.PRNGKey(seed), x_train[:1])["params"]
  state = train_state.TrainState.create(
      apply_fn=model.apply, params=params, tx=common.make_optimizer(
          optimizer, learning_rate, steps, check_frequency))
  losses = []
  data = common.batches(x_train, y_train, batch_size, seed)
  for step in range(1, steps + 1):
    state, loss = _train_step(state, *next(data))
    losses.append(float(loss))
    if step % log_every == 0 or step == steps:
      common.log(step, losses[-1], state.opt_state)
  return {"losses": losses,
          "accuracy": float(_accuracy(state, x_test, y_test)),
          "stats": common.optimizer_stats(state.opt_state)}


def main(argv=None):
  return common.run(train, __doc__, argv)


if __name__ == "__main__":
  main()
