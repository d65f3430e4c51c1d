"""The optimizers' signatures and docstrings, generated from the option table
(`options`), and their errors for arguments they do not take.

The functions built from the table (the `scale_by_*` transformations of
`transform` and the aliases of `alias`) are written out in the source with
their full signatures and docstring argument lists, and `Config` with one
typed field per option, so that type checkers, IDEs, `inspect` and `help`
all read the same explicit code. `generated_sources` is what those parts of
the source should be; ``python -m foam_optax._src.readme_tables``
rewrites them (and the tables of docs/options.md, `readme_tables`), and the tests
check that they are current.

`public` gives a public function errors that name it and the closest
argument; `renamed` keeps a renamed argument working, with a warning.
`config_for` turns an optimizer's arguments into a validated `Config`.
"""

from __future__ import annotations

import ast
import difflib
import functools
import inspect
import pathlib
import re
import textwrap
import typing
import warnings
from typing import Any, Callable, Mapping, TypeVar

import optax

from foam_optax._src import options
from foam_optax._src.config import Config, validate

F = TypeVar("F", bound=Callable[..., Any])

# --- Errors for arguments a function does not take --------------------------


def _call_error(name: str, sig: inspect.Signature, args: tuple,
                kwargs: dict, error: TypeError) -> str:
  """What ``fo.<name>(*args, **kwargs)`` did wrong, in the words of a
  Python error, with the closest argument for a misspelled keyword."""
  params = sig.parameters.values()
  positional = [p.name for p in params if p.kind in (
      inspect.Parameter.POSITIONAL_ONLY,
      inspect.Parameter.POSITIONAL_OR_KEYWORD)]
  keywords = [p.name for p in params
              if p.kind is not inspect.Parameter.POSITIONAL_ONLY]
  call = f"fo.{name}()"
  if len(args) > len(positional):
    takes = (f"takes {len(positional)} positional argument"
             f"{'s' if len(positional) > 1 else ''} ({', '.join(positional)})"
             if positional else "takes no positional arguments")
    given = f"{len(args)} {'was' if len(args) == 1 else 'were'} given"
    others = [k for k in keywords if k not in positional][:3]
    text = (f"{call} {takes} but {given}; pass "
            f"{'the others' if positional else 'them'} by keyword ("
            + ", ".join(f"{k}=..." for k in others) + ", ...)")
    alias = name.removeprefix("scale_by_")
    if not positional and alias != name and _is_public(alias):
      text += (f"; the learning rate goes to the alias, "
               f"fo.{alias}(learning_rate, ...)")
    return text + "."
  unknown = [k for k in kwargs if k not in keywords]
  if unknown:
    text = f"{call} got an unexpected keyword argument {unknown[0]!r}"
    close = difflib.get_close_matches(unknown[0], keywords, n=1)
    if close:
      return f"{text}; did you mean {close[0]!r}?"
    return f"{text}; help(fo.{name}) lists its arguments."
  message = str(error)   # inspect's words for a missing or repeated argument
  if message.startswith("multiple values"):
    message = "got " + message
  return f"{call} {message}"


def _is_public(name: str) -> bool:
  # Imported here: `foam_optax` imports, through its aliases, this module.
  import foam_optax
  return name in foam_optax.__all__


def public(fn: F) -> F:
  """Decorator of a public function: a call with an argument that its
  signature does not take (a misspelled keyword, too many positional
  arguments) raises a `TypeError` that names the function as users call it
  and, for a keyword, the closest valid one; the function, its signature
  and its docstring are otherwise unchanged."""
  sig = inspect.signature(fn, eval_str=True)

  @functools.wraps(fn)
  def checked(*args, **kwargs):
    try:
      sig.bind(*args, **kwargs)
    except TypeError as error:
      raise TypeError(
          _call_error(fn.__name__, sig, args, kwargs, error)) from None
    return fn(*args, **kwargs)

  setattr(checked, "__signature__", sig)
  return typing.cast(F, checked)


def renamed(names: Mapping[str, str], why: str) -> Callable[[F], F]:
  """Decorator: arguments renamed from `names`' keys to its values are still
  accepted under their old names, with a `DeprecationWarning` that names the
  new argument (`why` says why it changed)."""

  def decorate(fn: F) -> F:
    call = f"fo.{fn.__name__}()"

    @functools.wraps(fn)
    def accepting(*args, **kwargs):
      for old, new in names.items():
        if old not in kwargs:
          continue
        if new in kwargs:
          raise TypeError(f"{call} got {old!r} and {new!r}, the new name of "
                          f"{old!r}: pass {new!r} only.")
        warnings.warn(f"{call}: the argument {old!r} is deprecated, pass "
                      f"{new}={kwargs[old]!r} instead ({why}).",
                      DeprecationWarning, stacklevel=2)
        kwargs[new] = kwargs.pop(old)
      return fn(*args, **kwargs)

    setattr(accepting, "__signature__", inspect.signature(fn))
    return typing.cast(F, accepting)

  return decorate


# --- From arguments to a Config ---------------------------------------------


def config_for(optimizer: str, arguments: Mapping[str, Any]) -> Config:
  """The validated `Config` of `optimizer` called with `arguments` (by their
  public names, every exposed option present)."""
  exposed = options.exposed(optimizer)
  fields = {o.name: arguments[o.public_name(optimizer)] for o in exposed}
  for name, value in options.FIXED[optimizer].items():
    fields[name] = value(fields) if callable(value) else value
  return validate(Config(**fields),
                  {o.name: o.public_name(optimizer) for o in exposed})


def check_alias_arguments(optimizer: str,
                          arguments: Mapping[str, Any]) -> None:
  """Checks the alias-only arguments and the learning rate."""
  check_learning_rate(arguments["learning_rate"])
  for name in options.EXPOSED_BY_ALIAS[optimizer]:
    options.ALIAS_BY_NAME[name].validate(name, arguments[name])


