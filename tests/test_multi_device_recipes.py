"""The documented multi-device recipes, run as pasted on an 8-device CPU
mesh: the README's, the bias-corrected FOAM with microbatch gradients, and
Flax NNX (docs/multi_device.md, scripts/nnx_fsdp.py). All of them run in one
new process (the `recipes` fixture, see host_devices.py), each in a namespace
of its own."""

import json
import textwrap

import pytest

import host_devices

_ROOT = host_devices.ROOT


def _readme_recipe() -> str:
  readme = (_ROOT / "README.md").read_text()
  block = readme.split("<!-- multi-device recipe -->")[1]
  return host_devices.printed(block.split("```python")[1].split("```")[0])


def _docs_nnx_recipe() -> str:
  doc = (_ROOT / "docs" / "multi_device.md").read_text()
  section = doc.split("\n## Flax NNX")[1]
  return host_devices.printed(section.split("```python")[1].split("```")[0])


def _script(name: str) -> dict:
  """The JSON that the script `name` of this module prints."""
  return json.loads(host_devices.printed(globals()[name]))


def _nnx_fsdp(meshes, optimizers) -> list:
  """The rows scripts/nnx_fsdp.py writes for `meshes` and `optimizers`."""
  return host_devices.script_json("nnx_fsdp", "--mesh", *meshes,
                                  "--optimizers", *optimizers)


_NNX_OPTIMIZERS = ("fo.foam", "fo.soap", "fo.asgo")
# The NNX FSDP recipe's checks: meshes, optimizers, and whether the check
# is a slow one (run with --runslow only).
_NNX_FSDP = {"soap-asgo": (["auto"], ["fo.soap", "fo.asgo"], False),
             "foam": (["auto"], ["fo.foam"], True),
             "explicit": (["explicit"], list(_NNX_OPTIMIZERS), True)}


@pytest.fixture(scope="module")
def recipes(request):
  """Every recipe of this module, run in one new 8-device process; a
  function of a check's name giving its result (failing the calling test
  with the check's own error if it failed)."""
  calls = [("readme", "_readme_recipe", []),
           ("microbatch", "_script", ["_MICROBATCH_SCRIPT"])]
  try:
    import flax  # noqa: F401
    calls += [("nnx_functional", "_script", ["_NNX_FUNCTIONAL_SCRIPT"]),
              ("docs_nnx", "_docs_nnx_recipe", [])]
    runslow = request.config.getoption("--runslow")
    calls += [(f"nnx_fsdp {name}", "_nnx_fsdp", [meshes, optimizers])
              for name, (meshes, optimizers, slow) in _NNX_FSDP.items()
              if runslow or not slow]
  except ImportError:
    pass
  outcomes = host_devices.run_checks("test_multi_device_recipes", calls, 900)
  return lambda name: host_devices.result(outcomes, name)


def test_readme_recipe_runs_as_pasted(recipes):
  # 256x128 in 64x64 blocks: 8 blocks, 16 factors, all decomposed at the
  # first check (step 20).
  assert int(recipes("readme")) == 16


_MICROBATCH_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import foam_optax as fo

    mesh = jax.make_mesh((8,), ("data",))
    key = jax.random.PRNGKey(0)
    params = {"w": jax.random.normal(key, (24, 16)) / 5, "b": jnp.zeros(16)}
    xs = jax.random.normal(jax.random.PRNGKey(1), (6, 64, 24))
    loss_fn = lambda p, x: jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2)
    tx = fo.foam(1e-2, block_size=8, check_frequency=2, epsilon=1e-5,
                 max_epsilon=1e-4, bias_correction="cross_fit_variance")

    def step(params, state, x):
      loss, grads, micro = fo.microbatch_grads(loss_fn, params, x, 8)
      updates, state = tx.update(grads, state, params, microbatch_grads=micro)
      return optax.apply_updates(params, updates), state, micro

    def run(params, state, x_sharding):
      compiled = jax.jit(step)
      for x in xs:
        params, state, micro = jax.block_until_ready(compiled(
            params, state, jax.device_put(x, x_sharding)))
      return params, state, micro

    # Committed to the device, like the batches: the step compiles once.
    device = jax.devices()[0]
    p1, s1, micro1 = run(*jax.device_put((params, tx.init(params)), device),
                         device)
    out = {}
    with jax.set_mesh(mesh):
      p_shard = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
      p8 = jax.device_put(params, p_shard)
      s_shard = fo.state_sharding(jax.eval_shape(tx.init, p8), p8, p_shard)
      s8 = jax.jit(tx.init, out_shardings=s_shard)(p8)
      # The batch is sharded over its example axis, so each microbatch
      # lives on one device: the microbatch axis is sharded with it.
      p8, s8, micro8 = run(p8, s8, NamedSharding(mesh, P("data")))
    out["micro_sharded"] = micro8["w"].sharding.spec[0] == "data"
    host = lambda x: np.asarray(jax.device_get(x))
    out["micro_diff"] = float(np.max(np.abs(host(micro8["w"])
                                            - host(micro1["w"]))))
    out["moved"] = float(np.max(np.abs(host(p1["w"]) - host(params["w"]))))
    out["param_diff"] = float(np.max(np.abs(host(p8["w"]) - host(p1["w"]))))
    one, eight = fo.stats(s1), fo.stats(s8)
    out["evds"] = [int(one["eigendecompositions"]),
                   int(eight["eigendecompositions"])]
    print(json.dumps(out))
