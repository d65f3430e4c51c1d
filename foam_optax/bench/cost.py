"""`foam-bench --suite cost`: what each optimizer costs to adopt.

Side by side, in one process, for `optax.adamw`, `optax.contrib.muon` and
this package's `foam`, `shampoo`, `soap` and `asgo` at their defaults, on
GPT-2-small-shaped parameter trees (layers of width d = 768: ``qkv``
768x2304, ``proj`` 768x768, ``fc`` 768x3072, ``out`` 3072x768 and two
vectors):

* **compile**: seconds to trace and lower, and to compile, `jax.jit` of the
  optimizer's ``update`` and of a whole train step (a GPT-2-style forward,
  its gradient, the update and `optax.apply_updates`), ahead of time; wall
  seconds and the process's CPU seconds (the steadier of the two on a shared
  machine). Each measurement builds a fresh optimizer and `jax.jit`, so
  nothing is reused from an earlier compilation; repeats are interleaved and
  the table shows medians.
* **optimized HLO**: instructions, fusions, conditionals and while loops of
  the compiled update;
* **state**: optimizer state bytes per parameter byte;
* **step times**: a step without a check, a check step that keeps every
  eigenbasis and a step that refreshes, each kind told apart by the
  `fo.stats` counters it moved (FOAM checks every ``check_frequency``
  steps, its first check always refreshes and a later one refreshes the
  factors whose proxy exceeds the threshold, so a check that keeps every
  basis may not occur in the steps measured; Shampoo refreshes at every
  check; SOAP's later checks are power-QR steps; ASGO computes its root
  every step).

Trees: the ``unscanned`` model (one subtree per layer), the same model
``scanned`` (each weight stacked over layers, ``weight_dimension_numbers``
giving the layer axis as a batch axis, as `optax.contrib.muon` takes them),
and a sweep of the number of layers (compile only).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import foam_optax as fo
from foam_optax.bench import harness, measure, report

BLOCK = harness.Block("## Cost of adoption (`foam-bench --suite cost`)",
                      "<!-- bench-cost:start -->", "<!-- bench-cost:end -->")

OPTIMIZERS = ("adamw", "muon", "foam", "shampoo", "soap", "asgo")
LEARNING_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class CostConfig:
  """What `run_suite` measures (`fast_compile`: every program compiled with
  `measure.fast_compile()`, so that a smoke run's compile seconds are that
  setting's, not XLA's defaults')."""

  d_model: int = 768
  layers: int = 12                       # the unscanned and scanned trees
  sweep: tuple = (1, 2, 4, 8, 12)        # layers of the compile sweep
  optimizers: tuple = OPTIMIZERS
  repeats: int = 3                       # compilations per optimizer and tree
  train_step: bool = True                # also compile a whole train step
  step_times: bool = True
  step_layers: int = 12                  # tree of the step-time part
  warm_up: bool = True
  persistent_cache: bool = True          # cold and warm compile, two processes
  check_frequency: int = 4               # of the step-time part
  batch: int = 2
  sequence: int = 64
  fast_compile: bool = False


FULL = CostConfig()
QUICK = CostConfig(d_model=16, layers=1, sweep=(2,),
                   optimizers=("muon", "foam"), repeats=1, train_step=False,
                   step_layers=1, check_frequency=2, sequence=4,
                   warm_up=False, persistent_cache=False, fast_compile=True)


# --- the model ------------------------------------------------------------

def init_params(layers: int, d: int, scanned: bool = False, seed: int = 0):
  """GPT-2-style block weights; `scanned` stacks each over the layers.

  Drawn with NumPy: only the shapes matter here, and JAX's random numbers
  drawn op by op would compile kernels for every weight shape."""
  shapes = dict(qkv=(d, 3 * d), proj=(d, d), fc=(d, 4 * d), out=(4 * d, d))
  rng = np.random.default_rng(seed)

  def layer():
    weights = {name: rng.standard_normal(shape, np.float32)
               / np.float32(math.sqrt(shape[0]))
               for name, shape in shapes.items()}
    return dict(weights, ln1=np.ones((d,), np.float32),
                ln2=np.ones((d,), np.float32))

  per_layer = [layer() for _ in range(layers)]
  if scanned:
    tree = jax.tree.map(lambda *leaves: np.stack(leaves), *per_layer)
  else:
    tree = {f"layer{i}": p for i, p in enumerate(per_layer)}
  return jax.tree.map(jnp.asarray, tree)


def dimension_numbers(params):
  """The scanned tree's layer axis as a batch axis (`optax.contrib.muon`'s
  convention): axis 1 is reduced, axis 2 the output; vectors get None."""
  matrix = optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2)
  return jax.tree.map(lambda p: matrix if p.ndim == 3 else None, params)


