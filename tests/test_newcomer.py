"""What a first-time user relies on: README recipes as pasted, loud failures,
partition rules, mid-run hyperparameter edits, counters and defaults."""

import ast
import functools
import inspect
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import foam_optax as fo

import readme_blocks
from readme_blocks import README
from readme_blocks import recipe as _recipe
from readme_blocks import run as _run


# ---------------------------------------------------------------------------
# 1. MultiSteps with a NaN micro-batch; a stuck run made visible and loud.


def test_readme_multisteps_recipe_keeps_training():
  ns, printed, expected = _run(_recipe("MultiSteps"))
  assert printed == expected == ["19 0 0"]
  assert all(bool(jnp.all(jnp.isfinite(p)))
             for p in jax.tree.leaves(ns["params"]))
  assert not bool(jnp.all(ns["params"]["w"] == 1.0))


def _multisteps_run(optimizer, micro_steps=20, nan_at=5):
  tx = optax.MultiSteps(optimizer, every_k_schedule=2)
  params = {"w": jnp.ones((8, 4))}

  @jax.jit
  def step(params, state, x):
    grads = jax.grad(lambda p: jnp.sum((x @ p["w"]) ** 2))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for i in range(micro_steps):
    x = jnp.ones((3, 8)) * (jnp.nan if i == nan_at else 1e-2)
    params, state = step(params, state, x)
  return params, state


def test_stuck_multisteps_run_is_visible_in_stats():
  """Without the recipe one NaN micro-batch stops training for good:
  every update from micro-step 5 on is skipped, and stats shows it."""
  _, state = _multisteps_run(fo.foam(1e-2))
  stats = fo.stats(state)
  # Updates are emitted at micro-steps 1, 3, ..., 19; from 5 on all skipped.
  assert int(stats["step"]) == 2
  assert int(stats["nonfinite_skips"]) == 8
  assert int(stats["consecutive_skips"]) == 8


def test_max_consecutive_skips_stops_a_jitted_run():
  with pytest.raises(jax.errors.JaxRuntimeError,
                     match=r"3 updates in a row .*should_skip_update_fn"):
    _multisteps_run(fo.foam(1e-2, max_consecutive_skips=3))
  # A limit that is not reached lets the run go on.
  _, state = _multisteps_run(fo.foam(1e-2, max_consecutive_skips=9))
  assert int(fo.stats(state)["consecutive_skips"]) == 8


def test_consecutive_skips_reset_and_eager_limit():
  tx = fo.scale_by_foam(max_consecutive_skips=2)
  params = {"w": jnp.ones((4, 3))}
  good, bad = {"w": jnp.ones((4, 3))}, {"w": jnp.full((4, 3), jnp.nan)}
  state = tx.init(params)
  step = jax.jit(tx.update)
  for grads, consecutive in ((bad, 1), (good, 0), (bad, 1)):
    _, state = step(grads, state)
    assert int(fo.stats(state)["consecutive_skips"]) == consecutive
  assert int(fo.stats(state)["nonfinite_skips"]) == 2
  with pytest.raises(FloatingPointError, match="max_consecutive_skips=2"):
    tx.update(bad, state)          # eagerly: a plain Python exception


def test_max_consecutive_skips_needs_skipping():
  with pytest.raises(ValueError, match="max_consecutive_skips needs"):
    fo.foam(1e-3, skip_nonfinite=False, max_consecutive_skips=5)


def test_skip_wrapper_traces_inner_update_once():
  traces = []
  core = fo.scale_by_foam()

  def update(updates, state, params=None):
    traces.append(None)
    return core.update(updates, state, params)

  tx = fo.skip_nonfinite(optax.GradientTransformation(core.init, update))
  params = {"w": jnp.ones((4, 3))}
  jax.jit(tx.update)(params, tx.init(params), params)
  assert len(traces) == 1


# ---------------------------------------------------------------------------
# 2. fo.partition routes by shape and by name.


