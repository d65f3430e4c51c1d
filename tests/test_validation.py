"""Out-of-range hyperparameters raise ValueError at construction.

Every public factory is checked against every invalid value of every argument
it accepts; the message must name the argument and its allowed range. Bad
parameters and gradients (complex, integer, float0) are refused naming the
leaf, and a stuck run with non-finite parameters names them.
"""

import inspect
import math
import re

import optax
import pytest
import jax.numpy as jnp
import jax
import numpy as np

import foam_optax as fo


FACTORIES = {
    "foam": fo.foam,
    "shampoo": fo.shampoo,
    "soap": fo.soap,
    "scale_by_foam": fo.scale_by_foam,
    "scale_by_shampoo": fo.scale_by_shampoo,
    "scale_by_soap": fo.scale_by_soap,
    "asgo": fo.asgo,
    "scale_by_asgo": fo.scale_by_asgo,
}
NEEDS_LR = ("foam", "shampoo", "soap", "asgo")

UNIT = r"\[0\.0, 1\.0\)"
POSITIVE = r"\(0\.0, inf\)"
NON_NEGATIVE = r"\[0\.0, inf\)"
INT1 = r"an integer >= 1"
NUMBER = r"a real number, got .* of type"

# (argument, invalid value, regex of the allowed range in the message)
CASES = [
    ("learning_rate", -1e-3, NON_NEGATIVE),
    ("learning_rate", math.nan, NON_NEGATIVE),
    ("learning_rate", math.inf, NON_NEGATIVE),
    ("weight_decay", math.inf, NON_NEGATIVE),
    ("epsilon", math.inf, None), ("graft_eps", math.inf, NON_NEGATIVE),
    ("max_epsilon", math.inf, POSITIVE), ("threshold", math.inf, POSITIVE),
    ("weight_decay", -0.1, NON_NEGATIVE),
    ("b1", -0.1, UNIT), ("b1", 1.0, UNIT), ("b1", 1.5, UNIT),
    ("b1", math.nan, UNIT),
    ("b2", -1e-3, UNIT), ("b2", 1.0, UNIT),
    ("graft_b2", 1.0, UNIT), ("graft_b2", -0.5, UNIT),
    ("epsilon", 0.0, None), ("epsilon", -1e-9, None),
    ("controller_epsilon", 0.0, POSITIVE),
    ("controller_epsilon", -1.0, POSITIVE),
    ("graft_eps", -1e-9, NON_NEGATIVE),
    ("max_epsilon", 1e-12, r">= (controller_)?epsilon"),
    ("threshold", 0.0, POSITIVE), ("threshold", -0.75, POSITIVE),
    ("exponent", 0.0, POSITIVE), ("exponent", -2.0, POSITIVE),
    ("residual_tol", -0.1, r"\[0\.0, 1\.0\]"),
    ("residual_tol", 1.5, r"\[0\.0, 1\.0\]"),
    ("check_frequency", 0, INT1), ("check_frequency", 2.5, INT1),
    ("check_frequency", True, INT1),
    ("block_size", 0, INT1), ("block_size", -4, INT1),
    ("max_precond_dim", 0, INT1),
    ("start_preconditioning_step", 0, INT1),
    ("controller", "bogus", r"one of \("),
    ("grafting", "adagrad", r"one of \("),
    ("preconditioner", "inverse", r"one of \("),
    ("refresh_method", "lanczos", r"one of \("),
    ("refresh_batching", "vmap", r"one of \("),
    ("proxy", "hutchinson", r"one of \("),
    ("root_damping", "zero", r"one of \("),
    ("root_method", "svd", r"one of \("), ("root_iterations", 0, INT1),
    ("graft_rms", 0.0, POSITIVE), ("graft_rms", -0.2, POSITIVE),
    ("proxy_probes", 0, INT1), ("proxy_probes", 4.5, INT1),
    ("precondition_1d", "yes", "a bool"),
    ("stagger", 1, "a bool"), ("one_sided", "yes", "a bool"),
    ("skip_nonfinite", None, "a bool"),
    ("max_consecutive_skips", 0, INT1),
    ("statistics_compute_steps", 0, INT1),
    ("statistics_compute_steps", 1.5, INT1),
    # Non-numeric types are rejected even when float() would parse them.
    ("check_frequency", "20", NUMBER), ("block_size", "1024", NUMBER),
    ("learning_rate", "1e-3", NUMBER), ("b1", "0.9", NUMBER),
    ("max_epsilon", "3e-7", NUMBER), ("threshold", True, NUMBER),
    ("weight_decay", False, NUMBER), ("exponent", [2], NUMBER),
    ("controller_epsilon", "1e-9", NUMBER),
    ("max_consecutive_skips", "5", NUMBER),
    ("cache_inverse_root", "no", "a bool"),
    ("pseudo_inverse_rtol", 1.0, r"\[0\.0, 1\.0\)"),
    ("pseudo_inverse_rtol", -1e-6, r"\[0\.0, 1\.0\)"),
    ("mu_dtype", "int32", "floating dtype"),
    ("second_moment_dtype", "complex64", "floating dtype"),
    ("factor_matrix_dtype", "not-a-dtype", "floating dtype"),
    ("factor_matrix_eigenvectors_dtype", "int8", "floating dtype"),
    ("inv_factor_matrix_dtype", "bool", "floating dtype"),
    ("rotation_basis", "current", r"one of \("),
    ("first_step", "skip", r"one of \("),
    ("tensor_shaping", "flat", r"one of \("),
    ("merge_dims", 1, "a bool"),
    ("decay_after_update", "yes", "a bool"),
    ("bias_correction", "loo", r"one of \("),
    ("ema_bias_correction", 1, "a bool"),
    ("cross_fit_safeguard", "yes", "a bool"),
]


