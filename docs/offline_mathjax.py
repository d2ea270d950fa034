"""mkdocs hook: the site carries its own MathJax, so the math renders without a network.

The renderer is MathJax 3's ``es5/tex-svg-full.js`` from the ``django-static-mathjax`` wheel
(the ``docs`` extra; despite its name it has no dependencies, Django included: it is MathJax
3.2.2's distribution as package data of a module named ``mathjax``). That bundle holds the TeX
input with every extension and the SVG output with its fonts inline, so it loads nothing else.
This hook adds it, with MathJax's licence, to the built site as
``javascripts/mathjax/tex-svg-full.js``, which mkdocs.yml's ``extra_javascript`` names by that
relative path (``mkdocs build`` and ``mkdocs serve`` alike).
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

SITE_DIR = "javascripts/mathjax"
BUNDLE = "tex-svg-full.js"


def mathjax_dir() -> Path:
    """The MathJax distribution installed by ``django-static-mathjax``, checked."""
    try:
        import mathjax
    except ImportError as err:
        raise PluginError(
            "MathJax is missing: install the docs extra (pip install -e '.[docs]', which "
            "brings django-static-mathjax)"
        ) from err
    root = Path(mathjax.__file__).resolve().parent / "static" / "mathjax"
    if not (root / "es5" / BUNDLE).is_file():
        raise PluginError(
            f"the installed module 'mathjax' ({root.parent.parent}) has no es5/{BUNDLE}: "
            "it is not django-static-mathjax; reinstall the docs extra"
        )
    return root


def on_files(files, config):
    """Add the MathJax bundle and its licence to the site's files."""
    root = mathjax_dir()
    for src, name in ((root / "es5" / BUNDLE, BUNDLE), (root / "LICENSE", "LICENSE")):
        files.append(File.generated(config, f"{SITE_DIR}/{name}", abs_src_path=str(src)))
    return files
