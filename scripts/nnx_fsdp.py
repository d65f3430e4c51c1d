"""Flax NNX FSDP, set up as the Flax GSPMD guide does: how much of the
optimizer state each device holds.

An MLP (128-128-128-64) whose weights are annotated with
`nnx.with_partitioning` (kernels split over ``data`` x ``model``, biases over
``model``) on a ``(data 4, model 2)`` mesh of 8 devices;
`nnx.Optimizer(model, tx, wrt=nnx.Param)` built under `nnx.jit` with
`jax.set_mesh`, and the model's and the optimizer's states constrained to
`nnx.get_partition_spec` of themselves. Nothing in the setup is specific to
foam_optax. For `optax.adamw`, `optax.contrib.muon`, `fo.foam`, `fo.soap`
and `fo.asgo` it prints the optimizer-state bytes in all, the most any
device holds (after creation and after 5 train steps, whose outputs the
compiler places), the bytes replicated on every device, and how far 5 train
steps on the mesh land from the same steps on one device (no mesh, the
annotations ignored), relative to how far the parameters moved.

The comparison needs a problem on which float32 round-off is not amplified:
batches of 256 examples (full-rank factor statistics in 32 x 32 blocks),
damping 1e-5, and unstaggered checks (staggered check phases depend on the
device layout, see docs/multi_device.md). On a 64-256-256-16 MLP, SOAP and
ASGO ended 5 steps apart by 0.47 and 0.72 of the parameters' movement with
batches of 32, 0.38 and 0.07 with batches of 256. There the gradients
differed by 5e-7 (relative) between the mesh and one device, and the same
gradients fed to both gave ASGO parameters that agreed to 1.4e-6 of their
size: round-off amplified by ill-conditioned statistics, not a difference in
the update.

On a CPU-only machine it asks XLA for 8 host devices before JAX starts and
waits for each step (see docs/multi_device.md).

    python scripts/nnx_fsdp.py [--mesh auto explicit] [--optimizers ...]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if "jax" not in sys.modules:
  os.environ.setdefault("XLA_FLAGS",
                        "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import foam_optax as fo  # noqa: E402

STEPS = 5
WIDTHS = (128, 128, 128, 64)


def optimizers() -> dict:
  """Each run's optimizer; the Kronecker ones refresh within the 5 steps."""
  shampoo_family = dict(block_size=32, check_frequency=2, epsilon=1e-5,
                        stagger=False)
  return {
      "optax.adamw": lambda: optax.adamw(1e-3),
      "optax.contrib.muon": lambda: optax.contrib.muon(1e-3),
      "fo.foam": lambda: fo.foam(1e-3, max_epsilon=1e-4, **shampoo_family),
      "fo.soap": lambda: fo.soap(1e-3, **shampoo_family),
      "fo.asgo": lambda: fo.asgo(1e-3, block_size=32),
  }


class MLP(nnx.Module):
  """Kernels split over (data, model), biases over model: FSDP with tensor
  parallelism, as in the Flax GSPMD guide."""

  def __init__(self, rngs: nnx.Rngs):
    kernel = nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                   ("data", "model"))
    bias = nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",))
    self.layers = nnx.List([
        nnx.Linear(n_in, n_out, kernel_init=kernel, bias_init=bias, rngs=rngs)
        for n_in, n_out in zip(WIDTHS[:-1], WIDTHS[1:])])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      kernel, bias = layer.kernel[...], layer.bias[...]
      mesh = jax.typeof(kernel).sharding.mesh
      if not mesh.empty and mesh.are_all_axes_explicit:
        # Explicit axes: gather each layer's weights, as FSDP does.
        kernel, bias = jax.sharding.reshard((kernel, bias), P())
      x = x @ kernel + bias
      if i < len(self.layers) - 1:
        x = jax.nn.tanh(x)
    return x


