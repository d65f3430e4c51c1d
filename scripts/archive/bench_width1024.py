"""Wall-clock of FOAM against stale Shampoo where eigendecompositions cost.

An MLP 64-1024-1024-10 (ReLU) on scikit-learn's digits, batch 128, lr 3e-3,
every optimizer at the FOAM paper's defaults otherwise (`fo.foam(3e-3)`,
`fo.shampoo(3e-3, check_frequency=f)`); its factors are four of size 1024,
one of 64 and one of 10. Prints:

* the cost of the parts of a check on one 1024 factor: `eigh`, the exact
  proxy, the sketched proxy, rebuilding the cached inverse root X, and one
  1024³ product;
* per optimizer: eigendecompositions, ms per step (wall-clock of the run /
  steps), median step time without a check, with a check but no EVD, and
  with an EVD; final train loss on the whole training set;
* the targets: FOAM ≤ 1.05x the wall-clock of Shampoo f = 100 at a loss no
  worse than f = 20's; a FOAM check step ≤ 1.2x a step without a check.

Runs are interleaved (every optimizer once per round); figures are medians
over rounds, by wall clock and by the process's CPU time (all threads; on a
machine shared with other jobs the CPU time is the steadier of the two).
Usage::

    python scripts/archive/bench_width1024.py                    # 3 rounds
    python scripts/archive/bench_width1024.py --with-f1          # add Shampoo f=1
    python scripts/archive/bench_width1024.py --steps 40 --rounds 1 --width 64  # smoke
    python scripts/archive/bench_width1024.py --statistics-steps 2 4 \
        --only "foam (exact)"    # statistics_compute_steps
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import foam_optax as fo
from foam_optax import controllers
from foam_optax import kernels
from foam_optax.bench.measure import timed

LR = 3e-3
BATCH = 128


def _digits():
  from sklearn.datasets import load_digits
  x, y = load_digits(return_X_y=True)
  return jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y, jnp.int32)


def init_mlp(width, seed=0):
  sizes = [64, width, width, 10]
  keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
  return [{"w": jax.random.normal(k, (i, o)) * jnp.sqrt(2.0 / i),
           "b": jnp.zeros((o,))}
          for k, i, o in zip(keys, sizes[:-1], sizes[1:])]


def loss_fn(params, x, y):
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer["w"] + layer["b"])
  logits = x @ params[-1]["w"] + params[-1]["b"]
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def make_optimizers(with_f1, probes, statistics_steps=(), only=None):
  table = {}
  if with_f1:
    table["shampoo f=1"] = fo.shampoo(LR, check_frequency=1)
  table["shampoo f=20"] = fo.shampoo(LR, check_frequency=20)
  table["shampoo f=100"] = fo.shampoo(LR, check_frequency=100)
  table["foam (exact)"] = fo.foam(LR)
  try:
    table[f"foam (sketch, k={probes})"] = fo.foam(LR, proxy="sketch",
                                                  proxy_probes=probes)
  except TypeError:   # a version without the sketched proxy
    pass
  for k in statistics_steps:
    table[f"foam (statistics every {k})"] = fo.foam(
        LR, statistics_compute_steps=k)
    table[f"shampoo f=100 (statistics every {k})"] = fo.shampoo(
        LR, check_frequency=100, statistics_compute_steps=k)
  if only:
    table = {name: tx for name, tx in table.items()
             if name in only or name in ("shampoo f=20", "shampoo f=100")}
  return table


class Run:
  """One optimizer's compiled step on the shared batches."""

  def __init__(self, tx, width, x, y, batches):
    self.tx, self.width, self.x, self.y, self.batches = tx, width, x, y, batches

    def step(params, state, idx):
      loss, grads = jax.value_and_grad(loss_fn)(params, x[idx], y[idx])
      updates, state = tx.update(grads, state, params)
      stats = fo.stats(state)
      return (optax.apply_updates(params, updates), state, loss,
              stats["checks"], stats["eigendecompositions"])

    self.step = jax.jit(step, donate_argnums=(0, 1))
    self.full_loss = jax.jit(lambda p: loss_fn(p, x, y))
    params = init_mlp(width)
    jax.block_until_ready(self.step(params, tx.init(params), batches[0]))

  def __call__(self):
    params = init_mlp(self.width)
    state = self.tx.init(params)
    checks = evds = 0
    times, cpu_times, kinds = [], [], []
    for idx in self.batches:
      tic, cpu_tic = time.perf_counter(), time.process_time()
      params, state, _, c, e = jax.block_until_ready(
          self.step(params, state, idx))
      times.append(time.perf_counter() - tic)
      cpu_times.append(time.process_time() - cpu_tic)
      c, e = int(c), int(e)
      kinds.append("evd" if e > evds else "check" if c > checks else "plain")
      checks, evds = c, e
    return {"seconds": sum(times), "times": times,
            "cpu_seconds": sum(cpu_times), "cpu_times": cpu_times,
            "kinds": kinds,
            "evds": evds, "loss": float(self.full_loss(params))}


