"""Static checks on the customer chat page (web/chat.html).

The page is served to anyone and renders untrusted transcript text, so it must load nothing
from the internet and must never turn message text into markup.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from web.shared_page_parts import inline_shared_parts

PAGE = Path(__file__).resolve().parents[2] / "web" / "chat.html"


def served_page() -> str:
    """The page as ``GET /chat`` serves it, with its shared parts (web/static/) inlined."""
    return inline_shared_parts(PAGE.read_text(encoding="utf-8"))


VOID_ELEMENTS = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
)
# SVG shapes written as <path .../> are self-closing; handle_startendtag covers them.
URL_ATTRIBUTES = frozenset({"src", "href", "action", "formaction", "poster", "srcset", "data"})


class _PageParser(HTMLParser):
    """Collects tags, URL-bearing attributes, inline scripts and styles; checks nesting."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.urls: list[tuple[str, str, str]] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self.styles: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._record(tag, attrs)
        if tag not in VOID_ELEMENTS:
            self.stack.append(tag)
        if tag in ("script", "style"):
            self._in = tag

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._record(tag, attrs)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID_ELEMENTS:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "script":
            self.scripts.append(data)
        elif self._in == "style":
            self.styles.append(data)

    def _record(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        for name, value in attrs:
            if name in URL_ATTRIBUTES and value is not None:
                self.urls.append((tag, name, value))


@pytest.fixture(scope="module")
def page() -> _PageParser:
    parser = _PageParser()
    parser.feed(served_page())
    parser.close()
    return parser


@pytest.fixture(scope="module")
def script(page: _PageParser) -> str:
    return "\n".join(page.scripts)


def test_page_parses_with_balanced_tags(page: _PageParser) -> None:
    assert page.problems == []
    assert page.stack == []
    assert page.tags[0][0] == "html"


def test_page_references_no_external_resources(page: _PageParser) -> None:
    for tag, attribute, value in page.urls:
        assert value.startswith(("data:", "#")), f"<{tag} {attribute}={value!r}> loads a resource"
    assert not any(tag == "script" and "src" in attrs for tag, attrs in page.tags)
    assert not any(tag in ("iframe", "object", "embed", "base") for tag, _ in page.tags)


def test_inline_css_imports_nothing(page: _PageParser) -> None:
    css = "\n".join(page.styles)
    assert "@import" not in css
    for target in re.findall(r"url\(\s*['\"]?([^'\")]*)", css):
        assert target.startswith("data:"), f"CSS loads {target}"


def test_script_makes_no_requests_except_the_chat_websocket_and_the_call_endpoints(script: str) -> None:
    for call in ("XMLHttpRequest", "import(", "importScripts", "EventSource", "sendBeacon"):
        assert call not in script, call
    assert "new Worker" not in script
    assert script.count("new WebSocket(") == 1
    assert '"/chat"' in script
    # fetch only for a browser call, only to this site's /webrtc/ endpoints (literal paths)
    targets = re.findall(r"fetch\(([^,)]*)", script)
    assert targets and all(re.fullmatch(r'"/webrtc/[a-z]+"', t.strip()) for t in targets), targets


def test_only_placeholder_example_urls_appear_in_the_page() -> None:
    # The demo transcript shows a return-label link; anything else would be a real address.
    for url in re.findall(r"https?://[^\s\"'<>)]+", served_page()):
        assert re.match(r"https?://([a-z0-9-]+\.)*example\.com(/|$)", url), url


def test_content_security_policy_forbids_loading_from_other_origins(page: _PageParser) -> None:
    policies = [
        attrs.get("content") or ""
        for tag, attrs in page.tags
        if tag == "meta" and (attrs.get("http-equiv") or "").lower() == "content-security-policy"
    ]
    assert len(policies) == 1
    assert "default-src 'none'" in policies[0]


@pytest.mark.parametrize(
    "sink",
    [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "createContextualFragment",
        "DOMParser",
        "eval(",
        "new Function",
        'setTimeout("',
        "setTimeout('",
    ],
)
def test_script_never_parses_strings_as_markup_or_code(script: str, sink: str) -> None:
    assert sink not in script


def test_message_text_is_set_through_text_nodes(script: str) -> None:
    assert "textContent" in script
    assert "createTextNode" in script


def test_links_are_limited_to_http_and_open_without_opener(script: str) -> None:
    assert 'url.protocol === "http:" || url.protocol === "https:"' in script
    assert "noopener" in script


def test_page_is_accessible_and_responsive(page: _PageParser) -> None:
    attrs_by_id = {attrs["id"]: (tag, attrs) for tag, attrs in page.tags if attrs.get("id")}
    html_attrs = page.tags[0][1]
    assert html_attrs.get("lang") == "en"

    _, log = attrs_by_id["messages"]
    assert log.get("aria-live") == "polite"
    assert log.get("role") == "log"

    labels = [attrs.get("for") for tag, attrs in page.tags if tag == "label"]
    assert "input" in labels
    _, send = attrs_by_id["send"]
    assert send.get("aria-label")

    viewports = [a.get("content") or "" for t, a in page.tags if a.get("name") == "viewport"]
    assert viewports and "width=device-width" in viewports[0]


def test_page_keeps_the_session_and_resends_with_the_same_id(script: str) -> None:
    assert "localStorage" in script
    assert 'type: "hello", session:' in script
    assert 'type: "message", text: m.text, id: m.id' in script
