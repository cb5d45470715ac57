"""MkDocs hook: the docstrings cross-reference in Sphinx's style (:func:`fxqp.lower`), which
mkdocstrings renders as the role's name followed by code. Show the code alone, as Sphinx
would (``~a.b.c`` as ``c``)."""

import re

_ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|data|attr|exc|obj|const):<code>(~?)([^<]*)</code>")


def _code(match: re.Match) -> str:
    short, target = match.group(1), match.group(2)
    return f"<code>{target.rpartition('.')[2] if short else target}</code>"


def on_page_content(html: str, **kwargs) -> str:
    return _ROLE.sub(_code, html)
