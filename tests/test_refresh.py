"""Refresh: which factors ask for one on which steps, the requests gathered
on a mesh, and behaviour under `jax.jit`: EVDs only behind conditionals,
skipped EVDs not executed, no recompilation, stable state shapes and dtypes."""

import functools
import json
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import foam_optax as fo
from foam_optax._src import layout
from foam_optax._src import linalg
from foam_optax._src import refresh
from helpers import FAST_COMPILE
import host_devices

# f32 (6,4) blocked 4+2; bf16 rank 3 (2,3,4) -> (6,4); bf16 vector; f32 scalar.
PARAMS = {"w": jnp.zeros((6, 4), jnp.float32),
          "k": jnp.zeros((2, 3, 4), jnp.bfloat16),
          "b": jnp.zeros((5,), jnp.bfloat16),
          "s": jnp.zeros((), jnp.float32)}
KW = dict(check_frequency=2, start_preconditioning_step=2, block_size=4,
          precondition_1d=True, stagger=False)
EXPENSIVE = ("syevd", "geqrf")   # LAPACK eigh and QR custom calls on CPU


def _grads(rng, scale=1.0):
  return jax.tree.map(
      lambda p: jnp.asarray(scale * rng.standard_normal(p.shape), p.dtype),
      PARAMS)


def _computations(hlo):
  """{name: [instruction lines]} of an HLO module's text."""
  comps, current = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if header and not line.startswith(" "):
      current = header.group(1)
      comps[current] = []
      if line.startswith("ENTRY"):
        comps["__entry__"] = current
    elif current is not None and line.strip() not in ("", "}"):
      comps[current].append(line)
  return comps


def _unconditional_expensive_calls(hlo):
  """(number of expensive custom calls, those executed unconditionally).

  A computation is executed unconditionally when it is reachable from the
  entry computation without passing through a branch of a `conditional`
  (while bodies, fusions and calls count as unconditional)."""
  comps = _computations(hlo)
  entry = comps.pop("__entry__")
  names = set(comps)
  plain = {name: set() for name in comps}
  for name, lines in comps.items():
    for line in lines:
      if " conditional(" in line:
        continue   # branch computations: conditional edges
      for ref in re.findall(r"%([\w.\-]+)", line):
        if ref in names and ref != name:
          plain[name].add(ref)
  reached, todo = {entry}, [entry]
  while todo:
    for ref in plain[todo.pop()]:
      if ref not in reached:
        reached.add(ref)
        todo.append(ref)
  calls = [(name, line) for name, lines in comps.items() for line in lines
           if "custom-call(" in line and any(e in line for e in EXPENSIVE)]
  return calls, [c for c in calls if c[0] in reached]


@pytest.mark.parametrize("refresh_batching", ["map", "bucket"])
def test_compiled_program_no_retrace_stable_state(refresh_batching):
  tx = fo.scale_by_foam(refresh_batching=refresh_batching, **KW)
  traces = []

  def update(g, s):
    traces.append(1)   # Python side effect: runs once per trace
    return tx.update(g, s)

  jitted = jax.jit(update)
  state = tx.init(PARAMS)
  rng = np.random.default_rng(0)
  grads = _grads(rng)
  hlo = jitted.lower(grads, state).compile().as_text()
  calls, unconditional = _unconditional_expensive_calls(hlo)
  # One eigh per factor stack (4 stacks here), each only inside a
  # conditional branch: never executed unconditionally, no select over it.
  assert len(calls) >= 4
  assert "syevd" in hlo
  assert not unconditional, unconditional
  # Sanity of the analysis itself: every computation is classified and the
  # entry computation is reached.
  assert _computations(hlo)["__entry__"]

  shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  structure = jax.tree.structure(state)
  for _ in range(6):   # crosses s0 and several check steps
    updates, state = jitted(_grads(rng), state)
    assert jax.tree.structure(state) == structure
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == shapes
    for k, p in PARAMS.items():
      assert updates[k].dtype == p.dtype and updates[k].shape == p.shape
      assert np.all(np.isfinite(np.asarray(updates[k], np.float32)))
  assert fo.stats(state)["eigendecompositions"] > 0
  # Traced and compiled once for all calls.
  assert len(traces) == 1
  assert jitted._cache_size() == 1


