"""Where the time of a foam_optax optimizer step goes, on benchmark models.

For each model (the MLP, CNN and Transformer LM of `foam_optax.bench`) this
prints:

* the parts of one step, each jitted separately on the model's real factor
  shapes: factor statistics, the FOAM proxy, eigendecompositions, applying
  the preconditioner (with the cached inverse roots, as the library does, and
  through the eigenbasis for comparison), grafting and the momentum EMA;
* the model-based floor: AdamW's step plus the two products per block
  ``X_L · M · X_R`` that applying any Shampoo preconditioner must do;
* whole steps on a replayed gradient sequence (gradients recorded once from
  the model, so every optimizer sees the same statistics): amortized step,
  check steps, max/median with and without staggering, ``refresh_batching='map'``
  against ``'bucket'``, and Shampoo with ``check_frequency=1``;
* optimizer-state bytes per parameter byte;
* the compile time of the first ``update`` for a 12-layer, d_model 768
  Transformer parameter tree.

Every time is the median over repeats of a jitted call followed by
``block_until_ready``. Usage::

    python scripts/profile_step.py                 # print everything
    python scripts/profile_step.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import inspect
import os
import pathlib
import re
import statistics
import time
import types

# jaxlib's CPU eigendecomposition calls OpenBLAS, whose worker threads compete
# with XLA's own thread pool: on a 2-core machine one 256x256 `eigh` then takes
# 40-1700 ms instead of ~8 ms. One OpenBLAS thread (set before numpy and jax
# load it) unless the caller chose otherwise.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import foam_optax as fo
from foam_optax import controllers
from foam_optax import kernels as linalg
from foam_optax.bench.measure import call_timed, lower_and_compile, timed

MODELS = ("digits_mlp", "digits_cnn", "transformer_lm")
FREQ = 20            # check_frequency of every periodic optimizer here
LR = 1e-3
DEFAULT_REFRESH_BATCHING = inspect.signature(
    fo.scale_by_foam).parameters["refresh_batching"].default
# The paper's settings, which the parts below are timed with.
DEFAULTS = {name: p.default for name, p in
            inspect.signature(fo.scale_by_foam).parameters.items()}
MARKERS = ("<!-- perf:start -->", "<!-- perf:end -->")
APPLY = "apply X_L·M·X_R, cached X (2 products; the library)"
APPLY_EIGENBASIS = "apply through Q, D, eps instead (4 products)"
REBUILD = "rebuild X from Q, D, eps (all factors; on checks)"


def ms(seconds):
  return f"{1e3 * seconds:.2f}"


# ------------------------------------------------------------------ models


def load_model(name):
  from foam_optax.bench import workloads
  work = workloads.WORKLOADS[name]()
  return work, work.init_params(0)


def record_gradients(work, params, steps):
  """Gradients of `steps` AdamW training steps and the median grad time."""
  grad_fn = jax.jit(jax.grad(work.loss_fn))
  tx = optax.adamw(LR)
  batches = work.sample_batches(0, steps)
  batch = lambda i: jax.tree.map(lambda b: b[i], batches)

  @jax.jit
  def train(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state, grads = tx.init(params), []
  for i in range(steps):
    grads.append(grad_fn(params, batch(i)))
    params, state = train(params, state, grads[-1])
  return grads, timed(grad_fn, params, batch(0), repeats=20)


# --------------------------------------------------------------- optimizers


def optimizers():
  """name -> (transformation, steps timed one by one starting at step)."""
  def foam_like(make, **kw):
    return lambda: make(LR, check_frequency=FREQ, **kw)
  table = {"adamw": lambda: optax.adamw(LR)}
  for family, make in (("foam", fo.foam), ("shampoo", fo.shampoo)):
    for refresh_batching in ("map", "bucket"):
      for stagger in (True, False):
        table[f"{family} {refresh_batching}{'' if stagger else ' no-stagger'}"] = (
            foam_like(make, refresh_batching=refresh_batching, stagger=stagger))
  table["shampoo f=1"] = lambda: fo.shampoo(LR, check_frequency=1)
  return table


def prepare(tx, params, grads, first_timed):
  """Replays the recorded gradients through `update + apply_updates`.

  Returns the jitted step, its inputs for steps `first_timed`..len(grads)
  (1-based) and the number of fresh eigendecompositions during those steps.
  """

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state, inputs = tx.init(params), []
  for t, g in enumerate(grads, start=1):
    if t >= first_timed:
      inputs.append((params, state, g))
    params, state = step(params, state, g)
  return step, inputs, refreshes(state) - refreshes(inputs[0][1])


def interleaved_times(prepared, repeats):
  """name -> per-step median seconds; optimizers alternate in every round so
  that load from other processes hits them alike."""
  samples = {name: [[] for _ in inputs]
             for name, (_, inputs, _) in prepared.items()}
  for _ in range(repeats):
    for name, (step, inputs, _) in prepared.items():
      for i, args in enumerate(inputs):
        samples[name][i].append(call_timed(step, *args)[1])
  return {name: np.array([statistics.median(s) for s in per_step])
          for name, per_step in samples.items()}


def refreshes(state):
  try:
    return int(fo.stats(state)["eigendecompositions"])
  except ValueError:
    return 0   # not a foam_optax state


# -------------------------------------------------------------------- parts


def block_stacks(params, grads):
  """[(BlockClass, (count, m, n) gradient blocks)]: every block of one shape
  in the tree, stacked by the library's own step code."""
  # The state's layout is all that the stacking reads: its shapes suffice.
  state = jax.eval_shape(fo.scale_by_foam(check_frequency=FREQ).init, params)
  grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
  return fo.block_stacks(state, grads)


