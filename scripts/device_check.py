"""What costs what on the accelerator JAX sees (GPU, TPU or CPU).

Three measurements, written to ``--out`` as ``device_check.json`` and
``device_check.md``:

1. ``eigh`` against a matrix product of the same size, m in {256, 512,
   1024, 2048}: one matrix at a time, and a batch of 4 matrices in one call
   (the batched `eigh` a bucketed refresh runs). Products at
   ``precision=HIGHEST`` (what the library uses) and at the backend's
   default (TF32 on recent NVIDIA GPUs, one bf16 pass on TPU).
2. The per-factor `lax.cond` that guards each eigendecomposition: a
   `lax.map` over a stack of factors whose conds are all skipped, all taken,
   and the same map without any cond. On a GPU the predicate may travel to
   the host; a skipped cond that costs far more than nothing shows it.
3. Step time and memory of AdamW, Shampoo f = 1 and f = 20, FOAM and SOAP
   on a GPT-2-small-shaped model (12 layers, d_model 768, 12 heads, plain
   JAX, synthetic tokens): median and mean step time over the timed steps
   (which cover a whole check period), compile time, the compiled step's
   memory (arguments + outputs + temporaries − donated aliases, from XLA's
   memory analysis) and, where the backend reports it, the device's peak
   bytes in use after the optimizer's runs (a running maximum over the
   process).

``--tiny`` shrinks every shape and compiles with XLA's cheap settings
(`foam_optax.bench.measure.fast_compile`) so the whole script runs in well
under a minute on a CPU (the CI smoke test); the full run is sized for about
five minutes on one GPU.

    python scripts/device_check.py --out /tmp/device_check
    python scripts/device_check.py --tiny --out /tmp/device_check_tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import optax

import foam_optax as fo
from foam_optax.bench import measure


@dataclasses.dataclass(frozen=True)
class Sizes:
  matrix_sizes: tuple = (256, 512, 1024, 2048)
  batch: int = 4
  cond_size: int = 1024
  cond_count: int = 8
  layers: int = 12
  d_model: int = 768
  heads: int = 12
  vocab: int = 8192
  seq_len: int = 512
  batch_size: int = 8
  repeats: int = 5
  # Timed steps per optimizer: a whole check period for the periodic ones.
  steps: tuple = (("adamw", 10), ("shampoo_f1", 3), ("shampoo_f20", 20),
                  ("foam", 20), ("soap", 10))


# The embeddings of the tiny model are d_model x d_model, as the attention
# projection: fewer distinct block shapes and factor sizes to compile.
TINY = Sizes(matrix_sizes=(16, 32), batch=2, cond_size=16, cond_count=4,
             layers=1, d_model=32, heads=2, vocab=32, seq_len=32,
             batch_size=2, repeats=3,
             steps=(("adamw", 4), ("shampoo_f1", 2), ("shampoo_f20", 4),
                    ("foam", 4), ("soap", 4)))

LR = 1e-3


def _spd(seed, shape):
  """Symmetric positive semi-definite matrices of `shape` (drawn with NumPy:
  JAX's random numbers drawn op by op compile a program per shape)."""
  g = np.random.default_rng(seed).standard_normal(shape, np.float32)
  return jnp.asarray(g @ np.swapaxes(g, -1, -2) / np.float32(shape[-1]))


# ---------------------------------------------------------- 1. eigh vs matmul


def eigh_vs_matmul(sizes: Sizes, compiler_options=None):
  jit = lambda fn: jax.jit(fn, compiler_options=compiler_options)
  eigh = jit(lambda a: jnp.linalg.eigh(a))
  matmul = jit(lambda a, b: jnp.matmul(a, b, precision=lax.Precision.HIGHEST))
  # The backend's default precision: TF32 on recent NVIDIA GPUs, one bf16
  # pass on TPU, float32 on CPU.
  matmul_default = jit(jnp.matmul)
  rows = []
  for m in sizes.matrix_sizes:
    one = _spd(m, (m, m))
    many = _spd(m + 1, (sizes.batch, m, m))
    row = {"m": m, "batch": sizes.batch,
           "eigh_ms": 1e3 * measure.timed(eigh, one, repeats=sizes.repeats),
           "matmul_ms": 1e3 * measure.timed(matmul, one, one, repeats=sizes.repeats),
           "matmul_default_precision_ms": 1e3 * measure.timed(
               matmul_default, one, one, repeats=sizes.repeats),
           "eigh_batched_ms": 1e3 * measure.timed(eigh, many, repeats=sizes.repeats),
           "matmul_batched_ms": 1e3 * measure.timed(matmul, many, many,
                                             repeats=sizes.repeats)}
    row["eigh_over_matmul"] = row["eigh_ms"] / row["matmul_ms"]
    row["batched_eigh_speedup"] = (sizes.batch * row["eigh_ms"]
                                   / row["eigh_batched_ms"])
    rows.append(row)
  return rows


# ---------------------------------------------------------- 2. per-factor cond


def cond_cost(sizes: Sizes, compiler_options=None):
  """Per factor: a `lax.map` over the stack with a cond whose taken branch
  runs `eigh` and rebuilds the factor, all skipped / all taken, against the
  map without a cond (returning the factor); `compiler_options` go to XLA."""
  def refresh(a):
    d, q = jnp.linalg.eigh(a)
    return (q * d) @ q.T

  def with_cond(stack, flags):
    return lax.map(lambda x: lax.cond(x[1], lambda: refresh(x[0]),
                                      lambda: x[0]), (stack, flags))

  jit = lambda fn: jax.jit(fn, compiler_options=compiler_options)
  with_cond = jit(with_cond)
  no_cond = jit(lambda stack: lax.map(lambda a: a + 0.0, stack))
  always = jit(lambda stack: lax.map(refresh, stack))
  n = sizes.cond_count
  stack = _spd(7, (n, sizes.cond_size, sizes.cond_size))
  per = lambda seconds: 1e3 * seconds / n
  r = sizes.repeats
  return {
      "m": sizes.cond_size, "factors": n,
      "no_cond_ms_per_factor": per(measure.timed(no_cond, stack, repeats=r)),
      "skipped_ms_per_factor": per(measure.timed(
          with_cond, stack, np.zeros((n,), bool), repeats=r)),
      "taken_ms_per_factor": per(measure.timed(
          with_cond, stack, np.ones((n,), bool), repeats=r)),
      "unconditional_ms_per_factor": per(measure.timed(always, stack, repeats=r)),
  }


# ---------------------------------------------------------- 3. GPT-2-shaped


def init_gpt(seed, sizes: Sizes):
  """GPT-2-style parameters (drawn with NumPy, as `_spd`)."""
  d, v = sizes.d_model, sizes.vocab
  rng = np.random.default_rng(seed)
  normal = lambda shape: np.float32(0.02) * rng.standard_normal(shape,
                                                                np.float32)
  ones, zeros = (lambda n: np.ones((n,), np.float32),
                 lambda n: np.zeros((n,), np.float32))
  layer = lambda: {
      "ln1": {"g": ones(d), "b": zeros(d)},
      "qkv": {"w": normal((d, 3 * d)), "b": zeros(3 * d)},
      "proj": {"w": normal((d, d)), "b": zeros(d)},
      "ln2": {"g": ones(d), "b": zeros(d)},
      "fc": {"w": normal((d, 4 * d)), "b": zeros(4 * d)},
      "out": {"w": normal((4 * d, d)), "b": zeros(d)},
  }
  return jax.tree.map(jnp.asarray, {
      "wte": normal((v, d)), "wpe": normal((sizes.seq_len, d)),
      "layers": [layer() for _ in range(sizes.layers)],
      "ln_f": {"g": ones(d), "b": zeros(d)}})


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) * lax.rsqrt(var + 1e-5) * p["g"] + p["b"]


