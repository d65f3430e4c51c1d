"""The optimizers' signatures, docstrings and README tables, generated from
the option table (`options`).

`optimizer_function` gives a function the explicit keyword-only signature of
its optimizer's options (what `inspect.signature`, and so
`optax.inject_hyperparams`, `help` and IDEs see), fills its docstring's
argument list, and calls it with every argument bound, defaults applied.
`config_for` turns those arguments into a validated `Config`.
"""

from __future__ import annotations

import functools
import inspect
import re
import textwrap

import optax

from foam_optax._src import options
from foam_optax._src.config import Config, validate

ARGS_MARKER = "<<arguments>>"


def _parameters(optimizer: str, alias: bool) -> list:
  kind = inspect.Parameter.KEYWORD_ONLY
  params = [inspect.Parameter(o.public_name(optimizer), kind,
                              default=o.default_for(optimizer),
                              annotation=o.annotation)
            for o in options.exposed(optimizer, alias)]
  if alias:
    params.insert(0, inspect.Parameter(
        "learning_rate", inspect.Parameter.POSITIONAL_OR_KEYWORD,
        annotation=options.LEARNING_RATE.annotation))
  return params


def signature(optimizer: str, alias: bool) -> inspect.Signature:
  """The signature of `optimizer`'s alias or `scale_by_*` transformation."""
  returns = (optax.GradientTransformationExtraArgs if alias
             else optax.GradientTransformation)
  return inspect.Signature(_parameters(optimizer, alias),
                           return_annotation=returns)


def arguments_doc(optimizer: str, alias: bool, indent: str = "    ") -> str:
  """The docstring's argument list: one entry per argument."""
  entries = [options.LEARNING_RATE] if alias else []
  entries += options.exposed(optimizer, alias)
  lines = []
  for o in entries:
    text = f"{o.public_name(optimizer)}: {o.doc_for(optimizer)}"
    lines += textwrap.wrap(text, 76 - len(indent), initial_indent=indent,
                           subsequent_indent=indent + "  ",
                           break_on_hyphens=False)
  return "\n".join(lines).lstrip()


def config_for(optimizer: str, arguments: dict) -> Config:
  """The validated `Config` of `optimizer` called with `arguments` (by their
  public names, every exposed option present)."""
  exposed = options.exposed(optimizer)
  fields = {o.name: arguments[o.public_name(optimizer)] for o in exposed}
  for name, value in options.FIXED[optimizer].items():
    fields[name] = value(fields) if callable(value) else value
  return validate(Config(**fields),
                  {o.name: o.public_name(optimizer) for o in exposed})


def check_alias_arguments(optimizer: str, arguments: dict) -> None:
  """Checks the alias-only arguments and the learning rate."""
  learning_rate = arguments["learning_rate"]
  if not callable(learning_rate):
    options.LEARNING_RATE.check("learning_rate", learning_rate)
  for name in options.EXPOSED_BY_ALIAS[optimizer]:
    option = options.ALIAS_BY_NAME[name]
    if option.check is not None:
      option.check(name, arguments[name])


def optimizer_function(optimizer: str, alias: bool = False):
  """Decorator: `fn(**arguments)` becomes a function with the signature of
  `optimizer`'s options (and, for an alias, the learning rate first); its
  docstring's ``<<arguments>>`` is replaced by their documentation."""
  sig = signature(optimizer, alias)

  def decorate(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
      bound = sig.bind(*args, **kwargs)
      bound.apply_defaults()
      return fn(**bound.arguments)

    wrapper.__signature__ = sig
    wrapper.__doc__ = fn.__doc__.replace(ARGS_MARKER,
                                         arguments_doc(optimizer, alias))
    return wrapper

  return decorate


# --- README tables ------------------------------------------------------------

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
  import sys
  update_readme(sys.argv[1] if len(sys.argv) > 1 else "README.md")


def decayed_alias(name: str, scale_by, *, weight_decay: float, mask: str,
                  doc: str):
  """The alias ``skip_nonfinite(chain(scale_by(...), add_decayed_weights(
  weight_decay, mask), scale_by_learning_rate(learning_rate)))`` of a
  transformation outside the option table, its signature generated from
  `scale_by`'s: the learning rate, then `scale_by`'s keyword arguments, then
  ``weight_decay`` (this default) and the mask (named `mask`)."""
  from foam_optax._src.skipping import skip_nonfinite   # imports this module
  kind = inspect.Parameter.KEYWORD_ONLY
  inner = inspect.signature(scale_by, eval_str=True)
  sig = inspect.Signature(
      [inspect.Parameter("learning_rate",
                         inspect.Parameter.POSITIONAL_OR_KEYWORD,
                         annotation=options.LEARNING_RATE.annotation)]
      + list(inner.parameters.values())
      + [inspect.Parameter("weight_decay", kind, default=weight_decay,
                           annotation=float),
         inspect.Parameter(mask, kind, default=None,
                           annotation=options.MaskOrFn)],
      return_annotation=optax.GradientTransformationExtraArgs)

  def alias(*args, **kwargs):
    arguments = sig.bind(*args, **kwargs)
    arguments.apply_defaults()
    arguments = dict(arguments.arguments)
    learning_rate = arguments.pop("learning_rate")
    decay, decay_mask = arguments.pop("weight_decay"), arguments.pop(mask)
    if not callable(learning_rate):
      options.LEARNING_RATE.check("learning_rate", learning_rate)
    options.ALIAS_BY_NAME["weight_decay"].check("weight_decay", decay)
    return skip_nonfinite(optax.chain(
        scale_by(**arguments), optax.add_decayed_weights(decay, decay_mask),
        optax.scale_by_learning_rate(learning_rate)))

  alias.__signature__ = sig
  alias.__doc__ = doc
  alias.__name__ = alias.__qualname__ = name
  alias.__module__ = scale_by.__module__
  return alias
