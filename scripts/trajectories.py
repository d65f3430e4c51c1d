"""Fingerprints of 60-step trajectories, to check that a change of the code
leaves every optimizer's numbers exactly as they were.

For each configuration (every optimizer family and the options that change
its program: controllers, proxies, stagger, refresh batching, one-sided
factors, exponent, skipping off) this trains a 64-96-48-10 MLP on
scikit-learn's digits for 60 steps (batch 128, fixed batches) and prints
the final loss on the whole set, to all digits, and a hash of the final
parameters' bits. Bit-identical trajectories give identical lines; the
figures depend on the JAX version and the machine, so compare runs made on
one machine. Usage::

    python scripts/trajectories.py --out before.json      # on the old code
    python scripts/trajectories.py --compare before.json  # on the new code
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import foam_optax as fo

STEPS = 60

CONFIGS = {
    "foam": lambda: fo.foam(3e-3, check_frequency=5, block_size=32),
    "foam_sketch": lambda: fo.foam(3e-3, check_frequency=5, proxy="sketch"),
    "foam_stagger": lambda: fo.foam(3e-3, check_frequency=5, stagger=True,
                                    block_size=32),
    "shampoo": lambda: fo.shampoo(3e-3, check_frequency=5),
    "shampoo_p4_no_skipping": lambda: fo.shampoo(
        3e-3, check_frequency=5, exponent=4, skip_nonfinite=False),
    "soap": lambda: fo.soap(3e-3),
    "soap_foam": lambda: fo.soap(3e-3, controller="foam", check_frequency=5),
    "asgo": lambda: fo.asgo(1e-2),
    "asgo_foam": lambda: fo.asgo(1e-2, root_method="eigh", controller="foam",
                                 check_frequency=5),
    "dasgo": lambda: fo.dasgo(1e-2),
    "foam_residual_bucket": lambda: fo.foam(
        3e-3, controller="residual", check_frequency=5,
        refresh_batching="bucket"),
    "foam_one_sided": lambda: fo.foam(3e-3, one_sided=True,
                                      check_frequency=5),
}


def _data():
  x, y = load_digits(return_X_y=True)
  return jnp.asarray(x / 16.0, jnp.float32), jnp.asarray(y)


def _init(key):
  k1, k2, k3 = jax.random.split(key, 3)
  return {"l1": {"w": jax.random.normal(k1, (64, 96)) / 8, "b": jnp.zeros(96)},
          "l2": {"w": jax.random.normal(k2, (96, 48)) / 10,
                 "b": jnp.zeros(48)},
          "out": {"w": jax.random.normal(k3, (48, 10)) / 7,
                  "b": jnp.zeros(10)}}


def _loss(params, x, y):
  h = jax.nn.relu(x @ params["l1"]["w"] + params["l1"]["b"])
  h = jax.nn.relu(h @ params["l2"]["w"] + params["l2"]["b"])
  logits = h @ params["out"]["w"] + params["out"]["b"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.cache
def _compiled(make_optimizer):
  """(optimizer, jitted train step) of a `CONFIGS` entry: compiled once per
  process however often `main` runs (a comparison with an earlier run in
  the same process reuses it)."""
  tx = make_optimizer()

  @jax.jit
  def step(params, state, xb, yb):
    grads = jax.grad(_loss)(params, xb, yb)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return tx, step


def fingerprint(name: str, x, y) -> dict:
  """Final loss and parameter hash of `name`'s 60-step run."""
  tx, step = _compiled(CONFIGS[name])
  params = _init(jax.random.PRNGKey(0))
  state = tx.init(params)
  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    batch = rng.choice(len(x), 128, replace=False)
    params, state = step(params, state, x[batch], y[batch])
  bits = b"".join(np.asarray(leaf).tobytes() for leaf in jax.tree.leaves(params))
  return {"final_loss": float(_loss(params, x, y)),
          "params_sha256": hashlib.sha256(bits).hexdigest()[:16]}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", nargs="+", choices=list(CONFIGS))
  parser.add_argument("--out", help="write the fingerprints to this JSON file")
  parser.add_argument("--compare", help="JSON file of an earlier run: exit 1 "
                      "unless every fingerprint is the same")
  args = parser.parse_args(argv)
  x, y = _data()
  results = {}
  for name in args.only or CONFIGS:
    results[name] = fingerprint(name, x, y)
    r = results[name]
    print(f"{name:24s} {r['final_loss']!r:22s} {r['params_sha256']}",
          flush=True)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
  if args.compare:
    with open(args.compare, encoding="utf-8") as f:
      before = json.load(f)
    changed = [n for n in results if before.get(n) != results[n]]
    print("identical" if not changed else f"changed: {', '.join(changed)}")
    return 1 if changed else 0
  return 0


if __name__ == "__main__":
  sys.exit(main())
