"""Skipping non-finite steps (`skip_nonfinite`, `max_consecutive_skips`): the
README's MultiSteps recipe, a stuck run made visible and loud, one trace of
the wrapped update."""

import jax
import jax.numpy as jnp
import optax
import pytest

import foam_optax as fo
from readme_blocks import recipe as _recipe
from readme_blocks import run as _run


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
  jax.jit(tx.update).trace(params, tx.init(params), params)   # not compiled
  assert len(traces) == 1
