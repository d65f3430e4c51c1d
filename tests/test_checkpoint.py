"""Orbax checkpoints of the optimizer state, restored in a new process.

This module doubles as the restoring program: one new process on 8 forced
CPU devices imports it and runs every check that needs a new process or a
mesh (the `new_process` fixture), so both processes run the very same
jitted step and the new process starts JAX and compiles each shared program
once. The unsharded resume runs there on the first device alone.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import foam_optax as fo
from foam_optax.bench import measure
import host_devices

ocp = pytest.importorskip("orbax.checkpoint")

_FIRST, _SECOND = 5, 5
# 16x8 in 4x4 blocks: stacks of 8 blocks, one per device on an 8-device mesh.
# Staggered checks (the configuration these tolerances were set for): with
# every factor checked on the same steps the sharded and unsharded runs end
# up to 2.5x the tolerances below apart, with equal counters.
_TX = fo.foam(3e-2, block_size=4, check_frequency=2, stagger=True)


def _params():
  return {"w": jax.random.normal(jax.random.PRNGKey(0), (16, 8)),
          "b": jnp.zeros((8,))}


def _loss(p):
  rows = p["w"].shape[0]
  x = jnp.linspace(-1.0, 1.0, 64 * rows).reshape(64, rows)
  target = jax.random.normal(jax.random.PRNGKey(1), (64, 8))
  return jnp.mean((jnp.tanh(x @ p["w"] + p["b"]) - target) ** 2)


def _make_step(tx):
  def step(params, state):
    updates, state = tx.update(jax.grad(_loss)(params), state, params)
    return optax.apply_updates(params, updates), state
  # XLA's cheap settings, the same in both processes (a few steps each).
  return jax.jit(step, compiler_options=measure.fast_compile())


_step = _make_step(_TX)
# 20x8 in 4x4 blocks: stacks of 10, padded to 16 on 8 devices. Damping
# 1e-5: at 1e-9 the inverse roots amplify the round-off of sharded sums.
_TX_UNEVEN = fo.foam(3e-2, block_size=4, check_frequency=2, epsilon=1e-5,
                     max_epsilon=3e-4)
_step_uneven = _make_step(_TX_UNEVEN)


def _params_uneven():
  return {"w": jax.random.normal(jax.random.PRNGKey(0), (20, 8)),
          "b": jnp.zeros((8,))}


def _run(params, state, steps, step=_step, shardings=None):
  """`steps` steps; with `shardings` (as `_mesh_shardings` gives them), the
  results are placed back after each step (XLA may return some split
  otherwise, e.g. the bias), so that every step runs the first's program."""
  for _ in range(steps):
    # Each step completes before the next (host devices' collectives).
    params, state = jax.block_until_ready(step(params, state))
    if shardings is not None:
      params, state = jax.block_until_ready(jax.device_put(
          (params, state), (shardings["params"], shardings["opt_state"])))
  return params, state


def _mesh():
  from jax.sharding import Mesh
  return Mesh(np.array(jax.devices()), ("data",))


def _abstract(shardings=None, tx=_TX, params=None):
  """The saved tree's structure; with `shardings`, laid out for the mesh."""
  params = _params() if params is None else params
  if shardings is None:
    opt_state = jax.eval_shape(tx.init, params)
  else:
    with jax.set_mesh(_mesh()):
      opt_state = jax.eval_shape(tx.init, params)
  tree = {"params": params, "opt_state": opt_state}
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def _mesh_shardings(tx=_TX, params=None):
  """Parameters split by rows (by columns where rows do not divide), factor
  stacks by blocks, over 8 devices."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = _mesh()
  params = _params() if params is None else params
  rows_split = params["w"].shape[0] % 8 == 0
  p_shard = {"w": NamedSharding(mesh, P("data", None) if rows_split
                                else P(None, "data")),
             "b": NamedSharding(mesh, P())}
  with jax.set_mesh(mesh):
    return {"params": p_shard, "opt_state": fo.state_sharding(
        jax.eval_shape(tx.init, params), params, p_shard)}


def _resume(directory, out_file, sharded):
  """Restore the checkpoint, train `_SECOND` steps, save the results."""
  shardings = _mesh_shardings() if sharded else None
  restored = ocp.StandardCheckpointer().restore(
      directory, _abstract(shardings))
  if sharded:
    placed = all(
        a.sharding.is_equivalent_to(s, a.ndim)
        for a, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)))
    assert placed and jax.device_count() == 8
  params, state = _run(restored["params"], restored["opt_state"], _SECOND,
                       shardings=shardings)
  leaves = jax.tree.leaves(jax.device_get({"params": params, "state": state}))
  np.savez(out_file, *leaves)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A checkpoint after `_FIRST` steps and the uninterrupted trajectory."""
  directory = tmp_path_factory.mktemp("ckpt") / "state"
  params = _params()
  # Committed to the device, like the arrays restored on it: one program.
  params, state = _run(*jax.device_put((params, _TX.init(params)),
                                       jax.devices()[0]), _FIRST)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, {"params": params, "opt_state": state})
  checkpointer.wait_until_finished()
  assert int(fo.stats(state)["eigendecompositions"]) > 0
  params, state = _run(params, state, _SECOND)
  return directory, jax.tree.leaves({"params": params, "state": state})


