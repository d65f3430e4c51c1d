"""foam_optax optimizers inside the optax ecosystem: wrappers, schedules,
dtypes, state invariants, `optax.tree.map_params`, static options under
`inject_hyperparams`, and convergence on small problems."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import foam_optax as fo
from helpers import leaf_states, normal_like


OPTIMIZERS = {
    "foam": functools.partial(fo.foam, check_frequency=5),
    "shampoo": functools.partial(fo.shampoo, check_frequency=5),
    "soap": functools.partial(fo.soap, weight_decay=0.0),
}


def _sq(tree):
  return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))


def _ill_conditioned(n, m, seed):
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(seed), (n, n)))
  return q[:, :m] * jnp.logspace(0, 1, m)


_A, _B = _ill_conditioned(6, 6, 1), _ill_conditioned(4, 4, 2)
_C = jax.random.normal(jax.random.PRNGKey(3), (6, 4))
_MIXED_TARGET = {
    "s": jnp.asarray(0.5), "v": jnp.arange(3.0),
    "m": jnp.ones((4, 3)), "t": jnp.linspace(-1, 1, 24).reshape(2, 3, 2, 2)}

# name: (loss, initial params, precondition_1d)
PROBLEMS = {
    "parabola": (lambda p: jnp.sum(jnp.arange(1.0, 6.0) * (p - 1.0) ** 2),
                 jnp.zeros(5), False),
    "rosenbrock": (lambda p: (1 - p[0]) ** 2 + 10 * (p[1] - p[0] ** 2) ** 2,
                   jnp.array([-1.0, 1.0]), True),
    "matrix_parabola": (lambda w: _sq(_A @ w @ _B.T - _C), jnp.zeros((6, 4)),
                        False),
    "mixed": (lambda p: _sq(jax.tree.map(jnp.subtract, p, _MIXED_TARGET)),
              jax.tree.map(jnp.zeros_like, _MIXED_TARGET), False),
}


def _train(tx, loss, params, steps):
  """Scan `steps` updates; returns final params, state and losses."""

  def body(carry, _):
    params, state = carry
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), value

  (params, state), losses = jax.jit(
      lambda p: jax.lax.scan(body, (p, tx.init(p)), None, length=steps))(params)
  return params, state, losses


# The runs whose path others take (slow), with the runs that cover it. A
# vector without precondition_1d has no factor: it steps by the grafting
# optimizer (the same program for FOAM and Shampoo) or, in SOAP, by Adam in
# the identity basis, as the mixed target's vector and scalar do. Shampoo's
# leaves (the mixed target's, the preconditioned vector of the Rosenbrock
# function) are laid out and stacked as FOAM's and preconditioned as its
# matrix parabola.
REPEATED = {("foam", "parabola"): "foam-mixed",
            ("shampoo", "parabola"): "foam-mixed",
            ("soap", "parabola"): "soap-mixed",
            ("shampoo", "rosenbrock"):
                "foam-rosenbrock, shampoo-matrix_parabola",
            ("shampoo", "mixed"): "foam-mixed, shampoo-matrix_parabola"}


def _convergence_cases():
  return [pytest.param(name, problem, id=f"{name}-{problem}",
                       marks=(pytest.mark.slow,)
                       if (name, problem) in REPEATED else ())
          for name in OPTIMIZERS for problem in PROBLEMS]


@pytest.mark.parametrize("name,problem", _convergence_cases())
def test_convergence(name, problem):
  loss, params, precondition_1d = PROBLEMS[problem]
  schedule = optax.cosine_decay_schedule(0.1, 200)
  tx = OPTIMIZERS[name](schedule, precondition_1d=precondition_1d)
  final, state, losses = _train(tx, loss, params, 200)
  assert float(loss(final)) < 1e-2 * float(losses[0])
  assert int(fo.stats(state)["eigendecompositions"]) > 0 or problem == "parabola"


_W = {"m": jnp.ones((6, 4)), "v": jnp.ones((4,))}


def _grads(seed):
  return normal_like(_W, seed)


def test_inject_hyperparams_default_foam_injects_block_size_and_changes():
  tx = optax.inject_hyperparams(fo.foam)(
      learning_rate=0.1, check_frequency=2, max_epsilon=1.0)
  state = tx.init(_W)
  assert {"learning_rate", "epsilon", "threshold", "b1", "block_size"} <= set(
      state.hyperparams)
  # The block layout is fixed at init: an eager init reads the injected
  # block_size; a jitted one cannot, unless block_size is static.
  with pytest.raises(ValueError, match="block_size"):
    jax.jit(tx.init)(_W)
  static = optax.inject_hyperparams(fo.foam, static_args=("block_size",))
  # Traced as under jit (its shapes only: nothing to compile).
  assert "block_size" not in jax.eval_shape(static(0.1, block_size=2).init,
                                            _W).hyperparams
  traces = []

  @jax.jit
  def step(params, state, grads, hyper):
    traces.append(None)
    state.hyperparams.update(hyper)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def run(steps=4, learning_rate=0.1, epsilon=1e-9, threshold=0.75, b1=0.95):
    hyper = {k: jnp.float32(v) for k, v in dict(
        learning_rate=learning_rate, epsilon=epsilon, threshold=threshold,
        b1=b1).items()}
    p, s = _W, state
    for i in range(steps):
      p, s = step(p, s, _grads(i), hyper)
    return p, s

  p, _ = run(learning_rate=0.0)
  assert _equal(p, _W)
  # b1: the momentum after one step is (1 - b1) * g.
  _, s = run(steps=1, b1=0.25)
  np.testing.assert_allclose(s.inner_state[0].mu["m"],
                             0.75 * np.asarray(_grads(0)["m"]), rtol=1e-6)
  # epsilon: a fresh eigendecomposition resets the damping to epsilon.
  _, s = run(epsilon=1e-4, threshold=1e6)
  assert float(fo.stats(s)["damping_max"]) == pytest.approx(1e-4)
  # threshold: a tiny one forces an eigendecomposition at every check.
  evds = lambda t: int(fo.stats(run(threshold=t)[1])["eigendecompositions"])
  assert evds(1e-12) > evds(1e6)
  assert len(traces) == 1


_MIXED_DTYPES = {"m": jnp.ones((6, 4)), "v": jnp.ones((4,)),
                 "h": jnp.ones((4, 3), jnp.bfloat16),
                 "t": jnp.ones((2, 3, 2, 2), jnp.bfloat16)}


def _signature(tree):
  return [(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("name", [
    "foam", "soap",
    # Shampoo's state holds FOAM's buffers (cached inverse roots included),
    # stored and cast alike, behind the same alias: slow, as "foam".
    pytest.param("shampoo", marks=pytest.mark.slow)])
def test_update_contracts(name):
  """Injected learning rate, dtypes, state invariants, a single trace."""
  # Without hyperparam_dtype, optax injects hyperparameters in the dtype of
  # the parameters (here bfloat16: b2 = 0.995 would become 0.99609375).
  tx = optax.inject_hyperparams(OPTIMIZERS[name], hyperparam_dtype=jnp.float32)(
      learning_rate=0.1)
  params = _MIXED_DTYPES
  dtypes = [p.dtype for p in jax.tree.leaves(params)]
  plain = OPTIMIZERS[name](0.1)
  plain_updates, _ = jax.eval_shape(
      lambda p: plain.update(p, plain.init(p), p), params)
  assert [u.dtype for u in jax.tree.leaves(plain_updates)] == dtypes
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(grads, state, learning_rate):
    traces.append(None)
    state.hyperparams["learning_rate"] = learning_rate
    return tx.update(grads, state, params)

  before = _signature(state)
  for i in range(6):   # past the first check step of every optimizer
    updates, state = step(normal_like(params, i), state, jnp.float32(0.1))
    assert _signature(state) == before
  # A float32 learning rate promotes bfloat16 updates (as for optax.adam);
  # applying them keeps each parameter's dtype.
  applied = jax.eval_shape(optax.apply_updates, params, updates)
  assert [p.dtype for p in jax.tree.leaves(applied)] == dtypes
  core = state.inner_state[0]
  momenta = core.mu
  assert [m.dtype for m in jax.tree.leaves(momenta)] == dtypes   # mu_dtype
  stat_dtypes = {x.dtype for x in jax.tree.leaves(state)
                 if jnp.issubdtype(x.dtype, jnp.floating)
                 and not any(x is m for m in jax.tree.leaves(momenta))}
  assert stat_dtypes == {jnp.dtype(jnp.float32)}
  # The learning rate is the last factor of the chain.
  grads = normal_like(params, 6)
  small, _ = step(grads, state, jnp.float32(0.05))
  large, _ = step(grads, state, jnp.float32(0.1))
  for a, b in zip(jax.tree.leaves(small), jax.tree.leaves(large)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.any(b != 0)
    np.testing.assert_allclose(2 * a, b, rtol=1e-2, atol=1e-6)
  assert len(traces) == 1
  assert int(fo.stats(state)["eigendecompositions"]) > 0


_P = {"m": jnp.ones((4, 3)), "v": jnp.ones((3,))}


def _loop(tx, grads_list, params=_P):
  """Jitted update + apply over the given gradients; params and states."""
  step = jax.jit(lambda p, s, g: (lambda u_s: (optax.apply_updates(p, u_s[0]),
                                                u_s[1]))(tx.update(g, s, p)))
  state, history = tx.init(params), []
  for g in grads_list:
    params, state = step(params, state, g)
    history.append((params, state))
  return history


def _equal(a, b):
  """Equal trees, compared in NumPy (an eager jnp comparison compiles a
  program per shape)."""
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_multi_steps_applies_every_k_calls():
  tx = optax.MultiSteps(fo.foam(0.1, check_frequency=1), every_k_schedule=3)
  history = _loop(tx, [normal_like(_P, i) for i in range(6)])
  params = [p for p, _ in history]
  assert _equal(params[0], _P) and _equal(params[1], _P)
  assert not _equal(params[2], _P)
  assert _equal(params[3], params[2]) and not _equal(params[5], params[2])
  s = fo.stats(history[-1][1])
  assert int(s["step"]) == 2 and int(s["checks"]) == 2 * int(s["num_factors"])


def test_masked_leaves_pass_through():
  tx = optax.masked(fo.scale_by_foam(check_frequency=1), {"m": True, "v": False})
  grads = normal_like(_P, 0)
  updates, state = jax.jit(tx.update)(grads, tx.init(_P), _P)
  assert _equal(updates["v"], grads["v"])
  assert not _equal(updates["m"], grads["m"])
  s = fo.stats(state)
  assert int(s["num_factors"]) == 2 and int(s["eigendecompositions"]) == 2


def test_partition_sends_vectors_and_embeddings_to_adamw():
  params = {"embed": jnp.ones((10, 3)), "m": jnp.ones((4, 3)),
            "v": jnp.ones((3,))}
  labels = fo.precondition_labels(params)
  assert labels == {"embed": "diagonal", "m": "precondition",
                    "v": "diagonal"}
  foam, adamw = fo.foam(0.1, check_frequency=1), optax.adamw(0.1)
  tx = fo.partition(foam, adamw)
  grads = normal_like(params, 0)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  diag = {k: params[k] for k in ("embed", "v")}
  matrix = {"m": params["m"]}

  @jax.jit   # both references in one program
  def references(grads, adamw_state, foam_state):
    return (adamw.update({k: grads[k] for k in diag}, adamw_state, diag)[0],
            foam.update({"m": grads["m"]}, foam_state, matrix)[0])

  ref_diag, ref_m = references(grads, adamw.init(diag), foam.init(matrix))
  for k in diag:
    np.testing.assert_allclose(updates[k], ref_diag[k], rtol=1e-6)
  np.testing.assert_allclose(updates["m"], ref_m["m"], rtol=1e-5, atol=1e-7)
  assert int(fo.stats(state)["num_factors"]) == 2


def test_apply_if_finite_skips_nonfinite_steps():
  tx = optax.apply_if_finite(fo.foam(0.1, check_frequency=1), 3)
  # float32, not weakly typed: the same compiled step as the clean grads.
  bad = {"m": jnp.full((4, 3), jnp.nan, jnp.float32), "v": jnp.ones((3,))}
  history = _loop(tx, [normal_like(_P, 0), bad, normal_like(_P, 1)])
  (p0, s0), (p1, s1), (p2, s2) = history
  assert _equal(p1, p0) and int(s1.notfinite_count) == 1
  assert _equal(s1.inner_state, s0.inner_state)
  assert not _equal(p2, p1) and int(s2.notfinite_count) == 0
  assert int(fo.stats(s2)["step"]) == 2


def test_learning_rate_schedule_scales_updates():
  schedule = optax.linear_schedule(0.1, 0.0, transition_steps=2)
  history = _loop(fo.foam(schedule, check_frequency=1),
                  [normal_like(_P, i) for i in range(4)])
  params = [_P] + [p for p, _ in history]
  assert not _equal(params[1], params[0]) and not _equal(params[2], params[1])
  # The schedule is 0 from step 3 on: no movement, while statistics advance.
  assert _equal(params[3], params[2]) and _equal(params[4], params[2])
  assert int(fo.stats(history[-1][1])["step"]) == 4


def test_weight_decay_mask_decays_only_masked_leaves():
  """foam(lr, wd, mask) = -lr * (scale_by_foam's u + wd * p * mask), for a
  mask given as a tree of bools and as a callable of the params."""
  params = {"m": jnp.linspace(-1.0, 1.0, 12).reshape(4, 3),
            "v": jnp.array([0.5, -2.0, 3.0])}
  mask_tree = {"m": True, "v": False}
  mask_fn = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  lr, wd = 0.1, 0.5
  txs = [fo.foam(lr, weight_decay=wd, weight_decay_mask=mask,
                 check_frequency=2) for mask in (mask_tree, mask_fn)]
  core = fo.scale_by_foam(check_frequency=2)

  @jax.jit
  def step(states, g):
    out = [tx.update(g, s, params) for tx, s in zip(txs + [core], states)]
    return [u for u, _ in out], [s for _, s in out]

  states = [tx.init(params) for tx in txs + [core]]
  for i in range(3):   # past the first check step
    (*updates, u_core), states = step(states, normal_like(params, i))
    for u in updates:
      for k, p in params.items():
        expected = -lr * (np.asarray(u_core[k])
                          + wd * np.asarray(p) * mask_tree[k])
        np.testing.assert_allclose(u[k], expected, rtol=1e-6, atol=1e-7,
                                   err_msg=f"step {i + 1}, {k}")
      # The decay term is visible: the masked leaf differs from -lr * u.
      assert not np.allclose(u["m"], -lr * u_core["m"], rtol=1e-3)
  assert int(fo.stats(states[-1])["eigendecompositions"]) > 0


ALIASES = {"foam": fo.foam, "shampoo": fo.shampoo, "soap": fo.soap}
PARAMS = {"w": jnp.ones((6, 4)), "k": jnp.ones((2, 3, 4)), "b": jnp.ones(4)}


@pytest.mark.parametrize("name", list(ALIASES))
def test_tree_map_params(name):
  """On the initial state: what is checked depends on the state's structure
  only, which the updates keep (test_update_contracts)."""
  opt = ALIASES[name](1e-2, check_frequency=2, weight_dimension_numbers={
      "w": None, "k": fo.DimensionNumbers(1, 2), "b": None})
  state = opt.init(PARAMS)
  same = optax.tree.map_params(opt, lambda v: v, state)
  assert jax.tree.structure(same) == jax.tree.structure(state)
  # f reaches exactly the per-parameter buffers (momentum, grafting moment);
  # transform_non_params everything else.
  marked = optax.tree.map_params(opt, lambda v: jnp.full_like(v, 7.0), state,
                                 transform_non_params=lambda v: v)
  core, marked_core = state[0], marked[0]
  for before, after in zip(leaf_states(core), leaf_states(marked_core)):
    assert np.all(np.asarray(after.momentum) == 7.0)
    assert before.layout == after.layout
  for a, b in zip(jax.tree.leaves(core.classes),
                  jax.tree.leaves(marked_core.classes)):
    assert a is b
  assert marked_core.count is core.count


def test_inject_hyperparams_with_static_storage_dtype_and_dimension_numbers():
  """As README says: shape and dtype arguments static, then a jitted init."""
  tx = optax.inject_hyperparams(fo.foam, static_args=(
      "block_size", "max_precond_dim", "mu_dtype",
      "weight_dimension_numbers"))(
          learning_rate=0.1, mu_dtype=jnp.bfloat16, block_size=4,
          weight_dimension_numbers=lambda p: {"k": fo.DimensionNumbers(1, 2)})
  state = jax.jit(tx.init)({"k": jnp.ones((2, 3, 4))})
  (leaf,) = leaf_states(state)
  assert leaf.momentum.dtype == jnp.bfloat16 and leaf.layout.batch == 2
  assert set(state.hyperparams) >= {"learning_rate", "epsilon"}
  with pytest.raises(ValueError, match="block_size"):
    jax.jit(optax.inject_hyperparams(fo.foam)(0.1).init)({"w": jnp.ones((4, 4))})
