"""Sphinx configuration: `make docs` builds docs/_build/html with warnings as errors."""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

project = "bilevel_maml"
author = "bilevel_maml developers"
copyright = "2026, bilevel_maml developers"

extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode",
              "sphinx.ext.mathjax"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_generated"]
html_theme = "furo"
html_static_path = ["_static"]
html_title = "bilevel_maml"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_typehints = "description"
# Third-party base classes (Betty's Problem, torch's Module) are not documented here.


def write_results_tables(app):
    """The results page includes these files: tables rendered from the benchmark scripts' JSON
    output (benchmarks/results/*.json), never typed by hand."""
    import json

    from render_tables import render

    generated = DOCS / "_generated"
    generated.mkdir(exist_ok=True)
    for path in sorted((REPO / "benchmarks" / "results").glob("*.json")):
        report = json.loads(path.read_text())
        text = f"Source: `benchmarks/results/{path.name}`\n\n{render(report)}\n"
        target = generated / f"{path.stem}.md"
        if not target.exists() or target.read_text() != text:
            target.write_text(text)


def setup(app):
    app.connect("builder-inited", write_results_tables)
