"""Multi-device behaviour on an 8-device CPU mesh.

The main pytest process has one device; a mesh needs
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is imported,
so the checks run in one new process (the `new_process` fixture, under a
timeout: a collective that deadlocks fails the test instead of stalling the
suite; see host_devices.py), which also starts the two processes of the
two-process check. The documented recipes on such a mesh are in
test_multi_device_recipes.py.
"""

import json
import textwrap

import pytest

import host_devices
from host_devices import script_json  # noqa: F401 (run by name)


def _checks() -> dict:
  return json.loads(host_devices.printed(_SCRIPT))


@pytest.fixture(scope="module")
def new_process():
  """The checks of this module that run on 8 devices, in one new process;
  a function of a check's name giving its result (failing the calling test
  with the check's own error if it failed)."""
  outcomes = host_devices.run_checks(
      "test_multi_device",
      [("bench", "script_json", ["bench_devices", "--quick"]),
       ("checks", "_checks", []),
       # 2 processes x 4 CPU devices in one jax.distributed cluster
       # (localhost), against one device of this process.
       ("processes", "script_json", ["multi_process", "--timeout", "240"])],
      900)
  return lambda name: host_devices.result(outcomes, name)


@pytest.fixture(scope="module")
def bench(new_process):
  return new_process("bench")


def test_every_mesh_and_layout_matches_one_device(bench):
  rows = bench["agreement"]
  meshes = {r["mesh"] for r in rows}
  assert {"make_mesh", "make_mesh_no_set_mesh", "Mesh_auto",
          "make_mesh_2d"} <= meshes
  assert {r["params"] for r in rows} == {"replicated", "fsdp"}
  # FOAM's row is the work section's run (bench_devices.work_per_device).
  assert {r["optimizer"] for r in rows} == {"foam_low_cap", "shampoo", "soap",
                                            "foam_one_sided", "asgo"}
  for r in rows:
    assert r["moved"] > 0.05, r
    assert r["relative_diff"] < 1e-3, r
    assert r["refreshes"] == r["refreshes_1"] > 0, r
    assert r["sharding_kept"], r


def test_each_device_computes_its_share_of_the_eigendecompositions(bench):
  rows = bench["work"]
  assert rows and sum(r["needed"] for r in rows) > 0
  for r in rows:
    assert sum(r["per_device"]) == r["needed"], r
    assert max(r["per_device"]) <= r["bound"], r


def test_uneven_stacks_are_padded_and_relayout_round_trips(bench):
  """The work section's one-device state moved onto the mesh by
  `fo.relayout` (stacks of 18, 5 and 1 blocks padded for 8 devices) and
  back; both go on and agree; the step, jitted without out_shardings, keeps
  the state's shardings."""
  r = bench["relayout"]
  assert r["padded_stacks"] and all(s % 8 == 0 for s in r["padded_stacks"])
  assert r["roundtrip_exact"]
  assert r["stats_equal"]
  assert r["continued_moved"] > 0.05
  assert r["continued_diff"] < 1e-3 * r["continued_moved"]
  assert r["kept_without_out_shardings"]


def test_state_memory_is_divided(bench):
  for name, r in bench["memory"].items():
    assert r["ratio"] <= 1 / 6, (name, r)
    assert len(set(r["bytes_per_device"])) == 1, (name, r)


_SCRIPT = textwrap.dedent("""
    import json, warnings
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax import lax
    from jax.sharding import NamedSharding, PartitionSpec as P
    import foam_optax as fo
    from foam_optax._src import config, factors, layout, linalg, refresh

    out = {}
    mesh = jax.make_mesh((8,), ("data",))
    plan = layout.Plan.for_mesh(mesh)

    # 1. Requests concentrated on one device are dealt round-robin.
    k, m = 16, 6
    # Drawn flat (the same values): a 3-D draw compiles several times slower.
    a = jax.random.normal(jax.random.PRNGKey(0), (k * m * m,)).reshape(k, m, m)
    stats = jnp.einsum("kij,klj->kil", a, a)
    fs = factors.init_stack(k, m, jnp.zeros(k, jnp.int32), config.Config())
    fs = fs._replace(statistic=stats)
    need = jnp.zeros(k, bool).at[jnp.array([0, 1, 9])].set(True)
    cfg = config.Config()
    calls = []
    original = linalg.eigh
    def counting(matrix):
      jax.debug.callback(lambda d: calls.append(int(d)),
                         lax.axis_index("data"))
      return original(matrix)
    linalg.eigh = counting
    body = lambda fs, need: refresh.refresh(
        fs, need, jnp.float32(1.0), cfg, plan,
        refresh.requests([need], plan)[0])
    auto_mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    run = jax.jit(jax.shard_map(
        body, mesh=auto_mesh, in_specs=(P("data"), P("data")),
        out_specs=P("data"), check_vma=False))
    fresh = run(fs, need)
    jax.effects_barrier()
    linalg.eigh = original
    want = jax.jit(jax.vmap(
        lambda s: linalg.fresh_eigendecomposition(s)[1]))(stats)
    out["rebalance_calls"] = np.bincount(calls, minlength=8).tolist()
    out["rebalance_eigvals_err"] = float(jnp.max(jnp.abs(
        fresh.eigvals[need] - want[need])))
    out["rebalance_ok"] = bool(jnp.all(fresh.ok[need]))

    # 2. A state initialised without the mesh is refused, not silently
    # replicated; updating it under a mesh warns (when the step is traced:
    # tracing it is enough, compiling would add seconds).
    params = {"w": jax.random.normal(jax.random.PRNGKey(1), (20, 8)),
              "b": jnp.zeros((8,))}
    loss = lambda p: jnp.sum(jnp.tanh(p["w"] + p["b"]) ** 2)
    tx = fo.foam(1e-2, block_size=4, check_frequency=2)
    def step(p, s):
      updates, s = tx.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, updates), s
    one = jax.jit(tx.init)(params)
    p_shard = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
    try:
      fo.state_sharding(one, params, p_shard)
      out["unplanned_refused"] = False
    except ValueError as e:
      out["unplanned_refused"] = "jax.set_mesh" in str(e)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      with jax.set_mesh(mesh):
        jax.eval_shape(step, jax.device_put(params, p_shard), jax.device_put(
            one, jax.tree.map(lambda _: NamedSharding(mesh, P()), one)))
    out["unplanned_warned"] = any("initialised without" in str(w.message)
                                  for w in caught)
    try:
      with jax.set_mesh(mesh):
        fo.shampoo(1e-2, refresh_batching="bucket").init(params)
      out["bucket_refused"] = False
    except ValueError as e:
      out["bucket_refused"] = "refresh_batching='map'" in str(e)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def checks(new_process):
  return new_process("checks")


def test_concentrated_requests_are_rebalanced(checks):
  # Three requests, two of them on device 0: three devices compute one each.
  assert sorted(checks["rebalance_calls"]) == [0] * 5 + [1] * 3
  assert checks["rebalance_ok"]
  assert checks["rebalance_eigvals_err"] < 1e-4


def test_state_without_mesh_is_refused_or_warned(checks):
  assert checks["unplanned_refused"]
  assert checks["unplanned_warned"]


def test_batched_refresh_is_refused_on_a_mesh(checks):
  assert checks["bucket_refused"]


def test_two_processes_match_one(new_process):
  result = new_process("processes")
  assert result["processes"] * result["devices_per_process"] == 8
  assert result["moved"] > 0.05
  assert result["max_abs_diff"] < 1e-3 * result["moved"]
  assert result["eigendecompositions"] == result[
      "eigendecompositions_one_process"] > 0