def gpt_loss(params, tokens, heads):
  """Next-token cross-entropy of a pre-LN GPT-2 with tied embeddings."""
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  b, t = inputs.shape
  x = params["wte"][inputs] + params["wpe"][:t]
  mask = jnp.tril(jnp.ones((t, t), bool))
  for p in params["layers"]:
    h = _layer_norm(x, p["ln1"]) @ p["qkv"]["w"] + p["qkv"]["b"]
    q, k, v = jnp.split(h.reshape(b, t, 3 * heads, -1), 3, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
    scores = jnp.where(mask, scores, -1e9)
    attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores), v)
    x = x + attn.reshape(b, t, -1) @ p["proj"]["w"] + p["proj"]["b"]
    h = jax.nn.gelu(_layer_norm(x, p["ln2"]) @ p["fc"]["w"] + p["fc"]["b"])
    x = x + h @ p["out"]["w"] + p["out"]["b"]
  logits = _layer_norm(x, params["ln_f"]) @ params["wte"].T
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, targets))


def optimizer(name):
  return {
      "adamw": lambda: optax.adamw(LR),
      "shampoo_f1": lambda: fo.shampoo(LR, check_frequency=1),
      "shampoo_f20": lambda: fo.shampoo(LR, check_frequency=20),
      "foam": lambda: fo.foam(LR),
      "soap": lambda: fo.soap(LR),
  }[name]()


