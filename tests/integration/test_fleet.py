"""closeloop as a fleet: two `closeloop serve` nodes on one PostgreSQL behind a real HAProxy
(Debian's haproxy, started with a generated config) that balances every request round robin and
passes WebSocket upgrades through. Any node takes any webhook and media stream; follow-up jobs run
exactly once across nodes; a node killed with SIGKILL mid-call is found lost by the other, which
ends its call (``node_lost``) and books the caller a call back, while a call on the other node
goes on to its end."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx
import pytest
import websockets

from crm_bridge import db
from crm_bridge.queues import QueueDirectory
from crm_bridge.users import UserStore
from pipeline.clock import SystemClock
from tests.support import AUTH_TOKEN, free_port, process_env, sign, whatsapp_form

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
DANA = "+15550100001"  # the demo company's customer with delivered order 4517


def _haproxy() -> str:
    if not Path(HAPROXY).is_file():
        pytest.fail(
            f"haproxy not found at {HAPROXY}: run `make test` (scripts/bootstrap.sh installs Debian's haproxy)"
        )
    return HAPROXY


async def _until(what: str, check: Callable[[], Awaitable[bool]], within: float) -> float:
    """Poll ``check`` until true; the seconds it took."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < within, f"{what}: not within {within} s"
        await asyncio.sleep(0.1)
    return time.monotonic() - started


@dataclass
class Node:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Fleet:
    proxy: str
    dsn: str
    pool: asyncpg.Pool
    nodes: dict[str, Node] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


HAPROXY_CFG = """global
    maxconn 512
defaults
    mode http
    timeout connect 2s
    timeout client 120s
    timeout server 120s
    timeout tunnel 1h
    option forwardfor
frontend fleet
    bind 127.0.0.1:{port}
    default_backend nodes
backend nodes
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server inter 300ms fall 2 rise 1
    # without it a check must finish within "inter": a node busy for 300 ms (loading its models,
    # a loaded test machine) twice in a row was taken out and every request went to the other
    timeout check 3s
    http-response set-header X-Served-By %s
{servers}
"""


