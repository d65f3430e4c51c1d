"""optax and Flax conventions: `optax.tree.map_params`, complex parameters,
`mu_dtype` and storage dtypes, weight dimension numbers (scanned layers,
attention heads), the pseudo-inverse option, a core free of Flax."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import foam_optax as fo
from foam_optax._src import linalg

ALIASES = {"foam": fo.foam, "shampoo": fo.shampoo, "soap": fo.soap}
PARAMS = {"w": jnp.ones((6, 4)), "k": jnp.ones((2, 3, 4)), "b": jnp.ones(4)}


def _grads(tree, seed):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(jax.tree.leaves(tree)))
  return jax.tree.unflatten(jax.tree.structure(tree), [
      jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
      for k, x in zip(keys, jax.tree.leaves(tree))])


def _run(tx, params, steps, seed=0):
  """Jitted updates on random gradients; the last updates and the state."""
  update = jax.jit(tx.update)
  state = tx.init(params)
  for i in range(steps):
    updates, state = update(_grads(params, seed + i), state, params)
  return updates, state


def _leaf_states(state):
  is_core = lambda x: isinstance(x, fo.ScaleByFoamState)
  return [ls for core in jax.tree.leaves(state, is_leaf=is_core)
          if is_core(core) for ls in core.leaf_states()]


@pytest.mark.parametrize("name", list(ALIASES))
def test_tree_map_params(name):
  opt = ALIASES[name](1e-2, check_frequency=2, weight_dimension_numbers={
      "w": None, "k": fo.DimensionNumbers(1, 2), "b": None})
  _, state = _run(opt, PARAMS, 2)
  same = optax.tree.map_params(opt, lambda v: v, state)
  assert jax.tree.structure(same) == jax.tree.structure(state)
  # f reaches exactly the per-parameter buffers (momentum, grafting moment);
  # transform_non_params everything else.
  marked = optax.tree.map_params(opt, lambda v: jnp.full_like(v, 7.0), state,
                                 transform_non_params=lambda v: v)
  core, marked_core = state[0], marked[0]
  for before, after in zip(_leaf_states(core), _leaf_states(marked_core)):
    assert bool(jnp.all(after.momentum == 7.0))
    assert before.layout == after.layout
  for a, b in zip(jax.tree.leaves(core.classes),
                  jax.tree.leaves(marked_core.classes)):
    assert a is b
  assert marked_core.count is core.count


@pytest.mark.parametrize("init", [
    lambda: fo.foam(1e-3).init({"a": jnp.ones(3), "c": jnp.ones((3, 3),
                                                                jnp.complex64)}),
    lambda: fo.scale_by_soap().init({"z": jnp.ones(4, jnp.complex64)}),
])
def test_complex_parameters_rejected_naming_the_leaf(init):
  with pytest.raises(ValueError, match=r"\['(c|z)'\] is complex"):
    init()


MIXED = {"w": jnp.ones((6, 4)), "h": jnp.ones((4, 3), jnp.bfloat16),
         "v": jnp.ones((3,), jnp.bfloat16)}


@pytest.mark.parametrize("name,mu_dtype", [
    ("scale_by_foam", None), ("scale_by_shampoo", jnp.bfloat16),
    ("scale_by_soap", None), ("scale_by_soap", jnp.float32)])
def test_mu_dtype(name, mu_dtype):
  tx = getattr(fo, name)(mu_dtype=mu_dtype, check_frequency=2)
  updates, state = _run(tx, MIXED, 3)
  for (key, p), ls in zip(sorted(MIXED.items()), _leaf_states(state)):
    want = p.dtype if mu_dtype is None else jnp.dtype(mu_dtype)
    assert ls.momentum.dtype == want, key
    assert updates[key].dtype == p.dtype
  factors = [x for x in jax.tree.leaves(state.classes)
             if jnp.issubdtype(x.dtype, jnp.floating)]
  assert factors and all(x.dtype == jnp.float32 for x in factors)


LOW = dict(mu_dtype=jnp.bfloat16, second_moment_dtype=jnp.bfloat16,
           factor_matrix_dtype=jnp.bfloat16,
           factor_matrix_eigenvectors_dtype=jnp.bfloat16)


@pytest.mark.parametrize("name,options", [
    ("scale_by_foam", dict(LOW, inv_factor_matrix_dtype=jnp.bfloat16)),
    ("scale_by_shampoo", dict(LOW, inv_factor_matrix_dtype=jnp.float16)),
    ("scale_by_soap", LOW)])
def test_storage_dtypes(name, options):
  """Buffers stored as asked and kept so across jitted steps; the update
  stays close to the float32 one (computations stay in float32)."""
  params = {"w": jnp.ones((6, 4)), "v": jnp.ones((4,))}
  tx = getattr(fo, name)(check_frequency=2, **options)
  reference = getattr(fo, name)(check_frequency=2)
  state = tx.init(params)
  before = [(x.shape, x.dtype) for x in jax.tree.leaves(state)]
  updates, state = _run(tx, params, 6)
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(state)] == before
  (group,) = state.classes
  for fs in (group.left, group.right):
    assert fs.statistic.dtype == options["factor_matrix_dtype"]
    assert fs.basis.dtype == options["factor_matrix_eigenvectors_dtype"]
    if name != "scale_by_soap":
      assert fs.inverse_root.dtype == options["inv_factor_matrix_dtype"]
    assert fs.eigvals.dtype == fs.damping.dtype == jnp.float32
  stored_moment = (group.rotated_second_moment if name == "scale_by_soap"
                   else _leaf_states(state)[0].graft_second_moment)
  assert stored_moment.dtype == jnp.bfloat16
  expected, _ = _run(reference, params, 6)
  for key in params:
    assert updates[key].dtype == jnp.float32
    err = jnp.linalg.norm(updates[key] - expected[key])
    assert float(err) < 0.1 * float(jnp.linalg.norm(expected[key])), key


def test_float32_storage_is_the_default_exactly():
  params = {"w": jnp.ones((6, 4))}
  f32 = dict(mu_dtype=jnp.float32, second_moment_dtype=jnp.float32,
             factor_matrix_dtype=jnp.float32,
             factor_matrix_eigenvectors_dtype=jnp.float32,
             inv_factor_matrix_dtype=jnp.float32)
  a, _ = _run(fo.scale_by_foam(check_frequency=2, **f32), params, 5)
  b, _ = _run(fo.scale_by_foam(check_frequency=2), params, 5)
  np.testing.assert_array_equal(a["w"], b["w"])


@pytest.mark.parametrize("argument", [
    "mu_dtype", "second_moment_dtype", "factor_matrix_dtype",
    "factor_matrix_eigenvectors_dtype", "inv_factor_matrix_dtype"])
def test_storage_dtype_validated(argument):
  with pytest.raises(ValueError, match=argument):
    fo.foam(1e-3, **{argument: jnp.int32})


# --- weight dimension numbers -------------------------------------------

def _independent(tx_batched, tx_single, full_shape, slices, to_slices, steps):
  """Updates of one batched leaf and of each slice optimized on its own."""
  grads = jax.random.normal(jax.random.PRNGKey(4), (steps,) + full_shape)
  update_b, update_s = jax.jit(tx_batched.update), jax.jit(tx_single.update)
  state = tx_batched.init({"w": jnp.zeros(full_shape)})
  single = [tx_single.init({"w": s}) for s in to_slices(jnp.zeros(full_shape))]
  for g in grads:
    batched, state = update_b({"w": g}, state)
    outs = []
    for i, s in enumerate(to_slices(g)):
      u, single[i] = update_s({"w": s}, single[i])
      outs.append(u["w"])
  return batched["w"], outs, state


SLICE_OPTS = dict(check_frequency=3, stagger=False, block_size=4)


@pytest.mark.parametrize("name,numbers", [
    ("scale_by_foam", fo.DimensionNumbers(1, 2)),
    ("scale_by_soap", optax.contrib.MuonDimensionNumbers(
        reduction_axis=(-2,), output_axis=-1))])
def test_stacked_layers_equal_independent_layers(name, numbers):
  """(L, m, n) with dimension numbers == L separate (m, n) parameters."""
  L, m, n = 3, 6, 5   # block_size 4: two row and two column block groups
  make = getattr(fo, name)
  batched = make(weight_dimension_numbers={"w": numbers}, **SLICE_OPTS)
  single = make(**SLICE_OPTS)
  out, slices, state = _independent(batched, single, (L, m, n), L,
                                    lambda x: list(x), 7)
  np.testing.assert_allclose(out, jnp.stack(slices), rtol=2e-5, atol=2e-6)
  assert sum(int(fs.refreshes.sum()) for g in state.classes
             for fs in (g.left, g.right) if fs is not None) > 0


def test_attention_kernel_heads_are_independent():
  """(d, heads, head_dim): rows d, columns head_dim, one matrix per head;
  given as a callable of the params."""
  d, heads, head_dim = 5, 3, 4
  numbers = lambda params: {"w": fo.DimensionNumbers(0, 2)}
  batched = fo.scale_by_foam(weight_dimension_numbers=numbers, **SLICE_OPTS)
  single = fo.scale_by_foam(**SLICE_OPTS)
  out, slices, _ = _independent(
      batched, single, (d, heads, head_dim), heads,
      lambda x: [x[:, h, :] for h in range(heads)], 7)
  np.testing.assert_allclose(out, jnp.stack(slices, axis=1), rtol=2e-5,
                             atol=2e-6)


def test_default_reshaping_merges_layers():
  """Without dimension numbers a stacked leaf shares factors across layers
  (the behaviour the option fixes): updates differ from independent ones."""
  L, m, n = 3, 6, 5
  out, slices, _ = _independent(fo.scale_by_foam(**SLICE_OPTS),
                                fo.scale_by_foam(**SLICE_OPTS), (L, m, n), L,
                                lambda x: list(x), 4)
  assert float(jnp.max(jnp.abs(out - jnp.stack(slices)))) > 1e-2


def test_dimension_numbers_layouts_and_errors():
  params = {"k": jnp.zeros((2, 8, 3, 4)), "b": jnp.zeros((2, 4)),
            "m": jnp.zeros((6, 4))}
  tx = fo.scale_by_foam(weight_dimension_numbers={
      "k": fo.DimensionNumbers((1,), (3, 2)), "b": fo.DimensionNumbers((), ()),
      "m": None})
  leaves = {ls.layout.shape: ls.layout for ls in _leaf_states(tx.init(params))}
  kernel = leaves[(2, 8, 3, 4)]
  # Columns merge the output axes in the given order: (4, 3) -> 12.
  assert (kernel.batch, kernel.matrix_shape, kernel.transpose) == (
      2, (8, 12), (0, 1, 3, 2))
  assert not leaves[(2, 4)].preconditioned        # grafting only
  assert leaves[(6, 4)].matrix_shape == (6, 4) and leaves[(6, 4)].batch == 1
  with pytest.raises(ValueError, match=r"\['b'\].*out of range"):
    fo.scale_by_foam(weight_dimension_numbers={
        "b": fo.DimensionNumbers(1, 2), "k": None, "m": None}).init(params)
  with pytest.raises(ValueError, match="distinct"):
    fo.scale_by_foam(weight_dimension_numbers=fo.DimensionNumbers(
        0, 0)).init({"m": jnp.zeros((3, 3))})
  with pytest.raises(ValueError, match="prefix"):
    fo.scale_by_foam(weight_dimension_numbers={"x": None}).init(params)


# --- pseudo-inverse -------------------------------------------------------

def test_pseudo_inverse_weights():
  eigvals = jnp.array([[4.0, 1e-3, 1e-7, 0.0]])
  damping = jnp.array([1e-9])
  full = linalg.inverse_root_weights(eigvals, damping, 2)
  pinv = linalg.inverse_root_weights(eigvals, damping, 2, 1e-6)
  np.testing.assert_allclose(pinv, [[full[0, 0], full[0, 1], 0.0, 0.0]])
  assert float(full[0, 3]) == pytest.approx(1e-9 ** -0.5, rel=1e-5)


def test_pseudo_inverse_direction_ignores_null_space():
  """With a rank-deficient statistic the direction has no component in the
  null space; without the option, that component is amplified."""
  u = jnp.array([[1.0], [0.0], [0.0]])
  g = u @ jnp.array([[1.0, 2.0]])            # rank one, rows span e1
  noise = jnp.zeros((3, 2)).at[2, 0].set(1e-4)   # momentum off the span
  opts = dict(check_frequency=1, start_preconditioning_step=1, b1=0.0,
              grafting="none", stagger=False)

  def direction(**extra):
    tx = fo.scale_by_foam(**opts, **extra)
    state = tx.init({"w": jnp.zeros((3, 2))})
    return tx.update({"w": g + noise}, state)[0]["w"]

  plain, pinv = direction(), direction(pseudo_inverse_rtol=1e-3)
  # The 1e-4 entry off the span is amplified by ~(1e-8 + ε)^(-1/2) ...
  assert float(jnp.abs(plain[2, 0])) > 1.0
  # ... or dropped: what remains in row 3 is the basis' tilt (~1e-4·‖P‖).
  assert float(jnp.abs(pinv[2, :]).max()) < 1e-3 * float(jnp.abs(pinv).max())


def test_pseudo_inverse_validated():
  with pytest.raises(ValueError, match="pseudo_inverse_rtol"):
    fo.foam(1e-3, pseudo_inverse_rtol=1.5)


# --- packaging -------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code):
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                        capture_output=True, text=True)


def test_import_does_not_import_flax():
  out = _python("import sys, foam_optax; "
                "print(sorted(m for m in ('flax', 'tqdm', 'sklearn') "
                "if m in sys.modules))")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"


def test_bench_without_its_extra_says_what_to_install():
  # A module set to None in sys.modules fails to import, as if absent.
  out = _python("import sys; sys.modules['tqdm'] = None; "
                "from foam_optax.bench.cli import main")
  assert out.returncode == 1
  assert "pip install 'foam_optax[bench]'" in out.stderr
  assert "missing: tqdm" in out.stderr


def test_py_typed_is_shipped():
  import foam_optax
  assert os.path.exists(os.path.join(os.path.dirname(foam_optax.__file__),
                                     "py.typed"))


# --- one source of truth ----------------------------------------------------

def _defaults(fn):
  import inspect
  return {name: p.default for name, p in inspect.signature(fn).parameters.items()
          if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("fn", [fo.scale_by_foam, fo.foam, fo.scale_by_shampoo,
                                fo.shampoo])
def test_defaults_agree_with_config(fn):
  import dataclasses
  from foam_optax._src.config import Config
  config = {f.name: f.default for f in dataclasses.fields(Config)}
  shared = {k: v for k, v in _defaults(fn).items() if k in config}
  assert len(shared) >= 15
  assert shared == {k: config[k] for k in shared}


def test_generated_source_is_the_option_table():
  """The signatures, docstring argument lists and `Config` fields written in
  the source are what the option table generates."""
  from foam_optax._src import signatures
  texts = signatures.generated_sources()
  assert {p.name for p in texts} == {"alias.py", "transform.py", "config.py"}
  for path, text in texts.items():
    assert path.read_text(encoding="utf-8") == text, (
        f"{path.name} is stale: run `python -m foam_optax._src.readme_tables "
        "README.md`")


def test_generated_signatures_follow_the_table():
  """Each generated function takes the table's arguments in its order, with
  its defaults and types (independently of the generator's text)."""
  import inspect
  from foam_optax._src import options, signatures
  for functions in signatures.FUNCTIONS.values():
    for optimizer, alias in functions:
      fn = getattr(fo, signatures.function_name(optimizer, alias))
      params = list(inspect.signature(fn, eval_str=True).parameters.values())
      if alias:
        first = params.pop(0)
        assert (first.name, first.annotation) == (
            "learning_rate", optax.ScalarOrSchedule)
      table = options.exposed(optimizer, alias)
      assert [(p.name, p.default, p.annotation, p.kind) for p in params] == [
          (o.public_name(optimizer), o.default_for(optimizer), o.annotation,
           inspect.Parameter.KEYWORD_ONLY) for o in table], fn.__name__
      for o in table:   # the docstring documents every argument
        assert f"\n    {o.public_name(optimizer)}: " in fn.__doc__


_HAND_WRITTEN = [  # alias, its transformation, its mask's name, non-defaults
    (fo.dasgo, fo.scale_by_dasgo, "weight_decay_mask",
     dict(b1=0.5, b2=0.7, epsilon=1e-3, graft_rms=0.3, mu_dtype=jnp.bfloat16,
          weight_dimension_numbers={"w": fo.DimensionNumbers(1, 0),
                                    "b": None})),
    (fo.bias_corrected_adamw, fo.scale_by_bias_corrected_adam, "mask",
     dict(b1=0.5, b2=0.7, eps=1e-3, method="two_group",
          variance_correction=False, mu_dtype=jnp.bfloat16)),
]


@pytest.mark.parametrize("alias,core,mask,_", _HAND_WRITTEN)
def test_hand_written_alias_signatures_follow_their_transformation(
    alias, core, mask, _):
  """The learning rate, the transformation's arguments (same defaults and
  types), then the weight decay and its mask."""
  import inspect
  from typing import Any, Optional
  params = list(inspect.signature(alias, eval_str=True).parameters.values())
  first = params[0]
  assert (first.name, first.kind, first.annotation) == (
      "learning_rate", inspect.Parameter.POSITIONAL_OR_KEYWORD,
      optax.ScalarOrSchedule)
  assert params[1:-2] == list(
      inspect.signature(core, eval_str=True).parameters.values())
  assert [(p.name, p.kind, p.default, p.annotation) for p in params[-2:]] == [
      ("weight_decay", inspect.Parameter.KEYWORD_ONLY, 0.1, float),
      (mask, inspect.Parameter.KEYWORD_ONLY, None, Optional[Any])]


@pytest.mark.parametrize("alias,core,mask,kwargs", _HAND_WRITTEN)
def test_hand_written_aliases_pass_every_argument_on(alias, core, mask,
                                                     kwargs):
  """With every argument off its default, the alias steps as the chain it
  stands for."""
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(4)}
  grads = jax.tree.map(lambda p: jnp.cos(3 * p), params)
  extra = {}   # only bias-corrected AdamW uses microbatch gradients
  if alias is fo.bias_corrected_adamw:
    extra["microbatch_grads"] = jax.tree.map(
        lambda g: g * jnp.arange(1.0, 5.0).reshape((4,) + (1,) * g.ndim),
        grads)
  decays = {"w": True, "b": False}
  chain = optax.chain(core(**kwargs), optax.add_decayed_weights(0.2, decays),
                      optax.scale_by_learning_rate(0.1))
  tx = alias(0.1, weight_decay=0.2, **{mask: decays}, **kwargs)
  expected, _ = chain.update(grads, chain.init(params), params, **extra)
  got, state = tx.update(grads, tx.init(params), params, **extra)
  jax.tree.map(np.testing.assert_array_equal, got, expected)
  assert jax.tree.leaves(fo.find_states(state, type(chain.init(params)[0]))[0]
                         .mu)[0].dtype == jnp.bfloat16


