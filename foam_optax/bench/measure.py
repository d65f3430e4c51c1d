"""Timing and memory measurements shared by the suites and `scripts/`.

Every time is wall-clock around a call followed by `jax.block_until_ready`
(JAX dispatches asynchronously: without it a call returns before the device
has finished). Imports only JAX, so the scripts can use it where the
benchmark's own dependencies are not installed.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable, Optional

import jax


@functools.cache
def fast_compile() -> dict:
  """XLA options for the programs of a smoke run (the suites' quick
  presets, `scripts/device_check.py --tiny`), whose tiny shapes time nothing
  of interest: no optimisation of the machine code and, where this jaxlib
  still has them, XLA's older CPU fusion emitters (unoptimised, they compile
  in half the time of the newer ones)."""
  options: dict[str, Any] = dict(xla_backend_optimization_level=0,
                                 xla_llvm_disable_expensive_passes=True)
  older = dict(options, xla_cpu_use_fusion_emitters=False)
  try:
    jax.jit(lambda x: x).lower(0.0).compile(older)
  except RuntimeError:   # "No such compile option"
    return options
  return older


def compiler_options(fast: bool) -> Optional[dict]:
  """`fast_compile()` if `fast`, else None (XLA's defaults)."""
  return fast_compile() if fast else None


def call_timed(fn: Callable, *args) -> tuple[Any, float]:
  """``(fn(*args), seconds)``, the seconds up to the result being ready."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def call_times(fn: Callable, *args, repeats: int,
               warmup: bool = True) -> list[float]:
  """Seconds of each of `repeats` calls of ``fn(*args)``, after a first
  untimed call (compilation, caches) unless `warmup` is False."""
  if warmup:
    jax.block_until_ready(fn(*args))
  return [call_timed(fn, *args)[1] for _ in range(repeats)]


def timed(fn: Callable, *args, repeats: int = 7) -> float:
  """Median seconds of ``fn(*args)`` over `repeats` calls after a warm-up
  call."""
  return statistics.median(call_times(fn, *args, repeats=repeats))


def lower_and_compile(fn: Callable, *args, **compile_options
                      ) -> tuple[Any, float, float]:
  """``(compiled, trace_and_lower_seconds, compile_seconds)`` of
  ``jax.jit(fn)`` at `args`; `compile_options` go to XLA. `fn` may already
  be jitted (with its own static or donated arguments)."""
  jitted: Any = fn if hasattr(fn, "lower") else jax.jit(fn)
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  middle = time.perf_counter()
  compiled = lowered.compile(compile_options or None)
  return compiled, middle - start, time.perf_counter() - middle


def memory(compiled) -> Optional[dict]:
  """XLA's buffer sizes of a compiled function (None where the backend does
  not report them); ``total_bytes`` counts inputs, outputs and temporaries
  once each (donated inputs are aliased to outputs)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  sizes = {key: int(getattr(stats, f"{key}_size_in_bytes"))
           for key in ("argument", "output", "temp", "alias")}
  sizes["total_bytes"] = (sizes["argument"] + sizes["output"] + sizes["temp"]
                          - sizes["alias"])
  return sizes


def tree_bytes(tree) -> int:
  """Bytes of the arrays of a pytree."""
  return int(sum(x.nbytes for x in jax.tree.leaves(tree)))
