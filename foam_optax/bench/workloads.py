"""Benchmark workloads: data generated or shipped inside installed packages.

Every workload is a `Workload`: parameters from a seed, a differentiable
minibatch loss, per-step batches drawn from a seed, and a jittable evaluation
on fixed train and held-out sets. Nothing is downloaded. Other code can reuse a
workload directly, for example::

    from foam_optax.bench.workloads import transformer_lm
    w = transformer_lm()
    params = w.init_params(0)
    batches = w.sample_batches(0, 100)          # leading axis: step
    loss = w.loss_fn(params, jax.tree.map(lambda b: b[0], batches))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

Params = Any
Batch = Any


@dataclasses.dataclass(frozen=True)
class Workload:
  """A training problem.

  Attributes:
    name: identifier used on the command line and in reports.
    description: one line for reports.
    init_params: seed -> parameter pytree.
    loss_fn: (params, batch) -> scalar minibatch loss (differentiable).
    sample_batches: (seed, num_steps) -> batch pytree with a leading step axis.
    evaluate: params -> dict of scalars, always ``train_loss`` and
      ``test_loss`` (on fixed sets), plus ``train_accuracy`` and
      ``test_accuracy`` for classifiers; jittable.
    steps: default number of training steps.
  """

  name: str
  description: str
  init_params: Callable[[int], Params]
  loss_fn: Callable[[Params, Batch], jax.Array]
  sample_batches: Callable[[int, int], Batch]
  evaluate: Callable[[Params], dict]
  steps: int


# ---------------------------------------------------------------- quadratic


def kronecker_quadratic(kappa: float = 1e4, rows: int = 64, cols: int = 32,
                        noise: float = 0.1, steps: int = 150) -> Workload:
  """0.5 ||A^(1/2) (W - W*) B^(1/2)||_F^2 with noisy gradients.

  `A` (rows x rows) and `B` (cols x cols) are randomly rotated with
  eigenvalues log-spaced over sqrt(kappa) each, so the Hessian A ⊗ B has
  condition number `kappa`; W* has N(0, 0.05^2) entries and W starts at 0.
  The loss is normalised to 1 at W = 0. Each step
  adds Gaussian noise of relative scale `noise` to the gradient (the loss
  value itself stays exact); train and held-out loss are both the exact loss.
  """
  rng = np.random.default_rng(1234)
  root = np.sqrt(kappa)

  def spd(size):
    q, _ = np.linalg.qr(rng.standard_normal((size, size)))
    return (q * np.logspace(0.0, -np.log10(root), size)) @ q.T

  a, b = jnp.asarray(spd(rows), jnp.float32), jnp.asarray(spd(cols), jnp.float32)
  target = jnp.asarray(0.05 * rng.standard_normal((rows, cols)), jnp.float32)
  scale = float(0.5 * jnp.sum(target * (a @ target @ b)))
  grad_rms = float(jnp.sqrt(jnp.mean((a @ target @ b) ** 2))) / scale

  def exact_loss(w):
    delta = w - target
    return 0.5 * jnp.sum(delta * (a @ delta @ b)) / scale

  def loss_fn(params, batch):
    w = params["w"]
    # Value: the exact loss; gradient: exact gradient + batch noise.
    return exact_loss(w) + jnp.sum(batch * (w - jax.lax.stop_gradient(w)))

  def sample_batches(seed, num_steps):
    noise_rng = np.random.default_rng(seed)
    return jnp.asarray(noise * grad_rms * noise_rng.standard_normal(
        (num_steps, rows, cols)), jnp.float32)

  def evaluate(params):
    loss = exact_loss(params["w"])
    return {"train_loss": loss, "test_loss": loss}

  return Workload(
      name=f"quadratic_k1e{round(np.log10(kappa))}",
      description=(f"Kronecker quadratic {rows}x{cols}, kappa={kappa:.0e}, "
                   f"gradient noise {noise}"),
      init_params=lambda seed: {"w": jnp.zeros((rows, cols), jnp.float32)},
      loss_fn=loss_fn, sample_batches=sample_batches, evaluate=evaluate,
      steps=steps)


# ------------------------------------------------------------------- digits


def _digits(test_fraction=0.2):
  """scikit-learn's 8x8 digits, pixels in [0, 1], fixed held-out split."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  x_train, x_test, y_train, y_test = train_test_split(
      x, y, test_size=test_fraction, random_state=0, stratify=y)
  return (x_train, x_test, np.asarray(y_train, np.int32),
          np.asarray(y_test, np.int32))


