"""The admin console's "Users & agents" tab: ``/api/admin/users`` and ``/api/admin/tokens``. Admins only.

* ``GET /api/admin/users``: every user with role, phone, disabled flag and agent settings (queues,
  capacity, skills, softphone, presence);
* ``POST /api/admin/users``: create a user with a random first password, answered once
  (``password``) and never stored in the clear or audited; the admin hands it over;
* ``PATCH /api/admin/users/{id}``: name, role, phone, queues, capacity, skills, softphone (voice
  handoffs ring the agent's console instead of their phone);
* ``POST /api/admin/users/{id}/disable`` / ``enable``: a disabled user cannot sign in, their
  browser sessions end and their API tokens are refused until enabled again;
* ``POST /api/admin/users/{id}/password``: a new random password, answered once; the user's
  browser sessions end;
* ``GET /api/admin/tokens``: API tokens without their secret; ``POST /api/admin/users/{id}/tokens``
  creates one, its secret answered once (as ``closeloop token create``); ``POST
  /api/admin/tokens/{id}/revoke`` revokes one.

An admin cannot disable themselves or change their own role, and no change may leave no
enabled admin (409 ``cannot_change_self`` / ``last_admin``). Refused values answer 422
``invalid_user`` with each problem at its field. Every change is in the audit log (``user.*``,
``token.*``; before and after, never a password or a token's secret).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Body, Depends, Query
from fastapi.responses import JSONResponse

from crm_bridge import audit
from crm_bridge.queues import Agent
from crm_bridge.users import (
    ROLES,
    LastAdmin,
    User,
    UserExists,
    check_phone,
    check_role,
    new_password,
    normalize_email,
)
from web.admin_queues import invalid
from web.api import ApiError

if TYPE_CHECKING:
    from app.container import Services

MAX_CAPACITY = 100
_USER_FIELDS = ("email", "name", "role", "phone", "queues", "capacity", "skills", "softphone")
_EDITABLE = ("name", "role", "phone", "queues", "capacity", "skills", "softphone")


def agent_json(agent: Agent | None, softphone: bool = False) -> dict[str, Any] | None:
    """An agent's settings; ``softphone``: voice handoffs ring their console, not their phone."""
    if agent is None:
        return None
    return {
        "queues": list(agent.queues),
        "capacity": agent.capacity,
        "skills": list(agent.skills),
        "softphone": softphone,
        "presence": agent.presence,
    }


def user_json(user: User, agent: Agent | None, softphone: bool = False) -> dict[str, Any]:
    return {**user.to_dict(), "agent": agent_json(agent, softphone)}


def audited(user: User, agent: Agent | None, softphone: bool = False) -> dict[str, Any]:
    """A user's value in the audit log: what an admin sets (presence is the agent's own)."""
    found = agent_json(agent, softphone)
    if found is not None:
        del found["presence"]
    return {**user.to_dict(), "agent": found}


