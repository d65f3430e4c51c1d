"""Agreement of FOAM's sketched staleness proxy with the exact one.

On every foam-bench workload, FOAM (the paper's settings, as in foam-bench)
is trained with ``proxy='exact'`` and with ``proxy='sketch'`` for each k in
``--probes``, at one learning rate and the same seeds. Two measurements:

* closed loop: final train loss (mean of the last 10 minibatch losses,
  mean over seeds) and eigendecomposition count of each run, relative to
  the exact proxy's;
* open loop, along the exact run: at every check of every factor after its
  first (which always refreshes) the exact h and the sketch's estimate on the same factor state (the library's own
  probe keys), their relative error, and how often the sketch's refresh
  decision differs from the exact one.

Prints Markdown tables; ``--json`` writes the figures.

    python scripts/archive/sketch_agreement.py                 # all workloads
    python scripts/archive/sketch_agreement.py --workloads digits_mlp --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import foam_optax as fo
from foam_optax import controllers
from foam_optax.bench import optimizers, workloads


def _open_loop(before, after, step, probe_counts, settings):
  """Exact and sketched h at the factors checked by this step.

  `before`/`after` are the optimizer states around step `step`; the check
  saw A_t = after.statistic / (1 − b2^t) and before's basis, eigenvalues
  and damping. Returns per-stack (checked mask, exact h, {k: sketched h}).
  """
  eps0, b2 = settings["epsilon"], settings["b2"]
  out = []
  for view, fs1 in zip(fo.factor_stacks(before),
                       (v.stack for v in fo.factor_stacks(after))):
    fs0 = view.stack
    checked = (fs1.checks > fs0.checks) & (fs0.checks > 0)
    factor = fs1.statistic / (1 - b2 ** step)
    damping = jnp.maximum(eps0, fs0.damping)
    exact = jax.vmap(controllers.staleness_proxy, (0, 0, 0, 0, None))(
        factor, fs0.basis, fs0.eigvals, damping, settings["exponent"])
    keys = controllers.probe_keys(step, jnp.asarray(view.ids, jnp.int32))
    sketched = {k: jax.vmap(controllers.sketched_staleness_proxy,
                            (0, 0, 0, 0, None, 0, None))(
        factor, fs0.basis, fs0.eigvals, damping, settings["exponent"], keys, k)
                for k in probe_counts}
    out.append((checked, exact, sketched, damping))
  return out


def _refresh(h, damping, settings):
  proposed = jnp.maximum(settings["epsilon"],
                         damping * h / settings["threshold"])
  return jnp.logical_not(proposed <= settings["max_epsilon"])


def _train_step(workload, tx, lr, settings, probe_counts, params, opt_state,
                batch):
  loss, grads = jax.value_and_grad(workload.loss_fn)(params, batch)
  updates, new_state = tx.update(grads, opt_state, params)
  updates = jax.tree.map(lambda u: (lr * u).astype(u.dtype), updates)
  step = fo.find_states(new_state)[0].count
  measured = (_open_loop(opt_state, new_state, step,
                         probe_counts, settings) if probe_counts else None)
  return optax.apply_updates(params, updates), new_state, loss, measured


_COMPILED = {}   # one compiled step per configuration, shared by the seeds


def run(workload, settings, lr, seed, steps, probe_counts=(), proxy="exact",
        probes=16):
  """One training run; returns final loss, EVD and check counts and, when
  `probe_counts` is given, the open-loop events of every check."""
  tx = fo.foam(learning_rate=optimizers.unit_schedule(), proxy=proxy,
               proxy_probes=probes, **settings)
  signature = (workload.name, proxy, probes, tuple(probe_counts))
  if signature not in _COMPILED:
    _COMPILED[signature] = jax.jit(lambda p, s, b: _train_step(
        workload, tx, lr, settings, probe_counts, p, s, b))
  train_step = _COMPILED[signature]
  params = workload.init_params(seed)
  opt_state = tx.init(params)
  batches = workload.sample_batches(seed, steps)
  losses, events = [], {k: [] for k in probe_counts}
  for i in range(steps):
    batch = jax.tree.map(lambda b: b[i], batches)
    params, opt_state, loss, measured = train_step(params, opt_state, batch)
    losses.append(float(loss))
    for checked, exact, sketched, damping in measured or ():
      checked = np.asarray(checked)
      if not checked.any():
        continue
      for k, h in sketched.items():
        exact_refresh = _refresh(exact, damping, settings)
        sketch_refresh = _refresh(h, damping, settings)
        for e, s, er, sr in zip(np.asarray(exact)[checked],
                                np.asarray(h)[checked],
                                np.asarray(exact_refresh)[checked],
                                np.asarray(sketch_refresh)[checked]):
          events[k].append((float(e), float(s), bool(er), bool(sr)))
  stats = fo.stats(opt_state)
  return {"final_loss": float(np.mean(losses[-10:])),
          "eigendecompositions": int(stats["eigendecompositions"]),
          "checks": int(stats["checks"]), "events": events}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workloads", nargs="+",
                      default=list(workloads.WORKLOADS))
  parser.add_argument("--probes", nargs="+", type=int, default=[4, 8, 16, 32])
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--steps", type=int, help="default: each workload's")
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--json", help="write the figures here")
  args = parser.parse_args(argv)
  settings = dict(optimizers.FOAM_PAPER)
  results = {}
  for name in args.workloads:
    workload = workloads.WORKLOADS[name](
        **({"steps": args.steps} if args.steps else {}))
    steps = workload.steps
    tic = time.perf_counter()
    rows = {"exact": [run(workload, settings, args.lr, s, steps,
                          args.probes if s == 0 else ())
                      for s in range(args.seeds)]}
    for k in args.probes:
      rows[f"sketch_k{k}"] = [run(workload, settings, args.lr, s, steps,
                                  proxy="sketch", probes=k)
                              for s in range(args.seeds)]
    results[name] = rows
    print(f"{name}: {time.perf_counter() - tic:.0f} s", flush=True)

  print("\n### Closed loop: sketch relative to exact (mean over "
        f"{args.seeds} seeds, lr {args.lr:g})\n")
  print("| workload | exact EVDs | exact loss | "
        + " | ".join(f"k={k} EVDs / loss ratio" for k in args.probes) + " |")
  print("|---" * (3 + len(args.probes)) + "|")
  summary = {}
  for name, rows in results.items():
    evd = lambda key: np.mean([r["eigendecompositions"] for r in rows[key]])
    loss = lambda key: np.mean([r["final_loss"] for r in rows[key]])
    cells = []
    for k in args.probes:
      key = f"sketch_k{k}"
      summary[(name, k)] = (evd(key) / evd("exact"), loss(key) / loss("exact"))
      cells.append(f"{evd(key):.1f} ({evd(key) / evd('exact'):.2f}x) / "
                   f"{loss(key) / loss('exact'):.4f}")
    print(f"| {name} | {evd('exact'):.1f} | {loss('exact'):.4g} | "
          + " | ".join(cells) + " |")

  print("\n### Open loop along the exact run (seed 0): sketch vs exact h "
        "at every check\n")
  print("| workload | checks | " + " | ".join(
      f"k={k} rel. err median / p90 / decision flips" for k in args.probes)
        + " |")
  print("|---" * (2 + len(args.probes)) + "|")
  for name, rows in results.items():
    events = rows["exact"][0]["events"]
    cells = []
    for k in args.probes:
      ev = np.array([(e, s) for e, s, _, _ in events[k]])
      flips = sum(er != sr for _, _, er, sr in events[k])
      rel = np.abs(ev[:, 1] / ev[:, 0] - 1)
      cells.append(f"{np.median(rel):.3f} / {np.quantile(rel, 0.9):.3f} / "
                   f"{flips}")
    print(f"| {name} | {len(events[args.probes[0]])} | "
          + " | ".join(cells) + " |")
  print("\nEVDs within 10% and loss within 1% on every workload, per k: "
        + ", ".join(
            f"k={k}: " + str(all(abs(summary[(n, k)][0] - 1) <= 0.10 and
                                 abs(summary[(n, k)][1] - 1) <= 0.01
                                 for n in results))
            for k in args.probes))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "results": results}, f)


if __name__ == "__main__":
  main()
