"""How much each use of matrix products in Shampoo/FOAM loses at lower
matmul precision, emulated on any backend.

A product at reduced precision is emulated as the float32 product of
inputs rounded by `lax.reduce_precision`: TF32 (10 mantissa bits, what
``precision=DEFAULT`` gives on recent NVIDIA GPUs) and bfloat16 (7 bits, one
pass, ``DEFAULT`` on TPU; ``HIGH`` is 3 passes, close to float32).
Accumulation stays float32, as on the hardware, so the figures are those of
the rounding of the inputs, the dominant effect.

Gradients come from the width-1024 MLP of `bench_width1024.py` after 40
AdamW steps (one block of each weight matrix). For each use it prints the
relative error against float64 products (the float32 column is the
library's ``precision=HIGHEST`` on float32 data):

* statistics ``G Gᵀ``: the error of the inverse root ``X = (A + ε)^(-1/2)``
  built from the rounded statistics (ε = 1e-9, the paper's, and 1e-6);
* applying ``X_L M X_R`` at ε = 1e-9, 1e-6 and 1e-4 (X's condition number
  is about sqrt(λ_max/ε));
* the staleness proxy h: on a fresh basis (true h ≈ 0, so the h printed is
  rounding alone; FOAM's threshold τ is 0.75) and after 20 steps of drift
  (relative error).

    python scripts/archive/precision_effects.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax

from bench_width1024 import _digits, init_mlp, loss_fn
from foam_optax import controllers

FORMATS = {"float32": 23, "tf32": 10, "bf16": 7}


def rounded(x, bits):
  return lax.reduce_precision(x, exponent_bits=8, mantissa_bits=bits)


def mm(a, b, bits=None):
  if bits is not None:
    a, b = rounded(a, bits), rounded(b, bits)
  return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


def inverse_root(a, eps):
  d, q = jnp.linalg.eigh(a)
  return (q * (jnp.maximum(d, 0.0) + eps) ** -0.5) @ q.T


def rel(x, y):
  return float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))


def gradients(steps):
  x, y = _digits()
  params = init_mlp(1024)
  tx = optax.adamw(3e-3)
  state = tx.init(params)
  rng = np.random.default_rng(0)
  grad = jax.jit(jax.grad(loss_fn))
  out = []
  for _ in range(steps):
    idx = rng.integers(0, x.shape[0], 128)
    g = grad(params, x[idx], y[idx])
    out.append(g)
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return out


def main():
  grads = gradients(60)
  # Everything else in float64: only the rounding of the products' inputs
  # differs between the columns.
  jax.config.update("jax_enable_x64", True)
  grads = jax.tree.map(lambda g: jnp.asarray(g, jnp.float64), grads)
  b2 = 0.995
  print("Relative error against float64, inputs of the product rounded to "
        "each format\n")
  print("| use | matrix | " + " | ".join(FORMATS) + " |")
  print("|---|---|" + "---|" * len(FORMATS))
  for layer in (1, 2):
    name = f"W{layer + 1} {grads[0][layer]['w'].shape}"
    blocks = [g[layer]["w"] for g in grads]

    def statistics(bits=None):
      """Bias-corrected statistics after 40 and after 60 steps."""
      s, out = jnp.zeros((blocks[0].shape[0],) * 2), {}
      for t, g in enumerate(blocks, start=1):
        s = b2 * s + (1 - b2) * mm(g, g.T, bits)
        out[t] = s / (1 - b2 ** t)
      return out[40], out[60]

    exact40, exact60 = statistics()
    low = {fmt: statistics(bits)[0] for fmt, bits in FORMATS.items()}
    for eps in (1e-9, 1e-6):
      x_exact = inverse_root(exact40, eps)
      cells = [rel(inverse_root(low[fmt], eps), x_exact) for fmt in FORMATS]
      print(f"| statistics -> X (ε={eps:g}) | {name} L | "
            + " | ".join(f"{c:.2e}" for c in cells) + " |")
    right = jnp.asarray(blocks[40].T @ blocks[40])
    right = right / jnp.trace(right) * right.shape[0]
    m = blocks[40]
    for eps in (1e-9, 1e-6, 1e-4):
      x_left = inverse_root(exact40, eps)
      x_right = inverse_root(right, eps)
      direction = mm(mm(x_left, m), x_right)
      cells = [rel(mm(mm(x_left, m, bits), x_right, bits), direction)
               for bits in FORMATS.values()]
      print(f"| apply X_L M X_R (ε={eps:g}) | {name} | "
            + " | ".join(f"{c:.2e}" for c in cells) + " |")
    d, q = jnp.linalg.eigh(exact40)
    d, q = jnp.maximum(d[::-1], 0.0), q[:, ::-1]
    for label, a in (("fresh basis", exact40), ("20 steps stale", exact60)):
      def proxy(bits):
        b = mm(q.T, mm(a, q, bits), bits)
        s = d + 1e-9
        whitened = (b - jnp.diag(d)) / jnp.sqrt(s[:, None] * s[None, :])
        w = s ** -0.5
        return float(jnp.linalg.norm(whitened) * jnp.max(w)
                     / jnp.linalg.norm(w) / 2)
      reference = float(controllers.staleness_proxy(
          a, q, d, jnp.float64(1e-9), 2))
      if label == "fresh basis":   # h ≈ 0: print h itself (τ = 0.75)
        cells = [proxy(bits) for bits in FORMATS.values()]
        print(f"| proxy h on a fresh basis (absolute; float64 h = "
              f"{reference:.1e}) | {name} L | "
              + " | ".join(f"{c:.3g}" for c in cells) + " |")
      else:
        cells = [abs(proxy(bits) - reference) / reference
                 for bits in FORMATS.values()]
        print(f"| proxy h, 20 steps stale (h = {reference:.3g}) | {name} L | "
              + " | ".join(f"{c:.2e}" for c in cells) + " |")


if __name__ == "__main__":
  main()
