"""Multi-device behaviour on an 8-device CPU mesh (run in a subprocess).

The main pytest process has one device; the mesh needs
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is imported,
so the measurements run in a fresh interpreter that prints them as JSON.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent("""
    import json, re
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import foam_optax as fo
    from foam_optax import state_sharding

    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {"w": jax.random.normal(keys[0], (64, 32)),
              "b": jnp.zeros((32,)),
              "conv": 0.1 * jax.random.normal(keys[1], (2, 2, 8, 16))}
    target = jax.random.normal(keys[2], (128, 32))
    x = jax.random.normal(jax.random.PRNGKey(1), (128, 64))
    # 64x32 in 8x8 blocks: 32 blocks; conv as (32, 16): 8 blocks. All 8x8
    # blocks of the tree form one block class: a left and a right stack of 40.
    tx = fo.foam(3e-2, block_size=8, check_frequency=2, grouping="bucket")

    def loss(p):
      h = x @ p["w"] + p["b"]
      return jnp.mean((h - target) ** 2) + jnp.sum(p["conv"] ** 2)

    def step(p, s):
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return optax.apply_updates(p, u), s

    def nbytes_on(tree, device):
      return sum(sh.data.nbytes for a in jax.tree.leaves(tree)
                 for sh in a.addressable_shards if sh.device == device)

    def evd_batches(compiled):
      # Batch size of every eigendecomposition call in the per-device program.
      calls = re.findall(r"= \\(f32\\[([0-9,]*)\\][^\\n]*custom_call_target="
                         r"\\"lapack_ssyevd", compiled.as_text())
      return [int(c.split(",")[0]) for c in calls]

    # One device.
    d0 = jax.devices()[0]
    p1 = jax.device_put(params, d0)
    s1 = jax.device_put(tx.init(p1), d0)
    step1 = jax.jit(step)
    evd_1 = evd_batches(step1.lower(p1, s1).compile())
    bytes_1 = nbytes_on(s1, d0)
    for _ in range(6):
      p1, s1 = step1(p1, s1)

    # Eight devices: w split by rows, the rest replicated.
    p_shard = {"w": NamedSharding(mesh, P("data", None)),
               "b": NamedSharding(mesh, P()),
               "conv": NamedSharding(mesh, P())}
    s_shard = state_sharding(jax.eval_shape(tx.init, params), params, p_shard)
    p8 = jax.device_put(params, p_shard)
    s8 = jax.jit(tx.init, out_shardings=s_shard)(p8)
    step8 = jax.jit(step, in_shardings=(p_shard, s_shard),
                    out_shardings=(p_shard, s_shard))
    evd_8 = evd_batches(step8.lower(p8, s8).compile())
    bytes_8 = [nbytes_on(s8, d) for d in jax.devices()]
    same_sharding = lambda tree: all(
        a.sharding.is_equivalent_to(b, a.ndim)
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(s_shard)))
    init_sharded = same_sharding(s8)

    # `update` itself keeps the shardings: jitted with in_shardings only, and
    # with none at all on the placed arrays (no out_shardings to force them),
    # over steps 1-3 (step 2 is the first check: eigendecompositions).
    def changed_sharding(before, after):
      assert jax.tree.structure(before) == jax.tree.structure(after)
      return [jax.tree_util.keystr(k) + ": " + str(b.sharding) + " -> " +
              str(a.sharding) for (k, a), b in zip(
                  jax.tree_util.tree_leaves_with_path(after),
                  jax.tree.leaves(before))
              if not a.sharding.is_equivalent_to(b.sharding, a.ndim)]

    changed = {}
    for name, jitted in (
        ("in_shardings", jax.jit(step, in_shardings=(p_shard, s_shard))),
        ("no_shardings", jax.jit(step))):
      p, s = p8, s8
      changed[name] = []
      for _ in range(3):
        p, s_next = jitted(p, s)
        changed[name] += changed_sharding(s, s_next)
        s = s_next
      changed[name + "_evds"] = int(fo.stats(s)["eigendecompositions"])

    for _ in range(6):
      p8, s8 = step8(p8, s8)
    factor = fo.FactorState
    stacks = [f.basis.sharding.spec for f in jax.tree.leaves(
        s8, is_leaf=lambda v: isinstance(v, factor)) if isinstance(f, factor)]
    print(json.dumps({
        "evd_1": evd_1, "evd_8": evd_8,
        "bytes_1": bytes_1, "bytes_8": bytes_8,
        "init_sharded": init_sharded, "kept_sharding": same_sharding(s8),
        "changed": changed,
        "num_sharded": sum("data" in str(a.sharding.spec)
                           for a in jax.tree.leaves(s8)),
        "stack_specs": [str(s) for s in stacks],
        "max_diff": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
            jax.tree.leaves(p1), jax.tree.leaves(jax.device_get(p8)))),
        "evds_1": int(fo.stats(s1)["eigendecompositions"]),
        "evds_8": int(fo.stats(s8)["eigendecompositions"]),
        "moved": float(jnp.max(jnp.abs(p1["w"] - params["w"]))),
    }))
""")


@pytest.fixture(scope="module")
def measured():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env,
                       capture_output=True, text=True, timeout=240)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_state_follows_parameter_sharding_and_keeps_it(measured):
  assert measured["init_sharded"] and measured["kept_sharding"]
  # Every factor stack (40 blocks) is split over the 8 devices.
  assert measured["stack_specs"] and all(
      "data" in s for s in measured["stack_specs"])


def test_update_keeps_state_sharding_without_out_shardings(measured):
  # Without out_shardings nothing forces the outputs' shardings: every state
  # array must come back with the sharding it came in with.
  changed = measured["changed"]
  assert changed["in_shardings"] == [], changed["in_shardings"][:5]
  assert changed["no_shardings"] == [], changed["no_shardings"][:5]
  # Not vacuous: the steps refreshed bases, and many arrays are split.
  assert changed["in_shardings_evds"] == changed["no_shardings_evds"] > 0
  assert measured["num_sharded"] >= 10


def test_per_device_state_memory_shrinks(measured):
  per_device = measured["bytes_8"]
  assert len(set(per_device)) == 1  # balanced
  # Only the vector's moments and scalar counters stay replicated.
  assert per_device[0] < measured["bytes_1"] / 4


def test_eigendecompositions_are_divided_among_devices(measured):
  # The compiled per-device program decomposes 1/8 of each block stack
  # (one 8x8 block class of 40 blocks, a left and a right factor stack).
  assert sorted(measured["evd_1"]) == [40, 40]
  assert sorted(measured["evd_8"]) == [5, 5]
  assert measured["evds_1"] == measured["evds_8"] > 0


def test_sharded_results_agree_with_one_device(measured):
  # Sharded contractions sum in another order; the float32 rounding is
  # amplified by the inverse roots, so agreement is relative to the distance
  # the parameters moved.
  assert measured["moved"] > 0.1
  assert measured["max_diff"] < 2e-3 * measured["moved"]
