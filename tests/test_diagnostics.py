"""`fo.stats`: counters and damping summaries of every optimizer's state,
eigendecompositions by factor side, steps counted with a skipped one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import foam_optax as fo
from helpers import FAST_COMPILE, MB_PARAMS, microbatched


def test_eigendecompositions_by_side_are_exact_counts():
  # block_size 2: u (4, 4) has 4 blocks with a left and a right factor
  # each; w (2, 3) has blocks 2x2 and 2x1, the 2x1 with no right factor.
  # Left factors: 4 + 2 = 6; right factors: 4 + 1 = 5.
  params = {"u": jnp.zeros((4, 4)), "w": jnp.zeros((2, 3))}
  tx = fo.scale_by_shampoo(block_size=2, check_frequency=2,
                           start_preconditioning_step=2)
  state = tx.init(params)
  rng = np.random.default_rng(0)
  step = jax.jit(tx.update, compiler_options=FAST_COMPILE)
  for _ in range(6):   # check steps 2, 4, 6
    grads = jax.tree.map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32),
        params)
    _, state = step(grads, state, params)
  stats = fo.stats(state)
  assert int(stats["eigendecompositions_left"]) == 3 * 6
  assert int(stats["eigendecompositions_right"]) == 3 * 5
  assert int(stats["eigendecompositions"]) == 3 * 11


def test_damping_mean_never_above_max():
  # 12 factors at damping 1e-9: a float32 mean rounds to 1.0000001e-9.
  params = {f"m{i}": jnp.ones((3 + i, 2)) for i in range(6)}
  # Jitted: one program, not one per operation of an eager init.
  state = jax.jit(fo.foam(1e-3).init)(params)
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
  # Built under nnx.jit: one program, not one per operation of an eager init.
  optimizer = nnx.jit(lambda model: nnx.Optimizer(
      model, fo.foam(schedule), wrt=nnx.Param))(model)

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
  step = jax.jit(tx.update, compiler_options=FAST_COMPILE)
  for g in grads:
    _, state = step(g, state, params)
  stats = fo.stats(state)
  assert int(state.count) == 4 == int(stats["step"] + stats["nonfinite_skips"])
  assert float(state.hyperparams["learning_rate"]) == pytest.approx(
      float(schedule(3)))


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


# Slow: bare transformations that a default case runs inside a chain (the
# case named here: a user's chain, or the alias's own), with the same
# figures; test_eigendecompositions_by_side_are_exact_counts reads the
# state of a bare transformation.
_IN_A_CHAIN = {"scale_by_foam": "mup_chain", "scale_by_asgo": "asgo",
               "scale_by_soap": "spectral_norm_chain"}


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.slow) if name in _IN_A_CHAIN
    else name for name in sorted(_EVERY_OPTIMIZER)])
def test_stats_reports_every_optimizer_of_the_package(name):
  """A good step, a NaN step, a good step: two applied updates and one
  skipped (or, without a skipping wrapper, three applied)."""
  make, micro, skips, factors, refreshes = _EVERY_OPTIMIZER[name]
  tx = make()
  state = tx.init(MB_PARAMS)
  step = jax.jit(lambda g, s, m: tx.update(g, s, MB_PARAMS,
                                           **({"microbatch_grads": m}
                                              if micro else {})),
                 compiler_options=FAST_COMPILE)
  for i, scale in enumerate((1.0, jnp.nan, 1.0)):
    grads, microbatches = microbatched(i)
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
    fo.stats(tx.init(MB_PARAMS))


def test_asgo_counts_polar_express_roots_as_inverse_roots():
  """Official ASGO: one root per factor and step, no eigendecomposition;
  with root_method='eigh' the same count of eigendecompositions."""
  params = {"a": jnp.ones((6, 4)), "b": jnp.ones((3, 5))}
  counts = {}
  for method in ("polar_express", "eigh"):
    tx = fo.asgo(1e-2, root_method=method)
    state = tx.init(params)
    step = jax.jit(tx.update, compiler_options=FAST_COMPILE)
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