def part_timings(params, grads, repeats):
  """Seconds of each part of one step, summed over the model's blocks."""
  cfg = types.SimpleNamespace(**DEFAULTS)
  stacks = block_stacks(params, grads)
  grad_leaves = [g.astype(jnp.float32) for g in jax.tree.leaves(grads)]
  key = iter(jax.random.split(jax.random.key(0), 4 * len(stacks) + 1))

  def spd(k, m):
    x = jax.random.normal(next(key), (k, m, 2 * m))
    return jnp.einsum("kmn,kpn->kmp", x, x) / (2 * m)

  def factor(k, m):
    a = spd(k, m)
    d, q = jnp.linalg.eigh(a)
    return a, q, jnp.maximum(d, 0), jnp.full((k,), cfg.epsilon)

  data = []   # per block class: grads, left/right (A, Q, D, eps) or None
  for c, b in stacks:
    data.append((b, factor(c.count, c.rows) if c.left else None,
                 factor(c.count, c.cols) if c.right else None))
  facs = [f for _, l, r in data for f in (l, r) if f is not None]
  stored_x = lambda f: None if f is None else jax.vmap(
      linalg.inverse_root, (0, 0, 0, None))(f[1], f[2], f[3], cfg.exponent)

  def statistics_part(data):
    out = []
    for b, l, r in data:
      if l is not None:
        out.append(cfg.b2 * l[0] + (1 - cfg.b2) * linalg.gram_left(b))
      if r is not None:
        out.append(cfg.b2 * r[0] + (1 - cfg.b2) * linalg.gram_right(b))
    return out

  def proxy_part(facs):
    return [jax.vmap(controllers.staleness_proxy, (0, 0, 0, 0, None))(
        a, q, d, e, 2) for a, q, d, e in facs]

  def eigenbasis_part(data):
    out = []
    for b, l, r in data:
      rotated = linalg.rotate(b, None if l is None else l[1],
                              None if r is None else r[1])
      if l is not None:
        rotated = rotated * linalg.inverse_root_weights(
            l[2], l[3], cfg.exponent)[:, :, None]
      if r is not None:
        rotated = rotated * linalg.inverse_root_weights(
            r[2], r[3], cfg.exponent)[:, None, :]
      out.append(linalg.unrotate(rotated, None if l is None else l[1],
                                 None if r is None else r[1]))
    return out

  def stored_x_part(states):
    return [linalg.apply_inverse_roots(b, l, r) for b, l, r in states]

  def rebuild_x_part(facs):
    return [stored_x(f) for f in facs]

  def graft_part(grad_leaves, data):
    out = [linalg.adam_direction(jnp.zeros_like(g), g * g, g, 5, cfg.graft_b2,
                                 cfg.graft_eps) for g in grad_leaves]
    out += [linalg.match_norms(b, b * 0.5) for b, _, _ in data]
    return out

  def momentum_part(grad_leaves):
    return [(cfg.b1 * g + (1 - cfg.b1) * g) / (1 - cfg.b1 ** 5)
            for g in grad_leaves]

  states = [(b, stored_x(l), stored_x(r)) for b, l, r in data]
  run = lambda fn, *a: timed(jax.jit(fn), *a, repeats=repeats)
  return {
      "statistics": run(statistics_part, data),
      "proxy (all factors)": run(proxy_part, facs),
      # One stack at a time: concurrent LAPACK calls from XLA's threads
      # have deadlocked here with large factors.
      "eigh (all factors)": sum(
          run(jax.vmap(linalg.fresh_eigendecomposition), a) for a, *_ in facs),
      APPLY: run(stored_x_part, states),
      APPLY_EIGENBASIS: run(eigenbasis_part, data),
      REBUILD: run(rebuild_x_part, facs),
      "grafting (Adam direction + rescale)": run(graft_part, grad_leaves, data),
      "momentum EMA": run(momentum_part, grad_leaves),
  }, sum(f[0].shape[0] for f in facs)


