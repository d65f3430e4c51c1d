"""A Flax NNX MLP on scikit-learn digits, trained with `nnx.Optimizer`.

    python examples/nnx_mlp.py --optimizer foam --steps 300
"""

from __future__ import annotations

import os
import sys

from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


class MLP(nnx.Module):

  def __init__(self, hidden: int, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(64, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x.reshape(x.shape[0], -1))))


def train(steps: int = 300, optimizer: str = "foam",
          learning_rate: float = 3e-3, batch_size: int = 128,
          check_frequency: int = 10, log_every: int = 50, seed: int = 0):
  """Trains the MLP; returns losses, test accuracy and optimizer stats."""
  train, test = common.load_data(seed)
  model = MLP(64, nnx.Rngs(seed))
  opt = nnx.Optimizer(model, common.make_optimizer(
      optimizer, learning_rate, steps, check_frequency), wrt=nnx.Param)
  return common.nnx_train(model, opt, train, test, steps, batch_size,
                          log_every, seed)


def main(argv=None):
  return common.run(train, __doc__, argv)


if __name__ == "__main__":
  main()
