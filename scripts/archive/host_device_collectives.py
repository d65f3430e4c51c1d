"""Does a plain optax data-parallel loop survive on CPU host devices?

Runs a 300-step `optax.adamw` loop on 8 forced host devices (replicated
parameters, batch split over `data`, so each step all-reduces the gradients)
in fresh processes, with the steps dispatched back to back or waiting for
each one (`jax.block_until_ready`), each under XLA's default rendezvous
timeout and under a raised one, and counts the runs that finish. No
foam_optax code runs here: this measures the runtime the multi-device tests
stand on (see docs/multi_device.md). Usage::

    python scripts/archive/host_device_collectives.py --runs 4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

STEPS = 300
MODES = {
    "back to back": ("async", ""),
    "waiting for each step": ("blocking", ""),
    "back to back, timeout 120 s": (
        "async", "--xla_cpu_collective_call_terminate_timeout_seconds=120"),
    "waiting, timeout 120 s": (
        "blocking", "--xla_cpu_collective_call_terminate_timeout_seconds=120"),
}


def loop(blocking: bool) -> None:
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  mesh = jax.make_mesh((8,), ("data",))
  params = {"w": jnp.ones((256, 128)) / 16, "b": jnp.zeros((128,))}
  loss_fn = lambda p, x: jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2)
  tx = optax.adamw(1e-3)
  with jax.set_mesh(mesh):
    params = jax.device_put(params, NamedSharding(mesh, P()))
    state = tx.init(params)

    @jax.jit
    def step(params, state, x):
      updates, state = tx.update(jax.grad(loss_fn)(params, x), state, params)
      return optax.apply_updates(params, updates), state

    x = jax.device_put(jnp.ones((64, 256)), NamedSharding(mesh, P("data")))
    for _ in range(STEPS):
      params, state = step(params, state, x)
      if blocking:
        jax.block_until_ready(params)
    jax.block_until_ready(params)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=4)
  parser.add_argument("--child", choices=("async", "blocking"))
  args = parser.parse_args()
  if args.child:
    loop(args.child == "blocking")
    return
  print(f"{STEPS}-step optax.adamw loop on 8 CPU host devices, "
        f"{args.runs} runs per mode")
  finished = {mode: 0 for mode in MODES}
  for _ in range(args.runs):
    for mode, (child, flag) in MODES.items():
      env = dict(os.environ, XLA_FLAGS=(
          "--xla_force_host_platform_device_count=8 " + flag).strip())
      start = time.time()
      out = subprocess.run([sys.executable, __file__, "--child", child],
                           env=env, capture_output=True, text=True,
                           timeout=600)
      finished[mode] += out.returncode == 0
      print(f"  {mode}: exit {out.returncode} after {time.time() - start:.0f}"
            f" s, load {os.getloadavg()[0]:.2f}", flush=True)
  print("\n| mode | runs that finished |\n|---|---|")
  for mode, count in finished.items():
    print(f"| {mode} | {count} of {args.runs} |")


if __name__ == "__main__":
  main()