def _block(x, p, heads: int):
  """One pre-norm Transformer block (causal attention, GELU MLP)."""
  norm = lambda x, scale: scale * (x - x.mean(-1, keepdims=True)) / jnp.sqrt(
      x.var(-1, keepdims=True) + 1e-5)
  b, t, d = x.shape
  q, k, v = jnp.split(norm(x, p["ln1"]) @ p["qkv"], 3, axis=-1)
  split = lambda a: a.reshape(b, t, heads, d // heads)
  logits = jnp.einsum("bthd,bshd->bhts", split(q), split(k)) / math.sqrt(
      d // heads)
  logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -1e9)
  attention = jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits), split(v))
  x = x + attention.reshape(b, t, d) @ p["proj"]
  return x + jax.nn.gelu(norm(x, p["ln2"]) @ p["fc"]) @ p["out"]


def loss_fn(params, batch, scanned: bool):
  x, target = batch
  heads = max(1, x.shape[-1] // 64)
  if scanned:
    x, _ = jax.lax.scan(lambda x, p: (_block(x, p, heads), None), x, params)
  else:
    for name in sorted(params, key=lambda n: int(n[len("layer"):])):
      x = _block(x, params[name], heads)
  return jnp.mean((x - target) ** 2)


# One compiled program (op by op, every primitive of the model and its
# gradient would compile its own).
_gradient = jax.jit(jax.grad(loss_fn), static_argnums=2)


def make_batch(cfg: CostConfig, seed: int = 1):
  shape = (cfg.batch, cfg.sequence, cfg.d_model)
  x, target = np.random.default_rng(seed).standard_normal((2, *shape),
                                                          np.float32)
  return jnp.asarray(x), jnp.asarray(target)


def optimizer(name: str, params, scanned: bool, **options):
  """`name` at its defaults (`options` override the package's), with the
  scanned tree's dimension numbers."""
  dims = dimension_numbers(params) if scanned else None
  if name == "adamw":
    return optax.adamw(LEARNING_RATE)
  if name == "muon":
    return optax.contrib.muon(LEARNING_RATE,
                              muon_weight_dimension_numbers=dims)
  alias = {"foam": fo.foam, "shampoo": fo.shampoo, "soap": fo.soap,
           "asgo": fo.asgo}[name]
  if dims is not None:
    options["weight_dimension_numbers"] = dims
  return alias(LEARNING_RATE, **options)


# --- measurements ---------------------------------------------------------

def hlo_size(text: str) -> dict:
  """Instructions, fusions, conditionals and while loops of optimized HLO
  text."""
  lines = text.split("\n")
  count = lambda op: sum(f" {op}(" in line for line in lines)
  return {"instructions": sum(" = " in line for line in lines),
          "fusions": count("fusion"), "conditionals": count("conditional"),
          "loops": count("while")}


def _timed(fn):
  """(result, wall seconds, process CPU seconds) of ``fn()``."""
  wall, cpu = time.perf_counter(), time.process_time()
  result = fn()
  return result, time.perf_counter() - wall, time.process_time() - cpu


def compile_cost(fn, *args, compiler_options: Optional[dict] = None
                 ) -> dict:
  """Trace + lower and compile seconds of ``jax.jit(fn)`` ahead of time, and
  the compiled program's HLO size; `compiler_options` go to XLA."""
  jitted = jax.jit(fn)
  lowered, lower_wall, lower_cpu = _timed(
      lambda: jitted.trace(*args).lower())
  compiled, compile_wall, compile_cpu = _timed(
      lambda: lowered.compile(compiler_options))
  return {"trace_lower_s": lower_wall, "compile_s": compile_wall,
          "total_s": lower_wall + compile_wall,
          "trace_lower_cpu_s": lower_cpu, "compile_cpu_s": compile_cpu,
          "total_cpu_s": lower_cpu + compile_cpu,
          "hlo": hlo_size(compiled.as_text() or "")}


def update_cost(name: str, params, scanned: bool,
                compiler_options: Optional[dict] = None) -> dict:
  tx = optimizer(name, params, scanned)
  state = jax.eval_shape(tx.init, params)
  return compile_cost(tx.update, params, state, params,
                      compiler_options=compiler_options)


def train_step_cost(name: str, params, scanned: bool, batch,
                    compiler_options: Optional[dict] = None) -> dict:
  tx = optimizer(name, params, scanned)
  state = jax.eval_shape(tx.init, params)

  def step(params, state, batch):
    grads = jax.grad(loss_fn)(params, batch, scanned)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return compile_cost(step, params, state, batch,
                      compiler_options=compiler_options)


def state_bytes_ratio(name: str, params, scanned: bool) -> float:
  tx = optimizer(name, params, scanned)
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize
                            for x in jax.tree.leaves(tree))
  return nbytes(jax.eval_shape(tx.init, params)) / nbytes(params)


