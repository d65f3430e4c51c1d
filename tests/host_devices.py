"""The environment of tests that run JAX on several CPU (host) devices.

The device count must be set before JAX starts, so these tests run in
subprocesses, each under a timeout: a deadlocked collective fails the test
instead of stalling the run. XLA's CPU collectives otherwise abort after
40 s when one device's thread reaches a rendezvous late, which happens on a
loaded machine with plain optax code too ("Expected 8 threads to join the
rendezvous, but only 7 of them arrived"); 600 s makes a late thread a wait.
"""

import os

COLLECTIVE_TIMEOUT = "--xla_cpu_collective_call_terminate_timeout_seconds=600"


def xla_flags(count: int = 8) -> str:
  return f"--xla_force_host_platform_device_count={count} {COLLECTIVE_TIMEOUT}"


def env(count: int = 8, **extra) -> dict:
  """`os.environ` with `count` CPU devices and the collective timeout."""
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(count),
              **extra)
