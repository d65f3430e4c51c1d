"""foam_optax on a device mesh: agreement, eigendecompositions per device,
memory and step time against one device.

Runs on whatever devices JAX sees; on a CPU-only machine it asks XLA for 8
host devices (``--devices``) before JAX starts. Prints a Markdown report and,
with ``--json PATH``, writes the figures.

    python scripts/bench_devices.py                 # the full report
    python scripts/bench_devices.py --quick         # the checks only (CI)

``--quick`` runs agreement, work, relayout and memory only, in 12 steps, and
agreement on five (optimizer, mesh, parameter layout) rows that together
cover every optimizer, every mesh and both layouts: four of `QUICK` and the
work section's run.

Sections:

* **agreement**: 25 steps of `foam`, `shampoo` and `soap` on a small model
  whose block stacks do not divide by the device count (padding and placement
  by cost are exercised), on `jax.make_mesh` (Explicit axes, with and without
  `jax.set_mesh`), `jax.sharding.Mesh` (Auto axes) and a 2-D data x model
  mesh, with replicated and FSDP-style (row-sharded) parameters, against the
  same run on one device;
* **sensitivity**: how far 25 steps move when a single update is perturbed by
  1e-6 relative, at ε0 = 1e-9 (the paper's) and 1e-5: the scale of
  disagreement that reordered float32 sums alone can cause;
* **work**: `eigh` calls executed on each device at every check step of a
  FOAM run, against the number of factors that needed one; the run's
  agreement with one device is the agreement row `foam_low_cap`;
* **relayout**: that run's one-device state moved onto the mesh with
  `fo.relayout` (and back), then 5 more steps on the mesh and on one device;
* **memory**: optimizer-state bytes per device against one device, for a
  model whose stacks divide by the device count;
* **speed**: step time of Shampoo with ``check_frequency=1`` (every factor
  refreshed every step) on four 256 x 256 layers in 64 x 64 blocks (64
  blocks per stack), on one device and on the mesh.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def _parse(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=8,
                      help="host devices to ask for on CPU (default 8)")
  parser.add_argument("--quick", action="store_true",
                      help="agreement (five rows), work and memory only, in "
                      "12 steps (no timing)")
  parser.add_argument("--steps", type=int,
                      help="steps per run (default 25, 12 with --quick)")
  parser.add_argument("--repeats", type=int, default=20,
                      help="timed steps per configuration")
  parser.add_argument("--speed-only", action="store_true",
                      help="the step-time section alone")
  parser.add_argument("--json", help="write the figures to this file")
  return parser.parse_args(argv)


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and "jax" not in sys.modules:
  os.environ.setdefault(
      "XLA_FLAGS", f"--xla_force_host_platform_device_count={ARGS.devices}")
  # JAX's CPU eigh on OpenBLAS's default threads is 10-100x slower on a
  # busy machine (BENCHMARKS.md, "OpenBLAS threads on CPU").
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

import foam_optax as fo  # noqa: E402
from foam_optax.bench import measure  # noqa: E402

# ---------------------------------------------------------------- the model


def _normal(key, shape):
  """`jax.random.normal(key, shape)`, the same values drawn flat: XLA
  compiles a draw of three or four axes several times slower."""
  return jax.random.normal(key, (math.prod(shape),)).reshape(shape)


def small_params(key):
  """Stacks of 18, 5 and 1 blocks at block_size 16: none divides by 8."""
  k = jax.random.split(key, 3)
  return {"w0": jax.random.normal(k[0], (64, 48)) / 8,
          "b0": jnp.zeros((48,)),
          "w1": jax.random.normal(k[1], (48, 40)) / 7,
          "conv": _normal(k[2], (3, 3, 4, 8)) / 6}


def small_loss(p, batch):
  x, y = batch
  h = jnp.tanh(x @ p["w0"] + p["b0"])
  return jnp.mean((h @ p["w1"] - y) ** 2) + 0.1 * jnp.sum(
      jnp.sin(p["conv"]) ** 2)


def small_batches(steps):
  xs = _normal(jax.random.PRNGKey(1), (steps, 32, 64))
  ys = _normal(jax.random.PRNGKey(2), (steps, 32, 40))
  return xs, ys


def _gathered(tree):
  """Parameters used whole by the model (FSDP gathers them per layer)."""
  def whole(a):
    mesh = jax.typeof(a).sharding.mesh
    if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
      return a
    with jax.sharding.use_abstract_mesh(mesh):
      return jax.sharding.reshard(a, P())
  return jax.tree.map(whole, tree)


def make_step(tx, loss):
  def step(params, state, batch):
    grads = jax.grad(lambda p: loss(_gathered(p), batch))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


# ------------------------------------------------------------ placements


def _param_shardings(params, mesh, layout):
  if layout == "replicated":
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
  # FSDP-style: every matrix split by rows over the first mesh axis.
  axis = mesh.axis_names[0]
  size = mesh.shape[axis]

  def spec(a):
    if a.ndim >= 2 and a.shape[0] % size == 0:
      return NamedSharding(mesh, P(axis))
    if a.ndim >= 2 and a.shape[-1] % size == 0:
      return NamedSharding(mesh, P(*([None] * (a.ndim - 1)), axis))
    return NamedSharding(mesh, P())
  return jax.tree.map(spec, params)


def run_sharded(tx, loss, params, batches, mesh, layout, use_set_mesh):
  """Trains on `mesh` following the documented recipe; returns the final
  parameters (on host), the state's counters and whether the state kept its
  shardings."""
  import contextlib
  context = jax.set_mesh(mesh) if use_set_mesh else contextlib.nullcontext()
  with context:
    p_shard = _param_shardings(params, mesh, layout)
    params = jax.device_put(params, p_shard)
    s_shard = fo.state_sharding(jax.eval_shape(tx.init, params), params,
                                p_shard)
    state = jax.jit(tx.init, out_shardings=s_shard)(params)
    step = jax.jit(make_step(tx, loss), in_shardings=(p_shard, s_shard, None),
                   out_shardings=(p_shard, s_shard))
    params, state = train(step, params, state, batches)
    kept = _kept(state, s_shard)
    stats = _counters(state)
  return jax.device_get(params), stats, kept


def on_one_device(tx, params):
  """`params` and `tx`'s initial state, committed to the first device."""
  device = jax.devices()[0]
  params = jax.device_put(params, device)
  # Jitted: one program instead of dozens of eager operations; committed,
  # like the step's results, so that the step compiles once.
  return params, jax.device_put(jax.jit(tx.init)(params), device)