def _median_runs(runs: list) -> dict:
  """Per key the median over `runs` (nested dicts of numbers)."""
  first = runs[0]
  if isinstance(first, dict):
    return {k: _median_runs([r[k] for r in runs]) for k in first}
  return statistics.median(runs)


def step_times(name: str, cfg: CostConfig, params, scanned: bool,
               batch) -> dict:
  """Median seconds of the steps without a check, of the check steps that
  refresh nothing and of the steps that refresh (eigendecompositions or
  iterated inverse roots), over steps 1 to ``2 f + 1`` with one gradient
  repeated (see the module docstring); each kind with its step count and
  the work its first step did (`fo.stats` counters)."""
  package = name not in ("adamw", "muon")
  options = {"check_frequency": cfg.check_frequency} if package and (
      name != "asgo") else {}
  tx = optimizer(name, params, scanned, **options)
  compiler_options = measure.compiler_options(cfg.fast_compile)
  grads = _gradient(params, batch, scanned)
  state = jax.block_until_ready(
      jax.jit(tx.init, compiler_options=compiler_options)(params))
  # Gradients and parameters are arguments: closed over, they would be
  # constants that XLA folds through the update's products for minutes.
  step = jax.jit(lambda state, grads, params: tx.update(grads, state,
                                                        params)[1],
                 donate_argnums=0).lower(state, grads, params).compile(
                     compiler_options)
  keys = ("checks", "eigendecompositions", "inverse_roots")
  counters = lambda state: ({k: int(v) for k, v in fo.stats(state).items()
                             if k in keys} if package else {})
  kinds = {"plain": [], "check": [], "refresh": []}
  for _ in range(2 * cfg.check_frequency + 1):
    before = counters(state)
    state, wall, _ = _timed(
        lambda: jax.block_until_ready(step(state, grads, params)))
    work = {k: v - before[k] for k, v in counters(state).items()}
    if work.get("eigendecompositions") or work.get("inverse_roots"):
      kinds["refresh"].append((wall, work))
    elif work.get("checks"):
      kinds["check"].append((wall, work))
    else:
      kinds["plain"].append((wall, work))
  result: dict[str, Any] = {"check_frequency": options.get("check_frequency")}
  for kind, measured in kinds.items():
    if measured:
      result[kind] = {"seconds": statistics.median(w for w, _ in measured),
                      "steps": len(measured), "work": measured[0][1]}
  return result


_CACHED_COMPILE = """
import json, sys
import jax
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
from foam_optax.bench import cost
params = cost.init_params(int(sys.argv[3]), int(sys.argv[4]))
print(json.dumps(cost.update_cost(sys.argv[2], params, scanned=False)))
"""