def _epsilon_range(name):
  # SOAP's `epsilon` is Adam's epsilon (>= 0); elsewhere it is the damping.
  return NON_NEGATIVE if name.endswith("soap") else POSITIVE


def _cases():
  for name, factory in FACTORIES.items():
    accepted = inspect.signature(factory).parameters
    for arg, value, pattern in CASES:
      if arg not in accepted:
        continue
      if arg == "epsilon":
        if name.endswith("soap") and value == 0.0:
          continue   # Adam's epsilon may be 0
        pattern = _epsilon_range(name)
      yield pytest.param(name, arg, value, pattern, id=f"{name}-{arg}={value!r}")


@pytest.mark.parametrize("name,arg,value,pattern", list(_cases()))
def test_invalid_argument_raises(name, arg, value, pattern):
  kwargs = {arg: value}
  if name in NEEDS_LR and arg != "learning_rate":
    kwargs["learning_rate"] = 1e-3
  with pytest.raises(ValueError) as info:
    FACTORIES[name](**kwargs)
  message = str(info.value)
  assert message.startswith(arg + " "), message
  assert re.search(pattern, message), message


@pytest.mark.parametrize("name", list(FACTORIES))
def test_every_case_applies_somewhere(name):
  """Each factory is checked on most of its numeric/choice arguments."""
  accepted = set(inspect.signature(FACTORIES[name]).parameters)
  covered = {arg for arg, _, _ in CASES} & accepted
  # Both need the parameters: checked by `init` (tests/test_layout.py, tests/test_optax_contracts.py).
  untested = accepted - covered - {"weight_decay_mask",
                                   "weight_dimension_numbers"}
  assert not untested, untested


@pytest.mark.parametrize("name", list(FACTORIES))
def test_boundary_values_are_accepted(name):
  """The closed ends of each range are valid and give a working transform."""
  accepted = inspect.signature(FACTORIES[name]).parameters
  kwargs = {k: v for k, v in dict(
      b1=0.0, b2=0.0, graft_b2=0.0, residual_tol=1.0, check_frequency=1,
      block_size=1, max_precond_dim=1, start_preconditioning_step=1,
      weight_decay=0.0, graft_eps=0.0).items() if k in accepted}
  if name in NEEDS_LR:
    kwargs["learning_rate"] = 0.0
  tx = FACTORIES[name](**kwargs)
  assert isinstance(tx, optax.GradientTransformation)


@pytest.mark.parametrize("name", NEEDS_LR)
def test_schedule_learning_rate_accepted(name):
  tx = FACTORIES[name](optax.linear_schedule(1e-3, 0.0, 10))
  assert isinstance(tx, optax.GradientTransformation)


def test_equal_epsilons_accepted():
  fo.scale_by_foam(epsilon=1e-6, max_epsilon=1e-6)
  fo.scale_by_soap(controller_epsilon=1e-6, max_epsilon=1e-6)


@pytest.mark.parametrize("factory", [fo.scale_by_shampoo,
                                     lambda **k: fo.shampoo(1e-3, **k)])
