"""The admin console: ``GET /admin`` and its JSON API under ``/api/admin/...``. Admins only.

The page (``web/console/admin.html``) edits intents through the existing ``/api/intents`` routes
(:mod:`web.api`) and adds, here:

* ``GET /api/admin/intents.yaml``: every stored intent as a YAML download;
* ``POST /api/admin/intents/import``: intents from pasted YAML, all validated first: one invalid
  intent and nothing changes (422 ``invalid_import`` lists every error, with its field);
* ``POST /api/admin/try``: how phrases would be understood (intent, confidence, runner-up, slots,
  the action and identity level it needs, the FAQ reply) without running any action or writing
  anything: no conversation, message or event is created;
* ``GET /api/admin/collisions``: examples that, held out, classify as another intent;
* ``GET /api/admin/audit``: the latest audit entries (:mod:`crm_bridge.audit`). The log is
  append-only: no route writes, changes or deletes entries except by making the changes it records;
* the Queues tab (:mod:`web.admin_queues`), the Users & agents tab (:mod:`web.admin_people`) and
  the matching threshold with its held-out check (:mod:`web.admin_matching`), mounted here.

Mounted by ``app.include_router(admin_router(s))`` in :func:`app.routes.mount_routes`.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import yaml
from fastapi import APIRouter, Depends, Query
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from crm_bridge import audit
from crm_bridge.intents_store import dump_yaml
from crm_bridge.users import ADMINS, User
from pipeline.identity import required_level
from pipeline.intent_engine import prepare_text  # the same text the classifier embeds
from pipeline.model import Intent, IntentMatch
from pipeline.slots import extract_slots
from web.admin_matching import matching_router
from web.admin_people import people_router
from web.admin_queues import queues_router
from web.api import ApiError
from web.auth import Authenticator
from web.console import page

if TYPE_CHECKING:
    from app.container import Services

MAX_IMPORT_CHARS = 512_000
MAX_IMPORT_INTENTS = 500
MAX_PHRASES = 50
MAX_PHRASE_CHARS = 500
FAQ_FALLBACK = "Let me get someone to help with that."  # what pipeline.turn_actions says without an answer

_TEXT_FIELDS = ("name", "description", "action", "queue")
_LIST_FIELDS = ("examples", "required_slots")
_MINUTE_FIELDS = ("sla_first_response_minutes", "sla_resolution_minutes")
# Which form field an Intent.from_dict message is about (its messages are fixed strings).
_FIELD_OF_MESSAGE = (
    ("IntentPolicy", "policy"),
    ("Priority", "priority"),
    ("identity must be", "identity"),
    ("needs a name", "name"),
    ("example", "examples"),
    ("unknown intent field", None),
)


class TryIn(BaseModel):
    phrases: list[Annotated[str, Field(max_length=MAX_PHRASE_CHARS)]] = Field(
        ..., min_length=1, max_length=MAX_PHRASES
    )


class ImportIn(BaseModel):
    yaml: str = Field(..., max_length=MAX_IMPORT_CHARS)
    replace: bool = Field(False, description="also delete the stored intents the file does not name")


class _NoAliasLoader(yaml.SafeLoader):
    """Safe YAML without anchors and aliases: a few aliases can expand to gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not accepted", event.start_mark
            )
        return super().compose_node(parent, index)


def field_of(message: str) -> str | None:
    """The intent field a validation message is about, None when it is about the whole intent."""
    for needle, name in _FIELD_OF_MESSAGE:
        if needle in message:
            return name
    return None


def validate_intent(entry: Any) -> tuple[Intent | None, list[dict[str, Any]]]:
    """``entry`` as an :class:`Intent`, or None and every problem found as ``{"field", "message"}``.

    The same rules as ``POST /api/intents`` (:func:`Intent.from_dict`, an enabled intent needs an
    example), plus the types the database needs, so that a valid import is stored whole.
    """
    if not isinstance(entry, dict):
        return None, [{"field": None, "message": "an intent must be a mapping of fields"}]
    errors: list[dict[str, Any]] = []
    for name in _TEXT_FIELDS:
        if name in entry and not isinstance(entry[name], str):
            errors.append({"field": name, "message": f"{name} must be text"})
    if entry.get("answer") is not None and not isinstance(entry["answer"], str):
        errors.append({"field": "answer", "message": "answer must be text"})
    for name in _LIST_FIELDS:
        value = entry.get(name)
        if value is not None and (
            not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value)
        ):
            errors.append({"field": name, "message": f"{name} must be a list of non-empty texts"})
    for name in _MINUTE_FIELDS:
        value = entry.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            errors.append({"field": name, "message": f"{name} must be a whole number of minutes, at least 1"})
    if "enabled" in entry and not isinstance(entry["enabled"], bool):
        errors.append({"field": "enabled", "message": "enabled must be true or false"})
    if errors:
        return None, errors
    try:
        intent = Intent.from_dict(entry)
    except (ValueError, TypeError) as e:
        return None, [{"field": field_of(str(e)), "message": str(e)}]
    if intent.enabled and not intent.examples:
        return None, [
            {"field": "examples", "message": "an enabled intent needs at least one example utterance"}
        ]
    return intent, []


