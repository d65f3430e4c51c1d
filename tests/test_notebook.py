"""The quickstart notebook is stored without outputs and runs top to bottom
(its own cells assert that every optimizer learns and FOAM needs fewer
eigendecompositions than Shampoo)."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

_PATH = os.path.join(os.path.dirname(__file__), "..", "notebooks",
                     "quickstart.ipynb")


def test_notebook_is_saved_without_outputs():
  nb = nbformat.read(_PATH, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None
                      for c in code)


def test_notebook_executes():
  nb = nbformat.read(_PATH, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=240, kernel_name="python3",
      resources={"metadata": {"path": os.path.dirname(_PATH)}})
  client.execute()
  printed = "".join(o.get("text", "") for c in nb.cells
                    if c.cell_type == "code" for o in c.outputs)
  assert "FOAM" in printed and "final loss" in printed
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
  assert images