def test_shampoo_accepts_large_epsilon(factory):
  """Shampoo has no max_epsilon argument, so no epsilon may clash with it."""
  import jax.numpy as jnp
  tx = factory(epsilon=1e-3)
  state = tx.init({"w": jnp.ones((3, 2))})
  params = {"w": jnp.ones((3, 2))}
  updates, _ = jax.jit(tx.update)(params, state, params)
  assert np.all(np.isfinite(np.asarray(updates["w"])))


# --- Arguments a function does not take ---------------------------------------

OPTIMIZERS = ["foam", "shampoo", "soap", "asgo", "dasgo", "bias_corrected_adamw",
              "scale_by_foam", "scale_by_shampoo", "scale_by_soap",
              "scale_by_asgo", "scale_by_dasgo", "scale_by_bias_corrected_adam",
              "scale_by_spectral_norm"]


def _raised_here(info):
  """The error comes from the package, not from inside `inspect`."""
  assert not info.traceback[-1].path.name == "inspect.py"


def test_misspelled_keyword_names_the_closest_argument():
  with pytest.raises(TypeError) as info:
    fo.foam(1e-3, weight_decy=1e-4)
  assert str(info.value) == ("fo.foam() got an unexpected keyword argument "
                             "'weight_decy'; did you mean 'weight_decay'?")
  _raised_here(info)
  with pytest.raises(TypeError, match=r"^fo\.scale_by_soap\(\) got an "
                     r"unexpected keyword argument 'treshold'; did you mean "
                     r"'threshold'\?$"):
    fo.scale_by_soap(treshold=0.5)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_names_itself_for_an_unknown_keyword(name):
  fn = getattr(fo, name)
  params = inspect.signature(fn).parameters
  known = next(p for p in params if p != "learning_rate")
  misspelled = known[:-1] + "_" + known[-1]
  args = (1e-3,) if "learning_rate" in params else ()
  with pytest.raises(TypeError) as info:
    fn(*args, **{misspelled: 0.5})
  assert str(info.value) == (
      f"fo.{name}() got an unexpected keyword argument {misspelled!r}; did "
      f"you mean {known!r}?")
  _raised_here(info)
  with pytest.raises(TypeError) as info:
    fn(*args, zzz=1)
  assert str(info.value) == (
      f"fo.{name}() got an unexpected keyword argument 'zzz'; help(fo.{name})"
      " lists its arguments.")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_names_itself_for_too_many_positional_arguments(name):
  fn = getattr(fo, name)
  params = list(inspect.signature(fn).parameters)
  alias = "learning_rate" in params
  with pytest.raises(TypeError) as info:
    fn(*([1e-3] * (2 if alias else 1)))
  message = str(info.value)
  takes = ("takes 1 positional argument (learning_rate) but 2 were given"
           if alias else "takes no positional arguments but 1 was given")
  keywords = [p for p in params if p != "learning_rate"][:3]
  assert message.startswith(
      f"fo.{name}() {takes}; pass {'the others' if alias else 'them'} by "
      "keyword ("
      + ", ".join(f"{k}=..." for k in keywords) + ", ...)"), message
  _raised_here(info)


def test_a_learning_rate_given_to_a_transformation_points_to_the_alias():
  with pytest.raises(TypeError, match=r"the learning rate goes to the alias, "
                     r"fo\.foam\(learning_rate, \.\.\.\)\.$"):
    fo.scale_by_foam(1e-3)


def test_missing_and_repeated_arguments_name_the_function():
  with pytest.raises(TypeError, match=r"^fo\.foam\(\) missing a required "
                     r"argument: 'learning_rate'$"):
    fo.foam(weight_decay=1e-4)
  with pytest.raises(TypeError, match=r"^fo\.dasgo\(\) got multiple values "
                     r"for argument 'learning_rate'$"):
    fo.dasgo(1e-3, learning_rate=1e-3)


@pytest.mark.parametrize("init", [
    lambda: fo.foam(1e-3).init({"a": jnp.ones(3), "c": jnp.ones((3, 3),
                                                                jnp.complex64)}),
    lambda: fo.scale_by_soap().init({"z": jnp.ones(4, jnp.complex64)}),
])
def test_complex_parameters_rejected_naming_the_leaf(init):
  with pytest.raises(ValueError, match=r"\['(c|z)'\] is complex"):
    init()


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
