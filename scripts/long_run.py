"""Long run: FOAM on a Kronecker quadratic whose curvature keeps drifting.

Loss 0.5 ||A_t^(1/2) (W - W*) B^(1/2)||_F^2 with A_t = Q_t diag(a) Q_tᵀ, Q_t
rotating slowly (a Cayley rotation per step), plus gradient noise. Runs in
jitted `lax.scan` chunks and checks after every step that the damping stays
in [epsilon, max_epsilon] and that the parameters, the updates and every
array of the optimizer state are finite (see `state_finite`). Reports the
eigendecomposition rate next to stale Shampoo's. Exits non-zero on failure.

  python scripts/long_run.py --steps 20000
"""

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import foam_optax as fo

EPS, MAX_EPS = 1e-9, 3e-7


def problem(m=16, n=12, cond=1e3, drift=2e-3):
  ks, kb, kw = jax.random.split(jax.random.PRNGKey(0), 3)
  s = jax.random.normal(ks, (m, m))
  skew = drift * (s - s.T) / np.sqrt(m)
  eye = jnp.eye(m)
  cayley = jnp.linalg.solve(eye - skew / 2, eye + skew / 2)   # orthogonal
  a = jnp.logspace(0, np.log10(cond), m) / np.sqrt(cond)
  q, _ = jnp.linalg.qr(jax.random.normal(kb, (n, n)))
  b = (q * jnp.logspace(0, np.log10(cond), n)) @ q.T / np.sqrt(cond)
  target = jax.random.normal(kw, (m, n))
  return cayley, a, b, target


def _is_proxy(path):
  return bool(path) and getattr(path[-1], "name", None) == "proxy"


def state_finite(state):
  """Whether every floating array of the optimizer state is finite.

  `FactorStack.proxy` is left out: it is a write-only diagnostic (only
  `fo.stats` reads it back, the update never does), and the controllers are
  written so that a non-finite proxy just requests a fresh basis, so an
  overflowing proxy (a large drift divided by a damping as small as 1e-9) is
  not a broken state. It is counted separately (`proxy_nonfinite`).
  """
  ok = jnp.asarray(True)
  for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
    if jnp.issubdtype(x.dtype, jnp.inexact) and not _is_proxy(path):
      ok &= jnp.all(jnp.isfinite(x))
  return ok


def nonfinite_fields(state):
  """Names of the state's arrays holding a non-finite value (host side, in
  NumPy: op by op, JAX would compile a program per shape)."""
  return [jax.tree_util.keystr(path)
          for path, x in jax.tree_util.tree_flatten_with_path(state)[0]
          if jnp.issubdtype(x.dtype, jnp.inexact)
          and not np.isfinite(np.asarray(x)).all()]


def run(tx, steps, chunk=1000, lr=1e-2, seed=0):
  cayley, a, b, target = problem()
  params = {"w": jnp.zeros_like(target)}
  state = tx.init(params)
  rot = jnp.eye(a.shape[0])

  def loss(p, rot):
    d = p["w"] - target
    amat = (rot * a) @ rot.T
    return 0.5 * jnp.sum(d * (amat @ d @ b))

  @jax.jit
  def chunk_fn(carry, keys):
    def body(c, key):
      p, s, r = c
      g = jax.grad(loss)(p, r)
      g = {"w": g["w"] + 0.01 * jax.random.normal(key, g["w"].shape)}
      u, s = tx.update(g, s, p)
      p = jax.tree.map(lambda w, d: w - lr * d, p, u)
      r = cayley @ r
      dampings = jnp.concatenate([f.damping for f in jax.tree.leaves(
          s, is_leaf=lambda x: isinstance(x, fo.FactorStack))
          if isinstance(f, fo.FactorStack)])
      finite = (jnp.all(jnp.isfinite(p["w"])) & jnp.all(jnp.isfinite(u["w"]))
                & state_finite(s))
      return (p, s, r), (jnp.min(dampings), jnp.max(dampings), finite,
                         loss(p, r))
    return jax.lax.scan(body, carry, keys)

  carry = (params, state, rot)
  key = jax.random.PRNGKey(seed)
  lo, hi, all_finite, losses = np.inf, 0.0, True, []
  first_bad, bad_fields = None, []
  for start in range(0, steps, chunk):
    key, sub = jax.random.split(key)
    carry, (dmin, dmax, finite, chunk_loss) = chunk_fn(
        carry, jax.random.split(sub, min(chunk, steps - start)))
    lo, hi = min(lo, float(dmin.min())), max(hi, float(dmax.max()))
    finite = np.asarray(finite)
    # The per-step flags include the state after the chunk's last step.
    chunk_ok = bool(finite.all())
    if not chunk_ok and first_bad is None:
      first_bad = start + int(np.argmin(finite)) + 1
      bad_fields = nonfinite_fields(carry)
    all_finite &= chunk_ok
    losses.append(float(chunk_loss[-1]))
  stats = {k: float(v) for k, v in fo.stats(carry[1]).items()}
  proxy_nonfinite = sum(
      int(np.sum(~np.isfinite(x)))
      for path, x in jax.tree_util.tree_flatten_with_path(carry[1])[0]
      if _is_proxy(path))
  stats.update(damping_min=lo, damping_max=hi, finite=all_finite,
               first_nonfinite_step=first_bad, nonfinite_fields=bad_fields,
               proxy_nonfinite=proxy_nonfinite,
               final_loss=losses[-1], losses=losses)
  return stats


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=20000)
  args = parser.parse_args()
  ok = True
  for name, tx in (("foam", fo.scale_by_foam(epsilon=EPS, max_epsilon=MAX_EPS)),
                   ("shampoo", fo.scale_by_shampoo(epsilon=EPS))):
    start = time.time()
    r = run(tx, args.steps)
    in_range = EPS * (1 - 1e-6) <= r["damping_min"] and \
        r["damping_max"] <= MAX_EPS * (1 + 1e-6)
    ok &= r["finite"] and in_range
    if not r["finite"]:
      print(f"ERROR {name}: non-finite parameters, updates or optimizer state "
            f"first seen at step {r['first_nonfinite_step']}; non-finite "
            f"arrays at the end of that chunk: {r['nonfinite_fields']}",
            file=sys.stderr, flush=True)
    print(f"{name}: steps={int(r['step'])} finite={r['finite']} "
          f"damping in [{r['damping_min']:.3g}, {r['damping_max']:.3g}] "
          f"(allowed [{EPS:g}, {MAX_EPS:g}]: {in_range}) "
          f"EVDs={int(r['eigendecompositions'])} checks={int(r['checks'])} "
          f"factors={int(r['num_factors'])} "
          f"EVD/check={r['eigendecompositions'] / max(r['checks'], 1):.3f} "
          f"EVD per 1000 steps per factor="
          f"{1000 * r['eigendecompositions'] / r['step'] / r['num_factors']:.2f} "
          f"failures={int(r['eigendecomposition_failures'])} "
          f"skips={int(r['nonfinite_skips'])} "
          f"nonfinite_proxies={r['proxy_nonfinite']} "
          f"loss every 5000 steps={[f'{x:.3g}' for x in r['losses'][4::5]]} "
          f"time={time.time() - start:.0f}s")
  print("OK" if ok else "FAILED")
  return 0 if ok else 1


if __name__ == "__main__":
  raise SystemExit(main())
