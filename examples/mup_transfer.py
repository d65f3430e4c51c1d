"""μP: a learning rate tuned on a narrow MLP trains a wide one, on digits.

    python examples/mup_transfer.py --optimizer foam --width 128    # tune here
    python examples/mup_transfer.py --optimizer foam --width 1024   # then this

`fo.mup_multipliers` compares every parameter with the base model's (width
`--base-width`, where the learning rate was tuned) and `fo.scale_by_mup`
applies the factors, so only the width changes. Weight decay is independent
of the learning rate and scales as 1/width (`WD_X_WIDTH / width`).
"""

from __future__ import annotations

import os
import sys
from typing import Literal

import jax
import optax
from flax import nnx

import foam_optax as fo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# Which μP rule each optimizer follows (`fo.mup_multipliers`' `optimizer`):
# FOAM and Shampoo graft Adam's step size, SOAP is Adam in a rotated basis.
RULES: dict[str, Literal["grafted", "soap", "adam"]] = {
    "foam": "grafted", "shampoo": "grafted", "soap": "soap", "adamw": "adam"}
WD_X_WIDTH = 0.128   # weight decay 1e-3 at width 128


class MLP(nnx.Module):
  """64 -> width -> width -> 10, initialised for μP: fan-in scaled hidden
  layers (nnx.Linear's default) and a zero readout."""

  def __init__(self, width: int, rngs: nnx.Rngs):
    self.input = nnx.Linear(64, width, rngs=rngs)
    self.hidden = nnx.Linear(width, width, rngs=rngs)
    self.readout = nnx.Linear(width, 10, kernel_init=nnx.initializers.zeros,
                              rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.input(x.reshape(x.shape[0], -1)))
    return self.readout(nnx.relu(self.hidden(x)))


def direction(name: str, check_frequency: int) -> optax.GradientTransformation:
  """The optimizer's update before the learning rate."""
  if name == "foam":
    return fo.scale_by_foam(check_frequency=check_frequency)
  if name == "shampoo":
    return fo.scale_by_shampoo(check_frequency=check_frequency)
  if name == "soap":
    return fo.scale_by_soap(check_frequency=check_frequency)
  if name == "adamw":
    return optax.scale_by_adam()
  raise ValueError(f"optimizer must be one of {common.OPTIMIZERS}, got {name!r}.")


def make_optimizer(name, learning_rate, steps, check_frequency, multipliers,
                   width):
  """μP learning rates, then weight decay that ignores the learning rate
  and scales as 1/width; warmup + cosine decay of both."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, 1.0, warmup_steps=max(1, steps // 10), decay_steps=steps)
  return optax.chain(
      direction(name, check_frequency),
      fo.scale_by_mup(multipliers),
      optax.scale(learning_rate),
      optax.add_decayed_weights(
          WD_X_WIDTH / width,
          mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
      optax.scale_by_schedule(schedule),
      optax.scale(-1.0))


def train(steps: int = 300, optimizer: str = "foam",
          learning_rate: float = 3e-3, batch_size: int = 128,
          check_frequency: int = 10, log_every: int = 50, seed: int = 0,
          width: int = 128, base_width: int = 128):
  """Trains the MLP at `width` with the rate tuned at `base_width`; returns
  losses, test accuracy, optimizer stats and the μP multipliers."""
  train, test = common.load_data(seed)
  model = MLP(width, nnx.Rngs(seed))
  base = nnx.eval_shape(lambda: MLP(base_width, nnx.Rngs(seed)))
  multipliers = fo.mup_multipliers(
      nnx.as_pure(nnx.state(model, nnx.Param)),
      nnx.as_pure(nnx.state(base, nnx.Param)), optimizer=RULES[optimizer],
      readout=lambda path: "readout" in path)
  opt = nnx.Optimizer(model, make_optimizer(
      optimizer, learning_rate, steps, check_frequency, multipliers, width),
      wrt=nnx.Param)
  return {**common.nnx_train(model, opt, train, test, steps, batch_size,
                            log_every, seed),
          "multipliers": nnx.to_pure_dict(multipliers)}


def main(argv=None):
  parser = common.parser(__doc__)
  parser.add_argument("--width", type=int, default=128,
                      help="hidden width to train")
  parser.add_argument("--base-width", type=int, default=128,
                      help="width at which --learning-rate was tuned")
  args = parser.parse_args(argv)
  result = train(steps=args.steps, optimizer=args.optimizer,
                 learning_rate=args.learning_rate, batch_size=args.batch_size,
                 check_frequency=args.check_frequency,
                 log_every=args.log_every, seed=args.seed, width=args.width,
                 base_width=args.base_width)
  print(f"test accuracy {result['accuracy']:.4f}")
  return result


if __name__ == "__main__":
  main()
