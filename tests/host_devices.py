"""The environment of tests that run JAX on several CPU (host) devices.

The device count must be set before JAX starts, so these tests run in
subprocesses, each under a timeout: a deadlocked collective fails the test
instead of stalling the run. Their training loops wait for each step
(`jax.block_until_ready`): XLA's CPU collectives deadlock when several steps
of a program with collectives are in flight at once, for plain optax code
too (docs/multi_device.md gives the measurements), and then abort after
their 40 s rendezvous timeout.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def env(count: int = 8, **extra) -> dict:
  """`os.environ` with `count` CPU devices."""
  return dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={count}",
              **extra)


def run(args, timeout: int, count: int = 8) -> str:
  """`python args...` from the repository root on `count` devices; its
  stdout, after asserting it exited 0."""
  out = subprocess.run([sys.executable, *args], env=env(count), cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stderr[-4000:]
  return out.stdout
