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


# The files that take longest (seconds on a quiet 2-core machine, with two
# workers), run first: `--dist loadfile` hands each worker one file at a
# time, so a long file started last would leave the other worker idle.
LONGEST_FIRST = {
    "tests/test_reliability.py": 60,
    "tests/bench/test_harness.py": 49,
    "tests/test_optax_suites.py": 45,
    "tests/test_examples.py": 38,
    "tests/test_multi_device.py": 37,
    "tests/test_optax_contracts.py": 35,
}


def pytest_configure(config):
  # xdist orders files by their number of tests unless told not to; keep
  # the order set in pytest_collection_modifyitems.
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def _file_cost(item):
  return -LONGEST_FIRST.get(item.nodeid.split("::")[0], 0)


def pytest_collection_modifyitems(config, items):
  items.sort(key=_file_cost)   # stable: files keep their order otherwise
  if config.getoption("--runslow"):
    return
  skip = pytest.mark.skip(reason="slow: run with --runslow")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