@pytest.fixture(scope="module")
def saved_uneven(tmp_path_factory):
  """A checkpoint of uneven stacks after `_FIRST` steps on one device and
  the parameters `_SECOND` steps later."""
  directory = tmp_path_factory.mktemp("uneven") / "state"
  params = _params_uneven()
  params, state = _run(params, _TX_UNEVEN.init(params), _FIRST, _step_uneven)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, {"params": params, "opt_state": state})
  checkpointer.wait_until_finished()
  expected, _ = _run(params, state, _SECOND, _step_uneven)
  return directory, expected


@pytest.fixture(scope="module")
def new_process(saved, saved_uneven, tmp_path_factory):
  """Every check of this module that runs in the new 8-device process;
  returns a function of a check's name giving its saved arrays (failing
  the calling test with the check's own error if it failed)."""
  out = tmp_path_factory.mktemp("new_process")
  path = lambda name: str(out / name)
  calls = [
      ("resume", "_resume", [str(saved[0]), path("resume.npz"), False]),
      ("resume_sharded", "_resume",
       [str(saved[0]), path("resume_sharded.npz"), True]),
      ("train_sharded", "_train_sharded_and_save",
       [path("sharded_state"), path("train_sharded.npz")]),
      ("resume_uneven", "_resume_uneven_on_8",
       [str(saved_uneven[0]), path("resume_uneven.npz")]),
  ]
  try:
    import flax  # noqa: F401
    calls.append(("nnx_previous_layout", "_nnx_previous_layout",
                  [path("nnx"), path("nnx_previous_layout.npz")]))
  except ImportError:
    pass
  outcomes = host_devices.run_checks("test_checkpoint", calls, 300)

  def arrays(name):
    host_devices.result(outcomes, name)
    with np.load(out / f"{name}.npz") as data:
      return [data[f"arr_{i}"] for i in range(len(data.files))]
  arrays.directory = out
  return arrays


def test_resume_in_new_process_is_bitwise_identical(saved, new_process):
  _, expected = saved
  resumed = new_process("resume")
  assert len(resumed) == len(expected)
  for a, b in zip(resumed, expected):
    assert a.dtype == b.dtype and np.array_equal(a, np.asarray(b))


def test_unsharded_checkpoint_restores_sharded_on_8_devices(saved,
                                                            new_process):
  _, expected = saved
  resumed = new_process("resume_sharded")
  assert len(resumed) == len(expected)
  for a, b in zip(resumed, expected):
    assert a.shape == b.shape and a.dtype == b.dtype
    if np.issubdtype(a.dtype, np.integer):   # counters, phases
      np.testing.assert_array_equal(a, b)
  # Same parameters (b, w) up to the summation order of sharded contractions.
  moved = np.max(np.abs(expected[1] - _params()["w"]))
  assert moved > 0.1
  for a, b in zip(resumed[:2], expected[:2]):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-2 * moved)


