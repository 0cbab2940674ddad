"""Sphinx configuration for the fastai_tricks documentation."""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Gallery scripts render figures headlessly and must not compete for the 2 CPU cores of CI.
os.environ.setdefault("MPLBACKEND", "Agg")

import fastai_tricks  # noqa: E402

project = "fastai_tricks"
author = "fastai_tricks developers"
copyright = "2026, fastai_tricks developers"
release = fastai_tricks.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py", "sg_execution_times.rst"]
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
# fastai's Callback subclasses inherit a long tail of machinery; document only what we define.
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# The build must work offline: no intersphinx inventories are fetched.
nitpicky = False

html_theme = "furo"
html_title = f"fastai_tricks {release}"
html_static_path = ["_static"]

sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"train_(imagenette|ddp)\.py",
    "abort_on_example_error": True,
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
}