def test_config_is_typed_and_carries_the_option_table():
  """`Config` is a frozen dataclass with one typed field per option, in the
  table's order, each with its default and its `Option` as metadata."""
  import dataclasses
  import typing
  from foam_optax._src import options
  from foam_optax._src.config import Config
  fields = dataclasses.fields(Config)
  assert [f.name for f in fields] == [o.name for o in options.OPTIONS]
  hints = typing.get_type_hints(Config)
  for f, option in zip(fields, options.OPTIONS):
    assert f.metadata["option"] is option
    assert f.default == option.default
    assert hints[f.name] == option.annotation, f.name
  cfg = Config()
  with pytest.raises(dataclasses.FrozenInstanceError):
    setattr(cfg, "b1", 0.5)


@pytest.mark.parametrize("alias,core", [(fo.foam, fo.scale_by_foam),
                                        (fo.shampoo, fo.scale_by_shampoo),
                                        (fo.soap, fo.scale_by_soap)])
def test_alias_defaults_agree_with_their_transformation(alias, core):
  alias_defaults, core_defaults = _defaults(alias), _defaults(core)
  assert set(core_defaults) <= set(alias_defaults)
  assert {k: alias_defaults[k] for k in core_defaults} == core_defaults


_TRANSFORMS = [fo.scale_by_foam, fo.scale_by_shampoo, fo.scale_by_soap]
_ALIASES = [fo.foam, fo.shampoo, fo.soap]


