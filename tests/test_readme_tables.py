"""The option tables of docs/options.md and their defaults, generated from the option table."""

import ast
import inspect
import re

import optax
import pytest

import foam_optax as fo
from readme_blocks import ROOT

OPTIONS = ROOT / "docs" / "options.md"


@pytest.mark.parametrize("marker,table", [
    ("defaults-table", "defaults_table"), ("arguments-table", "arguments_table")])
def test_readme_tables_are_derived_from_the_option_table(marker, table):
  """The tables of docs/options.md are generated from the one table of
  options."""
  from foam_optax._src import readme_tables
  text = OPTIONS.read_text()
  start, end = f"<!-- {marker}:start -->\n", f"\n<!-- {marker}:end -->"
  block = text[text.index(start) + len(start):text.index(end)]
  expected = getattr(readme_tables, table)()
  assert block == expected, (
      f"docs/options.md's {marker} is stale: run `python -m "
      "foam_optax._src.readme_tables`")


def test_readme_defaults_are_the_signatures():
  """Cross-check of the generated table against `inspect`: every default
  shown is the one the function has."""
  text = OPTIONS.read_text()
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