def _peak_bytes():
  stats = jax.devices()[0].memory_stats()
  return None if not stats else stats.get("peak_bytes_in_use")


def step_costs(sizes: Sizes, compiler_options=None, into=None,
               on_result=lambda: None):
  """Fills `into` (``param_bytes`` and ``optimizers``) one optimizer at a
  time, calling `on_result` after each; returns it."""
  into = {"optimizers": {}} if into is None else into
  params = init_gpt(0, sizes)
  tokens = jnp.asarray(np.random.default_rng(1).integers(
      0, sizes.vocab, (sizes.batch_size, sizes.seq_len + 1), np.int32))
  into["param_bytes"] = measure.tree_bytes(params)
  results = into["optimizers"]
  for name, steps in sizes.steps:
    tx = optimizer(name)

    def step(params, state, tokens):
      loss, grads = jax.value_and_grad(gpt_loss)(params, tokens, sizes.heads)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

    p = jax.tree.map(jnp.copy, params)
    state = tx.init(p)
    compiled, *seconds = measure.lower_and_compile(
        jax.jit(step, donate_argnums=(0, 1)), p, state, tokens,
        **(compiler_options or {}))
    compile_s = sum(seconds)
    memory = measure.memory(compiled)
    step_bytes = None if memory is None else memory["total_bytes"]
    state_bytes = measure.tree_bytes(state)
    # Warm up past the first check step (s0 = f = 20 for Shampoo and FOAM,
    # 1 for SOAP) so the timed steps are steady-state; then a whole period.
    warmup = 1 if name in ("adamw", "shampoo_f1", "soap") else 20
    for _ in range(warmup):
      p, state, loss = compiled(p, state, tokens)
    jax.block_until_ready(loss)
    times = []
    for _ in range(steps):
      (p, state, loss), step_seconds = measure.call_timed(compiled, p, state,
                                                          tokens)
      times.append(step_seconds)
    results[name] = {
        "compile_s": compile_s, "timed_steps": steps,
        "median_step_ms": 1e3 * statistics.median(times),
        "mean_step_ms": 1e3 * statistics.mean(times),
        "max_step_ms": 1e3 * max(times),
        "compiled_step_bytes": step_bytes, "state_bytes": int(state_bytes),
        "peak_bytes_in_use_so_far": _peak_bytes(),
        "final_loss": float(loss),
    }
    print(f"{name}: median step {results[name]['median_step_ms']:.1f} ms, "
          f"compile {compile_s:.1f} s", flush=True)
    on_result()
  return into


# ---------------------------------------------------------------- report