def check_user_fields(
    body: dict[str, Any], known_queues: Sequence[str], *, create: bool
) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The given fields, normalised, and every problem found as ``{"field", "message"}``."""
    unknown = sorted(set(body) - set(_USER_FIELDS if create else _EDITABLE))
    problems: list[dict[str, str]] = [
        {"field": name, "message": f"{name} cannot be set here"} for name in unknown
    ]
    values: dict[str, Any] = {}

    def problem(name: str, message: str) -> None:
        problems.append({"field": name, "message": message})

    if create or "email" in body:
        try:
            values["email"] = normalize_email(str(body.get("email") or ""))
        except ValueError:
            problem("email", "an email address like name@example.com is needed")
    if create or "name" in body:
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            problem("name", "a name of 1 to 200 characters is needed")
        else:
            values["name"] = name.strip()
    if create or "role" in body:
        try:
            values["role"] = check_role(str(body.get("role") or ""))
        except ValueError:
            problem("role", f"the role must be one of {', '.join(ROLES)}")
    if "phone" in body:
        phone = body["phone"]
        try:
            values["phone"] = check_phone(phone if isinstance(phone, str) or phone is None else str(phone))
        except ValueError as e:
            problem("phone", str(e))
    if "queues" in body:
        queues = body["queues"]
        if not isinstance(queues, list) or not all(isinstance(q, str) for q in queues):
            problem("queues", "a list of queue names is needed")
        else:
            missing = sorted({q for q in queues if q not in known_queues})
            if missing:
                problem("queues", f"unknown queue(s): {', '.join(missing)}")
            else:
                values["queues"] = sorted(set(queues))
    if "capacity" in body:
        capacity = body["capacity"]
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 0 <= capacity <= MAX_CAPACITY:
            problem("capacity", f"a whole number of conversations at once, from 0 to {MAX_CAPACITY}")
        else:
            values["capacity"] = capacity
    if "skills" in body:
        skills = body["skills"]
        if not isinstance(skills, list) or not all(isinstance(s, str) and len(s) <= 40 for s in skills):
            problem("skills", "a list of words is needed")
        else:
            values["skills"] = skills
    if "softphone" in body:
        if not isinstance(body["softphone"], bool):
            problem("softphone", "true (voice calls ring the console) or false (they ring the phone)")
        else:
            values["softphone"] = body["softphone"]
    return values, problems


def people_router(services: Services, admin: Callable[..., Any]) -> APIRouter:
    """The Users & agents tab's API; ``admin`` is the dependency admitting admins (with CSRF checks)."""
    router = APIRouter(prefix="/api/admin", tags=["admin"])
    users = services.users
    tokens = services.api_tokens
    directory = services.desk.routing
    pool = services.pool

    async def known_queues() -> list[str]:
        return [q.name for q in await directory.queues()]

    async def found(user_id: int) -> User:
        user = await users.get(user_id)
        if user is None:
            raise ApiError(404, "unknown_user", f"no user {user_id}")
        return user

    async def set_agent(user_id: int, values: dict[str, Any]) -> tuple[Agent | None, bool]:
        """Apply the agent settings among ``values`` (each checked already); the agent after, and
        whether they take calls in the browser."""
        if "queues" in values:
            await directory.set_queues(user_id, values["queues"])
        if "capacity" in values:
            await directory.set_capacity(user_id, values["capacity"])
        if "skills" in values:
            await directory.set_skills(user_id, values["skills"])
        if "softphone" in values:
            await directory.set_softphone(user_id, values["softphone"])
        return await directory.agent(user_id), await directory.softphone(user_id)

    def not_self(user: User, acting: User, what: str) -> None:
        if user.id == acting.id:
            raise ApiError(
                409, "cannot_change_self", f"you cannot {what} your own account; ask another admin"
            )

    @router.get("/users", dependencies=[Depends(admin)])
    async def list_users() -> dict[str, Any]:
        agents = {a.user_id: a for a in await directory.agents()}
        softphones = {user_id for user_id in agents if await directory.softphone(user_id)}
        return {
            "users": [user_json(u, agents.get(u.id), u.id in softphones) for u in await users.list()],
            "roles": list(ROLES),
            "queues": await known_queues(),
        }

    @router.post("/users", status_code=201, response_model=None)
    async def create_user(
        body: dict[str, Any] = Body(...), acting: User = Depends(admin)
    ) -> dict[str, Any] | JSONResponse:
        """Create a user (``email``, ``name``, ``role``; optional ``phone``, ``queues``, ``capacity``,
        ``skills``). The answer's ``password`` is shown this once: it cannot be recovered."""
        values, problems = check_user_fields(body, await known_queues(), create=True)
        if problems:
            return invalid("invalid_user", problems)
        password = new_password()
        try:
            user = await users.create_user(
                values["email"], values["name"], values["role"], password, phone=values.get("phone")
            )
        except UserExists as e:
            return invalid("invalid_user", [{"field": "email", "message": str(e)}])
        agent, softphone = await set_agent(user.id, values)
        await audit.record(pool, acting, "user.create", user.email, None, audited(user, agent, softphone))
        return {"user": user_json(user, agent, softphone), "password": password}

    @router.patch("/users/{user_id}", response_model=None)
    async def update_user(
        user_id: int, body: dict[str, Any] = Body(...), acting: User = Depends(admin)
    ) -> dict[str, Any] | JSONResponse:
        """Change any of ``name``, ``role``, ``phone`` (null removes it), ``queues``, ``capacity``, ``skills``."""
        user = await found(user_id)
        values, problems = check_user_fields(body, await known_queues(), create=False)
        if problems:
            return invalid("invalid_user", problems)
        if "role" in values and values["role"] != user.role:
            not_self(user, acting, "change the role of")
        before_agent, before_softphone = await directory.agent(user_id), await directory.softphone(user_id)
        try:
            before, after = await users.update(
                user_id,
                name=values.get("name"),
                role=values.get("role"),
                **({"phone": values["phone"]} if "phone" in values else {}),
            )
        except LastAdmin as e:
            raise ApiError(409, "last_admin", str(e)) from None
        agent, softphone = await set_agent(user_id, values)
        was, now = audited(before, before_agent, before_softphone), audited(after, agent, softphone)
        if was != now:
            await audit.record(pool, acting, "user.update", after.email, was, now)
        return {"user": user_json(after, agent, softphone)}

    async def set_disabled(user_id: int, acting: User, disabled: bool) -> dict[str, Any]:
        user = await found(user_id)
        if disabled:
            not_self(user, acting, "disable")
        try:
            before, after = await users.update(user_id, disabled=disabled)
        except LastAdmin as e:
            raise ApiError(409, "last_admin", str(e)) from None
        agent, softphone = await directory.agent(user_id), await directory.softphone(user_id)
        if before != after:
            kind = "user.disable" if disabled else "user.enable"
            await audit.record(
                pool,
                acting,
                kind,
                after.email,
                audited(before, agent, softphone),
                audited(after, agent, softphone),
            )
        return {"user": user_json(after, agent, softphone)}

    @router.post("/users/{user_id}/disable")
    async def disable_user(user_id: int, acting: User = Depends(admin)) -> dict[str, Any]:
        """The user can no longer sign in; their sessions end and their API tokens are refused."""
        return await set_disabled(user_id, acting, True)

    @router.post("/users/{user_id}/enable")
    async def enable_user(user_id: int, acting: User = Depends(admin)) -> dict[str, Any]:
        return await set_disabled(user_id, acting, False)

    @router.post("/users/{user_id}/password")
    async def reset_password(user_id: int, acting: User = Depends(admin)) -> dict[str, Any]:
        """A new random password, in the answer this once; the user's browser sessions end."""
        user = await found(user_id)
        password = new_password()
        await users.set_password(user.id, password)
        await audit.record(
            pool,
            acting,
            "user.password_reset",
            user.email,
            None,
            {"password": "replaced", "sessions": "ended"},
        )
        agent, softphone = await directory.agent(user.id), await directory.softphone(user.id)
        return {"user": user_json(user, agent, softphone), "password": password}

    # ---- API tokens ----------------------------------------------------------------------------------
    async def token_json(token: Any, emails: dict[int, str] | None = None) -> dict[str, Any]:
        if emails is None:
            owner = await users.get(token.user_id)
            emails = {token.user_id: owner.email if owner else "?"}
        return {**token.to_dict(), "user_email": emails.get(token.user_id, "?")}

    @router.get("/tokens", dependencies=[Depends(admin)])
    async def list_tokens(user_id: int | None = Query(None)) -> dict[str, Any]:
        """API tokens (never their secret), oldest first."""
        emails = {u.id: u.email for u in await users.list()}
        return {"tokens": [await token_json(t, emails) for t in await tokens.list(user_id)]}

    @router.post("/users/{user_id}/tokens", status_code=201, response_model=None)
    async def create_token(
        user_id: int, body: dict[str, Any] = Body(...), acting: User = Depends(admin)
    ) -> dict[str, Any] | JSONResponse:
        """A new API token acting as the user; ``secret`` is in this answer only."""
        user = await found(user_id)
        name = body.get("name")
        if not isinstance(name, str):
            return invalid("invalid_token", [{"field": "name", "message": "say what will use the token"}])
        try:
            secret, token = await tokens.issue(user, name)
        except ValueError as e:
            field = "user" if user.disabled else "name"
            return invalid("invalid_token", [{"field": field, "message": str(e)}])
        meta = await token_json(token, {user.id: user.email})
        await audit.record(pool, acting, "token.create", user.email, None, meta)
        return {"token": meta, "secret": secret}

    @router.post("/tokens/{token_id}/revoke")
    async def revoke_token(token_id: int, acting: User = Depends(admin)) -> dict[str, Any]:
        """Revoke a token: requests carrying it are refused from now on."""
        before = await tokens.get(token_id)
        if before is None:
            raise ApiError(404, "unknown_token", f"no API token {token_id}")
        if not await tokens.revoke_id(token_id):
            raise ApiError(409, "already_revoked", f"API token {token_id} was revoked already")
        after = await tokens.get(token_id)
        assert after is not None
        old, new = await token_json(before), await token_json(after)
        await audit.record(pool, acting, "token.revoke", new["user_email"], old, new)
        return {"token": new}

    return router
