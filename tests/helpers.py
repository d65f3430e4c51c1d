"""Helpers shared by the test modules: random gradients, the optimizer's
core state inside any optax state, and the step-by-step comparison of
`scale_by_foam`/`scale_by_soap` with the float64 reference (`reference.py`).
"""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import foam_optax as fo
from foam_optax.bench import measure
from foam_optax._src.state import block_classes
import reference


def gaussian_like(tree, seed, scale=1.0, draw_dtype=None):
  """Standard normal leaves shaped like `tree`'s, times `scale`: one key per
  leaf split from ``PRNGKey(seed)``, drawn in `draw_dtype` (default: each
  leaf's dtype) and cast to the leaf's dtype."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return treedef.unflatten([
      (scale * jax.random.normal(k, x.shape, draw_dtype or x.dtype)).astype(
          x.dtype) for k, x in zip(keys, leaves)])


def normal_like(tree, seed, scale=1.0):
  """Leaves shaped like `tree`'s: standard normal times `scale`, in each
  leaf's dtype, drawn in NumPy (`jax.random` would compile a program per
  shape and dtype)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray((scale * rng.standard_normal(x.shape))
                            .astype(x.dtype)), tree)


def all_finite(tree):
  """Every floating leaf of `tree` is finite. Checked in NumPy: an eager
  jnp check would compile a program per shape and dtype."""
  return all(bool(np.all(np.isfinite(np.asarray(x, np.float64))))
             for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.inexact))


def core_state(state):
  """The one `ScaleByFoamState` inside an alias or wrapper state."""
  found = fo.find_states(state)
  assert len(found) == 1
  return found[0]


def run_steps(tx, params, steps, seed=0, compiler_options=None):
  """Jitted updates on random gradients (`gaussian_like`, drawn in float32);
  the last updates and the state. `compiler_options` go to `jax.jit` (e.g.
  `FAST_COMPILE`)."""
  update = jax.jit(tx.update, compiler_options=compiler_options)
  state = tx.init(params)
  for i in range(steps):
    updates, state = update(
        gaussian_like(params, seed + i, draw_dtype=jnp.float32), state, params)
  return updates, state


def leaf_states(state):
  """The per-leaf states of every `ScaleByFoamState` inside `state`."""
  return [ls for found in fo.find_states(state) for ls in found.leaf_states()]


def defaults(fn):
  """{argument: default} of `fn`'s signature."""
  return {name: p.default for name, p in inspect.signature(fn).parameters.items()
          if p.default is not inspect.Parameter.empty}


def first_steps(mu, sigma=1.0, m=8, draws=20000, **options):
  """The mean first-step update of `scale_by_bias_corrected_adam` over
  `draws` coordinates whose microbatch gradients are N(μ, σ²)."""
  rng = np.random.default_rng(0)
  micro = (mu + sigma * rng.standard_normal((m, draws))).astype(np.float32)
  tx = fo.scale_by_bias_corrected_adam(**options)
  params = {"w": jnp.zeros((draws,))}
  update, _ = tx.update({"w": jnp.asarray(micro.mean(0))}, tx.init(params),
                        params, microbatch_grads={"w": jnp.asarray(micro)})
  return float(jnp.mean(update["w"]))


# A small MLP's gradients and its 8 microbatches' gradients.

MB_PARAMS = {"w": jnp.ones((6, 4)) / 3, "b": jnp.zeros(4)}


def microbatched(seed):
  """(grads, per-microbatch grads) of 8 microbatches of 4 examples."""
  batch = jax.random.normal(jax.random.PRNGKey(seed), (32, 6))
  loss_fn = lambda p, x: jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2)
  _, grads, micro = fo.microbatch_grads(loss_fn, MB_PARAMS, batch, 8)
  return grads, micro


# The step-by-step comparison with the float64 reference.

# (4,4) square; (2,3,4) -> (6,4) tall, row blocks 4+2; (2,1,2,2,3) ->
# (4,6) wide (rank 4 with a size-1 dim), column blocks 4+2; (3,5) wide,
# column blocks 4+1 (the 3x1 block has no right factor); (1,5) a vector
# (blocks 1x4 and 1x1 with precondition_1d); () a scalar.
SHAPES = [(4, 4), (2, 3, 4), (2, 1, 2, 2, 3), (3, 5), (1, 5), ()]
STEPS = 16
JUMP = 10   # the gradient distribution changes here: bases go stale

# Small damping range so that FOAM's decisions depend on the proxy:
# reuse while the statistics are stationary, refresh after the jump.
BASE = dict(block_size=4, b1=0.9, b2=0.9, epsilon=1e-3, max_epsilon=3e-3,
            threshold=0.5, check_frequency=2, start_preconditioning_step=3,
            residual_tol=0.1)


def make_grads(shapes=SHAPES, steps=STEPS, jump=JUMP, seed=0, sigma=0.3):
  """Mean + noise, the mean switching at `jump`."""
  rng = np.random.default_rng(seed)
  means = [[rng.standard_normal(s) for s in shapes] for _ in range(2)]
  return [[means[int(t >= jump)][i] + sigma * rng.standard_normal(s)
           for i, s in enumerate(shapes)] for t in range(1, steps + 1)]


def factor_keys(core):
  """Per factor stack of a ScaleByFoamState, in stacking order: the
  FactorStack and the keys (leaf, row0, col0, side) of its factors, keyed
  like `reference.Reference.factors()`."""
  layouts = list(core.layouts)
  stacks = []
  for cls, gs in zip(block_classes(core), core.classes):
    for side, fs in (("L", gs.left), ("R", gs.right)):
      if fs is None:
        continue
      keys = []
      for i, j in cls.members:
        g = layouts[i].groups[j]
        for k in range(g.count):
          bi, bj = divmod(k, g.num_col_blocks)
          keys.append((i, g.row_start + bi * g.rows,
                       g.col_start + bj * g.cols, side))
      stacks.append((fs, keys))
  return stacks


