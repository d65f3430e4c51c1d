"""optax 0.2.8's own contract suites, run against `foam`, `shampoo` and `soap`.

The test functions are optax's: those of `optax/contrib/_common_test.py` and
the generic part of `optax/_src/alias_test.py`, imported from the installed
package and re-bound so that the names they look optimizers up by resolve to
ours. Two substitutions only:

* the optimizer factories (``_get_opt_factory`` / ``_get_opt``);
* ``inject_hyperparams`` makes `block_size` and `max_precond_dim` static, as
  optax's suite does for adafactor's ``min_dim_size_to_factor``: they decide
  the state's shapes, so a jitted ``init`` cannot read them traced.

Complex dtypes are left out: the optimizers reject complex parameters at
``init`` (tested in test_validation.py). Each optimizer also runs with
``precondition_1d=True`` (the suites' problems are mostly vectors); outside
the convergence tests those runs are marked slow. So are the runs that repeat
another: optax's alias tests of extra arguments, `inject_hyperparams`,
dtypes, `MultiSteps` and state stability check what the contrib tests of the
same names check, on the same problems and at least as tightly, for an
optimizer without a wrapper; without a wrapper, the contrib ``wrap=True`` run
is the ``wrap=False`` one; Shampoo on a vector without ``precondition_1d``
compiles FOAM's program (one such run per test function is kept); float32
parameters take bfloat16's path without its casts, and bfloat16 float16's;
and of the convergence runs, those on the parabola repeat the path of those
on the Rosenbrock function, those on the lone matrix the mixed target's
matrix leaf, and the contrib ones on the Rosenbrock function with
``precondition_1d`` the alias suite's.
"""

import types
import unittest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import foam_optax as fo

absltest = pytest.importorskip("absl.testing.absltest")
contrib_suite = pytest.importorskip("optax.contrib._common_test")
alias_suite = pytest.importorskip("optax._src.alias_test")

FACTORIES = {"foam": fo.foam, "shampoo": fo.shampoo, "soap": fo.soap}
STRUCTURAL = ("block_size", "max_precond_dim")

# As optax lists its own: a name and the arguments the suites call it with.
# The suites' problems are mostly vectors, which only `precondition_1d`
# preconditions: each optimizer runs with it too.
OPTIMIZERS = tuple(
    {"opt_name": name, "opt_kwargs": {"learning_rate": 1e-2, **extra}}
    for name in FACTORIES for extra in ({}, {"precondition_1d": True}))
NO_WRAPPER = {"wrapper_name": None, "wrapper_kwargs": None}


def _inject_with_static_structure(factory, static_args=()):
  return optax.inject_hyperparams(
      factory, static_args=tuple(static_args) + STRUCTURAL)


_INJECT = types.SimpleNamespace(inject_hyperparams=_inject_with_static_structure)


def _rebind(suite, class_name, name):
  """optax's test function `suite.class_name.name`, reading our
  optimizers. (Classes are looked up here, not held at module level, where
  pytest would collect and run optax's whole suites.)"""
  cls = getattr(suite, class_name)
  generated = next(v for k, v in vars(cls).items()
                   if k.startswith(name) and k[len(name):].isdigit())
  original = generated.__wrapped__
  namespace = dict(original.__globals__,
                   _get_opt_factory=FACTORIES.__getitem__,
                   _get_opt=lambda self, opt_name: FACTORIES[opt_name],
                   _inject=_INJECT)
  assert suite.__name__ == original.__module__
  return types.FunctionType(original.__code__, namespace, original.__name__,
                            original.__defaults__, original.__closure__)


class _Case(absltest.TestCase):
  """The `self` optax's tests use (subTest, assertEmpty, skipTest...)."""

  __test__ = False

  def runTest(self):   # pylint: disable=invalid-name
    pass


def _run(suite, class_name, name, **kwargs):
  _rebind(suite, class_name, name)(_Case(), **kwargs)