def test_readme_partition_recipe_prints_the_split():
  ns, printed, expected = _run(_recipe("precondition_labels"))
  assert printed == expected and len(printed) == 1
  labels = ast.literal_eval(printed[0])
  assert labels["attention"]["bias"] == "diagonal"    # 2-D, but a bias
  assert labels["attention"]["kernel"] == "precondition"
  assert int(fo.stats(ns["state"])["num_factors"]) == 4


def test_partition_labels_by_name_and_shape():
  params = {"attn": {"bias": jnp.zeros((4, 16)), "kernel": jnp.zeros((8, 4))},
            "LayerNorm_0": {"scale": jnp.zeros((2, 8))},
            "token_embedder": jnp.zeros((50, 8)), "dense": jnp.zeros((8, 8)),
            "vector": jnp.zeros((8,)), "column": jnp.zeros((8, 1))}
  assert fo.precondition_labels(params) == {
      "attn": {"bias": "diagonal", "kernel": "precondition"},
      "LayerNorm_0": {"scale": "diagonal"}, "token_embedder": "diagonal",
      "dense": "precondition", "vector": "diagonal", "column": "diagonal"}
  # Empty patterns leave only the shape rule.
  shape_only = fo.precondition_labels(params, bias_and_norm_pattern="",
                                      embedding_pattern="")
  assert shape_only["attn"]["bias"] == "precondition"
  assert shape_only["token_embedder"] == "precondition"
  assert shape_only["vector"] == "diagonal"
  # The 2-D bias gets AdamW's update in fo.partition.
  tx = fo.partition(fo.foam(0.1), optax.adamw(0.1))
  bias_only = {"bias": params["attn"]["bias"]}
  grads = {"bias": jnp.ones((4, 16))}
  updates, _ = tx.update(grads, tx.init(bias_only), bias_only)
  adam, _ = optax.adamw(0.1).update(grads, optax.adamw(0.1).init(bias_only),
                                    bias_only)
  np.testing.assert_allclose(updates["bias"], adam["bias"], rtol=1e-6)


# ---------------------------------------------------------------------------
# 4. inject_hyperparams: what takes effect, what is rejected.


def test_readme_inject_hyperparams_recipe():
  ns, _, _ = _run(_recipe("inject_hyperparams"))
  state = ns["state"]
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(3e-4)
  assert "block_size" not in state.hyperparams
  assert int(fo.stats(state)["step"]) == 1
  # The update used the edited learning rate: a first FOAM step is the
  # grafted Adam step, of size lr per entry.
  np.testing.assert_allclose(ns["updates"]["w"], -3e-4, rtol=1e-3)


_W = {"w": jnp.ones((6, 4)), "v": jnp.ones((6, 6))}


def _grads(i):
  keys = jax.random.split(jax.random.PRNGKey(i), 2)
  return {"w": jax.random.normal(keys[0], (6, 4)),
          "v": jax.random.normal(keys[1], (6, 6))}


@pytest.mark.parametrize("name,initial,edited", [
    ("block_size", 4, 3), ("block_size", 1024, 5),
    ("max_precond_dim", 8, 4)])
def test_structural_edit_raises(name, initial, edited):
  tx = optax.inject_hyperparams(fo.foam)(1e-3, **{name: initial})
  state = tx.init(_W)
  state.hyperparams[name] = jnp.asarray(edited)
  with pytest.raises(ValueError, match=f"{name}={edited} does not match"):
    tx.update(_grads(0), state, _W)
  with pytest.raises(jax.errors.JaxRuntimeError,
                     match=f"{name}={edited} does not match"):
    jax.block_until_ready(jax.jit(tx.update)(_grads(0), state, _W))


def test_structural_edit_with_the_same_layout_is_accepted():
  tx = optax.inject_hyperparams(fo.foam)(1e-3, block_size=1024,
                                         max_precond_dim=8)
  state = tx.init(_W)
  # Every side is at most 6: these give the layout the state already has.
  state.hyperparams["block_size"] = jnp.asarray(6)
  state.hyperparams["max_precond_dim"] = jnp.asarray(100)
  _, state = jax.jit(tx.update)(_grads(0), state, _W)
  assert int(fo.stats(state)["step"]) == 1


