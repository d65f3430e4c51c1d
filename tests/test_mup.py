"""μP multipliers against the official `assign_lr`, the derived rules by
measurement, and `scale_by_mup` (spectral normalisation: test_spectral.py)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import foam_optax as fo
from helpers import FAST_COMPILE
from official_mup import official_multiplier

BASE, WIDE = 64, 512
VOCAB = 5000
MAX_PRECOND_DIM = 3000   # below the vocabulary, above every other side


def _model(width, vocab=VOCAB):
  """Shapes of a small Transformer-like tree at `width` (MLP 4x)."""
  s = jax.ShapeDtypeStruct
  return {"embed": s((vocab, width), jnp.float32),
          "blocks": {"query": s((width, width), jnp.float32),
                     "up": s((width, 4 * width), jnp.float32),
                     "down": s((4 * width, width), jnp.float32),
                     "norm": s((width,), jnp.float32)},
          "features": s((12, width), jnp.float32),
          "readout": s((width, vocab), jnp.float32)}


IS_EMBEDDING = lambda path: "embed" in path
IS_READOUT = lambda path: "readout" in path
# (our optimizer, exponent, the official code's name)
OFFICIAL_NAMES = [("adam", 4, "adam"), ("grafted", 4, "grafted_shampoo"),
                  ("shampoo", 4, "shampoo"), ("shampoo", 2, "shampoo2"),
                  ("soap", 4, "soap"), ("muon", 4, "muon"), ("sgd", 4, "sgd")]


@pytest.mark.parametrize("optimizer", ["adam", "grafted", "shampoo", "soap",
                                       "muon", "asgo", "sgd"])
def test_one_at_the_base_shapes(optimizer):
  for options in ({}, dict(block_size=128, max_precond_dim=MAX_PRECOND_DIM)):
    multipliers = fo.mup_multipliers(_model(BASE), _model(BASE),
                                     optimizer=optimizer, **options)
    assert all(m == 1.0 and type(m) is float
               for m in jax.tree.leaves(multipliers))


@pytest.mark.parametrize("optimizer,exponent,official", OFFICIAL_NAMES)
@pytest.mark.parametrize("block_size,max_precond_dim",
                         [(None, None), (128, MAX_PRECOND_DIM), (96, None),
                          (None, MAX_PRECOND_DIM)])
@pytest.mark.parametrize("depth_ratio", [1.0, 4.0])
def test_matches_the_official_assign_lr(optimizer, exponent, official,
                                        block_size, max_precond_dim,
                                        depth_ratio):
  """Every matrix leaf, with blocking and max_precond_dim (the vocabulary
  side then unpreconditioned), and depth only inside the blocks."""
  params, base = _model(WIDE), _model(BASE)
  ours = fo.mup_multipliers(
      params, base, optimizer=optimizer, block_size=block_size,
      max_precond_dim=max_precond_dim, depth_ratio=depth_ratio,
      embedding=IS_EMBEDDING, readout=IS_READOUT, exponent=exponent)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  base_leaves = jax.tree.leaves(base)
  checked = 0
  for (path, leaf), base_leaf, mine in zip(flat, base_leaves,
                                           jax.tree.leaves(ours)):
    if leaf.ndim != 2:
      continue
    # The official code reads "no blocking / no limit" as huge values.
    expected = official_multiplier(
        base_leaf.shape, leaf.shape, official, jax.tree_util.keystr(path),
        block_size=block_size or 10 ** 8,
        max_precond_dim=max_precond_dim or 10 ** 8, depth_ratio=depth_ratio)
    assert mine == pytest.approx(expected, rel=1e-12), path
    checked += 1
  assert checked == 6


def test_hand_checked_values():
  """Width 64 -> 512 (r = 8), blocks of 128 (1 -> 4 per side), vocabulary
  5000 beyond max_precond_dim, depth ratio 4 inside the blocks."""
  m = lambda optimizer, **kw: fo.mup_multipliers(
      _model(WIDE), _model(BASE), optimizer=optimizer, block_size=128,
      max_precond_dim=MAX_PRECOND_DIM, depth_ratio=4.0,
      embedding=IS_EMBEDDING, readout=IS_READOUT, **kw)
  adam, soap, muon, sgd = m("adam"), m("soap"), m("muon"), m("sgd")
  shampoo = m("shampoo")
  assert adam["blocks"]["query"] == 1 / 8 and adam["embed"] == 1.0
  assert adam["readout"] == 1 / 8 and adam["features"] == 1.0
  # SOAP, both sides: sqrt(8 / 8) / sqrt(4 * 4).
  assert soap["blocks"]["query"] == pytest.approx(1 / 4)
  # up: (64, 256) -> (512, 2048): 1 -> 4 and 2 -> 16 blocks.
  assert soap["blocks"]["up"] == pytest.approx(1 / math.sqrt(4 * 8))
  # Embedding, output side only: sqrt(8 / 4) / 1; readout, input only.
  assert soap["embed"] == pytest.approx(math.sqrt(2))
  assert soap["readout"] == pytest.approx(1 / math.sqrt(8 * 4))
  assert muon["features"] == pytest.approx(math.sqrt(8))
  assert muon["readout"] == pytest.approx(math.sqrt(1 / 8))
  # Shampoo p=4, both sides: E = 1/2: depth^0 * 1 * (4 * 4)^(-1/2).
  assert shampoo["blocks"]["query"] == pytest.approx(1 / 4)
  # Readout, one side: E = 1/4, no depth: (1/8)^(3/4) * 4^(-1/4).
  assert shampoo["readout"] == pytest.approx(8 ** -0.75 * 4 ** -0.25)
  assert sgd["blocks"]["query"] == 4.0 and sgd["embed"] == 8.0
  # Vectors take Adam's rule (1), SGD's r_out * depth.
  assert soap["blocks"]["norm"] == 1.0 and sgd["blocks"]["norm"] == 32.0


def test_asgo_is_adams_rule_whatever_blocking_and_limits():
  for options in ({}, dict(block_size=128, max_precond_dim=MAX_PRECOND_DIM),
                  dict(max_precond_dim=100)):
    asgo = fo.mup_multipliers(_model(WIDE), _model(BASE), optimizer="asgo",
                              **options)
    adam = fo.mup_multipliers(_model(WIDE), _model(BASE), optimizer="adam")
    assert asgo == adam


def test_arrays_and_shapes_give_the_same_multipliers():
  make = lambda width: {"w": jnp.zeros((width, 2 * width)),
                        "b": jnp.zeros((width,)), "s": jnp.zeros(())}
  arrays = fo.mup_multipliers(make(32), make(8), optimizer="soap")
  shapes = fo.mup_multipliers(jax.eval_shape(lambda: make(32)),
                              jax.eval_shape(lambda: make(8)), optimizer="soap")
  assert arrays == shapes == {"w": 1.0, "b": 1.0, "s": 1.0}


def test_bad_input_names_the_leaf():
  wide, base = _model(WIDE), _model(BASE)
  with pytest.raises(ValueError, match=r"\['readout'\]"):
    fo.mup_multipliers(wide, {k: v for k, v in base.items() if k != "readout"},
                       optimizer="adam")
  with pytest.raises(ValueError, match=r"\['blocks'\]\['up'\].*zero base"):
    fo.mup_multipliers(wide, dict(base, blocks=dict(
        base["blocks"], up=jnp.zeros((0, 4)))), optimizer="adam")
  with pytest.raises(ValueError, match=r"\[.features.\] has rank 2 .* base has rank 1"):
    fo.mup_multipliers(wide, dict(base, features=jnp.zeros(12)),
                       optimizer="adam")
  with pytest.raises(ValueError, match=r"\['k'\] has rank 3"):
    fo.mup_multipliers({"k": jnp.zeros((2, 3, 4))}, {"k": jnp.zeros((2, 3, 2))},
                       optimizer="adam")
  with pytest.raises(ValueError, match="optimizer must be one of"):
    fo.mup_multipliers(wide, base, optimizer="lion")
  # 'down' is (256, 64) at the base and (2048, 512) wide: its input side
  # crosses max_precond_dim=1000 (the first leaf that does).
  for optimizer in ("shampoo", "soap"):
    with pytest.raises(ValueError, match=r"\['blocks'\]\['down'\]: its input"):
      fo.mup_multipliers(wide, base, optimizer=optimizer, max_precond_dim=1000)
  # Rules that do not depend on the preconditioned sides accept it.
  assert fo.mup_multipliers(wide, base, optimizer="grafted",
                            max_precond_dim=1000)["blocks"]["up"] == 1 / 8
  with pytest.raises(ValueError, match=r"\['w'\] of shape .* no preconditioned"):
    fo.mup_multipliers({"w": jnp.zeros((40, 40))}, {"w": jnp.zeros((20, 20))},
                       optimizer="soap", max_precond_dim=10)
  for name, value in (("block_size", 0), ("max_precond_dim", 2.5),
                      ("depth_ratio", 0.0), ("exponent", -1),
                      ("embedding", "embed")):
    with pytest.raises(ValueError, match=name):
      fo.mup_multipliers(wide, base, optimizer="adam", **{name: value})


def test_readout_and_embedding_matter_only_for_depth_rules():
  """`embedding=`/`readout=` only exempt leaves from the depth factor: they
  change a multiplier only for 'shampoo' and 'sgd' with depth_ratio != 1,
  and for 'shampoo' not where that factor N^(1-2E) is 1 (p = 4, both sides
  preconditioned)."""
  wide, base = _model(WIDE), _model(BASE)
  for optimizer, exponent in (("adam", 4), ("grafted", 4), ("shampoo", 2),
                              ("shampoo", 4), ("soap", 4), ("muon", 4),
                              ("asgo", 4), ("sgd", 4)):
    for depth_ratio in (1.0, 4.0):
      kw = dict(optimizer=optimizer, depth_ratio=depth_ratio,
                exponent=exponent)
      named = fo.mup_multipliers(wide, base, embedding=IS_EMBEDDING,
                                 readout=IS_READOUT, **kw)
      unnamed = fo.mup_multipliers(wide, base, **kw)
      depth_rule = ((optimizer, exponent) in (("shampoo", 2), ("sgd", 4))
                    and depth_ratio != 1)
      assert (named != unnamed) == depth_rule, (optimizer, depth_ratio)


def test_weight_dimension_numbers_give_the_fan_in_fan_out_view():
  """A rank-3 kernel read through its dimension numbers gets the
  multiplier of its (fan_in, fan_out) matrix; batch axes (stacked layers)
  do not enter."""
  numbers = {"q": fo.DimensionNumbers(0, (1, 2)),
             "o": fo.DimensionNumbers((0, 1), 2),
             "stack": fo.DimensionNumbers(1, 2), "b": None}
  tree = lambda d, layers: {"q": jnp.zeros((d, 4, d // 4)),
                            "o": jnp.zeros((4, d // 4, 3 * d)),
                            "stack": jnp.zeros((layers, d, 2 * d)),
                            "b": jnp.zeros(d)}
  matrices = lambda d: {"q": jnp.zeros((d, d)), "o": jnp.zeros((d, 3 * d)),
                        "stack": jnp.zeros((d, 2 * d)), "b": jnp.zeros(d)}
  by_numbers = {}
  for optimizer in ("adam", "muon", "soap", "sgd"):
    by_numbers[optimizer] = fo.mup_multipliers(
        tree(256, 6), tree(32, 2), optimizer=optimizer,
        weight_dimension_numbers=numbers)
    want = fo.mup_multipliers(matrices(256), matrices(32),
                              optimizer=optimizer)
    assert by_numbers[optimizer] == pytest.approx(want, rel=1e-12), optimizer
  # A callable of the parameters, as the optimizers take it.
  assert fo.mup_multipliers(
      tree(256, 6), tree(32, 2), optimizer="muon",
      weight_dimension_numbers=lambda params: numbers) == by_numbers["muon"]
  with pytest.raises(ValueError, match=r"\['o'\] has rank 3.*"
                     "weight_dimension_numbers"):
    fo.mup_multipliers(tree(256, 6), tree(32, 2), optimizer="adam")


def test_nnx_dimension_numbers_of_the_common_layers():
  """Each layer's own axes, stacked layers' leading axis a batch axis; the
  tree drives mup_multipliers and an nnx.Optimizer step alike."""
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, width, rngs):
      self.embed = nnx.Embed(30, width, rngs=rngs)
      self.attention = nnx.MultiHeadAttention(
          num_heads=2, in_features=width, decode=False, rngs=rngs)
      self.conv = nnx.Conv(3, width, (2, 2), rngs=rngs)
      self.stack = nnx.vmap(lambda key: nnx.Linear(width, 2 * width,
                                                   rngs=nnx.Rngs(key)))(
                                                       jax.random.split(
                                                           rngs(), 3))

  # Built under nnx.jit: one program, not one per operation.
  model = nnx.jit(lambda: Model(16, nnx.Rngs(0)))()
  dims = fo.nnx_dimension_numbers(model)
  D = fo.DimensionNumbers
  assert dims["attention"]["query"]["kernel"] == D((0,), (1, 2))
  assert dims["attention"]["out"]["kernel"] == D((0, 1), (2,))
  assert dims["attention"]["query"]["bias"] == D((), ())
  assert dims["conv"]["kernel"] == D((0, 1, 2), (3,))
  assert dims["conv"]["bias"] == D((), ())
  assert dims["embed"]["embedding"] == D((0,), (1,))
  assert dims["stack"]["kernel"] == D((1,), (2,))
  pure = lambda m: nnx.as_pure(nnx.state(m, nnx.Param))
  base = nnx.eval_shape(lambda: Model(4, nnx.Rngs(0)))
  multipliers = fo.mup_multipliers(pure(model), pure(base), optimizer="muon",
                                   weight_dimension_numbers=dims)
  # (16, 2, 8) against (4, 2, 2): the (fan_in, fan_out) matrices 16x16, 4x4.
  assert multipliers["attention"]["query"]["kernel"] == 1.0
  # 12x16 against 12x4: √(r_out / r_in) = 2.
  assert multipliers["conv"]["kernel"] == pytest.approx(2.0)
  assert multipliers["stack"]["kernel"] == 1.0
  assert multipliers["attention"]["query"]["bias"] == 1.0
  optimizer = nnx.jit(lambda model: nnx.Optimizer(
      model, fo.foam(1e-3, weight_dimension_numbers=dims), wrt=nnx.Param))(
          model)
  # A factor pair per kernel and per stacked layer, none for the biases,
  # stacked (3, 32) or (heads, head_dim).
  assert int(fo.stats(optimizer.opt_state)["num_factors"]) == 2 * (
      1 + 4 + 1 + 3)
  assert dims["stack"]["bias"] == D((), ())


def test_blocked_shampoo_update_of_a_low_rank_gradient_has_the_block_norm():
  """Why 'shampoo' divides by (n_in·n_out)^E: an ungrafted blocked Shampoo
  update (p = 4) of a gradient of rank k <= block size has spectral norm
  √(n_in·n_out) (each block's update is a partial isometry, and for rank 1
  they tile one rank-1 matrix û v̂ᵀ with ‖û‖² = n_in, ‖v̂‖² = n_out). With
  the multiplier the spectral norm stays at Θ(√(d_out/d_in)) across widths;
  without the block factor it grows with √(n_in·n_out)."""
  block = 32
  base = {"w": jax.ShapeDtypeStruct((64, 128), jnp.float32)}
  widths, ranks = (64, 128, 256), (1, 4)
  # One update of all widths and ranks: each leaf has its own factors, and
  # every block is 32 x 32, so one program serves them all.
  @jax.jit   # one program, not one per operation and shape
  def draw():
    grads = {}
    for width, rank in itertools.product(widths, ranks):
      keys = jax.random.split(jax.random.PRNGKey(width + rank))
      grads[f"{width}-{rank}"] = (
          jax.random.normal(keys[0], (width, rank))
          @ jax.random.normal(keys[1], (rank, 2 * width)))
    return grads

  tx = fo.scale_by_shampoo(grafting="none", exponent=4, b1=0.0,
                           block_size=block, check_frequency=1,
                           start_preconditioning_step=1,
                           pseudo_inverse_rtol=1e-6)
  updates, _ = jax.jit(lambda g: tx.update(g, tx.init(g)),
                       compiler_options=FAST_COMPILE)(draw())
  ratios, unblocked = [], []
  for width in widths:
    d_in, d_out = width, 2 * width
    n_in, n_out = d_in // block, d_out // block
    for rank in ranks:
      norm = np.linalg.norm(np.asarray(updates[f"{width}-{rank}"], np.float64),
                            ord=2)
      assert norm == pytest.approx(math.sqrt(n_in * n_out), rel=1e-3)
    multiplier = fo.mup_multipliers(
        {"w": jax.ShapeDtypeStruct((d_in, d_out), jnp.float32)}, base,
        optimizer="shampoo", exponent=4, block_size=block)["w"]
    target = math.sqrt(d_out / d_in)
    ratios.append(multiplier * norm / target)
    # The same rule without the block-count factor (n_in·n_out)^(-1/2).
    unblocked.append(multiplier * math.sqrt(n_in * n_out) * norm / target)
  assert max(ratios) / min(ratios) == pytest.approx(1.0, abs=1e-3)
  assert unblocked[-1] / unblocked[0] == pytest.approx(4.0, rel=1e-3)


# --------------------------------------------- derived rules, by measurement

WIDTHS = (16, 32, 64, 128)
BATCH = 4


def _layers(width):
  """(fan_in, fan_out) of an input layer, a hidden layer and a readout."""
  return {"input": (8, width), "hidden": (width, width), "readout": (width, 10)}


def _minibatch(width, seed=0):
  """Per layer: inputs x (batch x fan_in, Θ(1) entries) and the gradient
  xᵀδ of one minibatch (rank <= batch), scaled to 1e-3 so that float32
  round-off in a rotated basis stays below SOAP's epsilon."""
  rng = np.random.default_rng(seed)
  inputs, grads = {}, {}
  for name, (fan_in, fan_out) in _layers(width).items():
    x = rng.standard_normal((BATCH, fan_in))
    g = x.T @ rng.standard_normal((BATCH, fan_out))
    inputs[name], grads[name] = x, 1e-3 * g / np.linalg.norm(g)
  return inputs, grads


