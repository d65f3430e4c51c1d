"""Learning rate x epsilon robustness sweep: FOAM, Shampoo and AdamW.

Problems: a 64-32-10 tanh MLP on sklearn's digits (full batch) and the
Kronecker quadratic 0.5 ||A^(1/2) (W - W*) B^(1/2)||_F^2 (condition 1e4 per
side). A run diverges when its final loss is not finite or exceeds the
initial loss. Prints and writes a Markdown table.

  python scripts/archive/robustness_sweep.py --steps 200 --out sweep.md
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import foam_optax as fo

LRS = (1e-3, 1e-2, 1e-1, 1.0)
EPSILONS = (1e-12, 1e-9, 1e-6)


def digits_problem():
  from sklearn.datasets import load_digits
  x, y = load_digits(return_X_y=True)
  x = jnp.asarray(x / 16.0, jnp.float32)
  y = jax.nn.one_hot(jnp.asarray(y), 10)
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  params = {"w1": jax.random.normal(k1, (64, 32)) / 8.0, "b1": jnp.zeros(32),
            "w2": jax.random.normal(k2, (32, 10)) / np.sqrt(32), "b2": jnp.zeros(10)}

  def loss(p):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return optax.softmax_cross_entropy(h @ p["w2"] + p["b2"], y).mean()
  return params, loss


def spd(key, n, cond):
  q, _ = jnp.linalg.qr(jax.random.normal(key, (n, n)))
  return (q * jnp.logspace(0, np.log10(cond), n)) @ q.T / np.sqrt(cond)


def quadratic_problem(m=16, n=12, cond=1e4):
  ka, kb, kw = jax.random.split(jax.random.PRNGKey(1), 3)
  a, b = spd(ka, m, cond), spd(kb, n, cond)
  target = jax.random.normal(kw, (m, n))

  def loss(p):
    d = p["w"] - target
    return 0.5 * jnp.sum(d * (a @ d @ b))
  return {"w": jnp.zeros((m, n))}, loss


def make(name, eps):
  if name == "adamw":
    return optax.scale_by_adam(eps=eps)
  if name == "foam":
    return fo.scale_by_foam(epsilon=eps, max_epsilon=300 * eps)
  return fo.scale_by_shampoo(epsilon=eps)


def run_grid(problem, steps):
  params0, loss = problem
  results = {}
  for name in ("foam", "shampoo", "adamw"):
    for eps in EPSILONS:
      tx = make(name, eps)

      @jax.jit
      def train(lr, params=params0, tx=tx):
        def body(carry, _):
          p, s = carry
          g = jax.grad(loss)(p)
          u, s = tx.update(g, s, p)
          p = jax.tree.map(lambda w, d: w - lr * d, p, u)   # decoupled wd 1e-4
          p = jax.tree.map(lambda w: w * (1 - lr * 1e-4), p) if name == "adamw" else p
          return (p, s), None
        (p, _), _ = jax.lax.scan(body, (params0, tx.init(params0)), None, steps)
        return loss(p)

      for lr in LRS:
        results[(name, eps, lr)] = float(train(jnp.float32(lr)))
  return float(loss(params0)), results


def table(title, initial, results):
  lines = [f"### {title} (initial loss {initial:.4g})", "",
           "| optimizer | epsilon | " + " | ".join(f"lr={lr:g}" for lr in LRS)
           + " | finished |", "|---" * (len(LRS) + 3) + "|"]
  for name in ("foam", "shampoo", "adamw"):
    ok_total = 0
    for eps in EPSILONS:
      cells, ok = [], 0
      for lr in LRS:
        v = results[(name, eps, lr)]
        good = np.isfinite(v) and v <= initial
        ok += good
        cells.append(f"{v:.3g}" if good else f"**div** ({v:.2g})")
      ok_total += ok
      lines.append(f"| {name} | {eps:g} | " + " | ".join(cells) + f" | {ok}/{len(LRS)} |")
    lines.append(f"| {name} | all | " + " | ".join([""] * len(LRS))
                 + f" | **{ok_total / (len(LRS) * len(EPSILONS)):.0%}** |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--out", default="sweep.md")
  args = parser.parse_args()
  start = time.time()
  md = [f"## Robustness sweep ({args.steps} steps, full batch)\n"]
  for title, problem in (("digits MLP", digits_problem()),
                         ("Kronecker quadratic 16x12", quadratic_problem())):
    initial, results = run_grid(problem, args.steps)
    md.append(table(title, initial, results))
  md.append(f"_wall time {time.time() - start:.0f} s_\n")
  text = "\n".join(md)
  print(text)
  with open(args.out, "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
