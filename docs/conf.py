"""Sphinx configuration: `make docs` builds docs/_build/html with warnings as errors."""

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]

project = "bilevel_maml"
author = "bilevel_maml developers"
copyright = "2026, bilevel_maml developers"

# "sphinx-mathjax-offline" copies MathJax into _static and points the pages there: math renders
# with no network, as on most clusters. "sphinxarg.ext" renders the CLI page from the parser itself.
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode",
              "sphinx.ext.mathjax", "sphinx-mathjax-offline", "sphinxarg.ext"]
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_generated"]
html_theme = "furo"
html_static_path = ["_static"]
html_css_files = ["fit.css"]
html_title = "bilevel_maml"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_typehints = "description"
smartquotes_action = "qe"  # "--flag" stays two hyphens, as typed
autoclass_content = "both"  # a class's parameters may be described on the class or on __init__
napoleon_google_docstring = True
napoleon_numpy_docstring = False
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


DOCSTRINGS: dict[str, tuple] = {}


def drop_foreign_constructor_docs(app, what, name, obj, options, lines):
    """With ``autoclass_content = "both"``, a class whose ``__init__`` has no docstring shows the
    docstring of the nearest base's ``__init__``: kept when that base is ours (a variant inherits
    MetaLearner's parameter list), dropped when it is another library's (torch's ``nn.Module``
    text under a model, whose parameters are described on the class)."""
    import inspect

    if what != "class":
        return
    owner = next((c for c in obj.__mro__ if "__init__" in vars(c) and vars(c)["__init__"].__doc__), None)
    if owner is None or owner.__module__.startswith("bilevel_maml"):
        return
    foreign, text = inspect.cleandoc(owner.__init__.__doc__), "\n".join(lines)
    if foreign in text:
        lines[:] = text.replace(foreign, "").rstrip().split("\n")


def remember_docstring(app, what, name, obj, options, lines):
    # autodoc also emits this event for members it then filters out (imported names, say), so the
    # check below looks only at the objects the Python domain holds once the pages are built.
    if what in ("function", "method", "class"):  # a class's docstring may come in parts (class, __init__)
        DOCSTRINGS[name] = (obj, DOCSTRINGS.get(name, (obj, ""))[1] + "\n" + "\n".join(lines))


def undocumented_parameters(app) -> list[str]:
    """Every parameter of every function, method and class rendered on the API page is described
    in its docstring (``:param name:``, or napoleon's ``Args:``, already turned into that field)."""
    import inspect
    import re

    rendered = {name for name, entry in app.env.get_domain("py").objects.items()
                if entry.objtype in ("function", "method", "class") and not entry.aliased}
    missing = []
    for name in sorted(rendered & DOCSTRINGS.keys()):
        obj, text = DOCSTRINGS[name]
        if getattr(obj, "_is_protocol", False):  # a typing.Protocol describes methods, not a constructor
            continue
        try:
            signature = inspect.signature(obj)
        except (TypeError, ValueError):
            continue
        for parameter in signature.parameters.values():
            if parameter.name in ("self", "cls"):
                continue
            if not re.search(rf":param\s+(?:[^:]*\s)?\**{re.escape(parameter.name)}:", text):
                missing.append(f"{name}({parameter.name})")
    return missing


def report_undocumented_parameters(app, exception):
    from sphinx.util import logging

    missing = undocumented_parameters(app) if exception is None else []
    if missing:
        logging.getLogger(__name__).warning(f"{len(missing)} parameters have no description: " + ", ".join(missing))


def setup(app):
    app.connect("builder-inited", write_results_tables)
    app.connect("autodoc-process-docstring", drop_foreign_constructor_docs)
    app.connect("autodoc-process-docstring", remember_docstring, priority=600)  # after napoleon's
    app.connect("build-finished", report_undocumented_parameters)