def markdown(report):
  lines = [f"## device_check on {report['device']} ({report['platform']}, "
           f"JAX {report['jax']}{', tiny shapes' if report['tiny'] else ''})",
           "", "### eigh vs matmul (median ms)", "",
           "| m | eigh | matmul (HIGHEST) | matmul (default precision) | "
           "eigh/matmul | batch | batched eigh | batched matmul | "
           "batched eigh speed-up |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in report.get("eigh_vs_matmul", []):
    lines.append(
        f"| {r['m']} | {r['eigh_ms']:.3f} | {r['matmul_ms']:.3f} | "
        f"{r['matmul_default_precision_ms']:.3f} | "
        f"{r['eigh_over_matmul']:.1f} | {r['batch']} | "
        f"{r['eigh_batched_ms']:.3f} | {r['matmul_batched_ms']:.3f} | "
        f"{r['batched_eigh_speedup']:.2f}x |")
  c = report.get("cond")
  if c is not None:
    lines += [
        "", f"### Per-factor lax.cond, m = {c['m']}, {c['factors']} "
        "factors (ms per factor)", "",
        "| no cond | cond skipped | cond taken (eigh) | eigh, no cond |",
        "|---:|---:|---:|---:|",
        f"| {c['no_cond_ms_per_factor']:.3f} | "
        f"{c['skipped_ms_per_factor']:.3f} | "
        f"{c['taken_ms_per_factor']:.3f} | "
        f"{c['unconditional_ms_per_factor']:.3f} |"]
  s = report.get("steps")
  if s is None:
    return "\n".join(lines) + "\n"
  mib = lambda b: "n/a" if b is None else f"{b / 2 ** 20:.0f}"
  lines += ["", f"### GPT-2-shaped model: {report['model']} "
            f"(parameters {mib(s.get('param_bytes'))} MiB)", "",
            "| optimizer | median step ms | mean step ms | max step ms | "
            "compile s | compiled step MiB | state MiB | peak MiB so far |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in s["optimizers"].items():
    lines.append(
        f"| {name} | {r['median_step_ms']:.1f} | {r['mean_step_ms']:.1f} | "
        f"{r['max_step_ms']:.1f} | {r['compile_s']:.1f} | "
        f"{mib(r['compiled_step_bytes'])} | {mib(r['state_bytes'])} | "
        f"{mib(r['peak_bytes_in_use_so_far'])} |")
  return "\n".join(lines) + "\n"


SECTIONS = ("eigh", "cond", "steps")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tiny", action="store_true",
                      help="tiny shapes: a CPU smoke run in well under a "
                           "minute")
  parser.add_argument("--out", default="device_check_out")
  parser.add_argument("--sections", nargs="+", default=list(SECTIONS),
                      choices=list(SECTIONS), help="default: all three")
  parser.add_argument("--optimizers", nargs="+",
                      help="step costs of these only (default: all of "
                           + ", ".join(name for name, _ in Sizes.steps) + ")")
  args = parser.parse_args(argv)
  sizes = TINY if args.tiny else Sizes()
  if args.optimizers:
    unknown = set(args.optimizers) - {name for name, _ in sizes.steps}
    if unknown:
      parser.error(f"unknown optimizers {sorted(unknown)}")
    sizes = dataclasses.replace(sizes, steps=tuple(
        (name, n) for name, n in sizes.steps if name in args.optimizers))
  start = time.perf_counter()
  options = measure.compiler_options(args.tiny)
  device = jax.devices()[0]
  report = {
      "device": getattr(device, "device_kind", str(device)),
      "platform": device.platform, "jax": jax.__version__,
      "host": platform.platform(), "tiny": args.tiny,
      "sizes": dataclasses.asdict(sizes),
      "model": (f"{sizes.layers} layers, d_model {sizes.d_model}, "
                f"{sizes.heads} heads, vocab {sizes.vocab}, seq "
                f"{sizes.seq_len}, batch {sizes.batch_size}"),
  }
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)

  def save():
    # Written after every section, so a run stopped by a time limit keeps
    # what it measured.
    report["seconds"] = time.perf_counter() - start
    (out / "device_check.json").write_text(json.dumps(report, indent=1))
    (out / "device_check.md").write_text(markdown(report))

  if "eigh" in args.sections:
    report["eigh_vs_matmul"] = eigh_vs_matmul(sizes, options)
    save()
  if "cond" in args.sections:
    report["cond"] = cond_cost(sizes, options)
    save()
  if "steps" in args.sections:
    report["steps"] = {"optimizers": {}}
    step_costs(sizes, options, report["steps"], save)
  save()
  text = markdown(report)
  print(text)
  print(f"{report['seconds']:.0f} s; wrote {out}/device_check.json and "
        "device_check.md")
  return report


if __name__ == "__main__":
  main()