def _feature_change(inputs, update):
  """RMS of Δh = x ΔW, per layer."""
  return {name: float(np.sqrt(np.mean((inputs[name] @ np.asarray(
      update[name], np.float64)) ** 2))) for name in inputs}


def _spread(values):
  return max(values) / min(values)


def _asgo_update(grad, rms=0.2, damping=1e-30):
  """ASGO's step from one gradient: whiten on the smaller side with
  V = G Gᵀ (or Gᵀ G), then rescale to RMS `rms`."""
  left = grad.shape[0] <= grad.shape[1]
  factor = grad @ grad.T if left else grad.T @ grad
  eigvals, basis = np.linalg.eigh(factor)
  # The inverse root on the gradient's range; its null space meets no signal.
  keep = eigvals > 1e-12 * eigvals.max()
  root = (basis[:, keep] / np.sqrt(eigvals[keep] + damping)) @ basis[:, keep].T
  update = root @ grad if left else grad @ root
  return update * rms * math.sqrt(update.size) / np.linalg.norm(update)


def test_asgo_rule_keeps_the_feature_change_flat_across_widths():
  """One simulated ASGO step per width: with `mup_multipliers`' 'asgo' rule
  the feature change of every layer type stays flat over an 8x width range;
  without it the hidden and readout changes grow with width."""
  with_mup, without = {n: [] for n in _layers(1)}, {n: [] for n in _layers(1)}
  base = {n: jnp.zeros(s) for n, s in _layers(WIDTHS[0]).items()}
  for width in WIDTHS:
    inputs, grads = _minibatch(width)
    update = {n: _asgo_update(g) for n, g in grads.items()}
    shapes = {n: jnp.zeros(s) for n, s in _layers(width).items()}
    multipliers = fo.mup_multipliers(shapes, base, optimizer="asgo")
    scaled = {n: multipliers[n] * u for n, u in update.items()}
    for n, change in _feature_change(inputs, scaled).items():
      with_mup[n].append(change)
    for n, change in _feature_change(inputs, update).items():
      without[n].append(change)
  for name in with_mup:
    assert _spread(with_mup[name]) < 1.5, (name, with_mup[name])
  for name in ("hidden", "readout"):
    assert without[name][-1] / without[name][0] > 4, (name, without[name])


