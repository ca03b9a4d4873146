"""Griffe extension for the docs site: Sphinx roles in docstrings become Markdown code spans.

mmpt's docstrings are Google style with Sphinx cross-reference roles
(``:class:`~mmpt.models.module.MMPTModule```, ``:func:`foo```); mkdocstrings renders Markdown,
where a role would show up verbatim. Each role becomes a code span of the name it shows
(the last dotted part when written with ``~``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const|ref):`(~?)([^`]+)`")


def rewrite_roles(text: str) -> str:
    """``:class:`~a.b.C``` -> ```C```, ``:func:`a.f``` -> ```a.f```."""

    def code(m: re.Match) -> str:
        name = m.group(2)
        return f"`{name.rsplit('.', 1)[-1] if m.group(1) else name}`"

    return ROLE.sub(code, text)


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every docstring griffe loads."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:  # noqa: D102
        if obj.docstring is not None:
            obj.docstring.value = rewrite_roles(obj.docstring.value)
