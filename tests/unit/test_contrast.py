"""Secondary and status text on the staff pages meets WCAG AA contrast (>= 4.5:1) on every
background the stylesheets define, computed from the CSS custom properties themselves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

STATIC = Path(__file__).resolve().parents[2] / "web" / "static"
AA = 4.5
# text colours that are not the main ink: muted/secondary text and status messages
TEXT = ("--ink-2", "--ink-3", "--ok", "--bad", "--agent-ink")
# every background such text is drawn on (cards, the page, chips, bubbles, notes)
BACKGROUNDS = ("--surface", "--canvas", "--brand-soft", "--bot", "--agent", "--note")


def custom_properties(css: str) -> dict[str, str]:
    """The ``--name: #hex`` custom properties of the stylesheet's ``:root``."""
    root = re.search(r":root\s*\{(.*?)\}", css, re.S)
    assert root is not None, "the stylesheet has a :root block"
    return {m[1]: m[2].lower() for m in re.finditer(r"(--[\w-]+)\s*:\s*(#[0-9a-fA-F]{3,6})\b", root[1])}


def luminance(hex_colour: str) -> float:
    value = hex_colour.lstrip("#")
    if len(value) == 3:
        value = "".join(c * 2 for c in value)
    channels = [int(value[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_contrast_matches_the_wcag_reference_values() -> None:
    assert contrast("#000000", "#ffffff") == pytest.approx(21.0)
    assert contrast("#ffffff", "#ffffff") == pytest.approx(1.0)
    assert contrast("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)  # the classic just-fails grey


def test_the_parser_reads_the_custom_properties() -> None:
    found = custom_properties(":root { --ink-3: #8A93A3; --line: #e7e9ef;\n --font: x; }")
    assert found == {"--ink-3": "#8a93a3", "--line": "#e7e9ef"}


@pytest.mark.parametrize("sheet", ["console.css", "brand.css"])
def test_secondary_and_status_text_meets_aa_on_every_background(sheet: str) -> None:
    props = custom_properties((STATIC / sheet).read_text(encoding="utf-8"))
    texts = [t for t in TEXT if t in props]
    backgrounds = [b for b in BACKGROUNDS if b in props]
    assert {"--ink-2", "--ink-3", "--bad"} <= set(texts) and "--surface" in backgrounds
    failing = [
        f"{t} {props[t]} on {b} {props[b]}: {contrast(props[t], props[b]):.2f}"
        for t in texts
        for b in backgrounds
        if contrast(props[t], props[b]) < AA
    ]
    assert failing == []


def test_white_text_on_the_filled_presence_buttons_meets_aa() -> None:
    props = custom_properties((STATIC / "console.css").read_text(encoding="utf-8"))
    for fill in ("--brand", "--warn", "--ink-3", "--bad"):  # available, busy, away; the unread badge
        assert contrast("#ffffff", props[fill]) >= AA, fill
