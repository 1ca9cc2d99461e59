"""The admin console's API: try-it reads only, YAML import is all or nothing, export round-trips,
and every intent change is in the audit log with its value before and after."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import yaml

from tests.support import LiveServer, live_server
from web.admin import admin_router

# Tables a conversation turn writes to: trying phrases must leave every one of them alone.
WRITTEN_BY_TURNS = ("conversations", "messages", "events", "tickets", "outbox", "followups", "audit_log")


def mount_admin(server: LiveServer) -> None:
    """Mount the admin router unless app/routes.py already does."""
    if not any(getattr(r, "path", "") == "/admin" for r in server.app.routes):
        server.app.include_router(admin_router(server.app.state.services))


@pytest.fixture(scope="module")
async def server(database_url: str) -> AsyncIterator[LiveServer]:
    async with live_server(database_url) as live:
        mount_admin(live)
        yield live


def unique_name(prefix: str = "admin_test") -> str:
    return f"{prefix}_{secrets.token_hex(4)}"


def intent_body(name: str, **changes: Any) -> dict[str, Any]:
    return {
        "name": name,
        "description": "a test intent",
        "examples": [f"the {name} phrase about kumquat deliveries", "kumquat deliveries to the moon"],
        "action": "faq",
        "answer": "Kumquats fly on Tuesdays.",
        **changes,
    }


async def counts(pool: asyncpg.Pool) -> dict[str, int]:
    return {t: await pool.fetchval(f"SELECT count(*) FROM {t}") for t in WRITTEN_BY_TURNS}


async def audit_rows(pool: asyncpg.Pool, target: str) -> list[asyncpg.Record]:
    return await pool.fetch("SELECT * FROM audit_log WHERE target = $1 ORDER BY id", target)


async def test_try_it_names_the_intent_of_an_example_and_writes_nothing(server: LiveServer) -> None:
    intents = server.services.turns.intents
    faq = next(i for i in intents.values() if i.enabled and i.examples and i.action == "faq" and i.answer)
    other = next(i for i in intents.values() if i.enabled and i.examples and i.name != faq.name)
    pool = server.services.pool
    before = await counts(pool)

    response = await server.http.post(
        "/api/admin/try", json={"phrases": [faq.examples[0], "", other.examples[0]]}
    )

    assert response.status_code == 200, response.text
    first, second = response.json()["results"]  # the empty line is skipped
    assert first["phrase"] == faq.examples[0]
    assert first["intent"] == faq.name and first["confidence"] >= 0.35
    assert first["runner_up"] not in (None, faq.name) and first["runner_up_score"] <= first["confidence"]
    assert first["action"] == "faq" and first["reply_preview"] == faq.answer
    assert first["identity"] == "anonymous" and first["policy"] == str(faq.policy)
    assert second["intent"] == other.name and second["action"] == other.action
    assert await counts(pool) == before


async def test_try_it_reports_slots_and_the_identity_an_account_action_needs(server: LiveServer) -> None:
    intents = server.services.turns.intents
    money = next((i for i in intents.values() if i.enabled and i.action == "refund"), None)
    assert money is not None, "the seed intents (intents.yaml) have a refund intent"
    response = await server.http.post(
        "/api/admin/try", json={"phrases": [money.examples[0] + " order 451789"]}
    )
    result = response.json()["results"][0]
    assert result["intent"] == money.name
    assert result["identity"] == "verified" and result["reply_preview"] is None
    assert result["slots"]["order_number"] == "451789"


async def test_a_phrase_matching_nothing_has_no_action(server: LiveServer) -> None:
    response = await server.http.post("/api/admin/try", json={"phrases": ["zzqx vlorp"]})
    result = response.json()["results"][0]
    if result["intent"] is None:
        assert result["action"] is None and result["identity"] is None and result["reply_preview"] is None


async def test_try_it_refuses_too_many_phrases(server: LiveServer) -> None:
    response = await server.http.post("/api/admin/try", json={"phrases": ["hello"] * 51})
    assert response.status_code == 422


async def test_export_round_trips_through_import(server: LiveServer) -> None:
    response = await server.http.get("/api/admin/intents.yaml")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/yaml")
    assert "attachment" in response.headers["content-disposition"]
    exported = yaml.safe_load(response.text)
    stored = [i.to_dict() for i in await server.services.intents.list()]
    assert exported == stored

    imported = await server.http.post("/api/admin/intents/import", json={"yaml": response.text})

    assert imported.status_code == 200, imported.text
    outcome = imported.json()
    assert outcome["created"] == outcome["updated"] == outcome["deleted"] == []
    assert sorted(outcome["unchanged"]) == sorted(i["name"] for i in stored)
    assert [i.to_dict() for i in await server.services.intents.list()] == stored


async def test_an_invalid_import_changes_nothing(server: LiveServer) -> None:
    pool = server.services.pool
    existing = (await server.services.intents.list())[0]
    new_name = unique_name()
    document = yaml.safe_dump(
        [
            intent_body(new_name),
            {**existing.to_dict(), "description": "changed by an import that must fail"},
            intent_body(unique_name(), policy="sometimes"),
            intent_body(unique_name(), sla_resolution_minutes="soon"),
        ]
    )
    audit_before = await pool.fetchval("SELECT count(*) FROM audit_log")

    response = await server.http.post("/api/admin/intents/import", json={"yaml": document})

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_import"
    assert {(e["index"], e["field"]) for e in error["errors"]} == {
        (3, "policy"),
        (4, "sla_resolution_minutes"),
    }
    assert await server.services.intents.get(new_name) is None
    assert await server.services.intents.get(existing.name) == existing
    assert await pool.fetchval("SELECT count(*) FROM audit_log") == audit_before


@pytest.mark.parametrize(
    "document",
    [
        "- name: [unclosed",
        "just text",
        "- &a {name: x}\n- *a",
        "- name: dup\n  examples: [a]\n- name: dup\n  examples: [b]",
        "- name: noexamples\n  enabled: true",
    ],
)
async def test_bad_files_are_refused_with_errors(server: LiveServer, document: str) -> None:
    response = await server.http.post("/api/admin/intents/import", json={"yaml": document})
    assert response.status_code == 422
    assert response.json()["error"]["errors"]
    assert await server.services.intents.get("dup") is None


async def test_a_valid_import_is_stored_and_audited(server: LiveServer) -> None:
    name = unique_name()
    response = await server.http.post(
        "/api/admin/intents/import", json={"yaml": yaml.safe_dump([intent_body(name)])}
    )
    try:
        assert response.status_code == 200, response.text
        assert response.json()["created"] == [name]
        assert name in server.services.turns.intents  # the classifier was reloaded
        rows = await audit_rows(server.services.pool, name)
        assert [(r["kind"], r["before"], r["user_id"]) for r in rows] == [
            ("intent.import", None, server.admin.id)
        ]
        assert rows[0]["after"]["answer"] == "Kumquats fly on Tuesdays."
    finally:
        await server.http.delete(f"/api/intents/{name}")


async def test_create_update_and_delete_are_audited_with_before_and_after(server: LiveServer) -> None:
    name = unique_name()
    created = await server.http.post("/api/intents", json=intent_body(name))
    assert created.status_code == 201, created.text
    updated = await server.http.put(f"/api/intents/{name}", json=intent_body(name, description="changed"))
    assert updated.status_code == 200
    deleted = await server.http.delete(f"/api/intents/{name}")
    assert deleted.status_code == 204

    rows = await audit_rows(server.services.pool, name)
    assert [r["kind"] for r in rows] == ["intent.create", "intent.update", "intent.delete"]
    assert all(r["user_id"] == server.admin.id and r["user_email"] == server.admin.email for r in rows)
    create, update, delete = rows
    assert create["before"] is None and create["after"]["description"] == "a test intent"
    assert update["before"]["description"] == "a test intent" and update["after"]["description"] == "changed"
    assert delete["before"]["description"] == "changed" and delete["after"] is None
    assert rows[0]["at"] <= rows[1]["at"] <= rows[2]["at"]

    listed = await server.http.get("/api/admin/audit", params={"target": name})
    assert listed.status_code == 200
    entries = listed.json()["entries"]
    assert [e["kind"] for e in entries] == ["intent.delete", "intent.update", "intent.create"]  # latest first
    assert (
        entries[1]["before"]["description"] == "a test intent"
        and entries[1]["after"]["description"] == "changed"
    )


async def test_refused_changes_are_not_audited(server: LiveServer) -> None:
    name = unique_name()
    bad = await server.http.post("/api/intents", json=intent_body(name, policy="sometimes"))
    assert bad.status_code == 422
    missing = await server.http.delete(f"/api/intents/{name}")
    assert missing.status_code == 404
    assert await audit_rows(server.services.pool, name) == []


async def test_collisions_name_an_example_that_belongs_to_another_intent(server: LiveServer) -> None:
    intents = server.services.turns.intents
    victim = next(i for i in intents.values() if i.enabled and len(i.examples) >= 3 and i.action != "faq")
    name = unique_name()
    body = intent_body(
        name, examples=["kumquat deliveries to the moon", "kumquats by rocket", *victim.examples[:2]]
    )
    assert (await server.http.post("/api/intents", json=body)).status_code == 201
    try:
        response = await server.http.get("/api/admin/collisions")
        assert response.status_code == 200
        found = response.json()["collisions"]
        assert any(c["intent"] == name and c["classified_as"] == victim.name for c in found), found
    finally:
        await server.http.delete(f"/api/intents/{name}")


async def test_the_page_is_served_with_the_console_headers(server: LiveServer) -> None:
    from tests.support import login, make_user  # noqa: PLC0415

    user, password = await make_user(server, "admin")
    browser = await login(server, user.email, password)
    response = await browser.get("/admin")
    assert response.status_code == 200
    assert "default-src 'none'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    assert "shared: " not in response.text  # the shared parts were inlined
    assert "http://" not in response.text and "https://" not in response.text  # nothing external