@functools.lru_cache
def _soap_power_qr_hlo(refresh_batching):
  """The compiled text of a power-QR SOAP update (compiled once for the
  tests that read it)."""
  tx = fo.scale_by_soap(check_frequency=2, block_size=4, stagger=False,
                        refresh_method="power_qr",
                        refresh_batching=refresh_batching)
  return jax.jit(tx.update).lower(_grads(np.random.default_rng(0)),
                                  tx.init(PARAMS)).compile().as_text()


def test_soap_power_qr_behind_conditionals():
  hlo = _soap_power_qr_hlo("bucket")
  calls, unconditional = _unconditional_expensive_calls(hlo)
  assert "syevd" in hlo and "geqrf" in hlo
  assert len(calls) >= 2 and not unconditional, unconditional


@pytest.fixture
def executed_eighs(monkeypatch):
  """A list that gains one entry each time an `eigh` call actually runs."""
  executed = []
  original = linalg.eigh

  def counting_eigh(matrix):
    # Fires only when the branch holding the EVD actually runs.
    jax.debug.callback(lambda: executed.append(1))
    return original(matrix)

  monkeypatch.setattr(linalg, "eigh", counting_eigh)
  return executed


@pytest.mark.parametrize("refresh_batching", ["map", "bucket"])
def test_skipped_eigendecompositions_are_not_executed(refresh_batching,
                                                     executed_eighs):
  executed = executed_eighs
  tx = fo.scale_by_foam(refresh_batching=refresh_batching, b2=0.99, **KW)
  rng = np.random.default_rng(3)
  # A slowly changing problem: a fixed mean gradient plus small noise.
  mean = _grads(rng)
  steps = 30
  grads = jax.tree.map(
      lambda m: jnp.stack([m + jnp.asarray(0.05 * rng.standard_normal(
          m.shape), m.dtype) for _ in range(steps)]), mean)

  def body(s, g):
    _, s = tx.update(g, s)
    return s, fo.stats(s)

  _, stats = jax.jit(lambda s, g: lax.scan(body, s, g),
                     compiler_options=FAST_COMPILE)(tx.init(PARAMS), grads)
  jax.effects_barrier()
  evds, checks = (int(stats["eigendecompositions"][-1]),
                  int(stats["checks"][-1]))
  num_factors = int(stats["num_factors"][-1])
  # Checks at 2, 4, ..., 30 for every factor; most of them reuse the basis.
  assert checks == num_factors * (steps // 2)
  assert num_factors <= evds < checks // 3
  if refresh_batching == "map":
    # One eigh per factor refresh, none for the skipped ones.
    assert len(executed) == evds
  else:
    # One batched eigh per stack that has a refresh to do.
    assert 0 < len(executed) <= evds


def test_conditional_analysis_detects_unconditional_eigh():
  # The analysis above must be able to fail: an unconditional eigh, and a
  # cond under vmap (lowered to a select over both branches), are flagged.
  x = jnp.eye(3)
  eig = lambda a: jnp.linalg.eigh(a)[0]
  plain = jax.jit(eig).lower(x).compile().as_text()
  in_cond = jax.jit(lambda a, p: lax.cond(p, eig, lambda a: a[0], a)).lower(
      x, True).compile().as_text()
  batched = jax.jit(jax.vmap(lambda a, p: lax.cond(
      p, eig, lambda a: a[0], a))).lower(
          jnp.stack([x, x]), jnp.array([True, False])).compile().as_text()
  assert _unconditional_expensive_calls(plain)[1]
  assert _unconditional_expensive_calls(batched)[1]
  calls, unconditional = _unconditional_expensive_calls(in_cond)
  assert calls and not unconditional


def _branch_calls(hlo):
  """[(branch names, [expensive call kinds executed by each branch])] per
  `conditional`: a branch executes the calls reachable from it without
  passing through a further conditional."""
  comps = _computations(hlo)
  comps.pop("__entry__")
  names = set(comps)
  plain = {name: set() for name in comps}
  conditionals = []
  for name, lines in comps.items():
    for line in lines:
      if " conditional(" in line:
        branches = re.search(r"branch_computations=\{([^}]*)\}", line)
        if branches is None:   # true_computation= / false_computation=
          found = re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line)
        else:
          found = re.findall(r"%?([\w.\-]+)", branches.group(1))
        conditionals.append(found)
        continue
      for ref in re.findall(r"%([\w.\-]+)", line):
        if ref in names and ref != name:
          plain[name].add(ref)

  def executed(branch):
    reached, todo = {branch}, [branch]
    while todo:
      for ref in plain[todo.pop()]:
        if ref not in reached:
          reached.add(ref)
          todo.append(ref)
    return {kind for name in reached for line in comps[name]
            if "custom-call(" in line for kind in EXPENSIVE if kind in line}

  return [(branches, [executed(b) for b in branches])
          for branches in conditionals]


