"""The optimizers' signatures: generated from the option table, as optax
writes them, and the hand-written aliases' agreeing with their
transformations."""

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import foam_optax as fo
from helpers import defaults


def test_generated_source_is_the_option_table():
  """The signatures, docstring argument lists and `Config` fields written in
  the source are what the option table generates."""
  from foam_optax._src import signatures
  texts = signatures.generated_sources()
  assert {p.name for p in texts} == {"alias.py", "transform.py", "config.py"}
  for path, text in texts.items():
    assert path.read_text(encoding="utf-8") == text, (
        f"{path.name} is stale: run `python -m foam_optax._src.readme_tables`")


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
          variance_correction=False, cross_fit_safeguard=False,
          mu_dtype=jnp.bfloat16)),
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


@pytest.mark.parametrize("alias,core", [(fo.foam, fo.scale_by_foam),
                                        (fo.shampoo, fo.scale_by_shampoo),
                                        (fo.soap, fo.scale_by_soap)])
def test_alias_defaults_agree_with_their_transformation(alias, core):
  alias_defaults, core_defaults = defaults(alias), defaults(core)
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