def run_single(tx, loss, params, batches):
  params, state = train(jax.jit(make_step(tx, loss)),
                        *on_one_device(tx, params), batches)
  return jax.device_get(params), _counters(state)


def train(step, params, state, batches, steps=None):
  """`steps` steps (default: one per batch) of `step`, on `batches`."""
  for i in range(batches[0].shape[0] if steps is None else steps):
    # Each step completes before the next: see docs/multi_device.md.
    params, state = jax.block_until_ready(
        step(params, state, (batches[0][i], batches[1][i])))
  return params, state


def _counters(state):
  return {k: float(v) for k, v in jax.jit(fo.stats)(state).items()}


def _kept(state, shardings):
  """Whether every array of `state` is placed as `shardings` says."""
  return all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(
      jax.tree.leaves(state), jax.tree.leaves(shardings)))


def _max_relative(a, b, start):
  moved = max(float(np.max(np.abs(np.asarray(x) - np.asarray(s))))
              for x, s in zip(jax.tree.leaves(a), jax.tree.leaves(start)))
  diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return diff, moved


def _row(name, mesh_name, layout, final, stats, kept, single, single_stats,
         start):
  """A row of the agreement table: the run on the mesh (`final`, `stats`)
  against the one on one device (`single`, `single_stats`)."""
  diff, moved = _max_relative(final, single, start)
  return {"optimizer": name, "mesh": mesh_name, "params": layout,
          "max_abs_diff": diff, "moved": moved, "relative_diff": diff / moved,
          # ASGO's roots are iterated, counted as inverse roots.
          "refreshes": stats["eigendecompositions"] + stats["inverse_roots"],
          "refreshes_1": single_stats["eigendecompositions"]
                         + single_stats["inverse_roots"],
          "sharding_kept": kept}


# Unstaggered checks: staggered check phases depend on the layout (they are
# interleaved across devices), so only the plain schedule is the same on one
# device and on a mesh.
OPTIMIZERS = {
    "foam": lambda eps: fo.foam(2e-2, epsilon=eps, max_epsilon=30 * eps,
                                block_size=16, check_frequency=3,
                                stagger=False),
    "shampoo": lambda eps: fo.shampoo(2e-2, epsilon=eps, block_size=16,
                                      check_frequency=3, stagger=False),
    "soap": lambda eps: fo.soap(3e-3, block_size=16, check_frequency=3,
                                stagger=False),
    "foam_one_sided": lambda eps: fo.foam(
        2e-2, epsilon=eps, max_epsilon=30 * eps, block_size=16,
        check_frequency=3, stagger=False, one_sided=True),
    "asgo": lambda eps: fo.asgo(2e-2, block_size=16),
}

