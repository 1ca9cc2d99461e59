"""Card data split over turns, a spoken security code and an unseparated SSN never leave closeloop.

The attack: the customer (or a script pretending to be one) feeds a card number in pieces that a
per-message redactor cannot recognise ("4111 1111", then "1111 1111"; or "4111", then the rest),
says the security code in words on a call, or types an SSN without dashes. After each
conversation every text, json, array and search-index column of every table, every log record the
process emitted and every request body sent to the (fake) model are searched for any 8
consecutive digits of the card, for the code and for the SSN.

The calls run on the real server with ``CLOSELOOP_STT=deepgram`` against the fake Deepgram server
(scripted transcripts, so the recognised words are known exactly); it also checks that closeloop
asks Deepgram for its own ``pci`` and ``ssn`` redaction.
"""

from __future__ import annotations

import logging
import re
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import websockets

from pipeline.clock import FakeClock
from pipeline.redaction import CARD_MARKER, CVV_MARKER, SSN_MARKER
from telephony.simulator import Utterance, run_call
from tests.fakes.deepgram_server import FakeDeepgram
from tests.fakes.llm_server import FakeOpenAI
from tests.fakes.twilio_server import FakeTwilio
from tests.integration.test_card_redaction import (
    ServerLogs,
    customer_texts,
    digits_only,
    grouped,
    llm_engine,
    polite_model,
    random_card,
)
from tests.integration.test_text_channels import chat, hello
from tests.support import (
    ACCOUNT_SID,
    AUTH_TOKEN,
    LiveServer,
    live_server,
    make_customer,
    post_signed,
    twilio_settings,
    whatsapp_form,
)

DG_KEY = "dg-security-key-0123456789"


async def conversation_texts(server: LiveServer, conversation_id: int) -> list[str]:
    rows = await server.services.pool.fetch(
        "SELECT body FROM messages WHERE conversation_id = $1 AND sender = 'customer' ORDER BY seq",
        conversation_id,
    )
    return [r["body"] for r in rows]


def windows(card: str, size: int = 8) -> list[str]:
    """Every run of ``size`` consecutive digits of the card: none may be found anywhere."""
    return [card[i : i + size] for i in range(len(card) - size + 1)]


async def stored_values(pool: asyncpg.Pool) -> list[str]:
    """``table.column: value`` of every stored text, json, array and search-index value."""
    columns = await pool.fetch(
        """SELECT table_name, column_name FROM information_schema.columns
           WHERE table_schema = 'public'
             AND data_type IN ('text', 'character varying', 'character', 'json', 'jsonb', 'ARRAY', 'tsvector')
           ORDER BY table_name, column_name"""
    )
    assert len(columns) > 30  # the whole schema, not a handful of tables
    found = []
    for c in columns:
        table, column = c["table_name"], c["column_name"]
        rows = await pool.fetch(f'SELECT "{column}"::text AS v FROM "{table}" WHERE "{column}" IS NOT NULL')
        found += [f"{table}.{column}: {r['v']}" for r in rows]
    return found


def leaks(texts: list[str], needles: list[str], words: re.Pattern[str] | None = None) -> list[str]:
    """Texts holding one of the digit strings ``needles`` (digits only, words turned to digits) or
    matching ``words``."""
    return [
        t[:300]
        for t in texts
        if any(n in digits_only(t) for n in needles) or (words is not None and words.search(t))
    ]


def log_texts(logs: ServerLogs) -> list[str]:
    """Formatted log lines and every raw record field (what a JSON log shipper would send)."""
    fields = [" ".join(f"{k}={v!r}" for k, v in vars(r).items() if k not in _NUMERIC) for r in logs.records]
    return [*logs.lines, *fields]


_NUMERIC = ("created", "msecs", "relativeCreated", "thread", "process", "lineno", "levelno")


def model_bodies(llm: FakeOpenAI) -> list[str]:
    return [r.body.decode() for r in llm.requests]


@pytest.fixture(scope="module")
def logs() -> Iterator[ServerLogs]:
    """Every record the process logs, from a handler attached before any server starts (the
    server puts its redacting filter on the handlers that exist then, as in a deployment)."""
    root = logging.getLogger()
    handler, level = ServerLogs(), root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture
async def text_server(database_url: str) -> AsyncIterator[tuple[LiveServer, FakeOpenAI, FakeClock]]:
    clock = FakeClock()
    async with (
        FakeOpenAI(polite_model) as llm,
        live_server(database_url, clock=clock, twilio_auth_token=AUTH_TOKEN, **llm_engine(llm)) as server,
    ):
        yield server, llm, clock


