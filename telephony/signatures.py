"""Twilio request signatures (``X-Twilio-Signature``), checked without I/O.

Twilio signs the exact public URL it requested. Behind a proxy or load balancer the app
sees a different scheme, host or port, so the URL is rebuilt from the configured
``PUBLIC_BASE_URL`` and never from ``Host``/``X-Forwarded-*`` headers, which any client
can set.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from twilio.request_validator import RequestValidator

_WS_SCHEMES = {"https": "wss", "http": "ws", "wss": "wss", "ws": "ws"}


def public_url(base_url: str, path: str, query: str = "") -> str:
    """Rebuild the URL Twilio requested (and signed) for a webhook.

    Args:
        base_url: the configured public base URL, e.g. ``https://cc.example.com`` or
            ``https://example.com/closeloop`` (a path prefix is kept).
        path: the request path as routed by the app, e.g. ``/twilio/sms``.
        query: the raw query string exactly as received (without or with a leading ``?``);
            Twilio signs it byte for byte, so it must not be re-encoded.

    Returns:
        The absolute URL, e.g. ``https://cc.example.com/twilio/sms?x=1``.

    Raises:
        ValueError: when ``base_url`` is not an absolute http(s) URL.
    """
    scheme, netloc, prefix = _split_base(base_url, allowed=("http", "https"))
    return _join(scheme, netloc, prefix, path, query)


def ws_url(base_url: str, path: str, query: str = "") -> str:
    """Rebuild the ``wss://`` (or ``ws://``) URL of a WebSocket Twilio connected to.

    ``https://`` becomes ``wss://`` and ``http://`` becomes ``ws://``; a base URL that is
    already ``ws(s)://`` is kept. Twilio signs the WebSocket upgrade over this URL.

    Raises:
        ValueError: when ``base_url`` is not an absolute http(s) or ws(s) URL.
    """
    scheme, netloc, prefix = _split_base(base_url, allowed=tuple(_WS_SCHEMES))
    return _join(_WS_SCHEMES[scheme], netloc, prefix, path, query)


def is_valid_signature(
    auth_token: str,
    url: str,
    params: Mapping[str, str] | None,
    signature: str | None,
) -> bool:
    """Check an ``X-Twilio-Signature`` header.

    Args:
        auth_token: the account Auth Token the request was signed with.
        url: the full public URL Twilio requested (see :func:`public_url`, :func:`ws_url`).
        params: for form webhooks, the POST form fields; ``None`` or empty for requests
            without a form body (GET, the WebSocket upgrade). A multi-dict with
            ``getlist``/``getall`` (starlette's ``FormData``) is used as is, so repeated
            fields are signed the way Twilio signs them.
        signature: the header value; missing or empty means not signed.

    Returns:
        True only when the signature matches.

    Raises:
        ValueError: when ``auth_token`` is empty (a configuration error, not a bad request).
    """
    if not auth_token:
        raise ValueError("auth_token is empty: set the Twilio Auth Token to check signatures")
    if not signature:
        return False
    validator = RequestValidator(auth_token)
    return bool(validator.validate(url, params if params is not None else {}, signature))


Verdict = Literal["ok", "unsigned_allowed", "bad_signature", "no_auth_token"]


def is_loopback_host(host: str | None) -> bool:
    """True when a listen host accepts connections from this machine only.

    ``127.0.0.1`` (any ``127.x``), ``::1`` and ``localhost``; anything else (``0.0.0.0``, ``::``,
    a LAN address, a host name) may be reachable from elsewhere.
    """
    name = (host or "").strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_twilio_request(
    *,
    auth_token: str | None,
    allow_unsigned: bool,
    url: str,
    params: Mapping[str, str] | None,
    signature: str | None,
) -> Verdict:
    """The one rule for every Twilio request (webhooks, callbacks, the media upgrade).

    With an auth token the signature must match, whatever else is configured. Without one, the
    request is accepted only when ``allow_unsigned`` (a loopback listen host, or
    ``CLOSELOOP_ALLOW_UNSIGNED_TWILIO=true``), else refused as ``no_auth_token``.

    Returns:
        ``ok`` (signed and valid), ``unsigned_allowed`` (no token, accepted by configuration),
        ``bad_signature`` or ``no_auth_token`` (both mean: refuse with 403).
    """
    if auth_token:
        return "ok" if is_valid_signature(auth_token, url, params, signature) else "bad_signature"
    return "unsigned_allowed" if allow_unsigned else "no_auth_token"


def _split_base(base_url: str, *, allowed: tuple[str, ...]) -> tuple[str, str, str]:
    parts = urlsplit(base_url.strip())
    scheme = parts.scheme.lower()
    if scheme not in allowed or not parts.netloc:
        raise ValueError(f"public base URL must be an absolute {'/'.join(allowed)} URL, got {base_url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"public base URL must not have a query or fragment: {base_url!r}")
    return scheme, parts.netloc, parts.path.rstrip("/")


def _join(scheme: str, netloc: str, prefix: str, path: str, query: str) -> str:
    full_path = prefix + "/" + path.lstrip("/")
    return urlunsplit((scheme, netloc, full_path, query.removeprefix("?"), ""))
