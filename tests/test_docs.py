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