def test_soap_rule_under_foams_controller_keeps_the_feature_change_flat():
  """`soap(controller='foam')` with blocks of 16 (1 to 8 per side over the
  widths): its second update (the first only initialises, as the official
  SOAP), scaled by the 'soap' rule, changes every layer's features by the
  same amount at every width; unscaled, the hidden layer's change grows
  with its block count."""
  # One compiled update for all widths: every block is one of three shapes.
  tx = fo.scale_by_soap(controller="foam", block_size=16,
                        refresh_batching="bucket")
  inputs, grads = {}, {}
  for width in WIDTHS:
    inputs[width], g = _minibatch(width)
    grads[width] = {n: jnp.asarray(v, jnp.float32) for n, v in g.items()}
  state = jax.jit(tx.init)(grads)   # one program, not one per operation
  update = jax.jit(tx.update, compiler_options=FAST_COMPILE)
  _, state = update(grads, state)
  updates, _ = update(grads, state)
  base = {n: jnp.zeros(s) for n, s in _layers(WIDTHS[0]).items()}
  with_mup, without = {n: [] for n in _layers(1)}, {n: [] for n in _layers(1)}
  for width in WIDTHS:
    shapes = {n: jnp.zeros(s) for n, s in _layers(width).items()}
    multipliers = fo.mup_multipliers(shapes, base, optimizer="soap",
                                     block_size=16)
    raw = updates[width]
    scaled = {n: multipliers[n] * np.asarray(u) for n, u in raw.items()}
    for n, change in _feature_change(inputs[width], scaled).items():
      with_mup[n].append(change)
    for n, change in _feature_change(inputs[width], raw).items():
      without[n].append(change)
  for name in with_mup:
    assert _spread(with_mup[name]) < 1.5, (name, with_mup[name])
  assert without["hidden"][-1] / without["hidden"][0] > 4, without["hidden"]


