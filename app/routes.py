"""The routers one app mounts, each built from the services it needs, and the ops routes."""

from __future__ import annotations

from pathlib import Path

import swagger_ui_bundle
from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from prometheus_client import generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.container import Services
from app.metrics import MeteredService
from app.voice import voice_routes
from crm_bridge.access import AccessPolicy
from crm_bridge.analytics import analytics_gauges
from crm_bridge.crm import BuiltinCRM
from crm_bridge.users import MANAGERS
from telephony.messaging_routes import messaging_router
from telephony.transfer import mount_transfer
from web.admin import admin_router
from web.analytics import analytics_router
from web.api import api_router
from web.auth import Authenticator, auth_router
from web.chat_routes import ChatLimits, chat_router
from web.console import console_router
from web.limits import parse_networks
from web.outbox_routes import outbox_router
from web.recordings import recordings_router
from web.supervisor import supervisor_router
from web.supervisor_actions import supervisor_actions_router


def mount_routes(app: FastAPI, s: Services) -> None:
    """Mount every feature's router on ``app``.

    Who may call what: every page and /api route names its roles with ``auth.require(...)`` /
    ``auth.require_page(...)``. Public on purpose: /healthz, /readyz, the customer's /chat and
    /labels/{code}, /login; /twilio/* is checked by Twilio signatures instead.
    """
    metered = MeteredService(s.service, s.metrics)
    settings = s.settings
    auth = Authenticator(s.sessions, s.api_tokens, cookie_secure=settings.cookie_secure)
    trusted_proxies = parse_networks(settings.trusted_proxies)
    app.include_router(
        auth_router(
            auth,
            s.users,
            s.login_throttle,
            public_base_url=settings.public_base_url,
            trusted_proxies=trusted_proxies,
        )
    )
    chat_limits = ChatLimits(
        max_connections_per_client=settings.chat_max_connections,
        messages_burst=settings.chat_messages_burst,
        messages_per_minute=settings.chat_messages_per_minute,
        idle_timeout_s=settings.chat_idle_seconds,
    )
    # The routers are typed for ConversationService; the metered wrapper speaks the same methods.
    app.include_router(
        chat_router(
            metered,  # type: ignore[arg-type]
            s.store,
            s.hub,
            s.clock,
            limits=chat_limits,
            trusted_proxies=trusted_proxies,
            sessions=s.chat_sessions,
        )
    )
    app.include_router(messaging_router(metered, guard=s.twilio_guard))  # type: ignore[arg-type]
    if s.transfer is not None:
        mount_transfer(app, s.transfer, guard=s.twilio_guard)
    app.include_router(voice_routes(s, metered))
    label_lookup = s.business.get_label if isinstance(s.business, BuiltinCRM) else None
    access = AccessPolicy(s.pool)  # what each staff member may read, for every route below
    app.include_router(
        api_router(
            s.reports,
            s.intents,
            s.business,
            require=auth.require,
            access=access,
            on_intents_changed=s.reload_intents,
            label_lookup=label_lookup,
        )
    )
    app.include_router(outbox_router(s.pool, auth.require))
    app.include_router(admin_router(s))
    app.include_router(analytics_router(s))
    app.include_router(supervisor_actions_router(s))
    app.include_router(
        console_router(auth, s.desk, s.reports, access, public_base_url=settings.public_base_url)
    )
    app.include_router(
        supervisor_router(
            auth,
            s.desk.routing,
            s.reports,
            access,
            active_calls=lambda: len(s.active_calls),
            webchat_online=lambda: s.hub.online,
            clock=s.clock,
        )
    )
    if s.recordings is not None:
        app.include_router(recordings_router(auth, access, s.recordings))
    _mount_ops(app, s, auth)


#: The Swagger UI files /docs loads, served from the installed package (name -> media type).
DOCS_ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}


def _mount_ops(app: FastAPI, s: Services, auth: Authenticator) -> None:
    """``/openapi.json`` and ``/docs`` behind sign-in, ``/``, ``/healthz`` and ``/metrics``."""

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(auth.require())])
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get(
        "/docs",
        include_in_schema=False,
        response_class=HTMLResponse,
        dependencies=[Depends(auth.require_page())],
    )
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="closeloop API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/docs/assets/favicon-32x32.png",
        )

    @app.get("/docs/assets/{name}", include_in_schema=False, dependencies=[Depends(auth.require())])
    async def docs_asset(name: str) -> FileResponse:
        """Swagger UI from the installed swagger-ui-bundle package: /docs works with no internet.
        Only the three files the page uses are served (a name is a key, never a path)."""
        media_type = DOCS_ASSETS.get(name)
        if media_type is None:
            raise StarletteHTTPException(404, f"no docs asset named {name!r}")
        return FileResponse(
            Path(swagger_ui_bundle.swagger_ui_path) / name,
            media_type=media_type,
            headers={"Cache-Control": "public, max-age=86400"},
        )

    @app.get("/", include_in_schema=False)
    async def index() -> RedirectResponse:
        return RedirectResponse("/chat")

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> JSONResponse:
        if s.db_health.restarting:
            return JSONResponse({"status": "degraded", "database": "restarting"}, status_code=503)
        try:
            await s.pool.fetchval("SELECT 1")
        except Exception as e:
            return JSONResponse({"status": "error", "database": type(e).__name__}, status_code=503)
        return JSONResponse({"status": "ok", "database": "ok"})

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        """Whether a proxy or orchestrator should send this node new work: not while it drains
        (SIGTERM) or while its database is away. ``/healthz`` is the liveness check."""
        if s.drain.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if s.db_health.restarting:
            return JSONResponse({"status": "degraded", "database": "restarting"}, status_code=503)
        if s.settings.voice_preload and not getattr(s.speech, "ready", True):
            # calls would wait for the models: let the proxy send them elsewhere until loaded
            return JSONResponse({"status": "starting", "speech": "loading"}, status_code=503)
        try:
            await s.pool.fetchval("SELECT 1")
        except Exception as e:
            return JSONResponse({"status": "error", "database": type(e).__name__}, status_code=503)
        return JSONResponse({"status": "ready"})

    metrics_access = [] if s.settings.metrics_public else [Depends(auth.require(*MANAGERS))]

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse, dependencies=metrics_access)
    async def metrics() -> PlainTextResponse:
        for name, value in (await s.reports.counts()).items():
            s.metrics.gauges[name].set(value)
        for name, rate in (await analytics_gauges(s.pool)).items():
            s.metrics.gauges[name].set(rate)
        s.metrics.webchat_online.set(s.hub.online)
        return PlainTextResponse(
            generate_latest(s.metrics.registry).decode(), media_type="text/plain; version=0.0.4"
        )
