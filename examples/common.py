"""Shared pieces of the examples: data, optimizers, flags and logging.

Every example exposes ``train(steps=..., optimizer=..., ...)`` returning a
dict of results and ``main(argv=None)`` parsing the flags below.
"""

from __future__ import annotations

import argparse
from typing import Iterator, Optional

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits

import foam_optax as fo

OPTIMIZERS = ("foam", "shampoo", "soap", "adamw")


def load_data(seed: int = 0):
  """scikit-learn's digits as (N, 8, 8, 1) float32 in [0, 1] and int32
  labels, split 80/20 into ``(train, test)`` pairs."""
  images, labels = load_digits(return_X_y=True)
  images = (images / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
  order = np.random.default_rng(seed).permutation(len(images))
  split = int(0.8 * len(images))
  train, test = order[:split], order[split:]
  return ((images[train], labels[train].astype(np.int32)),
          (images[test], labels[test].astype(np.int32)))


def batches(images, labels, batch_size: int,
            seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless random mini-batches."""
  rng = np.random.default_rng(seed)
  while True:
    index = rng.choice(len(images), batch_size, replace=False)
    yield images[index], labels[index]


def make_optimizer(name: str, learning_rate: float, steps: int,
                   check_frequency: int = 10,
                   block_size: int = 1024,
                   **options) -> optax.GradientTransformation:
  """The named optimizer with warmup + cosine decay and weight decay 1e-4;
  `options` go to the foam_optax optimizers (e.g. weight_dimension_numbers)."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps=max(1, steps // 10), decay_steps=steps)
  if name == "foam":
    return fo.foam(schedule, check_frequency=check_frequency,
                   block_size=block_size, weight_decay=1e-4, **options)
  if name == "shampoo":
    return fo.shampoo(schedule, check_frequency=check_frequency,
                      block_size=block_size, weight_decay=1e-4, **options)
  if name == "soap":
    return fo.soap(schedule, check_frequency=check_frequency,
                   block_size=block_size, weight_decay=1e-4, **options)
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=1e-4)
  raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}.")


def parser(doc: Optional[str]) -> argparse.ArgumentParser:
  """The examples' flags; `doc` is the example's module docstring, whose
  first line describes it."""
  p = argparse.ArgumentParser(description=(doc or "").partition("\n")[0])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--optimizer", choices=OPTIMIZERS, default="foam")
  p.add_argument("--learning-rate", type=float, default=3e-3)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--check-frequency", type=int, default=10)
  p.add_argument("--log-every", type=int, default=50)
  p.add_argument("--seed", type=int, default=0)
  return p


def optimizer_stats(opt_state) -> dict:
  """`fo.stats` as Python numbers; empty for optimizers outside foam_optax."""
  try:
    return {k: float(v) for k, v in fo.stats(opt_state).items()}
  except ValueError:
    return {}


def log(step: int, loss: float, opt_state=None) -> None:
  """One line per logged step: loss, then FOAM/Shampoo counters if any."""
  line = f"step {step:5d} | loss {loss:.4f}"
  s = optimizer_stats(opt_state) if opt_state is not None else {}
  if s:
    line += (f" | eigendecompositions {int(s['eigendecompositions'])}"
             f" | damping_max {s['damping_max']:.2e}")
  print(line, flush=True)


def run(train, doc: Optional[str], argv=None, label=lambda result: ""):
  """The examples' shared entry point: parse the flags above (`doc` as in
  `parser`), train, print ``<label>test accuracy``; returns `train`'s
  result."""
  args = parser(doc).parse_args(argv)
  result = train(steps=args.steps, optimizer=args.optimizer,
                 learning_rate=args.learning_rate, batch_size=args.batch_size,
                 check_frequency=args.check_frequency,
                 log_every=args.log_every, seed=args.seed)
  print(f"{label(result)}test accuracy {result['accuracy']:.4f}")
  return result


def classification_loss(model, images, labels):
  """Mean softmax cross-entropy of an NNX classifier."""
  logits = model(images)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def nnx_train_step(model, optimizer, images, labels):
  """One `nnx.Optimizer` step of the NNX examples; returns the loss."""
  loss, grads = nnx.value_and_grad(classification_loss)(model, images, labels)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def nnx_accuracy(model, images, labels):
  return jnp.mean(jnp.argmax(model(images), -1) == labels)


def nnx_train(model, opt, train, test, steps: int, batch_size: int,
              log_every: int, seed: int) -> dict:
  """The NNX examples' loop: `steps` steps of `nnx_train_step` on random
  batches of `train`; returns the losses, the accuracy on `test` and the
  optimizer's stats."""
  losses = []
  images, labels = train
  data = batches(images, labels, batch_size, seed)
  for step in range(1, steps + 1):
    losses.append(float(nnx_train_step(model, opt, *next(data))))
    if step % log_every == 0 or step == steps:
      log(step, losses[-1], opt.opt_state)
  return {"losses": losses, "accuracy": float(nnx_accuracy(model, *test)),
          "stats": optimizer_stats(opt.opt_state)}
