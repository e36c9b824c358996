"""Sphinx configuration for skbilevel."""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))
sys.path.insert(0, os.path.abspath("."))

import skbilevel  # noqa: E402

project = "skbilevel"
author = "skbilevel developers"
copyright = "2026, skbilevel developers"
release = version = skbilevel.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

autosummary_generate = True
autodoc_default_options = {"members": True, "inherited-members": False}
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
templates_path = ["_templates"]
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py"]
html_theme = "pydata_sphinx_theme"
html_title = "skbilevel"

# No network on CI, so no intersphinx: the docstrings scikit-learn's mixins
# give our estimators (set_fit_request, score) point at labels and glossary
# terms of scikit-learn's own docs, which cannot resolve here.
intersphinx_mapping = {}
suppress_warnings = ["ref.ref", "ref.term"]

# Examples read SKBILEVEL_QUICK to shrink their problems in CI.
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"demo\.py",
    "download_all_examples": False,
    "remove_config_comments": True,
    "abort_on_example_error": True,
    "plot_gallery": "True",
}


def setup(app):
    from generate_benchmark_page import write_benchmark_page

    write_benchmark_page(os.path.dirname(os.path.abspath(__file__)))
