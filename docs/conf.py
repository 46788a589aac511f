"""Sphinx configuration of curvop's documentation.

Build with ``sphinx-build -W -b html docs docs/_build/html``. Nothing is fetched from the
network at build time (no intersphinx); the API pages are generated from the packages'
``__all__`` lists by ``docs/_ext/curvop_api.py``, so they follow the code.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("MPLBACKEND", "Agg")

import curvop  # noqa: E402

project = "curvop"
author = "the curvop authors"
copyright = "the curvop authors"  # noqa: A001
release = version = curvop.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "curvop_api",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "examples/README.md", "**/.ipynb_checkpoints"]
templates_path: list[str] = []
default_role = "literal"  # docstrings write shapes as `(B, P)`

# --- autodoc / napoleon (Google-style docstrings throughout) ------------------------------
autodoc_member_order = "bysource"
# types go next to each documented parameter and return value, so that signatures stay short
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"
autodoc_inherit_docstrings = False  # never pull linear_operator's docstrings into ours
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_attr_annotations = True

# --- MyST (the user guide is Markdown) ------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "deflist", "colon_fence"]
myst_heading_anchors = 3

# --- HTML ----------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"curvop {release}"
html_static_path = ["_static"]
html_css_files = ["curvop.css"]

# --- math ----------------------------------------------------------------------------------
# MathJax comes from its CDN when a page is opened. For reading the pages offline, point
# CURVOP_DOCS_MATHJAX at a local MathJax 2 (Debian: apt-get install libjs-mathjax,
# /usr/share/javascript/mathjax/MathJax.js) when building.
if os.environ.get("CURVOP_DOCS_MATHJAX"):
    mathjax_path = (Path(os.environ["CURVOP_DOCS_MATHJAX"]).resolve().as_uri()
                    + "?config=TeX-AMS-MML_HTMLorMML")
    mathjax2_config = {"tex2jax": {"inlineMath": [["\\(", "\\)"]],
                                   "displayMath": [["\\[", "\\]"]],
                                   "processEscapes": True, "ignoreClass": "document",
                                   "processClass": "math|output_area"}}
