"""The documentation's tables of the aliases' arguments (docs/options.md,
linked from the README), generated from the option table (`options`), and
the command that regenerates every generated text.

``python -m foam_optax._src.readme_tables`` rewrites the generated parts of
the source (`signatures.update_sources`: the optimizers' signatures, their
docstrings' argument lists and `Config`'s fields) and the tables between
their markers in docs/options.md (`update_readme`; another page's path may
be given); the tests check that both are current.
"""

from __future__ import annotations

import inspect
import re
import sys

import optax

from foam_optax._src import options
from foam_optax._src import signatures

_ALIASES = ("foam", "shampoo", "soap", "asgo")
# optax.adamw's names for the arguments it shares with the aliases.
_ADAMW = {"b1": "b1", "b2": "b2", "epsilon": "eps", "weight_decay":
          "weight_decay", "mu_dtype": "mu_dtype"}


def _public_options(optimizer: str) -> dict:
  return {o.public_name(optimizer): o
          for o in options.exposed(optimizer, alias=True)}


def _argument_rows() -> list:
  """Every alias argument once, in the order of first appearance."""
  names = []
  for optimizer in _ALIASES:
    names += [n for n in _public_options(optimizer) if n not in names]
  return names


def defaults_table() -> str:
  """The README's side-by-side defaults of the aliases and optax.adamw."""
  adamw = inspect.signature(optax.adamw).parameters
  lines = ["| argument | " + " | ".join(f"`fo.{o}`" for o in _ALIASES)
           + " | `optax.adamw` |", "|---" * (len(_ALIASES) + 2) + "|"]
  for name in _argument_rows():
    cells = []
    for optimizer in _ALIASES:
      option = _public_options(optimizer).get(name)
      cells.append("—" if option is None
                   else f"`{option.default_for(optimizer)!r}`")
    other = _ADAMW.get(name)
    cells.append("—" if other is None else f"`{adamw[other].default!r}`")
    label = f"`{name}`" + ("" if other in (None, name)
                           else f" (adamw: `{other}`)")
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _first_sentence(doc: str) -> str:
  """Up to the first full stop followed by a capital letter."""
  end = re.search(r"\.\s+(?=[A-Z])", doc)
  return (doc[:end.start()] if end else doc).rstrip(".")


def arguments_table() -> str:
  """The README's list of what each argument does, first sentences only;
  an argument whose meaning differs between aliases gets one per meaning."""
  lines = ["| argument | what it sets |", "|---|---|",
           f"| `learning_rate` | {options.LEARNING_RATE.doc.rstrip('.')} "
           "(aliases only) |"]
  for name in _argument_rows():
    meanings = {}   # option's first sentence -> the aliases it belongs to
    for optimizer in _ALIASES:
      option = _public_options(optimizer).get(name)
      if option is not None:
        first = _first_sentence(option.doc_for(optimizer))
        if option.static:
          first += " (static: fixed at `init`)"
        meanings.setdefault(first, []).append(f"`fo.{optimizer}`")
    if len(meanings) == 1:
      text = next(iter(meanings))
    else:
      text = "; ".join(f"{', '.join(who)}: {first}"
                       for first, who in meanings.items())
    lines.append(f"| `{name}` | {text} |")
  return "\n".join(lines)


README_TABLES = {"defaults-table": defaults_table,
                 "arguments-table": arguments_table}


def update_readme(path: str) -> None:
  """Rewrites the generated tables between their markers in `path`."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  for marker, table in README_TABLES.items():
    start, end = f"<!-- {marker}:start -->\n", f"\n<!-- {marker}:end -->"
    head, rest = text.split(start)
    text = head + start + table() + end + rest.split(end, 1)[1]
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


if __name__ == "__main__":
  signatures.update_sources()
  update_readme(sys.argv[1] if len(sys.argv) > 1 else "docs/options.md")