def factor_arrays(core):
  """Per-factor (keys, damping, refreshes, checks, proxy) of a
  ScaleByFoamState, keyed like `reference.Reference.factors()`."""
  stacks = factor_keys(core)
  keys = [k for _, ks in stacks for k in ks]
  arrays = {name: jnp.concatenate([getattr(fs, name) for fs, _ in stacks])
            if stacks else jnp.zeros((0,))
            for name in ("damping", "refreshes", "checks", "proxy")}
  return keys, arrays


# For programs that run once or a few steps on small arrays: less time spent
# optimising their machine code.
FAST_COMPILE = measure.fast_compile()


def run_library(tx, grads, dtype):
  """All steps of `tx` in one jitted scan. Returns per-step updates (a list
  of arrays with a leading step axis), per-factor arrays, stats and keys."""
  n = len(grads[0])
  params = [jnp.zeros(np.shape(g), dtype) for g in grads[0]]
  stacked = [jnp.asarray(np.stack([g[i] for g in grads]), dtype)
             for i in range(n)]
  keys = []

  def body(state, g):
    updates, state = tx.update(g, state)
    k, arrays = factor_arrays(state)
    keys[:] = k
    return state, (updates, arrays, fo.stats(state))

  state = tx.init(params)
  final, (updates, arrays, stats) = jax.jit(
      lambda s, g: lax.scan(body, s, g), compiler_options=FAST_COMPILE)(
          state, stacked)
  return final, [np.asarray(u, np.float64) for u in updates], jax.tree.map(
      np.asarray, arrays), jax.tree.map(np.asarray, stats), list(keys)


def run_reference(shapes, grads, **kwargs):
  ref = reference.Reference(shapes, **kwargs)
  facs = ref.factors()
  keys = list(facs)
  updates, per_factor, stats = [], [], []
  for g in grads:
    updates.append(ref.update(g))
    per_factor.append({
        "damping": np.array([facs[k].eps for k in keys]),
        "refreshes": np.array([facs[k].refreshes for k in keys]),
        "checks": np.array([facs[k].checks for k in keys]),
        "proxy": np.array([facs[k].proxy for k in keys])})
    stats.append(ref.stats())
  arrays = {k: np.stack([p[k] for p in per_factor]) for k in per_factor[0]}
  margin = min((m for f in facs.values() for m in f.margins), default=math.inf)
  return ref, updates, arrays, stats, keys, margin


def compare(shapes, kwargs, *, refresh_batching="map", x64=True, rtol=1e-7,
            atol=1e-9, grads=None, soap=None):
  """Runs library and reference; asserts agreement; returns the reference
  figures for further assertions."""
  grads = make_grads(shapes) if grads is None else grads
  with jax.enable_x64(x64):
    if soap is None:
      tx = fo.scale_by_foam(stagger=False, refresh_batching=refresh_batching,
                            **kwargs)
    else:
      tx = fo.scale_by_soap(stagger=False, refresh_batching=refresh_batching,
                            **soap)
    dtype = jnp.float64 if x64 else jnp.float32
    _, lib_u, lib_f, lib_s, lib_keys = run_library(tx, grads, dtype)
  ref, ref_u, ref_f, ref_s, ref_keys, margin = run_reference(
      shapes, grads, **kwargs)
  assert sorted(lib_keys) == sorted(ref_keys)
  perm = [lib_keys.index(k) for k in ref_keys]
  for name in ("refreshes", "checks"):
    np.testing.assert_array_equal(lib_f[name][:, perm], ref_f[name],
                                  err_msg=name)
  np.testing.assert_allclose(lib_f["damping"][:, perm], ref_f["damping"],
                             rtol=max(rtol, 1e-6) if x64 else 1e-3,
                             err_msg="damping")
  np.testing.assert_allclose(lib_f["proxy"][:, perm], ref_f["proxy"],
                             rtol=1e-5 if x64 else 1e-2, atol=1e-12,
                             err_msg="proxy")
  np.testing.assert_array_equal(
      lib_s["eigendecompositions"],
      [s["eigendecompositions"] for s in ref_s])
  np.testing.assert_array_equal(lib_s["checks"], [s["checks"] for s in ref_s])
  # The damping and proxy summaries of `fo.stats`, step by step.
  for name in ("damping_max", "damping_mean"):
    np.testing.assert_allclose(lib_s[name], [s[name] for s in ref_s],
                               rtol=max(rtol, 1e-6) if x64 else 1e-3,
                               err_msg=name)
  np.testing.assert_allclose(lib_s["proxy_max"],
                             [s["proxy_max"] for s in ref_s],
                             rtol=1e-5 if x64 else 1e-2, atol=1e-12,
                             err_msg="proxy_max")
  for t in range(len(grads)):
    for i, shape in enumerate(shapes):
      assert lib_u[i][t].shape == tuple(shape)
      np.testing.assert_allclose(
          lib_u[i][t], ref_u[t][i], rtol=rtol, atol=atol,
          err_msg=f"step {t + 1}, leaf {i} {shape}")
  return ref, ref_f, margin


def branches(ref_f):
  """(reuses, refreshes after the first) summed over factors."""
  checks, refreshes = ref_f["checks"][-1], ref_f["refreshes"][-1]
  reuses = int(np.sum(checks - refreshes))
  later = int(np.sum(refreshes - (checks > 0)))
  return reuses, later