# ------------------------------------------------------------------- memory


def state_bytes_ratio(tx, params):
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize
                            for x in jax.tree.leaves(tree))
  return nbytes(jax.eval_shape(tx.init, params)) / nbytes(params)


def memory(params):
  return {name: state_bytes_ratio(tx, params) for name, tx in (
      ("adamw", optax.adamw(LR)), ("foam", fo.foam(LR)),
      ("shampoo", fo.shampoo(LR)), ("soap", fo.soap(LR)))}


# ------------------------------------------------------------------ compile


def gpt_shapes(layers=12, d_model=768, vocab=8192):
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  tree = {"embed": spec(vocab, d_model), "final_norm": spec(d_model)}
  for i in range(layers):
    tree[f"layer{i}"] = {
        "qkv": spec(d_model, 3 * d_model), "out": spec(d_model, d_model),
        "up": spec(d_model, 4 * d_model), "down": spec(4 * d_model, d_model),
        "norm1": spec(d_model), "norm2": spec(d_model)}
  return tree


def layer_estimate(repeats):
  """Parts of one layer of the 12 x d_model 768 tree, on random gradients."""
  shapes = gpt_shapes(layers=1, vocab=8)["layer0"]
  keys = iter(jax.random.split(jax.random.key(1), len(shapes)))
  params = {k: jax.random.normal(next(keys), v.shape) for k, v in shapes.items()}
  return part_timings(params, params, repeats)


def compile_seconds(tx, shapes):
  """(trace + lower, XLA compile) seconds of the first jitted `update`."""
  return lower_and_compile(tx.update, shapes,
                           jax.eval_shape(tx.init, shapes), shapes)[1:]


# --------------------------------------------------------------------- main


def profile_model(name, repeats):
  work, params = load_model(name)
  grads, grad_time = record_gradients(work, params, 3 * FREQ)
  first_timed = 2 * FREQ   # one full check period, all factors checked once
  prepared = {
      opt: prepare(make(), params, grads[:6], 4) if opt == "shampoo f=1"
      else prepare(make(), params, grads, first_timed)
      for opt, make in optimizers().items()}
  times = interleaved_times(prepared, repeats)
  runs = {opt: (times[opt], prepared[opt][2]) for opt in prepared}
  parts, num_factors = part_timings(params, grads[-1], repeats)
  return dict(grad=grad_time, runs=runs, parts=parts, factors=num_factors,
              memory=memory(params), description=work.description,
              params=sum(x.size for x in jax.tree.leaves(params)))


NOTES = """
Notes on reading these figures:

* Times are medians over repeats on a replayed gradient sequence; whole-step
  comparisons alternate the optimizers in every round. "Training step" adds
  the model's median forward + backward time.
* On CPU, jaxlib's `eigh` calls OpenBLAS; with OpenBLAS's default threading
  its threads compete with XLA's pool, and one 256x256 `eigh` took 40-1700 ms
  instead of ~8 ms on the shared 2-core machine. The script sets
  `OPENBLAS_NUM_THREADS=1` unless the environment sets it; do the same when
  training on CPU.
* On these small models a step's cost is set by the number of small kernels
  (each costs microseconds on CPU) more than by arithmetic. Blocks of one
  shape are therefore stacked across the whole parameter tree (the
  Transformer's 42 factors live in 12 stacks), so statistics, inverse-root
  products and grafting run as one batched kernel per stack; with one stack
  per leaf instead, FOAM's optimizer step on the Transformer took ~4.4 ms
  against ~2.7 ms (same machine, interleaved runs).
* `refresh_batching`: 'map' runs the proxy and `eigh` only for the factors whose
  check step it is; 'bucket' runs them for the whole stack when any member
  is checked. The two are within noise here; 'map' stays the default because
  with staggering (opt-in, `stagger=True`) it never pays for unchecked stack
  members, which matters for large leaves cut into many same-sized blocks.
"""


