"""`Config`: typed, carrying the option table, with the functions' defaults."""

import pytest

import foam_optax as fo
from helpers import defaults


@pytest.mark.parametrize("fn", [fo.scale_by_foam, fo.foam, fo.scale_by_shampoo,
                                fo.shampoo])
def test_defaults_agree_with_config(fn):
  import dataclasses
  from foam_optax._src.config import Config
  config = {f.name: f.default for f in dataclasses.fields(Config)}
  shared = {k: v for k, v in defaults(fn).items() if k in config}
  assert len(shared) >= 15
  assert shared == {k: config[k] for k in shared}


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
