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


# --------------------------------------------------------- README's blocks

import re  # noqa: E402

import pytest  # noqa: E402

import readme_blocks  # noqa: E402

_BLOCKS = readme_blocks.blocks()


def _claims(run_by):
  """The blocks the test file `run_by` picks: by `recipe("keyword")` calls,
  or by an HTML marker it splits the README at."""
  source = open(os.path.join(ROOT, run_by)).read()
  picked = {readme_blocks.recipe(keyword)
            for keyword in re.findall(r"recipe\(\"([^\"]+)\"\)", source)}
  text = readme_blocks.README.read_text()
  for marker in re.findall(r"\"(<!-- [^\"]+ -->)\"", source):
    picked.add(next(b.code for b in _BLOCKS
                    if b.line > text[:text.index(marker)].count("\n")))
  return picked


def test_readme_has_python_blocks_of_each_kind():
  assert len(_BLOCKS) >= 10
  assert any(b.run_by for b in _BLOCKS)
  assert any(not b.run_by and not b.fragment for b in _BLOCKS)


@pytest.mark.parametrize("block", _BLOCKS, ids=lambda b: f"line{b.line}")
def test_every_readme_block_runs_as_pasted_or_reads_as_a_fragment(block):
  """A block that looks runnable runs as pasted and prints what its
  comments say; one that cannot says so on its first line."""
  if block.fragment:
    compile(block.code, "README.md", "exec")
    return
  if block.run_by:
    assert block.code in _claims(block.run_by), block.run_by
    return
  _, printed, expected = readme_blocks.run(block.code)
  assert readme_blocks.matches(printed, expected), (printed, expected)


# ------------------------------------------------ links into BENCHMARKS.md


def _github_anchor(heading):
  """The anchor GitHub gives a Markdown heading."""
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def test_readme_links_into_benchmarks_land_on_a_section():
  with open(os.path.join(ROOT, "BENCHMARKS.md"), encoding="utf-8") as f:
    anchors = {_github_anchor(h)
               for h in re.findall(r"^#+ (.*)$", f.read(), re.M)}
  with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    links = set(re.findall(r"BENCHMARKS\.md#([\w\-]+)", f.read()))
  assert "cross-fitting-on-coordinates-that-are-rarely-non-zero" in links
  assert links <= anchors, links - anchors