def test_injected_check_frequency_takes_effect():
  tx = optax.inject_hyperparams(fo.foam)(
      1e-3, check_frequency=100, start_preconditioning_step=1, stagger=False)
  step = jax.jit(tx.update)

  def checks(frequency):
    state = tx.init(_W)
    state.hyperparams["check_frequency"] = jnp.asarray(frequency)
    for i in range(6):
      _, state = step(_grads(i), state, _W)
    return int(fo.stats(state)["checks"])

  num_factors = 4
  assert checks(100) == num_factors            # only the first check
  assert checks(2) == 4 * num_factors          # steps 1, 2, 4, 6


# ---------------------------------------------------------------------------
# 5. Counters agree, or differ exactly as documented.


def test_damping_mean_never_above_max():
  # 12 factors at damping 1e-9: a float32 mean rounds to 1.0000001e-9.
  params = {f"m{i}": jnp.ones((3 + i, 2)) for i in range(6)}
  state = fo.foam(1e-3).init(params)
  raw = jnp.mean(jnp.full((12,), 1e-9, jnp.float32))
  assert raw > jnp.float32(1e-9)       # the rounding this guards against
  stats = fo.stats(state)
  assert int(stats["num_factors"]) == 12
  assert stats["damping_min"] <= stats["damping_mean"] <= stats["damping_max"]


class _Model(nnx.Module):

  def __init__(self):
    self.w = nnx.Param(jnp.ones((4, 3)))


def test_step_counters_with_a_skipped_step():
  """nnx.Optimizer.step and inject_hyperparams' count see every call;
  fo.stats' step only applied updates; alias schedules pause."""
  grads = [{"w": jnp.full((4, 3), v)} for v in (1.0, jnp.nan, 2.0, 3.0)]
  schedule = optax.linear_schedule(1.0, 0.0, 10)

  model = _Model()
  optimizer = nnx.Optimizer(model, fo.foam(schedule), wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer, g):
    optimizer.update(model, nnx.grad(lambda m: jnp.sum(m.w * g))(model))

  for g in grads:
    nnx_step(model, optimizer, g["w"])
  stats = fo.stats(optimizer.opt_state)
  assert int(stats["step"]) == 3 and int(stats["nonfinite_skips"]) == 1
  assert int(optimizer.step[...]) == 4 == int(stats["step"] + stats[
      "nonfinite_skips"])
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  schedule_counts = [int(s.count[...]) for s in jax.tree.leaves(
      optimizer.opt_state, is_leaf=is_schedule) if is_schedule(s)]
  assert schedule_counts == [3]        # the alias's schedule paused

  tx = optax.inject_hyperparams(fo.foam)(learning_rate=schedule)
  params = {"w": jnp.ones((4, 3))}
  state = tx.init(params)
  step = jax.jit(tx.update)
  for g in grads:
    _, state = step(g, state, params)
  stats = fo.stats(state)
  assert int(state.count) == 4 == int(stats["step"] + stats["nonfinite_skips"])
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(
      float(schedule(3)))


# ---------------------------------------------------------------------------
# 6. The README's defaults table is the code's.


@pytest.mark.parametrize("marker,table", [
    ("defaults-table", "defaults_table"), ("arguments-table", "arguments_table")])
def test_readme_tables_are_derived_from_the_option_table(marker, table):
  """The README's tables are generated from the one table of options."""
  from foam_optax._src import readme_tables
  text = README.read_text()
  start, end = f"<!-- {marker}:start -->\n", f"\n<!-- {marker}:end -->"
  block = text[text.index(start) + len(start):text.index(end)]
  expected = getattr(readme_tables, table)()
  assert block == expected, (
      f"README.md's {marker} is stale: run `python -m "
      "foam_optax._src.readme_tables README.md`")


