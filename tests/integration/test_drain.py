"""SIGTERM drains a node (issue: fleet operation): ``/readyz`` turns 503 at once while ``/healthz``
stays ok, new calls (``POST /twilio/voice``) and new chat sockets are refused so a proxy sends them
to another node, the call in progress completes, and then the server stops by itself."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx
import pytest
import websockets

from crm_bridge import db
from tests.support import free_port, process_env

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


async def _wait_for(what: str, check, within: float) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        await asyncio.sleep(0.1)


async def test_sigterm_drains_the_node_the_call_in_progress_completes_and_the_server_stops(
    pg_admin_dsn: str,
) -> None:
    name = f"closeloop_drain_{os.getpid()}_{secrets.token_hex(3)}"
    await db.ensure_database(pg_admin_dsn, name)
    dsn = db.with_database(pg_admin_dsn, name)
    data_dir = Path(tempfile.mkdtemp(prefix="closeloop-drain-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = data_dir / "server.log"
    log = log_path.open("w+")
    server = subprocess.Popen(
        [str(BIN / "closeloop"), "serve", "--port", str(port)],
        cwd=ROOT,
        env=process_env(
            DATABASE_URL=dsn,
            CLOSELOOP_DEMO_SEED="true",
            CLOSELOOP_DATA_DIR=str(data_dir),
            CLOSELOOP_DRAIN_SECONDS="60",
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    caller: subprocess.Popen[str] | None = None
    try:
        async with httpx.AsyncClient(base_url=base, timeout=5) as http:

            async def ready() -> bool:
                assert server.poll() is None, log_path.read_text()
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.HTTPError:
                    return False

            await _wait_for("the node is ready", ready, 120)
            await _wait_for("speech models loaded", _log_has(log_path, "speech models ready"), 120)

            caller = subprocess.Popen(
                [str(BIN / "closeloop"), "call", "--url", base, "--caller", "+15550100002",
                 "--say", "what are your opening hours", "--say", "thanks, goodbye"],
                env=process_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )  # fmt: skip
            conn = await asyncpg.connect(dsn)
            try:

                async def call_in_progress() -> bool:
                    return bool(
                        await conn.fetchval("SELECT count(*) FROM calls WHERE stream_sid IS NOT NULL")
                    )

                await _wait_for("the call is in progress", call_in_progress, 60)
                server.send_signal(signal.SIGTERM)

                async def draining() -> bool:
                    return (await http.get("/readyz")).status_code == 503

                await _wait_for("/readyz says draining", draining, 5)
                assert (await http.get("/readyz")).json() == {"status": "draining"}
                assert (await http.get("/healthz")).status_code == 200  # alive: do not restart it
                new_call = await http.post(
                    "/twilio/voice",
                    data={"CallSid": "CA" + "1" * 32, "From": "+15550100003", "To": "+15550000000"},
                )
                assert new_call.status_code == 503 and new_call.headers["Retry-After"] == "5"
                async with websockets.connect(f"ws://127.0.0.1:{port}/chat") as chat:
                    with pytest.raises(websockets.ConnectionClosed) as closed:
                        await chat.recv()
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013

                output, _ = await asyncio.to_thread(caller.communicate, timeout=120)
                assert caller.returncode == 0, output  # the call in progress went on to its end
                assert "protocol violations: 0" in output
                row = await conn.fetchrow(
                    "SELECT end_reason, conversation_id FROM calls WHERE stream_sid IS NOT NULL"
                )
                assert row["end_reason"] != "node_draining"
                said = await conn.fetch(
                    "SELECT sender, body FROM messages WHERE conversation_id = $1 ORDER BY seq",
                    row["conversation_id"],
                )
                # both turns heard ("thanks, goodbye" may be two); a failure shows what was heard
                # and said, and the simulated caller's own report (its turns, barge-ins, timings)
                heard = [f"{m['sender']}: {m['body']}" for m in said]
                assert [m["sender"] for m in said].count("customer") in (2, 3), (heard, output)
            finally:
                await conn.close()

        exit_code = await asyncio.to_thread(server.wait, 30)  # the node stops by itself once drained
        assert exit_code == 0
        output = log_path.read_text()
        assert "closeloop: draining" in output and "closeloop: drained; stopping" in output
        assert "Traceback" not in output, output
    finally:
        for proc in (caller, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(data_dir, ignore_errors=True)
        await db.drop_database(pg_admin_dsn, name)


def _log_has(path: Path, text: str):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        return text in path.read_text()

    return check