def report(results, layer, compile_times, command):
  lines = [NOTES]
  out = lines.append
  for name, r in results.items():
    runs, parts, adam = r["runs"], r["parts"], r["runs"]["adamw"][0]
    grad, adam_step = r["grad"], float(np.mean(adam))
    out(f"\n### {name}: {r['description']}; {r['params']:,} parameters, "
        f"{r['factors']} factors\n")
    out(f"Gradient (forward + backward): {ms(grad)} ms. "
        f"AdamW update + apply: {ms(adam_step)} ms.\n")
    out("| part of a step (jitted alone, all blocks) | ms |")
    out("|---|---:|")
    for part, seconds in parts.items():
      out(f"| {part} | {ms(seconds)} |")
    foam_times, evds = runs[f"foam {DEFAULT_REFRESH_BATCHING}"]
    amortized = (parts["statistics"] + parts[APPLY]
                 + parts["grafting (Adam direction + rescale)"]
                 + parts["momentum EMA"]
                 + (parts["proxy (all factors)"] + parts[REBUILD]) / FREQ
                 + parts["eigh (all factors)"] * evds / r["factors"] / FREQ)
    floor = adam_step + parts[APPLY]
    out(f"\nSum of FOAM's parts, amortized with the {evds} refreshes seen in "
        f"the timed period ({r['factors']} factors, f={FREQ}): "
        f"{ms(amortized)} ms per step.")
    apply_x = parts[APPLY] + parts[REBUILD] / FREQ
    out(f"Applying cached X_L, X_R (rebuilt at most once per check) costs "
        f"{ms(apply_x)} ms per step against {ms(parts[APPLY_EIGENBASIS])} ms "
        "through the eigenbasis.")
    out(f"Model-based floor (AdamW step + X_L·M·X_R products): "
        f"optimizer step {ms(floor)} ms, training step {ms(grad + floor)} ms.\n")
    out(f"| optimizer (f={FREQ} unless noted) | mean step ms | median | max | "
        f"max/median | max/median of training step | check step "
        "(no stagger) ms | refreshes in period |")
    out("|---|---:|---:|---:|---:|---:|---:|---:|")
    for opt, (times, refreshed) in runs.items():
      train = times + grad
      check = ms(times[0]) if "no-stagger" in opt else ""
      refreshed = "" if opt == "adamw" else refreshed
      out(f"| {opt} | {ms(times.mean())} | {ms(np.median(times))} | "
          f"{ms(times.max())} | {times.max() / np.median(times):.2f} | "
          f"{train.max() / np.median(train):.2f} | {check} | {refreshed} |")
    for family in ("foam", "shampoo"):
      mean = {g: runs[f"{family} {g}"][0].mean() for g in ("map", "bucket")}
      check = {g: runs[f"{family} {g} no-stagger"][0][0]
               for g in ("map", "bucket")}
      out(f"\n{family}: map/bucket mean step {mean['map'] / mean['bucket']:.2f}, "
          f"check step without stagger {check['map'] / check['bucket']:.2f} "
          "(< 1: map faster).")
    foam_step = float(np.mean(foam_times))
    shampoo_1 = float(np.mean(runs["shampoo f=1"][0]))
    out("\n| target | measured | met |")
    out("|---|---:|:---:|")
    targets = (
        ("FOAM training step <= 1.3x AdamW's", (grad + foam_step) / (grad + adam_step), 1.3),
        ("FOAM training step <= 1.2x floor", (grad + foam_step) / (grad + floor), 1.2),
        ("FOAM max step <= 2x median (stagger on, training step)",
         (foam_times.max() + grad) / (np.median(foam_times) + grad), 2.0),
        ("Shampoo f=1 optimizer step / FOAM's >= 5",
         1 / (shampoo_1 / foam_step), 1 / 5))
    for label, value, bound in targets:
      shown = 1 / value if bound < 1 else value
      out(f"| {label} | {shown:.2f} | {'yes' if value <= bound else 'no'} |")
  out("\n### Optimizer state bytes per parameter byte\n")
  out("| model | " + " | ".join(next(iter(results.values()))["memory"]) + " |")
  out("|---|" + "---:|" * len(next(iter(results.values()))["memory"]))
  for name, r in results.items():
    out(f"| {name} | " + " | ".join(f"{v:.2f}" for v in r["memory"].values())
        + " |")
  out("\nFOAM and Shampoo cache X = Q diag((D+eps)^(-1/p)) Qᵀ beside Q and the "
      "statistic (rebuilt at the checks that change the basis, eigenvalues or "
      "damping): one more (m, m) array per factor, for two products per step "
      "instead of four (see the parts above). SOAP applies Q itself and "
      "stores no X.")
  if layer is not None:
    (parts, num_factors) = layer
    base = sum(parts[k] for k in (
        "statistics", APPLY, "grafting (Adam direction + rescale)",
        "momentum EMA"))
    proxy, eigh = parts["proxy (all factors)"], parts["eigh (all factors)"]
    rebuild = parts[REBUILD]
    worst = base + (proxy + eigh + rebuild) / FREQ
    out("\n### One layer of a 12 x d_model 768 Transformer (block_size 1024, "
        f"{num_factors} factors), parts on random gradients\n")
    out("| part | ms |")
    out("|---|---:|")
    for part, seconds in parts.items():
      out(f"| {part} | {ms(seconds)} |")
    out(f"\nShampoo f=1 optimizer step ≈ {ms(base + eigh + rebuild)} ms per "
        f"layer; FOAM (f={FREQ}) amortized ≈ "
        f"{ms(base + (proxy + rebuild) / FREQ)} ms without refreshes "
        f"and {ms(worst)} ms if every check refreshes: a speed-up of "
        f"{(base + eigh + rebuild) / worst:.1f}x at least.")
  if compile_times:
    out("\n### Compile time of the first `update`, 12 x d_model 768 "
        "Transformer tree (vocab 8192)\n")
    out("| optimizer | trace + lower s | XLA compile s |")
    out("|---|---:|---:|")
    for opt, (lower, comp) in compile_times.items():
      out(f"| {opt} | {lower:.1f} | {comp:.1f} |")
  out(f"\nMachine: {os.cpu_count()}-core CPU, jax {jax.__version__}, "
      f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}. "
      f"Command: `{command}`.")
  return "\n".join(lines)


