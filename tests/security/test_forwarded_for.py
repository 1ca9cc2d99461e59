"""Attack: a client behind a trusted proxy (HAProxy with ``option forwardfor``) sends its own
``X-Forwarded-For`` line to choose the address that per-address limits count (login throttle,
chat connections and rates, code limits). The proxy adds its line after the client's; closeloop
must read every line, nearest hop last, and believe only what trusted proxies added."""

from __future__ import annotations

from starlette.datastructures import Headers

from web.limits import client_address, forwarded_for, parse_networks

PROXY = "10.0.0.5"
TRUSTED = parse_networks(PROXY)


def _headers(*lines: str) -> Headers:
    return Headers(raw=[(b"x-forwarded-for", line.encode()) for line in lines])


def test_a_spoofed_first_line_is_not_believed_when_the_proxy_adds_its_own_line() -> None:
    headers = _headers("203.0.113.66", "198.51.100.7")  # client's spoof, then the proxy's line
    assert forwarded_for(headers) == "203.0.113.66,198.51.100.7"
    assert client_address(PROXY, forwarded_for(headers), TRUSTED) == "198.51.100.7"


def test_rotating_spoofs_all_count_as_the_one_real_client() -> None:
    seen = {
        client_address(PROXY, forwarded_for(_headers(f"203.0.113.{n}", "198.51.100.7")), TRUSTED)
        for n in range(1, 20)
    }
    assert seen == {"198.51.100.7"}


def test_without_a_trusted_proxy_no_line_is_believed() -> None:
    headers = _headers("203.0.113.66", "198.51.100.7")
    assert client_address("198.51.100.99", forwarded_for(headers), TRUSTED) == "198.51.100.99"
    assert forwarded_for(Headers(raw=[])) is None
