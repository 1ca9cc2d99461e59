"""Sign-in and access control for the pages and the API.

Each route says who may call it with a dependency from :meth:`Authenticator.require` (JSON: 401
``not_authenticated`` / 403 ``forbidden``) or :meth:`Authenticator.require_page` (HTML: people
without a session are sent to ``/login?next=...``). Both accept an API token
(``Authorization: Bearer clk_...``) or the browser session cookie; a request that changes state
with the cookie must also carry the session's CSRF token, as the ``X-CSRF-Token`` header (fetch)
or the ``csrf_token`` form field (HTML forms), else 403 ``csrf_failed``. API tokens need no CSRF
token: browsers never attach them on their own.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from crm_bridge.users import (
    ROLES,
    STAFF,
    ApiTokenStore,
    LoginLocked,
    LoginThrottle,
    SessionStore,
    User,
    UserStore,
    csrf_matches,
)
from web.api import ApiError
from web.limits import Network, client_address, forwarded_for
from web.shared_page_parts import inline_shared_parts

log = logging.getLogger(__name__)

SESSION_COOKIE = "closeloop_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_NEXT = "/login"  # the signed-in page: who you are, where to go, sign out
#: Where each role lands after signing in without a page to go back to.
ROLE_HOME = {"agent": "/console", "supervisor": "/supervisor", "admin": "/admin"}
WRONG_CREDENTIALS = "The email or password is wrong."
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")

# Only to describe the two ways in to the OpenAPI schema (and so to /docs); checks are below.
_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="api_token",
    description="An API token: `closeloop token create EMAIL --name NAME`",
)
_COOKIE = APIKeyCookie(
    name=SESSION_COOKIE,
    auto_error=False,
    scheme_name="session",
    description="A browser session from `POST /login`",
)

_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).resolve().parent),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",  # no-referrer makes Chromium post the form with Origin: null
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Principal:
    """Who made a request: the user, and the session's CSRF token (``None`` for API tokens)."""

    user: User
    csrf: str | None

    @property
    def via(self) -> str:
        return "token" if self.csrf is None else "session"


