"""The Python blocks of the README and of the docs pages that hold its
reference material (`PAGES`): finding them, running them as pasted, and
what their comments say they print.

A block is one of:

- a fragment: its first line is a comment starting ``# Fragment``, so
  that a reader sees it is not a whole program; it must still compile;
- run by another test: an HTML comment ``<!-- run by tests/<file>.py -->``
  (invisible on the rendered page) precedes it, and that file runs it;
- otherwise it is run as pasted, by `tests/test_docs.py`.

A ``print(...)`` line's expected output is its trailing ``# comment``, or
the comment on the next line; ``...`` in it stands for any text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import pathlib
import re
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# docs/multi_device.md is not among them: its recipe needs 8 devices and
# tests/test_multi_device.py runs it; its other blocks are fragments.
PAGES = (README,) + tuple(
    ROOT / "docs" / name for name in ("options.md", "reproduction.md",
                                      "bias_correction.md", "practice.md",
                                      "mup.md", "design.md"))
_BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)
_RUN_BY = re.compile(r"<!-- run by (tests/\S+\.py) -->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
  page: str                  # its file, relative to the repository
  line: int                  # 1-based line of the opening fence
  code: str                  # dedented
  run_by: str | None         # the test file that runs it, if another

  @property
  def fragment(self) -> bool:
    return self.code.lstrip().startswith("# Fragment")


def blocks() -> list[Block]:
  """Every Python block of every page, in order."""
  found = []
  for page in PAGES:
    text = page.read_text(encoding="utf-8")
    for match in _BLOCK.finditer(text):
      before = text[:match.start()].rstrip("\n").splitlines()
      run_by = _RUN_BY.search(before[-1]) if before else None
      found.append(Block(str(page.relative_to(ROOT)),
                         text.count("\n", 0, match.start()) + 1,
                         textwrap.dedent(match.group(2)),
                         run_by.group(1) if run_by else None))
  return found


def recipe(keyword: str) -> str:
  """The one recipe containing `keyword`: a block, on any page, that
  another test runs (``<!-- run by ... -->``)."""
  found = [b.code for b in blocks() if b.run_by and keyword in b.code]
  assert len(found) == 1, keyword
  return found[0]


def expected_output(code: str) -> list[str]:
  """What the block's comments say its ``print`` lines print."""
  expected = []
  lines = code.splitlines()
  for i, line in enumerate(lines):
    if line.lstrip().startswith("print("):
      j = i
      while "  # " not in lines[j] and lines[j].rstrip().endswith(","):
        j += 1      # a print call over several lines
      comment = (lines[j].split("  # ", 1)[1] if "  # " in lines[j]
                 else lines[j + 1].lstrip()[2:])
      expected.append(comment)
  return expected


def matches(printed: list[str], expected: list[str]) -> bool:
  if len(printed) != len(expected):
    return False
  pattern = lambda e: "".join(".*" if part == "..." else re.escape(part)
                              for part in re.split(r"(\.\.\.)", e))
  return all(re.fullmatch(pattern(e), p) for p, e in zip(printed, expected))


@functools.cache
def run(code: str):
  """Runs `code` as a script, once per process; returns (its globals, the
  lines it printed, the lines its comments say it prints)."""
  namespace, out = {"__name__": "__readme__"}, io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(code, str(README), "exec"), namespace)
  return namespace, out.getvalue().splitlines(), expected_output(code)
