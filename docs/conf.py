"""Sphinx configuration: the API reference, built from the docstrings."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))

project = "foam_optax"
author = "foam_optax authors"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon",
              "sphinx.ext.mathjax"]
root_doc = "index"
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["_build", "figures", "*.md"]
autodoc_typehints = "none"          # signatures are long; Args say it all
autodoc_member_order = "bysource"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "alabaster"