def loss_fn(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def batches():
  key_x, key_y = jax.random.split(jax.random.PRNGKey(1))
  xs = jax.random.normal(key_x, (STEPS, 256, WIDTHS[0]))
  ys = jnp.sin(jax.random.normal(key_y, (STEPS, 256, WIDTHS[-1])))
  return xs, ys


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss


def constrained(tree):
  """`tree` with its state constrained to its own partition specs (on a
  mesh)."""
  if jax.sharding.get_abstract_mesh().empty:
    return tree
  state = nnx.state(tree)
  nnx.update(tree, jax.lax.with_sharding_constraint(
      state, nnx.get_partition_spec(state)))
  return tree


def create(tx):
  model = constrained(MLP(nnx.Rngs(0)))
  optimizer = constrained(nnx.Optimizer(model, tx, wrt=nnx.Param))
  return model, optimizer


def train(model, optimizer, data_sharding=None):
  for x, y in zip(*batches()):
    if data_sharding is not None:
      x, y = jax.device_put((x, y), data_sharding)
    # Host devices: wait for each step (docs/multi_device.md).
    jax.block_until_ready(train_step(model, optimizer, x, y))
  return model


def bytes_per_device(tree) -> tuple:
  """(total bytes, bytes on each device, bytes replicated on every device)."""
  arrays = jax.tree.leaves(nnx.state(tree))
  devices = jax.devices()
  per_device = [sum(s.data.nbytes for a in arrays for s in a.addressable_shards
                    if s.device == d) for d in devices]
  replicated = sum(a.nbytes for a in arrays
                   if a.sharding.is_fully_replicated)
  return sum(a.nbytes for a in arrays), per_device, replicated


def params_of(model):
  return [np.asarray(jax.device_get(x))
          for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def run(name, make_tx, mesh) -> dict:
  with jax.set_mesh(mesh):
    tx = make_tx()
    model, optimizer = nnx.jit(lambda: create(tx))()
    total, per_device, replicated = bytes_per_device(optimizer)
    train(model, optimizer, NamedSharding(mesh, P("data")))
    _, trained_per_device, _ = bytes_per_device(optimizer)
  # The same on one device: no mesh, the annotations ignored.
  with nnx.use_eager_sharding(False):
    tx = make_tx()
    one_model, one_optimizer = nnx.jit(lambda: create(tx))()
    train(one_model, one_optimizer)
    initial = params_of(MLP(nnx.Rngs(0)))
  mesh_params, one_params = params_of(model), params_of(one_model)
  moved = max(float(np.max(np.abs(p - q)))
              for p, q in zip(one_params, initial))
  diff = max(float(np.max(np.abs(p - q)))
             for p, q in zip(mesh_params, one_params))
  row = {"optimizer": name, "total_bytes": total,
         "bytes_per_device": per_device, "replicated_bytes": replicated,
         "share": max(per_device) / total,
         "bytes_per_device_trained": trained_per_device,
         "share_trained": max(trained_per_device) / total, "moved": moved,
         "relative_diff": diff / moved}
  if name.startswith("fo."):
    row["eigendecompositions"] = [
        int(fo.stats(opt.opt_state)["eigendecompositions"])
        for opt in (optimizer, one_optimizer)]
  return row


def main(argv=None) -> None:
  """The command line `argv` (default: the program's arguments)."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--mesh", nargs="+", choices=("auto", "explicit"),
                      default=["auto"], help="mesh axis types to run on")
  parser.add_argument("--optimizers", nargs="+", choices=list(optimizers()),
                      default=list(optimizers()))
  parser.add_argument("--json", help="write the rows to this file")
  args = parser.parse_args(argv)
  rows = []
  for kind in args.mesh:
    axis_type = AxisType.Auto if kind == "auto" else AxisType.Explicit
    mesh = jax.make_mesh((4, 2), ("data", "model"),
                         axis_types=(axis_type, axis_type))
    for name in args.optimizers:
      if kind == "explicit" and name == "optax.contrib.muon":
        # Its Newton-Schulz products of the sharded matrices raise a
        # ShardingTypeError on Explicit axes (optax 0.2.8).
        print(f"{name} skipped on Explicit axes")
        continue
      rows.append(dict(run(name, optimizers()[name], mesh), mesh=kind))
  print("| mesh (4 x 2) | optimizer | state bytes | most on one device | "
        "share | share after 5 steps | replicated bytes | 5 steps vs one "
        "device |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['mesh']} | {r['optimizer']} | {r['total_bytes']} | "
          f"{max(r['bytes_per_device'])} | {r['share']:.3f} | "
          f"{r['share_trained']:.3f} | {r['replicated_bytes']} | "
          f"{r['relative_diff']:.1e} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