@asynccontextmanager
async def fleet(pg_admin_dsn: str, tmp: Path) -> AsyncIterator[Fleet]:
    name = f"closeloop_fleet_{os.getpid()}_{secrets.token_hex(3)}"
    await db.ensure_database(pg_admin_dsn, name)
    dsn = db.with_database(pg_admin_dsn, name)
    proxy_port = free_port()
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    common = {
        "DATABASE_URL": dsn,
        "PUBLIC_BASE_URL": proxy_url,  # Twilio signs what it calls: the proxy's address
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "CLOSELOOP_SECRET_KEY": secrets.token_urlsafe(32),  # media-stream tokens valid on every node
        "CLOSELOOP_TRUSTED_PROXIES": "127.0.0.1",
        "CLOSELOOP_NODE_HEARTBEAT_SECONDS": "1",
        "CLOSELOOP_NODE_TIMEOUT_SECONDS": "4",
        "CLOSELOOP_JOB_POLL_SECONDS": "0.2",
    }
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    pool: asyncpg.Pool | None = None
    try:
        nodes: dict[str, Node] = {}
        for index, node_name in enumerate(("node1", "node2")):
            port = free_port()
            log_path = tmp / f"{node_name}.log"
            log = log_path.open("wb")
            logs.append(log)
            env = process_env(
                **common,
                CLOSELOOP_DATA_DIR=str(tmp / node_name),
                CLOSELOOP_DEMO_SEED="true" if index == 0 else "false",
            )
            proc = subprocess.Popen(
                [str(BIN / "closeloop"), "serve", "--port", str(port)],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            procs.append(proc)
            node = nodes[node_name] = Node(node_name, port, proc, log_path)

            async def seeded(node: Node = node, first: bool = index == 0) -> bool:
                assert node.proc.poll() is None, node.output()
                return not first or "demo company loaded" in node.output()

            await _until(
                f"{node_name} migrated the database", seeded, 120
            )  # then both load their models at once
        for node in nodes.values():

            async def ready(node: Node = node) -> bool:
                assert node.proc.poll() is None, node.output()
                return "speech models ready" in node.output()

            await _until(f"{node.name} started", ready, 180)
        servers = "\n".join(f"    server {n} 127.0.0.1:{node.port} check" for n, node in nodes.items())
        config = tmp / "haproxy.cfg"
        config.write_text(HAPROXY_CFG.format(port=proxy_port, servers=servers))
        proxy_log = (tmp / "haproxy.log").open("wb")
        logs.append(proxy_log)
        procs.append(
            subprocess.Popen(
                [_haproxy(), "-f", str(config), "-db"], stdout=proxy_log, stderr=subprocess.STDOUT
            )
        )
        async with httpx.AsyncClient(base_url=proxy_url, timeout=5) as http:
            served: set[str] = set()

            async def both_serving() -> bool:
                try:
                    response = await http.get("/readyz")
                except httpx.HTTPError:
                    return False
                if response.status_code == 200:
                    served.add(response.headers.get("x-served-by", ""))
                return served == {"node1", "node2"}

            await _until("the proxy sends work to both nodes", both_serving, 30)
        pool = await db.create_pool(dsn, min_size=1, max_size=4)
        yield Fleet(proxy_url, dsn, pool, nodes, common)
    finally:
        if pool is not None:
            await pool.close()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
        await db.drop_database(pg_admin_dsn, name)


async def _whatsapp(http: httpx.AsyncClient, proxy: str, body: str) -> tuple[str, str]:
    form = whatsapp_form(DANA, body)
    response = await http.post(
        "/twilio/messaging",
        data=form,
        headers={"X-Twilio-Signature": sign(proxy + "/twilio/messaging", form)},
    )
    assert response.status_code == 200, response.text
    replies = " ".join(re.findall(r"<Message>(.*?)</Message>", response.text, re.S)).replace("&apos;", "'")
    return replies, response.headers["x-served-by"]


async def _handoff_crosses_nodes(f: Fleet, http: httpx.AsyncClient) -> None:
    password = secrets.token_urlsafe(12)
    agent = await UserStore(f.pool).create_user(
        f"fleet-agent-{secrets.token_hex(4)}@example.com", "Fleet Agent", "agent", password
    )
    await QueueDirectory(f.pool, SystemClock()).set_queues(agent.id, ["support"])
    signed_in = await http.post("/login", data={"email": agent.email, "password": password, "next": "/login"})
    assert signed_in.status_code == 303, signed_in.text  # the session is in the database: any node knows it
    cookie = f"closeloop_session={http.cookies['closeloop_session']}"
    http.headers["X-CSRF-Token"] = (await http.get("/api/me")).json()["csrf_token"]
    ws_url = f.proxy.replace("http://", "ws://") + "/console/ws"
    async with websockets.connect(
        ws_url, additional_headers={"Cookie": cookie, "Origin": f.proxy}
    ) as console:
        console_node = console.response.headers["x-served-by"]
        assert json.loads(await asyncio.wait_for(console.recv(), 10))["type"] == "hello"
        presence = await http.post("/api/desk/presence", json={"presence": "available"})
        assert presence.status_code == 200, presence.text
        # Round robin: after a request served by the console's node, the next goes to the other.
        while (await http.get("/readyz")).headers["x-served-by"] != console_node:
            pass
        caller = "+1555030" + f"{secrets.randbelow(10**4):04d}"
        form = whatsapp_form(caller, "let me speak to a human")
        raised = await http.post(
            "/twilio/messaging",
            data=form,
            headers={"X-Twilio-Signature": sign(f.proxy + "/twilio/messaging", form)},
        )
        assert raised.status_code == 200, raised.text
        assert raised.headers["x-served-by"] != console_node  # raised on the other node
        conversation = await f.pool.fetchval(
            "SELECT id FROM conversations WHERE channel = 'whatsapp' AND address = $1", caller
        )
        assert conversation is not None
        while True:  # events until the offer of that conversation (bounded by the recv timeout)
            event = json.loads(await asyncio.wait_for(console.recv(), 15))
            if event.get("type") == "offer" and event.get("conversation_id") == conversation:
                break
    http.cookies.clear()
    http.headers.pop("X-CSRF-Token", None)


def _call(fleet: Fleet, *said: str) -> subprocess.Popen[str]:
    args = [
        str(BIN / "closeloop"),
        "call",
        "--url",
        fleet.proxy,
        "--caller",
        "+1555010" + f"{secrets.randbelow(10**4):04d}",
    ]
    for line in said:
        args += ["--say", line]
    return subprocess.Popen(
        args,
        env=process_env(TWILIO_AUTH_TOKEN=AUTH_TOKEN),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


async def test_two_nodes_behind_haproxy_share_the_work_and_survive_a_killed_node(pg_admin_dsn: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="closeloop-fleet-"))
    try:
        async with fleet(pg_admin_dsn, tmp) as f, httpx.AsyncClient(base_url=f.proxy, timeout=30) as http:
            # 1. The refund story over WhatsApp, its webhooks landing on alternate nodes.
            served = []
            replies, node = await _whatsapp(http, f.proxy, "I want a refund for my order")
            served.append(node)
            assert "Which order" in replies and "4517" in replies
            replies, node = await _whatsapp(http, f.proxy, "4517")
            served.append(node)
            assert "Shall I go ahead?" in replies
            replies, node = await _whatsapp(http, f.proxy, "yes please")
            served.append(node)
            assert "$89.00 is refunded for order 4517" in replies
            assert set(served) == {"node1", "node2"}, served
            refunds = await f.pool.fetchval(
                "SELECT count(*) FROM refunds r JOIN orders o ON o.id = r.order_id WHERE o.number = '4517'"
            )
            assert refunds == 1

            # 1b. An agent whose console is connected to one node is offered a handoff raised on
            #     the other (the event crosses nodes through PostgreSQL LISTEN/NOTIFY).
            await _handoff_crosses_nodes(f, http)

            # 2. 200 follow-ups due at once: each sent exactly once, by whichever node claimed it.
            now = await f.pool.fetchval("SELECT now()")
            ids = []
            for n in range(200):
                conversation = await f.pool.fetchval(
                    """INSERT INTO conversations (channel, address, status, created_at, updated_at)
                       VALUES ('sms', $1, 'open', $2, $2) RETURNING id""",
                    f"+1555020{n:04d}",
                    now,
                )
                ids.append(conversation)
                await f.pool.execute(
                    """INSERT INTO followups (dedupe_key, conversation_id, channel, address, body, due_at, created_at)
                       VALUES ($1, $2, 'sms', $3, $4, $5, $5)""",
                    f"fleet-{n}",
                    conversation,
                    f"+1555020{n:04d}",
                    f"Fleet follow-up {n}: did everything arrive?",
                    now,
                )

            async def all_sent() -> bool:
                left = await f.pool.fetchval(
                    "SELECT count(*) FROM followups WHERE dedupe_key LIKE 'fleet-%' AND status <> 'sent'"
                )
                return left == 0

            await _until("200 follow-ups sent", all_sent, 90)
            per_conversation = await f.pool.fetch(
                """SELECT conversation_id, count(*) AS n FROM messages
                   WHERE conversation_id = ANY($1::bigint[]) AND body LIKE 'Fleet follow-up %' GROUP BY conversation_id""",
                ids,
            )
            assert len(per_conversation) == 200 and {r["n"] for r in per_conversation} == {1}
            attempts = await f.pool.fetchval(
                "SELECT max(attempts) FROM followups WHERE dedupe_key LIKE 'fleet-%'"
            )
            assert attempts <= 1

            # 3. Two calls through the proxy, each with its media stream on a different node
            #    (webhook and stream of one call may land on different nodes: any node takes either).
            calls: dict[str, tuple[str, subprocess.Popen[str]]] = {}
            long_call = ("what are your opening hours", "do you ship abroad", "thanks, goodbye")
            for _ in range(4):
                if len({node for node, _ in calls.values()}) == 2:
                    break
                known = set(calls)
                proc = _call(f, *long_call)

                async def streaming(known: set[str] = known, proc: subprocess.Popen[str] = proc) -> bool:
                    rows = await f.pool.fetch(
                        "SELECT call_sid, node_id FROM calls WHERE stream_sid IS NOT NULL AND ended_at IS NULL"
                    )
                    new = [r for r in rows if r["call_sid"] not in known]
                    if new:
                        calls[new[0]["call_sid"]] = (new[0]["node_id"], proc)
                    return bool(new)

                await _until("the call's media stream started", streaming, 60)
                await http.get("/healthz")  # one request more: the next call's stream goes to the other node
            by_node: dict[str, str] = {}
            for sid, (node_id, _) in calls.items():
                by_node.setdefault(node_id, sid)
            assert len(by_node) == 2, calls
            node_of = {
                r["id"]: r["pid"]
                for r in await f.pool.fetch(
                    "SELECT id, pid FROM nodes WHERE id = ANY($1::text[])", list(by_node)
                )
            }
            victim_node, survivor_node = list(by_node)
            victim_sid, survivor_sid = by_node[victim_node], by_node[survivor_node]
            victim = next(n for n in f.nodes.values() if n.proc.pid == node_of[victim_node])

            # 4. kill -9 of one node mid-call.
            victim.proc.kill()
            killed_at = time.monotonic()

            async def lost() -> bool:
                reason = await f.pool.fetchval("SELECT end_reason FROM calls WHERE call_sid = $1", victim_sid)
                return reason == "node_lost"

            took = await _until("the killed node's call ends as node_lost", lost, 30)
            assert took < 30
            conversation = await f.pool.fetchval(
                "SELECT conversation_id FROM calls WHERE call_sid = $1", victim_sid
            )
            callback = await f.pool.fetchrow(
                "SELECT phone, status FROM callbacks WHERE conversation_id = $1", conversation
            )
            assert callback is not None and callback["status"] == "scheduled"
            assert time.monotonic() - killed_at < 30

            # The call on the other node goes on to its end.
            survivor = calls[survivor_sid][1]
            output, _ = await asyncio.to_thread(survivor.communicate, timeout=120)
            assert survivor.returncode == 0, output
            assert "protocol violations: 0" in output
            row = await f.pool.fetchrow(
                "SELECT end_reason, ended_at FROM calls WHERE call_sid = $1", survivor_sid
            )
            assert row["end_reason"] != "node_lost" and row["ended_at"] is not None
            for _, (_, proc) in calls.items():
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()  # reaps it and closes its pipe
            counts = collections.Counter(r["kind"] for r in await f.pool.fetch(
                "SELECT kind FROM events WHERE conversation_id = $1", conversation))  # fmt: skip
            assert counts["call_lost"] == 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
