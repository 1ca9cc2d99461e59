"""Head lines, stylesheets, scripts and markup that several pages share, inlined as each page is served.

Every page's Content-Security-Policy starts from ``default-src 'none'`` and allows inline styles
and scripts only, so a shared part cannot be a file the browser fetches. A page instead holds a
marker line where the part belongs, alone on its line::

    /* shared: console.css, inlined when the page is served */
    <!-- shared: logo.html, inlined when the page is served -->

and :func:`inline_shared_parts` puts the text of that file of ``web/static/`` there (the folder
ships with the package, see ``package-data`` in pyproject.toml).
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["SHARED_PARTS", "inline_shared_parts"]

#: The folder of the shared parts.
SHARED_PARTS = Path(__file__).resolve().parent / "static"

_MARKER = re.compile(
    r"^[ \t]*(?:/\*|<!--) shared: (?P<name>[\w-]+\.(?:css|js|html)), inlined when the page is served"
    r" (?:\*/|-->)\n",
    re.MULTILINE,
)


def inline_shared_parts(html: str) -> str:
    """``html`` with each marker line replaced by the text of the part it names."""
    return _MARKER.sub(lambda marker: (SHARED_PARTS / marker["name"]).read_text(encoding="utf-8"), html)