@pytest.mark.parametrize("fn", _TRANSFORMS + _ALIASES)
def test_signatures_as_optax_writes_them(fn):
  """Keyword-only after the learning rate, Literal string options,
  optax.ScalarOrSchedule, and the type optax.chain returns."""
  import inspect
  import typing
  sig = inspect.signature(fn, eval_str=True)
  params = list(sig.parameters.values())
  positional = [p.name for p in params
                if p.kind is not inspect.Parameter.KEYWORD_ONLY]
  if fn in _ALIASES:
    assert positional == ["learning_rate"]
    assert params[0].annotation is optax.ScalarOrSchedule
    assert sig.return_annotation is optax.GradientTransformationExtraArgs
    assert isinstance(fn(1e-3), optax.GradientTransformationExtraArgs)
  else:
    assert positional == []
    assert sig.return_annotation is optax.GradientTransformation
  strings = {p.name: p for p in params if isinstance(p.default, str)}
  assert {"controller", "refresh_batching"} <= set(strings) or fn in (
      fo.shampoo, fo.scale_by_shampoo)
  for p in strings.values():
    assert typing.get_origin(p.annotation) is typing.Literal, p.name
    assert p.default in typing.get_args(p.annotation), p.name
    wrong = "not_" + p.default
    with pytest.raises(ValueError, match=p.name):
      fn(**({"learning_rate": 1e-3} if fn in _ALIASES else {}),
         **{p.name: wrong})