""")


def test_bias_corrected_foam_with_microbatch_grads_on_a_mesh(recipes):
  """`fo.microbatch_grads` and a cross-fitted, variance-corrected FOAM on 8
  devices with the batch (and so the microbatch axis) sharded: the same
  gradients, refreshes and parameters as on one device."""
  out = recipes("microbatch")
  assert out["micro_sharded"]
  assert out["micro_diff"] < 1e-5
  assert out["moved"] > 1e-3
  assert out["param_diff"] < 1e-3 * out["moved"]
  assert out["evds"][0] == out["evds"][1] > 0


# ---------------------------------------------------------------------------
# Flax NNX on a (data 4, model 2) mesh: the Flax sharding recipe divides the
# optimizer state (scripts/nnx_fsdp.py is the client of the Flax GSPMD guide).


def _check_divided_and_agreeing(rows, optimizers=_NNX_OPTIMIZERS):
  assert {r["optimizer"] for r in rows} == set(optimizers)
  for r in rows:
    per_device, total = r["bytes_per_device"], r["total_bytes"]
    assert len(per_device) == 8, r
    # Replicated: the counters only.
    assert r["replicated_bytes"] <= 1e-3 * total, r
    for placed in (per_device, r["bytes_per_device_trained"]):
      assert max(placed) <= 1.5 * total / 8 + r["replicated_bytes"], r
    # Five train steps agree with one device (same refreshes). The bound
    # is float32 round-off amplified: the gradients differ by about 2e-7
    # (relative) between the mesh and one device, and a refreshed basis
    # turns that into up to 1.3e-2 (SOAP, Explicit axes), while the same
    # gradients fed to both optimizers agree to 2e-7 of the parameters.
    assert r["moved"] > 1e-3, r
    assert r["relative_diff"] < 5e-2, r
    first, one = r["eigendecompositions"]
    assert first == one, r
  assert all(r["eigendecompositions"][0] > 0 for r in rows
             if r["optimizer"] != "fo.asgo")


def test_docs_nnx_recipe_runs_as_pasted(recipes):
  pytest.importorskip("flax")
  # One device holds 0.13 of the optimizer state after 30 steps.
  assert recipes("docs_nnx") == "0.13"


@pytest.mark.parametrize("check", [
    "soap-asgo",
    # FOAM's state under this recipe is divided in
    # test_docs_nnx_recipe_runs_as_pasted and agrees with one device in
    # test_nnx_functional_state_on_a_mesh (the same annotated state).
    pytest.param("foam", marks=pytest.mark.slow)])
def test_nnx_fsdp_recipe_divides_the_optimizer_state(recipes, check):
  """`nnx.Optimizer` built under `nnx.jit` and `jax.set_mesh`, its state
  constrained to `nnx.get_partition_spec` of itself (Auto axes)."""
  pytest.importorskip("flax")
  _check_divided_and_agreeing(recipes(f"nnx_fsdp {check}"),
                              _NNX_FSDP[check][1])


@pytest.mark.slow
def test_nnx_fsdp_recipe_divides_the_optimizer_state_explicit_axes(recipes):
  pytest.importorskip("flax")
  _check_divided_and_agreeing(recipes("nnx_fsdp explicit"))


_NNX_FUNCTIONAL_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from jax.sharding import AxisType, PartitionSpec as P
    import foam_optax as fo

    mesh = jax.make_mesh((4, 2), ("data", "model"),
                         axis_types=(AxisType.Auto,) * 2)
    kernel = nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                   ("data", "model"))
    bias = nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",))
    # 40 x 16 in 8 x 8 blocks: a stack of 10 blocks, padded to 16 slots.
    make_model = lambda: nnx.Linear(40, 16, kernel_init=kernel,
                                    bias_init=bias, rngs=nnx.Rngs(0))
    tx = fo.foam(1e-2, block_size=8, check_frequency=2, epsilon=1e-5,
                 max_epsilon=1e-4, stagger=False)
    x = jax.random.normal(jax.random.PRNGKey(1), (128, 40))
    target = jax.random.normal(jax.random.PRNGKey(2), (128, 16))
    with nnx.use_eager_sharding(False):
      graphdef, params0 = nnx.split(make_model(), nnx.Param)

    @jax.jit
    def step(params, state):
      loss = lambda p: jnp.mean((jnp.tanh(nnx.merge(graphdef, p)(x))
                                 - target) ** 2)
      updates, state = tx.update(jax.grad(loss)(params), state, params)
      return optax.apply_updates(params, updates), state

    def run(params, state, steps):
      for _ in range(steps):
        params, state = jax.block_until_ready(step(params, state))
      return params, state

    host = lambda t: [np.asarray(jax.device_get(a)) for a in jax.tree.leaves(t)]
    is_var = lambda v: isinstance(v, nnx.Variable)
    spec = lambda v: str(v.get_value() if is_var(v) else v)
    out = {}
    # One device: no mesh, plain arrays in the state.
    one = tx.init(params0)
    out["one_device_plain"] = not any(
        is_var(v) for v in jax.tree.leaves(one, is_leaf=is_var))
    p1, s1 = run(params0, one, 3)

    with jax.set_mesh(mesh):
      _, params = nnx.split(make_model(), nnx.Param)
      state = tx.init(params)
      specs = nnx.get_partition_spec(state)
      core = specs[0]
      out["mu_specs"] = [spec(v) for v in
                         jax.tree.leaves(core.mu, is_leaf=is_var)]
      out["stack_specs"] = sorted({spec(v) for v in jax.tree.leaves(
          core.classes, is_leaf=is_var)})
      state = jax.device_put(state, nnx.get_named_sharding(state, mesh))
      arrays = jax.tree.leaves(state)
      out["total"] = sum(a.nbytes for a in arrays)
      out["per_device"] = [sum(s.data.nbytes for a in arrays
                               for s in a.addressable_shards if s.device == d)
                           for d in jax.devices()]
      out["replicated"] = sum(a.nbytes for a in arrays
                              if a.sharding.is_fully_replicated)
      # `state_sharding` places the stacks as the annotations do.
      shardings = fo.state_sharding(state, params,
                                    nnx.get_named_sharding(params, mesh))
      out["state_sharding_stacks_agree"] = all(
          a.is_equivalent_to(b.sharding, b.ndim) for a, b in zip(
              jax.tree.leaves(shardings[0].classes),
              jax.tree.leaves(state[0].classes)))
      # `update` keeps the variables; their plain form (a checkpoint of
      # the previous layout) trains the same.
      pw, sw = run(params, state, 3)
      out["structure_kept"] = (jax.tree.structure(sw)
                               == jax.tree.structure(state))
      out["kept_shardings"] = all(
          a.sharding.is_equivalent_to(b.sharding, a.ndim)
          for a, b in zip(jax.tree.leaves(sw), arrays))
      pp, sp = run(params, nnx.as_pure(state), 3)
      out["plain_same"] = all(np.array_equal(a, b) for a, b in
                              zip(host((pw, sw)), host((pp, sp))))
      # A one-device state moves onto the mesh layout and back.
      moved = fo.relayout(s1, state)
      out["relayout_structure"] = (jax.tree.structure(moved)
                                   == jax.tree.structure(state))
      # Placed as documented, and the parameters as the mesh model's: the
      # step compiled for `pw` goes on.
      moved = jax.device_put(moved, nnx.get_named_sharding(state, mesh))
      p8 = jax.device_put(jax.tree.unflatten(jax.tree.structure(params),
                                             jax.tree.leaves(p1)),
                          nnx.get_named_sharding(params, mesh))
      p8, _ = run(p8, moved, 3)
    out["roundtrip_exact"] = all(np.array_equal(a, b) for a, b in
                                 zip(host(fo.relayout(moved, one)), host(s1)))
    p1, _ = run(p1, s1, 3)
    out["moved"] = max(float(np.max(np.abs(a - b))) for a, b in
                       zip(host(p1), host(params0)))
    out["continued_diff"] = max(float(np.max(np.abs(a - b))) for a, b in
                                zip(host(p8), host(p1)))
    print(json.dumps(out))
""")


def test_nnx_functional_state_on_a_mesh(recipes):
  """`tx.init(nnx.split(model, nnx.Param)[1])` under a mesh: annotated
  state, divided by its own partition specs; `update`, `state_sharding` and
  `relayout` keep working on it, and its plain form trains the same."""
  pytest.importorskip("flax")
  out = recipes("nnx_functional")
  assert out["one_device_plain"]
  assert out["mu_specs"] == ["P('model',)", "P('data', 'model')"]
  assert out["stack_specs"] and all(s.startswith("P(('data', 'model')")
                                    for s in out["stack_specs"])
  assert out["replicated"] <= 64
  assert max(out["per_device"]) <= 1.5 * out["total"] / 8 + out["replicated"]
  assert out["state_sharding_stacks_agree"]
  assert out["structure_kept"] and out["kept_shardings"]
  assert out["plain_same"]
  assert out["relayout_structure"] and out["roundtrip_exact"]
  assert out["moved"] > 0.05
  assert out["continued_diff"] < 1e-3 * out["moved"]