def _functional(module: nnx.Module):
  """(pure parameter dict, apply(params, x)) of a stateless nnx module."""
  graphdef, state = nnx.split(module, nnx.Param)
  return nnx.to_pure_dict(state), lambda params, x: nnx.merge(graphdef, params)(x)


def _digits_workload(name, description, make_module, reconstruct, steps,
                     batch_size=128):
  x_train, x_test, y_train, y_test = _digits()
  apply = _functional(make_module(0))[1]

  def init_params(seed):
    return _functional(make_module(seed))[0]

  def losses(params, x, y):
    out = apply(params, x)
    if reconstruct:
      return jnp.mean((out - x) ** 2, axis=-1), None
    logp = jax.nn.log_softmax(out)
    nll = -jnp.take_along_axis(logp, y[:, None], axis=-1)[:, 0]
    return nll, jnp.argmax(out, axis=-1) == y

  def loss_fn(params, batch):
    return jnp.mean(losses(params, batch["x"], batch["y"])[0])

  def sample_batches(seed, num_steps):
    idx = np.random.default_rng(seed).integers(
        0, len(x_train), (num_steps, batch_size))
    return {"x": jnp.asarray(x_train[idx]), "y": jnp.asarray(y_train[idx])}

  sets = {"train": (jnp.asarray(x_train), jnp.asarray(y_train)),
          "test": (jnp.asarray(x_test), jnp.asarray(y_test))}

  def evaluate(params):
    result = {}
    for split, (x, y) in sets.items():
      loss, correct = losses(params, x, y)
      result[f"{split}_loss"] = jnp.mean(loss)
      if correct is not None:
        result[f"{split}_accuracy"] = jnp.mean(correct)
    return result

  return Workload(name, description, init_params, loss_fn, sample_batches,
                  evaluate, steps)


class MLP(nnx.Module):
  """64 -> 64 -> 64 -> 10 classifier."""

  def __init__(self, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(64, 64, rngs=rngs),
                            nnx.Linear(64, 64, rngs=rngs),
                            nnx.Linear(64, 10, rngs=rngs)])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = nnx.gelu(layer(x))
    return self.layers[-1](x)


