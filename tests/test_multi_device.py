"""Multi-device behaviour on an 8-device CPU mesh.

The main pytest process has one device; a mesh needs
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is imported,
so the checks run in fresh interpreters (under a timeout: a collective that
deadlocks fails the test instead of stalling the suite) and report JSON. The
documented recipes on such a mesh are in test_multi_device_recipes.py.
"""

import json
import textwrap

import pytest

import host_devices

_run = host_devices.run


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  path = tmp_path_factory.mktemp("devices") / "devices.json"
  _run(["scripts/bench_devices.py", "--quick", "--json", str(path)], 900)
  return json.loads(path.read_text())


def test_every_mesh_and_layout_matches_one_device(bench):
  rows = bench["agreement"]
  meshes = {r["mesh"] for r in rows}
  assert {"make_mesh", "make_mesh_no_set_mesh", "Mesh_auto",
          "make_mesh_2d"} <= meshes
  assert {r["params"] for r in rows} == {"replicated", "fsdp"}
  assert {r["optimizer"] for r in rows} == {"foam", "shampoo", "soap",
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
    a = jax.random.normal(jax.random.PRNGKey(0), (k, m, m))
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
    want = jax.vmap(lambda s: linalg.fresh_eigendecomposition(s)[1])(stats)
    out["rebalance_calls"] = np.bincount(calls, minlength=8).tolist()
    out["rebalance_eigvals_err"] = float(jnp.max(jnp.abs(
        fresh.eigvals[need] - want[need])))
    out["rebalance_ok"] = bool(jnp.all(fresh.ok[need]))

    # 2. Uneven stacks: padded, and relayout moves states between layouts.
    params = {"w": jax.random.normal(jax.random.PRNGKey(1), (20, 8)),
              "b": jnp.zeros((8,))}
    loss = lambda p: jnp.sum(jnp.tanh(p["w"] + p["b"]) ** 2)
    tx = fo.foam(1e-2, block_size=4, check_frequency=2)
    @jax.jit
    def step(p, s):
      updates, s = tx.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, updates), s
    one = tx.init(params)
    p1, s1 = params, one
    for _ in range(5):
      p1, s1 = jax.block_until_ready(step(p1, s1))
    p_shard = jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
    with jax.set_mesh(mesh):
      shard = fo.state_sharding(jax.eval_shape(tx.init, params), params,
                                p_shard)
      eight = jax.jit(tx.init, out_shardings=shard)(params)
    stacks = [f.statistic.shape[0] for f in jax.tree.leaves(
        eight, is_leaf=lambda x: isinstance(x, fo.FactorStack))
        if isinstance(f, fo.FactorStack)]
    out["padded_stacks"] = stacks
    moved = fo.relayout(s1, eight)
    back = fo.relayout(moved, one)
    out["roundtrip_exact"] = all(
        bool(jnp.array_equal(x, y))
        for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(s1)))
    # Counts exactly; means to rounding (sums over padded stacks add in
    # another order).
    out["stats_equal"] = all(
        abs(float(fo.stats(moved)[key]) - float(fo.stats(s1)[key]))
        <= 1e-6 * abs(float(fo.stats(s1)[key]))
        for key in fo.stats(s1))
    # Continue on 8 devices from the moved state; compare with one device.
    with jax.set_mesh(mesh):
      p8, s8 = jax.device_put(p1, p_shard), jax.device_put(moved, shard)
      for _ in range(5):
        p8, s8 = jax.block_until_ready(step(p8, s8))
    for _ in range(5):
      p1, s1 = jax.block_until_ready(step(p1, s1))
    out["continued_diff"] = float(jnp.max(jnp.abs(p8["w"] - p1["w"])))
    out["continued_moved"] = float(jnp.max(jnp.abs(p1["w"] - params["w"])))
    # Without out_shardings, update returns the state with its shardings.
    p8n, s8n = step(p8, s8)
    out["kept_without_out_shardings"] = all(
        a.sharding.is_equivalent_to(b.sharding, a.ndim)
        for a, b in zip(jax.tree.leaves(s8n), jax.tree.leaves(s8)))

    # 3. A state initialised without the mesh is refused, not silently
    # replicated; updating it under a mesh warns (when the step is traced:
    # lowering it is enough, compiling would add seconds).
    try:
      fo.state_sharding(one, params, p_shard)
      out["unplanned_refused"] = False
    except ValueError as e:
      out["unplanned_refused"] = "jax.set_mesh" in str(e)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      with jax.set_mesh(mesh):
        step.lower(jax.device_put(params, p_shard), jax.device_put(
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
def checks():
  return json.loads(_run(["-c", _SCRIPT], 600).strip().splitlines()[-1])


def test_concentrated_requests_are_rebalanced(checks):
  # Three requests, two of them on device 0: three devices compute one each.
  assert sorted(checks["rebalance_calls"]) == [0] * 5 + [1] * 3
  assert checks["rebalance_ok"]
  assert checks["rebalance_eigvals_err"] < 1e-4


def test_uneven_stacks_are_padded_and_relayout_round_trips(checks):
  assert checks["padded_stacks"] and all(
      s % 8 == 0 for s in checks["padded_stacks"])
  assert checks["roundtrip_exact"]
  assert checks["stats_equal"]
  assert checks["continued_moved"] > 0.05
  assert checks["continued_diff"] < 1e-3 * checks["continued_moved"]
  assert checks["kept_without_out_shardings"]


def test_state_without_mesh_is_refused_or_warned(checks):
  assert checks["unplanned_refused"]
  assert checks["unplanned_warned"]


def test_batched_refresh_is_refused_on_a_mesh(checks):
  assert checks["bucket_refused"]


def test_two_processes_match_one(tmp_path):
  # 2 processes x 4 CPU devices in one jax.distributed cluster (localhost).
  path = tmp_path / "processes.json"
  _run(["scripts/multi_process.py", "--json", str(path), "--timeout", "240"],
       300)
  result = json.loads(path.read_text())
  assert result["processes"] * result["devices_per_process"] == 8
  assert result["moved"] > 0.05
  assert result["max_abs_diff"] < 1e-3 * result["moved"]
  assert result["eigendecompositions"] == result[
      "eigendecompositions_one_process"] > 0
