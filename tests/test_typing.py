"""What type checkers see: basedpyright, in standard mode (pyproject.toml),
finds no error in the package, the examples or the Python blocks of the
README and the docs pages (`readme_blocks.PAGES`), and flags every line of `type_mistakes.py` marked ``# error:``, and no
other line."""

import ast
import json
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest

from readme_blocks import PAGES

ROOT = pathlib.Path(__file__).resolve().parents[1]
MISTAKES = ROOT / "tests" / "type_mistakes.py"
# Every block is checked as a script with these imports first; a
# fragment may also use these names from the text around it, typed here.
PRELUDE = ("import jax\nimport jax.numpy as jnp\nimport optax\n"
           "import foam_optax as fo\nfrom typing import Any\n")
CONTEXT = {"params": "params: Any = None", "lr": "lr: float = 1e-3",
           "MLP": "MLP: Any = None"}


def readme_blocks():
  """(page, the page's line of the block's first line, its code), every
  block of every page."""
  for page in PAGES:
    text = page.read_text(encoding="utf-8")
    for m in re.finditer(r"^( *)```python\n(.*?)^\1```", text, re.S | re.M):
      yield (str(page.relative_to(ROOT)), text[:m.start()].count("\n") + 2,
             textwrap.dedent(m[2]))


def _bound(code):
  """The names a block binds itself."""
  names = set()
  for node in ast.walk(ast.parse(code)):
    if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
      names.add(node.id)
    elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
      names.add(node.name)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      names.update((a.asname or a.name).split(".")[0] for a in node.names)
  return names


@pytest.fixture(scope="module")
def errors(tmp_path_factory):
  """file -> [(line, message)] of every error of one basedpyright run over
  the package, the examples, the pages' blocks (as their page, e.g.
  ``docs/options.md``, with its line numbers) and the mistakes."""
  folder = tmp_path_factory.mktemp("readme")
  readme = {}   # checked file -> (page, its line of line 1, lines added)
  for page, line, code in readme_blocks():
    head = PRELUDE + "".join(
        CONTEXT[name] + "\n" for name in sorted(CONTEXT.keys() - _bound(code)))
    stem = page.replace("/", "_").replace(".md", "")
    path = (folder / f"{stem}_{line}.py").resolve()
    path.write_text(head + code, encoding="utf-8")
    readme[str(path)] = (page, line, head.count("\n"))
  assert len(readme) >= 10
  try:
    run = subprocess.run(
        [sys.executable, "-m", "basedpyright", "--outputjson", "--pythonpath",
         sys.executable, "foam_optax", "examples", str(MISTAKES), *readme],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
  except FileNotFoundError:   # pragma: no cover
    pytest.fail("basedpyright is missing: pip install -e '.[test]'")
  assert run.returncode in (0, 1), run.stderr or run.stdout
  report = json.loads(run.stdout)
  assert report["summary"]["filesAnalyzed"] >= 40 + len(readme)
  found = {}
  for d in report["generalDiagnostics"]:
    if d["severity"] != "error":
      continue
    file = str(pathlib.Path(d["file"]).resolve())
    line = d["range"]["start"]["line"] + 1
    if file in readme:
      page, start, added = readme[file]
      file, line = page, start + line - 1 - added
    found.setdefault(file, []).append((line, d["message"]))
  return found


def _listing(found):
  return "\n".join(f"{file}:{line}: {message}" for file, errs in found.items()
                   for line, message in errs)


@pytest.mark.parametrize("where", ["foam_optax", "examples", "README.md",
                                   "docs/"])
def test_no_type_errors(errors, where):
  prefix = where if where.endswith((".md", "docs/")) else str(ROOT / where) + "/"
  found = {f: e for f, e in errors.items() if f.startswith(prefix)}
  assert not found, "\n" + _listing(found)


def test_every_deliberate_mistake_is_flagged(errors):
  lines = MISTAKES.read_text(encoding="utf-8").splitlines()
  marked = {i for i, text in enumerate(lines, 1)
            if re.search(r"\S  # error: ", text)}
  assert len(marked) >= 20
  flagged = {line for line, _ in errors.get(str(MISTAKES), [])}
  assert not marked - flagged, [lines[i - 1] for i in sorted(marked - flagged)]
  assert not flagged - marked, _listing({str(MISTAKES): [
      e for e in errors[str(MISTAKES)] if e[0] not in marked]})