@pytest.mark.parametrize("alias,core", [(fo.foam, fo.scale_by_foam),
                                        (fo.shampoo, fo.scale_by_shampoo),
                                        (fo.soap, fo.scale_by_soap),
                                        (fo.scale_by_shampoo,
                                         fo.scale_by_foam)])
def test_shared_arguments_agree_in_default_and_type(alias, core):
  """Each argument two signatures share has one default and one type
  (scale_by_shampoo is scale_by_foam with controller='stale')."""
  import inspect
  a = inspect.signature(alias, eval_str=True).parameters
  c = inspect.signature(core, eval_str=True).parameters
  shared = set(a) & set(c)
  assert len(shared) >= 20
  for name in shared:
    assert (a[name].default, a[name].annotation) == (
        c[name].default, c[name].annotation), name


def test_controller_literal_names_the_builtin_controllers():
  """The Literal lists the library's own controllers; others registered by
  user code (e.g. `foam_optax.bench.stability`'s) come after it."""
  import typing
  from foam_optax._src import controllers
  builtin = {name for name, fn in controllers.CONTROLLERS.items()
             if fn.__module__ == controllers.__name__}
  assert set(typing.get_args(controllers.Controller)) == builtin


def test_a_registered_controller_works_end_to_end():
  """One registration: validation accepts it, every transformation runs it."""
  from foam_optax._src import controllers
  assert "test_never" not in controllers.CONTROLLERS

  def never(factor, basis, eigvals, damping, cfg, key):
    del factor, basis, key
    return controllers.Decision(jnp.asarray(False), damping, eigvals,
                                jnp.zeros((), damping.dtype))

  controllers.register("test_never")(never)
  try:
    params = {"w": jnp.ones((6, 4)), "k": jnp.ones((2, 3, 4))}
    for tx in (fo.scale_by_foam(controller="test_never", check_frequency=2),
               fo.soap(1e-2, controller="test_never", check_frequency=2),
               fo.scale_by_foam(controller="test_never", check_frequency=2,
                                refresh_batching="bucket")):
      updates, state = _run(tx, params, 6)
      s = fo.stats(state)
      # Only the first check of each factor decomposes; the later ones ask
      # the new controller, which never refreshes.
      assert int(s["eigendecompositions"]) == int(s["num_factors"]) > 0
      assert int(s["checks"]) > int(s["num_factors"])
      assert all(bool(jnp.all(jnp.isfinite(u)))
                 for u in jax.tree.leaves(updates))
  finally:
    del controllers.CONTROLLERS["test_never"]


