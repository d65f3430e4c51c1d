"""Sensitivity of training to a tiny perturbation of one update.

Trains the benchmark's digits MLP twice for `--steps` steps, the second time
with step `--perturb-step`'s update perturbed by a random direction of
relative size `--relative` (‖δ‖ = relative·‖u‖), and prints
‖θ − θ'‖ after the run: absolute, as a growth factor of ‖δ‖, and relative to
the parameters' movement ‖θ − θ₀‖. Near-null directions of the factor statistics are amplified by up
to ε0^(-1/p) in X = Q diag((D + ε0)^(-1/p)) Qᵀ; `pseudo_inverse_rtol` drops
them. Settings are the benchmark's (`foam_optax.bench.optimizers`).

  python scripts/archive/sensitivity.py
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import foam_optax as fo
from foam_optax.bench import optimizers, workloads


def configurations():
  foam, shampoo = optimizers.FOAM_PAPER, optimizers._shampoo_settings(20)
  return {
      "adamw": lambda lr: optax.adamw(lr, weight_decay=optimizers.WEIGHT_DECAY),
      "foam": lambda lr: fo.foam(lr, **foam),
      "foam pseudo_inverse_rtol=1e-6": lambda lr: fo.foam(
          lr, pseudo_inverse_rtol=1e-6, **foam),
      "foam pseudo_inverse_rtol=1e-4": lambda lr: fo.foam(
          lr, pseudo_inverse_rtol=1e-4, **foam),
      "shampoo_f20": lambda lr: fo.shampoo(lr, **shampoo),
      "shampoo_f20 pseudo_inverse_rtol=1e-6": lambda lr: fo.shampoo(
          lr, pseudo_inverse_rtol=1e-6, **shampoo),
  }


def norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def run(workload, tx, steps, perturb_step, perturbation, relative=0.0):
  params = workload.init_params(0)
  batches = workload.sample_batches(0, steps)

  @jax.jit
  def step(params, state, batch, delta_scale):
    grads = jax.grad(workload.loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    delta = jax.tree.map(lambda d: delta_scale * norm(updates) * d,
                         perturbation)
    updates = jax.tree.map(jnp.add, updates, delta)
    return optax.apply_updates(params, updates), state, norm(delta)

  state, start, applied = tx.init(params), params, 0.0
  for i in range(steps):
    scale = jnp.float32(relative if i + 1 == perturb_step else 0.0)
    params, state, delta = step(
        params, state, jax.tree.map(lambda b: b[i], batches), scale)
    applied += float(delta)
  return start, params, applied


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=25)
  parser.add_argument("--perturb-step", type=int, default=1)
  parser.add_argument("--relative", type=float, default=1e-6)
  parser.add_argument("--learning-rate", type=float, default=1e-2)
  args = parser.parse_args(argv)
  workload = workloads.WORKLOADS["digits_mlp"]()
  params = workload.init_params(0)
  keys = jax.random.split(jax.random.PRNGKey(1), len(jax.tree.leaves(params)))
  direction = jax.tree.unflatten(jax.tree.structure(params), [
      jax.random.normal(k, x.shape, x.dtype)
      for k, x in zip(keys, jax.tree.leaves(params))])
  direction = jax.tree.map(lambda d: d / norm(direction), direction)

  print(f"digits MLP, {args.steps} steps, lr {args.learning_rate}, update "
        f"of step {args.perturb_step} perturbed by {args.relative:g} "
        f"relative\n")
  print("| optimizer | ‖δ‖ | ‖θ − θ'‖ | growth ‖θ − θ'‖/‖δ‖ | ‖θ − θ₀‖ | "
        "‖θ − θ'‖/‖θ − θ₀‖ |")
  print("|---|---:|---:|---:|---:|---:|")
  for name, build in configurations().items():
    tx = build(args.learning_rate)
    start, plain, _ = run(workload, tx, args.steps, 0, direction)
    _, perturbed, delta = run(workload, tx, args.steps, args.perturb_step,
                              direction, args.relative)
    change = float(norm(jax.tree.map(jnp.subtract, plain, perturbed)))
    moved = float(norm(jax.tree.map(jnp.subtract, plain, start)))
    print(f"| {name} | {delta:.2e} | {change:.2e} | {change / delta:.2e} | "
          f"{moved:.2e} | {change / moved:.2e} |", flush=True)


if __name__ == "__main__":
  main()