def _train_sharded_and_save(directory, out_file):
  """On 8 devices: train `_FIRST` steps with the state placed by
  `fo.state_sharding`, save it, train `_SECOND` more; save both as arrays."""
  assert jax.device_count() == 8
  shardings = _mesh_shardings()
  params = jax.device_put(_params(), shardings["params"])
  state = jax.device_put(_TX.init(params), shardings["opt_state"])
  params, state = _run(params, state, _FIRST, shardings=shardings)
  tree = jax.device_put({"params": params, "opt_state": state}, shardings)
  # The factor stacks really are split: one block of each stack per device.
  is_factor = lambda x: isinstance(x, fo.FactorStack)
  stacks = jax.tree.leaves([f for f in jax.tree.leaves(
      tree["opt_state"], is_leaf=is_factor) if is_factor(f)])
  assert stacks and all(
      a.shape[0] == 8 and a.addressable_shards[0].data.shape[0] == 1
      for a in stacks)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory, tree)
  checkpointer.wait_until_finished()
  saved = jax.tree.leaves(jax.device_get(tree))
  params, state = _run(tree["params"], tree["opt_state"], _SECOND,
                       shardings=shardings)
  final = jax.tree.leaves(jax.device_get({"params": params, "state": state}))
  np.savez(out_file, *saved, *final)
  return len(saved)


def test_sharded_checkpoint_restores_on_one_device(new_process):
  arrays = new_process("train_sharded")
  directory = new_process.directory / "sharded_state"
  saved, sharded_final = arrays[:len(arrays) // 2], arrays[len(arrays) // 2:]

  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = _abstract()
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
      abstract)
  restored = ocp.StandardCheckpointer().restore(directory, target)
  assert jax.tree.structure(restored) == jax.tree.structure(abstract)
  leaves = jax.tree.leaves(restored)
  assert len(leaves) == len(saved) > 2
  for a, b in zip(leaves, saved):   # bit-identical, on the one device
    assert a.sharding.is_equivalent_to(device, a.ndim)
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), b)
  assert int(fo.stats(restored["opt_state"])["eigendecompositions"]) > 0

  params, state = _run(restored["params"], restored["opt_state"], _SECOND)
  resumed = jax.tree.leaves(jax.device_get({"params": params, "state": state}))
  # Continued on one device from the saved arrays: bitwise the same run.
  again = jax.tree.unflatten(jax.tree.structure(abstract),
                             [jax.device_put(x, device) for x in saved])
  again = jax.tree.leaves(jax.device_get(
      _run(again["params"], again["opt_state"], _SECOND)))
  assert len(resumed) == len(again) == len(sharded_final)
  for a, b in zip(resumed, again):
    assert a.dtype == b.dtype and np.array_equal(a, b)
  # Against the sharded continuation: integers (counters, phases) exact,
  # parameters (b, w) up to the summation order of sharded contractions.
  for a, b in zip(resumed, sharded_final):
    assert a.shape == b.shape and a.dtype == b.dtype
    if np.issubdtype(a.dtype, np.integer):
      np.testing.assert_array_equal(a, b)
  moved = np.max(np.abs(sharded_final[1] - _params()["w"]))
  assert moved > 0.1
  for a, b in zip(resumed[:2], sharded_final[:2]):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-2 * moved)


def _resume_uneven_on_8(directory, out_file):
  """Restore a one-device checkpoint of uneven stacks on 8 devices: restore
  it as saved, move it into the mesh layout with `fo.relayout`, continue."""
  assert jax.device_count() == 8
  params = _params_uneven()
  restored = ocp.StandardCheckpointer().restore(
      directory, _abstract(tx=_TX_UNEVEN, params=params))
  shardings = _mesh_shardings(_TX_UNEVEN, params)
  with jax.set_mesh(_mesh()):
    target = jax.jit(_TX_UNEVEN.init, out_shardings=shardings["opt_state"])(
        jax.device_put(params, shardings["params"]))
  is_factor = lambda x: isinstance(x, fo.FactorStack)
  sizes = {f.statistic.shape[0] for f in jax.tree.leaves(
      target, is_leaf=is_factor) if is_factor(f)}
  assert sizes == {16}, sizes   # padded: the saved stacks hold 10
  state = jax.device_put(fo.relayout(restored["opt_state"], target),
                         shardings["opt_state"])
  params = jax.device_put(restored["params"], shardings["params"])
  params, state = _run(params, state, _SECOND, _step_uneven, shardings)
  np.savez(out_file, *jax.tree.leaves(jax.device_get(params)))