def parse_import(text: str) -> tuple[list[Intent], list[dict[str, Any]]]:
    """The intents of an import, or the errors (each with ``index``, ``name``, ``field``, ``message``)."""
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        return [], [{"index": None, "name": None, "field": None, "message": f"not valid YAML: {e}"}]
    if isinstance(data, dict) and "intents" in data:
        data = data["intents"]
    if not isinstance(data, list) or not data:
        return [], [{"index": None, "name": None, "field": None, "message": "expected a list of intents"}]
    if len(data) > MAX_IMPORT_INTENTS:
        message = f"at most {MAX_IMPORT_INTENTS} intents per import"
        return [], [{"index": None, "name": None, "field": None, "message": message}]
    intents: list[Intent] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, entry in enumerate(data, start=1):
        name = entry.get("name") if isinstance(entry, dict) else None
        intent, problems = validate_intent(entry)
        errors += [{"index": index, "name": name, **p} for p in problems]
        if intent is None:
            continue
        if intent.name in seen:
            errors.append(
                {"index": index, "name": intent.name, "field": "name", "message": "this name is used twice"}
            )
        seen.add(intent.name)
        intents.append(intent)
    return (intents, []) if not errors else ([], errors)


def classifier_of(turns: Any) -> Any:
    """The intent classifier of the turn engine (the LLM engine's is its embedded engine's)."""
    found = getattr(turns, "classifier", None)
    if found is None:
        found = getattr(getattr(turns, "embedded", None), "classifier", None)
    if found is None:
        raise ApiError(503, "no_classifier", "this engine has no intent classifier to try phrases on")
    return found


async def classify(classifier: Any, text: str) -> IntentMatch:
    classify_async = getattr(classifier, "classify_async", None)
    if classify_async is not None:
        match: IntentMatch = await classify_async(text)
        return match
    return await asyncio.to_thread(classifier.classify, text)


def try_result(text: str, match: IntentMatch, intents: Mapping[str, Intent], now: Any) -> dict[str, Any]:
    """What the engine would make of ``text``, computed only: nothing runs, nothing is stored."""
    slots = dataclasses.asdict(extract_slots(text, now=now))
    found = {k: v for k, v in slots.items() if v is not None and v is not False}
    intent = intents.get(match.intent) if match.intent else None
    result: dict[str, Any] = {
        "phrase": text,
        "intent": match.intent,
        "confidence": round(match.score, 4),
        "best_guess": None,
        "runner_up": match.runner_up,
        "runner_up_score": round(match.runner_up_score, 4),
        "slots": found,
        "action": None,
        "policy": None,
        "identity": None,
        "missing_slots": [],
        "reply_preview": None,
    }
    if intent is None:
        return result
    result.update(
        action=intent.action,
        policy=str(intent.policy),
        identity=str(required_level(intent)),
        missing_slots=[s for s in intent.required_slots if slots.get(s) in (None, False)],
        reply_preview=(intent.answer or intent.description or FAQ_FALLBACK)
        if intent.action == "faq"
        else None,
    )
    return result


def held_out_collisions(
    vectors: np.ndarray, owners: Sequence[int], names: Sequence[str], *, top_k: int, threshold: float
) -> list[tuple[int, int, float, float]]:
    """Leave-one-out: each example scored against every other example, an intent scoring the mean
    of its ``top_k`` closest (as the classifier does). Returns ``(example, winner, winner_score,
    own_score)`` for each example whose winner is another intent scoring at least ``threshold``."""
    similarities = vectors @ vectors.T
    np.fill_diagonal(similarities, -np.inf)
    owner = np.asarray(owners)
    found = []
    for i in range(len(owners)):
        scores = np.zeros(len(names), dtype=np.float64)
        for j in range(len(names)):
            column = similarities[i, owner == j]
            column = np.sort(column[np.isfinite(column)])[::-1][:top_k]
            scores[j] = float(column.mean()) if column.size else 0.0
        winner = int(np.argmax(scores))
        if winner != owners[i] and scores[winner] >= threshold:
            found.append((i, winner, float(scores[winner]), float(scores[owners[i]])))
    return found


