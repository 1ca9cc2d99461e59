"""The FastAPI app: its lifespan (services up, routes mounted, jobs started) and error handlers.

Errors are JSON with a stable code; ``web.api.ApiError`` is a Starlette HTTP exception with a
``code`` and is rendered by the same handler.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.container import Services, build_redactor, build_services
from app.database import supervise_embedded
from app.drain import Drain, DrainMiddleware, drain_node
from app.routes import mount_routes
from app.settings import Settings
from crm_bridge.nodes import run_node
from pipeline.ports import Clock, StoreUnavailable
from pipeline.redaction import install_log_redaction
from web.auth import LoginRequired, login_redirect
from web.console import staff_error_page
from web.limits import BodyLimitMiddleware

log = logging.getLogger("closeloop")


def create_app(
    settings: Settings | None = None, *, clock: Clock | None = None, start_jobs: bool = True
) -> FastAPI:
    """Build the FastAPI app. Services start in the lifespan and are at ``app.state.services``."""
    settings = settings or Settings()
    drain = Drain()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Before anything can log: every handler configured so far (root, uvicorn's) redacts.
        install_log_redaction(build_redactor(settings))
        services = await build_services(settings, clock)
        services.drain = drain
        app.state.services = services
        _twilio_banner(settings)
        mount_routes(app, services)
        if start_jobs:
            services.jobs.start()
        background: list[asyncio.Task[None]] = []
        if settings.voice_preload:
            background.append(asyncio.create_task(_preload_speech(services), name="closeloop-speech-preload"))
        node = run_node(
            services.nodes,
            every_s=settings.node_heartbeat_seconds,
            draining=lambda: drain.draining,
            chats=services.chat_sessions,
        )
        background.append(asyncio.create_task(node, name="closeloop-node"))
        if services.embedded is not None:
            supervisor = supervise_embedded(services.embedded, services.pool, services.db_health)
            background.append(asyncio.create_task(supervisor, name="closeloop-embedded-postgres"))
        log.info("closeloop ready", extra={"base_url": settings.base_url})
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await services.close()

    # /docs and /openapi.json are mounted with the other routes, behind sign-in
    app = FastAPI(
        title="closeloop",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        description="Voice-first AI contact center that completes work. Sign in at /login, or send "
        "`Authorization: Bearer <API token>` (`closeloop token create`).",
    )
    app.add_exception_handler(LoginRequired, login_redirect)
    # SIGTERM (see start_drain): no new calls or chats, /readyz 503, calls in progress finish.
    app.add_middleware(DrainMiddleware, drain=drain)
    # Every route: bodies over the limit are refused with 413 before they are read in full.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(asyncpg.PostgresError, _database_error)
    # The database is unreachable (restarting, an outage): 503 with Retry-After, never a 500.
    app.add_exception_handler(asyncpg.InterfaceError, _database_unreachable)
    app.add_exception_handler(ConnectionError, _database_unreachable)
    app.add_exception_handler(StoreUnavailable, _database_unreachable)
    app.add_exception_handler(asyncpg.InternalClientError, _database_unreachable)
    # the connection was lost mid-query, or the server is shutting down, crashed or starting up
    app.add_exception_handler(asyncpg.PostgresConnectionError, _database_unreachable)
    app.add_exception_handler(asyncpg.OperatorInterventionError, _database_unreachable)
    return app


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    page = staff_error_page(request, exc.status_code)  # a browser on a staff page gets a page
    if page is not None:
        return page
    code = getattr(exc, "code", None) or {404: "not_found", 405: "method_not_allowed"}.get(
        exc.status_code, "http_error"
    )
    return JSONResponse(
        {"error": {"code": code, "message": str(exc.detail)}},
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(
        {
            "error": {
                "code": "invalid_request",
                "message": "request failed validation",
                "details": exc.errors(),
            }
        },
        status_code=422,
    )


async def _database_error(request: Request, exc: asyncpg.PostgresError) -> JSONResponse:
    log.exception("database error", extra={"path": request.url.path})
    return JSONResponse(
        {
            "error": {
                "code": "database_error",
                "message": "the database refused the request; nothing was changed",
            }
        },
        status_code=503,
    )


async def _database_unreachable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unreachable", extra={"path": request.url.path, "error": type(exc).__name__})
    services: Services | None = getattr(request.app.state, "services", None)
    if services is not None and isinstance(
        exc, (asyncpg.InterfaceError, asyncpg.InternalClientError, asyncpg.PostgresConnectionError)
    ):
        # A connection broken mid-operation (the database went away under it) can be left in a
        # state the driver refuses to reuse: replace every pooled connection on its next use.
        await services.pool.expire_connections()
    return JSONResponse(
        {
            "error": {
                "code": "database_unavailable",
                "message": "the database is unreachable for a moment; nothing was changed, try again",
            }
        },
        status_code=503,
        headers={"Retry-After": "5"},
    )


def _twilio_banner(settings: Settings) -> None:
    """Say loudly (stderr) when Twilio requests are not verified, and when they are all refused."""
    if settings.twilio_auth_token:
        return
    if settings.allow_unsigned_twilio:
        why = "CLOSELOOP_ALLOW_UNSIGNED_TWILIO=true"
    elif settings.twilio_unsigned_allowed:
        why = f"the server listens on loopback only ({settings.host})"
    else:
        print(
            f"closeloop: TWILIO_AUTH_TOKEN is not set and the server listens on {settings.host}: every /twilio/* "
            "request is refused (403). Set TWILIO_AUTH_TOKEN to take calls and texts.",
            file=sys.stderr,
        )
        return
    print(
        f"closeloop: WARNING: TWILIO_AUTH_TOKEN is not set; /twilio/* requests are NOT verified ({why}). "
        "Anyone who can reach this server can fake calls and texts. Set TWILIO_AUTH_TOKEN before exposing it.",
        file=sys.stderr,
    )


async def _preload_speech(s: Services) -> None:
    try:
        started = time.perf_counter()
        await s.speech.start()
        print(
            f"closeloop: speech models ready in {time.perf_counter() - started:.1f} s (calls: POST /twilio/voice)",
            file=sys.stderr,
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("could not start the speech stack; calls will retry on arrival")


async def start_drain(app: FastAPI, settings: Settings) -> None:
    """Drain this node (on SIGTERM): see :mod:`app.drain`. Returns when the calls are over."""
    services: Services | None = getattr(app.state, "services", None)
    if services is None:
        return
    await drain_node(
        services.drain,
        services.active_calls,
        services.calls_idle,
        services.jobs.stop,
        seconds=settings.drain_seconds,
    )