def test_uneven_checkpoint_moves_to_8_devices_with_relayout(saved_uneven,
                                                            new_process):
  _, expected = saved_uneven
  resumed = new_process("resume_uneven")
  moved = np.max(np.abs(np.asarray(expected["w"]) - _params_uneven()["w"]))
  assert moved > 0.1
  for a, b in zip(resumed, jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, np.asarray(b), rtol=0, atol=1e-3 * moved)


def _nnx_previous_layout(directory, out_file):
  """On a (data 4, model 2) mesh: Flax NNX optimizer states saved as earlier
  versions laid them out (plain arrays, which `nnx.Optimizer` wrapped each
  in an `OptArray`) restore into today's annotated states and train on."""
  from flax import nnx
  from flax.nnx.training.optimizer import to_opt_state
  from jax.sharding import AxisType
  mesh = jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(AxisType.Auto,) * 2)
  kernel = nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                 ("data", "model"))
  x = jnp.linspace(-1.0, 1.0, 64 * 16).reshape(64, 16)
  checkpointer = ocp.StandardCheckpointer()
  abstract = lambda tree: jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
      tree)
  host = lambda tree: [np.asarray(a) for a in jax.device_get(
      jax.tree.leaves(tree))]
  same = lambda a, b: all(np.array_equal(u, v)
                          for u, v in zip(host(a), host(b)))

  @nnx.jit
  def create():
    model = nnx.Linear(16, 8, kernel_init=kernel, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, _TX, wrt=nnx.Param)
    state = nnx.state(optimizer)
    nnx.update(optimizer, jax.lax.with_sharding_constraint(
        state, nnx.get_partition_spec(state)))
    return model, optimizer

  @nnx.jit
  def train_step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean(jnp.tanh(m(x)) ** 2))(model)
    optimizer.update(model, grads)

  def train(model, optimizer, steps):
    for _ in range(steps):
      jax.block_until_ready(train_step(model, optimizer))

  directory = pathlib.Path(directory)
  flags = []
  with jax.set_mesh(mesh):
    model, optimizer = create()
    train(model, optimizer, _FIRST)
    state, params = nnx.state(optimizer), nnx.state(model)
    previous = nnx.state(to_opt_state(nnx.as_pure(state)))
    checkpointer.save(directory / "optimizer", previous)
    checkpointer.save(directory / "model", params)
    checkpointer.wait_until_finished()
    restored = checkpointer.restore(directory / "optimizer", abstract(state))
    flags.append(jax.tree.structure(restored) == jax.tree.structure(state))
    flags.append(same(restored, state))
    flags.append(all(a.sharding.is_equivalent_to(b.sharding, a.ndim)
                     for a, b in zip(jax.tree.leaves(restored),
                                     jax.tree.leaves(state))))
    train(model, optimizer, _SECOND)
    again, again_optimizer = create()
    nnx.update(again, checkpointer.restore(directory / "model",
                                           abstract(params)))
    nnx.update(again_optimizer, restored)
    train(again, again_optimizer, _SECOND)
    flags.append(same(nnx.state(again_optimizer), nnx.state(optimizer)))
    flags.append(same(nnx.state(again), nnx.state(model)))
    # A functional loop's state (`tx.init` of the NNX parameters) saved in
    # the previous, plain layout restores into the plain form of today's.
    functional = _TX.init(nnx.state(model, nnx.Param))
    functional = jax.device_put(functional,
                                nnx.get_named_sharding(functional, mesh))
    checkpointer.save(directory / "functional", nnx.as_pure(functional))
    checkpointer.wait_until_finished()
    plain = checkpointer.restore(directory / "functional",
                                 nnx.as_pure(abstract(functional)))
    flags.append(same(plain, functional))
  np.savez(out_file, np.array(flags))


def test_nnx_states_of_the_previous_layout_restore_on_a_mesh(new_process):
  pytest.importorskip("flax")
  (flags,) = new_process("nnx_previous_layout")
  # Structure, values and shardings restored; the same next steps; the
  # functional state restored in its plain form.
  assert flags.tolist() == [True] * 6
