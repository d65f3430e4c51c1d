"""OpenBLAS threads and foam_optax on CPU: `eigh` and refresh steps.

JAX's CPU `eigh` calls LAPACK through SciPy (`scipy.linalg.cython_lapack`),
so it runs on SciPy's OpenBLAS, which loads at the first `eigh` JAX
compiles; NumPy's OpenBLAS, loaded by `import jax`, is a different copy.
Each OpenBLAS reads ``OPENBLAS_NUM_THREADS`` when it loads. This script
times, each in a fresh process:

* a jitted `jnp.linalg.eigh` of 128 x 128 and 512 x 512 (float32, SPD);
* a refresh step: `fo.shampoo` with ``check_frequency=1`` on one 512 x 256
  and one 128 x 128 weight, so every step eigendecomposes all four factors
  (the step FOAM takes when all its checks refresh);

under five settings: OpenBLAS's default threads; ``OPENBLAS_NUM_THREADS=1``;
`threadpoolctl.threadpool_limits(1, 'blas')` called after the first `eigh`
(SciPy's OpenBLAS loaded); the same call made before it (too early: it
limits only the copies already loaded); and the limit held only while the
functions are traced and compiled, which is all that code inside a jitted
function (such as the library's) runs around its `eigh`. Each setting runs
on the machine as it is ("as found") and with `--load N` busy-looping
processes beside it ("loaded"). Prints a Markdown table with the load
average.

  OPENBLAS_NUM_THREADS= python scripts/archive/blas_threads.py --load 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = {
    "default threads": {},
    "OPENBLAS_NUM_THREADS=1": {"OPENBLAS_NUM_THREADS": "1"},
    "threadpoolctl after the first eigh": {},
    "threadpoolctl before the first eigh": {},
    "threadpoolctl while tracing and compiling only": {},
}


def measure(setting: str, repeats: int) -> dict:
  """Runs in the child process: times of the three kernels, in ms."""
  import statistics

  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from threadpoolctl import threadpool_info, threadpool_limits

  import foam_optax as fo
  from foam_optax.bench.measure import call_times

  def limit():
    threadpool_limits(1, user_api="blas")

  if setting == "threadpoolctl before the first eigh":
    limit()
  rng = np.random.default_rng(0)

  def spd(size):
    g = rng.standard_normal((size, 2 * size)).astype(np.float32)
    return jnp.asarray(g @ g.T / (2 * size))

  matrices = {size: spd(size) for size in (128, 512)}
  while_compiling = setting == "threadpoolctl while tracing and compiling only"

  def compiled(fn, *args):
    if while_compiling:
      with threadpool_limits(1, user_api="blas"):
        return jax.jit(fn).lower(*args).compile()
    return jax.jit(fn).lower(*args).compile()

  eighs = {n: compiled(jnp.linalg.eigh, m) for n, m in matrices.items()}
  for n, matrix in matrices.items():
    jax.block_until_ready(eighs[n](matrix))
  if setting == "threadpoolctl after the first eigh":
    limit()

  params = {"a": jnp.zeros((512, 256)), "b": jnp.zeros((128, 128))}
  tx = fo.shampoo(1e-3, check_frequency=1, start_preconditioning_step=1)

  def update(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  grads = jax.tree.map(
      lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
  state = tx.init(params)
  step = compiled(update, params, state, grads)
  params, state = jax.block_until_ready(step(params, state, grads))

  def timed(fn):
    times = [1e3 * s for s in call_times(fn, repeats=repeats, warmup=False)]
    return {"median": statistics.median(times), "max": max(times)}

  result = {f"eigh {n}": timed(lambda n=n, m=m: eighs[n](m))
            for n, m in matrices.items()}
  result["refresh step"] = timed(lambda: step(params, state, grads))
  # Keyed by the package that ships the copy (scipy.libs, numpy.libs).
  result["blas threads"] = {
      os.path.basename(os.path.dirname(i["filepath"])): i["num_threads"]
      for i in threadpool_info() if i["user_api"] == "blas"}
  return result


def child(setting: str, repeats: int) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
  env.update(SETTINGS[setting])
  out = subprocess.run(
      [sys.executable, __file__, "--child", setting, "--repeats",
       str(repeats)], env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def busy_loops(count: int) -> list:
  return [subprocess.Popen([sys.executable, "-c", "while True: pass"])
          for _ in range(count)]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--load", type=int, default=2,
                      help="busy-looping processes for the loaded runs")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.child, args.repeats)))
    return
  rows = []
  for load in ("as found", "loaded"):
    loops = busy_loops(args.load) if load == "loaded" else []
    try:
      for setting in SETTINGS:
        result = child(setting, args.repeats)
        rows.append((load, setting, result, os.getloadavg()[0]))
    finally:
      for loop in loops:
        loop.kill()
        loop.wait()
  kernels = ("eigh 128", "eigh 512", "refresh step")
  print(f"{os.cpu_count()} CPU cores; {args.repeats} repeats; loaded = "
        f"{args.load} busy-looping processes beside the measurement.\n")
  print("| machine | setting | " + " | ".join(
      f"{k} ms, median (max)" for k in kernels)
        + " | OpenBLAS threads (SciPy's, NumPy's) | 1-min load |")
  print("|---" * (len(kernels) + 4) + "|")
  for load, setting, result, loadavg in rows:
    threads = result["blas threads"]
    print(f"| {load} | {setting} | " + " | ".join(
        f"{result[k]['median']:.1f} ({result[k]['max']:.0f})" for k in kernels)
          + f" | {threads.get('scipy.libs')}, {threads.get('numpy.libs')} | "
            f"{loadavg:.2f} |")


if __name__ == "__main__":
  main()
