"""A Flax NNX residual MLP whose hidden blocks are stacked and run with
`nnx.scan`, trained with `nnx.Optimizer` on scikit-learn digits.

The scanned blocks' kernels are one ``(depth, width, width)`` parameter.
`weight_dimension_numbers` makes axis 0 a batch axis, so every layer gets its
own Kronecker factors, exactly as if the layers were separate parameters;
without it the default reshaping would merge the layers into one
``(depth·width, width)`` matrix with a shared left factor.

    python examples/nnx_scan.py --optimizer foam --steps 300
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
from flax import nnx

import foam_optax as fo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


class Block(nnx.Module):

  def __init__(self, width: int, rngs: nnx.Rngs):
    self.linear = nnx.Linear(width, width, rngs=rngs)

  def __call__(self, x):
    return x + nnx.relu(self.linear(x))


class ScannedMLP(nnx.Module):

  def __init__(self, width: int, depth: int, rngs: nnx.Rngs):
    self.embed = nnx.Linear(64, width, rngs=rngs)

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create_blocks(rngs):
      return Block(width, rngs)

    self.blocks = create_blocks(rngs)
    self.out = nnx.Linear(width, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.embed(x.reshape(x.shape[0], -1)))

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def forward(block, x):
      return block(x)

    return self.out(forward(self.blocks, x))


def dimension_numbers(params):
  """Per-layer matrices for the scanned blocks, the default elsewhere.

  A stacked kernel ``(depth, in, out)``: rows ``in`` (axis 1), columns
  ``out`` (axis 2), one matrix per layer (axis 0). A stacked bias
  ``(depth, width)``: no matrix axes, so grafting only, like a plain bias.
  """
  def numbers(path, x):
    if "blocks" not in jax.tree_util.keystr(path):
      return None
    return fo.DimensionNumbers(1, 2) if x.ndim == 3 else fo.DimensionNumbers(
        (), ())
  return jax.tree_util.tree_map_with_path(numbers, params)


def train(steps: int = 300, optimizer: str = "foam",
          learning_rate: float = 3e-3, batch_size: int = 128,
          check_frequency: int = 10, log_every: int = 50, seed: int = 0,
          width: int = 32, depth: int = 3):
  """Trains the scanned MLP; returns losses, test accuracy and stats."""
  train, test = common.load_data(seed)
  model = ScannedMLP(width, depth, nnx.Rngs(seed))
  options: dict[str, Any] = {} if optimizer == "adamw" else dict(
      weight_dimension_numbers=dimension_numbers)
  opt = nnx.Optimizer(model, common.make_optimizer(
      optimizer, learning_rate, steps, check_frequency, **options),
      wrt=nnx.Param)
  return {**common.nnx_train(model, opt, train, test, steps, batch_size,
                            log_every, seed),
          "opt_state": opt.opt_state}


def main(argv=None):
  return common.run(train, __doc__, argv)


if __name__ == "__main__":
  main()
