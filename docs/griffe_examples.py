"""Griffe extension for the docs build: render the docstrings' doctests as code.

The library's docstrings are Google style, but many write their doctest under ``Example:``
(which Google-style parsers treat as an admonition, so ``>>>`` would render as a Markdown quote)
or as a bare ``>>>`` block at the end. This extension, loaded by mkdocstrings (see
``mkdocs.yml``), rewrites each docstring before it is parsed:

- a section header ``Example:`` becomes ``Examples:`` (the doctest section);
- a bare doctest block (``>>>`` lines at the left margin, with their output, possibly several
  separated by blank lines) is moved under an ``Examples:`` header.

Only the rendered docs change; the source and the doctests run by pytest are untouched.
"""

from __future__ import annotations

from typing import Any

import griffe


def _is_header(line: str) -> bool:
    return line in ("Example:", "Examples:")


def rewrite(text: str) -> str:
    """The docstring ``text`` (already dedented) with its doctests under ``Examples:``."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line == "Example:":
            out.append("Examples:")
            i += 1
            continue
        if not line.startswith(">>>"):
            out.append(line)
            i += 1
            continue
        # a bare doctest region: blocks of non-blank lines, the first of each starting with >>>
        if out and out[-1].strip():
            out.append("")
        out.append("Examples:")
        while i < len(lines) and lines[i].startswith(">>>"):
            while i < len(lines) and lines[i].strip():
                out.append("    " + lines[i])
                i += 1
            j = i
            while j < len(lines) and not lines[j].strip():
                j += 1
            if j < len(lines) and lines[j].startswith(">>>"):
                out.extend([""] * (j - i))
                i = j
            else:
                break
    return "\n".join(out)


class DoctestExamples(griffe.Extension):
    """Put every docstring's doctests in an ``Examples`` section (see the module docstring)."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        doc = obj.docstring
        if doc is not None and ">>>" in doc.value:
            doc.value = rewrite(doc.value)