def check_learning_rate(learning_rate: optax.ScalarOrSchedule) -> None:
  """A number in [0, inf), or a schedule."""
  if not callable(learning_rate):
    options.LEARNING_RATE.validate("learning_rate", learning_rate)


# --- The generated source ----------------------------------------------------

GENERATED = ("# Generated from options.py by "
             "`python -m foam_optax._src.readme_tables`.")
CONFIG_END = "# End of the generated fields."
_PACKAGE = pathlib.Path(__file__).resolve().parents[1]

# Per source file, the functions generated from the table: (optimizer,
# alias), the alias being `optimizer` and the transformation
# `scale_by_<optimizer>`.
FUNCTIONS = {
    "_src/transform.py": (("foam", False), ("shampoo", False),
                          ("soap", False), ("asgo", False)),
    "_src/alias.py": (("foam", True), ("shampoo", True), ("soap", True),
                      ("asgo", True)),
}
CONFIG_FILE = "_src/config.py"


def _annotation_source(annotation) -> str:
  """`annotation` as the source that evaluates to it in the generated
  modules (which import `optax`, `options`, `Any` and `Optional`)."""
  if annotation is optax.ScalarOrSchedule:
    return "optax.ScalarOrSchedule"
  if annotation is Any:
    return "Any"
  if annotation in (bool, int, float, str):
    return annotation.__name__
  if typing.get_origin(annotation) is typing.Literal:
    names = [name for name, value in vars(options).items()
             if value is annotation and name[:1].isupper()]
    if len(names) != 1:
      raise ValueError(f"{annotation} needs one name in options.py.")
    return f"options.{names[0]}"
  arguments = typing.get_args(annotation)
  if typing.get_origin(annotation) is typing.Union and (
      len(arguments) == 2 and arguments[1] is type(None)):
    return f"Optional[{_annotation_source(arguments[0])}]"
  raise ValueError(f"no source for the annotation {annotation!r}.")


def _default_source(value) -> str:
  text = f'"{value}"' if isinstance(value, str) else repr(value)
  if ast.literal_eval(text) != value:
    raise ValueError(f"no literal for the default {value!r}.")
  return text


def function_name(optimizer: str, alias: bool) -> str:
  return optimizer if alias else f"scale_by_{optimizer}"


def signature_source(optimizer: str, alias: bool) -> str:
  """The `def` line of `optimizer`'s alias or transformation, down to its
  colon: the learning rate (aliases), then every option keyword-only."""
  lines = [f"def {function_name(optimizer, alias)}(", f"    {GENERATED}"]
  if alias:
    lines.append("    learning_rate: "
                 f"{_annotation_source(options.LEARNING_RATE.annotation)},")
  lines.append("    *,")
  for o in options.exposed(optimizer, alias):
    lines.append(f"    {o.public_name(optimizer)}: "
                 f"{_annotation_source(o.annotation)} = "
                 f"{_default_source(o.default_for(optimizer))},")
  returns = ("GradientTransformationExtraArgs" if alias
             else "GradientTransformation")
  return "\n".join(lines + [f") -> optax.{returns}:"])


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
  return "\n".join(lines)


def _with_function(source: str, optimizer: str, alias: bool) -> str:
  """`source` with the generated signature and docstring argument list of
  one function: its `def` down to the docstring, and the docstring's lines
  from ``Args:`` to the first blank line."""
  name = function_name(optimizer, alias)
  node = next(n for n in ast.parse(source).body
              if isinstance(n, ast.FunctionDef) and n.name == name)
  docstring = node.body[0]
  lines = source.splitlines(keepends=True)
  doc = "".join(lines[docstring.lineno - 1:docstring.end_lineno])
  doc, found = re.subn(
      r"(\n  Args:\n).*?(\n\n)",
      lambda m: m[1] + arguments_doc(optimizer, alias) + m[2], doc, count=1,
      flags=re.S)
  if not found:
    raise ValueError(f"{name}'s docstring has no 'Args:' section.")
  return "".join(lines[:node.lineno - 1] + [
      signature_source(optimizer, alias) + "\n", doc]
                 + lines[docstring.end_lineno:])


def config_fields_source() -> str:
  """`Config`'s fields: one per option, typed, its `Option` attached."""
  lines = [f"  {GENERATED}"]
  for o in options.OPTIONS:
    line = f"  {o.name}: {_annotation_source(o.annotation)} = _field("
    name = f'"{o.name}")'
    lines.append(line + name if len(line + name) <= 80
                 else f"{line}\n      {name}")
  return "\n".join(lines + [f"  {CONFIG_END}"])


def _with_config_fields(source: str) -> str:
  start, end = f"  {GENERATED}\n", f"  {CONFIG_END}\n"
  head, rest = source.split(start)
  return head + config_fields_source() + "\n" + rest.split(end, 1)[1]


def generated_sources(package: pathlib.Path = _PACKAGE) -> dict:
  """Path -> the text its generated parts should make it (only the files
  that hold generated parts)."""
  texts = {}
  for file, functions in FUNCTIONS.items():
    text = (package / file).read_text(encoding="utf-8")
    for optimizer, alias in functions:
      text = _with_function(text, optimizer, alias)
    texts[package / file] = text
  config = package / CONFIG_FILE
  texts[config] = _with_config_fields(config.read_text(encoding="utf-8"))
  return texts


def update_sources(package: pathlib.Path = _PACKAGE) -> None:
  """Rewrites the generated parts of the source (see `generated_sources`)."""
  for path, text in generated_sources(package).items():
    if path.read_text(encoding="utf-8") != text:
      path.write_text(text, encoding="utf-8")