def write_section(path, text):
  path = pathlib.Path(path)
  start, end = MARKERS
  block = f"{start}\n## Performance\n{text}\n{end}"
  if not path.exists():
    path.write_text(block + "\n")
    return
  old = path.read_text()
  pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
  new = pattern.sub(lambda _: block, old) if pattern.search(old) else (
      old.rstrip("\n") + "\n\n" + block + "\n")
  path.write_text(new)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="+", default=list(MODELS))
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--skip-large", action="store_true",
                      help="skip the 12-layer d_model 768 estimates")
  parser.add_argument("--write", metavar="BENCHMARKS.md")
  args = parser.parse_args()
  defaults = vars(parser.parse_args([]))
  command = " ".join(["python scripts/profile_step.py"] + [
      f"--{k.replace('_', '-')}" + ("" if v is True else " " + (
          " ".join(v) if isinstance(v, list) else str(v)))
      for k, v in vars(args).items() if v != defaults[k]])
  results = {}
  for name in args.models:
    start = time.perf_counter()
    results[name] = profile_model(name, args.repeats)
    print(f"[{name} profiled in {time.perf_counter() - start:.0f} s]")
  layer = None if args.skip_large else layer_estimate(repeats=2)
  compile_times = {}
  if not args.skip_large:
    for opt, tx in (("adamw", optax.adamw(LR)), ("foam", fo.foam(LR))):
      compile_times[opt] = compile_seconds(tx, gpt_shapes())
  text = report(results, layer, compile_times, command)
  print(text)
  if args.write:
    write_section(args.write, text)


if __name__ == "__main__":
  main()