def persistent_cache_cost(name: str, cfg: CostConfig) -> dict:
  """Trace + compile seconds of the unscanned update in a fresh process
  with an empty JAX persistent compilation cache (``cold``), then in a
  second process that finds the first one's entry (``warm``): what a
  restarted run pays with ``jax_compilation_cache_dir`` set."""
  out = {}
  with tempfile.TemporaryDirectory() as cache:
    for kind in ("cold", "warm"):
      done = subprocess.run(
          [sys.executable, "-c", _CACHED_COMPILE, cache, name,
           str(cfg.layers), str(cfg.d_model)],
          capture_output=True, text=True, check=True, env=dict(os.environ))
      out[kind] = json.loads(done.stdout.strip().splitlines()[-1])
  return out


# --- the suite ------------------------------------------------------------

def units_of_work(cfg: CostConfig) -> int:
  """One unit per compilation measured, per step-time run and per
  persistent-cache pair."""
  trees = 2 + len(cfg.sweep)
  compiles = len(cfg.optimizers) * cfg.repeats * (
      trees + (2 if cfg.train_step else 0))
  return (compiles + (len(cfg.optimizers) if cfg.step_times else 0)
          + (len(cfg.optimizers) if cfg.persistent_cache else 0))


def _warm_up(cfg: CostConfig) -> None:
  """Compiles every optimizer once on a one-layer tree, so that JAX's own
  first-use costs fall on none of the measurements."""
  params = init_params(1, 8)
  for name in cfg.optimizers:
    update_cost(name, params, scanned=False,
                compiler_options=measure.compiler_options(cfg.fast_compile))


def run(cfg: CostConfig, context: harness.Context = harness.Context()
        ) -> dict:
  progress = context.progress
  options = measure.compiler_options(cfg.fast_compile)
  if cfg.warm_up:
    _warm_up(cfg)
  batch = make_batch(cfg)
  trees = {"unscanned": (cfg.layers, False), "scanned": (cfg.layers, True)}
  trees.update({f"sweep_{n}": (n, False) for n in cfg.sweep})
  runs = {tree: {name: [] for name in cfg.optimizers} for tree in trees}
  steps = {name: [] for name in cfg.optimizers} if cfg.train_step else {}
  for _ in range(cfg.repeats):
    for tree, (layers, scanned) in trees.items():
      params = init_params(layers, cfg.d_model, scanned)
      for name in cfg.optimizers:
        context.describe(f"compile {name}, {tree}")
        runs[tree][name].append(update_cost(name, params, scanned, options))
        gc.collect()
        progress(1)
    if cfg.train_step:
      for scanned in (False, True):
        params = init_params(cfg.layers, cfg.d_model, scanned)
        for name in cfg.optimizers:
          steps[name].append(
              (scanned, train_step_cost(name, params, scanned, batch,
                                        options)))
          progress(1)
  result = {"config": dataclasses.asdict(cfg), "update": {}, "train_step": {},
            "state_bytes_per_param_byte": {}, "step_times": {},
            "persistent_cache": {}}
  for tree in trees:
    result["update"][tree] = {name: _median_runs(r)
                              for name, r in runs[tree].items()}
  for name, measured in steps.items():
    result["train_step"][name] = {
        ("scanned" if scanned else "unscanned"): _median_runs(
            [m for s, m in measured if s == scanned]) for scanned in (False, True)}
  for scanned in (False, True):
    params = init_params(cfg.layers, cfg.d_model, scanned)
    result["state_bytes_per_param_byte"]["scanned" if scanned
                                         else "unscanned"] = {
        name: state_bytes_ratio(name, params, scanned)
        for name in cfg.optimizers}
  if cfg.step_times:
    params = init_params(cfg.step_layers, cfg.d_model)
    batch = make_batch(cfg)
    for name in cfg.optimizers:
      context.describe(f"steps of {name}")
      result["step_times"][name] = step_times(name, cfg, params, False,
                                              batch)
      gc.collect()
      progress(1)
  if cfg.persistent_cache:
    result["persistent_cache"] = {}
    for name in cfg.optimizers:
      context.describe(f"persistent cache, {name}")
      result["persistent_cache"][name] = persistent_cache_cost(name, cfg)
      progress(1)
  result["compile_seconds"] = sum(
      m["total_s"] for per_tree in result["update"].values()
      for m in per_tree.values()) * cfg.repeats
  result["targets"] = targets(result, cfg)
  return result


