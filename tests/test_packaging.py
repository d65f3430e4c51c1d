"""The sdist and wheel build, pass `twine check`, and the installed wheel
imports without Flax and ships `py.typed`; the bench says what to install
when its extra is missing."""

import glob
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*command, cwd=ROOT):
  out = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
  assert out.returncode == 0, out.stdout + out.stderr
  return out.stdout


@pytest.mark.slow
def test_wheel_builds_checks_installs_and_imports_without_flax(tmp_path):
  # Built from a copy: setuptools writes build/ and *.egg-info beside the
  # sources.
  source = tmp_path / "source"
  shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
      ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
      ".hypothesis", "bench_out", "runs", "_build"))
  dist = tmp_path / "dist"
  _run(sys.executable, "-m", "build", "--sdist", "--wheel",
       "--outdir", str(dist), str(source))
  wheels = glob.glob(str(dist / "*.whl"))
  sdists = glob.glob(str(dist / "*.tar.gz"))
  assert len(wheels) == 1 and len(sdists) == 1
  _run(sys.executable, "-m", "twine", "check", "--strict", *wheels, *sdists)

  venv = tmp_path / "venv"
  _run(sys.executable, "-m", "venv", "--system-site-packages", str(venv))
  python = str(venv / "bin" / "python")
  _run(python, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
       wheels[0])
  report = _run(python, "-c", (
      "import os, sys, foam_optax; "
      "print(foam_optax.__file__); print('flax' in sys.modules); "
      "print(os.path.exists(os.path.join(os.path.dirname("
      "foam_optax.__file__), 'py.typed')))"), cwd=str(tmp_path)).split()
  location, flax_imported, typed = report
  assert location.startswith(str(venv))   # the wheel, not a checkout
  assert flax_imported == "False" and typed == "True"


def test_scripts_examples_bench_and_notebooks_use_the_public_api_only():
  root = pathlib.Path(__file__).resolve().parents[1]
  files = [*root.glob("scripts/*.py"), *root.glob("examples/*.py"),
           *root.glob("foam_optax/bench/*.py"), *root.glob("notebooks/*.ipynb")]
  private = re.compile(r"foam_optax\._src|from foam_optax import _src")
  offenders = [str(f.relative_to(root)) for f in files
               if private.search(f.read_text())]
  assert len(files) > 20 and not offenders, offenders


def _python(code):
  return subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                        capture_output=True, text=True)


def test_import_does_not_import_flax():
  out = _python("import sys, foam_optax; "
                "print(sorted(m for m in ('flax', 'tqdm', 'sklearn') "
                "if m in sys.modules))")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]"


def test_bench_without_its_extra_says_what_to_install():
  # A module set to None in sys.modules fails to import, as if absent.
  out = _python("import sys; sys.modules['tqdm'] = None; "
                "from foam_optax.bench.cli import main")
  assert out.returncode == 1
  assert "pip install 'foam_optax[bench]'" in out.stderr
  assert "missing: tqdm" in out.stderr


def test_py_typed_is_shipped():
  import foam_optax
  assert os.path.exists(os.path.join(os.path.dirname(foam_optax.__file__),
                                     "py.typed"))
