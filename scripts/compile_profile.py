"""Where the compile time of an optimizer's update goes, from XLA's own logs.

For each optimizer named on the command line this compiles ``jax.jit`` of its
``update`` on a GPT-2-small-shaped tree (`foam_optax.bench.cost`) in a fresh
process with XLA's timing logs on, and prints:

* trace + lower seconds, then XLA's phases: the HLO optimization passes
  (each pass's seconds, the slowest listed), the backend (scheduling, buffer
  assignment and the code generation of every kernel) and what precedes
  them (StableHLO to HLO);
* the kernels the backend compiled, their number and summed seconds (two
  compiler threads share them), grouped by the foam_optax function whose
  operations they hold (read from the HLO's source metadata) or, for
  optax's transformations, by their first operation;
* the optimized HLO's size (`foam_optax.bench.cost.hlo_size`) and its most
  frequent instructions.

The optimizer is any expression of ``fo`` (foam_optax), ``optax`` and
``jnp``, e.g. ``"fo.foam(1e-3, skip_nonfinite=False)"``. Usage::

    python scripts/compile_profile.py "optax.contrib.muon(1e-3)" "fo.foam(1e-3)"
    python scripts/compile_profile.py --layers 2 --top 40 "fo.soap(1e-3)"
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

_CHILD = r"""
import json, sys, time
import jax, jax.numpy as jnp, optax
import foam_optax as fo
from foam_optax.bench import cost
params = cost.init_params(int(sys.argv[2]), int(sys.argv[3]))
tx = eval(sys.argv[1])
state = jax.eval_shape(tx.init, params)
start = time.perf_counter()
lowered = jax.jit(tx.update).trace(params, state, params).lower()
middle = time.perf_counter()
compiled = lowered.compile()
end = time.perf_counter()
open(sys.argv[4], "w").write(compiled.as_text())
print(json.dumps({"trace_lower_s": middle - start, "compile_s": end - middle}))
"""

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _seconds(text: str) -> float:
  value, unit = re.match(r"([\d.]+) (us|ms|s)\b", text).groups()
  return float(value) * _UNITS[unit]


def compile_with_logs(optimizer: str, layers: int, d_model: int) -> dict:
  """Compiles in a child process with XLA's timing logs; returns the
  timings, the log lines and the optimized HLO text."""
  with tempfile.TemporaryDirectory() as tmp:
    hlo_path = os.path.join(tmp, "update.hlo")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0",
               TF_CPP_VMODULE="hlo_pass_pipeline=1,cpu_compiler=1,"
                              "ir_compiler=1,fusion_compiler=1")
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, optimizer, str(layers), str(d_model),
         hlo_path], capture_output=True, text=True, env=env, check=True)
    times = json.loads(done.stdout.strip().splitlines()[-1])
    return {**times, "log": done.stderr.splitlines(),
            "hlo": pathlib.Path(hlo_path).read_text()}


def phases(log: list) -> dict:
  """XLA's phases of the update's compilation, from its logs."""
  passes = collections.Counter()
  module, backend = None, 0.0
  kernels = []
  in_backend = False
  for line in log:
    found = re.search(r"Running HLO pass pipeline on module (\S+):", line)
    if found:
      module = found.group(1)
    found = re.search(r"HLO pass: (\S+) time: (\S+ \w+)", line)
    if found and module == "jit_update_fn" and not in_backend:
      passes[found.group(1)] += _seconds(found.group(2))
    if "Compiling: jit_update_fn" in line:
      in_backend = True
    found = re.search(r"Compiled (LLVM|MLIR) module: (\S+) time: (\S+ \w+)",
                      line)
    if found and in_backend:
      kernels.append((found.group(2), _seconds(found.group(3))))
    found = re.search(r"Compiling \[jit_update_fn\] for CPU using JIT time: "
                      r"(\S+ \w+)", line)
    if found:
      backend = _seconds(found.group(1))
      in_backend = False
  return {"passes": passes, "backend_s": backend, "kernels": kernels}


def _section(hlo: str, name: str) -> list:
  part = hlo.split("\n" + name + "\n", 1)
  return part[1].split("\n\n", 1)[0].splitlines() if len(part) > 1 else []


def kernel_sources(hlo: str) -> dict:
  """For each instruction with source metadata, the innermost foam_optax
  function of its stack (``module.function``), else None."""
  files = dict(line.split(" ", 1) for line in _section(hlo, "FileNames"))
  functions = dict(line.split(" ", 1)
                   for line in _section(hlo, "FunctionNames"))
  locations, frames = {}, {}
  for line in _section(hlo, "FileLocations"):
    key, rest = line.split(" ", 1)
    fields = dict(re.findall(r"(\w+)=(\d+)", rest))
    locations[key] = (files[fields["file_name_id"]].strip('"'),
                      functions[fields["function_name_id"]].strip('"'))
  for line in _section(hlo, "StackFrames"):
    key, rest = line.split(" ", 1)
    fields = dict(re.findall(r"(\w+)=(\d+)", rest))
    frames[key] = (fields["file_location_id"], fields["parent_frame_id"])

  def source(frame):
    seen = set()
    while frame in frames and frame not in seen:
      seen.add(frame)
      location, frame = frames[frame]
      path, function = locations[location]
      if "foam_optax" in path:
        return f"{pathlib.Path(path).stem}.{function.split('.')[0]}"
    return None

  out = {}
  for line in hlo.splitlines():
    found = re.match(r"\s*(?:ROOT )?%(\S+) = .*stack_frame_id=(\d+)", line)
    if found:
      out[found.group(1)] = source(found.group(2))
  return out


def grouped_kernels(kernels: list, hlo: str) -> collections.Counter:
  """Kernel seconds and counts per source function."""
  sources = kernel_sources(hlo)
  seconds, counts = collections.Counter(), collections.Counter()
  for name, time in kernels:
    instruction = re.sub(r"_kernel_module$", "",
                         re.sub(r"^(__compute_module_)+", "", name))
    source = sources.get(instruction)
    key = source or "(other) " + re.sub(r"[._]\d+$", "", instruction)
    seconds[key] += time
    counts[key] += 1
  return seconds, counts


def report(optimizer: str, layers: int, d_model: int, top: int) -> None:
  from foam_optax.bench import cost
  result = compile_with_logs(optimizer, layers, d_model)
  found = phases(result["log"])
  passes, kernels = found["passes"], found["kernels"]
  hlo_passes = sum(passes.values())
  before = result["compile_s"] - hlo_passes - found["backend_s"]
  print(f"\n## {optimizer}: {layers} layers of d = {d_model}")
  print(f"trace + lower {result['trace_lower_s']:.2f} s; XLA compile "
        f"{result['compile_s']:.2f} s = StableHLO to HLO and setup "
        f"{before:.2f} + HLO passes {hlo_passes:.2f} + backend "
        f"{found['backend_s']:.2f}")
  print("slowest HLO passes: " + ", ".join(
      f"{name} {seconds:.2f}" for name, seconds in passes.most_common(5)))
  llvm = [k for k in kernels if k[0].startswith("__compute_module")]
  print(f"kernels: {len(llvm)} LLVM modules, "
        f"{sum(t for _, t in llvm):.2f} s; {len(kernels) - len(llvm)} MLIR "
        f"modules, {sum(t for n, t in kernels if n not in dict(llvm)):.2f} s "
        "(summed over the compiler's threads)")
  seconds, counts = grouped_kernels(kernels, result["hlo"])
  print(f"kernel seconds by source (LLVM and MLIR modules), top {top}:")
  for key, value in seconds.most_common(top):
    print(f"  {value:6.3f} s {counts[key]:4d}  {key}")
  size = cost.hlo_size(result["hlo"])
  ops = collections.Counter(re.findall(r" = \S+ ([a-z][\w-]*)\(",
                                       result["hlo"]))
  print("optimized HLO: " + ", ".join(f"{k} {v}" for k, v in size.items())
        + "; most frequent: " + ", ".join(f"{k} {v}" for k, v in
                                          ops.most_common(6)))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("optimizers", nargs="+")
  parser.add_argument("--layers", type=int, default=12)
  parser.add_argument("--d-model", type=int, default=768)
  parser.add_argument("--top", type=int, default=20)
  args = parser.parse_args(argv)
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
  for optimizer in args.optimizers:
    report(optimizer, args.layers, args.d_model, args.top)


if __name__ == "__main__":
  main()
