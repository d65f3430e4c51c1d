"""Shared pytest configuration: one OpenBLAS thread, opt-in slow tests, and
the test helpers (`helpers.py`, `reference.py`) and official ports
(`ports/`) importable from every test module."""

import os
import sys

# JAX's CPU `eigh` runs on OpenBLAS, whose default threads compete with
# XLA's and with the other test worker (BENCHMARKS.md, "OpenBLAS threads on
# CPU"). Set before any test module imports JAX; subprocesses inherit it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402

_TESTS = os.path.dirname(os.path.abspath(__file__))
for _path in (_TESTS, os.path.join(_TESTS, "ports")):
  if _path not in sys.path:
    sys.path.insert(0, _path)


def pytest_addoption(parser):
  parser.addoption("--runslow", action="store_true", default=False,
                   help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="slow: run with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