def test_readme_defaults_are_the_signatures():
  """Cross-check of the generated table against `inspect`: every default
  shown is the one the function has."""
  text = README.read_text()
  table = text[text.index("<!-- defaults-table:start -->"):
               text.index("<!-- defaults-table:end -->")]
  rows = [r.strip("|").split("|") for r in table.splitlines()
          if r.startswith("| `")]
  factories = [fo.foam, fo.shampoo, fo.soap, fo.asgo, optax.adamw]
  rename = {optax.adamw: {"epsilon": "eps"}}
  documented = set()
  for row in rows:
    arg = re.match(r"\s*`(\w+)`", row[0]).group(1)
    documented.add(arg)
    for factory, cell in zip(factories, row[1:]):
      params = inspect.signature(factory).parameters
      name = rename.get(factory, {}).get(arg, arg)
      cell = cell.strip()
      if cell == "—":
        assert name not in params, (factory.__name__, arg)
      else:
        assert params[name].default == ast.literal_eval(cell.strip("`")), (
            factory.__name__, arg)
  for factory in factories[:-1]:
    assert set(inspect.signature(factory).parameters) - {"learning_rate"} <= (
        documented), factory.__name__

# ---------------------------------------------------------------------------
# 7. Flax NNX: the functional loop, integer leaves, NNX-built trees.


