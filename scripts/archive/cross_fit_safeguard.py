"""Cross-fitted bias correction where the held-out microbatches miss
coordinates: the hazard, its mechanism, and the safeguard.

``digits`` (the default part): README's bias-correction recipe on
scikit-learn digits, a 64-64-10 ReLU MLP with a zero-initialised readout,
constant learning rate 3e-3, batches of 128 as 8 microbatches of 16, 150
steps. For every corrected optimizer: the last-10 mean minibatch loss with
the official algorithm (``cross_fit_safeguard=False``), with the safeguard
(the default) and of its uncorrected self; the largest update entry; how
many coordinates the safeguard floors. Then the mechanism, measured:

* per leaf, at the first steps of the official two-group AdamW, the
  coordinates whose held-out second moment is 0 while the momentum is not,
  and their ratio ``|m̂| / √v̂`` against every other coordinate's;
* the safeguarded two-group AdamW's remaining gap to AdamW, taken apart:
  AdamW fed the two-group estimator's ingredients without cross-fitting;
* a data ablation: the official estimators on the same data with every
  input made non-zero (+1/16) and / or tanh instead of ReLU (no hidden unit
  is ever exactly off);
* the factor statistics of ``fo.shampoo(bias_correction='cross_fit')``: at
  each refresh, the directions in which the held-out statistic is below
  1/8 of the pooled one, and their share of the pooled statistic.

``char_lm``: the bias suite's character Transformer LM
(`foam_optax.bench.bias`) at its learning rates: for each corrected method,
how often and where the safeguard acts, and the held-out loss
(``--compare``: also with the safeguard off, and of the uncorrected self,
with the paired differences).

Usage::

  PYTHONPATH=. python scripts/archive/cross_fit_safeguard.py
      [--part digits|char_lm] [--seeds 0 1 2] [--steps 150] [--compare]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import foam_optax as fo
from foam_optax._src import cross_fitting
from foam_optax.bench import workloads

LR = 3e-3
BATCH = 128
MICROBATCHES = 8
ADAMW = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)

# name: (factory of the corrected optimizer given the safeguard, factory of
# its uncorrected self's name); every one at the alias's defaults.
CORRECTED = {
    "adamw_two_group": (lambda sg: fo.bias_corrected_adamw(
        LR, method="two_group", cross_fit_safeguard=sg), "adamw"),
    "adamw_loo": (lambda sg: fo.bias_corrected_adamw(
        LR, cross_fit_safeguard=sg), "adamw"),
    "adamw_loo_no_variance": (lambda sg: fo.bias_corrected_adamw(
        LR, variance_correction=False, cross_fit_safeguard=sg), "adamw"),
    "shampoo_cf": (lambda sg: fo.shampoo(
        LR, bias_correction="cross_fit", cross_fit_safeguard=sg), "shampoo"),
    "shampoo_cfv": (lambda sg: fo.shampoo(
        LR, bias_correction="cross_fit_variance", cross_fit_safeguard=sg),
                    "shampoo"),
    "foam_cf": (lambda sg: fo.foam(
        LR, bias_correction="cross_fit", cross_fit_safeguard=sg), "foam"),
    "foam_cfv": (lambda sg: fo.foam(
        LR, bias_correction="cross_fit_variance", cross_fit_safeguard=sg),
                 "foam"),
    "soap_cf": (lambda sg: fo.soap(
        LR, bias_correction="cross_fit", cross_fit_safeguard=sg), "soap"),
}
UNCORRECTED = {
    "adamw": lambda: optax.adamw(LR, **ADAMW),
    "shampoo": lambda: fo.shampoo(LR),
    "foam": lambda: fo.foam(LR),
    "soap": lambda: fo.soap(LR),
}


class FloorCounter:
  """Counts, while active, the coordinates `cross_fitting.floored`
  evaluates and those whose floor is active, per leaf shape (in the
  functions traced while it is installed)."""

  def __init__(self):
    self.active = collections.Counter()
    self.evaluated = collections.Counter()
    self._floored = cross_fitting.floored

  def __enter__(self):
    def counting(held_out, pooled):
      key = "x".join(map(str, held_out.shape))
      size = held_out.size

      def record(n):
        self.active[key] += int(n)
        self.evaluated[key] += size
      jax.debug.callback(record, jnp.sum(
          held_out < cross_fitting.FRACTION * pooled))
      return self._floored(held_out, pooled)
    cross_fitting.floored = counting
    return self

  def __exit__(self, *exc):
    cross_fitting.floored = self._floored

  def reset(self):
    self.active.clear()
    self.evaluated.clear()

  def fraction(self) -> float:
    total = sum(self.evaluated.values())
    return sum(self.active.values()) / total if total else 0.0


# ------------------------------------------------------------------ digits


@dataclasses.dataclass(frozen=True)
class Digits:
  """The digits MLP: data, initialisation, loss."""

  x: np.ndarray
  y: np.ndarray
  activation: str = "relu"

  @classmethod
  def load(cls, shift: float = 0.0, activation: str = "relu"):
    x_train, _, y_train, _ = workloads._digits()
    return cls(x_train + np.float32(shift), y_train, activation)

  @staticmethod
  def init(seed: int) -> dict:
    """64-64-10 with a LeCun-normal hidden layer and a zero readout."""
    kernel = jax.nn.initializers.lecun_normal()(jax.random.key(seed),
                                                (64, 64))
    return {"w1": kernel, "b1": jnp.zeros(64), "w2": jnp.zeros((64, 10)),
            "b2": jnp.zeros(10)}

  def hidden(self, params, x):
    act = jax.nn.relu if self.activation == "relu" else jnp.tanh
    return act(x @ params["w1"] + params["b1"])

  def loss(self, params, batch):
    x, y = batch
    logp = jax.nn.log_softmax(self.hidden(params, x) @ params["w2"]
                              + params["b2"])
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))

  def batches(self, seed: int, steps: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, len(self.x),
                                                (steps, BATCH))


def trainer(data: Digits, tx, corrected: bool):
  """``run(seed, steps)``: per step the minibatch loss and the largest
  update entry (one compilation for every seed)."""

  @jax.jit
  def step(params, state, batch):
    if corrected:
      loss, grads, micro = fo.microbatch_grads(data.loss, params, batch,
                                               MICROBATCHES)
      updates, state = tx.update(grads, state, params,
                                 microbatch_grads=micro)
    else:
      loss, grads = jax.value_and_grad(data.loss)(params, batch)
      updates, state = tx.update(grads, state, params)
    largest = jnp.max(jnp.stack([jnp.max(jnp.abs(u))
                                 for u in jax.tree.leaves(updates)]))
    return optax.apply_updates(params, updates), state, loss, largest

  def run(seed: int, steps: int):
    params = Digits.init(seed)
    state = tx.init(params)
    losses, largest = [], []
    for idx in data.batches(seed, steps):
      params, state, loss, top = step(params, state, (data.x[idx],
                                                      data.y[idx]))
      losses.append(float(loss))
      largest.append(float(top))
    return np.asarray(losses), np.asarray(largest)
  return run


def train(data: Digits, tx, corrected: bool, seed: int, steps: int):
  return trainer(data, tx, corrected)(seed, steps)


def _last10(losses) -> float:
  return float(np.mean(losses[-10:]))


def digits_results(seeds, steps) -> dict:
  """Per corrected optimizer, per seed: the last-10 mean loss of the
  official algorithm, of the safeguarded one and of the uncorrected self,
  the largest update entries, and the share of floored coordinates."""
  data = Digits.load()
  plain = {}
  for name, make in UNCORRECTED.items():
    run = trainer(data, make(), False)
    plain[name] = [_last10(run(s, steps)[0]) for s in seeds]
  counter, results = FloorCounter(), {}
  for name, (make, base) in CORRECTED.items():
    run = trainer(data, make(False), True)
    official, off_top = zip(*(run(s, steps) for s in seeds))
    with counter:
      counter.reset()
      run = trainer(data, make(True), True)
      safe, on_top = zip(*(run(s, steps) for s in seeds))
    results[name] = {
        "baseline": base, "uncorrected": plain[base],
        "official": [_last10(l) for l in official],
        "safeguarded": [_last10(l) for l in safe],
        "largest_official": max(map(np.max, off_top)),
        "largest_safeguarded": max(map(np.max, on_top)),
        "floored": counter.fraction()}
  return results


def digits_table(seeds, steps):
  print(f"## Digits MLP 64-64-10 (ReLU, zero readout), lr {LR}, batch "
        f"{BATCH} = {MICROBATCHES} x {BATCH // MICROBATCHES}, {steps} steps, "
        f"seeds {list(seeds)}: last-10 mean minibatch loss (mean over seeds; "
        "ratio: the worst seed's)\n")
  print("| optimizer | official | safeguarded | uncorrected self | "
        "safeguarded / uncorrected (worst seed) | largest update entry, "
        "official / safeguarded | coordinates floored |")
  print("|---|---|---|---|---|---|---|")
  for name, r in digits_results(seeds, steps).items():
    worst = max(s / p for s, p in zip(r["safeguarded"], r["uncorrected"]))
    print(f"| {name} | {np.mean(r['official']):.3g} | "
          f"{np.mean(r['safeguarded']):.4f} | "
          f"{np.mean(r['uncorrected']):.4f} ({r['baseline']}) | {worst:.2f} | "
          f"{r['largest_official']:.2g} / {r['largest_safeguarded']:.2g} | "
          f"{100 * r['floored']:.3f}% |", flush=True)


def mechanism(steps=3):
  """The official two-group AdamW's first steps, per leaf."""
  data = Digits.load()
  tx = fo.scale_by_bias_corrected_adam(method="two_group",
                                       cross_fit_safeguard=False)
  params = Digits.init(0)
  state = tx.init(params)
  b1, b2 = 0.9, 0.95
  print("\n## Mechanism: official two-group AdamW, seed 0, first steps\n")
  print("| step | leaf | coordinates with v̂_B = 0 < |m̂| | their largest "
        "|m̂|/√v̂_B | largest |m̂|/(√v̂_B + ε) elsewhere | hidden units on in "
        "A's examples, off in all of B's |")
  print("|---|---|---|---|---|---|")
  for t, idx in enumerate(data.batches(0, steps), start=1):
    x, y = data.x[idx], data.y[idx]
    on = np.asarray(data.hidden(params, x)).reshape(
        MICROBATCHES, -1, 64) > 0
    half = MICROBATCHES // 2
    only_a = int(np.sum(on[:half].any((0, 1)) & ~on[half:].any((0, 1))))
    _, grads, micro = fo.microbatch_grads(data.loss, params, (x, y),
                                          MICROBATCHES)
    updates, state = tx.update(grads, state, params, microbatch_grads=micro)
    params = optax.apply_updates(params, jax.tree.map(lambda u: -LR * u,
                                                      updates))
    for leaf in ("w1", "b1", "w2", "b2"):
      m = np.asarray(state.mu[leaf], np.float64) / (1 - b1 ** t)
      v = np.asarray(state.nu[leaf], np.float64) / (1 - b2 ** t)
      unseen = (v == 0) & (m != 0)
      ratio = np.abs(m) / (np.sqrt(v) + 1e-8)
      top_unseen = f"{ratio[unseen].max():.2g}" if unseen.any() else "—"
      top_seen = f"{ratio[~unseen].max():.2g}" if (~unseen).any() else "—"
      print(f"| {t} | {leaf} | {int(unseen.sum())} of {m.size} | "
            f"{top_unseen} | {top_seen} | {only_a if leaf == 'w1' else ''} |")