def admin_router(services: Services) -> APIRouter:
    """The admin page and its API, built from the app's services."""
    router = APIRouter()
    auth = Authenticator(
        services.sessions, services.api_tokens, cookie_secure=services.settings.cookie_secure
    )
    admin = auth.require(*ADMINS)
    admins = [Depends(admin)]
    store = services.intents
    pool = services.pool
    router.include_router(queues_router(services, admin))
    router.include_router(people_router(services, admin))
    router.include_router(matching_router(services, admin))

    @router.get(
        "/admin",
        response_class=HTMLResponse,
        include_in_schema=False,
        dependencies=[Depends(auth.require_page(*ADMINS))],
    )
    async def admin_page() -> HTMLResponse:
        return page("admin.html")

    @router.get("/api/admin/intents.yaml", tags=["admin"], dependencies=admins)
    async def export_intents() -> Response:
        """Every stored intent as YAML (the format of ``intents.yaml`` and of the import)."""
        return Response(
            dump_yaml(await store.list()),
            media_type="application/yaml; charset=utf-8",
            headers={
                "Content-Disposition": 'attachment; filename="intents.yaml"',
                "Cache-Control": "no-store",
                "X-Content-Type-Options": "nosniff",
            },
        )

    @router.post("/api/admin/intents/import", tags=["admin"], response_model=None)
    async def import_intents(body: ImportIn, user: User = Depends(admin)) -> dict[str, Any] | JSONResponse:
        """Create or replace the intents of the YAML (and, with ``replace``, delete the others), in
        one transaction recorded in the audit log; nothing changes when one intent is invalid."""
        intents, errors = parse_import(body.yaml)
        if errors:
            return JSONResponse(
                {
                    "error": {
                        "code": "invalid_import",
                        "message": f"{len(errors)} problem(s) found; nothing was changed",
                        "errors": errors,
                    }
                },
                status_code=422,
            )
        outcome: dict[str, list[str]] = {"created": [], "updated": [], "unchanged": [], "deleted": []}
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute("LOCK TABLE intents IN SHARE ROW EXCLUSIVE MODE")  # one import at a time
            stored = {i.name: i for i in await store.list()}
            for intent in intents:
                before = stored.get(intent.name)
                if before == intent:
                    outcome["unchanged"].append(intent.name)
                    continue
                await store.upsert(intent, conn=conn)
                outcome["created" if before is None else "updated"].append(intent.name)
                await audit.record(
                    conn,
                    user,
                    "intent.import",
                    intent.name,
                    before.to_dict() if before else None,
                    intent.to_dict(),
                )
            if body.replace:
                named = {i.name for i in intents}
                for name, before in stored.items():
                    if name in named:
                        continue
                    await conn.execute("DELETE FROM intents WHERE name = $1", name)
                    outcome["deleted"].append(name)
                    await audit.record(conn, user, "intent.import", name, before.to_dict(), None)
        if any(outcome[k] for k in ("created", "updated", "deleted")):
            await services.reload_intents()
        return outcome

    @router.post("/api/admin/try", tags=["admin"], dependencies=admins)
    async def try_phrases(body: TryIn) -> dict[str, Any]:
        """How each phrase would be understood. Read-only: no action runs and nothing is stored."""
        classifier = classifier_of(services.turns)
        intents = services.turns.intents
        now = services.clock.now()
        results = []
        for phrase in body.phrases:
            text = phrase.strip()
            if not text:
                continue
            results.append(try_result(text, await classify(classifier, text), intents, now))
        return {"results": results, "threshold": getattr(classifier, "threshold", None)}

    @router.get("/api/admin/collisions", tags=["admin"], dependencies=admins)
    async def collisions() -> dict[str, Any]:
        """Examples of an enabled intent that, left out of their own intent, classify as another one:
        they teach the classifier to confuse the two."""
        classifier = classifier_of(services.turns)
        encoder = getattr(classifier, "encoder", None)
        if encoder is None:
            raise ApiError(503, "no_encoder", "this classifier cannot be checked for collisions")
        names: list[str] = []
        texts: list[str] = []
        originals: list[str] = []
        owners: list[int] = []
        for intent in services.turns.intents.values():
            if not intent.enabled:
                continue
            seen: set[str] = set()
            for example in intent.examples:
                prepared = prepare_text(example)
                if not prepared or prepared.lower() in seen:
                    continue
                seen.add(prepared.lower())
                if intent.name not in names:
                    names.append(intent.name)
                texts.append(prepared)
                originals.append(example)
                owners.append(names.index(intent.name))
        if len(names) < 2:
            return {"collisions": [], "checked": len(texts)}
        vectors = np.asarray(await asyncio.to_thread(encoder.encode, texts), dtype=np.float32)
        found = held_out_collisions(
            vectors,
            owners,
            names,
            top_k=int(getattr(classifier, "top_k", 2)),
            threshold=float(getattr(classifier, "threshold", 0.0)),
        )
        return {
            "checked": len(texts),
            "collisions": [
                {
                    "intent": names[owners[i]],
                    "example": originals[i],
                    "classified_as": names[winner],
                    "score": round(score, 4),
                    "own_score": round(own, 4),
                }
                for i, winner, score, own in sorted(found, key=lambda f: f[3] - f[2])
            ],
        }

    @router.get("/api/admin/audit", tags=["admin"], dependencies=admins)
    async def audit_entries(
        limit: int = Query(100, ge=1, le=audit.MAX_LIMIT),
        kind: str | None = Query(None, max_length=100),
        target: str | None = Query(None, max_length=200),
    ) -> dict[str, Any]:
        """The latest audit entries first: who changed what, when, with the value before and after."""
        entries = await audit.recent(pool, limit=limit, kind=kind, target=target)
        return {"entries": [e.to_dict() for e in entries]}

    return router