def test_readme_nnx_recipe_both_loops_agree():
  ns, printed, expected = _run(_recipe("nnx.split"))
  assert printed == expected
  first, second = ns["model"], ns["model_2"]
  for a, b in zip(jax.tree.leaves(nnx.state(first, nnx.Param)),
                  jax.tree.leaves(nnx.state(second, nnx.Param))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _split_mlp():
  model = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  grads = jax.grad(lambda p: jnp.sum(nnx.merge(graphdef, p)(
      jnp.ones((3, 4))) ** 2))(params)
  return params, grads


@pytest.mark.parametrize("make", [
    lambda: fo.foam(1e-3), lambda: fo.shampoo(1e-3), lambda: fo.soap(1e-3),
    lambda: fo.partition(fo.foam(1e-3), optax.adamw(1e-3))])
def test_updates_keep_the_gradients_structure_with_nnx_params(make):
  params, grads = _split_mlp()
  tx = make()
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(grads)
  new = optax.apply_updates(params, updates)
  assert jax.tree.structure(new) == jax.tree.structure(params)


def test_nnx_state_on_one_device_is_the_state_of_the_arrays():
  """Only a state laid out for a device mesh carries Flax NNX sharding
  annotations (tests/test_multi_device.py): on one device the state of NNX
  parameters is that of their arrays, as it always was."""
  params, _ = _split_mlp()
  for tx in (fo.foam(1e-3), fo.soap(1e-3), fo.asgo(1e-3)):
    state = tx.init(params)
    assert jax.tree.structure(state) == jax.tree.structure(
        tx.init(nnx.as_pure(params)))
    assert not any(isinstance(x, nnx.Variable) for x in jax.tree.leaves(
        state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def test_dimension_numbers_from_nnx_state_and_short_errors():
  params, _ = _split_mlp()
  numbers = jax.tree.map(
      lambda p: fo.DimensionNumbers(0, 1) if p.ndim == 2 else None, params)
  fo.foam(1e-3, weight_dimension_numbers=numbers).init(params)
  # A tree that still holds the arrays: one short line naming the leaf.
  with pytest.raises(ValueError) as error:
    fo.foam(1e-3, weight_dimension_numbers=params).init(params)
  message = str(error.value)
  assert "['bias']" in message and "DimensionNumbers" in message
  assert len(message) < 400 and "0." not in message
  with pytest.raises(ValueError) as error:
    fo.foam(1e-3, weight_dimension_numbers={"other": None}).init(
        {"w": jnp.full((64, 64), 0.123)})
  assert "prefix" in str(error.value) and "0.123" not in str(error.value)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_parameters_rejected_at_init_naming_the_leaf(dtype):
  params = {"w": jnp.ones((4, 3)), "steps": jnp.zeros((4, 3), dtype)}
  for tx in (fo.foam(1e-3), fo.soap(1e-3),
             fo.partition(fo.foam(1e-3), optax.adamw(1e-3))):
    with pytest.raises(ValueError, match=r"\['steps'\].*floating-point"):
      tx.init(params)


def test_float0_gradient_rejected_naming_the_leaf():
  tx = fo.foam(1e-3)
  state = tx.init({"w": jnp.ones((4, 3))})
  grads = {"w": np.zeros((4, 3), jax.dtypes.float0)}
  with pytest.raises(ValueError, match=r"\['w'\].*float0"):
    tx.update(grads, state)


def test_stuck_run_with_nonfinite_parameters_names_them():
  """A NaN learning rate makes the parameters NaN; the stuck run's error
  then names the parameters, not the gradients."""
  tx = fo.foam(lambda count: jnp.where(count >= 2, jnp.nan, 1e-3),
               max_consecutive_skips=3)
  params = {"w": jnp.ones((4, 3))}
  state = tx.init(params)
  loss = lambda p: jnp.sum(p["w"] ** 2)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  with pytest.raises(Exception, match="parameters themselves are not finite"):
    for _ in range(8):
      params, state = step(params, state)
      jax.block_until_ready(params)


def test_overflowing_finite_gradients_are_counted_apart():
  tx = fo.foam(1e-3)
  params = {"w": jnp.ones((4, 3))}
  state = tx.init(params)
  for g in (1e30, np.nan, 1.0):
    _, state = tx.update({"w": jnp.full((4, 3), g)}, state, params)
  stats = fo.stats(state)
  assert int(stats["nonfinite_skips"]) == 2
  assert int(stats["overflow_skips"]) == 1
  assert int(stats["step"]) == 1


def test_readme_bias_correction_recipe_trains_with_microbatch_grads():
  ns, printed, expected = _run(_recipe("microbatch_grads"))
  assert printed == expected == ["True"]
  # The recipe's optimizer is a corrected one: it refuses to run without
  # the per-microbatch gradients.
  with pytest.raises(ValueError, match="per-microbatch gradients"):
    ns["tx"].update(ns["params"], ns["state"], ns["params"])


# ---------------------------------------------------------------------------
# 8. Microbatch gradients through partitions, and when nothing uses them.

_MB_PARAMS = {"w": jnp.ones((6, 4)) / 3, "b": jnp.zeros(4)}


def _microbatches(seed):
  """(grads, per-microbatch grads) of 8 microbatches of 4 examples."""
  batch = jax.random.normal(jax.random.PRNGKey(seed), (32, 6))
  loss_fn = lambda p, x: jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2)
  _, grads, micro = fo.microbatch_grads(loss_fn, _MB_PARAMS, batch, 8)
  return grads, micro


def _updates_with_microbatches(tx, params=_MB_PARAMS, micro=True):
  """The updates of three jitted steps, each given its microbatches (or
  not)."""
  state = tx.init(params)
  step = jax.jit(lambda g, s, m: tx.update(g, s, params, **(
      {"microbatch_grads": m} if micro else {})))
  out = []
  for i in range(3):
    grads, microbatches = (
        {k: tree[k] for k in params} for tree in _microbatches(i))
    updates, state = step(grads, state, microbatches)
    out.append(updates)
  return out


def _matrix_part(lr=1e-2):
  return fo.foam(lr, bias_correction="cross_fit", check_frequency=1,
                 start_preconditioning_step=1)


# Per corrected part: the matrix and diagonal optimizers of the partition.
_PARTS = {
    "matrix": (_matrix_part, lambda: optax.adamw(1e-2)),
    "diagonal": (lambda: fo.foam(1e-2, check_frequency=1,
                                 start_preconditioning_step=1),
                 lambda: fo.bias_corrected_adamw(1e-2)),
}


@functools.cache
def _alone(corrected):
  """Each part's updates alone on its own leaves."""
  matrix, diagonal = _PARTS[corrected]
  return (_updates_with_microbatches(matrix(), {"w": _MB_PARAMS["w"]},
                                     micro=corrected == "matrix"),
          _updates_with_microbatches(diagonal(), {"b": _MB_PARAMS["b"]},
                                     micro=corrected == "diagonal"))


@pytest.mark.parametrize("wrap", [
    lambda matrix, diagonal: fo.partition(matrix, diagonal),
    lambda matrix, diagonal: optax.partition(
        {"precondition": matrix, "diagonal": diagonal}, fo.precondition_labels),
    lambda matrix, diagonal: optax.multi_transform(
        {"precondition": matrix, "diagonal": diagonal}, fo.precondition_labels),
], ids=["fo.partition", "optax.partition", "optax.multi_transform"])
@pytest.mark.parametrize("corrected", sorted(_PARTS))
def test_partitioned_optimizers_get_their_part_of_the_microbatches(
    wrap, corrected):
  """Each part of a partition steps exactly as it does alone on its own
  leaves, the bias-corrected one with its own part of the microbatches."""
  matrix, diagonal = _PARTS[corrected]
  with warnings.catch_warnings():
    # optax.partition of fo.foam, uncorrected, and a corrected AdamW: the
    # fo.foam alias cannot see that the AdamW uses the microbatches.
    warnings.filterwarnings("ignore", "foam_optax: microbatch_grads ignored")
    joint = _updates_with_microbatches(wrap(matrix(), diagonal()))
  alone_w, alone_b = _alone(corrected)
  for u, w, b in zip(joint, alone_w, alone_b):
    np.testing.assert_allclose(u["w"], w["w"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(u["b"], b["b"], rtol=1e-6, atol=1e-9)
  assert float(jnp.abs(joint[-1]["w"]).max()) > 0


def test_mismatched_microbatch_tree_under_partition_names_both():
  tx = fo.partition(_matrix_part(), optax.adamw(1e-2))
  grads, micro = _microbatches(0)
  with pytest.raises(ValueError, match="microbatch_grads must have the "
                     "gradients' tree structure"):
    tx.update(grads, tx.init(_MB_PARAMS), _MB_PARAMS,
              microbatch_grads={"w": micro["w"]})


def _warnings_of(tx, micro=True):
  grads, microbatches = _microbatches(0)
  state = tx.init(_MB_PARAMS)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    # The warning comes at trace time: tracing is enough.
    jax.eval_shape(lambda g, s, m: tx.update(g, s, _MB_PARAMS,
                                             microbatch_grads=m),
                   grads, state, microbatches if micro else None)
  return [str(w.message) for w in caught
          if "microbatch_grads ignored" in str(w.message)]


@pytest.mark.parametrize("make", [
    lambda: fo.foam(1e-2), lambda: fo.soap(1e-2), lambda: fo.asgo(1e-2),
    lambda: fo.dasgo(1e-2), lambda: fo.scale_by_foam(),
    lambda: fo.partition(fo.foam(1e-2), optax.adamw(1e-2)),
    lambda: optax.chain(fo.scale_by_shampoo(), optax.scale(-1e-2))],
    ids=["foam", "soap", "asgo", "dasgo", "scale_by_foam", "partition",
         "chain"])
def test_microbatches_that_nothing_uses_warn(make):
  messages = _warnings_of(make())
  assert len(messages) == 1, messages
  assert "bias_correction='cross_fit'" in messages[0]
  assert not _warnings_of(make(), micro=False)


@pytest.mark.parametrize("make", [
    _matrix_part, lambda: fo.bias_corrected_adamw(1e-2),
    lambda: fo.partition(_matrix_part(), optax.adamw(1e-2)),
    lambda: fo.partition(fo.foam(1e-2), fo.bias_corrected_adamw(1e-2))],
    ids=["foam_cross_fit", "bias_corrected_adamw", "partition_matrix",
         "partition_diagonal"])
def test_microbatches_that_one_part_uses_do_not_warn(make):
  assert not _warnings_of(make())


# ---------------------------------------------------------------------------
# 9. fo.stats on the state of every optimizer this package makes.


def _mup_chain():
  wide = {"w": jnp.ones((6, 4)), "b": jnp.zeros(4)}
  base = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  return optax.chain(fo.scale_by_foam(), fo.scale_by_mup(
      fo.mup_multipliers(wide, base, optimizer="grafted")), optax.scale(-1e-2))


# (factory, uses microbatches, skips a non-finite step, factors, refreshes
# after 2 applied steps as (eigendecompositions, inverse_roots))
_EVERY_OPTIMIZER = {
    "foam": (lambda: fo.foam(1e-2), False, True, 2, (0, 0)),
    "shampoo": (lambda: fo.shampoo(1e-2, check_frequency=1), False, True, 2,
                (4, 0)),
    "soap": (lambda: fo.soap(1e-2), False, True, 2, (2, 0)),
    "asgo": (lambda: fo.asgo(1e-2), False, True, 1, (0, 2)),
    "asgo_eigh": (lambda: fo.asgo(1e-2, root_method="eigh"), False, True, 1,
                  (2, 0)),
    "dasgo": (lambda: fo.dasgo(1e-2), False, True, 0, (0, 0)),
    "bias_corrected_adamw": (lambda: fo.bias_corrected_adamw(1e-2), True,
                             True, 0, (0, 0)),
    "shampoo_cross_fit": (lambda: fo.shampoo(
        1e-2, bias_correction="cross_fit", check_frequency=1), True, True, 2,
                          (4, 0)),
    "scale_by_foam": (fo.scale_by_foam, False, True, 2, (0, 0)),
    "scale_by_shampoo": (fo.scale_by_shampoo, False, True, 2, (0, 0)),
    "scale_by_soap": (fo.scale_by_soap, False, True, 2, (2, 0)),
    "scale_by_asgo": (fo.scale_by_asgo, False, True, 1, (0, 2)),
    # The bare transformations without factors skip nothing on their own.
    "scale_by_dasgo": (fo.scale_by_dasgo, False, False, 0, (0, 0)),
    "scale_by_bias_corrected_adam": (fo.scale_by_bias_corrected_adam, True,
                                     False, 0, (0, 0)),
    "mup_chain": (_mup_chain, False, True, 2, (0, 0)),
    "spectral_norm_chain": (lambda: optax.chain(
        fo.scale_by_soap(), fo.scale_by_spectral_norm(), optax.scale(-1e-2)),
                            False, True, 2, (2, 0)),
    "partition": (lambda: fo.partition(fo.asgo(1e-2), optax.adam(1e-2)),
                  False, True, 1, (0, 2)),
    "partition_dasgo": (lambda: fo.partition(fo.dasgo(1e-2),
                                             fo.bias_corrected_adamw(1e-2)),
                        True, True, 0, (0, 0)),
}


@pytest.mark.parametrize("name", sorted(_EVERY_OPTIMIZER))
def test_stats_reports_every_optimizer_of_the_package(name):
  """A good step, a NaN step, a good step: two applied updates and one
  skipped (or, without a skipping wrapper, three applied)."""
  make, micro, skips, factors, refreshes = _EVERY_OPTIMIZER[name]
  tx = make()
  state = tx.init(_MB_PARAMS)
  step = jax.jit(lambda g, s, m: tx.update(g, s, _MB_PARAMS,
                                           **({"microbatch_grads": m}
                                              if micro else {})))
  for i, scale in enumerate((1.0, jnp.nan, 1.0)):
    grads, microbatches = _microbatches(i)
    grads = jax.tree.map(lambda g: g * scale, grads)
    microbatches = jax.tree.map(lambda g: g * scale, microbatches)
    _, state = step(grads, state, microbatches)
  stats = fo.stats(state)
  assert {"eigendecompositions", "inverse_roots", "checks", "damping_max",
          "damping_mean", "proxy_max", "nonfinite_skips", "step",
          "consecutive_skips", "num_factors"} <= set(stats)
  assert (int(stats["step"]), int(stats["nonfinite_skips"])) == (
      (2, 1) if skips else (3, 0))
  assert int(stats["consecutive_skips"]) == 0
  assert int(stats["num_factors"]) == factors
  assert (int(stats["eigendecompositions"]),
          int(stats["inverse_roots"])) == refreshes


def test_stats_names_what_it_reads_when_there_is_nothing():
  tx = optax.chain(optax.scale_by_adam(), fo.scale_by_spectral_norm())
  with pytest.raises(ValueError, match="scale_by_dasgo.*scale_by_mup"):
    fo.stats(tx.init(_MB_PARAMS))


def test_asgo_counts_polar_express_roots_as_inverse_roots():
  """Official ASGO: one root per factor and step, no eigendecomposition;
  with root_method='eigh' the same count of eigendecompositions."""
  params = {"a": jnp.ones((6, 4)), "b": jnp.ones((3, 5))}
  counts = {}
  for method in ("polar_express", "eigh"):
    tx = fo.asgo(1e-2, root_method=method)
    state = tx.init(params)
    step = jax.jit(tx.update)
    for i in range(5):
      grads = jax.tree.map(
          lambda p: jax.random.normal(jax.random.PRNGKey(i), p.shape), params)
      _, state = step(grads, state, params)
    stats = fo.stats(state)
    counts[method] = (int(stats["eigendecompositions"]),
                      int(stats["inverse_roots"]),
                      int(stats["eigendecompositions_left"]
                          + stats["eigendecompositions_right"]))
  assert counts == {"polar_express": (0, 10, 0), "eigh": (10, 0, 10)}


# ---------------------------------------------------------------------------
# 10. ASGO's routing: the README's and the docstrings' are the official one.


class _Transformer(nnx.Module):
  """The official ASGO runs' kinds of parameters, in Flax NNX layouts."""

  def __init__(self, rngs):
    self.token_emb = nnx.Embed(50, 16, rngs=rngs)
    self.pos_emb = nnx.Param(jnp.zeros((8, 16)))
    self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=16,
                                            decode=False, rngs=rngs)
    self.ln_1 = nnx.LayerNorm(16, rngs=rngs)
    self.mlp = nnx.Linear(16, 64, rngs=rngs)


def test_asgo_routing_is_the_official_one():
  """Adam for what the official `get_optimizer_and_lr_scheduler` sends to
  it ('emb' in the name, or a vector), judging each bias by the PyTorch
  layout the official models have (a vector, here (heads, head_dim) in
  attention); ASGO for the rest. README and docstrings route alike."""
  from official_asgo import official_route
  readme = next(b.code for b in readme_blocks.blocks()
                if "fo.asgo(lr)" in b.code)
  call = 'bias_and_norm_pattern="bias", embedding_pattern="emb"'
  squeeze = lambda text: " ".join(text.replace(">>>", "").replace(
      "...", "").split())
  for text in (readme, fo.asgo.__doc__, fo.dasgo.__doc__):
    assert call in squeeze(text)
  params = nnx.state(_Transformer(nnx.Rngs(0)), nnx.Param)
  namespace, _, _ = _run(readme)
  state = namespace["tx"].init(params)
  adam = [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
          if isinstance(s, optax.ScaleByAdamState)][0]
  to_adam = jax.tree.leaves(jax.tree.map(
      lambda m: not isinstance(m, optax.MaskedNode), adam.mu,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode)))
  flat = jax.tree_util.tree_flatten_with_path(nnx.as_pure(params))[0]
  assert len(to_adam) == len(flat)
  for (path, leaf), adam_leaf in zip(flat, to_adam):
    name = jax.tree_util.keystr(path)
    torch_ndim = 1 if "bias" in name else leaf.ndim
    assert adam_leaf == (official_route(name, torch_ndim) == "adam"), name
  # The 2 embeddings, 4 attention biases, the norm's 2 vectors, 1 bias.
  assert sum(to_adam) == 9


@pytest.mark.parametrize("factory", [
    fo.foam, fo.shampoo, fo.soap, fo.asgo, fo.scale_by_foam,
    fo.scale_by_shampoo, fo.scale_by_soap, fo.scale_by_asgo],
    ids=lambda f: f.__name__)
def test_documented_defaults_are_the_signatures(factory):
  """An argument whose documentation names its default ("Defaults to
  X") has None, the value standing for X, as its default."""
  args = factory.__doc__.split("Args:\n")[1].split("\n\n")[0]
  entries = re.split(r"\n    (?=\w+: )", "\n" + args)
  parameters = inspect.signature(factory).parameters
  documented = dict(entry.split(": ", 1) for entry in
                    filter(None, (e.strip() for e in entries)))
  assert set(documented) == set(parameters)
  for name, text in documented.items():
    if "Defaults to" in text:
      assert parameters[name].default is None, (name, text)
