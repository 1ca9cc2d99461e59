"""Stylesheets, scripts and markup that several pages share, inlined into each page as it is served.

Every page's Content-Security-Policy starts from ``default-src 'none'`` and allows inline styles
and scripts only, so a shared part cannot be a file the browser fetches. A page instead holds a
marker line where the part belongs, alone on its line::

    /* shared: base.css, inlined when the page is served */
    <!-- shared: logo.html, inlined when the page is served -->

and :func:`inline_shared_parts` puts the text of that file (from the page's folder) there.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["inline_shared_parts"]

_MARKER = re.compile(
    r"^[ \t]*(?:/\*|<!--) shared: (?P<name>[\w-]+\.(?:css|js|html)), inlined when the page is served"
    r" (?:\*/|-->)\n",
    re.MULTILINE,
)


def inline_shared_parts(html: str, folder: Path) -> str:
    """``html`` with each marker line replaced by the text of the file it names in ``folder``."""
    return _MARKER.sub(lambda marker: (folder / marker["name"]).read_text(encoding="utf-8"), html)