def _cases(*extra_axes, vectors_preconditioned_in_ci=False):
  """pytest params: every optimizer times every value of `extra_axes`
  ((name, values) pairs). The `precondition_1d` runs are slow (opt-in)
  unless `vectors_preconditioned_in_ci`: CI keeps them for the convergence
  tests, where preconditioning changes the result."""
  result = []
  for o in OPTIMIZERS:
    combos = [{}]
    for axis, values in extra_axes:
      combos = [{**c, axis: v} for c in combos for v in values]
    for c in combos:
      ident = "-".join([o["opt_name"]] + [
          k for k, v in o["opt_kwargs"].items() if v is True] + [
              getattr(v, "__name__", str(v)) for v in c.values()])
      slow = ("precondition_1d" in o["opt_kwargs"]
              and not vectors_preconditioned_in_ci)
      result.append(pytest.param({**o, **c}, id=ident,
                                 marks=(pytest.mark.slow,) if slow else ()))
  return result


def _slow(cases, where=lambda kwargs: True):
  """`cases` with those `where` picks marked slow (opt-in)."""
  return [pytest.param(*c.values, id=c.id, marks=(*c.marks, pytest.mark.slow))
          if where(c.values[0]) else c for c in cases]


def _compiles_foams_program(kwargs):
  """Shampoo's runs on the suites' vector problems without
  `precondition_1d`: no factor, so Shampoo steps by its grafting Adam as
  FOAM does, and the compiled program is FOAM's run's."""
  return (kwargs["opt_name"] == "shampoo"
          and "precondition_1d" not in kwargs["opt_kwargs"])


def _but_one_of_shampoos(kept):
  """Shampoo's runs of FOAM's programs, but the one `kept` (so that every
  optimizer runs each test function): slow."""
  return lambda kwargs: (_compiles_foams_program(kwargs)
                         and not kept(kwargs))


def _float32_as_bfloat16(kwargs):
  """float32 parameters take the bfloat16 run's path, without its casts
  (`to_dtype` clips and casts only below float32): slow."""
  return kwargs["dtype"] == "float32"


def _on_the_parabola(kwargs):
  """A convergence run on the parabola: the same vector's path as the run
  on the Rosenbrock function (with or without `precondition_1d`), the harder
  problem: slow."""
  return kwargs["target"] in (contrib_suite._setup_parabola,
                              alias_suite._setup_parabola)


_TARGETS = (contrib_suite._setup_parabola, contrib_suite._setup_rosenbrock,
            contrib_suite._setup_matrix_parabola,
            contrib_suite._setup_mixed_tensor_target)

# --- optax/contrib/_common_test.py --------------------------------------------

_CONTRIB = "ContribTest"


@pytest.mark.parametrize("kwargs", _slow(_cases(("wrap", (True, False))),
                                         where=lambda kwargs: kwargs["wrap"]))
def test_contrib_accept_extra_args(kwargs):
  _run(contrib_suite, _CONTRIB, "test_optimizers_accept_extra_args",
       **NO_WRAPPER, **kwargs)


def _contrib_convergence_repeated(kwargs):
  """The contrib convergence runs that another run repeats (slow): on the
  lone matrix, the mixed target's (its matrix leaf, the same path); on the
  parabola, `_on_the_parabola`; on the Rosenbrock function with
  `precondition_1d`, test_alias_optimization's (the same problem, in a
  third of the steps); and Shampoo's on a vector without it, FOAM's
  (`_compiles_foams_program`)."""
  if kwargs["target"] is contrib_suite._setup_matrix_parabola:
    return True
  if kwargs["target"] is contrib_suite._setup_mixed_tensor_target:
    return False
  return (_on_the_parabola(kwargs)
          or "precondition_1d" in kwargs["opt_kwargs"]
          or _compiles_foams_program(kwargs))


@pytest.mark.parametrize("kwargs", _slow(_cases(
    ("target", _TARGETS), ("dtype", ("float32",)),
    vectors_preconditioned_in_ci=True), where=_contrib_convergence_repeated))