# (optimizer, mesh, parameter layout) run by --quick: with the work
# section's run (`foam_low_cap`, make_mesh, replicated), each optimizer once,
# each mesh and each layout at least once (every compiled step costs seconds).
QUICK = {("shampoo", "make_mesh_no_set_mesh", "fsdp"),
         ("soap", "make_mesh", "replicated"),
         ("foam_one_sided", "make_mesh_2d", "replicated"),
         ("asgo", "Mesh_auto", "replicated")}


def meshes(n):
  devices = np.array(jax.devices()[:n])
  out = {"make_mesh": (jax.make_mesh((n,), ("data",)), True),
         "make_mesh_no_set_mesh": (jax.make_mesh((n,), ("data",)), False),
         "Mesh_auto": (Mesh(devices, ("data",)), True)}
  if n % 2 == 0 and n > 2:
    out["make_mesh_2d"] = (jax.make_mesh((n // 2, 2), ("data", "model")),
                           True)
  return out


def agreement(steps, quick, epsilon=1e-5):
  params = small_params(jax.random.PRNGKey(0))
  batches = small_batches(steps)
  rows = []
  n = jax.device_count()
  for name, make in OPTIMIZERS.items():
    runs = [(mesh_name, mesh, use_set_mesh, layout)
            for mesh_name, (mesh, use_set_mesh) in meshes(n).items()
            for layout in ("replicated", "fsdp")
            if not quick or (name, mesh_name, layout) in QUICK]
    if not runs:
      continue
    single, single_stats = run_single(make(epsilon), small_loss, params,
                                      batches)
    for mesh_name, mesh, use_set_mesh, layout in runs:
      final, stats, kept = run_sharded(make(epsilon), small_loss, params,
                                       batches, mesh, layout, use_set_mesh)
      rows.append(_row(name, mesh_name, layout, final, stats, kept, single,
                       single_stats, params))
  return rows


def sensitivity(steps):
  """Parameter change after `steps` steps from a 1e-6 relative perturbation
  of the first preconditioned update, on one device."""
  params = small_params(jax.random.PRNGKey(0))
  batches = small_batches(steps)
  out = {}
  for epsilon in (1e-9, 1e-5):
    tx = OPTIMIZERS["foam"](epsilon)
    finals = []
    for scale in (1.0, 1.0 + 1e-6):
      p, s = params, tx.init(params)
      step = jax.jit(make_step(tx, small_loss))
      for i in range(steps):
        new_p, s = step(p, s, (batches[0][i], batches[1][i]))
        if i == 3:   # the first preconditioned update (s0 = 3)
          new_p = jax.tree.map(lambda a, b: b + scale * (a - b), new_p, p)
        p = new_p
      finals.append(p)
    diff, moved = _max_relative(finals[0], finals[1], params)
    out[f"{epsilon:g}"] = {"max_abs_diff": diff, "moved": moved}
  return out


# ------------------------------------------------------------------ work


def low_cap_foam():
  """FOAM with a low cap on ε, so that later checks refresh some factors and
  keep others."""
  return fo.foam(2e-2, epsilon=1e-5, max_epsilon=2e-5, block_size=16,
                 check_frequency=3, stagger=False)


def work_per_device(steps, continued=5):
  """A run of `low_cap_foam` on the mesh as in the plain recipe
  (`jax.make_mesh` under `jax.set_mesh`, replicated parameters, the step
  jitted without shardings) and on one device, by the same jitted step.

  Returns the `eigh` calls executed on each device at each step that needed
  some, the run's agreement row, and the relayout figures: the one-device
  state moved onto the mesh with `fo.relayout` (and back), then `continued`
  more steps on the mesh and on one device.
  """
  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("data",))
  calls = []

  def counting_eigh(matrix):
    device = lax.axis_index("data")
    jax.debug.callback(lambda d: calls.append(int(d)), device)
    return jnp.linalg.eigh(matrix)

  start = small_params(jax.random.PRNGKey(0))
  batches = small_batches(steps)
  tx = low_cap_foam()
  step = jax.jit(make_step(tx, small_loss))
  p1, s1 = train(step, *on_one_device(tx, start), batches)
  one_stats = _counters(s1)
  with fo.kernels.using_eigh(counting_eigh):
    with jax.set_mesh(mesh):
      p_shard = _param_shardings(start, mesh, "replicated")
      params = jax.device_put(start, p_shard)
      s_shard = fo.state_sharding(jax.eval_shape(tx.init, params), params,
                                  p_shard)
      state = jax.jit(tx.init, out_shardings=s_shard)(params)
      stats = jax.jit(fo.stats)
      rows = []
      for i in range(steps):
        before = int(stats(state)["eigendecompositions"])
        calls.clear()
        params, state = jax.block_until_ready(
            step(params, state, (batches[0][i], batches[1][i])))
        jax.effects_barrier()
        needed = int(stats(state)["eigendecompositions"]) - before
        per_device = np.bincount(np.asarray(calls, int), minlength=n)
        if needed or len(calls):
          rows.append({"step": i + 1, "needed": needed,
                       "per_device": per_device.tolist(),
                       "bound": -(-needed // n)})
      row = _row("foam_low_cap", "make_mesh", "replicated",
                 jax.device_get(params), _counters(state),
                 _kept(state, s_shard), jax.device_get(p1), one_stats, start)
      # The one-device state on the mesh, placed as documented.
      moved = jax.device_put(fo.relayout(s1, state), s_shard)
      moved_stats = _counters(moved)
      p8, s8 = train(step, jax.device_put(p1, p_shard), moved, batches,
                     continued)
      kept = _kept(s8, s_shard)
  is_stack = lambda x: isinstance(x, fo.FactorStack)
  relayout = {
      "padded_stacks": [f.statistic.shape[0] for f in jax.tree.leaves(
          state, is_leaf=is_stack) if is_stack(f)],
      "roundtrip_exact": all(
          np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
              jax.tree.leaves(fo.relayout(moved, s1)), jax.tree.leaves(s1))),
      # Counts exactly; means to rounding (sums over padded stacks add in
      # another order).
      "stats_equal": all(abs(moved_stats[k] - one_stats[k])
                         <= 1e-6 * abs(one_stats[k]) for k in one_stats),
      "kept_without_out_shardings": kept, "steps": continued}
  p1, _ = train(step, p1, s1, batches, continued)
  relayout["continued_diff"], relayout["continued_moved"] = _max_relative(
      jax.device_get(p8), jax.device_get(p1), start)
  return rows, row, relayout


# ---------------------------------------------------------------- memory


def _bytes_on(tree, device):
  return sum(sh.data.nbytes for a in jax.tree.leaves(tree)
             for sh in a.addressable_shards if sh.device == device)


def wide_params(key, width=256, layers=4):
  keys = jax.random.split(key, layers)
  return {f"w{i}": jax.random.normal(k, (width, width)) / math.sqrt(width)
          for i, k in enumerate(keys)}


def wide_loss(p, batch):
  x, y = batch
  for i in range(len(p)):
    x = jnp.tanh(x @ p[f"w{i}"])
  return jnp.mean((x - y) ** 2)


def memory():
  n = jax.device_count()
  mesh = jax.make_mesh((n,), ("data",))
  params = wide_params(jax.random.PRNGKey(0))
  out = {}
  for name, tx in (("foam", fo.foam(1e-3, block_size=64)),
                   ("soap", fo.soap(1e-3, block_size=64))):
    # On one device: every byte of the state.
    single = sum(x.size * x.dtype.itemsize
                 for x in jax.tree.leaves(jax.eval_shape(tx.init, params)))
    with jax.set_mesh(mesh):
      p_shard = _param_shardings(params, mesh, "replicated")
      placed = jax.device_put(params, p_shard)
      s_shard = fo.state_sharding(jax.eval_shape(tx.init, placed), placed,
                                  p_shard)
      sharded = jax.jit(tx.init, out_shardings=s_shard)(placed)
    per_device = [_bytes_on(sharded, d) for d in jax.devices()]
    out[name] = {"bytes_1": single, "bytes_per_device": per_device,
                 "ratio": max(per_device) / single}
  return out


# ----------------------------------------------------------------- speed


def _time(step, params, state, batch, repeats):
  """Median milliseconds of `step`, each call going on from the last."""
  carry = [params, state]

  def advance():
    carry[:] = step(*carry, batch)
    return carry

  return 1e3 * measure.timed(advance, repeats=repeats)


def speed(repeats):
  n = jax.device_count()
  params = wide_params(jax.random.PRNGKey(0))
  batch = (jax.random.normal(jax.random.PRNGKey(1), (64, 256)),
           jax.random.normal(jax.random.PRNGKey(2), (64, 256)))
  out = {}
  for name, tx in (
      ("shampoo_f1", fo.shampoo(1e-3, block_size=64, check_frequency=1)),
      ("foam", fo.foam(1e-3, block_size=64, check_frequency=5))):
    device = jax.devices()[0]
    p1 = jax.device_put(params, device)
    s1 = jax.device_put(tx.init(p1), device)
    one = _time(jax.jit(make_step(tx, wide_loss)), p1, s1, batch, repeats)
    mesh = jax.make_mesh((n,), ("data",))
    with jax.set_mesh(mesh):
      p_shard = _param_shardings(params, mesh, "replicated")
      pn = jax.device_put(params, p_shard)
      s_shard = fo.state_sharding(jax.eval_shape(tx.init, pn), pn, p_shard)
      sn = jax.jit(tx.init, out_shardings=s_shard)(pn)
      step = jax.jit(make_step(tx, wide_loss),
                     in_shardings=(p_shard, s_shard, None),
                     out_shardings=(p_shard, s_shard))
      many = _time(step, pn, sn, batch, repeats)
    out[name] = {"ms_1": one, f"ms_{n}": many, "ratio": many / one}
  return out


# ---------------------------------------------------------------- report


def main(argv=None):
  """The command line `argv` (default: the program's arguments)."""
  args = ARGS if argv is None else _parse(argv)
  n = jax.device_count()
  results = {"devices": n, "platform": jax.devices()[0].platform,
             "jax": jax.__version__}
  steps = args.steps or (12 if args.quick else 25)
  if not args.speed_only:
    results["agreement"] = agreement(steps, args.quick)
    results["work"], row, results["relayout"] = work_per_device(steps)
    results["agreement"].append(row)
    results["memory"] = memory()
  if not args.quick:
    results["sensitivity"] = sensitivity(steps)
    results["speed"] = speed(args.repeats)
  if args.speed_only:
    results["speed"] = speed(args.repeats)

  print(f"# foam_optax on {n} {results['platform']} devices "
        f"(JAX {jax.__version__})\n")
  if args.speed_only:
    results["agreement"], results["work"], results["memory"] = [], [], {}
    results["relayout"] = None
  print("## Agreement with one device after", steps, "steps\n")
  print("| optimizer | mesh | params | max abs diff | moved | relative |"
        " refreshes (mesh / one) | sharding kept |")
  print("|---|---|---|---|---|---|---|---|")
  for r in results["agreement"]:
    print(f"| {r['optimizer']} | {r['mesh']} | {r['params']} | "
          f"{r['max_abs_diff']:.2e} | {r['moved']:.3f} | "
          f"{r['relative_diff']:.2e} | {r['refreshes']:.0f} / "
          f"{r['refreshes_1']:.0f} | {r['sharding_kept']} |")
  print("\n## eigh calls per device on FOAM steps that refreshed\n")
  print("| step | needed | per device | ceil(needed/n) |")
  print("|---|---|---|---|")
  for r in results["work"]:
    print(f"| {r['step']} | {r['needed']} | {r['per_device']} | "
          f"{r['bound']} |")
  if results["relayout"]:
    r = results["relayout"]
    print("\n## A one-device state moved onto the mesh (`fo.relayout`)\n")
    print(f"Stacks of {r['padded_stacks']} slots; back on one device "
          f"bit-identical: {r['roundtrip_exact']}; counters equal: "
          f"{r['stats_equal']}. After {r['steps']} more steps the mesh run is "
          f"{r['continued_diff']:.2e} from one device's (parameters moved "
          f"{r['continued_moved']:.3f}); shardings kept: "
          f"{r['kept_without_out_shardings']}.")
  print("\n## Optimizer-state memory\n")
  print("| optimizer | one device (bytes) | per device on the mesh | ratio |")
  print("|---|---|---|---|")
  for name, r in results["memory"].items():
    print(f"| {name} | {r['bytes_1']} | {max(r['bytes_per_device'])} | "
          f"{r['ratio']:.3f} |")
  if "sensitivity" in results:
    print("\n## Sensitivity: one update perturbed by 1e-6 relative\n")
    print("| ε0 | parameter change after the run | parameter movement |")
    print("|---|---|---|")
    for eps, r in results["sensitivity"].items():
      print(f"| {eps} | {r['max_abs_diff']:.2e} | {r['moved']:.3f} |")
  if "speed" in results:
    print("\n## Step time (median ms)\n")
    print(f"| optimizer | one device | {n} devices | ratio |")
    print("|---|---|---|---|")
    for name, r in results["speed"].items():
      print(f"| {name} | {r['ms_1']:.1f} | {r[f'ms_{n}']:.1f} | "
            f"{r['ratio']:.2f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
