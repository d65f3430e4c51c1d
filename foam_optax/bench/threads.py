"""One OpenBLAS thread for the benchmark's CPU runs, unless the user chose.

JAX's CPU `eigh` runs on SciPy's OpenBLAS, loaded at the first `eigh` (or
by scikit-learn), and NumPy's own OpenBLAS loads with `import jax`. With
their default threads (one per core) they compete with XLA's thread pool,
and an `eigh` becomes several times slower and erratic on a busy machine
(BENCHMARKS.md, "OpenBLAS threads on CPU"). Each copy reads
``OPENBLAS_NUM_THREADS`` when it loads; copies already loaded are limited
through threadpoolctl.
"""

from __future__ import annotations

import os

VARIABLE = "OPENBLAS_NUM_THREADS"


def limit_openblas() -> dict:
  """Sets ``OPENBLAS_NUM_THREADS=1`` unless the environment sets it, and
  limits the copies already loaded to match; returns what `meta` records."""
  chosen = os.environ.get(VARIABLE)
  if chosen is None:
    os.environ[VARIABLE] = "1"
    from threadpoolctl import threadpool_limits
    threadpool_limits(1, user_api="blas")
  return {VARIABLE: os.environ[VARIABLE],
          "set_by": "environment" if chosen is not None else "foam-bench"}


def loaded_blas_threads() -> dict:
  """Threads of each loaded BLAS copy, keyed by the package that ships it
  (``scipy.libs``: the one JAX's CPU `eigh` uses; ``numpy.libs``)."""
  from threadpoolctl import threadpool_info
  return {os.path.basename(os.path.dirname(info["filepath"])):
          info["num_threads"]
          for info in threadpool_info() if info["user_api"] == "blas"}
