"""foam_optax across processes: 2 processes x 4 CPU devices, one mesh.

Starts two copies of itself that join one `jax.distributed` cluster through
a coordinator on localhost (CPU collectives over gloo), build an 8-device
`jax.make_mesh` spanning both processes, train a small model for a few steps
with the factor stacks divided over all 8 devices, and write the final
parameters. The parent then trains the same steps in one process on one
device and prints the largest difference.

    python scripts/multi_process.py            # prints the comparison
    python scripts/multi_process.py --json r.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

STEPS = 8
PROCESSES, LOCAL_DEVICES = 2, 4


def _problem():
  import jax
  import jax.numpy as jnp
  import foam_optax as fo
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w0": jax.random.normal(keys[0], (32, 24)) / 6,
            "w1": jax.random.normal(keys[1], (24, 16)) / 5,
            "b": jnp.zeros((24,))}
  # Drawn flat (the same values): XLA compiles a 3-D draw far slower.
  x = jax.random.normal(keys[2], (STEPS * 16 * 32,)).reshape(STEPS, 16, 32)
  y = jnp.sin(jnp.arange(STEPS * 16 * 16, dtype=jnp.float32)).reshape(
      STEPS, 16, 16)
  # Stacks of 12 and 6 blocks at block_size 8: padded to 16 and 8.
  tx = fo.foam(2e-2, block_size=8, check_frequency=2, epsilon=1e-5,
               max_epsilon=3e-4, stagger=False)
  return params, (x, y), tx


def _loss(p, x, y):
  import jax.numpy as jnp
  return jnp.mean((jnp.tanh(x @ p["w0"] + p["b"]) @ p["w1"] - y) ** 2)


def _train(params, data, tx, shardings=None):
  import jax
  import optax

  def step(p, s, x, y):
    updates, s = tx.update(jax.grad(_loss)(p, x, y), s, p)
    return optax.apply_updates(p, updates), s

  if shardings is None:
    step, state = jax.jit(step), jax.jit(tx.init)(params)
  else:
    p_shard, s_shard = shardings
    state = jax.jit(tx.init, out_shardings=s_shard)(params)
    step = jax.jit(step, in_shardings=(p_shard, s_shard, None, None),
                   out_shardings=(p_shard, s_shard))
  for i in range(STEPS):
    # Each step completes before the next: see docs/multi_device.md.
    params, state = jax.block_until_ready(
        step(params, state, data[0][i], data[1][i]))
  return params, state


def worker(process_id, port, out):
  # The parent's other XLA flags kept.
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  os.environ["XLA_FLAGS"] = " ".join(
      [*flags, f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"])
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=PROCESSES,
                             process_id=process_id)
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  import foam_optax as fo

  assert jax.device_count() == PROCESSES * LOCAL_DEVICES
  assert jax.local_device_count() == LOCAL_DEVICES
  params, data, tx = _problem()
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  with jax.set_mesh(mesh):
    p_shard = {"w0": NamedSharding(mesh, P("data")),
               "w1": NamedSharding(mesh, P("data")),
               "b": NamedSharding(mesh, P())}
    # Every process holds the full host arrays; each materialises its shards.
    host = jax.tree.map(np.asarray, params)
    params = jax.tree.map(
        lambda a, s: jax.make_array_from_callback(a.shape, s,
                                                  lambda i, a=a: a[i]),
        host, p_shard)
    s_shard = fo.state_sharding(jax.eval_shape(tx.init, params), params,
                                p_shard)
    params, state = _train(params, data, tx, (p_shard, s_shard))
    replicated = NamedSharding(mesh, P())
    params = jax.jit(lambda p: p, out_shardings=replicated)(params)
    stats = jax.jit(fo.stats, out_shardings=replicated)(state)
  if process_id == 0:
    np.savez(out, **{k: np.asarray(v.addressable_shards[0].data)
                     for k, v in params.items()},
             eigendecompositions=np.asarray(
                 stats["eigendecompositions"].addressable_shards[0].data))
  jax.distributed.shutdown()


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def main(argv=None):
  """The command line `argv` (default: the program's arguments)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--process-id", type=int)
  parser.add_argument("--port", type=int)
  parser.add_argument("--out")
  parser.add_argument("--json", help="write the comparison to this file")
  parser.add_argument("--timeout", type=float, default=300)
  args = parser.parse_args(argv)
  if args.process_id is not None:
    worker(args.process_id, args.port, args.out)
    return

  port = _free_port()
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "params.npz")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    children = [subprocess.Popen(
        [sys.executable, __file__, "--process-id", str(i), "--port",
         str(port), "--out", out], env=env) for i in range(PROCESSES)]
    try:
      codes = [c.wait(timeout=args.timeout) for c in children]
    finally:
      for c in children:
        c.kill()
    if any(codes):
      sys.exit(f"a process failed: exit codes {codes}")
    import numpy as np
    with np.load(out) as f:
      distributed = {k: f[k] for k in f.files}

  import jax
  import foam_optax as fo
  params, data, tx = _problem()
  single, state = _train(params, data, tx)
  moved = max(float(np.max(np.abs(np.asarray(single[k] - params[k]))))
              for k in params)
  diff = max(float(np.max(np.abs(distributed[k] - np.asarray(single[k]))))
             for k in params)
  result = {
      "processes": PROCESSES, "devices_per_process": LOCAL_DEVICES,
      "steps": STEPS, "max_abs_diff": diff, "moved": moved,
      "eigendecompositions": int(distributed["eigendecompositions"]),
      "eigendecompositions_one_process": int(
          jax.jit(fo.stats)(state)["eigendecompositions"])}
  print(json.dumps(result))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f)


if __name__ == "__main__":
  main()