# ------------------------------------------------------------- scale_by_mup


def test_scale_by_mup_multiplies_each_leaf_and_keeps_dtypes():
  params = {"w": jnp.ones((4, 4), jnp.bfloat16), "b": jnp.ones(4)}
  tx = fo.scale_by_mup({"w": 0.25, "b": 2.0})
  state = tx.init(params)
  updates, state = tx.update(params, state)
  assert state == optax.EmptyState()
  assert updates["w"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(updates["w"], 0.25)
  np.testing.assert_array_equal(updates["b"], 2.0)


def test_scale_by_mup_takes_traced_multipliers():
  params = {"w": jnp.ones((3, 3))}

  @jax.jit
  def step(multipliers):
    tx = fo.scale_by_mup(multipliers)
    return tx.update(params, tx.init(params))[0]

  np.testing.assert_allclose(step({"w": jnp.float32(0.5)})["w"], 0.5)
  np.testing.assert_allclose(step({"w": jnp.float32(3.0)})["w"], 3.0)


def test_scale_by_mup_multiplies_every_leaf_a_parameter_wraps():
  """One multiplier per parameter also serves a parameter stored as a
  container of leaves (an nnx.Param in nnx.Optimizer's init, here a tuple)."""
  params = {"w": (jnp.ones(2), jnp.ones(3)), "b": jnp.ones(2)}
  tx = fo.scale_by_mup({"w": 0.5, "b": 2.0})
  updates, _ = tx.update(params, tx.init(params))
  np.testing.assert_array_equal(updates["w"][1], 0.5)
  np.testing.assert_array_equal(updates["b"], 2.0)


def test_scale_by_mup_bad_input_names_the_leaf():
  with pytest.raises(ValueError, match=r"\['b'\] must be positive"):
    fo.scale_by_mup({"w": 1.0, "b": 0.0})
  with pytest.raises(ValueError, match=r"\['w'\] must be a real number"):
    fo.scale_by_mup({"w": "1.0"})
  tx = fo.scale_by_mup({"w": 1.0})
  with pytest.raises(ValueError, match=r"\['b'\] \(in params, not in "
                                       r"multipliers\)"):
    tx.init({"w": jnp.ones(2), "b": jnp.ones(2)})


def test_weight_decay_recipe_is_independent_of_the_learning_rate():
  """The docstring's chain: a step moves p by -schedule(t) * (lr * m * u +
  wd * p); with a zero gradient only the decay is left, whatever lr."""
  params = {"w": jnp.full((8, 8), 2.0)}
  width, wd_x_width = 8, 0.4
  schedule = optax.linear_schedule(1.0, 0.5, 10)

  def recipe(learning_rate):
    return optax.chain(
        optax.scale_by_adam(), fo.scale_by_mup({"w": 0.5}),
        optax.scale(learning_rate),
        optax.add_decayed_weights(wd_x_width / width),
        optax.scale_by_schedule(schedule), optax.scale(-1.0))

  zero = {"w": jnp.zeros((8, 8))}
  for learning_rate in (1e-3, 1.0):
    tx = recipe(learning_rate)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -1.0 * 0.05 * 2.0)
  ones = {"w": jnp.ones((8, 8))}
  tx = recipe(0.1)
  updates, _ = tx.update(ones, tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -(0.1 * 0.5 * 1.0 + 0.05 * 2.0),
                             rtol=1e-5)
