"""Cost of skipping non-finite steps, and compile time of a step.

Step time: an MLP 64 -> 1024 -> 1024 -> 10 on sklearn digits (batch 128,
`fo.foam(3e-3)` with its defaults) trained with ``skip_nonfinite=True``
against ``False``. Both steps are jitted, warmed past the first check, then
timed in interleaved blocks (A, B, A, B, ...) so that drifts of a shared
machine's load hit both alike. Reported: the median step over all blocks,
and the median over steps on which no factor was checked (the steps that
``skip_nonfinite`` alone can slow down).

Compile time: trace + lower and XLA compile seconds of one jitted train step
(`fo.foam` against `optax.adamw`) on the benchmark's digits MLP and
character Transformer LM (`foam_optax.bench.workloads`).

Usage::

    python scripts/archive/skip_overhead.py                    # both parts
    python scripts/archive/skip_overhead.py --part step --blocks 30
    python scripts/archive/skip_overhead.py --part compile
"""

from __future__ import annotations

import argparse
import os

# One OpenBLAS thread: its workers compete with XLA's on a small machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import foam_optax as fo
from foam_optax.bench import measure, workloads

WIDTH, BATCH, LR = 1024, 128, 3e-3


def _mlp_params(key, width):
  sizes = (64, width, width, 10)
  keys = jax.random.split(key, len(sizes) - 1)
  return [{"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
          for k, a, b in zip(keys, sizes[:-1], sizes[1:])]


def _mlp_loss(params, x, y):
  for layer in params[:-1]:
    x = jax.nn.gelu(x @ layer["w"] + layer["b"])
  logits = x @ params[-1]["w"] + params[-1]["b"]
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits),
                                       y[:, None], axis=1))


def _digits():
  from sklearn.datasets import load_digits
  x, y = load_digits(return_X_y=True)
  return jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y, jnp.int32)


def _trainer(tx):
  @jax.jit
  def step(params, state, x, y):
    grads = jax.grad(_mlp_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def step_times(variants, blocks, block_steps, width=WIDTH, warmup=25):
  """Step seconds of each variant, timed in interleaved blocks.

  Args:
    variants: {name: (optimizer, its package's `stats`)}.

  Returns:
    {name: (all step seconds, seconds of the steps without a check)}.
  """
  x, y = _digits()
  rng = np.random.default_rng(0)
  params = _mlp_params(jax.random.PRNGKey(0), width)
  runs = {name: [_trainer(tx), params, tx.init(params), [], []]
          for name, (tx, _) in variants.items()}

  def batch():
    idx = rng.integers(0, x.shape[0], BATCH)
    return x[idx], y[idx]

  def run(name, steps, record):
    step, p, s, all_times, plain = runs[name]
    stats = variants[name][1]
    for _ in range(steps):
      xb, yb = batch()
      checks = int(stats(s)["checks"])
      (p, s), seconds = measure.call_timed(step, p, s, xb, yb)
      if record:
        all_times.append(seconds)
        if int(stats(s)["checks"]) == checks:
          plain.append(seconds)
    runs[name][1:3] = p, s

  names = list(runs)
  for name in names:
    run(name, warmup, record=False)
  for i in range(blocks):
    for name in (names if i % 2 == 0 else names[::-1]):
      run(name, block_steps, record=True)
  return {name: (r[3], r[4]) for name, r in runs.items()}


def print_step_times(times, blocks, block_steps, width):
  """Medians and 10th percentiles (the latter less sensitive to other load
  on a shared machine) of each variant's steps."""
  ms = lambda v, q=50: float(np.percentile(1e3 * np.asarray(v), q))
  print(f"\nstep ms, MLP 64-{width}-{width}-10, batch {BATCH}, "
        f"fo.foam({LR}), {blocks} interleaved blocks of {block_steps} steps")
  print("| variant | median, all steps | median / p10, steps without a "
        "check | steps timed |")
  print("|---|---|---|---|")
  for name, (all_steps, plain) in times.items():
    print(f"| {name} | {ms(all_steps):.2f} | {ms(plain):.2f} / "
          f"{ms(plain, 10):.2f} | {len(all_steps)} |")
  names = list(times)
  for on, off in zip(names[0::2], names[1::2]):
    for label, q in (("median", 50), ("p10", 10)):
      a, b = ms(times[on][1], q), ms(times[off][1], q)
      print(f"{on} vs {off}, {label} of steps without a check: "
            f"{a - b:+.2f} ms = {100 * (a - b) / b:+.1f}%")


def compile_seconds(workload, tx):
  """(trace + lower, XLA compile) seconds of one jitted train step."""
  params = workload.init_params(0)
  batch = jax.tree.map(lambda b: b[0], workload.sample_batches(0, 1))

  def train_step(params, state, batch):
    grads = jax.grad(workload.loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return measure.lower_and_compile(train_step, params, tx.init(params),
                                   batch)[1:]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--part", choices=("step", "compile", "both"),
                      default="both")
  parser.add_argument("--blocks", type=int, default=200,
                      help="interleaved blocks per setting")
  parser.add_argument("--block-steps", type=int, default=1)
  parser.add_argument("--width", type=int, default=WIDTH)
  args = parser.parse_args(argv)
  print(f"JAX {jax.__version__}, {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs")
  if args.part in ("step", "both"):
    variants = {"skip_nonfinite=True": (fo.foam(LR), fo.stats),
                "skip_nonfinite=False": (fo.foam(LR, skip_nonfinite=False),
                                         fo.stats)}
    times = step_times(variants, args.blocks, args.block_steps, args.width)
    print_step_times(times, args.blocks, args.block_steps, args.width)
  if args.part in ("compile", "both"):
    print("\ncompile seconds of one jitted train step (trace + lower / XLA)")
    print("| workload | optimizer | trace + lower s | XLA compile s | total s |")
    print("|---|---|---|---|---|")
    for workload in (workloads.digits_mlp(), workloads.transformer_lm()):
      for name, tx in (("adamw", optax.adamw(LR)), ("foam", fo.foam(LR))):
        lower, comp = compile_seconds(workload, tx)
        print(f"| {workload.name} | {name} | {lower:.2f} | {comp:.2f} | "
              f"{lower + comp:.2f} |")


if __name__ == "__main__":
  main()