@pytest.mark.parametrize("refresh_batching", ["map", "bucket"])
def test_soap_power_qr_eigh_and_qr_in_separate_branches(refresh_batching):
  """Ordinary power-QR checks run a branch with the QR and no eigh.

  With 'map' the eigh (first basis) and the QR (later checks) are the two
  branches of one conditional and no branch runs both. With 'bucket' the
  eigh branch of a stack (taken only when a member needs its first basis)
  also runs the QR for the other members; its sibling, the branch of
  ordinary checks, runs the QR alone.
  """
  hlo = _soap_power_qr_hlo(refresh_batching)
  eigh, qr = EXPENSIVE
  conds = _branch_calls(hlo)
  with_eigh = [(names, calls) for names, calls in conds
               if any(eigh in c for c in calls)]
  assert with_eigh   # the analysis finds the eigh branches
  for names, calls in with_eigh:
    assert len(calls) == 2, names
    (eigh_side,) = [c for c in calls if eigh in c]
    (other,) = [c for c in calls if eigh not in c]
    assert other == {qr}, (names, calls)
    if refresh_batching == "map":
      assert eigh_side == {eigh}, (names, calls)
  # The QR-only branches are exactly those siblings: no other QR.
  assert sum(calls == {qr} for _, cs in conds for calls in cs) == len(
      with_eigh)
  if refresh_batching == "map":
    # No branch, and so no single computation, runs both kernels.
    assert not any({eigh, qr} <= c for _, cs in conds for c in cs)


def test_branch_analysis_detects_eigh_and_qr_together():
  # The analysis above must be able to fail: eigh and QR in one branch.
  x = jnp.eye(3)
  both = lambda a: jnp.linalg.eigh(a)[0] + jnp.linalg.qr(a)[1][0]
  qr_only = lambda a: jnp.linalg.qr(a)[1][0]
  hlo = jax.jit(lambda a, p: lax.cond(p, both, qr_only, a)).lower(
      x, True).compile().as_text()
  (names, calls), = _branch_calls(hlo)
  assert sorted(map(sorted, calls)) == [["geqrf"], ["geqrf", "syevd"]]


@pytest.mark.parametrize("refresh_batching", ["map", "bucket"])
def test_soap_power_qr_executes_eigh_only_for_first_bases(refresh_batching,
                                                          executed_eighs):
  executed = executed_eighs
  # Stepping from the first gradient, tensors as blocked matrices (stacked
  # with the other blocks).
  tx = fo.scale_by_soap(check_frequency=2, block_size=4, precondition_1d=True,
                        stagger=False, refresh_method="power_qr",
                        refresh_batching=refresh_batching, first_step="update",
                        tensor_shaping="matrix")
  steps = 8
  rng = np.random.default_rng(5)
  grads = jax.tree.map(lambda p: jnp.asarray(
      rng.standard_normal((steps,) + p.shape), p.dtype), PARAMS)

  def body(s, g):
    _, s = tx.update(g, s)
    return s, fo.stats(s)

  state = tx.init(PARAMS)
  _, stats = jax.jit(lambda s, g: lax.scan(body, s, g),
                     compiler_options=FAST_COMPILE)(state, grads)
  jax.effects_barrier()
  num_factors = int(stats["num_factors"][-1])
  stacks = len([f for f in jax.tree.leaves(
      state.classes, is_leaf=lambda x: isinstance(x, fo.FactorStack))
                if isinstance(f, fo.FactorStack)])
  # Checks at 1, 2, 4, 6, 8, each a refresh ('stale'): the first by eigh,
  # the other four by power-QR.
  assert int(stats["eigendecompositions"][-1]) == 5 * num_factors
  # One eigh per factor ('map'), one batched eigh per stack ('bucket'),
  # for the first bases only.
  assert len(executed) == (num_factors if refresh_batching == "map" else stacks)
  assert stacks < num_factors