async def test_a_card_split_over_two_web_chat_messages_and_over_whatsapp_is_nowhere(
    text_server: Any, logs: ServerLogs
) -> None:
    server, llm, clock = text_server
    web_card, wa_card = random_card(), random_card()
    async with websockets.connect(server.ws_url) as ws:
        web_chat = (await hello(ws))["conversation_id"]
        # Four digits alone read as an order number; the rest makes them the start of a card.
        await chat(ws, web_card[:4])
        await chat(ws, grouped(web_card[4:]))
    c = await make_customer(server.services.pool, clock.now(), {"lamp": ("placed", "Desk lamp", 4200, 1)})
    for part in (wa_card[:8], wa_card[8:]):
        response = await post_signed(server, "/twilio/messaging", whatsapp_form(c.phone, grouped(part)))
        assert response.status_code == 200

    assert await conversation_texts(server, web_chat) == [CARD_MARKER, CARD_MARKER]
    assert await customer_texts(server, "whatsapp", c.phone) == [CARD_MARKER, CARD_MARKER]
    needles = windows(web_card) + windows(wa_card)
    assert leaks(await stored_values(server.services.pool), needles) == []
    assert leaks(log_texts(logs), needles) == []
    # The web chat client logs its frames at DEBUG: the one with the card's rest was cleaned.
    assert any("withheld" in line or CARD_MARKER in line for line in logs.lines)
    assert leaks(model_bodies(llm), needles) == []
    assert any(CARD_MARKER in body for body in model_bodies(llm))  # the model did get the turns


async def test_an_ssn_typed_without_separators_is_nowhere(text_server: Any, logs: ServerLogs) -> None:
    server, llm, _ = text_server
    ssn = "6" + "".join(secrets.choice("0123456789") for _ in range(8))
    async with websockets.connect(server.ws_url) as ws:
        web_chat = (await hello(ws))["conversation_id"]
        await chat(ws, f"my ssn is {ssn}")

    assert await conversation_texts(server, web_chat) == [f"my ssn is {SSN_MARKER}"]
    assert leaks(await stored_values(server.services.pool), [ssn]) == []
    assert leaks(log_texts(logs), [ssn]) == []
    assert leaks(model_bodies(llm), [ssn]) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_a_security_code_spoken_on_a_call_is_nowhere_and_deepgram_is_asked_to_redact(
    database_url: str, logs: ServerLogs
) -> None:
    clock = FakeClock()
    port = _free_port()
    code_words = "nine zero four"
    # the words, or the digits after the code's words (bare "904" is in a log line's milliseconds)
    spoken_code = re.compile(r"nine\W+zero\W+four|code\W+(?:is\W+)?904", re.IGNORECASE)
    script = [
        "I want to pay the rest with my card.",
        f"The security code is {code_words}.",
        "Thanks, goodbye.",
    ]
    async with (
        FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as twilio,
        FakeOpenAI(polite_model) as llm,
        live_server(
            database_url,
            clock=clock,
            **twilio_settings(twilio),
            stt_provider="deepgram",
            deepgram_api_key=DG_KEY,
            deepgram_url=f"ws://127.0.0.1:{port}",
            **llm_engine(llm),
        ) as server,
    ):
        await server.services.speech.start()
        caller = await make_customer(
            server.services.pool, clock.now(), {"lamp": ("placed", "Desk lamp", 4200, 1)}
        )
        async with FakeDeepgram(DG_KEY, script, port=port) as deepgram:
            report = await run_call(
                server.base_url,
                [
                    Utterance(text="hello there I have a question"),
                    Utterance(text="it is about my payment today"),
                    Utterance(text="that will be all for today"),
                ],
                caller=caller.phone,
                auth_token=AUTH_TOKEN,
                account_sid=ACCOUNT_SID,
                max_call_seconds=120,
            )
        print(report.format())
        assert not report.violations, report.violations
        bodies = await customer_texts(server, "voice", report.call_sid)
        print("stored caller turns:", bodies)
        assert bodies[:2] == [script[0], f"The security code is {CVV_MARKER}."]

        assert [v for k, v in deepgram.connections[0].query if k == "redact"] == ["pci", "ssn"]
        stored = await stored_values(server.services.pool)
        assert [v for v in stored if spoken_code.search(v)] == []
        assert leaks(log_texts(logs), [], spoken_code) == []
        assert leaks(model_bodies(llm), [], spoken_code) == []
        assert any(CVV_MARKER in body for body in model_bodies(llm))