def test_contrib_optimizers(kwargs):
  """map_params, 30 000 scanned steps, convergence to 3e-2."""
  _run(contrib_suite, _CONTRIB, "test_optimizers", **NO_WRAPPER, **kwargs)


@pytest.mark.parametrize("kwargs", _cases())
def test_contrib_inject_hyperparams(kwargs):
  _run(contrib_suite, _CONTRIB,
       "test_optimizers_can_be_wrapped_in_inject_hyperparams", **kwargs)


@pytest.mark.parametrize("kwargs", _slow(
    _cases(("dtype", ("bfloat16", "float32"))), where=_float32_as_bfloat16))
def test_contrib_preserve_dtype(kwargs):
  _run(contrib_suite, _CONTRIB, "test_preserve_dtype", **kwargs)


@pytest.mark.parametrize("kwargs", _slow(
    _cases(("dtype", ("bfloat16", "float32"))), where=_float32_as_bfloat16))
def test_contrib_gradient_accumulation(kwargs):
  _run(contrib_suite, _CONTRIB, "test_gradient_accumulation", **kwargs)


def _state_stability_repeated(kwargs):
  """bfloat16 as float16 (the same low-precision storage and casts), and
  Shampoo's runs of FOAM's programs but float32's: slow."""
  return kwargs["dtype"] == jnp.bfloat16 or _but_one_of_shampoos(
      lambda kwargs: kwargs["dtype"] == jnp.float32)(kwargs)


@pytest.mark.parametrize("kwargs", _slow(_cases(
    ("dtype", (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))),
    where=_state_stability_repeated))
def test_contrib_state_shape_dtype_shard_stability(kwargs):
  _run(contrib_suite, _CONTRIB, "test_state_shape_dtype_shard_stability",
       **NO_WRAPPER, **kwargs)


@pytest.mark.parametrize("kwargs", _cases())
def test_contrib_learning_rate_schedule(kwargs):
  # optax skips this test unless `learning_rate` is annotated
  # optax.ScalarOrSchedule: here a skip is a failure.
  name = "test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such"
  try:
    _run(contrib_suite, _CONTRIB, name, **NO_WRAPPER, **kwargs)
  except unittest.SkipTest as skipped:
    pytest.fail(f"optax skipped the test: {skipped}")


# --- optax/_src/alias_test.py (its common tests) -----------------------------

_ALIAS = "AliasTest"


@pytest.mark.parametrize("kwargs", _slow(_cases(
    ("target", (alias_suite._setup_parabola, alias_suite._setup_rosenbrock)),
    ("dtype", (jnp.float32,)), vectors_preconditioned_in_ci=True),
    where=_on_the_parabola))
def test_alias_optimization(kwargs):
  """map_params, 10 000 steps, no recompilation, convergence to 3e-2."""
  _run(alias_suite, _ALIAS, "test_optimization", **kwargs)


@pytest.mark.parametrize("kwargs", _slow(_cases()))
def test_alias_accept_extra_args(kwargs):
  _run(alias_suite, _ALIAS, "test_optimizers_accept_extra_args", **kwargs)


@pytest.mark.parametrize("kwargs", _slow(_cases()))
def test_alias_inject_hyperparams(kwargs):
  _run(alias_suite, _ALIAS,
       "test_optimizers_can_be_wrapped_in_inject_hyperparams", **kwargs)


@pytest.mark.parametrize("kwargs", _slow(
    _cases(("dtype", ("bfloat16", "float32")))))
def test_alias_preserve_dtype(kwargs):
  _run(alias_suite, _ALIAS, "test_preserve_dtype", **kwargs)


@pytest.mark.parametrize("kwargs", _slow(_cases(
    ("dtype", (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)))))
def test_alias_state_shape_dtype_shard_stability(kwargs):
  _run(alias_suite, _ALIAS, "test_state_shape_dtype_shard_stability",
       **kwargs)


@pytest.mark.parametrize("kwargs", _slow(
    _cases(("dtype", ("bfloat16", "float32")))))