def check_parts(m, probes):
  """Median seconds of each part of a check on one m x m factor."""
  rng = np.random.default_rng(0)
  g = rng.standard_normal((m, 2 * m)).astype(np.float32)
  a = jnp.asarray(g @ g.T / (2 * m))
  q, d, _ = jax.jit(kernels.fresh_eigendecomposition)(a)
  a2 = a + 1e-3 * jnp.eye(m)
  eps = jnp.float32(1e-9)
  parts = {
      "eigh": (jax.jit(kernels.fresh_eigendecomposition), (a,)),
      "exact proxy (QᵀAQ, 2 products)": (
          jax.jit(lambda *z: controllers.staleness_proxy(*z, 2)),
          (a2, q, d, eps)),
      "rebuild X (1 product)": (
          jax.jit(lambda *z: kernels.inverse_root(*z, 2)), (q, d, eps)),
      "one m³ product": (jax.jit(kernels.matmul), (a, q)),
  }
  parts[f"sketched proxy (k={probes})"] = (
      jax.jit(lambda *z: controllers.sketched_staleness_proxy(
          *z, 2, jax.random.key(0), probes)), (a2, q, d, eps))
  return {name: timed(fn, *args) for name, (fn, args) in parts.items()}


def summarize(results, clock):
  """Median over rounds of each figure; `clock` is 'wall' or 'cpu'."""
  key = {"wall": "times", "cpu": "cpu_times"}[clock]
  out = {}
  for name, runs in results.items():
    by_kind = lambda run, kind: [t for t, k in zip(run[key], run["kinds"])
                                 if k == kind]
    med = lambda values: statistics.median(values) if values else float("nan")
    out[name] = {
        "evds": runs[0]["evds"],
        "ms_per_step": 1e3 * med([sum(r[key]) / len(r[key]) for r in runs]),
        "plain_ms": 1e3 * med([med(by_kind(r, "plain")) for r in runs]),
        "check_ms": 1e3 * med([med(by_kind(r, "check")) for r in runs]),
        "evd_ms": 1e3 * med([med(by_kind(r, "evd")) for r in runs]),
        "checks_without_evd": len(by_kind(runs[0], "check")),
        "loss": runs[0]["loss"],
    }
  return out


def report(summary, clock):
  print(f"\n{clock} clock, medians over rounds:\n")
  print("| optimizer | EVDs | ms/step | step without check | check, no EVD "
        "(count) | step with EVD | final train loss |\n"
        "|---|---|---|---|---|---|---|")
  for name, s in summary.items():
    print(f"| {name} | {s['evds']} | {s['ms_per_step']:.1f} | "
          f"{s['plain_ms']:.1f} | {s['check_ms']:.1f} "
          f"({s['checks_without_evd']}) | {s['evd_ms']:.1f} | "
          f"{s['loss']:.4f} |")
  f20, f100 = summary["shampoo f=20"], summary["shampoo f=100"]
  print(f"\nTargets ({clock} clock):")
  for name in [n for n in summary if n.startswith("foam")]:
    s = summary[name]
    wall = s["ms_per_step"] / f100["ms_per_step"]
    ratio = s["check_ms"] / s["plain_ms"]
    print(f"- {name}: {wall:.3f}x Shampoo f=100's time (target <= 1.05: "
          f"{'met' if wall <= 1.05 else 'missed'}), loss "
          f"{s['loss']:.4f} vs f=20's {f20['loss']:.4f} ("
          f"{'met' if s['loss'] <= f20['loss'] else 'missed'}); check step "
          f"{ratio:.2f}x a step without check (target <= 1.2: "
          f"{'met' if ratio <= 1.2 else 'missed'})")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--width", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--probes", type=int, default=16)
  parser.add_argument("--with-f1", action="store_true",
                      help="also Shampoo f=1 (an eigh per factor per step)")
  parser.add_argument("--statistics-steps", type=int, nargs="*", default=(),
                      help="also FOAM and Shampoo f=100 with "
                           "statistics_compute_steps=K for each K")
  parser.add_argument("--only", nargs="*",
                      help="run only these optimizers (names as printed; "
                           "Shampoo f=20 and f=100, the targets' baselines, "
                           "always run)")
  parser.add_argument("--json", help="write the figures here")
  args = parser.parse_args(argv)

  x, y = _digits()
  rng = np.random.default_rng(0)
  batches = [jnp.asarray(rng.integers(0, x.shape[0], BATCH))
             for _ in range(args.steps)]
  print(f"MLP 64-{args.width}-{args.width}-10 on digits, batch {BATCH}, "
        f"{args.steps} steps, lr {LR}, {args.rounds} interleaved rounds; "
        f"{jax.devices()[0].platform}, JAX {jax.__version__}\n")

  parts = check_parts(args.width, args.probes)
  print(f"Parts of a check on one {args.width} factor (median ms):\n")
  print("| part | ms |\n|---|---|")
  for name, seconds in parts.items():
    print(f"| {name} | {1e3 * seconds:.1f} |")

  runs = {name: Run(tx, args.width, x, y, batches)
          for name, tx in make_optimizers(args.with_f1, args.probes,
                                          args.statistics_steps,
                                          args.only).items()}
  results = {name: [] for name in runs}
  for _ in range(args.rounds):
    for name, run in runs.items():
      results[name].append(run())
  summary = {clock: summarize(results, clock) for clock in ("wall", "cpu")}
  for clock in ("wall", "cpu"):
    report(summary[clock], clock)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"parts_seconds": parts, "summary": summary,
                 "args": vars(args)}, f, indent=1)


if __name__ == "__main__":
  main()
