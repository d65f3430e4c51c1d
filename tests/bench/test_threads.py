"""foam-bench's OpenBLAS thread default (`foam_optax.bench.threads`)."""

from foam_optax.bench import threads


def test_one_openblas_thread_unless_the_environment_chooses(monkeypatch):
  monkeypatch.delenv(threads.VARIABLE, raising=False)
  assert threads.limit_openblas() == {threads.VARIABLE: "1",
                                      "set_by": "foam-bench"}
  # NumPy's copy was loaded (by import jax) before the variable was set:
  # it is limited at run time too.
  loaded = threads.loaded_blas_threads()
  assert loaded and set(loaded.values()) == {1}

  monkeypatch.setenv(threads.VARIABLE, "2")
  assert threads.limit_openblas() == {threads.VARIABLE: "2",
                                      "set_by": "environment"}
