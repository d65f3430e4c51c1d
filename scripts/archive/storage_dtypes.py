"""Storage dtypes: optimizer-state bytes per parameter byte and their effect
on short training runs.

For each setting of the storage options (`mu_dtype`, `second_moment_dtype`,
`factor_matrix_dtype`, `factor_matrix_eigenvectors_dtype`,
`inv_factor_matrix_dtype`, `cache_inverse_root`), with or without
`pseudo_inverse_rtol`, prints the state's bytes per parameter byte on the
benchmark's models (from `jax.eval_shape`, nothing allocated); the updates'
largest relative error against the float64 reference implementation of the
tests (tests/reference.py); and the final train loss of FOAM and Shampoo
(f = 20) on the `foam-bench --quick` workloads, trained with the bench's
settings at one learning rate, relative to float32 storage.

  python scripts/archive/storage_dtypes.py --steps 40 --seeds 2
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import foam_optax as fo
from foam_optax.bench import optimizers, trainer, workloads

BF16, FP16 = jnp.bfloat16, jnp.float16
PINV = dict(pseudo_inverse_rtol=1e-6)
BUFFERS_BUT_STATISTICS = dict(
    mu_dtype=BF16, second_moment_dtype=BF16,
    factor_matrix_eigenvectors_dtype=BF16, inv_factor_matrix_dtype=BF16)
# Each setting: (options, the float32 setting its losses are compared with).
SETTINGS = {
    "float32": ({}, "float32"),
    "mu bf16": (dict(mu_dtype=BF16), "float32"),
    "all but statistics bf16": (BUFFERS_BUT_STATISTICS, "float32"),
    "all bf16": (dict(BUFFERS_BUT_STATISTICS, factor_matrix_dtype=BF16),
                 "float32"),
    "float32, pinv 1e-6": (PINV, "float32, pinv 1e-6"),
    "mu bf16, pinv 1e-6": (dict(PINV, mu_dtype=BF16), "float32, pinv 1e-6"),
    "all but statistics bf16, pinv 1e-6": (
        dict(PINV, **BUFFERS_BUT_STATISTICS), "float32, pinv 1e-6"),
    "all but statistics bf16, statistics fp16, pinv 1e-6": (
        dict(PINV, factor_matrix_dtype=FP16, **BUFFERS_BUT_STATISTICS),
        "float32, pinv 1e-6"),
    "all but statistics bf16, no X cache, pinv 1e-6": (
        dict(PINV, cache_inverse_root=False, **BUFFERS_BUT_STATISTICS),
        "float32, pinv 1e-6"),
    "all bf16, pinv 1e-6": (
        dict(PINV, factor_matrix_dtype=BF16, **BUFFERS_BUT_STATISTICS),
        "float32, pinv 1e-6"),
}
BYTES_MODELS = ("digits_mlp", "digits_cnn", "transformer_lm")
LOSS_WORKLOADS = ("quadratic_k1e2", "digits_mlp")   # foam-bench --quick
OPTIMIZERS = {"foam": (fo.foam, optimizers.FOAM_PAPER),
              "shampoo_f20": (fo.shampoo, optimizers._shampoo_settings(20)),
              "soap": (fo.soap, optimizers.SOAP_SETTINGS)}


def _build(name, storage):
  factory, settings = OPTIMIZERS[name]
  if factory is fo.soap:   # no inverse roots
    storage = {k: v for k, v in storage.items()
               if k not in ("inv_factor_matrix_dtype", "pseudo_inverse_rtol",
                            "cache_inverse_root")}
  return lambda lr: factory(learning_rate=lr, **settings, **storage)


def bytes_per_parameter_byte(tx, params) -> float:
  state = jax.eval_shape(tx.init, params)
  size = lambda tree: sum(x.size * jnp.dtype(x.dtype).itemsize
                          for x in jax.tree.leaves(tree))
  return size(state) / size(params)


def final_loss(workload, name, storage, lr, steps, seeds) -> float:
  spec = optimizers.OptimizerSpec(name, _build(name, storage), (lr,), {},
                                  foam_family=True)
  compiled = trainer.Trainer(workload, spec)
  losses = [compiled.train(seed, steps, lr)["curve"][
      "train_loss"][-1] for seed in range(seeds)]
  return float(np.mean(losses))


def reference_agreement(options):
  """Largest relative error of the updates against the float64 reference
  implementation (tests/reference.py) on the reference tests' problem, with
  the given storage options, and (library, reference) eigendecompositions."""
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                  "..", "tests"))
  import helpers as tr
  kwargs = dict(tr.BASE, controller="foam", precondition_1d=True)
  grads = tr.make_grads(tr.SHAPES)
  # The storage options only: the reference has no pseudo-inverse.
  options = {k: v for k, v in options.items() if k != "pseudo_inverse_rtol"}
  tx = fo.scale_by_foam(stagger=False, **kwargs, **options)
  _, lib_updates, _, lib_stats, _ = tr.run_library(tx, grads, jnp.float32)
  _, ref_updates, _, ref_stats, _, _ = tr.run_reference(tr.SHAPES, grads,
                                                        **kwargs)
  error = 0.0
  for t in range(len(grads)):
    for i in range(len(tr.SHAPES)):
      ref = np.asarray(ref_updates[t][i])
      error = max(error, float(np.linalg.norm(lib_updates[i][t] - ref)
                               / max(np.linalg.norm(ref), 1e-30)))
  return (error, int(lib_stats["eigendecompositions"][-1]),
          int(ref_stats[-1]["eigendecompositions"]))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--learning-rate", type=float, default=1e-2)
  parser.add_argument("--settings", nargs="+", default=list(SETTINGS),
                      choices=list(SETTINGS),
                      help="a setting's float32 reference must come first")
  parser.add_argument("--bytes-only", action="store_true")
  args = parser.parse_args(argv)

  print("### State bytes per parameter byte\n")
  print("| optimizer | setting | " + " | ".join(BYTES_MODELS) + " |")
  print("|---|---" + "|---:" * len(BYTES_MODELS) + "|")
  models = [workloads.WORKLOADS[m]().init_params(0) for m in BYTES_MODELS]
  adamw = [bytes_per_parameter_byte(optax.adamw(1e-3), p) for p in models]
  print("| adamw | float32 | " + " | ".join(f"{a:.2f}" for a in adamw) + " |")
  for name in ("foam", "soap"):
    for setting in args.settings:
      if name == "soap" and ("pinv" in setting or "cache" in setting):
        continue   # the same bytes as without
      row = [bytes_per_parameter_byte(_build(name, SETTINGS[setting][0])(1e-3),
                                      p)
             for p in models]
      print(f"| {name} | {setting} | " + " | ".join(f"{r:.2f}" for r in row)
            + " |", flush=True)
  if args.bytes_only:
    return

  print("\n### Against the float64 reference (tests/test_transform.py's "
        "problem, FOAM, 16 steps, float32 computations)\n")
  print("| setting | max relative update error | eigendecompositions "
        "(library / reference) |")
  print("|---|---:|---:|")
  for setting in args.settings:
    if "pinv" in setting and setting.replace(", pinv 1e-6", "") in SETTINGS:
      continue   # the same storage as the setting without
    error, lib_evds, ref_evds = reference_agreement(SETTINGS[setting][0])
    print(f"| {setting.replace(', pinv 1e-6', '')} | {error:.2e} | "
          f"{lib_evds} / {ref_evds} |", flush=True)

  print(f"\n### Final train loss, {args.steps} steps, lr {args.learning_rate},"
        f" mean of {args.seeds} seeds (relative change against the float32 "
        f"setting with the same pseudo_inverse_rtol)\n")
  names = [(w, o) for w in LOSS_WORKLOADS for o in ("foam", "shampoo_f20")]
  print("| setting | " + " | ".join(f"{w} {o}" for w, o in names) + " |")
  print("|---" + "|---:" * len(names) + "|")
  built = {w: workloads.WORKLOADS[w](steps=args.steps) for w in LOSS_WORKLOADS}
  losses = {}
  for setting in args.settings:
    options, reference = SETTINGS[setting]
    cells = []
    for w, o in names:
      loss = final_loss(built[w], o, options, args.learning_rate, args.steps,
                        args.seeds)
      losses[(setting, w, o)] = loss
      base = losses.get((reference, w, o))
      change = "" if base is None else f" ({(loss - base) / abs(base):+.2%})"
      cells.append(f"{loss:.4f}{change}")
    print(f"| {setting} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