def microbatch_adam(numerator, denominator, b1=0.9, b2=0.95, eps=1e-8,
                    weight_decay=0.1):
  """AdamW (decoupled decay, lr `LR`) whose momentum averages the mean of
  the microbatches `numerator` (a slice) and whose second moment averages
  the mean square of the microbatches `denominator`: no correction, only
  the two-group estimator's ingredients."""
  def init_fn(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return jnp.zeros([], jnp.int32), zeros, zeros

  def update_fn(grads, state, params=None, *, microbatch_grads):
    count, mu, nu = state
    count = count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g[numerator].mean(0),
                      mu, microbatch_grads)
    nu = jax.tree.map(
        lambda v, g: b2 * v + (1 - b2) * (g[denominator] ** 2).mean(0), nu,
        microbatch_grads)
    updates = jax.tree.map(
        lambda m, v, p: -LR * ((m / (1 - b1 ** count))
                               / (jnp.sqrt(v / (1 - b2 ** count)) + eps)
                               + weight_decay * p), mu, nu, params)
    return updates, (count, mu, nu)
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def two_group_gap(seeds, steps):
  """Where the safeguarded two-group AdamW's remaining gap to AdamW comes
  from: its second moment is a mean of squared microbatch gradients."""
  data = Digits.load()
  half, every = slice(0, MICROBATCHES // 2), slice(0, MICROBATCHES)
  rows = [("AdamW (`optax.adamw`)", optax.adamw(LR, **ADAMW), False),
          ("all microbatches / mean square of all (no cross-fitting)",
           microbatch_adam(every, every), True),
          ("first half / mean square of all (pooled)",
           microbatch_adam(half, every), True),
          ("two-group AdamW, safeguarded",
           fo.bias_corrected_adamw(LR, method="two_group"), True)]
  print("\n## The two-group estimator's ingredients (momentum from / second "
        f"moment from), last-10 loss, seeds {list(seeds)}\n")
  print("| momentum / second moment | last-10 loss (mean) |")
  print("|---|---|")
  for label, tx, corrected in rows:
    run = trainer(data, tx, corrected)
    print(f"| {label} | "
          f"{np.mean([_last10(run(s, steps)[0]) for s in seeds]):.4f} |",
          flush=True)


def data_ablation(steps):
  """The official estimators where no held-out gradient is exactly 0."""
  print("\n## Data ablation: official estimators (seed 0), last-10 loss "
        "and largest update entry\n")
  pairs = [("adamw", False), ("adamw_two_group", True), ("shampoo", False),
           ("shampoo_cf", True)]
  print("| inputs | hidden | " + " | ".join(n for n, _ in pairs) + " |")
  print("|---" * (len(pairs) + 2) + "|")
  for shift, label in ((0.0, "as is (pixels often 0)"),
                       (1 / 16, "+1/16 (never 0)")):
    for activation in ("relu", "tanh"):
      data = Digits.load(shift, activation)
      cells = []
      for name, corrected in pairs:
        tx = (CORRECTED[name][0](False) if corrected
              else UNCORRECTED[name]())
        losses, top = train(data, tx, corrected, 0, steps)
        cells.append(f"{_last10(losses):.3g} ({top.max():.2g})")
      print(f"| {label} | {activation} | " + " | ".join(cells) + " |",
            flush=True)


def factor_conditioning(steps, b2=0.995, fraction=1 / 8):
  """Directions of `fo.shampoo(bias_correction='cross_fit')`'s factor
  statistics that the held-out half barely saw, at each refresh (every
  20 steps), recomputed from the microbatch gradients of the run."""
  data = Digits.load()
  tx = fo.shampoo(LR, bias_correction="cross_fit")
  params = Digits.init(0)
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    _, grads, micro = fo.microbatch_grads(data.loss, params, batch,
                                          MICROBATCHES)
    updates, state = tx.update(grads, state, params, microbatch_grads=micro)
    return optax.apply_updates(params, updates), state, micro

  half = MICROBATCHES // 2
  grams = {"w1 left": lambda g: g @ g.T, "w1 right": lambda g: g.T @ g,
           "w2 left": lambda g: g @ g.T, "w2 right": lambda g: g.T @ g}
  held, numer = dict.fromkeys(grams, 0.0), dict.fromkeys(grams, 0.0)
  print("\n## Factor statistics of shampoo_cf (safeguarded), seed 0: "
        f"directions where the held-out statistic < {fraction:g} x the pooled"
        " one (their share of the pooled statistic's trace)\n")
  print("| step | " + " | ".join(grams) + " |")
  print("|---" * (len(grams) + 1) + "|")
  for t, idx in enumerate(data.batches(0, steps), start=1):
    params, state, micro = step(params, state, (data.x[idx], data.y[idx]))
    for key, gram in grams.items():
      g = np.asarray(micro[key[:2]], np.float64)
      numer[key] = b2 * numer[key] + (1 - b2) * np.mean(
          [gram(x) for x in g[:half]], 0)
      held[key] = b2 * held[key] + (1 - b2) * np.mean(
          [gram(x) for x in g[half:]], 0)
    if t % 20 == 0:
      cells = []
      for key in grams:
        pooled = (numer[key] + held[key]) / 2
        eigvals, basis = np.linalg.eigh(held[key])
        rayleigh = np.einsum("ik,ij,jk->k", basis, pooled, basis)
        missed = eigvals < fraction * rayleigh
        cells.append(f"{int(missed.sum())}/{len(eigvals)} "
                     f"({rayleigh[missed].sum() / rayleigh.sum():.1e})")
      print(f"| {t} | " + " | ".join(cells) + " |", flush=True)


# ----------------------------------------------------------------- char LM


# The bias suite's learning rates (its 2026-12-07 run's sweeps).
CHAR_LM_RATES = {"adamw": 1e-2, "shampoo": 3e-2, "foam": 3e-2, "soap": 1e-2}


def char_lm(seeds, compare: bool):
  """Each corrected method of the bias suite with the safeguard, at the
  suite's learning rates (`CHAR_LM_RATES`): how often the floor acts,
  where, and the final held-out loss per seed; with `compare`, also with
  the safeguard off and of the uncorrected self, and the paired
  differences."""
  from foam_optax.bench import bias
  workload = bias.bias_workload()
  evaluate = jax.jit(workload.evaluate)
  steps = bias.FULL.steps
  suite = bias.methods()

  def final(method):
    compiled = bias.compile_method(workload, method, MICROBATCHES, evaluate)
    return np.asarray([
        bias.train(compiled, s, steps, CHAR_LM_RATES[method.family])[
            "test_loss"] for s in seeds])

  spread = lambda x: f"{np.mean(x):+.4f} ± {np.std(x, ddof=1):.4f}"
  print(f"\n## Char LM ({workload.description}), {steps} steps, seeds "
        f"{list(seeds)}, learning rates {CHAR_LM_RATES}: final held-out "
        "loss (mean over seeds)\n")
  print("| method | safeguarded | coordinates floored | where (leaf shape: "
        "share of its evaluations floored) |"
        + (" official | uncorrected self | Δ official − uncorrected | "
           "Δ safeguarded − uncorrected | per-seed safeguarded − official |"
           if compare else ""))
  print("|---|---|---|---|" + ("---|---|---|---|---|" if compare else ""))
  plain = {m.name: final(m) for m in suite
           if compare and m.baseline is None}
  counter = FloorCounter()
  for m in suite:
    if not m.corrected:
      continue
    with counter:
      counter.reset()
      safe = final(m)
    where = ", ".join(
        f"{k}: {counter.active[k] / counter.evaluated[k]:.3%}"
        for k in sorted(counter.evaluated, key=lambda k: -counter.active[k])
        if counter.active[k])
    row = (f"| {m.name} | {np.mean(safe):.4f} | "
           f"{100 * counter.fraction():.4f}% | {where or '—'} |")
    if compare:
      official = final(dataclasses.replace(
          m, settings=dict(m.settings, cross_fit_safeguard=False)))
      base = plain[m.baseline]
      row += (f" {np.mean(official):.4f} | {np.mean(base):.4f} "
              f"({m.baseline}) | {spread(official - base)} | "
              f"{spread(safe - base)} | "
              + " ".join(f"{d:+.3f}" for d in safe - official) + " |")
    print(row, flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--part", choices=("digits", "char_lm"),
                      default="digits")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--steps", type=int, default=150)
  parser.add_argument("--compare", action="store_true",
                      help="char_lm: also run the official algorithm and "
                           "the uncorrected methods")
  args = parser.parse_args()
  start = time.perf_counter()
  if args.part == "digits":
    digits_table(args.seeds, args.steps)
    mechanism()
    two_group_gap(args.seeds, args.steps)
    data_ablation(args.steps)
    factor_conditioning(min(args.steps, 100))
  else:
    char_lm(args.seeds, args.compare)
  print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
  main()