class LoginRequired(Exception):
    """A page was asked for without a session; rendered as a redirect to the sign-in page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path

    @property
    def login_url(self) -> str:
        return "/login?next=" + quote(self.next_path, safe="/")


async def login_redirect(request: Request, exc: Exception) -> Response:
    """Exception handler for :class:`LoginRequired` (``app.add_exception_handler``)."""
    assert isinstance(exc, LoginRequired)
    return RedirectResponse(exc.login_url, status_code=303, headers={"Cache-Control": "no-store"})


def safe_next(value: str | None) -> str:
    """Where to go after signing in: a path on this site, never another site (open redirect)."""
    if not value or len(value) > 2000 or not value.startswith("/") or value.startswith(("//", "/\\")):
        return DEFAULT_NEXT
    if any(ord(c) < 0x20 or c == "\\" for c in value):
        return DEFAULT_NEXT
    return value


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


class Authenticator:
    """Turns a request into a :class:`Principal` and admits it by role (and CSRF token)."""

    def __init__(self, sessions: SessionStore, tokens: ApiTokenStore, *, cookie_secure: bool) -> None:
        self.sessions = sessions
        self.tokens = tokens
        self.cookie_secure = cookie_secure

    # ---- who is calling --------------------------------------------------------------------------
    async def identify(
        self, request: HTTPConnection, bearer: HTTPAuthorizationCredentials | None, cookie: str | None
    ) -> Principal | None:
        """The caller, ``None`` when anonymous; a bad ``Authorization`` header is a 401, not anonymous."""
        cached = getattr(request.state, "principal", None)
        if isinstance(cached, Principal):
            return cached
        principal: Principal | None = None
        if "authorization" in request.headers:
            if bearer is None:
                raise _not_authenticated("the Authorization header must be 'Bearer <API token>'")
            user = await self.tokens.lookup(bearer.credentials)
            if user is None:
                raise _not_authenticated("the API token is unknown or revoked, or its user is disabled")
            principal = Principal(user, None)
        elif cookie:
            found = await self.sessions.lookup(cookie)
            if found is not None:
                principal = Principal(*found)
        if principal is not None:
            request.state.principal = principal
        return principal

    async def session(self, request: Request) -> Principal | None:
        """The caller's browser session, if any (the cookie only; for the sign-in pages)."""
        found = await self.sessions.lookup(request.cookies.get(SESSION_COOKIE))
        return Principal(*found) if found is not None else None

    # ---- dependencies ---------------------------------------------------------------------------------
    def require(self, *roles: str) -> Callable[..., Awaitable[User]]:
        """A dependency admitting API callers with one of ``roles`` (all staff when none given)."""
        return self._admitting(roles, _api_sign_in_needed)

    def require_page(self, *roles: str) -> Callable[..., Awaitable[User]]:
        """Like :meth:`require`, for HTML pages: without a session, redirect to the sign-in page."""
        return self._admitting(roles, _page_sign_in_needed)

    def _admitting(
        self, roles: tuple[str, ...], refusal: Callable[[Request], Exception]
    ) -> Callable[..., Awaitable[User]]:
        """A dependency admitting callers with one of ``roles``; an unknown caller gets ``refusal(request)``."""
        allowed = _allowed(roles)

        async def require_role(
            request: Request,
            bearer: HTTPAuthorizationCredentials | None = Depends(_BEARER),
            cookie: str | None = Depends(_COOKIE),
        ) -> User:
            principal = await self.identify(request, bearer, cookie)
            if principal is None:
                raise refusal(request)
            return await self.admit(request, principal, allowed)

        return require_role

    async def admit(self, request: Request, principal: Principal, allowed: tuple[str, ...]) -> User:
        if principal.csrf is not None and request.method not in SAFE_METHODS:
            await self.check_csrf(request, principal.csrf)
        if principal.user.role not in allowed:
            raise ApiError(
                403,
                "forbidden",
                f"this needs the role {' or '.join(allowed)}; you are signed in as {principal.user.role}",
            )
        return principal.user

    @staticmethod
    async def check_csrf(request: Request, expected: str) -> None:
        given = request.headers.get(CSRF_HEADER)
        if given is None and request.headers.get("content-type", "").startswith(_FORM_TYPES):
            value = (await request.form()).get(CSRF_FIELD)
            given = value if isinstance(value, str) else None
        if not csrf_matches(expected, given):
            raise ApiError(
                403,
                "csrf_failed",
                f"missing or wrong CSRF token: send the {CSRF_HEADER} header (the csrf_token of GET /api/me) "
                f"or the {CSRF_FIELD} form field",
            )

    # ---- the cookie -----------------------------------------------------------------------------------
    def set_cookie(self, response: Response, token: str) -> None:
        response.set_cookie(
            SESSION_COOKIE,
            token,
            max_age=int(self.sessions.lifetime.total_seconds()),
            path="/",
            httponly=True,
            samesite="lax",
            secure=self.cookie_secure,
        )

    def clear_cookie(self, response: Response) -> None:
        response.delete_cookie(
            SESSION_COOKIE, path="/", httponly=True, samesite="lax", secure=self.cookie_secure
        )


def _allowed(roles: tuple[str, ...]) -> tuple[str, ...]:
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}")
    return roles or STAFF


def _not_authenticated(message: str) -> ApiError:
    return ApiError(401, "not_authenticated", message, headers={"WWW-Authenticate": "Bearer"})


def _api_sign_in_needed(request: Request) -> ApiError:
    return _not_authenticated("sign in at /login, or send Authorization: Bearer <API token>")


def _page_sign_in_needed(request: Request) -> LoginRequired:
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return LoginRequired(path)


def _page(status: int = 200, **context: Any) -> HTMLResponse:
    values = {"user": None, "csrf_token": "", "error": "", "email": "", "next": DEFAULT_NEXT, **context}
    html = inline_shared_parts(_TEMPLATES.get_template("login.html").render(**values))
    return HTMLResponse(html, status_code=status, headers=_PAGE_HEADERS)