def test_alias_gradient_accumulation(kwargs):
  _run(alias_suite, _ALIAS, "test_gradient_accumulation", **kwargs)


# --- optax.tree.map_params, as optax/tree_utils/_state_utils_test.py uses it --

_PARAMS = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)}




def _momenta(state):
  """The momentum buffers of every foam_optax state in `state`."""
  return [m for core in fo.find_states(state) for m in jax.tree.leaves(core.mu)]


def _arrays_outside_params(core):
  return jax.tree.leaves(core._replace(mu=None, nu=None))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_map_params_inject_hyperparams(name):
  opt = optax.inject_hyperparams(FACTORIES[name])(learning_rate=1e-3)
  state = opt.init(_PARAMS)
  mapped = optax.tree.map_params(opt, lambda v: v + 1, state)
  assert mapped.hyperparams["learning_rate"] == 1e-3
  core, mapped_core = state.inner_state[0], mapped.inner_state[0]
  for momentum in _momenta(mapped_core):
    np.testing.assert_array_equal(momentum, 1.0)
  # Factor statistics and counters are not parameters: left as they were.
  for a, b in zip(_arrays_outside_params(core),
                  _arrays_outside_params(mapped_core)):
    assert a is b


@pytest.mark.parametrize("name", list(FACTORIES))
def test_map_params_to_none_and_non_params_to_none(name):
  opt = FACTORIES[name](optax.linear_schedule(1e-2, 1e-4, 10))
  state = opt.init(_PARAMS)
  to_none = optax.tree.map_params(opt, lambda _: None, state)
  assert to_none[0].mu == {"w": None, "b": None}
  assert jax.tree.structure(_arrays_outside_params(to_none[0])) == (
      jax.tree.structure(_arrays_outside_params(state[0])))
  ones = optax.tree.map_params(opt, lambda _: 1, state,
                               transform_non_params=lambda _: None)
  assert ones[0].mu == {"w": 1, "b": 1}
  assert ones[0].count is None and ones[0].classes is None


def test_map_params_through_partition_with_adamw():
  params = {"embed": jnp.zeros((10, 3)), **_PARAMS}
  opt = fo.partition(fo.foam(1e-2), optax.adamw(1e-2))
  state = opt.init(params)
  mapped = optax.tree.map_params(opt, lambda v: v + 1, state)
  adam = mapped.inner_states["diagonal"].inner_state[0].mu
  np.testing.assert_array_equal(adam["embed"], 1.0)
  assert all(bool(jnp.all(m == 1.0)) for m in _momenta(mapped))


# optax maps `f` over every copy of the parameter tree in a state, with any
# extra trees (`*rest`, e.g. the parameters' partition specs) alongside.


@pytest.mark.parametrize("name", list(FACTORIES))
def test_map_params_with_an_extra_tree(name):
  opt = FACTORIES[name](1e-2)
  specs = {"w": ("rows", None), "b": (None,)}
  mapped = optax.tree.map_params(
      opt, lambda _, spec: spec, opt.init(_PARAMS), specs,
      transform_non_params=lambda _: None)
  core, = fo.find_states(mapped)
  assert core.mu == specs
  # Root-inverse preconditioning with Adam grafting keeps a grafting moment
  # for every parameter: a second copy of the tree. SOAP does not.
  assert core.nu == (specs if name != "soap" else None)


def test_map_params_leaves_tensor_factors_alone():
  params = {"k": jnp.zeros((2, 3, 4))}
  opt = fo.soap(1e-2)
  state = opt.init(params)
  mapped = optax.tree.map_params(opt, lambda _: None, state)
  core, = fo.find_states(mapped)
  assert core.mu == {"k": None}
  # The per-dimension factors are not parameter-shaped: kept as they were.
  (tensor,), (before,) = core.tensors, fo.find_states(state)[0].tensors
  assert jax.tree.leaves(tensor) and all(
      a is b for a, b in zip(jax.tree.leaves(tensor), jax.tree.leaves(before)))
