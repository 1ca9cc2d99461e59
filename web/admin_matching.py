"""The admin console's matching settings: ``/api/admin/matching``. Admins only.

* ``GET /api/admin/matching``: the threshold, margin and low-confidence behaviour (clarifying
  questions before a person takes over) the running engine uses, and whether a held-out file is there;
* ``PUT /api/admin/matching``: change them: stored (:mod:`crm_bridge.matching`), audited
  (``matching.update``, before and after) and applied to this process's matcher at once;
* ``GET /api/admin/matching/heldout``: the repository's held-out phrases as pasteable lines;
* ``POST /api/admin/matching/evaluate``: for pasted ``phrase => intent`` lines, accuracy, phrases
  that would fall back and wrong matches with the current and a proposed threshold and margin.
  Read-only: phrases are only scored, nothing runs and nothing is stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from fastapi import APIRouter, Body, Depends
from fastapi.responses import JSONResponse

from crm_bridge import audit, matching
from crm_bridge.matching import InvalidMatching, MatchingSettings
from crm_bridge.users import User
from pipeline.intent_heldout import MAX_PHRASE_CHARS, MAX_PHRASES, as_lines, evaluate, parse_lines
from web.admin_queues import invalid
from web.api import ApiError

if TYPE_CHECKING:
    from app.container import Services

MAX_LINES_CHARS = MAX_PHRASES * (MAX_PHRASE_CHARS + 60)
AUDIT_TARGET = "intent_matching"


def read_heldout(path: Path) -> str | None:
    """The held-out YAML (a list of ``{text, intent}``) as ``phrase => intent`` lines; None without it."""
    if not path.is_file():
        return None
    entries = yaml.safe_load(path.read_text(encoding="utf-8")) or []
    return as_lines(e for e in entries if isinstance(e, dict) and e.get("text"))


def matching_router(services: Services, admin: Callable[..., Any]) -> APIRouter:
    """The matching settings' API; ``admin`` is the dependency admitting admins (with CSRF checks)."""
    router = APIRouter(prefix="/api/admin/matching", tags=["admin"])
    pool = services.pool
    heldout_file = services.settings.intent_heldout_file

    def running() -> MatchingSettings:
        found = matching.current(services.turns)
        if found is None:
            raise ApiError(503, "no_threshold", "this engine's intent matcher has no threshold to set")
        return found

    def scorer() -> Any:
        engine = matching.embedded_engine(services.turns)
        classifier = getattr(engine, "classifier", None)
        if classifier is None or not hasattr(classifier, "scores"):
            raise ApiError(503, "no_classifier", "this engine's intent matcher cannot score phrases")
        return classifier

    @router.get("", dependencies=[Depends(admin)])
    async def get_matching() -> dict[str, Any]:
        return {
            "current": running().to_dict(),
            "stored": await matching.load(pool) is not None,
            "heldout_file": heldout_file.is_file(),
        }

    @router.put("", response_model=None)
    async def set_matching(
        body: dict[str, Any] = Body(...), user: User = Depends(admin)
    ) -> dict[str, Any] | JSONResponse:
        """Set ``threshold`` (0-1), ``margin`` (0-0.5) and ``max_misses`` (turns matching nothing,
        each answered with a clarifying question, before a person takes over; 1-5)."""
        before = running()
        try:
            after = matching.check_matching(body)
        except InvalidMatching as e:
            return invalid("invalid_matching", e.problems)
        async with pool.acquire() as conn, conn.transaction():
            await matching.save(conn, after)
            if after != before:
                await audit.record(
                    conn, user, "matching.update", AUDIT_TARGET, before.to_dict(), after.to_dict()
                )
        matching.apply(services.turns, after)
        return {"current": running().to_dict(), "stored": True}

    @router.get("/heldout", dependencies=[Depends(admin)])
    async def heldout() -> dict[str, Any]:
        """The repository's held-out phrases (never used to tune the matcher) as lines to paste."""
        lines = await asyncio.to_thread(read_heldout, heldout_file)
        if lines is None:
            raise ApiError(404, "no_heldout_file", "no held-out file here: paste phrase => intent lines")
        return {"lines": lines, "count": len(lines.splitlines()), "source": heldout_file.name}

    @router.post("/evaluate", response_model=None)
    async def evaluate_heldout(
        body: dict[str, Any] = Body(...), _user: User = Depends(admin)
    ) -> dict[str, Any] | JSONResponse:
        """Score ``lines`` (``phrase => intent`` or ``phrase => none``) with the current settings and
        with the proposed ``threshold`` and ``margin`` (the current ones when left out)."""
        current = running()
        lines = body.get("lines")
        if not isinstance(lines, str) or len(lines) > MAX_LINES_CHARS:
            return invalid(
                "invalid_heldout", [{"line": None, "message": "paste lines of text: phrase => intent"}]
            )
        try:
            proposed = matching.check_matching(
                {
                    "threshold": body.get("threshold", current.threshold),
                    "margin": body.get("margin", current.margin),
                    "max_misses": current.max_misses,
                }
            )
        except InvalidMatching as e:
            return invalid("invalid_matching", e.problems)
        phrases, errors = parse_lines(lines, services.turns.intents.keys())
        if errors:
            return invalid("invalid_heldout", errors)
        classifier = scorer()
        scores = await asyncio.to_thread(lambda: [classifier.scores(p.text) for p in phrases])
        return {
            "phrases": len(phrases),
            "current": evaluate(phrases, scores, threshold=current.threshold, margin=current.margin),
            "proposed": evaluate(phrases, scores, threshold=proposed.threshold, margin=proposed.margin),
        }

    return router