def test_one_controller_registry():
  from foam_optax._src import config, controllers
  assert not hasattr(config, "CONTROLLERS")
  for name in controllers.CONTROLLERS:
    fo.scale_by_foam(controller=name)
  with pytest.raises(ValueError, match="controller must be one of"):
    fo.scale_by_foam(controller="unknown")


@pytest.mark.parametrize("name", ["scale_by_foam", "scale_by_shampoo"])
def test_uncached_inverse_root_matches_cached(name):
  """X applied through Q and D equals the cached X, with no (m, m) X kept."""
  params = {"w": jnp.ones((6, 4)), "k": jnp.ones((2, 3, 4))}
  opts = dict(check_frequency=2, pseudo_inverse_rtol=1e-6)
  cached, _ = _run(getattr(fo, name)(**opts), params, 5)
  uncached, state = _run(getattr(fo, name)(cache_inverse_root=False, **opts),
                         params, 5)
  for key in params:
    np.testing.assert_allclose(uncached[key], cached[key], rtol=2e-4,
                               atol=1e-6)
  assert all(fs.inverse_root is None for g in state.classes
             for fs in (g.left, g.right) if fs is not None)


def test_inject_hyperparams_with_static_storage_dtype_and_dimension_numbers():
  """As README says: shape and dtype arguments static, then a jitted init."""
  tx = optax.inject_hyperparams(fo.foam, static_args=(
      "block_size", "max_precond_dim", "mu_dtype",
      "weight_dimension_numbers"))(
          learning_rate=0.1, mu_dtype=jnp.bfloat16, block_size=4,
          weight_dimension_numbers=lambda p: {"k": fo.DimensionNumbers(1, 2)})
  state = jax.jit(tx.init)({"k": jnp.ones((2, 3, 4))})
  (leaf,) = _leaf_states(state)
  assert leaf.momentum.dtype == jnp.bfloat16 and leaf.layout.batch == 2
  assert set(state.hyperparams) >= {"learning_rate", "epsilon"}
  with pytest.raises(ValueError, match="block_size"):
    jax.jit(optax.inject_hyperparams(fo.foam)(0.1).init)({"w": jnp.ones((4, 4))})


