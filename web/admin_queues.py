"""The admin console's Queues tab: ``/api/admin/queues``. Admins only; every change audited.

* ``GET /api/admin/queues``: every queue with its SLA per priority, skills, business hours (time
  zone and intervals per weekday), overflow queue, waiting handoffs and whether it is open now;
* ``POST /api/admin/queues``: create one (409 ``queue_exists`` when the name is taken);
* ``PUT /api/admin/queues/{name}``: replace the settings of one (404 ``unknown_queue``).

Refused values answer 422 ``invalid_queue`` with every problem and its field
(``sla_first_response.high``, ``business_hours.mon``, ``overflow_queue`` ...); nothing changes.
Each change is one transaction with its audit entry (``queue.create`` / ``queue.update``, the
queue's settings before and after).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body, Depends
from fastapi.responses import JSONResponse

from crm_bridge import audit
from crm_bridge.business_hours import WEEKDAYS
from crm_bridge.queues import Conflict, InvalidQueue, NotFoundError, Queue, check_queue
from crm_bridge.users import User
from pipeline.model import Priority
from web.api import ApiError

if TYPE_CHECKING:
    from app.container import Services


def invalid(code: str, errors: list[dict[str, Any]]) -> JSONResponse:
    """422 with every problem found (``{"field" or "line", "message"}``): the page shows each at its field."""
    message = f"{len(errors)} problem(s) found; nothing was changed"
    return JSONResponse({"error": {"code": code, "message": message, "errors": errors}}, status_code=422)


def queues_router(services: Services, admin: Callable[..., Any]) -> APIRouter:
    """The Queues tab's API; ``admin`` is the dependency admitting admins (with CSRF checks)."""
    router = APIRouter(prefix="/api/admin/queues", tags=["admin"])
    directory = services.desk.routing
    pool = services.pool

    def as_json(queue: Queue) -> dict[str, Any]:
        return {**queue.settings(), "waiting": queue.waiting, "open_now": queue.open_at(services.clock.now())}

    @router.get("", dependencies=[Depends(admin)])
    async def list_queues() -> dict[str, Any]:
        """Every queue and what the form needs: the priorities and weekdays."""
        return {
            "queues": [as_json(q) for q in await directory.queues()],
            "priorities": [str(p) for p in Priority],
            "weekdays": list(WEEKDAYS),
        }

    async def save(body: dict[str, Any], user: User, *, create: bool) -> dict[str, Any] | JSONResponse:
        try:
            queue = check_queue(body)
            async with pool.acquire() as conn, conn.transaction():
                before, after = await directory.save_queue(queue, create=create, conn=conn)
                if before is None or before.settings() != after.settings():
                    await audit.record(
                        conn,
                        user,
                        "queue.create" if create else "queue.update",
                        after.name,
                        before.settings() if before is not None else None,
                        after.settings(),
                    )
        except InvalidQueue as e:
            return invalid("invalid_queue", e.problems)
        except Conflict as e:
            raise ApiError(409, e.code, str(e)) from None
        except NotFoundError as e:
            raise ApiError(404, e.code, str(e)) from None
        saved = await directory.queue(after.name)
        assert saved is not None
        return as_json(saved)

    @router.post("", status_code=201, response_model=None)
    async def create_queue(
        body: dict[str, Any] = Body(...), user: User = Depends(admin)
    ) -> dict[str, Any] | JSONResponse:
        """Create a queue: ``name``, ``description``, ``skills``, ``sla_first_response`` (minutes per
        priority), ``timezone``, ``business_hours`` (weekday -> ``["09:00-17:00", ...]``),
        ``overflow_queue``."""
        return await save(body, user, create=True)

    @router.put("/{name}", response_model=None)
    async def update_queue(
        name: str, body: dict[str, Any] = Body(...), user: User = Depends(admin)
    ) -> dict[str, Any] | JSONResponse:
        """Replace every setting of the queue ``name`` (the body's ``name``, if any, must agree)."""
        if body.get("name") not in (None, name):
            return invalid("invalid_queue", [{"field": "name", "message": "a queue cannot be renamed"}])
        return await save({**body, "name": name}, user, create=False)

    return router