def targets(result: dict, cfg: CostConfig) -> dict:
  """The compile targets against `optax.contrib.muon`, in process CPU
  seconds (on a shared machine the wall clock also counts other processes'
  time): each of FOAM, Shampoo, SOAP and ASGO within 1.5x Muon's trace +
  compile on the unscanned tree, and FOAM's growth over the layer sweep
  within 2.5x Muon's."""
  if "muon" not in cfg.optimizers:
    return {}
  unscanned = result["update"]["unscanned"]
  key = "total_cpu_s"
  out = {}
  for name in ("foam", "shampoo", "soap", "asgo"):
    if name in unscanned:
      ratio = unscanned[name][key] / unscanned["muon"][key]
      out[f"{name}_vs_muon"] = {
          "target": f"{name} compiles in ≤ 1.5x Muon's time",
          "measured": f"{ratio:.2f}x", "met": ratio <= 1.5}
  first, last = min(cfg.sweep), max(cfg.sweep)
  if first != last and "foam" in cfg.optimizers:
    sweep = lambda n, name: result["update"][f"sweep_{n}"][name][key]
    growth = {name: sweep(last, name) - sweep(first, name)
              for name in ("foam", "muon")}
    ratio = growth["foam"] / max(growth["muon"], 1e-9)
    out["foam_growth_vs_muon"] = {
        "target": f"FOAM's compile grows from {first} to {last} layers by "
                  "≤ 2.5x Muon's growth",
        "measured": f"{growth['foam']:.2f} s vs {growth['muon']:.2f} s "
                    f"({ratio:.2f}x)", "met": ratio <= 2.5}
  return out


def _fmt(seconds: Optional[float]) -> str:
  return "—" if seconds is None else f"{seconds:.2f}"


