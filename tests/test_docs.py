"""The API reference builds from the docstrings with warnings as errors."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_api_reference_builds_without_warnings(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-E",
       "-b", "html", os.path.join(ROOT, "docs"), str(tmp_path)],
      capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  api = (tmp_path / "api.html").read_text()
  for name in ("scale_by_foam", "weight_dimension_numbers", "mu_dtype",
               "arXiv:2606.02365", "DimensionNumbers", "stats"):
    assert name in api, name


def test_package_docstring_names_every_public_name():
  """`help(foam_optax)` opens with one summary line and names everything
  `__all__` exports."""
  import foam_optax
  doc = foam_optax.__doc__
  assert len(doc.splitlines()[0]) <= 79 and not doc.splitlines()[1]
  missing = [n for n in foam_optax.__all__ if f"`{n}`" not in doc]
  assert not missing, missing


# ---------------------------------------- the README's and docs' blocks

import re  # noqa: E402

import pytest  # noqa: E402

import readme_blocks  # noqa: E402

_BLOCKS = readme_blocks.blocks()


def _claims(run_by):
  """The blocks the test file `run_by` picks: by `recipe("keyword")` calls,
  or by an HTML marker it splits a page at."""
  source = open(os.path.join(ROOT, run_by)).read()
  picked = {readme_blocks.recipe(keyword)
            for keyword in re.findall(r"recipe\(\"([^\"]+)\"\)", source)}
  for marker in re.findall(r"\"(<!-- [^\"]+ -->)\"", source):
    for page in readme_blocks.PAGES:
      text = page.read_text(encoding="utf-8")
      if marker in text:
        line = text[:text.index(marker)].count("\n")
        picked.add(next(b.code for b in _BLOCKS
                        if b.page == str(page.relative_to(ROOT))
                        and b.line > line))
  return picked


def test_readme_has_python_blocks_of_each_kind():
  assert len(_BLOCKS) >= 10
  assert any(b.run_by for b in _BLOCKS)
  assert any(not b.run_by and not b.fragment for b in _BLOCKS)


@pytest.mark.parametrize("block", _BLOCKS,
                         ids=lambda b: f"{b.page}:line{b.line}")
def test_every_readme_block_runs_as_pasted_or_reads_as_a_fragment(block):
  """A block that looks runnable runs as pasted and prints what its
  comments say; one that cannot says so on its first line."""
  if block.fragment:
    compile(block.code, block.page, "exec")
    return
  if block.run_by:
    assert block.code in _claims(block.run_by), block.run_by
    return
  _, printed, expected = readme_blocks.run(block.code)
  assert readme_blocks.matches(printed, expected), (printed, expected)


# ------------------------------------------- headings, links and anchors

_MARKDOWN = ["README.md", "BENCHMARKS.md", "RELIABILITY.md"] + sorted(
    os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
    if f.endswith(".md"))
# A block that `foam-bench --update-docs` (or a script's --write) rewrites.
_GENERATED = re.compile(r"^<!-- ([\w-]+):start -->$(.*?)^<!-- \1:end -->$",
                        re.M | re.S)


def _github_anchor(heading):
  """The anchor GitHub gives a Markdown heading (before de-duplication)."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def _prose(text):
  """`text` without its fenced code blocks (whose `#` lines are comments)."""
  return re.sub(r"^( *)```.*?^\1```", "", text, flags=re.S | re.M)


def _headings(text):
  return re.findall(r"^#+ (.*)$", _prose(text), re.M)


def _anchors(path):
  """Every anchor of the page, numbered as GitHub numbers repeated ones."""
  seen, anchors = {}, set()
  with open(os.path.join(ROOT, path), encoding="utf-8") as f:
    for heading in _headings(f.read()):
      anchor = _github_anchor(heading)
      anchors.add(anchor if anchor not in seen else f"{anchor}-{seen[anchor]}")
      seen[anchor] = seen.get(anchor, 0) + 1
  return anchors


def test_benchmarks_headings_are_unique():
  """Every heading written by hand, and every generated block's title, is
  unique in BENCHMARKS.md, so that each has its own anchor. Inside a
  generated block the suite's own subheadings (Targets, Plots, a
  workload's name) repeat from block to block, but not within one."""
  with open(os.path.join(ROOT, "BENCHMARKS.md"), encoding="utf-8") as f:
    text = f.read()
  blocks = [m.group(2) for m in _GENERATED.finditer(text)]
  assert len(blocks) >= 8
  outside = _headings(_GENERATED.sub("", text))
  titles = [_headings(block)[0] for block in blocks]
  named = outside + titles
  assert len(set(named)) == len(named), sorted(
      h for h in set(named) if named.count(h) > 1)
  for block in blocks:
    inside = _headings(block)
    assert len(set(inside)) == len(inside), inside
    assert not set(inside) & set(outside), set(inside) & set(outside)


def test_overview_links_to_every_suite():
  """BENCHMARKS.md opens with its overview, which links to the block of
  every `foam-bench` suite."""
  from foam_optax.bench import cli
  with open(os.path.join(ROOT, "BENCHMARKS.md"), encoding="utf-8") as f:
    text = f.read()
  assert _headings(text)[:2] == ["Benchmarks", "Overview"]
  overview = text[:text.index("\n## ", text.index("## Overview") + 1)]
  links = set(re.findall(r"\]\(#([\w\-]+)\)", overview))
  for name, suite in cli.SUITES.items():
    block = suite.block(suite.presets["full"])
    assert _github_anchor(block.title.lstrip("# ")) in links, name


@pytest.mark.parametrize("page", _MARKDOWN)
def test_links_land_on_a_file_and_a_heading(page):
  """Every relative link of the page names a file that exists and, with a
  `#anchor`, a heading of that file."""
  with open(os.path.join(ROOT, page), encoding="utf-8") as f:
    text = _prose(f.read())
  links = re.findall(r"\]\(([^)\s]+)\)", text)
  for link in links:
    if re.match(r"[a-z]+:", link):
      continue
    path, _, anchor = link.partition("#")
    target = os.path.normpath(os.path.join(os.path.dirname(page), path)
                              if path else page)
    assert os.path.exists(os.path.join(ROOT, target)), link
    if anchor:
      assert anchor in _anchors(target), (link, sorted(_anchors(target)))


def test_readme_links_into_benchmarks_land_on_a_section():
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    links = set(re.findall(r"BENCHMARKS\.md#([\w\-]+)", f.read()))
  assert "cross-fitting-on-coordinates-that-are-rarely-non-zero" in links
  assert links <= _anchors("BENCHMARKS.md"), links - _anchors("BENCHMARKS.md")