def _factor_counters(state):
  """(checks, refreshes, phase) of every factor, stack after stack."""
  (core,) = fo.find_states(state)
  stacks = [fs for cls in core.classes for fs in (cls.left, cls.right)
            if fs is not None]
  return tuple(np.concatenate([np.asarray(getattr(fs, name)) for fs in stacks])
               for name in ("checks", "refreshes", "phase"))


@pytest.mark.parametrize("make,every_check_refreshes", [
    (fo.scale_by_shampoo, True), (fo.scale_by_foam, False)])
def test_factors_check_on_their_phase_and_refresh_only_there(
    make, every_check_refreshes):
  """Step ``t`` checks a factor iff ``t == s0`` or ``t > s0`` and ``(t +
  phase) % f == 0``; stale Shampoo refreshes at every check, FOAM at some."""
  frequency, first, steps = 3, 2, 10
  tx = make(check_frequency=frequency, start_preconditioning_step=first,
            block_size=4, precondition_1d=True, stagger=True)
  params = {"w": jnp.zeros((6, 4)), "v": jnp.zeros((7,)), "k": jnp.zeros(
      (3, 3))}
  update = jax.jit(tx.update, compiler_options=FAST_COMPILE)
  state = tx.init(params)
  checks, refreshes, phase = _factor_counters(state)
  assert len(set(phase.tolist())) == frequency     # stagger spreads them
  rng = np.random.default_rng(0)
  for t in range(1, steps + 1):
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    state = update(grads, state)[1]
    new_checks, new_refreshes, _ = _factor_counters(state)
    checked, refreshed = new_checks - checks, new_refreshes - refreshes
    want = np.array([t == first or (t > first and (t + p) % frequency == 0)
                     for p in phase])
    np.testing.assert_array_equal(checked, want, err_msg=f"step {t}")
    assert np.all(refreshed <= checked), t
    if every_check_refreshes:
      np.testing.assert_array_equal(refreshed, checked, err_msg=f"step {t}")
    checks, refreshes = new_checks, new_refreshes
  assert refreshes.sum() > 0


def test_requests_without_a_mesh_are_none():
  plan = layout.Plan()
  assert refresh.requests([jnp.ones(3, bool), jnp.zeros(2, bool)], plan) == [
      None, None]


_REQUESTS = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from foam_optax._src import layout, refresh

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    plan = layout.Plan.for_mesh(mesh.abstract_mesh)

    def body(a, b):
      ra, rb = refresh.requests([a, b], plan)
      return (ra.need_all, rb.need_all, ra.offset, rb.offset, ra.rebalance,
              rb.rebalance)

    run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"),) * 2,
                                out_specs=(P(),) * 6, check_vma=False))
    out = []
    for a, b in json.loads(input()):
      got = run(jnp.asarray(a, bool), jnp.asarray(b, bool))
      out.append([np.asarray(x).tolist() for x in got])
    print(json.dumps(out))
""")


def test_requests_gather_every_devices_flags_and_decide_the_rebalance():
  """On 4 devices, two stacks: each device's `Requests` hold the whole
  stack's flags, the number of requests of the earlier stacks, and whether
  some device holds more than ``ceil(requests / 4)`` of the step's requests."""
  rng = np.random.default_rng(0)
  cases = [([1, 0, 1, 0, 1, 0, 1, 0], [0, 1, 1, 0]),    # one per device
           ([1, 1, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0]),    # all on device 0
           ([0] * 8, [0] * 4),
           ([1] * 8, [1] * 4)]
  cases += [(rng.integers(0, 2, 8).tolist(), rng.integers(0, 2, 4).tolist())
            for _ in range(4)]
  out = subprocess.run(
      [sys.executable, "-c", _REQUESTS], input=json.dumps(cases),
      env=host_devices.env(4), capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-4000:]
  results = json.loads(out.stdout.strip().splitlines()[-1])
  for (a, b), got in zip(cases, results):
    a, b = np.array(a, bool), np.array(b, bool)
    need_a, need_b, offset_a, offset_b, rebalance_a, rebalance_b = got
    assert need_a == a.tolist() and need_b == b.tolist()
    assert (offset_a, offset_b) == (0, int(a.sum()))
    held = a.reshape(4, -1).sum(1) + b.reshape(4, -1).sum(1)
    share = -(-held.sum() // 4)
    assert rebalance_a == rebalance_b == bool(held.max() > share), (a, b)
  assert [r[4] for r in results[:4]] == [False, True, False, False]