def markdown(raw: dict) -> str:
  cfg = raw["config"]
  names = cfg["optimizers"]
  update = raw["update"]
  lines = [
      f"GPT-2-small-shaped tree, {cfg['layers']} layers of d = "
      f"{cfg['d_model']}; `jax.jit(tx.update)` lowered and compiled ahead of "
      "time" + (" with `measure.fast_compile()`" if cfg.get("fast_compile")
                else "")
      + f"; medians of {cfg['repeats']} interleaved repeats. Seconds are "
      "wall (process CPU in brackets).", "",
      "| optimizer | trace + lower | compile | total | x Muon (CPU) | HLO "
      "instructions | fusions | conditionals | loops | state / params |",
      "|---|---|---|---|---|---|---|---|---|---|"]
  muon = update["unscanned"].get("muon", {}).get("total_cpu_s")
  for name in names:
    m = update["unscanned"][name]
    ratio = f"{m['total_cpu_s'] / muon:.1f}" if muon else "—"
    h = m["hlo"]
    lines.append(
        f"| {name} | {m['trace_lower_s']:.2f} ({m['trace_lower_cpu_s']:.2f}) "
        f"| {m['compile_s']:.2f} ({m['compile_cpu_s']:.2f}) | "
        f"{m['total_s']:.2f} ({m['total_cpu_s']:.2f}) | {ratio} | "
        f"{h['instructions']:.0f} | {h['fusions']:.0f} | "
        f"{h['conditionals']:.0f} | {h['loops']:.0f} | "
        f"{raw['state_bytes_per_param_byte']['unscanned'][name]:.2f} |")
  lines += ["", "Compile seconds, wall (CPU), of the update by tree and of "
            "a whole train step:", "",
            "| optimizer | scanned | "
            + " | ".join(f"{n} layers" for n in cfg["sweep"])
            + " | train step | train step, scanned |",
            "|---|---|" + "---|" * (len(cfg["sweep"]) + 2)]
  for name in names:
    cells = [f"{update['scanned'][name]['total_s']:.2f} "
             f"({update['scanned'][name]['total_cpu_s']:.2f})"]
    cells += [f"{update[f'sweep_{n}'][name]['total_s']:.2f} "
              f"({update[f'sweep_{n}'][name]['total_cpu_s']:.2f})"
              for n in cfg["sweep"]]
    for tree in ("unscanned", "scanned"):
      m = raw["train_step"].get(name, {}).get(tree)
      cells.append("—" if m is None else
                   f"{m['total_s']:.2f} ({m['total_cpu_s']:.2f})")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  if raw["step_times"]:
    lines += ["", f"Step times, seconds (median; steps of that kind in "
              f"brackets), on the {cfg['step_layers']}-layer tree with "
              f"check_frequency {cfg['check_frequency']}, over steps 1 to "
              f"{2 * cfg['check_frequency'] + 1}:", "",
              "| optimizer | without a check | check, no refresh | refresh "
              "| work of a refresh step |", "|---|---|---|---|---|"]
    for name in names:
      s = raw["step_times"][name]
      cell = lambda kind: ("—" if kind not in s else
                           f"{s[kind]['seconds']:.3f} ({s[kind]['steps']})")
      work = s.get("refresh", {}).get("work", {})
      note = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in work.items()
                       if k != "checks" and v) or "—"
      lines.append(f"| {name} | {cell('plain')} | {cell('check')} | "
                   f"{cell('refresh')} | {note} |")
  if raw.get("persistent_cache"):
    lines += ["", "A restarted run with JAX's persistent compilation cache "
              "(``jax.config.update('jax_compilation_cache_dir', path)``): "
              "trace + compile of the update, wall (CPU) seconds, in a "
              "process with an empty cache and in the next one:", "",
              "| optimizer | empty cache | warm cache |", "|---|---|---|"]
    for name, c in raw["persistent_cache"].items():
      lines.append(f"| {name} | {c['cold']['total_s']:.2f} "
                   f"({c['cold']['total_cpu_s']:.2f}) | "
                   f"{c['warm']['total_s']:.2f} ({c['warm']['total_cpu_s']:.2f}) |")
  if raw.get("targets"):
    lines += ["", report.targets_table(raw["targets"]).rstrip()]
  return "\n".join(lines)


def plot(raw: dict, out_dir: pathlib.Path) -> list:
  plt = report.pyplot()
  cfg = raw["config"]
  fig, ax = plt.subplots(figsize=(6, 4))
  for name in cfg["optimizers"]:
    ax.plot(cfg["sweep"], [raw["update"][f"sweep_{n}"][name]["total_s"]
                           for n in cfg["sweep"]], marker="o", label=name)
  ax.set_xlabel("layers (unscanned)")
  ax.set_ylabel("trace + compile of jit(update), s")
  ax.set_title(f"Compile time, GPT-2-small-shaped tree (d = {cfg['d_model']})")
  ax.grid(alpha=0.3)
  ax.legend()
  return [report.save_figure(fig, pathlib.Path(out_dir)
                             / "cost_compile_vs_layers.png")]


SUITE = harness.Suite(
    name="cost",
    help="compile seconds, optimized-HLO size, state bytes and step times of "
         "AdamW, Muon, FOAM, Shampoo, SOAP and ASGO on GPT-2-small-shaped "
         "trees (about 40 min on 2 CPU cores)",
    presets={"full": FULL, "quick": QUICK}, run=run,
    units_of_work=units_of_work, seeds=lambda cfg: [0], markdown=markdown,
    plot=plot, block=lambda cfg: BLOCK, out="bench_cost_out",
    unit="measurement",
    options=(
        harness.Option(("--layers",), "layers",
                       dict(type=int, help="layers of the unscanned and "
                            "scanned trees (default 12)")),
        harness.Option(("--cost-optimizers",), "optimizers",
                       dict(nargs="+", choices=OPTIMIZERS,
                            help="default: all six")),
        harness.Option(("--no-step-times",), "step_times",
                       dict(action="store_false",
                            help="skip the step-time part")),
    ))