class CNN(nnx.Module):
  """Two 3x3 convolutions (rank-4 kernels), 4x4 average pooling, linear head."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
    self.head = nnx.Linear(2 * 2 * 32, 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], 8, 8, 1)
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.avg_pool(x, (4, 4), strides=(4, 4))
    return self.head(x.reshape(x.shape[0], -1))


class Autoencoder(nnx.Module):
  """64 -> 64 -> 16 -> 64 -> 64 with a sigmoid output."""

  def __init__(self, rngs: nnx.Rngs):
    sizes = [64, 64, 16, 64, 64]
    self.layers = nnx.List([nnx.Linear(i, o, rngs=rngs)
                            for i, o in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = nnx.gelu(layer(x))
    return nnx.sigmoid(self.layers[-1](x))


def digits_mlp(steps: int = 200) -> Workload:
  """MLP classifier on scikit-learn digits (80/20 stratified split)."""
  return _digits_workload(
      "digits_mlp", "MLP 64-64-64-10 on sklearn digits",
      lambda seed: MLP(nnx.Rngs(seed)), reconstruct=False, steps=steps)


def digits_cnn(steps: int = 200) -> Workload:
  """Small CNN classifier on scikit-learn digits (8x8 images)."""
  return _digits_workload(
      "digits_cnn", "CNN conv3x3(16)-conv3x3(32)-avgpool4-linear on sklearn digits",
      lambda seed: CNN(nnx.Rngs(seed)), reconstruct=False, steps=steps)


def digits_autoencoder(steps: int = 200) -> Workload:
  """Autoencoder on scikit-learn digits, mean squared reconstruction error."""
  return _digits_workload(
      "digits_autoencoder", "Autoencoder 64-64-16-64-64 on sklearn digits (MSE)",
      lambda seed: Autoencoder(nnx.Rngs(seed)), reconstruct=True, steps=steps)


# -------------------------------------------------------------- transformer


def _pydoc_text():
  import pydoc_data.topics
  topics = pydoc_data.topics.topics
  return "\n".join(topics[key] for key in sorted(topics))


class TransformerLM(nnx.Module):
  """Pre-norm causal Transformer language model (MLP width default 2 x d_model)."""

  def __init__(self, vocab_size: int, seq_len: int, rngs: nnx.Rngs,
               d_model: int = 64, num_heads: int = 4, num_layers: int = 2,
               mlp_width: int | None = None):
    self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
    self.position = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (seq_len, d_model)))
    self.blocks = nnx.List([_Block(d_model, num_heads,
                                   mlp_width or 2 * d_model, rngs)
                            for _ in range(num_layers)])
    self.norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.position[:tokens.shape[-1]]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.norm(x))


class _Block(nnx.Module):

  def __init__(self, d_model, num_heads, mlp_width, rngs):
    self.norm1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        num_heads, d_model, decode=False, rngs=rngs)
    self.norm2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.up = nnx.Linear(d_model, mlp_width, rngs=rngs)
    self.down = nnx.Linear(mlp_width, d_model, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attention(self.norm1(x), mask=mask)
    return x + self.down(nnx.gelu(self.up(self.norm2(x))))


def transformer_lm(steps: int = 200, seq_len: int = 64, batch_size: int = 16,
                   d_model: int = 64, num_layers: int = 2,
                   eval_sequences: int = 64, mlp_width: int | None = None,
                   name: str = "transformer_lm") -> Workload:
  """Character-level Transformer LM on the text of `pydoc_data.topics`.

  The last 10% of the text is held out. Evaluation uses `eval_sequences`
  fixed windows from each split; losses are nats per character. The MLP of
  each block is ``d_model -> mlp_width -> d_model`` (default width
  ``2 * d_model``), so its kernels have Kronecker factors of size
  `mlp_width`.
  """
  text = _pydoc_text()
  chars = sorted(set(text))
  lookup = {c: i for i, c in enumerate(chars)}
  tokens = np.fromiter((lookup[c] for c in text), np.int32, len(text))
  split = int(0.9 * len(tokens))
  train, test = tokens[:split], tokens[split:]

  def make(seed):
    return TransformerLM(len(chars), seq_len, nnx.Rngs(seed),
                         d_model=d_model, num_layers=num_layers,
                         mlp_width=mlp_width)

  apply = _functional(make(0))[1]

  def windows(data, starts):
    return data[starts[..., None] + np.arange(seq_len + 1)]

  def token_losses(params, window):
    logits = apply(params, window[..., :-1])
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, window[..., 1:, None], axis=-1)[..., 0]

  def sample_batches(seed, num_steps):
    starts = np.random.default_rng(seed).integers(
        0, len(train) - seq_len - 1, (num_steps, batch_size))
    return jnp.asarray(windows(train, starts))

  fixed = np.random.default_rng(99)
  eval_sets = {
      name: jnp.asarray(windows(data, fixed.integers(
          0, len(data) - seq_len - 1, eval_sequences)))
      for name, data in (("train", train), ("test", test))}

  return Workload(
      name=name,
      description=(f"char Transformer LM, {num_layers} layers, d_model "
                   f"{d_model}, MLP {mlp_width or 2 * d_model}, seq "
                   f"{seq_len}, batch {batch_size}, on pydoc_data.topics "
                   f"({len(text)} chars, vocab {len(chars)})"),
      init_params=lambda seed: _functional(make(seed))[0],
      loss_fn=lambda params, batch: jnp.mean(token_losses(params, batch)),
      sample_batches=sample_batches,
      evaluate=lambda params: {
          f"{name}_loss": jnp.mean(token_losses(params, data))
          for name, data in eval_sets.items()},
      steps=steps)


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "quadratic_k1e2": lambda **kw: kronecker_quadratic(kappa=1e2, **kw),
    "quadratic_k1e4": lambda **kw: kronecker_quadratic(kappa=1e4, **kw),
    "digits_mlp": digits_mlp,
    "digits_cnn": digits_cnn,
    "digits_autoencoder": digits_autoencoder,
    "transformer_lm": transformer_lm,
}
"""Workload constructors by name; each accepts ``steps=``."""