def test_root_damping_epsilon_keeps_decisions_and_builds_x_with_epsilon0():
  """``root_damping='epsilon'`` (the X@ε0 ablation): on the same gradients
  the controller makes the same decisions and damping as FOAM's, while X is
  built with ε0, checked against X assembled from the state's basis."""
  rng = np.random.default_rng(0)
  # Stationary, then a new mean: FOAM raises the damping before refreshing.
  means = [rng.standard_normal((6, 5)) for _ in range(2)]
  grads = [means[t >= 12] + 0.3 * rng.standard_normal((6, 5))
           for t in range(24)]
  options = dict(b1=0.0, epsilon=1e-3, max_epsilon=1e-1, threshold=0.1,
                 check_frequency=2, grafting="none")
  runs = {}
  for root_damping in ("controller", "epsilon"):
    tx = fo.scale_by_foam(root_damping=root_damping, **options)
    state = tx.init(jnp.zeros((6, 5)))
    step = jax.jit(tx.update)
    dampings, updates = [], []
    for g in grads:
      u, state = step(jnp.asarray(g, jnp.float32), state)
      dampings.append(np.asarray(state.classes[0].left.damping))
      updates.append(u)
    runs[root_damping] = (np.stack(dampings), state, updates)
  d_controller, _, u_controller = runs["controller"]
  d_epsilon, state, u_epsilon = runs["epsilon"]
  np.testing.assert_array_equal(d_controller, d_epsilon)
  assert d_controller.max() > 1e-3   # the damping moved: the test can fail
  assert fo.stats(state)["eigendecompositions"] > 2
  gs = state.classes[0]
  x = lambda fs: (fs.basis[0] * (fs.eigvals[0] + 1e-3) ** -0.5) @ fs.basis[0].T
  corrected = grads[-1]   # b1 = 0: the momentum is the gradient
  np.testing.assert_allclose(u_epsilon[-1], x(gs.left) @ corrected @ x(gs.right),
                             rtol=2e-4, atol=1e-6)
  assert not np.allclose(u_controller[-1], u_epsilon[-1], rtol=1e-3)