def auth_router(
    auth: Authenticator,
    users: UserStore,
    throttle: LoginThrottle,
    *,
    public_base_url: str | None,
    trusted_proxies: tuple[Network, ...] = (),
) -> APIRouter:
    """``GET/POST /login``, ``POST /logout`` and ``GET /api/me``.

    Sign-in is throttled per email and per client address (``trusted_proxies`` may name the
    client in ``X-Forwarded-For``) before the password is checked: see :class:`LoginThrottle`.
    """
    router = APIRouter()
    public_origin = _origin(public_base_url) if public_base_url else None

    def same_origin(request: Request) -> bool:
        """Refuse sign-in forms posted from other sites (login CSRF); non-browser clients send no Origin."""
        origin = request.headers.get("origin")
        if origin is None:
            return True
        return origin.lower() in {_origin(str(request.base_url)), public_origin}

    @router.get("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login_page(request: Request, next_path: str | None = Query(None, alias="next")) -> Response:
        target = safe_next(next_path)
        principal = await auth.session(request)
        if principal is None:
            return _page(next=target)
        if target != DEFAULT_NEXT:
            return RedirectResponse(target, status_code=303)
        return _page(user=principal.user, csrf_token=principal.csrf)

    @router.post("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login(
        request: Request,
        email: str = Form(""),
        password: str = Form(""),
        next_path: str = Form("", alias="next"),
    ) -> Response:
        target = safe_next(next_path)
        if not same_origin(request):
            raise ApiError(403, "csrf_failed", "sign-in forms are only accepted from this site")
        client = client_address(
            request.client.host if request.client else None,
            forwarded_for(request.headers),
            trusted_proxies,
        )
        try:
            attempt = await throttle.begin(email, client)
        except LoginLocked as e:
            log.warning("sign-in refused: too many failures", extra={"reason": "locked", "scope": e.scope})
            return _page(429, email=email, next=target, error=_locked_message(throttle, e.scope))
        user = await users.verify_password(email, password) if email and password else None
        if user is None:
            locked = await throttle.failed(attempt)
            log.warning("sign-in failed", extra={"reason": "wrong_credentials", "locked": locked is not None})
            return _page(401, email=email, next=target, error=WRONG_CREDENTIALS)
        await throttle.succeeded(attempt)
        if target == DEFAULT_NEXT:
            target = ROLE_HOME.get(user.role, DEFAULT_NEXT)  # the page this role works in
        token, _ = await auth.sessions.create(user)
        log.info("signed in", extra={"user_id": user.id})
        response = RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store"})
        auth.set_cookie(response, token)
        return response

    @router.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        response = RedirectResponse("/login", status_code=303)
        principal = await auth.session(request)
        if principal is not None:
            assert principal.csrf is not None
            await auth.check_csrf(request, principal.csrf)
            await auth.sessions.revoke(request.cookies[SESSION_COOKIE])
            log.info("signed out", extra={"user_id": principal.user.id})
        auth.clear_cookie(response)
        return response

    @router.get("/api/me", tags=["people"])
    async def me(
        request: Request, response: Response, user: User = Depends(auth.require(*STAFF))
    ) -> dict[str, Any]:
        """The caller, how they signed in (``session`` or ``token``), and the CSRF token that pages
        send back as ``X-CSRF-Token`` on changes (``null`` for API tokens, which need none)."""
        principal: Principal = request.state.principal
        response.headers["Cache-Control"] = "no-store"
        return {"user": user.to_dict(), "auth": principal.via, "csrf_token": principal.csrf}

    return router


def _locked_message(throttle: LoginThrottle, scope: str) -> str:
    minutes = int(throttle.lockout.total_seconds() // 60)
    who = "this email" if scope == "email" else "your network address"
    return f"Too many failed attempts for {who}. Wait {minutes} minutes, then try again."
