"""A data x model parallel MLP on scikit-learn digits, on a 2-D device mesh.

The batch is split over the ``data`` axis and the hidden layer's weights over
the ``model`` axis (tensor parallelism); the optimizer state is laid out for
the mesh, so every device stores and eigendecomposes only its share of the
Kronecker factors. On a machine without 8 accelerators, 8 CPU devices are
requested before JAX starts.

    python examples/mesh_2d.py --optimizer foam --steps 300
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:
  os.environ.setdefault("XLA_FLAGS",
                        "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

HIDDEN = 256
BLOCK_SIZE = 64   # several blocks per layer, so every device gets factors


def _init_params(seed):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  return {"w1": jax.random.normal(k1, (64, HIDDEN)) / 8.0,
          "b1": jnp.zeros((HIDDEN,)),
          "w2": jax.random.normal(k2, (HIDDEN, 10)) / 16.0,
          "b2": jnp.zeros((10,))}


def _shardings(mesh):
  """Hidden units split over ``model``: w1 by columns, w2 by rows."""
  return {"w1": NamedSharding(mesh, P(None, "model")),
          "b1": NamedSharding(mesh, P("model")),
          "w2": NamedSharding(mesh, P("model", None)),
          "b2": NamedSharding(mesh, P())}


def _logits(params, images):
  x = images.reshape(images.shape[0], -1)
  hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
  # The contraction over the split hidden units ends in a reduction over
  # ``model``; the logits stay split over ``data`` only.
  return jnp.matmul(hidden, params["w2"], out_sharding=P("data")) + \
      params["b2"]


def _loss(params, images, labels):
  return optax.softmax_cross_entropy_with_integer_labels(
      _logits(params, images), labels).mean()


def train(steps: int = 300, optimizer: str = "foam",
          learning_rate: float = 3e-3, batch_size: int = 128,
          check_frequency: int = 10, log_every: int = 50, seed: int = 0):
  """Trains on a (devices/2) x 2 mesh; returns losses, accuracy and stats."""
  devices = jax.device_count()
  model_axis = 2 if devices % 2 == 0 else 1
  mesh = jax.make_mesh((devices // model_axis, model_axis),
                       ("data", "model"))
  (x_train, y_train), (x_test, y_test) = common.load_data(seed)
  tx = common.make_optimizer(optimizer, learning_rate, steps, check_frequency,
                             block_size=BLOCK_SIZE)
  batch_sharding = NamedSharding(mesh, P("data"))
  with jax.set_mesh(mesh):
    p_shard = _shardings(mesh)
    params = jax.device_put(_init_params(seed), p_shard)
    state_shardings = None
    if optimizer != "adamw":
      import foam_optax as fo
      state_shardings = fo.state_sharding(
          jax.eval_shape(tx.init, params), params, p_shard)
    opt_state = jax.jit(tx.init, out_shardings=state_shardings)(params)

    @jax.jit
    def train_step(params, opt_state, images, labels):
      loss, grads = jax.value_and_grad(_loss)(params, images, labels)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    data = common.batches(x_train, y_train, batch_size, seed)
    for step in range(1, steps + 1):
      images, labels = (jax.device_put(a, batch_sharding) for a in next(data))
      params, opt_state, loss = train_step(params, opt_state, images, labels)
      losses.append(float(loss))
      if step % log_every == 0 or step == steps:
        common.log(step, losses[-1], opt_state)
    test = len(x_test) - len(x_test) % mesh.shape["data"]
    logits = jax.jit(_logits)(params, jax.device_put(x_test[:test],
                                                     batch_sharding))
    accuracy = float(np.mean(np.argmax(logits, -1) == y_test[:test]))
  return {"losses": losses, "accuracy": accuracy,
          "stats": common.optimizer_stats(opt_state),
          "mesh": dict(mesh.shape)}


def main(argv=None):
  return common.run(train, __doc__, argv,
                    label=lambda result: f"mesh {result['mesh']} | ")


if __name__ == "__main__":
  main()
